//! From a publish on `lime/request` to a queued job or an error reply: size limit,
//! JSON, validation, chat template, tokenization, and the context check. Runs before
//! anything is queued, so a bad request costs the cluster nothing.

use crate::chat::ChatTemplate;
use crate::recent::{fingerprint, Seen, SharedIds};
use lime_kernels::TextTokenizer;
use lime_schemas::request::Input;
use lime_schemas::{topics, ErrorCode, ErrorReply, Invalid, Request, SamplingParams};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// Where replies to one request go: a topic, with the MQTT 5 correlation data to
/// echo if the request carried any.
#[derive(Debug, Clone, PartialEq)]
pub struct ReplyTo {
    pub topic: String,
    pub correlation: Option<Vec<u8>>,
}

/// A request that passed every check, tokenized and ready to schedule.
#[derive(Debug)]
pub struct Job {
    pub id: String,
    pub reply: ReplyTo,
    pub prompt: Vec<u32>,
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    pub stops: Vec<String>,
    pub ignore_eos: bool,
    pub return_token_ids: bool,
    pub return_logits: bool,
    pub received: Instant,
}

/// A refused request and where to say so.
#[derive(Debug)]
pub struct Refusal {
    pub reply: ReplyTo,
    pub error: ErrorReply,
}

/// What the starter needs to check and tokenize requests.
pub struct Intake {
    tokenizer: std::sync::Arc<TextTokenizer>,
    template: Option<ChatTemplate>,
    max_context: usize,
    max_request_bytes: usize,
    id_prefix: String,
    next_id: AtomicU64,
    /// Ids robots gave the requests in flight (generated ids never repeat).
    recent: SharedIds,
}

impl Intake {
    pub fn new(
        tokenizer: std::sync::Arc<TextTokenizer>,
        template: Option<ChatTemplate>,
        max_context: usize,
        max_request_bytes: usize,
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
            id_prefix: format!("{started:x}"),
            next_id: AtomicU64::new(0),
            recent,
        }
    }

    /// Checks one publish. `response_topic`/`correlation` are its MQTT 5 properties.
    /// `Ok(None)`: the same request was taken lately (a QoS 1 redelivery).
    pub fn accept(
        &self,
        payload: &[u8],
        response_topic: Option<&str>,
        correlation: Option<&[u8]>,
        received: Instant,
    ) -> Result<Option<Job>, Box<Refusal>> {
        let v5_reply = response_topic
            .filter(|t| lime_schemas::request::is_publish_topic(t))
            .map(|t| ReplyTo {
                topic: t.to_owned(),
                correlation: correlation.map(<[u8]>::to_vec),
            });
        if payload.len() > self.max_request_bytes {
            let (id, reply_to) = peek_id_and_reply(payload);
            let reply = v5_reply.or_else(|| reply_topic(id.as_deref(), reply_to));
            return Err(refuse(
                reply,
                id,
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
            Err(e) => {
                let (id, reply_to) = peek_id_and_reply(payload);
                let reply = v5_reply.or_else(|| reply_topic(id.as_deref(), reply_to));
                return Err(refuse(reply, id, e));
            }
        };
        let valid_reply_to = request
            .reply_to
            .clone()
            .filter(|t| lime_schemas::request::is_publish_topic(t));
        let id_ok = request.id.as_deref().filter(|i| topics::is_topic_level(i));
        let reply = v5_reply.or_else(|| reply_topic(id_ok, valid_reply_to));
        if let Err(e) = request.validate() {
            return Err(refuse(reply, request.id.clone(), e));
        }
        let id = request.id.clone().unwrap_or_else(|| {
            let n = self.next_id.fetch_add(1, Ordering::Relaxed);
            format!("{}-{n}", self.id_prefix)
        });
        let reply = reply.unwrap_or_else(|| ReplyTo {
            topic: topics::response(&id),
            correlation: None,
        });
        let job = match self.job(&request, id.clone(), reply.clone(), received) {
            Ok(job) => job,
            Err(e) => return Err(refuse(Some(reply), Some(id), e)),
        };
        if request.id.is_some() {
            let print = fingerprint(payload, response_topic, correlation);
            let seen = self
                .recent
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .note(&id, print, received);
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
            reply,
            prompt,
            max_tokens,
            sampling: request.sampling()?,
            stops: request.stops()?,
            ignore_eos: request.ignore_eos,
            return_token_ids: request.return_token_ids,
            return_logits: request.return_logits,
            received,
        })
    }
}

fn reply_topic(id: Option<&str>, reply_to: Option<String>) -> Option<ReplyTo> {
    let topic = reply_to.or_else(|| id.map(topics::response))?;
    Some(ReplyTo {
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

fn refuse(reply: Option<ReplyTo>, id: Option<String>, e: Invalid) -> Box<Refusal> {
    let id = id.filter(|i| topics::is_topic_level(i));
    Box::new(Refusal {
        reply: reply.unwrap_or(ReplyTo {
            topic: topics::ERROR.to_owned(),
            correlation: None,
        }),
        error: ErrorReply::new(id, e.code, e.message),
    })
}
