//! The control plane as a stage sees it: one MQTT 5 connection with a last will,
//! the retained status, the plan topic, and (at the starter) requests in and
//! replies out.

pub mod broker_tls;
pub mod profile;

use crate::config::StageConfig;
use crate::pipeline::Event;
use crate::starter::inflow::Inflow;
use crate::starter::intake::{Intake, Sender};
use crate::starter::Outgoing;
use lime_schemas::signing::{RingKey, Signature};
use lime_schemas::{topics, Plan, StageStatus};
use rumqttc::v5::mqttbytes::v5::{LastWill, Packet, PublishProperties};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event as MqttEvent, EventLoop, MqttOptions};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender};
use tokio::sync::watch;

/// Largest MQTT packet a stage accepts: room for a request somewhat over the
/// starter's own limit, so that an oversized one gets a clear error.
const MAX_PACKET_BYTES: u32 = 8 << 20;

/// Connection options: credentials, TLS if asked for, keep-alive, and a will
/// that marks the stage offline if it vanishes.
pub fn options(cfg: &StageConfig) -> anyhow::Result<MqttOptions> {
    let client_id = format!("lime-stage-{}", cfg.name);
    let mut o = MqttOptions::new(client_id, cfg.broker.host.clone(), cfg.broker.port);
    o.set_keep_alive(Duration::from_secs(cfg.broker.keep_alive_s.max(1)));
    o.set_max_packet_size(Some(MAX_PACKET_BYTES));
    if let (Some(u), Some(p)) = (&cfg.broker.username, &cfg.broker.password) {
        o.set_credentials(u.clone(), p.clone());
    }
    if let Some(ca) = &cfg.broker.ca_file {
        o.set_transport(crate::control::broker_tls::transport(ca)?);
    }
    let will = serde_json::to_vec(&StageStatus::offline(&cfg.name)).unwrap_or_default();
    o.set_last_will(LastWill::new(
        topics::status(&cfg.name),
        will,
        QoS::AtLeastOnce,
        true,
        None,
    ));
    Ok(o)
}

/// Where checked requests go once the starter is ready for them ([`Inflow`]
/// feeds it).
pub struct RequestSink {
    /// Checks and tokenizes each request, on the intake thread.
    pub intake: Arc<Intake>,
    /// The pipeline's queue: accepted jobs and cancels go there.
    pub events: std::sync::mpsc::Sender<Event>,
    /// Refusals, published on the requester's reply topic without the pipeline.
    pub outbox: UnboundedSender<Outgoing>,
}

/// What the MQTT loop routes incoming messages to.
pub struct Inbox {
    /// Plans from the retained topic (when the stage has no plan file): the first
    /// one the stage starts with, later ones the starter moves the ring to.
    pub plan: Option<watch::Sender<Option<Plan>>>,
    /// Set when the starter can take requests; subscribing follows.
    pub requests: OnceLock<Inflow>,
    /// The status to publish again after a reconnect (retained messages survive a
    /// broker restart only on brokers that persist them). Held while a status is
    /// handed to the client, so that a reconnect's copy of an older status can
    /// never be queued after a newer one and become the retained state.
    pub status: tokio::sync::Mutex<Option<StageStatus>>,
    /// The profile, for the same reason: a restarted broker's planner needs
    /// every stage's profile again.
    pub profile: Mutex<Option<lime_schemas::StageProfile>>,
    /// At the starter only, the plan the ring runs: a restarted broker has lost
    /// the retained plan, and stages that join later wait for it.
    pub running_plan: Mutex<Option<Plan>>,
    /// At the starter only: where a stage going offline is reported (its last
    /// will is how the death of a stage that is not a neighbour is seen).
    pub stage_events: OnceLock<std::sync::mpsc::Sender<Event>>,
    /// The ring key plans must be signed with; without one (`data.insecure`)
    /// any readable plan is taken.
    pub key: Option<RingKey>,
}

impl Inbox {
    /// An empty inbox; with `want_plan`, also the receiver the plans arrive on
    /// (`None` until the first).
    pub fn new(
        want_plan: bool,
        key: Option<RingKey>,
    ) -> (Arc<Self>, Option<watch::Receiver<Option<Plan>>>) {
        let (tx, rx) = if want_plan {
            let (tx, rx) = watch::channel(None);
            (Some(tx), Some(rx))
        } else {
            (None, None)
        };
        (
            Arc::new(Self {
                plan: tx,
                requests: OnceLock::new(),
                status: tokio::sync::Mutex::new(None),
                profile: Mutex::new(None),
                running_plan: Mutex::new(None),
                stage_events: OnceLock::new(),
                key,
            }),
            rx,
        )
    }
}

/// Publishes `status` retained and remembers it for reconnects.
pub async fn publish_status(client: &AsyncClient, inbox: &Inbox, status: StageStatus) {
    let mut held = inbox.status.lock().await;
    let status = held.insert(status);
    if let Err(e) = send_status(client, status).await {
        tracing::warn!(error = %e, "status not published");
    }
}

/// Queues `status` retained, at least once; the caller holds `Inbox::status`.
async fn send_status(
    client: &AsyncClient,
    status: &StageStatus,
) -> Result<(), rumqttc::v5::ClientError> {
    let payload = serde_json::to_vec(status).unwrap_or_default();
    client
        .publish(
            topics::status(&status.stage),
            QoS::AtLeastOnce,
            true,
            payload,
        )
        .await
}

/// Publishes a telemetry report, retained so that a reader arriving later (`lime
/// status`, the planner) sees the latest at once. At most once: a lost report is
/// replaced by the next.
pub async fn publish_telemetry(client: &AsyncClient, telemetry: &lime_schemas::Telemetry) {
    let payload = serde_json::to_vec(telemetry).unwrap_or_default();
    let topic = topics::telemetry(&telemetry.stage);
    if let Err(e) = client.publish(topic, QoS::AtMostOnce, true, payload).await {
        tracing::warn!(error = %e, "telemetry not published");
    }
}

/// Publishes this stage's profile, retained, for the broker's planner (again
/// after every reconnect).
pub async fn publish_profile(
    client: &AsyncClient,
    inbox: &Inbox,
    profile: &lime_schemas::StageProfile,
) {
    if let Ok(mut p) = inbox.profile.lock() {
        *p = Some(profile.clone());
    }
    let payload = serde_json::to_vec(profile).unwrap_or_default();
    let topic = topics::profile(&profile.device.name);
    if let Err(e) = client.publish(topic, QoS::AtLeastOnce, true, payload).await {
        tracing::warn!(error = %e, "profile not published");
    }
}

/// Drives the MQTT connection for the life of the stage.
pub async fn drive(
    mut eventloop: EventLoop,
    client: AsyncClient,
    inbox: Arc<Inbox>,
    stopping: crate::shutdown::Shutdown,
) {
    let mut connected = false;
    loop {
        match eventloop.poll().await {
            // The stage said goodbye: what it published before went out first.
            Ok(MqttEvent::Outgoing(rumqttc::Outgoing::Disconnect)) => return,
            Err(_) if stopping.is_fired() => return,
            Ok(MqttEvent::Incoming(Packet::ConnAck(_))) => {
                tracing::info!("connected to the MQTT broker");
                connected = true;
                let (client, inbox) = (client.clone(), inbox.clone());
                tokio::spawn(async move { resubscribe(&client, &inbox).await });
            }
            Ok(MqttEvent::Incoming(Packet::Publish(p))) => {
                let received = Instant::now();
                let topic = String::from_utf8_lossy(&p.topic).into_owned();
                if let Some(sender) = Sender::of_topic(&topic) {
                    handle_request(&inbox, &p.payload, sender, p.properties.as_ref(), received);
                } else if let Some(sender) = Sender::of_cancel_topic(&topic) {
                    if let Some(inflow) = inbox.requests.get() {
                        inflow.offer_cancel(p.payload.clone(), sender);
                    }
                } else if topic == topics::PLAN {
                    if !handle_plan(&inbox, &p.payload) {
                        heal_plan(&client, &inbox);
                    }
                } else if let Some(stage) = topics::stage_of_status(&topic) {
                    handle_status(&inbox, stage, &p.payload);
                }
            }
            Ok(_) => {}
            Err(e) => {
                if connected {
                    tracing::warn!(error = %e, "MQTT connection lost; reconnecting");
                } else {
                    tracing::debug!(error = %e, "MQTT broker not reachable; retrying");
                }
                connected = false;
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
}

/// At the starter of a ring planned over MQTT: the plan it runs, published
/// again (retained) after a reconnect to a broker that lost it.
pub fn remember_running_plan(inbox: &Inbox, plan: &Plan) {
    if let Ok(mut p) = inbox.running_plan.lock() {
        *p = Some(plan.clone());
    }
}

async fn republish_plan(client: &AsyncClient, plan: &Plan) {
    let payload = serde_json::to_vec(plan).unwrap_or_default();
    if let Err(e) = client
        .publish(topics::PLAN, QoS::AtLeastOnce, true, payload)
        .await
    {
        tracing::warn!(error = %e, "the running plan was not published");
    }
}

/// After a (re)connect: subscriptions, and what a restarted broker has lost,
/// the running plan before the profile so that its planner adopts the plan
/// rather than making another.
async fn resubscribe(client: &AsyncClient, inbox: &Inbox) {
    let plan = inbox.running_plan.lock().ok().and_then(|p| p.clone());
    if let Some(plan) = plan {
        republish_plan(client, &plan).await;
    }
    let profile = inbox.profile.lock().ok().and_then(|p| p.clone());
    if let Some(profile) = profile {
        let payload = serde_json::to_vec(&profile).unwrap_or_default();
        let topic = topics::profile(&profile.device.name);
        let _ = client.publish(topic, QoS::AtLeastOnce, true, payload).await;
    }
    if inbox.plan.is_some() {
        let _ = client.subscribe(topics::PLAN, QoS::AtLeastOnce).await;
    }
    if inbox.requests.get().is_some() {
        subscribe_requests(client).await;
    }
    if inbox.stage_events.get().is_some() {
        let _ = client.subscribe(topics::STATUS_ALL, QoS::AtLeastOnce).await;
    }
    let held = inbox.status.lock().await;
    if let Some(status) = held.as_ref() {
        let _ = send_status(client, status).await;
    }
}

/// At the starter: from now on every stage that goes offline is reported to
/// the pipeline, which replays what the ring lost.
pub async fn watch_stages(
    client: &AsyncClient,
    inbox: &Inbox,
    events: std::sync::mpsc::Sender<Event>,
) {
    if inbox.stage_events.set(events).is_ok() {
        if let Err(e) = client.subscribe(topics::STATUS_ALL, QoS::AtLeastOnce).await {
            tracing::error!(error = %e, "could not subscribe to the stages' status");
        }
    }
}

fn handle_status(inbox: &Inbox, stage: &str, payload: &[u8]) {
    let Some(events) = inbox.stage_events.get() else {
        return;
    };
    // Only service logins may publish a status; one unreadable is no news.
    if let Ok(status) = serde_json::from_slice::<StageStatus>(payload) {
        if status.state == lime_schemas::StageState::Offline && status.stage == stage {
            let _ = events.send(Event::StageLost(stage.to_owned()));
        }
    }
}

/// Starts taking requests: from now on `lime/request` is subscribed.
pub async fn open_requests(client: &AsyncClient, inbox: &Inbox, inflow: Inflow) {
    if inbox.requests.set(inflow).is_ok() {
        subscribe_requests(client).await;
    }
}

/// Requests come on `lime/request`, and as `lime/request/<user>` when
/// lime-broker forwards them for a robot login; cancels likewise.
async fn subscribe_requests(client: &AsyncClient) {
    for topic in [
        topics::REQUEST,
        topics::REQUEST_FROM_USERS,
        topics::CANCEL,
        topics::CANCEL_FROM_USERS,
    ] {
        if let Err(e) = client.subscribe(topic, QoS::AtLeastOnce).await {
            tracing::error!(error = %e, %topic, "could not subscribe to requests");
        }
    }
}

fn handle_request(
    inbox: &Inbox,
    payload: &bytes::Bytes,
    sender: Sender<'_>,
    props: Option<&PublishProperties>,
    received: Instant,
) {
    let Some(inflow) = inbox.requests.get() else {
        return;
    };
    let response_topic = props.and_then(|p| p.response_topic.as_deref());
    let correlation = props.and_then(|p| p.correlation_data.as_deref());
    inflow.offer(
        payload.clone(),
        sender,
        response_topic,
        correlation,
        received,
    );
}

/// Takes a plan from the plan topic; false when it was refused (unreadable, or
/// not signed with the ring key), so that the last good plan stays.
fn handle_plan(inbox: &Inbox, payload: &[u8]) -> bool {
    let Some(tx) = &inbox.plan else { return true };
    if payload.is_empty() {
        return true;
    }
    let plan = match serde_json::from_slice::<Plan>(payload) {
        Ok(plan) => plan,
        Err(e) => {
            tracing::error!(error = %e, "ignoring an unreadable plan on {}; the last good one stays", topics::PLAN);
            return false;
        }
    };
    if let Some(key) = &inbox.key {
        let signature = key.check(&plan);
        if signature != Signature::Valid {
            tracing::error!(
                epoch = plan.epoch,
                ?signature,
                stages = ?plan.stages.iter().map(|s| (&s.name, &s.data_addr)).collect::<Vec<_>>(),
                "refusing a plan on {} that is not signed with the ring key: someone without the key published it",
                topics::PLAN
            );
            return false;
        }
    }
    let _ = tx.send(Some(plan));
    true
}

/// At the starter of a ring planned over MQTT: a refused plan on the retained
/// topic would keep stages that start later waiting; the running plan goes
/// over it.
fn heal_plan(client: &AsyncClient, inbox: &Inbox) {
    let running = inbox.running_plan.lock().ok().and_then(|p| p.clone());
    if let Some(plan) = running {
        tracing::warn!(
            epoch = plan.epoch,
            "publishing the running plan over the refused one"
        );
        let client = client.clone();
        tokio::spawn(async move { republish_plan(&client, &plan).await });
    }
}

/// Publishes replies in order, QoS 1, with the request's correlation data,
/// until `done` fires (the pipeline has ended) and what is left is sent.
pub async fn publish_replies(
    client: AsyncClient,
    mut outbox: UnboundedReceiver<Outgoing>,
    mut done: crate::shutdown::Shutdown,
) {
    loop {
        let out = tokio::select! {
            out = outbox.recv() => out,
            _ = done.fired() => {
                outbox.close();
                outbox.recv().await
            }
        };
        let Some(out) = out else { return };
        let props = out.reply.correlation.map(|c| PublishProperties {
            correlation_data: Some(c.into()),
            ..Default::default()
        });
        let result = match props {
            Some(p) => {
                client
                    .publish_with_properties(
                        out.reply.topic,
                        QoS::AtLeastOnce,
                        false,
                        out.payload,
                        p,
                    )
                    .await
            }
            None => {
                client
                    .publish(out.reply.topic, QoS::AtLeastOnce, false, out.payload)
                    .await
            }
        };
        if let Err(e) = result {
            tracing::error!(error = %e, "reply not published");
        }
    }
}
