//! What the starter publishes on a request's reply topic: text pieces as they are
//! generated, then one final message; or one error.

use serde::{Deserialize, Serialize};

/// A piece of generated text. `seq` counts pieces from 0 so a reader can spot gaps.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TextPiece {
    /// The request's id, so that readers sharing a reply topic can sort pieces.
    pub id: String,
    /// Position among the request's pieces.
    pub seq: u32,
    /// Text generated since the previous piece; the pieces joined are the answer.
    pub text: String,
    /// Always false: the [`Final`] message ends the stream.
    pub done: bool,
}

/// The last message of a successful request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Final {
    /// The request's id, as on its text pieces.
    pub id: String,
    /// Always true, so that a reader checking only `done` sees the end.
    pub done: bool,
    /// Whether a stop condition or `max_tokens` ended the generation.
    pub finish_reason: FinishReason,
    /// Token counts, for accounting.
    pub usage: Usage,
    /// Latencies measured at the starter.
    pub timing: Timing,
    /// Every generated token id, when the request set `return_token_ids`: what
    /// exactness tests compare.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_ids: Option<Vec<u32>>,
    /// The logits the last token was drawn from (f32, exact through JSON).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logits: Option<Vec<f32>>,
}

/// Why a successful generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// An end-of-sequence token or a stop string.
    Stop,
    /// `max_tokens` were generated.
    Length,
}

/// Token counts of a finished request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    /// Tokens of the prompt as tokenized, after any chat template.
    pub prompt_tokens: u32,
    /// Tokens generated.
    pub completion_tokens: u32,
    /// Prompt and completion together.
    pub total_tokens: u32,
}

/// Milliseconds unless named otherwise, measured at the starter from the moment the
/// request arrived.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Timing {
    /// Waiting for a place in the batch.
    pub queue_ms: f64,
    /// Time to first token.
    pub ttft_ms: f64,
    /// From arrival to the final message.
    pub total_ms: f64,
    /// Mean time per output token after the first.
    pub tpot_ms: f64,
    /// Completion tokens over the time from the first to the last token.
    pub tokens_per_s: f64,
}

/// Why a request failed; stable strings a robot can switch on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The payload is not JSON (or not UTF-8).
    BadJson,
    /// JSON, but not a valid request: unknown field, wrong type, bad value.
    InvalidRequest,
    /// The payload is larger than the starter accepts.
    PayloadTooLarge,
    /// The prompt plus `max_tokens` does not fit the model's context.
    ContextLengthExceeded,
    /// Too many requests are queued; try again later.
    Overloaded,
    /// The request's KV cache can never fit some stage's memory, even with every
    /// layer streamed; a smaller `max_tokens` (or prompt) may.
    ExceedsMemory,
    /// Another request with this id was taken lately; ids must be unique.
    DuplicateId,
    /// The request names a reply topic its sender may not read (a robot's
    /// answers go under `lime/response/<user>/`).
    ForbiddenReplyTopic,
    /// The request was accepted but could not be completed.
    Internal,
    /// The answer was not complete by the request's deadline (`deadline_ms`);
    /// what was streamed stands, the rest is not coming.
    DeadlineExceeded,
    /// Its sender cancelled it on `lime/cancel`.
    Cancelled,
}

/// An error reply.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorReply {
    /// The request's id; absent when the payload was too broken to yield one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// The machine-readable code and a message for people.
    pub error: ErrorBody,
}

/// The code and explanation of an error reply.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// What a robot switches on.
    pub code: ErrorCode,
    /// For people: details the code does not carry.
    pub message: String,
}

impl ErrorReply {
    /// An error reply to the request with `id`, when it is known.
    pub fn new(id: Option<String>, code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            id,
            error: ErrorBody {
                code,
                message: message.into(),
            },
        }
    }
}

/// Sent when a request must wait for room (memory or a place in the batch):
/// how many requests are ahead of it. Text and the final message follow later.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Queued {
    /// The waiting request's id.
    pub id: String,
    /// Requests ahead of this one; 0 means it is next.
    pub position: u32,
    /// What it waits for: `"memory"` (KV room on some stage), `"sequences"`
    /// (the starter's `max_sequences`) or `"ring"` (the stages are not all up).
    pub waiting_for: String,
}

/// Any message on a reply topic, for readers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Reply {
    /// The request failed; nothing follows.
    Error(ErrorReply),
    /// The request is complete; nothing follows.
    Final(Final),
    /// More of the answer; more messages follow.
    Text(TextPiece),
    /// The request waits; its text follows once it is admitted.
    Queued(Queued),
}

impl Reply {
    /// Reads one reply-topic payload, whichever kind it is.
    pub fn parse(payload: &[u8]) -> serde_json::Result<Self> {
        serde_json::from_slice(payload)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_are_told_apart() {
        let piece = br#"{"id":"a","seq":0,"text":"hi","done":false}"#;
        assert!(matches!(Reply::parse(piece).unwrap(), Reply::Text(_)));
        let err = serde_json::to_vec(&ErrorReply::new(None, ErrorCode::BadJson, "x")).unwrap();
        assert!(matches!(Reply::parse(&err).unwrap(), Reply::Error(_)));
        let queued = br#"{"id":"a","position":2,"waiting_for":"memory"}"#;
        assert!(matches!(Reply::parse(queued).unwrap(), Reply::Queued(_)));
        let fin = Final {
            id: "a".into(),
            done: true,
            finish_reason: FinishReason::Length,
            usage: Usage {
                prompt_tokens: 1,
                completion_tokens: 2,
                total_tokens: 3,
            },
            timing: Timing {
                queue_ms: 0.0,
                ttft_ms: 1.0,
                total_ms: 2.0,
                tpot_ms: 1.0,
                tokens_per_s: 1000.0,
            },
            token_ids: Some(vec![1, 2]),
            logits: Some(vec![0.1, -3.5e-7, 1e30]),
        };
        let text = serde_json::to_vec(&fin).unwrap();
        assert!(String::from_utf8_lossy(&text).contains(r#""finish_reason":"length""#));
        assert_eq!(Reply::parse(&text).unwrap(), Reply::Final(fin));
    }
}
