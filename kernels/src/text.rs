//! Text in and out: the checkpoint's `tokenizer.json`, and streaming detokenization
//! that emits text only at UTF-8 character boundaries.

use crate::{Error, Result};
use std::path::{Path, PathBuf};

/// The checkpoint's tokenizer.
pub struct TextTokenizer {
    inner: tokenizers::Tokenizer,
    path: PathBuf,
}

impl std::fmt::Debug for TextTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextTokenizer")
            .field("path", &self.path)
            .finish()
    }
}

impl TextTokenizer {
    /// Loads `tokenizer.json` from a file or a checkpoint directory.
    pub fn from_path(path: impl AsRef<Path>) -> Result<Self> {
        let mut path = path.as_ref().to_path_buf();
        if path.is_dir() {
            path.push("tokenizer.json");
        }
        let inner = tokenizers::Tokenizer::from_file(&path).map_err(|e| Error::Tokenizer {
            path: path.clone(),
            message: e.to_string(),
        })?;
        Ok(Self { inner, path })
    }

    fn err(&self, e: impl std::fmt::Display) -> Error {
        Error::Tokenizer {
            path: self.path.clone(),
            message: e.to_string(),
        }
    }

    /// Token ids of `text`, with the beginning-of-text token when the tokenizer's
    /// template adds one and `special` is set.
    pub fn encode(&self, text: &str, special: bool) -> Result<Vec<u32>> {
        Ok(self
            .inner
            .encode(text, special)
            .map_err(|e| self.err(e))?
            .get_ids()
            .to_vec())
    }

    /// The text of `ids`, without special tokens.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids, true).map_err(|e| self.err(e))
    }

    /// The id of a token given by its text (special tokens included).
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// A decoder for one sequence's generated tokens.
    pub fn stream(&self) -> TextStream<'_> {
        TextStream {
            tokenizer: self,
            inner: self.inner.decode_stream(true),
            ids: Vec::new(),
            emitted: String::new(),
        }
    }
}

type DecodeStream<'a> = tokenizers::DecodeStream<
    'a,
    tokenizers::ModelWrapper,
    tokenizers::NormalizerWrapper,
    tokenizers::PreTokenizerWrapper,
    tokenizers::PostProcessorWrapper,
    tokenizers::DecoderWrapper,
>;

/// Turns tokens into text as they are generated. A token that ends inside a
/// multi-byte character yields nothing until the character is complete.
pub struct TextStream<'a> {
    tokenizer: &'a TextTokenizer,
    inner: DecodeStream<'a>,
    ids: Vec<u32>,
    emitted: String,
}

impl TextStream<'_> {
    /// The new text that `id` completes, if any.
    pub fn step(&mut self, id: u32) -> Result<Option<String>> {
        self.ids.push(id);
        let piece = self.inner.step(id).map_err(|e| self.tokenizer.err(e))?;
        if let Some(p) = &piece {
            self.emitted.push_str(p);
        }
        Ok(piece)
    }

    /// Whatever the last tokens left pending (an incomplete character, decoded as
    /// U+FFFD), so that the whole stream adds up to the whole decode.
    pub fn finish(self) -> Result<Option<String>> {
        let full = self.tokenizer.decode(&self.ids)?;
        Ok(full
            .strip_prefix(self.emitted.as_str())
            .filter(|rest| !rest.is_empty())
            .map(str::to_string))
    }
}
