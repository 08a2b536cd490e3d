//! Finding lime's other binaries: the one place that knows where `lime-broker`,
//! `lime-stage` and `lime` are when a tool or a test starts them.

use std::path::{Path, PathBuf};

/// A lime binary next to the running one (`target/<profile>/` for tests and
/// `cargo run`, the install directory otherwise).
pub fn sibling(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let mut dir = exe.parent().map(Path::to_path_buf);
    while let Some(d) = dir {
        let candidate = d.join(name);
        if candidate.is_file() {
            return Ok(candidate);
        }
        // Test binaries live one level down, in deps/.
        dir = (d.file_name().is_some_and(|n| n == "deps"))
            .then(|| d.parent().map(Path::to_path_buf))
            .flatten();
    }
    anyhow::bail!(
        "{name} was not found next to {}; build every binary first: cargo build --release",
        exe.display()
    )
}
