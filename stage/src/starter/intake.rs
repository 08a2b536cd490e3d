//! From a publish on `lime/request` to a queued job or an error reply: size limit,
//! JSON, validation, chat template, tokenization, and the context check. Runs before
//! anything is queued, so a bad request costs the cluster nothing.
//!
//! Where the answers go depends on who sent the request: one lime-broker
//! forwarded for a robot login (on `lime/request/<user>`) is answered only under
//! `lime/response/<user>/`, the topics that robot may read, so that no robot can
//! have the starter publish on another's replies or on the control topics.

use crate::starter::chat::ChatTemplate;
use crate::starter::recent::{fingerprint, Seen, SharedIds};
use lime_kernels::TextTokenizer;
use lime_schemas::request::Input;
use lime_schemas::{topics, ErrorCode, ErrorReply, Invalid, Request, SamplingParams};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// Where replies to one request go: a topic, with the MQTT 5 correlation data to
/// echo if the request carried any.
#[derive(Debug, Clone, PartialEq)]
pub struct ReplyTo {
    /// The MQTT topic every reply to the request is published on.
    pub topic: String,
    /// Echoed in each reply so that the requester can match it; `None` when the
    /// request carried none.
    pub correlation: Option<Vec<u8>>,
}

/// Who sent a request, as far as its reply topics go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sender<'a> {
    /// Published on `lime/request` itself (by a service login, or with no
    /// logins at all): the reply topic it names is used as it is.
    Trusted,
    /// A robot login, named by lime-broker: answers stay under
    /// `lime/response/<user>/`.
    Robot(&'a str),
}

impl Sender<'_> {
    /// The sender of a publish on `topic`, if it is a request topic.
    pub fn of_topic(topic: &str) -> Option<Sender<'_>> {
        if topic == topics::REQUEST {
            Some(Sender::Trusted)
        } else {
            topics::sender_of_request(topic).map(Sender::Robot)
        }
    }

    /// The sender of a publish on `topic`, if it is a cancel topic.
    pub fn of_cancel_topic(topic: &str) -> Option<Sender<'_>> {
        if topic == topics::CANCEL {
            Some(Sender::Trusted)
        } else {
            topics::sender_of_cancel(topic).map(Sender::Robot)
        }
    }

    /// Why this sender may not be answered on `topic`, if it may not. Whoever
    /// asks, no answer goes to a lime topic but a response topic: generated
    /// text on the plan, a status or the request topic would be taken for
    /// the control plane's own.
    fn refuses_reply_on(self, topic: &str) -> Option<Invalid> {
        let Sender::Robot(user) = self else {
            return (topic.starts_with(topics::PREFIX) && !topic.starts_with(topics::RESPONSE_PREFIX))
                .then(|| {
                    Invalid::new(
                        ErrorCode::ForbiddenReplyTopic,
                        format!(
                            "answers never go to {topic:?}: name a reply topic outside lime/ or under {:?}",
                            topics::RESPONSE_PREFIX
                        ),
                    )
                });
        };
        let mine = topics::user_responses(user);
        (!topic.starts_with(&mine)).then(|| {
            Invalid::new(
                ErrorCode::ForbiddenReplyTopic,
                format!(
                    "{user:?} may not read {topic:?}: name a reply topic under {mine:?}, or none"
                ),
            )
        })
    }

    fn default_reply(self, id: &str) -> ReplyTo {
        let topic = match self {
            Sender::Trusted => topics::response(id),
            Sender::Robot(user) => topics::user_response(user, id),
        };
        ReplyTo {
            topic,
            correlation: None,
        }
    }

    /// Where errors go that no reply topic can be found for.
    fn nowhere(self) -> ReplyTo {
        let topic = match self {
            Sender::Trusted => topics::ERROR.to_owned(),
            Sender::Robot(user) => topics::user_errors(user),
        };
        ReplyTo {
            topic,
            correlation: None,
        }
    }

    /// What the starter remembers an id under: each robot has its own ids.
    pub fn id_key(self, id: &str) -> String {
        match self {
            Sender::Trusted => id.to_owned(),
            Sender::Robot(user) => format!("{user}/{id}"),
        }
    }
}

/// Where a request's replies go: the topic it names if its sender may use it,
/// else the default one for its id (if it has a usable id).
struct Route {
    reply: Option<ReplyTo>,
    /// Why the named topic may not be used, when it may not.
    forbidden: Option<Invalid>,
}

impl Route {
    fn new(sender: Sender<'_>, named: Option<ReplyTo>, id: Option<&str>) -> Self {
        let id = id.filter(|i| topics::is_topic_level(i));
        let forbidden = named
            .as_ref()
            .and_then(|r| sender.refuses_reply_on(&r.topic));
        match named {
            Some(r) if forbidden.is_none() => Route {
                reply: Some(r),
                forbidden,
            },
            _ => Route {
                reply: id.map(|i| sender.default_reply(i)),
                forbidden,
            },
        }
    }
}

/// A request that passed every check, tokenized and ready to schedule.
#[derive(Debug)]
pub struct Job {
    /// The request's own id, or one the starter made up; every reply carries it.
    pub id: String,
    /// What the id is remembered under until the answer ends.
    pub id_key: String,
    /// Where the tokens and the final message go.
    pub reply: ReplyTo,
    /// The prompt's token ids, chat template applied; never empty.
    pub prompt: Vec<u32>,
    /// Tokens to generate at most; with the prompt it fits the model's context.
    pub max_tokens: usize,
    /// How the next token is drawn from the logits.
    pub sampling: SamplingParams,
    /// Generation ends when the text contains one of these.
    pub stops: Vec<String>,
    /// Keep generating past end-of-sequence tokens, up to `max_tokens`.
    pub ignore_eos: bool,
    /// Put the generated token ids in the final message.
    pub return_token_ids: bool,
    /// Put the logits the last token was drawn from in the final message.
    pub return_logits: bool,
    /// When the MQTT loop took the request; queueing and first-token times
    /// count from here.
    pub received: Instant,
    /// When the answer must be complete, or the request ends with
    /// `deadline_exceeded`.
    pub deadline: Instant,
    /// Waiting requests are admitted by priority first, then oldest first.
    pub priority: lime_schemas::Priority,
}

/// A refused request and where to say so.
#[derive(Debug)]
pub struct Refusal {
    /// The request's reply topic when one could be found and used, else the
    /// sender's error topic.
    pub reply: ReplyTo,
    /// What the requester is told: the request's id (if usable), a code and why.
    pub error: ErrorReply,
}

/// What the starter needs to check and tokenize requests.
pub struct Intake {
    tokenizer: std::sync::Arc<TextTokenizer>,
    template: Option<ChatTemplate>,
    max_context: usize,
    max_request_bytes: usize,
    default_deadline_ms: u64,
    id_prefix: String,
    next_id: AtomicU64,
    /// Ids robots gave the requests in flight (generated ids never repeat).
    recent: SharedIds,
}

impl Intake {
    /// `max_context` is the model's context in tokens; `max_request_bytes` and
    /// `default_deadline_ms` come from [`crate::config::StarterConfig`].
    pub fn new(
        tokenizer: std::sync::Arc<TextTokenizer>,
        template: Option<ChatTemplate>,
        max_context: usize,
        max_request_bytes: usize,
        default_deadline_ms: u64,
        recent: SharedIds,
    ) -> Self {
        let started = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or_default();
        Self {
            tokenizer,
            template,
            max_context,
            max_request_bytes,
            default_deadline_ms,
            id_prefix: format!("{started:x}"),
            next_id: AtomicU64::new(0),
            recent,
        }
    }

    /// The refusal of a request the starter has no room to read now
    /// (`overloaded`), found from a quick look at its id and reply topic.
    pub fn overloaded(
        &self,
        payload: &[u8],
        sender: Sender<'_>,
        response_topic: Option<&str>,
        correlation: Option<&[u8]>,
        why: &str,
    ) -> Box<Refusal> {
        unread(
            payload,
            sender,
            v5_reply(response_topic, correlation),
            Invalid::new(ErrorCode::Overloaded, why),
        )
    }

    /// Reads a cancel from `sender`: the key its request is remembered under
    /// (a robot can only name its own requests), or why it is refused.
    pub fn cancel(&self, payload: &[u8], sender: Sender<'_>) -> Result<String, Box<Refusal>> {
        let refuse = |id: Option<String>, message: String| {
            let id = id.filter(|i| topics::is_topic_level(i));
            Box::new(Refusal {
                reply: id
                    .as_deref()
                    .map_or_else(|| sender.nowhere(), |i| sender.default_reply(i)),
                error: ErrorReply::new(id, ErrorCode::InvalidRequest, message),
            })
        };
        if payload.len() > 4096 {
            return Err(refuse(
                None,
                "a cancel is `{\"id\": ...}`, at most 4 KiB".into(),
            ));
        }
        match serde_json::from_slice::<lime_schemas::Cancel>(payload) {
            Ok(c) if topics::is_topic_level(&c.id) => Ok(sender.id_key(&c.id)),
            Ok(c) => Err(refuse(None, format!("{:?} is not a request id", c.id))),
            Err(e) => Err(refuse(
                peek_id_and_reply(payload).0,
                format!("a cancel is `{{\"id\": ...}}`: {e}"),
            )),
        }
    }

    /// Checks one publish from `sender`. `response_topic`/`correlation` are its
    /// MQTT 5 properties. `Ok(None)`: the same request was taken lately (a QoS 1
    /// redelivery).
    pub fn accept(
        &self,
        payload: &[u8],
        sender: Sender<'_>,
        response_topic: Option<&str>,
        correlation: Option<&[u8]>,
        received: Instant,
    ) -> Result<Option<Job>, Box<Refusal>> {
        let v5_reply = v5_reply(response_topic, correlation);
        let refuse = |reply: Option<ReplyTo>, id: Option<String>, e: Invalid| {
            let id = id.filter(|i| topics::is_topic_level(i));
            Box::new(Refusal {
                reply: reply.unwrap_or_else(|| sender.nowhere()),
                error: ErrorReply::new(id, e.code, e.message),
            })
        };
        if payload.len() > self.max_request_bytes {
            return Err(unread(
                payload,
                sender,
                v5_reply,
                Invalid::new(
                    ErrorCode::PayloadTooLarge,
                    format!(
                        "request of {} bytes is larger than the limit of {} bytes",
                        payload.len(),
                        self.max_request_bytes
                    ),
                ),
            ));
        }
        let request = match Request::parse(payload) {
            Ok(r) => r,
            Err(e) => return Err(unread(payload, sender, v5_reply, e)),
        };
        let valid_reply_to = request
            .reply_to
            .clone()
            .filter(|t| lime_schemas::request::is_publish_topic(t));
        let route = Route::new(
            sender,
            v5_reply.or_else(|| named(valid_reply_to)),
            request.id.as_deref(),
        );
        if let Err(e) = request.validate() {
            return Err(refuse(route.reply, request.id.clone(), e));
        }
        let id = request.id.clone().unwrap_or_else(|| {
            let n = self.next_id.fetch_add(1, Ordering::Relaxed);
            format!("{}-{n}", self.id_prefix)
        });
        let reply = route.reply.unwrap_or_else(|| sender.default_reply(&id));
        if let Some(e) = route.forbidden {
            return Err(refuse(Some(reply), Some(id), e));
        }
        let id_key = sender.id_key(&id);
        let job = match self.job(
            &request,
            id.clone(),
            id_key.clone(),
            reply.clone(),
            received,
        ) {
            Ok(job) => job,
            Err(e) => return Err(refuse(Some(reply), Some(id), e)),
        };
        if request.id.is_some() {
            let print = fingerprint(payload, response_topic, correlation);
            let seen = self
                .recent
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .note(&id_key, print, received);
            match seen {
                Seen::New => {}
                Seen::Redelivery => return Ok(None),
                Seen::Conflict => {
                    return Err(refuse(
                        Some(reply),
                        Some(id.clone()),
                        Invalid::new(
                            ErrorCode::DuplicateId,
                            format!(
                                "another request with id {id:?} is being answered; give each request its own id"
                            ),
                        ),
                    ))
                }
            }
        }
        Ok(Some(job))
    }

    fn job(
        &self,
        request: &Request,
        id: String,
        id_key: String,
        reply: ReplyTo,
        received: Instant,
    ) -> Result<Job, Invalid> {
        let internal = |e: lime_kernels::Error| Invalid::new(ErrorCode::Internal, e.to_string());
        let prompt = match request.input()? {
            Input::Prompt(text) => self.tokenizer.encode(text, true).map_err(internal)?,
            Input::Chat(messages) => {
                let Some(template) = &self.template else {
                    return Err(Invalid::new(
                        ErrorCode::InvalidRequest,
                        "this model has no chat template: send `prompt` instead of `messages`",
                    ));
                };
                let text = template.render(messages).map_err(|e| {
                    Invalid::new(
                        ErrorCode::InvalidRequest,
                        format!("the chat template refused the messages: {e}"),
                    )
                })?;
                // The template writes the special tokens itself.
                self.tokenizer.encode(&text, false).map_err(internal)?
            }
        };
        if prompt.is_empty() {
            return Err(Invalid::new(
                ErrorCode::InvalidRequest,
                "the prompt has no tokens",
            ));
        }
        let max_tokens = request.max_tokens()? as usize;
        if prompt.len() + max_tokens > self.max_context {
            return Err(Invalid::new(
                ErrorCode::ContextLengthExceeded,
                format!(
                    "prompt ({} tokens) + max_tokens ({max_tokens}) exceeds the model's context of {} tokens",
                    prompt.len(),
                    self.max_context
                ),
            ));
        }
        Ok(Job {
            id,
            id_key,
            reply,
            prompt,
            max_tokens,
            sampling: request.sampling()?,
            stops: request.stops()?,
            ignore_eos: request.ignore_eos,
            return_token_ids: request.return_token_ids,
            return_logits: request.return_logits,
            received,
            deadline: received
                + std::time::Duration::from_millis(
                    request.deadline_ms.unwrap_or(self.default_deadline_ms),
                ),
            priority: request.priority.unwrap_or_default(),
        })
    }
}

/// The MQTT 5 response topic (and correlation data) a request carried, if
/// one can be published to.
fn v5_reply(response_topic: Option<&str>, correlation: Option<&[u8]>) -> Option<ReplyTo> {
    response_topic
        .filter(|t| lime_schemas::request::is_publish_topic(t))
        .map(|t| ReplyTo {
            topic: t.to_owned(),
            correlation: correlation.map(<[u8]>::to_vec),
        })
}

/// The refusal of a payload refused before (or instead of) being read as a
/// request: its id and reply topic come from a quick look, if it has them.
fn unread(
    payload: &[u8],
    sender: Sender<'_>,
    v5_reply: Option<ReplyTo>,
    e: Invalid,
) -> Box<Refusal> {
    let (id, reply_to) = peek_id_and_reply(payload);
    let route = Route::new(sender, v5_reply.or_else(|| named(reply_to)), id.as_deref());
    Box::new(Refusal {
        reply: route.reply.unwrap_or_else(|| sender.nowhere()),
        error: ErrorReply::new(id, e.code, e.message),
    })
}

fn named(topic: Option<String>) -> Option<ReplyTo> {
    topic.map(|topic| ReplyTo {
        topic,
        correlation: None,
    })
}

/// The id and `reply_to` of a payload that failed to parse as a request, if it is
/// at least a JSON object that has them.
fn peek_id_and_reply(payload: &[u8]) -> (Option<String>, Option<String>) {
    let Ok(serde_json::Value::Object(map)) = serde_json::from_slice(payload) else {
        return (None, None);
    };
    let id = map
        .get("id")
        .and_then(|v| v.as_str())
        .filter(|i| topics::is_topic_level(i))
        .map(str::to_owned);
    let reply_to = map
        .get("reply_to")
        .and_then(|v| v.as_str())
        .filter(|t| lime_schemas::request::is_publish_topic(t))
        .map(str::to_owned);
    (id, reply_to)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn named(topic: &str) -> Option<ReplyTo> {
        Some(ReplyTo {
            topic: topic.into(),
            correlation: None,
        })
    }

    #[test]
    fn a_trusted_sender_is_answered_where_it_asks() {
        let r = Route::new(Sender::Trusted, named("ops/answers"), Some("7"));
        assert_eq!(r.reply.unwrap().topic, "ops/answers");
        assert!(r.forbidden.is_none());
        let r = Route::new(Sender::Trusted, None, Some("7"));
        assert_eq!(r.reply.unwrap().topic, "lime/response/7");
        let r = Route::new(Sender::Trusted, named("lime/response/ops/7"), Some("7"));
        assert!(r.forbidden.is_none());
        for control in [
            "lime/control/plan",
            "lime/status/s0",
            "lime/profile/s1",
            "lime/request",
            "lime/telemetry/s0",
        ] {
            let r = Route::new(Sender::Trusted, named(control), Some("7"));
            assert_eq!(r.reply.unwrap().topic, "lime/response/7", "{control}");
            let e = r.forbidden.expect(control);
            assert_eq!(e.code, ErrorCode::ForbiddenReplyTopic);
        }
        assert_eq!(Sender::Trusted.nowhere().topic, "lime/error");
    }

    #[test]
    fn a_robot_is_answered_only_under_its_own_topics() {
        let robot = Sender::Robot("arm-2");
        let r = Route::new(robot, named("lime/response/arm-2/grip"), Some("7"));
        assert_eq!(r.reply.unwrap().topic, "lime/response/arm-2/grip");
        assert!(r.forbidden.is_none());
        let r = Route::new(robot, None, Some("7"));
        assert_eq!(r.reply.unwrap().topic, "lime/response/arm-2/7");
        for elsewhere in [
            "lime/control/plan",
            "lime/response/arm-3/7",
            "lime/response/arm-2",
            "lime/response/arm-22/7",
        ] {
            let r = Route::new(robot, named(elsewhere), Some("7"));
            assert_eq!(
                r.reply.unwrap().topic,
                "lime/response/arm-2/7",
                "{elsewhere}"
            );
            let e = r.forbidden.expect(elsewhere);
            assert_eq!(e.code, ErrorCode::ForbiddenReplyTopic);
        }
        let r = Route::new(robot, named("lime/control/plan"), None);
        assert!(r.reply.is_none(), "no id: the refusal goes nowhere-topic");
        assert_eq!(robot.nowhere().topic, "lime/error/arm-2");
        assert_ne!(robot.id_key("7"), Sender::Robot("arm-3").id_key("7"));
    }
}
