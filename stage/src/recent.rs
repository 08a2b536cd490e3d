//! Request ids the starter has taken lately. MQTT's QoS 1 delivers at least
//! once: a robot that reconnects may publish its request again, and the broker
//! may hand it over twice. The same request under the same id is served once;
//! a different request under an id still remembered is refused, so no two
//! answers ever share an id.

use std::collections::{HashMap, VecDeque};
use std::hash::{Hash, Hasher};
use std::time::{Duration, Instant};

/// What an id's arrival is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seen {
    /// Not taken lately: serve it.
    New,
    /// The same request again: already served or being served.
    Redelivery,
    /// Another request under a taken id.
    Conflict,
}

/// Ids taken within `window`, at most `capacity` of them (the oldest go first).
#[derive(Debug)]
pub struct RecentIds {
    window: Duration,
    capacity: usize,
    taken: HashMap<String, (u64, Instant)>,
    order: VecDeque<(String, Instant)>,
}

/// What identifies one request: its payload and where it wants its answer.
pub fn fingerprint(
    payload: &[u8],
    response_topic: Option<&str>,
    correlation: Option<&[u8]>,
) -> u64 {
    // SipHash with fixed keys: the same within the process, which is all this
    // needs.
    let mut h = std::collections::hash_map::DefaultHasher::new();
    payload.hash(&mut h);
    response_topic.hash(&mut h);
    correlation.hash(&mut h);
    h.finish()
}

impl RecentIds {
    pub fn new(window: Duration, capacity: usize) -> Self {
        Self {
            window,
            capacity: capacity.max(1),
            taken: HashMap::new(),
            order: VecDeque::new(),
        }
    }

    /// Records `id` if it is new; says what it is.
    pub fn note(&mut self, id: &str, fingerprint: u64, now: Instant) -> Seen {
        self.expire(now);
        match self.taken.get(id) {
            Some((f, _)) if *f == fingerprint => Seen::Redelivery,
            Some(_) => Seen::Conflict,
            None => {
                while self.order.len() >= self.capacity {
                    self.forget_oldest();
                }
                self.taken.insert(id.to_owned(), (fingerprint, now));
                self.order.push_back((id.to_owned(), now));
                Seen::New
            }
        }
    }

    fn expire(&mut self, now: Instant) {
        while self
            .order
            .front()
            .is_some_and(|(_, at)| now.duration_since(*at) > self.window)
        {
            self.forget_oldest();
        }
    }

    fn forget_oldest(&mut self) {
        if let Some((id, at)) = self.order.pop_front() {
            if self.taken.get(&id).is_some_and(|(_, t)| *t == at) {
                self.taken.remove(&id);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_redelivery_is_told_from_a_conflict_until_the_window_passes() {
        let mut r = RecentIds::new(Duration::from_secs(60), 8);
        let t = Instant::now();
        assert_eq!(r.note("a", 1, t), Seen::New);
        assert_eq!(r.note("a", 1, t), Seen::Redelivery);
        assert_eq!(r.note("a", 2, t), Seen::Conflict);
        assert_eq!(r.note("b", 2, t), Seen::New);
        let later = t + Duration::from_secs(61);
        assert_eq!(
            r.note("a", 2, later),
            Seen::New,
            "forgotten after the window"
        );
    }

    #[test]
    fn the_oldest_go_first_beyond_the_capacity() {
        let mut r = RecentIds::new(Duration::from_secs(60), 2);
        let t = Instant::now();
        for id in ["a", "b", "c"] {
            assert_eq!(r.note(id, 1, t), Seen::New);
        }
        assert_eq!(r.note("a", 9, t), Seen::New, "a was pushed out");
        assert_eq!(r.note("c", 9, t), Seen::Conflict);
        assert_eq!(r.taken.len(), 2);
    }
}
