//! Who may do what on lime's topics. Every login has a role: lime's own
//! processes and operators are services and may use every topic; a robot may
//! only ask (publish on `lime/request`) and read its own answers; a monitor may
//! only watch the cluster. The gate ([`crate::gate`]) applies these rules to
//! every PUBLISH, SUBSCRIBE and last will before rumqttd sees them.

use lime_schemas::topics;
use serde::{Deserialize, Serialize};

/// What a login is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Stages, `lime` tools, operators: every topic.
    Service,
    /// Publishes requests and cancels them; reads `lime/response/<user>/…` and
    /// `lime/error/<user>`.
    Robot,
    /// Reads stage status, telemetry, profiles, the plan and `lime/error`.
    Monitor,
}

/// What becomes of a login's PUBLISH.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Publish {
    /// Passed on as it is.
    Forward,
    /// Passed on under another topic: a robot's request goes to the starter as
    /// `lime/request/<user>`, so that its answers stay on that user's topics.
    Retopic(String),
    /// Not passed on.
    Refuse,
}

/// A login's rules.
#[derive(Debug, Clone, Copy)]
pub struct Rules<'a> {
    pub role: Role,
    pub user: &'a str,
}

impl Rules<'_> {
    /// Whether the gate must look inside this login's packets at all.
    pub fn restricted(&self) -> bool {
        self.role != Role::Service
    }

    pub fn publish(&self, topic: &str) -> Publish {
        match self.role {
            Role::Service => Publish::Forward,
            Role::Robot if topic == topics::REQUEST => {
                Publish::Retopic(topics::request_from(self.user))
            }
            Role::Robot if topic == topics::CANCEL => {
                Publish::Retopic(topics::cancel_from(self.user))
            }
            Role::Robot | Role::Monitor => Publish::Refuse,
        }
    }

    /// Whether every topic `filter` can match is one this login may read.
    pub fn may_subscribe(&self, filter: &str) -> bool {
        // A shared subscription reads a subset of what its filter names.
        let filter = match filter.strip_prefix("$share/") {
            Some(rest) => match rest.split_once('/') {
                Some((_group, f)) => f,
                None => return false,
            },
            None => filter,
        };
        match self.role {
            Role::Service => true,
            Role::Robot => [
                format!("{}#", topics::user_responses(self.user)),
                topics::user_errors(self.user),
            ]
            .iter()
            .any(|allowed| within(filter, allowed)),
            Role::Monitor => [
                topics::STATUS_ALL,
                topics::TELEMETRY_ALL,
                topics::PROFILE_ALL,
                topics::PLAN,
                topics::PLAN_REVIEW,
                topics::ERROR,
            ]
            .iter()
            .any(|allowed| within(filter, allowed)),
        }
    }
}

/// The client id rumqttd knows a restricted login's session by: its own
/// name first, so that sessions of different logins never collide. Ids of
/// lime's own processes have no `:`, so none can be reached this way.
pub fn session_id(user: &str, client_id: &str) -> String {
    format!("{user}:{client_id}")
}

/// Whether every topic that `filter` matches is matched by `allowed` (both MQTT
/// topic filters).
fn within(filter: &str, allowed: &str) -> bool {
    let mut f = filter.split('/');
    let mut a = allowed.split('/');
    loop {
        match (f.next(), a.next()) {
            // `x/#` covers `x` itself and everything below it.
            (_, Some("#")) => return true,
            (None, None) => return true,
            (None, Some(_)) | (Some(_), None) => return false,
            (Some("#"), Some(_)) => return false,
            (Some("+"), Some(level)) if level != "+" => return false,
            (Some(_), Some("+")) => {}
            (Some(level), Some(other)) if level == other => {}
            (Some(_), Some(_)) => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn robot(user: &str) -> Rules<'_> {
        Rules {
            role: Role::Robot,
            user,
        }
    }

    #[test]
    fn filters_within_filters() {
        assert!(within("a/b", "a/#"));
        assert!(within("a", "a/#"));
        assert!(within("a/+/c", "a/#"));
        assert!(within("a/b", "a/+"));
        assert!(within("a/+", "a/+"));
        assert!(!within("a/#", "a/+"));
        assert!(!within("+/b", "a/+"));
        assert!(!within("#", "a/#"));
        assert!(!within("a/b/c", "a/+"));
        assert!(!within("a", "a/+"));
        assert!(!within("ab", "a"));
    }

    #[test]
    fn a_robot_asks_and_reads_its_own_answers_only() {
        let r = robot("arm-2");
        assert_eq!(
            r.publish("lime/request"),
            Publish::Retopic("lime/request/arm-2".into())
        );
        assert_eq!(
            r.publish("lime/cancel"),
            Publish::Retopic("lime/cancel/arm-2".into())
        );
        for topic in [
            "lime/cancel/arm-3",
            "lime/request/arm-3",
            "lime/control/plan",
            "lime/status/s0",
            "lime/response/arm-3/x",
        ] {
            assert_eq!(r.publish(topic), Publish::Refuse, "{topic}");
        }
        for ok in [
            "lime/response/arm-2/#",
            "lime/response/arm-2/42",
            "lime/response/arm-2/+",
            "lime/error/arm-2",
            "$share/arms/lime/response/arm-2/#",
        ] {
            assert!(r.may_subscribe(ok), "{ok}");
        }
        for denied in [
            "#",
            "lime/#",
            "lime/response/#",
            "lime/response/+/42",
            "lime/response/arm-3/#",
            "lime/response/arm-22/#",
            "lime/control/plan",
            "lime/request",
            "lime/error",
            "lime/error/+",
            "$share/arms/#",
            "$share/arms",
            "$SYS/#",
        ] {
            assert!(!r.may_subscribe(denied), "{denied}");
        }
    }

    #[test]
    fn a_monitor_watches_and_a_service_does_anything() {
        let m = Rules {
            role: Role::Monitor,
            user: "ops",
        };
        assert!(m.may_subscribe("lime/status/+"));
        assert!(m.may_subscribe("lime/telemetry/s1"));
        assert!(m.may_subscribe("lime/control/plan"));
        assert!(!m.may_subscribe("lime/response/#"));
        assert!(!m.may_subscribe("lime/request"));
        assert_eq!(m.publish("lime/request"), Publish::Refuse);
        let s = Rules {
            role: Role::Service,
            user: "s0",
        };
        assert!(!s.restricted());
        assert!(s.may_subscribe("#"));
        assert_eq!(s.publish("lime/control/plan"), Publish::Forward);
    }
}
