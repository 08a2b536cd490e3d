//! MQTT topic names: the one place they are spelled.

/// Every lime topic starts so; of them, answers go only under
/// [`RESPONSE_PREFIX`].
pub const PREFIX: &str = "lime/";
/// Robots publish requests here (QoS 1).
pub const REQUEST: &str = "lime/request";
/// Requests lime-broker forwards under their sender's name: a robot's publish
/// on [`REQUEST`] arrives at the starter as `lime/request/<user>`, so that its
/// answers can be kept to topics that user may read.
pub const REQUEST_FROM_USERS: &str = "lime/request/+";
/// Robots cancel their requests here (`{"id"}`).
pub const CANCEL: &str = "lime/cancel";
/// Cancels lime-broker forwards under their sender's name, as requests.
pub const CANCEL_FROM_USERS: &str = "lime/cancel/+";
/// Errors that cannot be addressed to any reply topic.
pub const ERROR: &str = "lime/error";
/// The control topics (the plan), published by service logins only.
pub const CONTROL_PREFIX: &str = "lime/control/";
/// The retained current plan.
pub const PLAN: &str = "lime/control/plan";
/// The planner's retained verdict on the last change of conditions
/// ([`crate::PlanReview`]).
pub const PLAN_REVIEW: &str = "lime/control/review";
/// Every stage's retained status document.
pub const STATUS_ALL: &str = "lime/status/+";
/// Every stage's retained device profile.
pub const PROFILE_ALL: &str = "lime/profile/+";
/// Every stage's telemetry.
pub const TELEMETRY_ALL: &str = "lime/telemetry/+";
/// Prefix of default reply topics, `lime/response/<id>`.
pub const RESPONSE_PREFIX: &str = "lime/response/";

/// A stage's retained status topic.
pub fn status(stage: &str) -> String {
    format!("lime/status/{stage}")
}

/// A stage's retained device profile topic.
pub fn profile(stage: &str) -> String {
    format!("lime/profile/{stage}")
}

/// The stage a `lime/profile/<stage>` topic is about.
pub fn stage_of_profile(topic: &str) -> Option<&str> {
    topic
        .strip_prefix("lime/profile/")
        .filter(|s| !s.is_empty() && !s.contains('/'))
}

/// A stage's telemetry topic.
pub fn telemetry(stage: &str) -> String {
    format!("lime/telemetry/{stage}")
}

/// The stage a `lime/telemetry/<stage>` topic is about.
pub fn stage_of_telemetry(topic: &str) -> Option<&str> {
    topic
        .strip_prefix("lime/telemetry/")
        .filter(|s| !s.is_empty() && !s.contains('/'))
}

/// The reply topic of a request that named none.
pub fn response(id: &str) -> String {
    format!("{RESPONSE_PREFIX}{id}")
}

/// Where a lime tool connected as `client_id` takes the answers to all its
/// requests, told apart by their correlation data: under its login's name when
/// it has one (where a robot login may read), else under its own.
pub fn tool_replies(user: Option<&str>, client_id: &str) -> String {
    match user {
        Some(user) => format!("{RESPONSE_PREFIX}{user}/{client_id}"),
        None => format!("{RESPONSE_PREFIX}{client_id}/answers"),
    }
}

/// Where lime-broker forwards a request published by `user`.
pub fn request_from(user: &str) -> String {
    format!("{REQUEST}/{user}")
}

/// Where lime-broker forwards a cancel published by `user`.
pub fn cancel_from(user: &str) -> String {
    format!("{CANCEL}/{user}")
}

/// The user a `lime/cancel/<user>` topic was published by.
pub fn sender_of_cancel(topic: &str) -> Option<&str> {
    topic
        .strip_prefix("lime/cancel/")
        .filter(|u| is_topic_level(u))
}

/// The user a `lime/request/<user>` topic was published by.
pub fn sender_of_request(topic: &str) -> Option<&str> {
    topic
        .strip_prefix("lime/request/")
        .filter(|u| is_topic_level(u))
}

/// The topics a robot may read its answers on: `lime/response/<user>/…`.
pub fn user_responses(user: &str) -> String {
    format!("{RESPONSE_PREFIX}{user}/")
}

/// The reply topic of a robot's request that named none.
pub fn user_response(user: &str, id: &str) -> String {
    format!("{RESPONSE_PREFIX}{user}/{id}")
}

/// A robot's errors that cannot be addressed to any reply topic.
pub fn user_errors(user: &str) -> String {
    format!("{ERROR}/{user}")
}

/// The stage a `lime/status/<stage>` topic is about.
pub fn stage_of_status(topic: &str) -> Option<&str> {
    topic
        .strip_prefix("lime/status/")
        .filter(|s| !s.is_empty() && !s.contains('/'))
}

/// Whether `name` can be one level of a topic: stage names and request ids end up
/// in topics, where `/` would add levels and `+`, `#` are wildcards.
pub fn is_topic_level(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && !name
            .chars()
            .any(|c| matches!(c, '/' | '+' | '#' | '\0') || c.is_control())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_topics_round_trip() {
        assert_eq!(stage_of_status(&status("s1")), Some("s1"));
        assert_eq!(stage_of_status("lime/status/a/b"), None);
        assert_eq!(stage_of_status("lime/status/"), None);
    }

    #[test]
    fn request_senders_round_trip() {
        assert_eq!(sender_of_request(&request_from("robot-7")), Some("robot-7"));
        assert_eq!(sender_of_request(REQUEST), None);
        assert_eq!(sender_of_request("lime/request/a/b"), None);
        assert_eq!(sender_of_request("lime/request/"), None);
        assert!(user_response("r", "1").starts_with(&user_responses("r")));
    }

    #[test]
    fn topic_levels() {
        assert!(is_topic_level("req-42"));
        for bad in ["", "a/b", "a+", "#", "a\nb"] {
            assert!(!is_topic_level(bad), "{bad:?}");
        }
    }
}
