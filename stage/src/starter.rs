//! The starter's scheduler: the request queue, continuous batching, sampling and
//! replies. Requests join between token steps; finished ones leave at once and
//! their caches are freed round the ring.

use crate::config::StarterConfig;
use crate::intake::{Job, ReplyTo};
use crate::sequence::{Sequence, Step};
use crate::worker::Worker;
use lime_kernels::TextTokenizer;
use lime_schemas::{Activations, ErrorCode, ErrorReply};
use std::collections::{HashMap, VecDeque};
use std::time::Instant;
use tokio::sync::mpsc::UnboundedSender;

/// A message for the MQTT publisher.
#[derive(Debug)]
pub struct Outgoing {
    pub reply: ReplyTo,
    pub payload: Vec<u8>,
}

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
    outbox: UnboundedSender<Outgoing>,
}

impl<'t> Scheduler<'t> {
    pub fn new(
        tokenizer: &'t TextTokenizer,
        eos: Vec<u32>,
        limits: StarterConfig,
        stages: usize,
        outbox: UnboundedSender<Outgoing>,
    ) -> Self {
        let max_inflight = match limits.max_inflight {
            0 => stages,
            n => n,
        } as u32;
        // Sequence ids must not repeat across starter restarts: other stages may
        // still hold caches of the previous run's sequences.
        let base = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or_default();
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
            outbox,
        }
    }

    /// Queues a checked request, or refuses it when the queue is full.
    pub fn submit(&mut self, job: Job) {
        if self.waiting.len() >= self.limits.max_queued {
            tracing::warn!(id = %job.id, queued = self.waiting.len(), "refusing request: queue full");
            let msg = format!(
                "{} requests are already queued; try again later",
                self.waiting.len()
            );
            self.publish(
                &job.reply,
                &ErrorReply::new(Some(job.id), ErrorCode::Overloaded, msg),
            );
            return;
        }
        tracing::debug!(id = %job.id, prompt = job.prompt.len(), max_tokens = job.max_tokens, "request queued");
        self.waiting.push_back(job);
        self.admit();
    }

    /// Whether a micro-batch can be launched now.
    pub fn can_launch(&self) -> bool {
        !self.ready.is_empty() && (self.launched.len() as u32) < self.max_inflight
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
            let input = seq.next_input(budget);
            if input.len() > budget && !slots.is_empty() {
                break;
            }
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
        tracing::debug!(
            batch,
            seqs = slots.len(),
            tokens = ids.len(),
            "launching micro-batch"
        );
        match worker.embed(batch, slots.clone(), &ids) {
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

    /// A micro-batch came back round the ring: sample, stream, and requeue or
    /// finish its sequences. Returns the finished ones, to release.
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
                }
                Some(false) => self.ready.push_back(slot.id),
                None => tracing::warn!(seq = slot.id, "a returning sequence is unknown"),
            }
        }
        let mut done = Vec::new();
        let started = Instant::now();
        if !rows.is_empty() {
            let logits = worker
                .logits(&act, &rows)
                .and_then(|t| Ok(t.to_vec2::<f32>()?));
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

    /// A stage failed a micro-batch: its requests get an error.
    pub fn failed(&mut self, seqs: &[u64], batches: &[u64], message: &str) -> Vec<u64> {
        for b in batches {
            self.launched.remove(b);
        }
        let done = self.fail(seqs, message);
        self.admit();
        done
    }

    /// Fails the sequences of micro-batches that have not come back within the
    /// stall timeout: a stage restarted (losing their caches) or a link dropped
    /// them. Their requests get an error instead of waiting for ever. Returns the
    /// sequences to release.
    pub fn expire_stalled(&mut self) -> Vec<u64> {
        let timeout = std::time::Duration::from_millis(self.limits.stall_timeout_ms);
        let stalled: Vec<u64> = self
            .launched
            .iter()
            .filter(|(_, (at, _))| at.elapsed() > timeout)
            .map(|(b, _)| *b)
            .collect();
        let mut done = Vec::new();
        for b in stalled {
            if let Some((_, seqs)) = self.launched.remove(&b) {
                tracing::error!(batch = b, seqs = seqs.len(), "micro-batch lost on the ring");
                let message = format!(
                    "lost on the ring: no answer from the stages within {} ms (a stage restarted or a link broke)",
                    self.limits.stall_timeout_ms
                );
                done.extend(self.fail(&seqs, &message));
            }
        }
        if !done.is_empty() {
            self.admit();
        }
        done
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
                self.publish(&reply, &last);
                self.sequences.remove(&id);
                true
            }
            None => false,
        }
    }

    /// Ends sequences with an error reply; returns those to release.
    fn fail(&mut self, seqs: &[u64], message: &str) -> Vec<u64> {
        let mut done = Vec::new();
        for id in seqs {
            if let Some(seq) = self.sequences.remove(id) {
                tracing::error!(id = %seq.job.id, %message, "request failed");
                let err = ErrorReply::new(Some(seq.job.id.clone()), ErrorCode::Internal, message);
                self.publish(&seq.job.reply, &err);
                done.push(*id);
            }
        }
        self.ready.retain(|id| !seqs.contains(id));
        done
    }

    /// Moves queued requests into generation while there is room.
    fn admit(&mut self) {
        while self.sequences.len() < self.limits.max_sequences {
            let Some(job) = self.waiting.pop_front() else {
                break;
            };
            let id = self.next_seq;
            self.next_seq = self.next_seq.wrapping_add(1);
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
