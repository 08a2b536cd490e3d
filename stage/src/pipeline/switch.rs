//! Moving the ring to a new plan between token steps.
//!
//! The starter hears of a plan on the control plane. It stops launching, waits
//! until every micro-batch in flight has come back, then sends `Switch` round the
//! old ring and moves itself. Each stage forwards the switch to its old successor
//! (after whatever it sent before), drops its caches, splits its memory for its
//! new chunks keeping the resident layers it still holds, and joins the new ring.
//! The starter then recomputes every sequence's cache from its tokens; the
//! kernels make a recomputed cache and the next token bit-identical to those of a
//! run that never switched.

use crate::pipeline::{Note, Pipeline};
use lime_schemas::{Frame, Plan};
use std::time::{Duration, Instant};

/// How long a published plan waits for the starter's switch before a stage
/// whose old ring broke moves to it alone...
const SELF_MOVE_BROKEN: Duration = Duration::from_secs(2);
/// ...and before any stage does (a ring pass of a large model takes seconds,
/// and the starter waits for the passes in flight before it switches).
const SELF_MOVE: Duration = Duration::from_secs(30);

impl Pipeline<'_> {
    /// A plan from the control plane: the starter moves the ring to it once
    /// nothing is in flight; the others wait for the starter's switch.
    pub(crate) fn offered(&mut self, plan: Plan) {
        if plan.epoch <= self.plan.epoch {
            return;
        }
        if let Err(why) = self.acceptable(&plan) {
            tracing::error!(epoch = plan.epoch, %why, "ignoring the new plan");
            return;
        }
        let Some(s) = &mut self.starter else {
            tracing::info!(
                epoch = plan.epoch,
                "a new plan was published; the starter will move the ring to it"
            );
            self.pending_since = Some(Instant::now());
            self.pending = Some(plan);
            return;
        };
        tracing::info!(
            from = self.plan.epoch,
            to = plan.epoch,
            "new plan: waiting for the micro-batches in flight"
        );
        s.hold();
        self.pending = Some(plan);
    }

    /// A plan the running ring can move to: valid for the model, the same
    /// starter (it holds the requests), and this stage in it.
    fn acceptable(&self, plan: &Plan) -> Result<(), String> {
        plan.validate(self.worker.config().num_hidden_layers)
            .map_err(|e| e.to_string())?;
        let starter = |p: &Plan| p.starter().map(|s| s.name.clone());
        if starter(plan) != starter(&self.plan) {
            return Err(format!(
                "it moves the starter from {:?} to {:?}, which needs a restart",
                starter(&self.plan),
                starter(plan)
            ));
        }
        if plan.position(&self.stage).is_none() {
            return Err(format!("it has no stage {}", self.stage));
        }
        Ok(())
    }

    /// A stage that is not the starter moves to a published plan on its own
    /// when the starter's switch cannot reach it: the ring broke under the old
    /// plan (the stage before it on the old ring is gone, so the switch is
    /// not coming) and the plan has waited [`SELF_MOVE_BROKEN`], or it has
    /// waited [`SELF_MOVE`] in any case. The starter replays every sequence
    /// on the new ring either way.
    pub(crate) fn moves_on_its_own(&self) -> bool {
        if self.starter.is_some() {
            return false;
        }
        let Some(since) = self.pending_since else {
            return false;
        };
        let broken = self
            .broken_at
            .is_some_and(|at| at.elapsed() < SELF_MOVE + SELF_MOVE_BROKEN);
        since.elapsed() >= if broken { SELF_MOVE_BROKEN } else { SELF_MOVE }
    }

    /// Moves to the pending plan without the starter's switch.
    pub(crate) fn move_on_its_own(&mut self) {
        self.pending_since = None;
        let Some(plan) = self.pending.take() else {
            return;
        };
        if plan.epoch <= self.plan.epoch {
            return;
        }
        tracing::warn!(
            from = self.plan.epoch,
            to = plan.epoch,
            "no switch came round the old ring: moving to the new plan alone"
        );
        self.move_to(plan);
    }

    /// The starter has a plan to move to and nothing on the ring.
    pub(crate) fn ready_to_switch(&self) -> bool {
        self.pending.is_some() && self.starter.as_ref().is_some_and(|s| s.drained())
    }

    /// Starter: sends the switch round the old ring and moves.
    pub(crate) fn switch_ring(&mut self) {
        let Some(plan) = self.pending.take() else {
            return;
        };
        match serde_json::to_string(&plan) {
            Ok(json) => self.send(Frame::Switch { plan: json }),
            Err(e) => {
                tracing::error!(error = %e, "the new plan cannot be sent; keeping the old one");
                if let Some(s) = &mut self.starter {
                    s.resume();
                }
                return;
            }
        }
        self.move_to(plan);
    }

    /// A switch arrived on the old ring: pass it on, then move. At the starter
    /// it has come back round and there is nothing left to do.
    pub(crate) fn switch_on(&mut self, json: &str) {
        if self.starter.is_some() {
            tracing::info!("the switch went round the old ring");
            return;
        }
        let plan: Plan = match serde_json::from_str(json) {
            Ok(p) => p,
            Err(e) => {
                tracing::error!(error = %e, "unreadable plan in a switch; ignored");
                return;
            }
        };
        if plan.epoch <= self.plan.epoch {
            return;
        }
        if let Err(why) = self.acceptable(&plan) {
            tracing::error!(epoch = plan.epoch, %why, "the starter switched to a plan this stage cannot run");
        }
        self.send(Frame::Switch {
            plan: json.to_owned(),
        });
        self.pending = None;
        self.pending_since = None;
        self.move_to(plan);
    }

    fn move_to(&mut self, plan: Plan) {
        let started = Instant::now();
        let from = self.plan.epoch;
        // Dropping the old link's sender lets it write what is queued (the
        // switch last) and close.
        self.next = None;
        let mut last = Instant::now();
        let replanned = self
            .worker
            .replan(&plan, &self.stage, &self.memory, |done, total| {
                if done == total || last.elapsed() > Duration::from_secs(1) {
                    last = Instant::now();
                    tracing::info!(done, total, "loading resident layers for the new plan");
                }
            });
        if let Err(e) = replanned {
            tracing::error!(error = %format!("{e:#}"), "this stage cannot run its part of the new plan");
        }
        self.next = self.topology.join(&plan);
        // The switch recomputes every cache itself: a break of the old ring
        // needs no replay of its own.
        self.recovering = None;
        self.broken_at = None;
        let rebuilt = match &mut self.starter {
            Some(s) => s.rebuild(plan.stages.len(), plan.max_inflight),
            None => 0,
        };
        self.plan = plan;
        self.ring_closed = false;
        if self.next.is_none() {
            self.ring_is_closed(Vec::new());
        }
        let chunks: Vec<String> = self
            .plan
            .chunks_of(&self.stage)
            .iter()
            .map(|(_, r)| r.to_string())
            .collect();
        tracing::info!(
            from,
            to = self.plan.epoch,
            ?chunks,
            offloaded = ?self.worker.residency_report().offloaded,
            ms = started.elapsed().as_secs_f64() * 1e3,
            rebuilt,
            "moved to the new plan"
        );
        let _ = self.notes.send(Note::Switched(Box::new(self.plan.clone())));
    }
}
