//! Device emulation's compute half (`emulate.compute_slowdown`): after each
//! piece of model math the stage waits until the piece has taken `slowdown`
//! times as long as this machine needs for it, as on a device that much
//! slower. Paced reads ([`lime_kernels::storage`]) are the other half.
//!
//! A stage that waits gives its core to the others, so emulated stages sharing
//! a few cores overlap like separate devices. What this machine "needs" is the
//! best time seen for work of the same shape, not this run's: when two stages
//! compute at once they share the memory bus and run slower, and multiplying
//! that would make each emulated device slower the busier the others are,
//! which separate devices are not (a 4-stage pipeline filled with micro-batches
//! lost a fifth of its throughput that way).

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

/// Oversleeping is paid back on later pieces, but never more than this much,
/// so that one long stall of the machine does not make the next layers free.
const MAX_CREDIT: Duration = Duration::from_millis(2);

/// How much slower than this machine the stage computes, and what it owes.
#[derive(Debug)]
pub struct ComputePace {
    slowdown: f64,
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
            owed_s: Cell::new(0.0),
            best: RefCell::new(HashMap::new()),
        }
    }

    /// Whether any waiting happens.
    pub fn is_on(&self) -> bool {
        self.slowdown > 1.0
    }

    /// Runs `work`'s `compute`, then waits until it has taken `slowdown` times
    /// this machine's best time for such work. `finish` makes the work
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
        self.after(took, best);
        out
    }

    /// `took` of real computation, whose best time is `best`, just ended: wait
    /// out the rest of its emulated time.
    fn after(&self, took: Duration, best: Duration) {
        let emulated = best.as_secs_f64() * self.slowdown;
        let owed = self.owed_s.get() + emulated - took.as_secs_f64();
        if owed <= 0.0 {
            self.owed_s.set(owed);
            return;
        }
        let started = Instant::now();
        std::thread::sleep(Duration::from_secs_f64(owed));
        let left = owed - started.elapsed().as_secs_f64();
        self.owed_s.set(left.max(-MAX_CREDIT.as_secs_f64()));
    }
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
    fn off_it_does_not_wait() {
        let pace = ComputePace::new(1.0);
        assert!(!pace.is_on());
        let started = Instant::now();
        pace.run(Work::Head(1), || spin(Duration::from_millis(5)), || {});
        assert!(started.elapsed() < Duration::from_millis(50));
        assert!(!ComputePace::new(f64::NAN).is_on());
    }
}
