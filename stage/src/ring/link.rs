//! What a stage knows of its link to the next stage: bandwidth samples from large
//! frames (activations and probes) timed by the receiver, and round trips of
//! small probes, reduced to the medians of the recent ones for telemetry.

use lime_schemas::LinkMeasurement;
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Samples older than this no longer describe the link.
const RECENT: Duration = Duration::from_secs(2);
/// Samples kept, newest last.
const KEPT: usize = 16;
/// Fewer bytes than this after a frame's first read time too coarsely to count.
pub const MIN_TIMED_BYTES: usize = 32 << 10;
/// A transfer quicker than this says more about the receiver (it read bytes
/// that had queued while it was busy) than about the link: not a sample, but a
/// sign that probes must grow.
const MIN_TIMED: Duration = Duration::from_millis(2);

/// The link's samples, shared by the writer, the reader of acks, and telemetry.
#[derive(Debug, Clone, Default)]
pub struct LinkGauge(Arc<Mutex<Samples>>);

#[derive(Debug, Default)]
struct Samples {
    to: String,
    mbit_per_s: VecDeque<(Instant, f64)>,
    rtt_ms: VecDeque<(Instant, f64)>,
    /// The last timed transfer was too quick to measure.
    too_quick: bool,
    /// A transfer arrived in less time than the estimate allows for its bytes:
    /// the link got faster, and the samples before it describe the old link.
    outpaced: bool,
}

impl LinkGauge {
    /// Forgets the old link: the stage now sends to `to`.
    pub fn reset(&self, to: &str) {
        if let Ok(mut s) = self.0.lock() {
            *s = Samples {
                to: to.to_owned(),
                ..Samples::default()
            };
        }
    }

    /// `bytes` took `took` to arrive.
    pub fn transfer(&self, bytes: u64, took: Duration) {
        if (bytes as usize) < MIN_TIMED_BYTES {
            return;
        }
        let Ok(mut s) = self.0.lock() else { return };
        s.too_quick = took < MIN_TIMED;
        if s.too_quick {
            // Waiting receivers only make transfers look quicker, never slower,
            // so this is a hint, confirmed or not by the next timed transfer.
            let expected = median(&s.mbit_per_s).map(|m| bytes as f64 * 8.0 / (m * 1e6));
            s.outpaced |= expected.is_some_and(|e| e >= MIN_TIMED.as_secs_f64());
            return;
        }
        if std::mem::take(&mut s.outpaced) {
            s.mbit_per_s.clear();
        }
        push(
            &mut s.mbit_per_s,
            bytes as f64 * 8.0 / took.as_secs_f64() / 1e6,
        );
    }

    /// A transfer outpaced the estimate: it should be measured again now rather
    /// than when it is due.
    pub fn outpaced(&self) -> bool {
        self.0.lock().is_ok_and(|s| s.outpaced)
    }

    /// The last timed transfer was too quick to measure: the next probe should
    /// be larger.
    pub fn too_quick(&self) -> bool {
        self.0.lock().is_ok_and(|s| s.too_quick)
    }

    /// A small probe came back after `rtt`; telemetry reports the least of the
    /// recent ones.
    pub fn round_trip(&self, rtt: Duration) {
        if let Ok(mut s) = self.0.lock() {
            push(&mut s.rtt_ms, rtt.as_secs_f64() * 1e3);
        }
    }

    /// Age of the newest bandwidth sample; `None` before the first.
    pub fn age(&self) -> Option<Duration> {
        let s = self.0.lock().ok()?;
        s.mbit_per_s.back().map(|(at, _)| at.elapsed())
    }

    /// The latest estimate of the bandwidth, Mb/s.
    pub fn mbit_per_s(&self) -> Option<f64> {
        self.measurement().map(|m| m.mbit_per_s)
    }

    /// Medians of the recent samples (the newest three if none is recent).
    pub fn measurement(&self) -> Option<LinkMeasurement> {
        let s = self.0.lock().ok()?;
        let (newest, _) = *s.mbit_per_s.back()?;
        Some(LinkMeasurement {
            to: s.to.clone(),
            // The least recent round trip: the others waited behind activations.
            rtt_ms: recent(&s.rtt_ms)
                .into_iter()
                .reduce(f64::min)
                .unwrap_or(0.0),
            mbit_per_s: median(&s.mbit_per_s)?,
            samples: recent(&s.mbit_per_s).len() as u32,
            age_ms: newest.elapsed().as_millis() as u64,
        })
    }
}

fn push(q: &mut VecDeque<(Instant, f64)>, v: f64) {
    if q.len() == KEPT {
        q.pop_front();
    }
    q.push_back((Instant::now(), v));
}

fn recent(q: &VecDeque<(Instant, f64)>) -> Vec<f64> {
    let mut v: Vec<f64> = q
        .iter()
        .filter(|(at, _)| at.elapsed() < RECENT)
        .map(|(_, x)| *x)
        .collect();
    if v.is_empty() {
        v = q.iter().rev().take(3).map(|(_, x)| *x).collect();
    }
    v
}

fn median(q: &VecDeque<(Instant, f64)>) -> Option<f64> {
    let mut v = recent(q);
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    Some(v[v.len() / 2])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_median_ignores_one_outlier_and_small_frames() {
        let g = LinkGauge::default();
        g.reset("s2");
        assert!(g.measurement().is_none());
        g.transfer(100, Duration::from_millis(1));
        assert!(g.measurement().is_none(), "too small to time");
        for ms in [80, 82, 5, 81] {
            g.transfer(1_000_000, Duration::from_millis(ms));
        }
        g.transfer(1_000_000, Duration::from_micros(300));
        assert!(g.too_quick(), "300 µs for 1 MB is the receiver catching up");
        assert!(g.outpaced(), "1 MB at 100 Mb/s takes 80 ms: measure again");
        g.round_trip(Duration::from_micros(400));
        g.round_trip(Duration::from_millis(30));
        let m = g.measurement().unwrap();
        assert_eq!(m.to, "s2");
        assert_eq!(m.samples, 4);
        assert!((m.mbit_per_s - 100.0).abs() < 1e-9, "{m:?}");
        assert!((m.rtt_ms - 0.4).abs() < 1e-9);
    }

    #[test]
    fn a_link_that_got_faster_is_measured_afresh() {
        let g = LinkGauge::default();
        g.reset("s1");
        for _ in 0..10 {
            g.transfer(64 << 10, Duration::from_millis(10)); // about 52 Mb/s
        }
        // At the old estimate 64 KiB takes 10 ms; it came in 300 µs.
        g.transfer(64 << 10, Duration::from_micros(300));
        assert!(g.outpaced() && g.too_quick());
        // The probe that follows confirms it: the old samples are dropped.
        g.transfer(4 << 20, Duration::from_millis(34));
        assert!(!g.outpaced());
        let m = g.measurement().unwrap();
        assert_eq!(m.samples, 1);
        assert!((m.mbit_per_s - 986.8).abs() < 1.0, "{m:?}");
    }
}
