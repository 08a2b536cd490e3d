//! What a robot publishes on `lime/request`, and the checks a request passes before
//! it is queued.

use crate::sampling::SamplingParams;
use crate::topics;
use serde::{Deserialize, Serialize};

/// The most tokens one request may ask for, whatever the model's context.
pub const MAX_TOKENS_LIMIT: u32 = 1 << 20;
/// `max_tokens` when a request gives none.
pub const DEFAULT_MAX_TOKENS: u32 = 256;
/// At most this many stop strings, each at most `MAX_STOP_LEN` bytes.
pub const MAX_STOPS: usize = 16;
/// The longest stop string, in bytes.
pub const MAX_STOP_LEN: usize = 256;

/// A generation request. Unknown fields are refused so that a misspelt parameter
/// is an error, not a silently different answer.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Request {
    /// Chosen by the sender to match replies; the starter makes one up if absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// Plain text, tokenized as is (with the model's BOS token).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt: Option<String>,
    /// A chat, rendered with the checkpoint's chat template.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub messages: Option<Vec<ChatMessage>>,
    /// Tokens to generate at most; [`DEFAULT_MAX_TOKENS`] when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u32>,
    /// Softmax temperature; absent, 0: greedy decoding (see [`SamplingParams`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f32>,
    /// Nucleus threshold in (0, 1]; absent, 1: no filter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f32>,
    /// How many of the most likely tokens to keep; absent or 0, all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_k: Option<usize>,
    /// Penalty on tokens already in the sequence; absent, 1: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repetition_penalty: Option<f32>,
    /// Seed of the sampler's random stream, so that a sampled answer can be
    /// reproduced; absent, 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    /// Generation ends when the text contains one of these; it is not returned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop: Option<Stop>,
    /// Where to send replies when the request carries no MQTT 5 response topic.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply_to: Option<String>,
    /// Keep generating past end-of-sequence tokens (benchmarks, exactness tests).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub ignore_eos: bool,
    /// Put the generated token ids in the final message.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub return_token_ids: bool,
    /// Put the logits the last token was drawn from in the final message.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub return_logits: bool,
    /// Give up with `deadline_exceeded` if the answer is not complete this many
    /// milliseconds after the request arrived (the starter's
    /// `default_deadline_ms` when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline_ms: Option<u64>,
    /// `high` requests are admitted before `normal` ones, and those before
    /// `low` ones; within a priority, oldest first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<Priority>,
}

/// The longest deadline a request may ask for: a day.
pub const MAX_DEADLINE_MS: u64 = 86_400_000;

/// How soon a request is admitted, next to the others waiting.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Priority {
    /// Admitted after every waiting `normal` and `high` request.
    Low,
    /// What a request without `priority` gets.
    #[default]
    Normal,
    /// Admitted ahead of every other waiting request.
    High,
}

/// What a robot publishes on `lime/cancel`: stop the request it sent with this
/// id (its KV is freed round the ring). Only the login that asked may cancel.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Cancel {
    /// The id the request carried, or was given in its replies.
    pub id: String,
}

/// One turn of a chat.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChatMessage {
    /// Who speaks, as the chat template knows it: usually `system`, `user` or
    /// `assistant`.
    pub role: String,
    /// What that turn says.
    pub content: String,
}

/// `"stop": "x"` or `"stop": ["x", "y"]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    /// A single stop string.
    One(String),
    /// Several; any one ends generation.
    Many(Vec<String>),
}

impl Stop {
    /// Either form as a list.
    pub fn to_vec(&self) -> Vec<String> {
        match self {
            Stop::One(s) => vec![s.clone()],
            Stop::Many(v) => v.clone(),
        }
    }
}

/// What the model is asked to continue.
#[derive(Debug, Clone, PartialEq)]
pub enum Input<'a> {
    /// Plain text, tokenized as is.
    Prompt(&'a str),
    /// Turns to render with the checkpoint's chat template.
    Chat(&'a [ChatMessage]),
}

/// A request refused before it ran: becomes an error reply.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{message}")]
pub struct Invalid {
    /// The code the error reply carries.
    pub code: crate::ErrorCode,
    /// Why, for the sender.
    pub message: String,
}

impl Invalid {
    /// A refusal with `code`, explained by `message`.
    pub fn new(code: crate::ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

impl Request {
    /// Parses a payload, turning serde's complaint into a message for the sender.
    pub fn parse(payload: &[u8]) -> Result<Self, Invalid> {
        let text = std::str::from_utf8(payload)
            .map_err(|e| Invalid::new(crate::ErrorCode::BadJson, format!("not UTF-8: {e}")))?;
        let mut de = serde_json::Deserializer::from_str(text);
        let request = serde_path_to_error::deserialize(&mut de).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner();
            let code = if inner.is_data() {
                crate::ErrorCode::InvalidRequest
            } else {
                crate::ErrorCode::BadJson
            };
            let at = if path == "." || code == crate::ErrorCode::BadJson {
                String::new()
            } else {
                format!(" (at `{path}`)")
            };
            Invalid::new(code, format!("request is not valid: {inner}{at}"))
        })?;
        de.end().map_err(|e| {
            Invalid::new(
                crate::ErrorCode::BadJson,
                format!("request is not valid: {e}"),
            )
        })?;
        Ok(request)
    }

    /// The prompt or the chat; exactly one must be given.
    pub fn input(&self) -> Result<Input<'_>, Invalid> {
        match (&self.prompt, &self.messages) {
            (Some(p), None) if !p.is_empty() => Ok(Input::Prompt(p)),
            (None, Some(m)) if !m.is_empty() => Ok(Input::Chat(m)),
            (Some(_), Some(_)) => Err(invalid("give either `prompt` or `messages`, not both")),
            (Some(_), None) => Err(invalid("`prompt` is empty")),
            (None, Some(_)) => Err(invalid("`messages` is empty")),
            (None, None) => Err(invalid("the request needs a `prompt` or `messages`")),
        }
    }

    /// `max_tokens`, defaulted and bounded.
    pub fn max_tokens(&self) -> Result<u32, Invalid> {
        match self.max_tokens.unwrap_or(DEFAULT_MAX_TOKENS) {
            0 => Err(invalid("`max_tokens` must be at least 1")),
            n if n > MAX_TOKENS_LIMIT => Err(invalid(format!(
                "`max_tokens` {n} is more than the limit of {MAX_TOKENS_LIMIT}"
            ))),
            n => Ok(n),
        }
    }

    /// The sampling parameters, defaulted and validated.
    pub fn sampling(&self) -> Result<SamplingParams, Invalid> {
        let d = SamplingParams::default();
        let p = SamplingParams {
            temperature: self.temperature.unwrap_or(d.temperature),
            top_p: self.top_p.unwrap_or(d.top_p),
            top_k: self.top_k.unwrap_or(d.top_k),
            repetition_penalty: self.repetition_penalty.unwrap_or(d.repetition_penalty),
            seed: self.seed.unwrap_or(d.seed),
        };
        p.validate().map_err(|e| invalid(e.to_string()))?;
        Ok(p)
    }

    /// The stop strings, bounded in number and length.
    pub fn stops(&self) -> Result<Vec<String>, Invalid> {
        let stops = self.stop.as_ref().map(Stop::to_vec).unwrap_or_default();
        if stops.len() > MAX_STOPS {
            return Err(invalid(format!("at most {MAX_STOPS} stop strings")));
        }
        if stops.iter().any(|s| s.is_empty() || s.len() > MAX_STOP_LEN) {
            return Err(invalid(format!(
                "stop strings must be 1 to {MAX_STOP_LEN} bytes"
            )));
        }
        Ok(stops)
    }

    /// Checks everything that does not need the model; the starter checks the
    /// length against the context after tokenizing.
    pub fn validate(&self) -> Result<(), Invalid> {
        if let Some(id) = &self.id {
            if !topics::is_topic_level(id) {
                return Err(invalid(
                    "`id` must be 1 to 128 characters without '/', '+', '#' or control characters",
                ));
            }
        }
        if let Some(topic) = &self.reply_to {
            if !is_publish_topic(topic) {
                return Err(invalid("`reply_to` must be a topic without wildcards"));
            }
        }
        if let Some(ms) = self.deadline_ms {
            if ms == 0 || ms > MAX_DEADLINE_MS {
                return Err(invalid(format!(
                    "`deadline_ms` must be 1 to {MAX_DEADLINE_MS} (a day)"
                )));
            }
        }
        self.input()?;
        self.max_tokens()?;
        self.sampling()?;
        self.stops()?;
        Ok(())
    }
}

/// Whether a client may publish to `topic`.
pub fn is_publish_topic(topic: &str) -> bool {
    !topic.is_empty()
        && topic.len() <= 1024
        && !topic.contains(['+', '#', '\0'])
        && !topic.starts_with('$')
}

fn invalid(message: impl Into<String>) -> Invalid {
    Invalid::new(crate::ErrorCode::InvalidRequest, message)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorCode;

    #[test]
    fn parses_a_minimal_request() {
        let r = Request::parse(br#"{"prompt":"hi"}"#).unwrap();
        r.validate().unwrap();
        assert_eq!(r.max_tokens().unwrap(), DEFAULT_MAX_TOKENS);
        assert!(r.sampling().unwrap().is_greedy());
    }

    #[test]
    fn priorities_order_and_parse() {
        let r = Request::parse(br#"{"prompt":"hi","priority":"high","deadline_ms":500}"#).unwrap();
        r.validate().unwrap();
        assert_eq!(r.priority, Some(Priority::High));
        assert!(Priority::High > Priority::Normal && Priority::Normal > Priority::Low);
        let e = Request::parse(br#"{"prompt":"hi","priority":"urgent"}"#).unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidRequest);
    }

    #[test]
    fn stop_is_one_or_many() {
        let r = Request::parse(br#"{"prompt":"hi","stop":"\n"}"#).unwrap();
        assert_eq!(r.stops().unwrap(), vec!["\n"]);
        let r = Request::parse(br#"{"prompt":"hi","stop":["a","b"]}"#).unwrap();
        assert_eq!(r.stops().unwrap(), vec!["a", "b"]);
    }

    #[test]
    fn refusals_say_why() {
        let cases: &[(&[u8], ErrorCode, &str)] = &[
            (b"{not json", ErrorCode::BadJson, "not valid"),
            (
                br#"{"prompt":"x","colour":1}"#,
                ErrorCode::InvalidRequest,
                "colour",
            ),
            (
                br#"{"prompt":"x","max_tokens":-3}"#,
                ErrorCode::InvalidRequest,
                "-3",
            ),
            (b"\xff\xfe", ErrorCode::BadJson, "UTF-8"),
        ];
        for (payload, code, needle) in cases {
            let e = Request::parse(payload).unwrap_err();
            assert_eq!(e.code, *code);
            assert!(e.message.contains(needle), "{}", e.message);
        }
        let checks: &[(&str, &str)] = &[
            (r#"{"max_tokens":3}"#, "needs a `prompt`"),
            (r#"{"prompt":"x","max_tokens":0}"#, "at least 1"),
            (r#"{"prompt":"x","max_tokens":4000000000}"#, "limit"),
            (r#"{"prompt":"x","temperature":-1}"#, "temperature"),
            (r#"{"prompt":"x","id":"a/b"}"#, "`id`"),
            (r#"{"prompt":"x","reply_to":"a/#"}"#, "reply_to"),
            (r#"{"prompt":"x","messages":[]}"#, "not both"),
            (r#"{"prompt":"x","deadline_ms":0}"#, "deadline_ms"),
        ];
        for (payload, needle) in checks {
            let e = Request::parse(payload.as_bytes())
                .unwrap()
                .validate()
                .unwrap_err();
            assert!(e.message.contains(needle), "{payload}: {}", e.message);
        }
    }
}
