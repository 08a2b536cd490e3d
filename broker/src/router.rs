//! rumqttd's configuration for lime's broker settings: the router behind the
//! gate listens only on the gate's internal ports, for the gate's login, and
//! keeps longer logs for the request topics.

use crate::config::BrokerConfig;
use crate::gate::internal::Internal;
use std::collections::HashMap;

/// The embedded router's settings for `cfg`.
pub fn config(cfg: &BrokerConfig, internal: &Internal) -> rumqttd::Config {
    let connections = rumqttd::ConnectionSettings {
        connection_timeout_ms: cfg.connection_timeout_ms,
        max_payload_size: cfg.max_payload_bytes,
        max_inflight_count: cfg.max_inflight,
        auth: Some(HashMap::from([(
            internal.username.clone(),
            internal.password.clone(),
        )])),
        external_auth: None,
        dynamic_filters: true,
    };
    let server = |name: &str, listen: std::net::SocketAddr| {
        Some(HashMap::from([(
            "internal".to_owned(),
            rumqttd::ServerSettings {
                name: format!("{name}-internal"),
                listen,
                tls: None,
                next_connection_delay_ms: 1,
                connections: connections.clone(),
            },
        )]))
    };
    rumqttd::Config {
        id: 0,
        router: rumqttd::RouterConfig {
            // The gate's connections, the planner and the in-process links.
            max_connections: cfg.max_connections + 16,
            max_outgoing_packet_count: 1024,
            // Per subscription, for its whole life: rumqttd never drops a
            // filter's log, so this bounds the broker's memory.
            max_segment_size: cfg.log_segment_bytes,
            max_segment_count: cfg.log_segments,
            custom_segment: Some(request_logs(cfg)),
            ..Default::default()
        },
        v4: server("v4", internal.v4),
        v5: server("v5", internal.v5),
        ..Default::default()
    }
}

/// The request filters' logs: `request_log_bytes` in segments of a sixteenth
/// of it (64 KiB to 1 MiB), so that the oldest requests leave in small steps.
/// A segment takes one request however large, so the log holds at least as
/// many requests of any size as it has segments.
///
/// What a stored request really costs can be far more than its bytes: rumqttd
/// keeps the publish as a slice of the connection's 10 KiB read buffer, so a
/// robot that connects only to publish one small request pins a whole buffer
/// until the request leaves the log (measured: about 8.7 KiB per such request,
/// against ~300 bytes counted). A long-lived connection's requests share their
/// buffers.
fn request_logs(cfg: &BrokerConfig) -> HashMap<String, rumqttd::SegmentConfig> {
    let segment = (cfg.request_log_bytes / 16).clamp(64 << 10, 1 << 20);
    let log = rumqttd::SegmentConfig {
        max_segment_size: segment,
        max_segment_count: (cfg.request_log_bytes / segment).max(2),
    };
    [
        lime_schemas::topics::REQUEST,
        lime_schemas::topics::REQUEST_FROM_USERS,
    ]
    .into_iter()
    .map(|filter| (filter.to_owned(), log.clone()))
    .collect()
}
