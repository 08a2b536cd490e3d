//! Progress lines on stderr for long work (loading, synthesising, benchmarks):
//! redrawn in place on a terminal, one line per tenth otherwise so logs stay short.

use std::io::{IsTerminal, Write};
use std::time::Instant;

/// Reports `done / total` of some named work.
pub struct Progress {
    what: String,
    tty: bool,
    last_tenth: Option<u64>,
    started: Instant,
}

impl Progress {
    pub fn new(what: impl Into<String>) -> Self {
        Self {
            what: what.into(),
            tty: std::io::stderr().is_terminal(),
            last_tenth: None,
            started: Instant::now(),
        }
    }

    /// Updates the line; `unit` names what is counted ("layers", "MB").
    pub fn update(&mut self, done: u64, total: u64, unit: &str) {
        let tenth = (done * 10).checked_div(total).unwrap_or(10);
        let line = format!(
            "{}: {done}/{total} {unit} ({:.1}s)",
            self.what,
            self.started.elapsed().as_secs_f64()
        );
        let mut err = std::io::stderr().lock();
        if self.tty {
            let _ = write!(err, "\r\x1b[2K{line}");
            if done >= total {
                let _ = writeln!(err);
            }
        } else if self.last_tenth != Some(tenth) {
            let _ = writeln!(err, "{line}");
            self.last_tenth = Some(tenth);
        }
    }
}
