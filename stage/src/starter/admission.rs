//! The starter's account of KV room on every stage: which requests fit now,
//! which must wait for running ones to finish, and which can never fit.
//!
//! A sequence's KV cache is reserved whole (prompt plus `max_tokens`) on every
//! stage when its first token arrives there, so growth never surprises a stage.
//! Each stage reports its room with every layer streamed when the ring closes
//! (the `Ping`); a request is admitted only while every stage has room for it, and
//! a stage makes the room by streaming more layers ([`crate::memory::adaptation`]).

use lime_schemas::KvRoom;
use std::collections::HashMap;

/// Whether a request's KV caches fit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fit {
    /// Every stage has room for it beside the sequences admitted.
    Now,
    /// Not until running sequences finish, or the rooms are known.
    Later(Waiting),
    /// Not even alone: why, for the requester.
    Never(String),
}

/// What a waiting request waits for (as reported on its reply topic).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Waiting {
    /// The ring has not reported its rooms yet (at start, or after a new plan).
    Ring,
    /// Some stage's room is taken by running sequences.
    Memory,
}

impl Waiting {
    /// Its name in the `waiting_for` of the queued message.
    pub fn as_str(self) -> &'static str {
        match self {
            Waiting::Ring => "ring",
            Waiting::Memory => "memory",
        }
    }
}

/// The KV bytes admitted sequences hold on each stage, against each stage's room.
#[derive(Debug, Default)]
pub struct Ledger {
    /// `None` until the ring reported (again, after a new plan).
    rooms: Option<Vec<KvRoom>>,
    /// Bytes reserved per stage, in the order of `rooms`.
    used: Vec<u64>,
    /// Each admitted sequence's cache length in tokens.
    tokens: HashMap<u64, u64>,
}

impl Ledger {
    /// Takes the stages' rooms and recounts what the admitted sequences use.
    pub fn set_rooms(&mut self, rooms: Vec<KvRoom>) {
        self.used = rooms
            .iter()
            .map(|r| self.tokens.values().map(|t| t * r.bytes_per_token).sum())
            .collect();
        for (room, used) in rooms.iter().zip(&self.used) {
            if room.bytes.is_some_and(|b| *used > b) {
                tracing::warn!(
                    stage = %room.stage,
                    used_mb = used >> 20,
                    room_mb = room.bytes.unwrap_or_default() >> 20,
                    "admitted sequences exceed this stage's KV room under the new plan"
                );
            }
        }
        self.rooms = Some(rooms);
    }

    /// Forgets the rooms: a new plan is coming and the ring will report again.
    pub fn forget_rooms(&mut self) {
        self.rooms = None;
    }

    /// Whether a sequence of `tokens` tokens fits.
    pub fn check(&self, tokens: usize) -> Fit {
        let Some(rooms) = &self.rooms else {
            return Fit::Later(Waiting::Ring);
        };
        let tokens = tokens as u64;
        let mut later = false;
        for (room, used) in rooms.iter().zip(&self.used) {
            let Some(bytes) = room.bytes else { continue };
            let need = tokens * room.bytes_per_token;
            if need > bytes {
                let most = bytes / room.bytes_per_token.max(1);
                return Fit::Never(format!(
                    "its KV cache ({tokens} tokens: prompt plus max_tokens) needs {:.1} MiB on stage {}, \
                     which has {:.1} MiB for KV caches even with every layer streamed; \
                     at most {most} tokens fit there",
                    need as f64 / (1 << 20) as f64,
                    room.stage,
                    bytes as f64 / (1 << 20) as f64,
                ));
            }
            later |= used + need > bytes;
        }
        if later {
            Fit::Later(Waiting::Memory)
        } else {
            Fit::Now
        }
    }

    /// Reserves room for sequence `id` (checked with [`Ledger::check`]).
    pub fn admit(&mut self, id: u64, tokens: usize) {
        self.tokens.insert(id, tokens as u64);
        if let Some(rooms) = &self.rooms {
            for (room, used) in rooms.iter().zip(&mut self.used) {
                *used += tokens as u64 * room.bytes_per_token;
            }
        }
    }

    /// Sequence `old` goes on as `new` (its cache is being rebuilt).
    pub fn renumber(&mut self, old: u64, new: u64) {
        if let Some(tokens) = self.tokens.remove(&old) {
            self.tokens.insert(new, tokens);
        }
    }

    /// Gives back sequence `id`'s room once it has finished; an unknown id is ignored.
    pub fn free(&mut self, id: u64) {
        let Some(tokens) = self.tokens.remove(&id) else {
            return;
        };
        if let Some(rooms) = &self.rooms {
            for (room, used) in rooms.iter().zip(&mut self.used) {
                *used = used.saturating_sub(tokens * room.bytes_per_token);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn room(stage: &str, bytes: Option<u64>) -> KvRoom {
        KvRoom {
            stage: stage.into(),
            bytes,
            bytes_per_token: 10,
        }
    }

    #[test]
    fn requests_wait_for_the_ring_then_for_memory() {
        let mut l = Ledger::default();
        assert_eq!(l.check(5), Fit::Later(Waiting::Ring));
        l.set_rooms(vec![room("s0", None), room("s1", Some(1000))]);
        assert_eq!(l.check(60), Fit::Now);
        l.admit(1, 60);
        assert_eq!(l.check(40), Fit::Now);
        assert_eq!(l.check(41), Fit::Later(Waiting::Memory));
        l.free(1);
        assert_eq!(l.check(100), Fit::Now);
    }

    #[test]
    fn a_request_larger_than_a_stage_is_refused_with_the_most_that_fits() {
        let mut l = Ledger::default();
        l.set_rooms(vec![room("s1", Some(1000))]);
        let Fit::Never(why) = l.check(101) else {
            panic!("should never fit")
        };
        assert!(
            why.contains("stage s1") && why.contains("at most 100 tokens"),
            "{why}"
        );
    }

    #[test]
    fn a_new_plan_recounts_what_is_admitted() {
        let mut l = Ledger::default();
        l.admit(7, 50);
        l.set_rooms(vec![room("a", Some(600))]);
        assert_eq!(l.check(10), Fit::Now);
        assert_eq!(l.check(11), Fit::Later(Waiting::Memory));
        l.forget_rooms();
        assert_eq!(l.check(1), Fit::Later(Waiting::Ring));
    }

    #[test]
    fn a_renumbered_sequence_keeps_its_room_under_its_new_number() {
        let mut l = Ledger::default();
        l.set_rooms(vec![room("a", Some(600))]);
        l.admit(7, 50);
        l.renumber(7, 8);
        l.free(7);
        assert_eq!(l.check(11), Fit::Later(Waiting::Memory));
        l.free(8);
        assert_eq!(l.check(60), Fit::Now);
    }
}
