//! The starter's scheduler: the request queue, continuous batching, sampling and
//! replies. Requests join between token steps; finished ones leave at once and
//! their caches are freed round the ring.

pub mod admission;
pub mod chat;
pub mod inflow;
pub mod intake;
pub mod recent;
pub mod sequence;

use crate::config::StarterConfig;
use crate::worker::Worker;
use admission::{Fit, Ledger, Waiting};
use intake::{Job, ReplyTo};
use lime_kernels::TextTokenizer;
use lime_schemas::{Activations, ErrorCode, ErrorReply, KvRoom, Queued, Round};
use recent::SharedIds;
use sequence::{Sequence, Step};
use std::collections::{HashMap, HashSet, VecDeque};
use std::time::Instant;
use tokio::sync::mpsc::UnboundedSender;

/// A message for the MQTT publisher.
#[derive(Debug)]
pub struct Outgoing {
    /// Where the reply goes: the robot's response topic and correlation data.
    pub reply: ReplyTo,
    /// The JSON reply (a token chunk, the final answer or an error).
    pub payload: Vec<u8>,
}

/// The starter's scheduler: admitted sequences, which of them form the next
/// micro-batch, and what each sampled token means for its answer.
pub struct Scheduler<'t> {
    tokenizer: &'t TextTokenizer,
    eos: Vec<u32>,
    limits: StarterConfig,
    max_inflight: u32,
    sequences: HashMap<u64, Sequence<'t>>,
    /// Sequences whose next pass can start, oldest first.
    ready: VecDeque<u64>,
    /// Accepted requests not yet generating.
    waiting: VecDeque<Job>,
    /// Micro-batches on the ring: when each left and which sequences it carries.
    launched: HashMap<u64, (Instant, Vec<u64>)>,
    next_seq: u64,
    next_batch: u64,
    /// The round being launched: its number, the micro-batches still to come
    /// in it, and the sequences it has carried so far.
    round: Round,
    round_seqs: HashSet<u64>,
    /// Start a round only once the last has come back, so that its
    /// micro-batches travel together and share each streamed layer's read;
    /// then a round may hold up to this many micro-batches.
    rounds_together: Option<usize>,
    outbox: UnboundedSender<Outgoing>,
    /// KV room on every stage: what admission checks requests against.
    ledger: Ledger,
    /// No launches: a new plan waits for the ring to empty.
    holding: bool,
    /// Since when, and which sequences are still recomputing their caches after
    /// the last plan change: the switch's cost, which telemetry reports.
    rebuilding: Option<(Instant, HashSet<u64>)>,
    /// Request ids in flight, freed here once each answer ends.
    ids: SharedIds,
    /// The ring broke and is not whole again yet: nothing launches, and new
    /// requests are told they wait for it.
    ring_down: bool,
    /// The stage is shutting down: no request is taken any more.
    draining: bool,
}

impl<'t> Scheduler<'t> {
    /// `plan_inflight` is the plan's micro-batches in flight, used unless the
    /// starter's own `max_inflight` is set.
    pub fn new(
        tokenizer: &'t TextTokenizer,
        eos: Vec<u32>,
        limits: StarterConfig,
        stages: usize,
        plan_inflight: Option<usize>,
        outbox: UnboundedSender<Outgoing>,
        ids: SharedIds,
    ) -> Self {
        // Sequence ids must not repeat across starter restarts: other stages may
        // still hold caches of the previous run's sequences.
        let base = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or_default();
        let max_inflight = inflight(&limits, stages, plan_inflight);
        Self {
            tokenizer,
            eos,
            limits,
            max_inflight,
            sequences: HashMap::new(),
            ready: VecDeque::new(),
            waiting: VecDeque::new(),
            launched: HashMap::new(),
            next_seq: base,
            next_batch: 0,
            round: Round::default(),
            round_seqs: HashSet::new(),
            rounds_together: None,
            outbox,
            ledger: Ledger::default(),
            holding: false,
            rebuilding: None,
            ids,
            ring_down: false,
            draining: false,
        }
    }

    /// The stages' KV rooms arrived (the ring closed): admit what fits.
    pub fn set_rooms(&mut self, rooms: Vec<KvRoom>) {
        self.ledger.set_rooms(rooms);
        self.refuse_never_fitting();
        self.admit();
    }

    /// Stops launching until [`Scheduler::rebuild`]: a new plan is coming.
    pub fn hold(&mut self) {
        self.holding = true;
    }

    /// Launches again on the same plan.
    pub fn resume(&mut self) {
        self.holding = false;
    }

    /// Tokens of every generating sequence: what a plan change recomputes.
    pub fn context_tokens(&self) -> u64 {
        self.sequences.values().map(|s| s.tokens() as u64).sum()
    }

    /// Sequences still recomputing their caches after the last plan change.
    pub fn rebuilding(&self) -> u32 {
        self.rebuilding
            .as_ref()
            .map_or(0, |(_, ids)| ids.len() as u32)
    }

    /// Sequence `id` no longer needs its cache rebuilt (it caught up or ended).
    fn caught_up(&mut self, id: u64) {
        let Some((since, ids)) = &mut self.rebuilding else {
            return;
        };
        if ids.remove(&id) && ids.is_empty() {
            tracing::info!(
                ms = since.elapsed().as_secs_f64() * 1e3,
                "caches rebuilt: every sequence caught up with the new plan"
            );
            self.rebuilding = None;
        }
    }

    /// Sequences admitted and not finished.
    pub fn sequences_in_flight(&self) -> usize {
        self.sequences.len()
    }

    /// Nothing is on the ring.
    pub fn drained(&self) -> bool {
        self.launched.is_empty()
    }

    /// A sequence number no stage has seen from this starter.
    fn new_seq_id(&mut self) -> u64 {
        let id = self.next_seq;
        self.next_seq = self.next_seq.wrapping_add(1);
        id
    }

    /// The ring moved to a new plan with `stages` stages, or is whole again:
    /// every sequence recomputes its cache from its tokens, in admission order,
    /// and the rooms are learnt again.
    ///
    /// Each sequence does so under a new number. Frames sent before now (a
    /// `Release` or `Failed` still going round, a micro-batch of the old ring)
    /// name the old numbers, so however late they arrive, and by whichever
    /// link, they can only touch the caches they were meant for, never the
    /// ones being rebuilt.
    pub fn rebuild(&mut self, stages: usize, plan_inflight: Option<usize>) -> usize {
        self.max_inflight = inflight(&self.limits, stages, plan_inflight);
        let mut old: Vec<u64> = self.sequences.keys().copied().collect();
        old.sort_unstable();
        let mut ids = Vec::with_capacity(old.len());
        for id in old {
            let Some(mut seq) = self.sequences.remove(&id) else {
                continue;
            };
            seq.restart();
            let renumbered = self.new_seq_id();
            self.ledger.renumber(id, renumbered);
            self.sequences.insert(renumbered, seq);
            ids.push(renumbered);
        }
        let rebuilt = ids.len();
        self.rebuilding = (rebuilt > 0).then(|| (Instant::now(), ids.iter().copied().collect()));
        self.ready = ids.into();
        self.ledger.forget_rooms();
        self.holding = false;
        self.ring_down = false;
        rebuilt
    }

    /// The stage is shutting down: waiting requests, and any that arrive from
    /// now on, are refused with `overloaded` (sent again, they reach the
    /// starter once it is back); those generating go on.
    pub fn drain(&mut self) {
        self.draining = true;
        while !self.waiting.is_empty() {
            self.end_waiting(0, ErrorCode::Overloaded, DRAINING);
        }
    }

    /// Ends every generating request with an `internal` error saying `why`.
    /// Returns the sequences to release.
    pub fn end_all(&mut self, why: &str) -> Vec<u64> {
        let mut all: Vec<u64> = self.sequences.keys().copied().collect();
        all.sort_unstable();
        self.end(&all, ErrorCode::Internal, why)
    }

    /// Queues a checked request, or refuses it when the queue is full.
    pub fn submit(&mut self, job: Job) {
        if self.draining {
            tracing::warn!(id = %job.id, "refusing request: shutting down");
            self.answered(&job.id_key);
            self.publish(
                &job.reply,
                &ErrorReply::new(Some(job.id), ErrorCode::Overloaded, DRAINING),
            );
            return;
        }
        let queued_tokens: usize = self.waiting.iter().map(|j| j.prompt.len()).sum();
        if self.waiting.len() >= self.limits.max_queued
            || (!self.waiting.is_empty()
                && queued_tokens + job.prompt.len() > self.limits.max_queued_tokens)
        {
            tracing::warn!(id = %job.id, queued = self.waiting.len(), queued_tokens, "refusing request: queue full");
            let msg = format!(
                "{} requests ({queued_tokens} prompt tokens) are already queued; try again later",
                self.waiting.len()
            );
            self.answered(&job.id_key);
            self.publish(
                &job.reply,
                &ErrorReply::new(Some(job.id), ErrorCode::Overloaded, msg),
            );
            return;
        }
        if let Fit::Never(why) = self.ledger.check(job.prompt.len() + job.max_tokens) {
            self.refuse(&job, &why);
            return;
        }
        tracing::debug!(id = %job.id, prompt = job.prompt.len(), max_tokens = job.max_tokens, "request queued");
        let (id, reply) = (job.id.clone(), job.reply.clone());
        // Behind every request of its priority or higher, ahead of the rest.
        let at = self
            .waiting
            .iter()
            .position(|j| j.priority < job.priority)
            .unwrap_or(self.waiting.len());
        self.waiting.insert(at, job);
        self.admit();
        if self.ring_down {
            let position = self.sequences.len() + self.waiting.len();
            self.tell_waiting(
                &reply,
                &id,
                position.saturating_sub(1),
                Waiting::Ring.as_str(),
            );
        } else if let Some(position) = self.waiting.iter().position(|j| j.id == id) {
            let waiting_for = if self.sequences.len() >= self.limits.max_sequences {
                "sequences"
            } else {
                match self.ledger.check(0) {
                    Fit::Later(w) => w.as_str(),
                    _ => Waiting::Memory.as_str(),
                }
            };
            self.tell_waiting(&reply, &id, position, waiting_for);
        }
    }

    fn refuse(&self, job: &Job, why: &str) {
        tracing::warn!(id = %job.id, %why, "refusing request: it can never fit");
        self.answered(&job.id_key);
        let message = format!("this request can never be served: {why}");
        self.publish(
            &job.reply,
            &ErrorReply::new(Some(job.id.clone()), ErrorCode::ExceedsMemory, message),
        );
    }

    /// Refuses every waiting request that can never fit (once rooms are known).
    fn refuse_never_fitting(&mut self) {
        let mut kept = VecDeque::with_capacity(self.waiting.len());
        while let Some(job) = self.waiting.pop_front() {
            match self.ledger.check(job.prompt.len() + job.max_tokens) {
                Fit::Never(why) => self.refuse(&job, &why),
                _ => kept.push_back(job),
            }
        }
        self.waiting = kept;
    }

    /// Whether a micro-batch can be launched now.
    pub fn can_launch(&self) -> bool {
        let round_open = self.round.after > 0;
        let (may_start, most) = match self.rounds_together {
            // A round is every ready sequence once: prompts split by the
            // token budget make it more micro-batches than `max_inflight`,
            // and they fill the pipeline under one read of each layer.
            Some(most) => (
                round_open || self.launched.is_empty(),
                most.max(self.max_inflight as usize),
            ),
            None => (true, self.max_inflight as usize),
        };
        !self.holding && !self.ready.is_empty() && self.launched.len() < most && may_start
    }

    /// Whether rounds start together (the ring streams layers), and then the
    /// most micro-batches one may hold (the ring's chunk visits per pass: more
    /// would only queue): a round's micro-batches launched one after another
    /// stay a train round the ring, each stage running them back to back
    /// through one read of a streamed layer. Spread out, as they drift apart
    /// on their own, every one of them finds the slot given to another layer.
    /// With every layer resident the pipeline is better kept full.
    pub fn set_rounds_together(&mut self, together: Option<usize>) {
        self.rounds_together = together;
    }

    /// Micro-batches the ready sequences would make, `share` and the token
    /// budget to each, as [`Scheduler::launch`] packs them; each sequence
    /// once, since a prompt split by the budget goes on only when its first
    /// part is back.
    fn batches_ready(&self, share: usize) -> usize {
        let most = self.limits.max_batch_tokens;
        let (mut batches, mut seqs, mut budget) = (0, 0, 0);
        for seq in self.ready.iter().filter_map(|id| self.sequences.get(id)) {
            let whole = seq.next_input(most).len();
            if seqs == 0 || seqs >= share || budget == 0 || whole > budget {
                batches += 1;
                (seqs, budget) = (0, most);
            }
            seqs += 1;
            budget = budget.saturating_sub(whole);
        }
        batches
    }

    /// Builds and embeds the next micro-batch from the ready sequences: an equal
    /// share of the active sequences per micro-batch in flight, within the token
    /// budget. `Err` carries sequences that failed and must be released.
    pub fn launch(&mut self, worker: &mut Worker) -> Option<Result<Activations, Vec<u64>>> {
        if !self.can_launch() {
            return None;
        }
        let share = self
            .sequences
            .len()
            .div_ceil(self.max_inflight as usize)
            .max(1);
        let mut budget = self.limits.max_batch_tokens;
        let mut slots = Vec::new();
        let mut ids = Vec::new();
        while slots.len() < share && budget > 0 {
            let Some(&id) = self.ready.front() else { break };
            let Some(seq) = self.sequences.get(&id) else {
                self.ready.pop_front();
                continue;
            };
            // A prompt that fits a micro-batch whole goes in one: split, its
            // rest would make the next round's micro-batches prompt-sized
            // while the other sequences only decode.
            if seq.next_input(self.limits.max_batch_tokens).len() > budget && !slots.is_empty() {
                break;
            }
            let input = seq.next_input(budget);
            self.ready.pop_front();
            budget = budget.saturating_sub(input.len());
            slots.push(seq.slot(id, input.len()));
            ids.extend_from_slice(input);
        }
        if slots.is_empty() {
            return None;
        }
        let batch = self.next_batch;
        self.next_batch += 1;
        let round = self.round_of(&slots, share);
        tracing::debug!(
            batch,
            round = round.id,
            after = round.after,
            seqs = slots.len(),
            tokens = ids.len(),
            "launching micro-batch"
        );
        match worker.embed(batch, round, slots.clone(), &ids) {
            Ok(act) => {
                let seqs = slots.iter().map(|s| s.id).collect();
                self.launched.insert(batch, (Instant::now(), seqs));
                Some(Ok(act))
            }
            Err(e) => {
                let seqs: Vec<u64> = slots.iter().map(|s| s.id).collect();
                Some(Err(self.fail(&seqs, &format!("embedding failed: {e}"))))
            }
        }
    }

    /// The round a micro-batch of `slots` goes in, `share` sequences making a
    /// micro-batch: the current one, unless that has had all its micro-batches
    /// or already carried one of these sequences.
    fn round_of(&mut self, slots: &[lime_schemas::SeqSlot], share: usize) -> Round {
        let again = slots.iter().any(|s| self.round_seqs.contains(&s.id));
        if self.round.after == 0 || again {
            let lanes = match self.rounds_together {
                Some(most) => (1 + self.batches_ready(share)).min(most.max(1)),
                None => self.sequences.len().div_ceil(share.max(1)).max(1),
            };
            self.round = Round {
                id: self.round.id + 1,
                after: lanes as u32,
            };
            self.round_seqs.clear();
        }
        self.round.after = self.round.after.saturating_sub(1);
        self.round_seqs.extend(slots.iter().map(|s| s.id));
        self.round
    }

    /// A micro-batch launched on the running ring came back round it (the
    /// pipeline drops [`Scheduler::stale`] ones before they run): sample,
    /// stream, and requeue or finish its sequences. Returns the finished ones,
    /// to release.
    pub fn returned(&mut self, act: Activations, worker: &mut Worker) -> Vec<u64> {
        for b in &act.batches {
            self.launched.remove(b);
        }
        let mut rows = Vec::new();
        let mut sampled = Vec::new();
        let mut row = 0u32;
        for slot in &act.seqs {
            row += slot.len;
            match self
                .sequences
                .get_mut(&slot.id)
                .map(|s| s.fed(slot.len as usize))
            {
                Some(true) => {
                    rows.push(row - 1);
                    sampled.push(slot.id);
                    self.caught_up(slot.id);
                }
                Some(false) => self.ready.push_back(slot.id),
                None => tracing::warn!(seq = slot.id, "a returning sequence is unknown"),
            }
        }
        let mut done = Vec::new();
        let started = Instant::now();
        if !rows.is_empty() {
            let logits = worker.logits(&act, &rows);
            match logits {
                Ok(logits) => {
                    for (id, logits) in sampled.into_iter().zip(logits) {
                        if self.step(id, &logits) {
                            done.push(id);
                        } else {
                            self.ready.push_back(id);
                        }
                    }
                }
                Err(e) => done.extend(self.fail(&sampled, &format!("LM head failed: {e}"))),
            }
        }
        tracing::debug!(
            batch = act.batch(),
            sampled = rows.len(),
            ms = started.elapsed().as_secs_f64() * 1e3,
            "head and sampling"
        );
        self.admit();
        done
    }

    /// A stage failed a micro-batch: its requests get an error. One launched
    /// before the ring broke is history: its sequences are being replayed.
    pub fn failed(&mut self, seqs: &[u64], batches: &[u64], message: &str) -> Vec<u64> {
        if self.stale(batches) {
            tracing::debug!(?batches, %message, "a micro-batch from before the ring broke failed; its sequences are replayed");
            return Vec::new();
        }
        for b in batches {
            self.launched.remove(b);
        }
        let done = self.fail(seqs, message);
        self.admit();
        done
    }

    /// Whether a micro-batch has not come back within the stall timeout: the
    /// ring lost it without a link or a stage being seen to fail (a frame
    /// written into a socket its peer had just lost), and it is replayed like
    /// any other loss.
    pub fn stalled(&self) -> bool {
        let timeout = std::time::Duration::from_millis(self.limits.stall_timeout_ms);
        self.launched.values().any(|(at, _)| at.elapsed() > timeout)
    }

    /// Micro-batches none of which is on the ring now: they left before the
    /// ring broke, and what they carry is being replayed.
    pub fn stale(&self, batches: &[u64]) -> bool {
        !batches.iter().any(|b| self.launched.contains_key(b))
    }

    /// The ring lost what was on it (a stage died, a link broke, a micro-batch
    /// stalled). Forgets every micro-batch in flight, stops launching, and tells
    /// every request it now waits for the ring. Returns every sequence: their
    /// caches anywhere on the ring are suspect, to be freed and recomputed
    /// from their tokens once the ring is whole ([`Scheduler::rebuild`]).
    pub fn ring_broken(&mut self, why: &str) -> Vec<u64> {
        let lost = self.launched.len();
        self.launched.clear();
        self.holding = true;
        self.ring_down = true;
        let mut ids: Vec<u64> = self.sequences.keys().copied().collect();
        ids.sort_unstable();
        tracing::warn!(%why, lost, sequences = ids.len(), queued = self.waiting.len(), "the ring broke: requests wait for it to be whole again");
        for (position, seq) in ids
            .iter()
            .filter_map(|id| self.sequences.get(id))
            .enumerate()
        {
            self.tell_waiting(
                &seq.job.reply,
                &seq.job.id,
                position,
                Waiting::Ring.as_str(),
            );
        }
        let ahead = ids.len();
        for (i, job) in self.waiting.iter().enumerate() {
            self.tell_waiting(&job.reply, &job.id, ahead + i, Waiting::Ring.as_str());
        }
        ids
    }

    /// Tells a request it waits, behind `position` others, for `waiting_for`.
    fn tell_waiting(&self, reply: &ReplyTo, id: &str, position: usize, waiting_for: &str) {
        tracing::info!(%id, position, waiting_for, "request waits");
        let queued = Queued {
            id: id.to_owned(),
            position: position as u32,
            waiting_for: waiting_for.into(),
        };
        self.publish(reply, &queued);
    }

    /// Samples one token for sequence `id`; true when it finished.
    fn step(&mut self, id: u64, logits: &[f32]) -> bool {
        let Some(seq) = self.sequences.get_mut(&id) else {
            return true;
        };
        let step = match seq.sample(logits, &self.eos) {
            Ok((_, step)) => step,
            Err(e) => {
                self.fail(&[id], &format!("detokenizing failed: {e}"));
                return true;
            }
        };
        let (text, finish) = match step {
            Step::Continue(text) => (text, None),
            Step::Done(text, reason) => (text, Some(reason)),
        };
        let reply = seq.job.reply.clone();
        let id_key = seq.job.id_key.clone();
        let piece = text.map(|t| seq.piece(t));
        let last = finish.map(|r| seq.finish(r));
        if let Some(piece) = piece {
            self.publish(&reply, &piece);
        }
        match last {
            Some(last) => {
                tracing::info!(
                    id = %last.id,
                    finish = ?last.finish_reason,
                    prompt = last.usage.prompt_tokens,
                    generated = last.usage.completion_tokens,
                    ttft_ms = last.timing.ttft_ms,
                    tpot_ms = last.timing.tpot_ms,
                    "request done"
                );
                self.answered(&id_key);
                self.publish(&reply, &last);
                self.sequences.remove(&id);
                self.ledger.free(id);
                true
            }
            None => false,
        }
    }

    /// Frees a request's id (under its [`Job::id_key`]): its answer is complete.
    fn answered(&self, id_key: &str) {
        self.ids
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .finished(id_key, Instant::now());
    }

    /// Ends sequences with an `internal` error reply; returns those to release.
    fn fail(&mut self, seqs: &[u64], message: &str) -> Vec<u64> {
        self.end(seqs, ErrorCode::Internal, message)
    }

    /// Ends sequences with an error reply; returns those to release.
    fn end(&mut self, seqs: &[u64], code: ErrorCode, message: &str) -> Vec<u64> {
        let mut done = Vec::new();
        for id in seqs {
            if let Some(seq) = self.sequences.remove(id) {
                self.ledger.free(*id);
                self.caught_up(*id);
                tracing::warn!(id = %seq.job.id, ?code, %message, generated = seq.generated().len(), "request ended");
                self.answered(&seq.job.id_key);
                let err = ErrorReply::new(Some(seq.job.id.clone()), code, message);
                self.publish(&seq.job.reply, &err);
                done.push(*id);
            }
        }
        self.ready.retain(|id| !seqs.contains(id));
        // A sequence on the ring comes back unknown and is dropped; its caches
        // are freed by the release that follows it.
        done
    }

    /// Ends a queued request with an error reply.
    fn end_waiting(&mut self, index: usize, code: ErrorCode, message: &str) {
        if let Some(job) = self.waiting.remove(index) {
            tracing::warn!(id = %job.id, ?code, %message, "queued request ended");
            self.answered(&job.id_key);
            self.publish(
                &job.reply,
                &ErrorReply::new(Some(job.id.clone()), code, message),
            );
        }
    }

    /// Ends every request past its deadline, queued or generating, with
    /// `deadline_exceeded`. Returns the sequences to release.
    pub fn expire_deadlines(&mut self) -> Vec<u64> {
        let now = Instant::now();
        while let Some(i) = self.waiting.iter().position(|j| j.deadline <= now) {
            let ms = self.waiting[i].received.elapsed().as_millis();
            self.end_waiting(
                i,
                ErrorCode::DeadlineExceeded,
                &format!("not served within its deadline ({ms} ms after it arrived)"),
            );
        }
        let mut late: Vec<u64> = self
            .sequences
            .iter()
            .filter(|(_, s)| s.job.deadline <= now)
            .map(|(id, _)| *id)
            .collect();
        if late.is_empty() {
            return late;
        }
        late.sort_unstable();
        let done = self.end(
            &late,
            ErrorCode::DeadlineExceeded,
            "the answer was not complete by the request's deadline; what was streamed stands",
        );
        self.admit();
        done
    }

    /// Its sender cancelled the request remembered under `id_key`: it ends
    /// with `cancelled`, queued or generating. Returns the sequences to release.
    pub fn cancel(&mut self, id_key: &str) -> Vec<u64> {
        if let Some(i) = self.waiting.iter().position(|j| j.id_key == id_key) {
            self.end_waiting(i, ErrorCode::Cancelled, "cancelled by its sender");
            return Vec::new();
        }
        let found: Vec<u64> = self
            .sequences
            .iter()
            .filter(|(_, s)| s.job.id_key == id_key)
            .map(|(id, _)| *id)
            .collect();
        if found.is_empty() {
            tracing::info!(%id_key, "a cancel for no request in flight");
            return found;
        }
        let done = self.end(&found, ErrorCode::Cancelled, "cancelled by its sender");
        self.admit();
        done
    }

    /// Moves queued requests into generation, oldest first, while there is room
    /// for their KV caches and a place in the batch.
    fn admit(&mut self) {
        while self.sequences.len() < self.limits.max_sequences {
            let Some(job) = self.waiting.front() else {
                break;
            };
            let tokens = job.prompt.len() + job.max_tokens;
            match self.ledger.check(tokens) {
                Fit::Now => {}
                Fit::Later(_) => break,
                Fit::Never(why) => {
                    if let Some(job) = self.waiting.pop_front() {
                        self.refuse(&job, &why);
                    }
                    continue;
                }
            }
            let Some(job) = self.waiting.pop_front() else {
                break;
            };
            let id = self.new_seq_id();
            self.ledger.admit(id, tokens);
            let seq = Sequence::new(job, self.tokenizer, Instant::now());
            self.sequences.insert(id, seq);
            self.ready.push_back(id);
        }
    }

    fn publish(&self, reply: &ReplyTo, body: &impl serde::Serialize) {
        match serde_json::to_vec(body) {
            Ok(payload) => {
                let _ = self.outbox.send(Outgoing {
                    reply: reply.clone(),
                    payload,
                });
            }
            Err(e) => tracing::error!(error = %e, "reply could not be serialised"),
        }
    }
}

/// Why requests are refused while the starter drains.
const DRAINING: &str = "the starter is shutting down; send the request again once it is back";

/// Micro-batches in flight: the starter's setting, else the plan's, else one per
/// stage.
fn inflight(limits: &StarterConfig, stages: usize, plan: Option<usize>) -> u32 {
    match (limits.max_inflight, plan) {
        (0, Some(n)) if n > 0 => n as u32,
        (0, _) => stages.max(1) as u32,
        (n, _) => n as u32,
    }
}
