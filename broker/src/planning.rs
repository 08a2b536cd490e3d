//! The broker's planner at work: it collects the stages' retained profiles from
//! `lime/profile/+` and, once the expected number of stages has published one,
//! solves and publishes the plan retained on `lime/control/plan`, which the
//! waiting stages adopt. (Re-planning on telemetry is not done here.)

use crate::config::{BrokerConfig, PlannerConfig};
use crate::planner::{self, Runtime, Workload, WorkloadKind};
use lime_schemas::{topics, LinkSpeed, Links, StageProfile};
use rumqttc::v5::mqttbytes::v5::Packet;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use std::collections::BTreeMap;
use std::time::Duration;

/// Runs the planner against the broker's own listener until the process ends.
pub async fn run(cfg: BrokerConfig) {
    let planner = cfg.planner.clone();
    let links = match load_links(&planner) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!("{e:#}; the planner is off");
            return;
        }
    };
    let Ok(addr) = cfg.v5_listen.parse::<std::net::SocketAddr>() else {
        tracing::error!("the planner needs the MQTT 5 listener; it is off");
        return;
    };
    let host = if addr.ip().is_unspecified() {
        "127.0.0.1".to_string()
    } else {
        addr.ip().to_string()
    };
    let mut options = MqttOptions::new("lime-broker-planner", host, addr.port());
    options.set_keep_alive(Duration::from_secs(10));
    options.set_max_packet_size(Some(cfg.max_payload_bytes as u32));
    // With logins required, the planner uses the first configured user.
    if let Some((user, password)) = cfg.users.as_ref().and_then(|u| u.iter().min()) {
        options.set_credentials(user.clone(), password.clone());
    }
    let (client, mut eventloop) = AsyncClient::new(options, 64);
    let mut profiles: BTreeMap<String, StageProfile> = BTreeMap::new();
    let mut planned = false;
    loop {
        match eventloop.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                if let Err(e) = client
                    .subscribe(topics::PROFILE_ALL, QoS::AtLeastOnce)
                    .await
                {
                    tracing::warn!(error = %e, "planner cannot subscribe to profiles");
                }
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                let topic = String::from_utf8_lossy(&p.topic).into_owned();
                let Some(stage) = topics::stage_of_profile(&topic) else {
                    continue;
                };
                if p.payload.is_empty() {
                    profiles.remove(stage);
                    continue;
                }
                match serde_json::from_slice::<StageProfile>(&p.payload) {
                    Ok(sp) if sp.device.name == stage => {
                        tracing::info!(%stage, "profile received");
                        if planned {
                            tracing::warn!(%stage, "a profile arrived after the plan was made; re-planning is not automatic");
                        }
                        profiles.insert(stage.to_owned(), sp);
                    }
                    Ok(_) => tracing::warn!(%topic, "profile names another stage; ignored"),
                    Err(e) => tracing::warn!(%topic, error = %e, "bad profile; ignored"),
                }
                if !planned && profiles.len() >= planner.stages {
                    match make_plan(&planner, &links, &profiles) {
                        Ok(plan) => {
                            let payload = serde_json::to_vec(&plan).unwrap_or_default();
                            match client
                                .publish(topics::PLAN, QoS::AtLeastOnce, true, payload)
                                .await
                            {
                                Ok(()) => planned = true,
                                Err(e) => tracing::error!(error = %e, "plan not published"),
                            }
                        }
                        Err(e) => tracing::error!("cannot plan: {e:#}"),
                    }
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

fn load_links(cfg: &PlannerConfig) -> anyhow::Result<Links> {
    match &cfg.links_file {
        Some(path) => planner::files::load_links(path),
        None => Ok(Links::uniform(LinkSpeed {
            mbit_per_s: cfg.default_mbit_per_s,
            latency_ms: cfg.default_latency_ms,
        })),
    }
}

/// The plan for the stages that published profiles (all serving one model).
pub fn make_plan(
    cfg: &PlannerConfig,
    links: &Links,
    profiles: &BTreeMap<String, StageProfile>,
) -> anyhow::Result<lime_schemas::Plan> {
    let first = profiles
        .values()
        .next()
        .ok_or_else(|| anyhow::anyhow!("no profiles"))?;
    let shape = &first.model;
    if let Some(other) = profiles.values().find(|p| &p.model != shape) {
        anyhow::bail!(
            "stages serve different models: {} has {:?}, {} has {:?}",
            first.device.name,
            shape.name,
            other.device.name,
            other.model.name
        );
    }
    let devices: Vec<_> = profiles.values().map(|p| p.device.clone()).collect();
    let kind: WorkloadKind = cfg.workload.parse().map_err(anyhow::Error::msg)?;
    let workload = Workload {
        kind,
        concurrency: if kind == WorkloadKind::Bursty {
            cfg.concurrency.max(1)
        } else {
            1
        },
        context: cfg.context,
        prompt_tokens: cfg.prompt_tokens,
    };
    let problem = planner::Problem {
        shape,
        devices: &devices,
        links,
        workload,
        runtime: Runtime {
            max_slots: cfg.max_slots,
            activation_tokens: cfg.activation_tokens,
            max_interleave: cfg.max_interleave,
        },
    };
    let epoch = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(1);
    let planned = planner::plan(&problem, epoch)?;
    tracing::info!(epoch, "plan made:\n{}", planner::render(&problem, &planned));
    planned.plan.validate(shape.layers)?;
    Ok(planned.plan)
}
