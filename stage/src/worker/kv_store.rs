//! The KV store: every sequence's cache for this stage's layers, by sequence id.
//!
//! A micro-batch takes its sequences' caches out for the length of a chunk and
//! puts them back after; a refused one puts back exactly what it took. Room for
//! a new cache is the memory governor's to give ([`super::governor`]): the store
//! asks it through the `make` function of [`KvStore::take`].

use super::Error;
use lime_kernels::KvCache;
use lime_schemas::SeqSlot;
use std::collections::HashMap;

/// Every live sequence's cache on this stage.
#[derive(Default)]
pub(super) struct KvStore {
    caches: HashMap<u64, KvCache>,
}

impl KvStore {
    pub(super) fn len(&self) -> usize {
        self.caches.len()
    }

    /// Whether every sequence of a micro-batch has a cache large enough here or
    /// starts one (its first token).
    pub(super) fn check(&self, seqs: &[SeqSlot]) -> Result<(), Error> {
        for s in seqs {
            let fits = match self.caches.get(&s.id) {
                Some(c) => c.capacity() >= (s.pos + s.len) as usize,
                None => s.pos == 0,
            };
            if !fits {
                return Err(missing(s));
            }
        }
        Ok(())
    }

    /// Each sequence's cache, in `seqs`' order; one starting at its first token
    /// gets a new cache from `make` (of the capacity it asks for). On error
    /// nothing is taken.
    pub(super) fn take(
        &mut self,
        seqs: &[SeqSlot],
        mut make: impl FnMut(usize) -> Result<KvCache, Error>,
    ) -> Result<Vec<KvCache>, Error> {
        let mut out = Vec::with_capacity(seqs.len());
        for s in seqs {
            let cache = match self.caches.remove(&s.id) {
                Some(c) if c.capacity() >= (s.pos + s.len) as usize => Ok(c),
                None if s.pos == 0 => make(s.capacity as usize),
                other => {
                    if let Some(c) = other {
                        self.caches.insert(s.id, c);
                    }
                    Err(missing(s))
                }
            };
            match cache {
                Ok(c) => out.push(c),
                Err(e) => {
                    self.put(seqs, out);
                    return Err(e);
                }
            }
        }
        Ok(out)
    }

    /// Puts caches taken for `seqs` back, in the same order.
    pub(super) fn put(&mut self, seqs: &[SeqSlot], caches: Vec<KvCache>) {
        for (slot, c) in seqs.iter().zip(caches) {
            self.caches.insert(slot.id, c);
        }
    }

    /// Takes a finished sequence's cache out for good.
    pub(super) fn remove(&mut self, id: u64) -> Option<KvCache> {
        self.caches.remove(&id)
    }
}

fn missing(s: &SeqSlot) -> Error {
    Error::Refused(format!(
        "sequence {} at position {} has no cache here (or it is too small)",
        s.id, s.pos
    ))
}
