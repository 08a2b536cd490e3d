//! lime-broker: the control plane. An embedded rumqttd serves MQTT 3.1.1 and 5 so
//! that a field box needs no other broker, behind a gate ([`gate`]) that holds
//! logins to their topics ([`acl`]); the broker follows stage membership from the
//! retained status topics. Its planner (the pure
//! `lime-plan`, run by [`planning`]) turns the stages' profiles into the
//! retained, signed plan.

pub mod acl;
#[cfg(feature = "server")]
pub mod conditions;
pub mod config;
#[cfg(feature = "server")]
pub mod gate;
#[cfg(feature = "server")]
pub mod membership;
#[cfg(feature = "server")]
pub mod planning;
#[cfg(feature = "server")]
mod router;
#[cfg(feature = "server")]
pub mod service;

#[cfg(feature = "server")]
pub use server::run;

/// The broker itself: what `lime-broker` runs.
#[cfg(feature = "server")]
mod server {
    use super::*;
    use crate::config::BrokerConfig;
    use anyhow::Context;
    use membership::{Change, Membership};

    /// Starts the broker, its gate and the membership tracker; returns when the
    /// broker's servers stop (normally never: the process ends on a signal).
    pub fn run(cfg: &BrokerConfig) -> anyhow::Result<()> {
        let listeners = gate::Listeners::bind(cfg)?;
        let internal = gate::internal::Internal::new()?;
        let mut broker = rumqttd::Broker::new(router::config(cfg, &internal));
        let (mut link_tx, mut link_rx) = broker
            .link("lime-broker-membership")
            .context("linking the membership tracker")?;
        link_tx
            .subscribe(lime_schemas::topics::STATUS_ALL)
            .context("subscribing to stage status")?;
        std::thread::Builder::new()
            .name("membership".into())
            .spawn(move || {
                let mut members = Membership::default();
                loop {
                    match link_rx.recv() {
                        Ok(Some(rumqttd::Notification::Forward(f))) => {
                            let topic = String::from_utf8_lossy(&f.publish.topic).into_owned();
                            log_change(members.apply(&topic, &f.publish.payload), &members);
                        }
                        Ok(_) => {}
                        Err(e) => {
                            tracing::error!(error = %e, "membership tracker stopped");
                            return;
                        }
                    }
                }
            })?;
        let (watch_tx, watch_rx) = broker
            .link("lime-broker-watchdog")
            .context("linking the service watchdog")?;
        let watch_cfg = cfg.clone();
        std::thread::Builder::new()
            .name("service".into())
            .spawn(move || {
                if let Err(e) = service::watch(&watch_cfg, watch_tx, watch_rx) {
                    tracing::error!(error = %e, "the service watchdog stopped");
                }
            })?;
        let ring_key = cfg.ring_key()?;
        if ring_key.is_none() && cfg.planner.stages > 0 {
            tracing::warn!("no ring_key_file: plans go out unsigned, and only stages with data.insecure follow them");
        }
        if cfg.planner.stages > 0 {
            let planner_cfg = cfg.clone();
            let planner_login = internal.clone();
            std::thread::Builder::new()
                .name("planner".into())
                .spawn(move || {
                    match tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                    {
                        Ok(rt) => rt.block_on(planning::run(planner_cfg, planner_login, ring_key)),
                        Err(e) => tracing::error!(error = %e, "planner not started"),
                    }
                })?;
            tracing::info!(
                stages = cfg.planner.stages,
                "planner waiting for stage profiles"
            );
        }
        tracing::info!(
            v4 = cfg.v4_listen(),
            v5 = cfg.v5_listen(),
            tls_v4 = cfg.tls.as_ref().map_or("", |t| t.v4_listen.as_str()),
            tls_v5 = cfg.tls.as_ref().map_or("", |t| t.v5_listen.as_str()),
            auth = cfg.users.is_some(),
            anonymous = cfg.allow_anonymous,
            "MQTT broker starting"
        );
        let (stopped_tx, stopped_rx) = tokio::sync::oneshot::channel();
        std::thread::Builder::new()
            .name("rumqttd".into())
            .spawn(move || {
                let why = match broker.start() {
                    Ok(()) => "its servers ended".to_owned(),
                    Err(e) => e.to_string(),
                };
                let _ = stopped_tx.send(why);
            })?;
        internal
            .wait_owned(std::time::Duration::from_secs(10))
            .context("starting the MQTT broker")?;
        gate::serve(
            std::sync::Arc::new(gate::Gate::new(cfg, internal)),
            listeners,
            stopped_rx,
        )
    }

    fn log_change(change: Option<Change>, members: &Membership) {
        let online = members.online().count();
        match change {
            Some(Change::Joined(s)) => tracing::info!(
                stage = %s.stage, state = ?s.state, role = ?s.role, online, "stage joined"
            ),
            Some(Change::Updated(s)) => tracing::info!(
                stage = %s.stage,
                state = ?s.state,
                role = ?s.role,
                epoch = ?s.epoch,
                chunks = ?s.chunks.iter().map(ToString::to_string).collect::<Vec<_>>(),
                online,
                "stage updated"
            ),
            Some(Change::Left(stage)) => tracing::warn!(%stage, online, "stage left"),
            Some(Change::Invalid { topic, reason }) => {
                tracing::warn!(%topic, %reason, "ignoring a bad status document")
            }
            None => {}
        }
    }
}
