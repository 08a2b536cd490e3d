//! The broker's planner at work. It collects the stages' retained profiles from
//! `lime/profile/+` and, once the expected number of stages has published one,
//! solves and publishes the plan retained on `lime/control/plan`, which the
//! waiting stages adopt.
//!
//! Then it follows `lime/telemetry/+`. When a measured link or read bandwidth
//! has changed for good ([`crate::conditions`] says when), it solves again under
//! the measured figures, keeping the running starter (it holds the requests). The
//! new plan is published as the next epoch only if it differs from the running one,
//! the cost model predicts it `min_gain` better than the running plan under the
//! same new figures, the gain repays the switch within `payback_s` (while the
//! ring recomputes the caches of the sequences in flight it produces nothing;
//! that takes about a prefill of all their tokens on the new plan), and not
//! within `switch_interval_ms` of the last switch. The starter moves the ring to
//! it between token steps. The verdict, kept or switched, goes retained to
//! `lime/control/review`.

use crate::conditions::{Change, Conditions, Figure};
use crate::config::{BrokerConfig, PlannerConfig};
use lime_plan::{self as planner, Layout, Prediction, Runtime, Workload, WorkloadKind};
use lime_schemas::signing::{RingKey, Signature};
use lime_schemas::{
    topics, DeviceProfile, LinkSpeed, Links, Plan, PlanPrediction, PlanReview, StageProfile,
    StageState, StageStatus, Telemetry,
};
use rumqttc::v5::mqttbytes::v5::Packet;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

/// Runs the planner against rumqttd's internal listener (as the gate's login)
/// until the process ends.
pub async fn run(cfg: BrokerConfig, login: crate::gate::internal::Internal, key: Option<RingKey>) {
    let links = match load_links(&cfg.planner) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!("{e:#}; the planner is off");
            return;
        }
    };
    let mut options = MqttOptions::new(
        "lime-broker-planner",
        login.v5.ip().to_string(),
        login.v5.port(),
    );
    options.set_keep_alive(Duration::from_secs(10));
    options.set_max_packet_size(Some(cfg.max_payload_bytes as u32));
    options.set_credentials(login.username.clone(), login.password.clone());
    let (client, mut eventloop) = AsyncClient::new(options, 64);
    let mut planner = Planner::new(cfg.planner.clone(), links).with_key(key.clone());
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    loop {
        let first_due = planner.first_plan_due();
        let event = tokio::select! {
            e = eventloop.poll() => e,
            _ = tokio::time::sleep_until(first_due.unwrap_or_else(Instant::now).into()), if first_due.is_some() => {
                if let Some(plan) = planner.first_plan(Instant::now()) {
                    publish_plan(&client, key.as_ref(), plan).await;
                }
                continue;
            }
            _ = tick.tick() => {
                let plan = planner.tick(Instant::now());
                if let Some(review) = planner.take_review() {
                    publish_review(&client, &review).await;
                }
                if let Some(plan) = plan {
                    publish_plan(&client, key.as_ref(), plan).await;
                }
                continue;
            }
        };
        match event {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                for topic in [
                    topics::PROFILE_ALL,
                    topics::TELEMETRY_ALL,
                    topics::PLAN,
                    topics::STATUS_ALL,
                ] {
                    if let Err(e) = client.subscribe(topic, QoS::AtMostOnce).await {
                        tracing::warn!(error = %e, %topic, "planner cannot subscribe");
                    }
                }
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                let topic = String::from_utf8_lossy(&p.topic).into_owned();
                let plan = if topic == topics::PLAN {
                    planner.plan_seen(&p.payload)
                } else if let Some(stage) = topics::stage_of_status(&topic) {
                    planner.status(stage, &p.payload, Instant::now());
                    None
                } else if let Some(stage) = topics::stage_of_profile(&topic) {
                    planner.profile(stage, &p.payload, Instant::now());
                    None
                } else if topics::stage_of_telemetry(&topic).is_some() {
                    match serde_json::from_slice::<Telemetry>(&p.payload) {
                        Ok(t) => planner.telemetry(&t, Instant::now()),
                        Err(e) => {
                            tracing::debug!(%topic, error = %e, "unreadable telemetry");
                            None
                        }
                    }
                } else {
                    None
                };
                if let Some(review) = planner.take_review() {
                    publish_review(&client, &review).await;
                }
                if let Some(plan) = plan {
                    publish_plan(&client, key.as_ref(), plan).await;
                }
            }
            Ok(_) => {}
            Err(e) => {
                tracing::debug!(error = %e, "planner connection lost; retrying");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

/// How long a planner whose profiles are all in waits for the ring's plan
/// before making one: the starter publishes both back to back after a broker
/// restart, so this covers their reordering and little more; a first start
/// pays it once.
pub const FOUND_PLAN_WAIT: Duration = Duration::from_millis(150);

/// Publishes `plan` retained, signed with `key` when there is one.
async fn publish_plan(client: &AsyncClient, key: Option<&RingKey>, mut plan: Plan) {
    if let Some(key) = key {
        key.sign(&mut plan);
    }
    publish_retained(client, topics::PLAN, &plan).await;
}

/// Publishes the planner's verdict on a change, retained, before any plan it
/// leads to.
async fn publish_review(client: &AsyncClient, review: &PlanReview) {
    publish_retained(client, topics::PLAN_REVIEW, review).await;
}

/// Publishes `doc` as JSON, retained, on `topic`: what the planner tells
/// every stage and operator, now and after they reconnect.
async fn publish_retained(client: &AsyncClient, topic: &str, doc: &impl serde::Serialize) {
    let payload = serde_json::to_vec(doc).unwrap_or_default();
    if let Err(e) = client.publish(topic, QoS::AtLeastOnce, true, payload).await {
        tracing::error!(error = %e, %topic, "not published");
    }
}

/// The plan the ring runs, in the cost model's terms.
struct Running {
    plan: Plan,
    layout: Layout,
    switched: Instant,
}

/// The planner's state between messages.
pub struct Planner {
    cfg: PlannerConfig,
    /// The configured network, before measurements.
    links: Links,
    profiles: BTreeMap<String, StageProfile>,
    running: Option<Running>,
    conditions: Conditions,
    /// Each stage's last loader counters: streamed bytes and busy seconds.
    reads: HashMap<String, (u64, f64)>,
    /// Tokens in the caches of the sequences generating, from the starter.
    context_tokens: u64,
    /// A plan found on the retained topic before this planner made one: the
    /// ring's, republished by its starter after this broker restarted.
    found: Option<Plan>,
    /// When every expected profile is in but no plan was found: the moment a
    /// plan of its own is made, unless the ring's shows up before.
    first_plan_at: Option<Instant>,
    /// Plans are signed with it, and only plans signed with it are followed.
    key: Option<RingKey>,
    /// Stages of the running plan that went offline, and since when.
    lost: BTreeMap<String, Instant>,
    /// Stages planned around after they were lost: left out of every plan
    /// until they report again.
    excluded: std::collections::BTreeSet<String>,
    /// The verdict on the last change of conditions, until published.
    review: Option<PlanReview>,
}

impl Planner {
    pub fn new(cfg: PlannerConfig, links: Links) -> Self {
        let conditions = Conditions::new(
            cfg.change_factor,
            Duration::from_millis(cfg.sustain_ms),
            Duration::from_millis(cfg.settle_ms),
        );
        Self {
            cfg,
            links,
            profiles: BTreeMap::new(),
            running: None,
            conditions,
            reads: HashMap::new(),
            context_tokens: 0,
            found: None,
            first_plan_at: None,
            key: None,
            lost: BTreeMap::new(),
            excluded: Default::default(),
            review: None,
        }
    }

    /// The verdict on the last change of conditions weighed, once.
    pub fn take_review(&mut self) -> Option<PlanReview> {
        self.review.take()
    }

    /// A stage's retained status: a stage of the running plan that goes
    /// offline is lost, and planned around if it stays away.
    pub fn status(&mut self, stage: &str, payload: &[u8], now: Instant) {
        let state = serde_json::from_slice::<StageStatus>(payload)
            .ok()
            .filter(|s| s.stage == stage)
            .map(|s| s.state);
        let in_plan = self
            .running
            .as_ref()
            .is_some_and(|r| r.plan.position(stage).is_some());
        match state {
            Some(StageState::Offline) if in_plan => {
                self.lost.entry(stage.to_owned()).or_insert_with(|| {
                    tracing::warn!(%stage, "a stage of the running plan went offline");
                    now
                });
            }
            Some(StageState::Offline) | None => {}
            Some(_) => {
                if self.lost.remove(stage).is_some() {
                    tracing::info!(%stage, "the lost stage is back");
                }
                if self.excluded.remove(stage) {
                    tracing::info!(%stage, "a stage planned around is back; it is planned in when conditions next change");
                }
            }
        }
    }

    /// A new plan over the stages still there, once one of the running plan
    /// has been away for `planner.lost_after_ms` and the others can hold the
    /// model (with more of it streamed); the starter replays every request on
    /// it. A lost starter cannot be planned around: it holds the requests.
    pub fn tick(&mut self, now: Instant) -> Option<Plan> {
        let after = Duration::from_millis(self.cfg.lost_after_ms);
        let gone: Vec<String> = self
            .lost
            .iter()
            .filter(|(_, since)| now.duration_since(**since) >= after)
            .map(|(s, _)| s.clone())
            .collect();
        if gone.is_empty() {
            return None;
        }
        let running = self.running.as_ref()?;
        let starter = running.plan.starter()?.name.clone();
        for stage in &gone {
            self.lost.remove(stage);
        }
        if gone.contains(&starter) {
            tracing::error!(%starter, "the starter is lost: nothing to plan around it; its requests return with it");
            return None;
        }
        self.excluded.extend(gone.iter().cloned());
        let stages: Vec<String> = self
            .profiles
            .keys()
            .filter(|s| !self.excluded.contains(*s))
            .cloned()
            .collect();
        let links = self.conditions.links(&self.links, &stages);
        let epoch = (running.plan.epoch + 1).max(unix_seconds());
        match self.solve_from(&links, Some(&starter), None, epoch) {
            Ok((mut planned, _)) => {
                let why = format!("{} lost", gone.join(", "));
                if let Some(p) = &mut planned.plan.prediction {
                    p.reason = why.clone();
                }
                tracing::warn!(from = running.plan.epoch, to = epoch, lost = %why, stages = stages.len(), "planning around the lost stages");
                Some(self.run(planned, now))
            }
            Err(e) => {
                tracing::error!(lost = ?gone, "the other stages cannot hold the model ({e:#}); requests wait for the lost stages");
                None
            }
        }
    }

    /// Signs and checks plans with `key`.
    pub fn with_key(mut self, key: Option<RingKey>) -> Self {
        self.key = key;
        self
    }

    /// A plan on the retained topic (this planner's own included). One not
    /// signed with the ring key is not followed, and the running plan is
    /// returned to be published again over it.
    pub fn plan_seen(&mut self, payload: &[u8]) -> Option<Plan> {
        let plan = match serde_json::from_slice::<Plan>(payload) {
            Ok(p) => p,
            Err(e) if !payload.is_empty() => {
                tracing::warn!(error = %e, "an unreadable plan on the plan topic; publishing the running one over it");
                return self.running.as_ref().map(|r| r.plan.clone());
            }
            Err(_) => return None,
        };
        if let Some(key) = &self.key {
            let signature = key.check(&plan);
            if signature != Signature::Valid {
                tracing::warn!(
                    epoch = plan.epoch,
                    ?signature,
                    "a plan not signed with the ring key was published; not following it, publishing the running one over it"
                );
                return self.running.as_ref().map(|r| r.plan.clone());
            }
        }
        match &self.running {
            Some(r) if r.plan.epoch >= plan.epoch => {}
            Some(_) => {
                tracing::warn!(
                    epoch = plan.epoch,
                    "a newer plan was published by someone else; following it"
                );
                if let Err(e) = self.adopt(plan) {
                    tracing::error!("cannot follow it: {e:#}");
                }
            }
            None => {
                tracing::info!(epoch = plan.epoch, "found the plan the ring runs");
                self.found = Some(plan);
                if self.first_plan_at.is_some() {
                    return self.first_plan(Instant::now());
                }
            }
        }
        None
    }

    /// Takes `plan` as the running one, in the cost model's terms.
    fn adopt(&mut self, plan: Plan) -> anyhow::Result<()> {
        let micro_batches = plan.max_inflight.unwrap_or(1).max(1);
        let links = self.links.clone();
        let layout = self.with_problem(&links, None, |problem| {
            planner::layout_of(problem, &plan, micro_batches).map_err(anyhow::Error::msg)
        })?;
        self.running = Some(Running {
            plan,
            layout,
            switched: Instant::now(),
        });
        Ok(())
    }

    /// A stage's profile. Once every expected stage has one, the first plan is
    /// due: the ring's, if it was found, or one of this planner's own after
    /// [`FOUND_PLAN_WAIT`] (see [`Planner::first_plan`]).
    pub fn profile(&mut self, stage: &str, payload: &[u8], now: Instant) {
        if payload.is_empty() {
            self.profiles.remove(stage);
            return;
        }
        match serde_json::from_slice::<StageProfile>(payload) {
            Ok(sp) if sp.device.name == stage => {
                tracing::info!(%stage, "profile received");
                if self.running.is_some() {
                    tracing::warn!(%stage, "a profile arrived after the plan was made; it is used when conditions next change");
                }
                self.profiles.insert(stage.to_owned(), sp);
            }
            Ok(_) => tracing::warn!(%stage, "profile names another stage; ignored"),
            Err(e) => tracing::warn!(%stage, error = %e, "bad profile; ignored"),
        }
        if self.running.is_none()
            && self.first_plan_at.is_none()
            && self.profiles.len() >= self.cfg.stages
        {
            let at = if self.found.is_some() {
                now
            } else {
                now + FOUND_PLAN_WAIT
            };
            self.first_plan_at = Some(at);
        }
    }

    /// When [`Planner::first_plan`] is next to be called, if a first plan is due.
    pub fn first_plan_due(&self) -> Option<Instant> {
        self.first_plan_at.filter(|_| self.running.is_none())
    }

    /// The first plan, once every expected profile is in: the ring's plan if its
    /// starter published it (after a broker restart the ring keeps running and
    /// the plan stays, nothing to publish), else a new one. MQTT orders messages
    /// per topic only, so a restarted broker may hand over the last stage's
    /// profile before the starter's plan, although the starter sent the plan
    /// first: hence the wait of [`FOUND_PLAN_WAIT`] for a plan before making one.
    pub fn first_plan(&mut self, now: Instant) -> Option<Plan> {
        let at = self.first_plan_due()?;
        if self.profiles.len() < self.cfg.stages {
            self.first_plan_at = None;
            return None;
        }
        if self.found.is_none() && now < at {
            return None;
        }
        self.first_plan_at = None;
        if let Some(found) = self.found.take() {
            let epoch = found.epoch;
            match self.adopt(found) {
                Ok(()) => {
                    tracing::info!(epoch, "every stage reported; the ring's plan stays");
                    return None;
                }
                Err(e) => tracing::warn!(
                    "the plan found does not fit the profiles ({e:#}); planning afresh"
                ),
            }
        }
        let epoch = unix_seconds();
        match self.solve(&self.links.clone(), None, epoch) {
            Ok((planned, _)) => Some(self.run(planned, now)),
            Err(e) => {
                tracing::error!("cannot plan: {e:#}");
                None
            }
        }
    }

    /// A stage's telemetry: measurements for the running plan, and a new plan
    /// when they have changed for good and a better plan exists.
    pub fn telemetry(&mut self, t: &Telemetry, now: Instant) -> Option<Plan> {
        let running = self.running.as_ref()?;
        if !self.cfg.adapt || t.epoch != running.plan.epoch {
            return None;
        }
        if running.plan.starter().is_some_and(|s| s.name == t.stage) {
            self.context_tokens = t.context_tokens;
        }
        if let Some(l) = &t.link_out {
            if l.samples >= 2 && l.age_ms < 5_000 {
                let assumed = self.links.between(&t.stage, &l.to).mbit_per_s;
                let figure = Figure::Link {
                    from: t.stage.clone(),
                    to: l.to.clone(),
                };
                let sampled = now
                    .checked_sub(Duration::from_millis(l.age_ms))
                    .unwrap_or(now);
                self.conditions
                    .observe(figure, assumed, l.mbit_per_s, sampled, now);
                self.conditions.latency(&t.stage, &l.to, l.rtt_ms / 2.0);
            }
        }
        let counters = (t.loads.streamed_bytes, t.loads.read_busy_s);
        if let Some((bytes, busy)) = self.reads.insert(t.stage.clone(), counters) {
            let (db, ds) = (counters.0.saturating_sub(bytes), counters.1 - busy);
            let profiled = self
                .profiles
                .get(&t.stage)
                .map(|p| p.device.read_bytes_per_s);
            if let (Some(profiled), true) = (profiled, ds >= 0.5) {
                let figure = Figure::Read {
                    stage: t.stage.clone(),
                };
                self.conditions
                    .observe(figure, profiled, db as f64 / ds, now, now);
            }
        }
        let changes = self.conditions.changed(now);
        if changes.is_empty()
            || now.duration_since(running.switched)
                < Duration::from_millis(self.cfg.switch_interval_ms)
        {
            return None;
        }
        self.conditions.accept(&changes);
        self.replan(&changes, now)
    }

    fn replan(&mut self, changes: &[Change], now: Instant) -> Option<Plan> {
        let running = self.running.as_ref()?;
        let what = describe(changes);
        let stages: Vec<String> = self.profiles.keys().cloned().collect();
        let links = self.conditions.links(&self.links, &stages);
        let starter = running.plan.starter()?.name.clone();
        let epoch = (running.plan.epoch + 1).max(unix_seconds());
        let (mut planned, kept) = match self.solve(&links, Some((&starter, &running.layout)), epoch)
        {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(changes = %what, "cannot re-plan: {e:#}");
                return None;
            }
        };
        let new = score(&self.cfg, &planned.prediction);
        let old = kept.as_ref().map(|p| score(&self.cfg, p));
        let better = old.is_none_or(|old| new < old * (1.0 - self.cfg.min_gain));
        let rebuild = rebuild_s(
            &planned.prediction,
            self.context_tokens,
            self.cfg.prompt_tokens,
        );
        let payback = old.map_or(Some(0.0), |old| payback_s(old, new, rebuild));
        let repays = payback.is_some_and(|p| p <= self.cfg.payback_s);
        let kept_plan = planned.layout == running.layout || !better || !repays;
        let figures = |p: &Prediction, plan: &Plan| PlanPrediction {
            time_per_token_s: p.time_per_token_s,
            tokens_per_s: p.tokens_per_s,
            ttft_s: p.ttft_s,
            burst_prefill_s: p.burst_prefill_s,
            slowest_link_mbit_per_s: planner::slowest_link(plan, &links),
            reason: what.clone(),
        };
        self.review = Some(PlanReview {
            epoch: running.plan.epoch,
            changes: what.clone(),
            kept: kept_plan,
            running: kept.as_ref().map(|p| figures(p, &running.plan)),
            best: figures(&planned.prediction, &planned.plan),
            rebuild_s: rebuild,
            payback_s: payback,
        });
        if kept_plan {
            tracing::info!(
                changes = %what,
                running_s = old,
                best_s = new,
                rebuild_s = rebuild,
                payback_s = payback,
                "conditions changed; the running plan stays"
            );
            return None;
        }
        if let Some(p) = &mut planned.plan.prediction {
            p.reason = format!(
                "{what}; recomputing {} cached tokens takes about {rebuild:.1} s, repaid in {:.1} s",
                self.context_tokens,
                payback.unwrap_or(0.0)
            );
        }
        tracing::info!(
            changes = %what,
            from = running.plan.epoch,
            to = epoch,
            running_s = old,
            new_s = new,
            rebuild_s = rebuild,
            payback_s = payback,
            "conditions changed: publishing a new plan"
        );
        Some(self.run(planned, now))
    }

    /// Takes `planned` as the running plan from `now`; returns it to publish.
    fn run(&mut self, planned: planner::Planned, now: Instant) -> Plan {
        let plan = planned.plan.clone();
        self.running = Some(Running {
            plan: planned.plan,
            layout: planned.layout,
            switched: now,
        });
        plan
    }

    /// The best plan under `links` (and the measured read rates), with what
    /// `keep`'s layout would give under them; `keep` also fixes the starter.
    /// Runs `f` on the planning problem of the profiles and `links`, with the
    /// starter fixed when given.
    fn with_problem<T>(
        &self,
        links: &Links,
        starter: Option<&str>,
        f: impl FnOnce(&planner::Problem) -> anyhow::Result<T>,
    ) -> anyhow::Result<T> {
        let first = self
            .profiles
            .values()
            .next()
            .ok_or_else(|| anyhow::anyhow!("no profiles"))?;
        let shape = &first.model;
        if let Some(other) = self.profiles.values().find(|p| &p.model != shape) {
            anyhow::bail!(
                "stages serve different models: {} has {:?}, {} has {:?}",
                first.device.name,
                shape.name,
                other.device.name,
                other.model.name
            );
        }
        let devices: Vec<DeviceProfile> = self
            .profiles
            .values()
            .filter(|p| !self.excluded.contains(&p.device.name))
            .map(|p| {
                let mut d = p.device.clone();
                if let Some(r) = self.conditions.read_bytes_per_s(&d.name) {
                    d.read_bytes_per_s = r;
                }
                d
            })
            .collect();
        let starter = starter.and_then(|name| devices.iter().position(|d| d.name == name));
        let problem = planner::Problem {
            shape,
            devices: &devices,
            links,
            workload: workload(&self.cfg)?,
            runtime: Runtime {
                max_slots: self.cfg.max_slots,
                activation_tokens: self.cfg.activation_tokens,
                max_interleave: self.cfg.max_interleave,
            },
            starter,
        };
        f(&problem)
    }

    fn solve(
        &self,
        links: &Links,
        keep: Option<(&str, &Layout)>,
        epoch: u64,
    ) -> anyhow::Result<(planner::Planned, Option<Prediction>)> {
        self.solve_from(
            links,
            keep.map(|(name, _)| name),
            keep.map(|(_, l)| l),
            epoch,
        )
    }

    /// As [`Planner::solve`], with the starter and the layout to compare with
    /// given apart (a layout of other devices cannot be compared).
    fn solve_from(
        &self,
        links: &Links,
        starter: Option<&str>,
        keep: Option<&Layout>,
        epoch: u64,
    ) -> anyhow::Result<(planner::Planned, Option<Prediction>)> {
        self.with_problem(links, starter, |problem| {
            let planned = planner::plan(problem, epoch)?;
            tracing::info!(epoch, "plan made:\n{}", planner::render(problem, &planned));
            planned.plan.validate(problem.shape.layers)?;
            let kept = keep.and_then(|layout| planner::evaluate(problem, layout).ok());
            Ok((planned, kept))
        })
    }
}

/// Seconds per generated token, the figure both workloads minimise.
/// Seconds to recompute `context_tokens` of cache on the plan `p` predicts
/// for: prefills of `prompt_tokens` at its predicted TTFT.
fn rebuild_s(p: &Prediction, context_tokens: u64, prompt_tokens: usize) -> f64 {
    p.ttft_s * context_tokens as f64 / prompt_tokens.max(1) as f64
}

/// How long a switch from a plan scoring `old` to one scoring `new` (seconds per
/// token, lower is better) takes to make up for `rebuild` seconds without
/// output; `None` when the new plan is not faster.
fn payback_s(old: f64, new: f64, rebuild: f64) -> Option<f64> {
    let (old_rate, new_rate) = (1.0 / old, 1.0 / new);
    (new_rate > old_rate).then(|| rebuild * old_rate / (new_rate - old_rate))
}

fn score(cfg: &PlannerConfig, p: &Prediction) -> f64 {
    match cfg.workload.parse::<WorkloadKind>() {
        Ok(WorkloadKind::Bursty) => 1.0 / p.tokens_per_s.max(f64::MIN_POSITIVE),
        _ => p.time_per_token_s,
    }
}

fn describe(changes: &[Change]) -> String {
    changes
        .iter()
        .map(|c| match &c.figure {
            Figure::Link { from, to } => {
                format!("link {from}→{to} {:.0} Mb/s (was {:.0})", c.now, c.was)
            }
            Figure::Read { stage } => format!(
                "reads on {stage} {:.0} MB/s (was {:.0})",
                c.now / 1e6,
                c.was / 1e6
            ),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn unix_seconds() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(1)
}

fn workload(cfg: &PlannerConfig) -> anyhow::Result<Workload> {
    let kind: WorkloadKind = cfg.workload.parse().map_err(anyhow::Error::msg)?;
    Ok(Workload {
        kind,
        concurrency: if kind == WorkloadKind::Bursty {
            cfg.concurrency.max(1)
        } else {
            1
        },
        context: cfg.context,
        prompt_tokens: cfg.prompt_tokens,
    })
}

fn load_links(cfg: &PlannerConfig) -> anyhow::Result<Links> {
    match &cfg.links_file {
        Some(path) => planner::files::load_links(path),
        None => Ok(Links::uniform(LinkSpeed {
            mbit_per_s: cfg.default_mbit_per_s,
            latency_ms: cfg.default_latency_ms,
        })),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_switch_pays_back_its_rebuild_from_what_it_gains() {
        // 240 → 291 tokens/s, 5.5 s without output: 26 s to make up 1320 tokens.
        let p = payback_s(1.0 / 240.0, 1.0 / 291.0, 5.5).unwrap();
        assert!((p - 5.5 * 240.0 / 51.0).abs() < 1e-9, "{p}");
        assert_eq!(payback_s(1.0 / 300.0, 1.0 / 290.0, 1.0), None);
        assert_eq!(payback_s(1.0 / 300.0, 1.0 / 400.0, 0.0), Some(0.0));
    }

    fn profile(stage: &str) -> Vec<u8> {
        let model = lime_schemas::ModelShape {
            name: "toy".into(),
            layers: 8,
            hidden: 64,
            layer_params: 1 << 20,
            largest_tensor_params: 1 << 18,
            end_params: 1 << 19,
            head_params: 1 << 18,
            kv_values_per_token: 128,
            activation_values_per_token: 512,
            rope_values: 4096,
            max_context: 256,
            stored_dtype_bytes: 2,
        };
        let device = DeviceProfile {
            name: stage.into(),
            kind: "test".into(),
            estimate: false,
            source: String::new(),
            memory_bytes: 1 << 30,
            read_bytes_per_s: 1e9,
            weight_bytes: None,
            direct_io: false,
            memory_bandwidth_bytes_per_s: 1e10,
            flops: 1e10,
            layer_overhead_s: 0.0,
            measured: None,
            data_addr: Some(format!("127.0.0.1:{}", 31000 + stage.len())),
        };
        serde_json::to_vec(&StageProfile { device, model }).unwrap()
    }

    fn planner() -> Planner {
        let cfg = PlannerConfig {
            stages: 2,
            ..PlannerConfig::default()
        };
        let links = Links::uniform(LinkSpeed {
            mbit_per_s: cfg.default_mbit_per_s,
            latency_ms: cfg.default_latency_ms,
        });
        Planner::new(cfg, links)
    }

    #[test]
    fn a_first_start_plans_once_no_ring_plan_came_within_the_wait() {
        let mut p = planner();
        let t0 = Instant::now();
        p.profile("s0", &profile("s0"), t0);
        assert_eq!(p.first_plan_due(), None, "one profile of two");
        p.profile("s1", &profile("s1"), t0);
        assert_eq!(p.first_plan_due(), Some(t0 + FOUND_PLAN_WAIT));
        assert!(p.first_plan(t0).is_none(), "a plan before the wait is over");
        let plan = p.first_plan(t0 + FOUND_PLAN_WAIT).expect("a plan");
        assert_eq!(plan.stages.len(), 2);
        assert_eq!(p.first_plan_due(), None);
        assert!(p.first_plan(t0 + 2 * FOUND_PLAN_WAIT).is_none(), "only one");
    }

    /// A restarted broker may get every profile before the starter's plan,
    /// though the starter published the plan first (per-topic order only).
    #[test]
    fn a_restarted_planner_keeps_the_ring_plan_that_arrives_after_the_profiles() {
        let t0 = Instant::now();
        let ring = {
            let mut first = planner();
            first.profile("s0", &profile("s0"), t0);
            first.profile("s1", &profile("s1"), t0);
            first.first_plan(t0 + FOUND_PLAN_WAIT).unwrap()
        };
        let mut p = planner();
        p.profile("s1", &profile("s1"), t0);
        p.profile("s0", &profile("s0"), t0);
        assert!(p.first_plan(t0).is_none());
        let seen = p.plan_seen(&serde_json::to_vec(&ring).unwrap());
        assert!(seen.is_none(), "nothing to publish: the ring's plan stays");
        assert_eq!(p.running.as_ref().map(|r| r.plan.epoch), Some(ring.epoch));
        assert_eq!(p.first_plan_due(), None);
        assert!(p.first_plan(t0 + 10 * FOUND_PLAN_WAIT).is_none());

        // Found before the last profile: kept without waiting.
        let mut p = planner();
        p.profile("s0", &profile("s0"), t0);
        assert!(p.plan_seen(&serde_json::to_vec(&ring).unwrap()).is_none());
        p.profile("s1", &profile("s1"), t0);
        assert_eq!(p.first_plan_due(), Some(t0));
        assert!(p.first_plan(t0).is_none());
        assert_eq!(p.running.as_ref().map(|r| r.plan.epoch), Some(ring.epoch));
    }
}
