//! Request ids the starter is serving or has just served. MQTT's QoS 1
//! delivers at least once: a robot whose acknowledgement came late publishes
//! its request again, and the broker may hand it over twice. The same request
//! under an id in flight (or finished moments ago) is served once; a different
//! request under an id still in flight is refused, so no two answers ever
//! stream under one id. Once an answer is done the id is free again.

use std::collections::{HashMap, VecDeque};
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What an id's arrival is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seen {
    /// Serve it.
    New,
    /// The same request again, in flight or just answered.
    Redelivery,
    /// Another request under an id in flight.
    Conflict,
}

/// Shared by the intake (which notes ids) and the scheduler (which ends them).
pub type SharedIds = Arc<Mutex<RecentIds>>;

#[derive(Debug, Clone, Copy)]
struct Entry {
    fingerprint: u64,
    /// `None` while the request is in flight.
    finished: Option<Instant>,
}

/// Ids in flight, and those finished within `grace` (at most `capacity`
/// entries; the oldest go first).
#[derive(Debug)]
pub struct RecentIds {
    grace: Duration,
    capacity: usize,
    entries: HashMap<String, Entry>,
    order: VecDeque<String>,
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
    /// `grace` and `capacity` are the starter's `redelivery_grace_ms` and
    /// `max_remembered_ids`; a capacity of 0 is taken as 1.
    pub fn new(grace: Duration, capacity: usize) -> Self {
        Self {
            grace,
            capacity: capacity.max(1),
            entries: HashMap::new(),
            order: VecDeque::new(),
        }
    }

    /// The same, behind the lock the intake and the scheduler share.
    pub fn shared(grace: Duration, capacity: usize) -> SharedIds {
        Arc::new(Mutex::new(Self::new(grace, capacity)))
    }

    /// Says what a request under `id` is, and records it when it is served.
    pub fn note(&mut self, id: &str, fingerprint: u64, now: Instant) -> Seen {
        self.expire(now);
        if let Some(e) = self.entries.get(id) {
            match (e.fingerprint == fingerprint, e.finished) {
                (true, _) => return Seen::Redelivery,
                (false, None) => return Seen::Conflict,
                (false, Some(_)) => {}
            }
        }
        if !self.entries.contains_key(id) {
            while self.order.len() >= self.capacity {
                if let Some(old) = self.order.pop_front() {
                    self.entries.remove(&old);
                }
            }
            self.order.push_back(id.to_owned());
        }
        self.entries.insert(
            id.to_owned(),
            Entry {
                fingerprint,
                finished: None,
            },
        );
        Seen::New
    }

    /// The answer under `id` is complete (or the request was refused).
    pub fn finished(&mut self, id: &str, now: Instant) {
        if let Some(e) = self.entries.get_mut(id) {
            e.finished = Some(now);
        }
    }

    fn expire(&mut self, now: Instant) {
        let grace = self.grace;
        self.entries
            .retain(|_, e| e.finished.is_none_or(|t| now.duration_since(t) <= grace));
        let entries = &self.entries;
        self.order.retain(|id| entries.contains_key(id));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_id_is_taken_while_in_flight_and_freed_after_the_grace() {
        let mut r = RecentIds::new(Duration::from_secs(10), 8);
        let t = Instant::now();
        assert_eq!(r.note("a", 1, t), Seen::New);
        assert_eq!(r.note("a", 1, t), Seen::Redelivery);
        assert_eq!(
            r.note("a", 2, t),
            Seen::Conflict,
            "another request in flight"
        );
        r.finished("a", t);
        let soon = t + Duration::from_secs(5);
        assert_eq!(r.note("a", 1, soon), Seen::Redelivery, "a late redelivery");
        assert_eq!(
            r.note("a", 2, soon),
            Seen::New,
            "a new request once answered"
        );
        assert_eq!(r.note("a", 1, soon), Seen::Conflict, "now a is 2's");
        let t2 = soon + Duration::from_secs(60);
        assert_eq!(
            r.note("a", 1, t2),
            Seen::Conflict,
            "in flight never expires"
        );
        r.finished("a", t2);
        assert_eq!(r.note("a", 1, t2 + Duration::from_secs(11)), Seen::New);
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
        assert_eq!(r.entries.len(), 2);
        assert_eq!(r.order.len(), 2);
    }
}
