//! The conditions a plan was made for, and when measurements say they changed:
//! link bandwidths (each stage measures its link to the next) and storage read
//! bandwidths (each stage's loader), from the stages' telemetry.
//!
//! Thresholds and hysteresis:
//! - a figure has *changed* when every report for at least `sustain` puts it off
//!   the value the running plan assumed by `factor` or more, either way; one noisy
//!   sample, or a burst of other traffic shorter than `sustain`, changes nothing;
//! - once one figure's change is sustained, figures whose latest report is off
//!   by `factor` too are taken with it (one event moves several links, and
//!   their reports arrive a little apart);
//! - but first, for at most `settle`, the planner waits for every link to be
//!   measured since the change began: a link is probed about once a second, and
//!   one whose newest sample predates the event says nothing yet of whether it
//!   moved too (a plan made without it would be stale at once);
//! - a change, once taken, becomes the assumed value, so the next change is
//!   measured from there and a figure hovering near a threshold cannot flap;
//! - whether a change leads to a new plan is the planner's call ([`crate::planning`]):
//!   only when the best plan differs and is predicted enough better.

use lime_schemas::{Link, Links};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// What is measured.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Figure {
    /// Mb/s from one stage to the next.
    Link { from: String, to: String },
    /// A stage's storage reads, bytes/s.
    Read { stage: String },
}

#[derive(Debug, Clone)]
struct Track {
    assumed: f64,
    latest: f64,
    /// When the newest sample behind `latest` was taken.
    sampled: Instant,
    /// When the reports started to disagree with `assumed`...
    off_since: Option<Instant>,
    /// ...and when the first sample that did was taken.
    off_sampled: Option<Instant>,
    /// Link latency, ms, from the measured round trip.
    latency_ms: Option<f64>,
}

/// A change taken: the figure, what the plan assumed and what was measured.
#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    pub figure: Figure,
    pub was: f64,
    pub now: f64,
}

#[derive(Debug)]
pub struct Conditions {
    factor: f64,
    sustain: Duration,
    settle: Duration,
    tracks: BTreeMap<Figure, Track>,
}

impl Conditions {
    pub fn new(factor: f64, sustain: Duration, settle: Duration) -> Self {
        Self {
            factor: factor.max(1.0),
            sustain,
            settle,
            tracks: BTreeMap::new(),
        }
    }

    /// Records a measurement of `figure` reported at `now` from samples the
    /// newest of which was taken at `sampled`; the running plan took the figure
    /// to be `assumed` if nothing was measured before.
    pub fn observe(
        &mut self,
        figure: Figure,
        assumed: f64,
        measured: f64,
        sampled: Instant,
        now: Instant,
    ) {
        if !(measured.is_finite() && measured > 0.0) {
            return;
        }
        let factor = self.factor;
        let t = self.tracks.entry(figure).or_insert(Track {
            assumed,
            latest: measured,
            sampled,
            off_since: None,
            off_sampled: None,
            latency_ms: None,
        });
        t.latest = measured;
        t.sampled = sampled;
        let ratio = measured / t.assumed;
        if ratio >= factor || ratio <= 1.0 / factor {
            t.off_since.get_or_insert(now);
            t.off_sampled.get_or_insert(sampled);
        } else {
            t.off_since = None;
            t.off_sampled = None;
        }
    }

    /// Records a link's latency (not a trigger on its own).
    pub fn latency(&mut self, from: &str, to: &str, ms: f64) {
        let key = Figure::Link {
            from: from.into(),
            to: to.into(),
        };
        if let Some(t) = self.tracks.get_mut(&key) {
            if ms.is_finite() && ms >= 0.0 {
                t.latency_ms = Some(ms);
            }
        }
    }

    /// The changes sustained for long enough at `now`, joined by every figure
    /// already off in its latest report: one event (a switch port, a shared
    /// medium) moves several links a few reports apart, and a plan made for the
    /// first alone would be stale at once. Nothing while a link not measured
    /// since the event began may still join, for up to `settle`.
    pub fn changed(&self, now: Instant) -> Vec<Change> {
        let Some(sustained) = self
            .tracks
            .values()
            .filter_map(|t| t.off_since?.checked_add(self.sustain))
            .filter(|&s| s <= now)
            .min()
        else {
            return Vec::new();
        };
        let settling = sustained.checked_add(self.settle).is_none_or(|s| now < s);
        if settling && self.awaiting_a_link() {
            return Vec::new();
        }
        self.tracks
            .iter()
            .filter(|(_, t)| t.off_since.is_some())
            .map(|(f, t)| Change {
                figure: f.clone(),
                was: t.assumed,
                now: t.latest,
            })
            .collect()
    }

    /// Whether a link not off has no sample since the first sample of the
    /// changes under way. Only links: they are probed even when idle, while a
    /// stage's reads are measured only when it streams.
    fn awaiting_a_link(&self) -> bool {
        let Some(began) = self.tracks.values().filter_map(|t| t.off_sampled).min() else {
            return false;
        };
        self.tracks.iter().any(|(f, t)| {
            matches!(f, Figure::Link { .. }) && t.off_since.is_none() && t.sampled < began
        })
    }

    /// Takes `changes` as the new assumptions.
    pub fn accept(&mut self, changes: &[Change]) {
        for c in changes {
            if let Some(t) = self.tracks.get_mut(&c.figure) {
                t.assumed = c.now;
                t.off_since = None;
                t.off_sampled = None;
            }
        }
    }

    /// The links between `stages` as currently assumed: `base`, with every link
    /// whose change was taken at its measured speed. A link not measured (the
    /// ring has not used it) from a stage whose measured link changed is taken to
    /// have changed the same way: a device's network (its Wi-Fi, its port) is
    /// what usually changes, for all its links at once.
    pub fn links(&self, base: &Links, stages: &[String]) -> Links {
        let mut out = base.clone();
        for from in stages {
            let measured: Vec<(&String, &Track)> = self
                .tracks
                .iter()
                .filter_map(|(f, t)| match f {
                    Figure::Link { from: a, to } if a == from => Some((to, t)),
                    _ => None,
                })
                .collect();
            for to in stages.iter().filter(|t| *t != from) {
                let before = base.between(from, to);
                let track = measured
                    .iter()
                    .find(|(t, _)| *t == to)
                    .or_else(|| {
                        measured
                            .iter()
                            .find(|(_, t)| t.assumed != before.mbit_per_s)
                    })
                    .map(|(_, t)| *t);
                let Some(t) = track.filter(|t| t.assumed != before.mbit_per_s) else {
                    continue;
                };
                out.links.retain(|l| !(l.from == *from && l.to == *to));
                out.links.push(Link {
                    from: from.clone(),
                    to: to.clone(),
                    mbit_per_s: t.assumed,
                    latency_ms: t.latency_ms.unwrap_or(before.latency_ms),
                });
            }
        }
        out
    }

    /// A stage's read bandwidth as currently assumed, if a change was taken.
    pub fn read_bytes_per_s(&self, stage: &str) -> Option<f64> {
        self.tracks
            .get(&Figure::Read {
                stage: stage.into(),
            })
            .map(|t| t.assumed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lime_schemas::LinkSpeed;

    fn link() -> Figure {
        Figure::Link {
            from: "a".into(),
            to: "b".into(),
        }
    }

    #[test]
    fn a_change_counts_only_when_sustained() {
        let t0 = Instant::now();
        let s = |ms| t0 + Duration::from_millis(ms);
        let mut c = Conditions::new(1.5, Duration::from_secs(2), Duration::ZERO);
        c.observe(link(), 1000.0, 900.0, s(0), s(0));
        assert!(c.changed(s(5000)).is_empty(), "within the factor");
        c.observe(link(), 1000.0, 50.0, s(100), s(100));
        assert!(c.changed(s(1000)).is_empty(), "not yet sustained");
        // A report back near the assumed value resets the clock.
        c.observe(link(), 1000.0, 980.0, s(1500), s(1500));
        c.observe(link(), 1000.0, 48.0, s(1600), s(1600));
        assert!(c.changed(s(3000)).is_empty());
        let changes = c.changed(s(3700));
        assert_eq!(changes.len(), 1);
        assert_eq!((changes[0].was, changes[0].now), (1000.0, 48.0));
    }

    #[test]
    fn a_taken_change_is_the_new_baseline() {
        let t0 = Instant::now();
        let mut c = Conditions::new(1.5, Duration::ZERO, Duration::ZERO);
        c.observe(link(), 1000.0, 50.0, t0, t0);
        let changes = c.changed(t0);
        c.accept(&changes);
        assert!(c.changed(t0).is_empty());
        // 60 is within 1.5× of the new baseline: no flapping.
        c.observe(link(), 1000.0, 60.0, t0, t0);
        assert!(c.changed(t0).is_empty());
        let base = Links::uniform(LinkSpeed {
            mbit_per_s: 1000.0,
            latency_ms: 0.2,
        });
        c.latency("a", "b", 0.5);
        let stages: Vec<String> = ["a", "b", "c"].map(String::from).to_vec();
        let links = c.links(&base, &stages);
        assert_eq!(links.between("a", "b").mbit_per_s, 50.0);
        assert_eq!(links.between("a", "b").latency_ms, 0.5);
        assert_eq!(links.between("b", "a").mbit_per_s, 1000.0);
        // a's other link, never measured, is taken to have dropped with it.
        assert_eq!(links.between("a", "c").mbit_per_s, 50.0);
        // Back up: a change again.
        c.observe(link(), 1000.0, 940.0, t0, t0);
        assert_eq!(c.changed(t0).len(), 1);
    }

    #[test]
    fn figures_already_off_join_a_sustained_change() {
        let t0 = Instant::now();
        let s = |ms| t0 + Duration::from_millis(ms);
        let other = Figure::Link {
            from: "b".into(),
            to: "c".into(),
        };
        let mut c = Conditions::new(1.5, Duration::from_secs(1), Duration::from_secs(2));
        c.observe(link(), 50.0, 50.0, s(0), s(0));
        c.observe(other.clone(), 50.0, 50.0, s(0), s(0));
        c.observe(link(), 50.0, 990.0, s(100), s(100));
        c.observe(other.clone(), 50.0, 1010.0, s(900), s(900));
        assert!(c.changed(s(1000)).is_empty(), "neither sustained yet");
        let changes = c.changed(s(1100));
        assert_eq!(changes.len(), 2, "{changes:?}");
        assert!(changes.iter().any(|c| c.figure == other && c.now == 1010.0));
    }

    #[test]
    fn a_link_not_measured_since_the_change_began_is_awaited() {
        let t0 = Instant::now();
        let s = |ms| t0 + Duration::from_millis(ms);
        let other = Figure::Link {
            from: "b".into(),
            to: "c".into(),
        };
        let settle = Duration::from_secs(2);
        let mut c = Conditions::new(1.5, Duration::from_secs(1), settle);
        c.observe(link(), 50.0, 50.0, s(0), s(0));
        c.observe(other.clone(), 50.0, 50.0, s(50), s(50));
        // a→b sped up in a sample at 300 ms; b→c still reports its sample of
        // 50 ms, from before the change.
        c.observe(link(), 50.0, 990.0, s(300), s(400));
        c.observe(other.clone(), 50.0, 50.0, s(50), s(1300));
        assert!(
            c.changed(s(1500)).is_empty(),
            "sustained, but b→c has not been measured since"
        );
        // b→c's next sample shows it moved too: both are taken together.
        c.observe(other.clone(), 50.0, 1010.0, s(1600), s(1700));
        let changes = c.changed(s(1700));
        assert_eq!(changes.len(), 2, "{changes:?}");

        // A link measured afresh and unchanged does not hold the change up...
        let mut c = Conditions::new(1.5, Duration::from_secs(1), settle);
        c.observe(link(), 50.0, 990.0, s(300), s(400));
        c.observe(other.clone(), 50.0, 50.0, s(350), s(450));
        assert_eq!(c.changed(s(1400)).len(), 1);
        // ...and one never measured again holds it for `settle` at most.
        let mut c = Conditions::new(1.5, Duration::from_secs(1), settle);
        c.observe(other.clone(), 50.0, 50.0, s(50), s(50));
        c.observe(link(), 50.0, 990.0, s(300), s(400));
        assert!(c.changed(s(3399)).is_empty());
        assert_eq!(c.changed(s(3400)).len(), 1);
    }
}
