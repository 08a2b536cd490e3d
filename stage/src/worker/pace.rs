//! Device emulation's compute half (`emulate.compute_slowdown`): after each
//! piece of model math the stage waits until the piece has taken as long as on
//! the emulated device. Paced reads ([`lime_kernels::storage`]) are the other
//! half.
//!
//! A stage that waits gives its core to the others, so emulated stages sharing
//! a few cores overlap like separate devices. How long a piece takes on the
//! emulated device is its profile's figure for that shape when the stage has a
//! profile (measured at start on a quiet machine, `slowdown` times this
//! machine's time, or a file's): the figures the planner plans with, so that
//! the emulated device keeps one speed whatever else this machine runs. Shapes
//! the profile does not describe, or a stage without one, take `slowdown` times
//! the best time seen here for work of that shape: a run's own time would make
//! each emulated device slower the busier the others are (two stages computing
//! at once share the memory bus), which separate devices are not.
//!
//! The real computation is the floor: an emulated device is never faster than
//! this machine manages at that moment.

use lime_schemas::MeasuredCompute;
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// What a piece of model math was, so that only like pieces are compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Work {
    /// One decoder layer over a micro-batch.
    Layer {
        /// Rows of the micro-batch.
        tokens: usize,
        /// Sequences in it.
        seqs: usize,
        /// ⌈log2⌉ of the tokens attended to, summed over its sequences.
        context_log2: u32,
    },
    /// The starter's embedding of this many tokens.
    Embed(usize),
    /// The final norm and head over this many rows.
    Head(usize),
}

impl Work {
    /// A layer over `tokens` rows of `seqs` sequences attending to `context`
    /// tokens in all.
    pub fn layer(tokens: usize, seqs: usize, context: usize) -> Self {
        Self::Layer {
            tokens,
            seqs,
            context_log2: usize::BITS - context.leading_zeros(),
        }
    }
}

/// Shapes remembered at most; beyond, the oldest knowledge is dropped.
const MAX_SHAPES: usize = 4096;

/// Time the stage fell behind its emulated clock (a sleep that overslept, a
/// piece that computed past its emulated time) is made up on later pieces, but
/// never more than this much, so that one long stall of the machine does not
/// make the next layers free.
const MAX_CREDIT: Duration = Duration::from_millis(2);

/// How much slower than this machine the stage computes, and what it owes.
#[derive(Debug)]
pub struct ComputePace {
    slowdown: f64,
    /// The emulated device's profile: its time for the shapes it describes.
    figures: Option<MeasuredCompute>,
    /// Waiting still owed (positive) or overslept (negative), in seconds.
    owed_s: Cell<f64>,
    /// The best time seen for each shape of work.
    best: RefCell<HashMap<Work, Duration>>,
}

impl ComputePace {
    /// Computing `slowdown` times slower than this machine; 1 is full speed.
    pub fn new(slowdown: f64) -> Self {
        Self {
            slowdown: if slowdown.is_finite() {
                slowdown.max(1.0)
            } else {
                1.0
            },
            figures: None,
            owed_s: Cell::new(0.0),
            best: RefCell::new(HashMap::new()),
        }
    }

    /// Paced to a profile of the emulated device (its figures already the
    /// device's, as `lime-stage --profile` writes them under emulation).
    pub fn with_figures(mut self, figures: MeasuredCompute) -> Self {
        self.figures = Some(figures);
        self
    }

    /// Whether any waiting happens.
    pub fn is_on(&self) -> bool {
        self.slowdown > 1.0
    }

    /// Runs `work`'s `compute`, then waits until it has taken as long as on
    /// the emulated device. `finish` makes the work
    /// complete before the clock stops (a GPU queues its kernels and returns).
    pub fn run<T>(&self, work: Work, compute: impl FnOnce() -> T, finish: impl FnOnce()) -> T {
        if !self.is_on() {
            return compute();
        }
        let started = Instant::now();
        let out = compute();
        finish();
        let took = started.elapsed();
        let best = {
            let mut best = self.best.borrow_mut();
            if best.len() >= MAX_SHAPES && !best.contains_key(&work) {
                best.clear();
            }
            let b = best.entry(work).or_insert(took);
            *b = (*b).min(took);
            *b
        };
        let emulated = self
            .figures
            .as_ref()
            .and_then(|f| profiled(f, work))
            .unwrap_or(best.as_secs_f64() * self.slowdown);
        tracing::trace!(
            ?work,
            took_ms = took.as_secs_f64() * 1e3,
            emulated_ms = emulated * 1e3,
            "paced"
        );
        self.after(took, emulated);
        out
    }

    /// `took` of real computation just ended, whose emulated time is
    /// `emulated` seconds: wait out the rest.
    fn after(&self, took: Duration, emulated: f64) {
        let owed = self.owed_s.get() + emulated - took.as_secs_f64();
        if owed <= 0.0 {
            self.owed_s.set(owed.max(-MAX_CREDIT.as_secs_f64()));
            return;
        }
        let started = Instant::now();
        std::thread::sleep(Duration::from_secs_f64(owed));
        let left = owed - started.elapsed().as_secs_f64();
        self.owed_s.set(left.max(-MAX_CREDIT.as_secs_f64()));
    }
}

/// The profile's seconds for `work`, where it measured such work: a decode
/// step by its sequences, a pass with longer pieces (prefill) by its tokens,
/// the head by its rows (the profile's ends, embedding included).
fn profiled(figures: &MeasuredCompute, work: Work) -> Option<f64> {
    let (points, n) = match work {
        Work::Layer { tokens, seqs, .. } if tokens == seqs => (&figures.decode, tokens),
        Work::Layer { tokens, .. } => (&figures.prefill, tokens),
        Work::Head(rows) => (&figures.ends, rows),
        Work::Embed(_) => return None,
    };
    (!points.is_empty()).then(|| lime_plan::cost::interpolate(points, n))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spin(d: Duration) {
        let t = Instant::now();
        while t.elapsed() < d {
            std::hint::spin_loop();
        }
    }

    #[test]
    fn paced_work_takes_its_slowdown_times_as_long() {
        let pace = ComputePace::new(4.0);
        let started = Instant::now();
        for _ in 0..20 {
            pace.run(Work::Embed(1), || spin(Duration::from_millis(2)), || {});
        }
        let took = started.elapsed().as_secs_f64();
        // 20 × 2 ms × 4 = 160 ms; what the sleeps overshoot is paid back.
        assert!((0.155..0.6).contains(&took), "{took} s");
    }

    #[test]
    fn work_slowed_by_contention_is_paced_from_its_best_time() {
        let pace = ComputePace::new(4.0);
        let work = Work::layer(1, 1, 40);
        pace.run(work, || spin(Duration::from_millis(2)), || {});
        // The same work, three times slower (another stage held the bus):
        // the emulated device still takes 4 × 2 ms, not 4 × 6 ms.
        let started = Instant::now();
        pace.run(work, || spin(Duration::from_millis(6)), || {});
        let took = started.elapsed().as_secs_f64();
        assert!((0.0075..0.012).contains(&took), "{took} s");
        // Other work has its own best time.
        let started = Instant::now();
        pace.run(
            Work::layer(8, 8, 320),
            || spin(Duration::from_millis(6)),
            || {},
        );
        assert!(started.elapsed() >= Duration::from_millis(23));
    }

    #[test]
    fn a_profiled_device_computes_at_its_figures() {
        let ms = |tokens, ms: f64| lime_schemas::TimePoint {
            tokens,
            seconds: ms / 1e3,
        };
        let figures = MeasuredCompute {
            model: lime_schemas::ShapeKey {
                name: "test".into(),
                layer_params: 1,
                hidden: 1,
            },
            decode: vec![ms(1, 10.0), ms(8, 24.0)],
            prefill: vec![ms(16, 40.0), ms(64, 100.0)],
            ends: vec![ms(1, 6.0)],
        };
        let pace = ComputePace::new(4.0).with_figures(figures);
        let timed = |work, spent| {
            let started = Instant::now();
            pace.run(work, || spin(Duration::from_millis(spent)), || {});
            started.elapsed().as_secs_f64() * 1e3
        };
        // Decode at 4 sequences: 10 + 3/7 of the way to 24 ms, whatever the
        // computation itself took (not 4 × 2 ms).
        let took = timed(Work::layer(4, 4, 160), 2);
        assert!((15.5..20.0).contains(&took), "{took} ms");
        // A pass with prompt pieces goes by its tokens, on the prefill curve.
        let took = timed(Work::layer(32, 2, 64), 2);
        assert!((59.5..64.0).contains(&took), "{took} ms");
        assert!((5.5..9.0).contains(&timed(Work::Head(1), 1)));
        // Computing past the figure is never cut short, and is not made up
        // for by the next piece beyond the credit.
        let took = timed(Work::layer(1, 1, 8), 30);
        assert!(took >= 29.5, "{took} ms");
        let took = timed(Work::layer(1, 1, 8), 1);
        assert!(took >= 7.5, "{took} ms");
        // What the profile does not describe is paced from this machine.
        let took = timed(Work::Embed(3), 2);
        assert!((7.5..12.0).contains(&took), "{took} ms");
    }

    #[test]
    fn off_it_does_not_wait() {
        let pace = ComputePace::new(1.0);
        assert!(!pace.is_on());
        let started = Instant::now();
        pace.run(Work::Head(1), || spin(Duration::from_millis(5)), || {});
        assert!(started.elapsed() < Duration::from_millis(50));
        assert!(!ComputePace::new(f64::NAN).is_on());
    }
}
