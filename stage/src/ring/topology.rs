//! This stage's place in the ring under the current plan: the predecessor and
//! epoch its listener accepts, and the link to its successor. Moving to a new
//! plan re-points both; the listening socket stays.

use crate::config::DataConfig;
use crate::ring::auth::RingKey;
use crate::ring::link::LinkGauge;
use crate::ring::{self, LinkIdentity, Probing, Route};
use lime_schemas::{Frame, Plan};
use std::time::Duration;
use tokio::sync::mpsc::UnboundedSender;
use tokio::sync::watch;

/// What the pipeline holds to re-point the ring's links when the plan changes.
pub struct Topology {
    runtime: tokio::runtime::Handle,
    me: String,
    data: DataConfig,
    key: Option<RingKey>,
    route: watch::Sender<Route>,
    gauge: LinkGauge,
    /// Where a broken link to the next stage is reported: the pipeline (at
    /// the starter it replays what was on the ring; elsewhere it knows the
    /// old ring is gone when a new plan is published).
    breaks: std::sync::mpsc::Sender<crate::pipeline::Event>,
}

impl Topology {
    /// For stage `me`; the listener follows `route`.
    pub fn new(
        runtime: tokio::runtime::Handle,
        me: &str,
        data: &DataConfig,
        key: Option<RingKey>,
        route: watch::Sender<Route>,
        breaks: std::sync::mpsc::Sender<crate::pipeline::Event>,
    ) -> Self {
        Self {
            runtime,
            me: me.to_owned(),
            data: data.clone(),
            key,
            route,
            gauge: LinkGauge::default(),
            breaks,
        }
    }

    /// The route a stage's listener starts with under `plan`.
    pub fn route(plan: &Plan, me: &str) -> Route {
        Route {
            epoch: plan.epoch,
            prev: plan
                .predecessor(me)
                .map(|s| s.name.clone())
                .unwrap_or_default(),
        }
    }

    /// The measurements of the link to the successor, for telemetry; each new
    /// link starts them afresh.
    pub fn gauge(&self) -> &LinkGauge {
        &self.gauge
    }

    /// Accepts `plan`'s predecessor from now on and connects to its successor;
    /// returns where frames for the successor go (`None` when this stage is the
    /// whole ring or not in it).
    pub fn join(&self, plan: &Plan) -> Option<UnboundedSender<Frame>> {
        self.route.send_replace(Self::route(plan, &self.me));
        if plan.stages.len() < 2 || plan.position(&self.me).is_none() {
            return None;
        }
        let next = plan.successor(&self.me)?.clone();
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let identity = LinkIdentity {
            me: self.me.clone(),
            epoch: plan.epoch,
            hello_timeout: Duration::from_millis(self.data.hello_timeout_ms),
            key: self.key.clone(),
        };
        let backoff = (
            Duration::from_millis(self.data.backoff_min_ms),
            Duration::from_millis(self.data.backoff_max_ms),
        );
        let probing = Probing {
            every: Duration::from_millis(self.data.probe_every_ms),
            target: Duration::from_millis(self.data.probe_target_ms),
        };
        self.runtime.spawn(ring::connect(
            ring::NextStage {
                name: next.name,
                addr: next.data_addr,
            },
            identity,
            backoff,
            probing,
            self.gauge.clone(),
            rx,
            self.breaks.clone(),
        ));
        Some(tx)
    }
}
