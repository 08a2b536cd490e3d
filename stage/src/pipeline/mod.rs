//! The pipeline loop of one stage: take what arrived, batch activations bound for the
//! same chunk into one micro-batch, run every chunk held here that it reaches, hand
//! it to the next stage. At the starter the loop also closes the ring: finished
//! micro-batches go to the scheduler, which samples and launches new ones.
//!
//! It runs on its own thread because the model math blocks; the network and MQTT
//! live on tokio and talk to it through channels, so sends overlap compute.
//!
//! Everything waiting for the same chunk is merged into one micro-batch (up to the
//! activation workspace), so that a streamed layer read once serves all of it. The
//! loop also keeps the stage's clock: computing, waiting for weights, waiting for
//! the ring, idle.
//!
//! A new plan is taken between token steps ([`crate::pipeline::switch`]).

pub mod switch;

use crate::config::MemoryConfig;
use crate::ring::topology::Topology;
use crate::starter::Scheduler;
use crate::worker::Worker;
use lime_schemas::telemetry::{LoadReport, StageTime, Telemetry};
use lime_schemas::{Activations, Frame, Plan};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};
use tokio::sync::mpsc::UnboundedSender;

/// What the pipeline loop is told.
pub enum Event {
    /// A frame from the previous stage.
    Frame(Frame),
    /// A checked request (starter only).
    Job(Box<crate::starter::intake::Job>),
    /// A plan published on the control plane; the starter moves the ring to it.
    Plan(Box<Plan>),
    /// A link of the ring under plan `epoch` closed or broke: what was on it
    /// may be lost (the starter replays it).
    RingBroken {
        /// The plan the link was made for: a break under any other than the
        /// running plan is ignored.
        epoch: u64,
        /// What broke, for the log.
        why: String,
    },
    /// A stage's status went offline (its last will, or it said so).
    StageLost(String),
    /// Its sender cancelled the request remembered under this key.
    Cancel(String),
    /// The stage is shutting down: refuse new requests, let those in flight
    /// finish until `by`, then end them with an error and return.
    Drain {
        /// The end of the shutdown grace.
        by: Instant,
    },
    /// Finish: drop everything and return.
    Stop,
}

/// What the pipeline loop tells the control plane.
#[derive(Debug, Clone, PartialEq)]
pub enum Note {
    /// The starter's ping came back: every hop is connected.
    RingClosed,
    /// A periodic report of memory, residency and time.
    Telemetry(Box<Telemetry>),
    /// The stage now runs this plan (its status follows).
    Switched(Box<Plan>),
}

/// One stage's pipeline loop and its state, owned by the pipeline thread.
pub struct Pipeline<'t> {
    pub(crate) worker: Worker,
    /// The next stage; `None` when this stage is the whole ring.
    pub next: Option<UnboundedSender<Frame>>,
    pub(crate) starter: Option<Scheduler<'t>>,
    pub(crate) notes: UnboundedSender<Note>,
    /// Who this is, for telemetry.
    pub stage: String,
    pub(crate) plan: Plan,
    /// A newer plan the starter moves the ring to once nothing is in flight
    /// (at another stage: the plan its switch will bring).
    pub pending: Option<Plan>,
    /// Since when a stage other than the starter has known of `pending`.
    pub pending_since: Option<Instant>,
    /// When a link of this stage last broke under the running plan.
    pub broken_at: Option<Instant>,
    pub(crate) topology: Topology,
    pub(crate) memory: MemoryConfig,
    pub(crate) telemetry_every: Duration,
    /// Every hop is connected (the starter's ping came back).
    pub ring_closed: bool,
    /// Times the ring broke under this plan: part of the ping's nonce, so that
    /// a ping sent before a break cannot pass for the ring being whole again.
    pub breaks: u64,
    /// Since when the ring has been broken with sequences to replay.
    pub recovering: Option<Instant>,
    pub(crate) last_ping: Option<Instant>,
    /// Until when a shutting-down stage lets requests in flight finish.
    draining: Option<Instant>,
}

/// Everything a pipeline starts from but the starter's scheduler (which borrows
/// the tokenizer on the pipeline's own thread).
pub struct Parts {
    pub(crate) worker: Worker,
    pub(crate) next: Option<UnboundedSender<Frame>>,
    pub(crate) notes: UnboundedSender<Note>,
    pub(crate) stage: String,
    pub(crate) plan: Plan,
    pub(crate) topology: Topology,
    pub(crate) memory: MemoryConfig,
    pub(crate) telemetry_every: Duration,
}

impl Parts {
    /// The pipeline at its start: no plan pending, the ring not yet known to be
    /// closed.
    pub fn into_pipeline(self, starter: Option<Scheduler<'_>>) -> Pipeline<'_> {
        Pipeline {
            worker: self.worker,
            next: self.next,
            starter,
            notes: self.notes,
            stage: self.stage,
            plan: self.plan,
            pending: None,
            pending_since: None,
            broken_at: None,
            topology: self.topology,
            memory: self.memory,
            telemetry_every: self.telemetry_every,
            ring_closed: false,
            breaks: 0,
            recovering: None,
            last_ping: None,
            draining: None,
        }
    }
}

/// How often the loop wakes with nothing to do (ring probes, memory notes).
const TICK: Duration = Duration::from_millis(500);
/// How often a broken ring is pinged until it is whole again.
const RECOVERY_PING: Duration = Duration::from_millis(100);

impl Pipeline<'_> {
    /// Runs the loop until `Stop`, the end of a drain, or the last sender of
    /// `events` is dropped.
    pub fn run(mut self, events: Receiver<Event>) {
        self.ring_closed = self.next.is_none();
        if self.ring_closed {
            self.ring_is_closed(Vec::new());
        }
        let mut clock = StageTime::default();
        let mut reports = 0;
        let mut last_report = Instant::now();
        loop {
            // A broken ring is pinged often: the sooner it is seen whole, the
            // sooner its requests go on.
            let every = if self.recovering.is_some() {
                RECOVERY_PING
            } else {
                Duration::from_secs(2)
            };
            if self.starter.is_some()
                && !self.ring_closed
                && self.last_ping.is_none_or(|t| t.elapsed() > every)
            {
                self.send(Frame::Ping {
                    nonce: self.ping_nonce(),
                    rooms: Vec::new(),
                });
                self.last_ping = Some(Instant::now());
            }
            // With a micro-batch ready to launch, take only what has already arrived.
            let busy = self.starter.as_ref().is_some_and(Scheduler::can_launch);
            let in_flight = self.worker.sequences() > 0;
            let waiting = Instant::now();
            let first = if busy {
                match events.try_recv() {
                    Ok(e) => Some(e),
                    Err(std::sync::mpsc::TryRecvError::Empty) => None,
                    Err(std::sync::mpsc::TryRecvError::Disconnected) => return,
                }
            } else {
                let wait = TICK.min(self.telemetry_every.saturating_sub(last_report.elapsed()));
                match events.recv_timeout(wait) {
                    Ok(e) => Some(e),
                    Err(RecvTimeoutError::Timeout) => None,
                    Err(RecvTimeoutError::Disconnected) => return,
                }
            };
            let working = Instant::now();
            let waited = working.duration_since(waiting).as_secs_f64();
            if in_flight {
                clock.network_wait_s += waited;
            } else {
                clock.idle_s += waited;
            }
            let load_wait_before = self.worker.load_wait();
            let pending = first.into_iter().chain(events.try_iter());
            if !self.handle_all(pending) {
                return;
            }
            if self.drained() {
                return;
            }
            if let Some(s) = &mut self.starter {
                let (stalled, expired) = (s.stalled(), s.expire_deadlines());
                self.release(expired);
                if stalled {
                    self.ring_broken(
                        "a micro-batch did not come back within starter.stall_timeout_ms".into(),
                    );
                }
            }
            if self.ready_to_switch() {
                self.switch_ring();
                self.last_ping = None;
            }
            if self.moves_on_its_own() {
                self.move_on_its_own();
            }
            let together = self.ring_streams().then_some(self.plan.chunks.len());
            if let Some(s) = &mut self.starter {
                s.set_rounds_together(together);
            }
            while let Some(s) = &mut self.starter {
                match s.launch(&mut self.worker) {
                    Some(Ok(act)) => self.advance(act),
                    Some(Err(done)) => self.release(done),
                    None => break,
                }
            }
            // A new plan's worker starts its count afresh.
            let load_wait =
                (self.worker.load_wait().saturating_sub(load_wait_before)).as_secs_f64();
            clock.load_wait_s += load_wait;
            clock.compute_s += (working.elapsed().as_secs_f64() - load_wait).max(0.0);
            if last_report.elapsed() >= self.telemetry_every {
                last_report = Instant::now();
                reports += 1;
                let _ = self
                    .notes
                    .send(Note::Telemetry(Box::new(self.telemetry(reports, clock))));
            }
        }
    }

    /// While shutting down: whether this stage may stop now. The starter
    /// waits for its requests to finish until the grace is over (or the ring
    /// is broken, when they cannot), then ends the rest with an error. A
    /// secondary stops at once: what it has in flight, the starter replays.
    fn drained(&mut self) -> bool {
        let Some(by) = self.draining else {
            return false;
        };
        let Some(s) = &mut self.starter else {
            return true;
        };
        if s.sequences_in_flight() == 0 {
            tracing::info!("drained: every request in flight has finished");
            return true;
        }
        let why = if self.recovering.is_some() {
            "the starter is shutting down and its ring is broken; what was streamed stands"
        } else if Instant::now() >= by {
            "the starter is shutting down and its shutdown grace (shutdown_grace_ms) ended before the answer; what was streamed stands"
        } else {
            return false;
        };
        let ended = s.end_all(why);
        tracing::warn!(ended = ended.len(), %why, "drain: requests ended");
        self.release(ended);
        true
    }

    fn telemetry(&self, report: u64, time: StageTime) -> Telemetry {
        let loads = self.worker.load_stats();
        let read_mb_per_s = (loads.busy.as_secs_f64() > 0.0)
            .then(|| loads.bytes as f64 / loads.busy.as_secs_f64() / 1e6);
        Telemetry {
            stage: self.stage.clone(),
            epoch: self.plan.epoch,
            report,
            memory: self.worker.memory_report(),
            residency: self.worker.residency_report(),
            time,
            loads: LoadReport {
                layers_read: loads.layers,
                bytes_read: self.worker.bytes_read(),
                read_busy_s: loads.busy.as_secs_f64(),
                read_cpu_s: loads.cpu.as_secs_f64(),
                streamed_bytes: loads.bytes,
                read_mb_per_s,
            },
            link_out: self.topology.gauge().measurement(),
            rebuilding: self.starter.as_ref().map_or(0, Scheduler::rebuilding),
            context_tokens: self.starter.as_ref().map_or(0, Scheduler::context_tokens),
        }
    }

    /// Whether the ring streams layers and shares their reads: this stage
    /// does, or the plan names layers others stream (the baselines, reading
    /// on demand, share nothing and keep their micro-batches spread).
    fn ring_streams(&self) -> bool {
        self.worker.shares_reads()
            && (self.worker.streams()
                || self
                    .plan
                    .stages
                    .iter()
                    .any(|s| s.offloaded.as_ref().is_some_and(|o| !o.is_empty())))
    }

    /// Handles what arrived: control frames in order, then the activations,
    /// merged per chunk up to the activation workspace.
    /// False when told to stop.
    fn handle_all(&mut self, events: impl Iterator<Item = Event>) -> bool {
        let cap = self.worker.activation_tokens();
        let mut groups: Vec<Activations> = Vec::new();
        for event in events {
            match event {
                Event::Frame(Frame::Activations(a)) => {
                    // Back at the starter from before the ring broke: its
                    // sequences are replayed, and its caches must not grow here.
                    if self.starter.as_ref().is_some_and(|s| s.stale(&a.batches)) {
                        tracing::debug!(
                            batch = a.batch(),
                            "dropping a micro-batch from before the ring broke"
                        );
                        continue;
                    }
                    if let Err(e) = self.worker.admissible(&a) {
                        tracing::error!(batch = a.batch(), chunk = a.chunk, error = %e, "micro-batch refused");
                        let seqs = a.seqs.iter().map(|s| s.id).collect();
                        self.fail(seqs, a.batches, format!("chunk {} refused: {e}", a.chunk));
                        continue;
                    }
                    let fits = groups
                        .iter_mut()
                        .find(|g| g.chunk == a.chunk && g.tokens() + a.tokens() <= cap);
                    match fits {
                        Some(g) => g.merge(a),
                        None => groups.push(a),
                    }
                }
                Event::Stop => return false,
                Event::Frame(Frame::Switch { plan }) => {
                    // Whatever arrived before the switch belongs to the old plan.
                    for act in groups.drain(..) {
                        self.advance(act);
                    }
                    self.switch_on(&plan);
                }
                other => self.handle(other),
            }
        }
        // Where reads are shared: the oldest round first, and in a round the
        // micro-batch furthest behind, so that it runs the layers kept for it
        // before the round's front asks for the next ones, which would take
        // the slots back. Elsewhere in order of arrival.
        if self.ring_streams() {
            groups.sort_by_key(|g| (g.round.id, g.chunk));
        }
        for act in groups {
            self.advance(act);
        }
        true
    }

    fn handle(&mut self, event: Event) {
        match event {
            Event::Job(job) => match &mut self.starter {
                Some(s) => s.submit(*job),
                None => tracing::error!("a request reached a secondary stage"),
            },
            Event::Plan(plan) => self.offered(*plan),
            Event::RingBroken { epoch, why } if epoch == self.plan.epoch => {
                self.broken_at = Some(Instant::now());
                self.ring_broken(why)
            }
            Event::RingBroken { .. } => {}
            Event::StageLost(stage) if self.plan.position(&stage).is_some() => {
                self.ring_broken(format!("stage {stage} went offline"))
            }
            Event::StageLost(_) => {}
            Event::Cancel(key) => {
                if let Some(s) = &mut self.starter {
                    let done = s.cancel(&key);
                    self.release(done);
                }
            }
            Event::Drain { by } => {
                self.draining = Some(by);
                if let Some(s) = &mut self.starter {
                    s.drain();
                }
            }
            Event::Frame(Frame::Ping { nonce, mut rooms }) => {
                if self.starter.is_none() {
                    rooms.push(self.worker.kv_room(&self.stage));
                    self.send(Frame::Ping { nonce, rooms });
                } else if !self.ring_closed && nonce == self.ping_nonce() {
                    self.ring_is_closed(rooms);
                }
            }
            // The ring's listener consumes probes and acks.
            Event::Frame(Frame::Probe { .. } | Frame::Ack { .. }) => {}
            Event::Frame(Frame::Release { seqs }) => {
                self.worker.release(&seqs);
                if self.starter.is_none() {
                    self.send(Frame::Release { seqs });
                }
            }
            Event::Frame(Frame::Failed {
                seqs,
                batches,
                message,
            }) => self.fail(seqs, batches, message),
            Event::Frame(Frame::Switch { plan }) => self.switch_on(&plan),
            Event::Frame(Frame::Hello(_) | Frame::Proof { .. } | Frame::Activations(_))
            | Event::Stop => {}
        }
    }

    /// Every hop is connected: the starter learns every stage's KV room (its
    /// own too) and starts admitting.
    pub(crate) fn ring_is_closed(&mut self, mut rooms: Vec<lime_schemas::KvRoom>) {
        self.ring_closed = true;
        tracing::info!(
            epoch = self.plan.epoch,
            "ring closed: every hop is connected"
        );
        if let Some(s) = &mut self.starter {
            if let Some(since) = self.recovering.take() {
                let replayed = s.rebuild(self.plan.stages.len(), self.plan.max_inflight);
                tracing::info!(
                    down_ms = since.elapsed().as_secs_f64() * 1e3,
                    replayed,
                    "the ring is whole again: replaying every sequence from its tokens"
                );
            }
            rooms.insert(0, self.worker.kv_room(&self.stage));
            s.set_rooms(rooms);
        }
        let _ = self.notes.send(Note::RingClosed);
    }

    /// The starter's ping nonce under this plan since the last break.
    fn ping_nonce(&self) -> u64 {
        (self.plan.epoch << 20) | (self.breaks & 0xF_FFFF)
    }

    /// At the starter: the ring lost what was on it. Every sequence's cache is
    /// freed here and, by a `Release` that travels behind whatever was lost,
    /// on every stage; once a ping gets round (every hop connected again,
    /// whether the stage came back or the ring was planned anew) each
    /// sequence recomputes its cache from its prompt and the tokens already
    /// streamed, under a new number that nothing sent before the break names.
    /// The kernels make those caches and the tokens that follow bit-identical
    /// to a run without the fault, and nothing is streamed twice: a sequence
    /// samples again only once its cache has caught up.
    fn ring_broken(&mut self, why: String) {
        let Some(s) = &mut self.starter else { return };
        if self.next.is_none() || self.recovering.is_some() {
            return;
        }
        if !self.ring_closed && s.sequences_in_flight() == 0 {
            // Not closed yet: the first ping still has to get round.
            return;
        }
        let seqs = s.ring_broken(&why);
        self.worker.release(&seqs);
        self.breaks += 1;
        self.ring_closed = false;
        self.recovering = Some(Instant::now());
        self.last_ping = None;
        if !seqs.is_empty() {
            self.send(Frame::Release { seqs });
        }
    }

    /// A micro-batch could not be run: free its caches here and tell the starter
    /// (through the ring, unless this is the starter).
    fn fail(&mut self, seqs: Vec<u64>, batches: Vec<u64>, message: String) {
        self.worker.release(&seqs);
        match &mut self.starter {
            Some(s) => {
                let done = s.failed(&seqs, &batches, &message);
                self.release(done);
            }
            None => self.send(Frame::Failed {
                seqs,
                batches,
                message,
            }),
        }
    }

    /// Runs every chunk held here that the micro-batch reaches next, then hands it
    /// on: to the next stage, or at the end of the model to the starter's sampler.
    fn advance(&mut self, mut act: Activations) {
        if self.starter.as_ref().is_some_and(|s| s.stale(&act.batches)) {
            // Launched before the ring broke: its sequences are being replayed
            // under new numbers, and running it would only make caches for the
            // old ones.
            tracing::debug!(
                batch = act.batch(),
                chunk = act.chunk,
                "a micro-batch from before the ring broke came back; dropped"
            );
            return;
        }
        let chunks = self.worker.chunk_count() as u32;
        while act.chunk < chunks && self.worker.owns(act.chunk) {
            if let Err(e) = self.worker.run_chunk(&mut act) {
                tracing::error!(batch = act.batch(), chunk = act.chunk, error = %e, "micro-batch failed");
                let seqs = act.seqs.iter().map(|s| s.id).collect();
                let message = format!("chunk {} failed: {e}", act.chunk);
                self.fail(seqs, act.batches, message);
                return;
            }
        }
        if act.chunk == chunks {
            if let Some(s) = &mut self.starter {
                let done = s.returned(act, &mut self.worker);
                self.release(done);
                return;
            }
        }
        self.send(Frame::Activations(act));
    }

    /// Frees finished sequences here and, through the ring, everywhere else.
    pub(crate) fn release(&mut self, seqs: Vec<u64>) {
        if seqs.is_empty() {
            return;
        }
        self.worker.release(&seqs);
        self.send(Frame::Release { seqs });
    }

    pub(crate) fn send(&self, frame: Frame) {
        if let Some(next) = &self.next {
            if next.send(frame).is_err() {
                tracing::error!("the link to the next stage is gone");
            }
        }
    }
}
