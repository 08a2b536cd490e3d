//! The one error type of the kernels: every failure names the file and, where there
//! is one, the tensor, because the person reading it has a checkpoint to fix.

use std::path::PathBuf;

/// Why a checkpoint, config or forward pass could not be used.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: invalid config: {message}")]
    Config { path: PathBuf, message: String },
    #[error("{path}: unsupported architecture {found:?}; lime runs {supported}")]
    UnsupportedArchitecture {
        path: PathBuf,
        found: String,
        supported: &'static str,
    },
    #[error("{path}: corrupt safetensors header: {message}")]
    CorruptHeader { path: PathBuf, message: String },
    #[error(
        "{path}: truncated: tensor `{tensor}` needs bytes up to {needed} but the file has {actual}"
    )]
    Truncated {
        path: PathBuf,
        tensor: String,
        needed: u64,
        actual: u64,
    },
    #[error("{dir}: tensor `{tensor}` is missing from the checkpoint")]
    MissingTensor { dir: PathBuf, tensor: String },
    #[error("{path}: tensor `{tensor}` has shape {found:?}, expected {expected:?}")]
    ShapeMismatch {
        path: PathBuf,
        tensor: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    #[error("{path}: tensor `{tensor}` has dtype {found}, which lime cannot use without narrowing or converting ({reason})")]
    UnsupportedDtype {
        path: PathBuf,
        tensor: String,
        found: String,
        reason: &'static str,
    },
    #[error("{path}: tokenizer: {message}")]
    Tokenizer { path: PathBuf, message: String },
    #[error("invalid input: {0}")]
    Input(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// The kernels' result type.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}
