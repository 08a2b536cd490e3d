//! The data plane's frames: what one stage sends the next over TCP.
//!
//! On the wire a frame is a little-endian `u32` body length followed by the body in
//! postcard. Every connection starts with a `Hello` so that a stray or garbage peer,
//! an old build or a stage on another plan is refused before any activation moves.

use serde::{Deserialize, Serialize};

/// First bytes of every hello.
pub const MAGIC: [u8; 4] = *b"LIME";
/// Bumped whenever a frame's layout changes.
pub const PROTOCOL_VERSION: u16 = 5;
/// Frames before a peer has proven itself may not be larger than this.
pub const MAX_HANDSHAKE_BYTES: usize = 4 << 10;
/// Larger frames are refused unread: no honest micro-batch comes near this.
pub const MAX_FRAME_BYTES: usize = 512 << 20;
/// Bytes of the length prefix.
pub const PREFIX_BYTES: usize = 4;

/// Everything a data-plane connection carries: activations and ring control
/// forward, to the next stage; acks back, to the sender.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Frame {
    /// The first frame each side sends; nothing else is accepted before it.
    Hello(Hello),
    /// The connecting stage's answer to the listener's challenge, when the ring
    /// has a key: proof that it holds the key too. Nothing else is accepted
    /// from it before this.
    Proof {
        /// HMAC-SHA-256 with the ring key over both hellos, labelled for this side.
        mac: [u8; 32],
    },
    /// A micro-batch on its way to the stage that runs its next chunk.
    Activations(Activations),
    /// These sequences finished: free their caches. Goes round the ring once.
    Release {
        /// Sequences whose caches every stage may free.
        seqs: Vec<u64>,
    },
    /// A stage could not run a micro-batch (`batches` as in [`Activations`]); the
    /// starter fails its sequences' requests.
    Failed {
        /// The micro-batch's sequences, whose caches every stage it passes frees.
        seqs: Vec<u64>,
        /// The starter's micro-batch numbers, so that it stops waiting for them.
        batches: Vec<u64>,
        /// The failing stage's reason, passed on to the requests' error replies.
        message: String,
    },
    /// Goes round the ring once; its return tells the starter the ring is closed.
    /// Every secondary stage adds what it can hold of KV caches, so the starter
    /// admits only requests that fit everywhere.
    Ping {
        /// The plan epoch and the ring's break count combined, so that the starter
        /// ignores a ping from a ring it has since rebuilt.
        nonce: u64,
        /// Empty from the starter; each secondary stage appends its own.
        rooms: Vec<KvRoom>,
    },
    /// Bytes whose arrival time measures the link; the receiver answers with an
    /// [`Frame::Ack`] on the same connection. Not forwarded.
    Probe {
        /// Matches the ack to the probe; never 0, which in an ack means activations.
        /// lime-stage sends probes in pairs: an empty one (even) times the round
        /// trip, a padded one (odd) the transfer.
        nonce: u64,
        /// Filler sized to take measurable time on the link; its content is ignored.
        #[serde(with = "serde_bytes")]
        padding: Vec<u8>,
    },
    /// The receiver's account of a large frame (a probe, `nonce > 0`, or
    /// activations, `nonce == 0`): its size and how long its bytes took to arrive
    /// after the first. Flows backwards, to the sender, which measures its link.
    Ack {
        /// The probe's nonce, or 0 for activations.
        nonce: u64,
        /// Size of the frame acknowledged, as received.
        bytes: u64,
        /// Microseconds from the frame's first byte to its last, on the receiver's clock.
        receive_us: u64,
    },
    /// Move the ring to this plan (JSON) between token steps. The starter sends it
    /// round the old ring once nothing is in flight; each stage forwards it, drops
    /// its caches (the starter rebuilds them by recomputation) and rejoins the ring
    /// the plan describes.
    Switch {
        /// The new plan's JSON, passed on verbatim round the old ring.
        plan: String,
    },
}

/// What one stage can hold of KV caches: the room left for them with every one of
/// its layers streamed, and what one token of one sequence takes there.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvRoom {
    /// The reporting stage, so that a request that cannot fit names it.
    pub stage: String,
    /// `None`: no memory budget, so no limit.
    pub bytes: Option<u64>,
    /// KV bytes one token of one sequence takes there, over all its layers.
    pub bytes_per_token: u64,
}

/// The opening frame of each side of a data-plane connection: who is speaking,
/// which build and which plan, checked before any activation moves.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// Always [`MAGIC`]: tells a lime peer from anything else that connects.
    pub magic: [u8; 4],
    /// The sender's [`PROTOCOL_VERSION`]; builds with different frame layouts
    /// refuse each other.
    pub version: u16,
    /// The plan epoch the sender runs.
    pub epoch: u64,
    /// The sender's stage name.
    pub from: String,
    /// Fresh random bytes: the challenge the other end's proof must cover.
    pub nonce: [u8; 32],
    /// The listener's proof that it holds the ring key, over both hellos'
    /// nonces (its reply only, and only when the ring has a key).
    pub proof: Option<[u8; 32]>,
}

impl Hello {
    /// A hello without a proof; the listener adds its own before it replies.
    pub fn new(epoch: u64, from: &str, nonce: [u8; 32]) -> Self {
        Self {
            magic: MAGIC,
            version: PROTOCOL_VERSION,
            epoch,
            from: from.to_owned(),
            nonce,
            proof: None,
        }
    }
}

/// A micro-batch between chunks: every sequence's hidden states, stacked.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Activations {
    /// The starter's numbers of the micro-batches merged into this one (stages batch
    /// what is waiting); the starter tracks what it has in flight by them, and the
    /// first names the micro-batch in traces.
    pub batches: Vec<u64>,
    /// Index (in the plan) of the next chunk to run; the chunk count means "done,
    /// back to the starter's head".
    pub chunk: u32,
    /// Which rows of `data` belong to which sequence, in order.
    pub seqs: Vec<SeqSlot>,
    /// How `data` encodes values; lime-stage sends f32 and refuses the others, since
    /// narrowing activations would change the answer.
    pub dtype: ActivationDtype,
    /// Row-major `[tokens, hidden]`, little-endian.
    #[serde(with = "serde_bytes")]
    pub data: Vec<u8>,
    /// The starter's round this micro-batch travels in: stages keep a streamed
    /// layer until the round's last micro-batch has passed it.
    pub round: Round,
}

/// A round: the micro-batches the starter launches one after another that
/// take every sequence one step further. Each visits every chunk in turn, so a
/// stage that keeps a streamed layer in its slot until the round's last
/// micro-batch has run it reads the layer once per round, not once per
/// micro-batch.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Round {
    /// The starter's number of the round; later rounds have larger numbers.
    pub id: u64,
    /// Micro-batches of the round launched after this one: 0 for the last.
    pub after: u32,
}

impl Round {
    /// The round a micro-batch merged from `self` and `other` visits layers in:
    /// the newer one, and within one round the later micro-batch's place.
    pub fn merged(self, other: Round) -> Round {
        match self.id.cmp(&other.id) {
            std::cmp::Ordering::Less => other,
            std::cmp::Ordering::Greater => self,
            std::cmp::Ordering::Equal => Round {
                id: self.id,
                after: self.after.min(other.after),
            },
        }
    }

    /// Whether a layer kept for round `self` may go once a micro-batch of
    /// round `visit` has run it: that was the round's last, or a later round
    /// came (the rest of this one will not: its sequences ended or failed).
    pub fn passed_by(self, visit: Round) -> bool {
        (visit.id == self.id && visit.after == 0) || visit.id > self.id
    }
}

/// One sequence's rows in a micro-batch: `len` tokens from position `pos`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeqSlot {
    /// The starter's number for the sequence: every stage keys its KV cache by it.
    pub id: u64,
    /// Position of the first row in the sequence: where its keys and values go.
    pub pos: u32,
    /// Rows of the sequence in this micro-batch: 1 while decoding, more for a prompt.
    pub len: u32,
    /// Tokens its KV cache must hold; stages allocate the cache on first sight.
    pub capacity: u32,
}

/// The element type of activation bytes on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ActivationDtype {
    /// IEEE single precision, 4 bytes.
    F32,
    /// IEEE half precision, 2 bytes.
    F16,
    /// bfloat16, 2 bytes.
    Bf16,
}

impl ActivationDtype {
    /// Bytes per value, to size or check `data`.
    pub fn size(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::F16 | Self::Bf16 => 2,
        }
    }
}

/// A frame that cannot be read or should not have been sent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The body's length, over [`MAX_FRAME_BYTES`].
    #[error("frame of {0} bytes is larger than the {MAX_FRAME_BYTES}-byte limit")]
    TooLarge(usize),
    /// A zero length prefix: no frame is empty, so the peer is not speaking lime.
    #[error("empty frame")]
    Empty,
    /// Postcard could not encode or decode the frame, or bytes followed it.
    #[error("undecodable frame: {0}")]
    Decode(String),
    /// Activations whose header disagrees with their data or the model
    /// ([`Activations::check`]).
    #[error("inconsistent activations: {0}")]
    Inconsistent(String),
}

impl Frame {
    /// Length prefix and body, ready to write.
    pub fn encode(&self) -> Result<Vec<u8>, FrameError> {
        let mut out = postcard::to_extend(self, vec![0u8; PREFIX_BYTES])
            .map_err(|e| FrameError::Decode(e.to_string()))?;
        let body = out.len() - PREFIX_BYTES;
        if body > MAX_FRAME_BYTES {
            return Err(FrameError::TooLarge(body));
        }
        out[..PREFIX_BYTES].copy_from_slice(&(body as u32).to_le_bytes());
        Ok(out)
    }

    /// The body length a prefix announces, if acceptable.
    pub fn body_len(prefix: [u8; PREFIX_BYTES]) -> Result<usize, FrameError> {
        match u32::from_le_bytes(prefix) as usize {
            0 => Err(FrameError::Empty),
            n if n > MAX_FRAME_BYTES => Err(FrameError::TooLarge(n)),
            n => Ok(n),
        }
    }

    /// Decodes a body; trailing bytes make it invalid.
    pub fn decode(body: &[u8]) -> Result<Self, FrameError> {
        let (frame, rest) =
            postcard::take_from_bytes(body).map_err(|e| FrameError::Decode(e.to_string()))?;
        if !rest.is_empty() {
            return Err(FrameError::Decode(format!(
                "{} bytes after the frame",
                rest.len()
            )));
        }
        Ok(frame)
    }
}

impl Activations {
    /// Appends another micro-batch bound for the same chunk.
    pub fn merge(&mut self, other: Activations) {
        self.seqs.extend(other.seqs);
        self.data.extend(other.data);
        self.batches.extend(other.batches);
        self.round = self.round.merged(other.round);
    }

    /// The micro-batch's name in traces.
    pub fn batch(&self) -> u64 {
        self.batches.first().copied().unwrap_or_default()
    }

    /// Rows in the micro-batch: every sequence's `len`, summed.
    pub fn tokens(&self) -> usize {
        self.seqs.iter().map(|s| s.len as usize).sum()
    }

    /// Checks the header against the data and the model: every sequence has tokens,
    /// stays within its capacity and the context, and the data is `tokens × hidden`.
    pub fn check(&self, hidden: usize, max_context: usize) -> Result<(), FrameError> {
        let bad = |m: String| Err(FrameError::Inconsistent(m));
        if self.seqs.is_empty() {
            return bad("no sequences".into());
        }
        let mut ids = std::collections::HashSet::with_capacity(self.seqs.len());
        for s in &self.seqs {
            let end = s.pos as u64 + s.len as u64;
            if s.len == 0 || end > s.capacity as u64 || s.capacity as usize > max_context {
                return bad(format!(
                    "sequence {} has {}+{} tokens with capacity {} (context {max_context})",
                    s.id, s.pos, s.len, s.capacity
                ));
            }
            if !ids.insert(s.id) {
                return bad(format!("sequence {} appears twice", s.id));
            }
        }
        let want = self
            .tokens()
            .checked_mul(hidden)
            .and_then(|v| v.checked_mul(self.dtype.size()));
        let Some(want) = want else {
            return bad(format!(
                "{} tokens of width {hidden} are more values than memory holds",
                self.tokens()
            ));
        };
        if self.data.len() != want {
            return bad(format!(
                "{} data bytes for {} tokens of width {hidden}; expected {want}",
                self.data.len(),
                self.tokens()
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Frame {
        Frame::Activations(Activations {
            batches: vec![7],
            chunk: 1,
            seqs: vec![SeqSlot {
                id: 3,
                pos: 5,
                len: 2,
                capacity: 16,
            }],
            dtype: ActivationDtype::F32,
            data: vec![1; 2 * 4 * 4],
            round: Round { id: 2, after: 1 },
        })
    }

    #[test]
    fn a_merged_micro_batch_visits_as_the_later_of_its_rounds() {
        let r = |id, after| Round { id, after };
        assert_eq!(r(3, 2).merged(r(3, 0)), r(3, 0));
        assert_eq!(r(3, 0).merged(r(4, 2)), r(4, 2));
        assert_eq!(r(5, 1).merged(r(4, 0)), r(5, 1));
        // A layer kept for round 3 goes with its last micro-batch or a later round.
        assert!(!r(3, 2).passed_by(r(3, 1)));
        assert!(r(3, 2).passed_by(r(3, 0)));
        assert!(r(3, 2).passed_by(r(4, 3)));
        assert!(!r(3, 2).passed_by(r(2, 0)));
    }

    #[test]
    fn frames_round_trip() {
        for f in [
            Frame::Hello(Hello::new(9, "s1", [7; 32])),
            Frame::Hello(Hello {
                proof: Some([9; 32]),
                ..Hello::new(9, "s1", [7; 32])
            }),
            Frame::Proof { mac: [3; 32] },
            sample(),
            Frame::Release { seqs: vec![1, 2] },
            Frame::Ping {
                nonce: 1,
                rooms: vec![KvRoom {
                    stage: "s1".into(),
                    bytes: Some(1 << 20),
                    bytes_per_token: 64,
                }],
            },
            Frame::Ack {
                nonce: 3,
                bytes: 1 << 18,
                receive_us: 900,
            },
            Frame::Switch { plan: "{}".into() },
        ] {
            let bytes = f.encode().unwrap();
            let n = Frame::body_len(bytes[..4].try_into().unwrap()).unwrap();
            assert_eq!(n, bytes.len() - 4);
            assert_eq!(Frame::decode(&bytes[4..]).unwrap(), f);
        }
    }

    #[test]
    fn garbage_is_an_error() {
        assert!(Frame::body_len(*b"GET ").is_err());
        assert!(Frame::body_len([0; 4]).is_err());
        assert!(Frame::decode(b"\xff\xff\xff\xff\xff\xff").is_err());
        let mut bytes = sample().encode().unwrap();
        bytes.push(0);
        assert!(Frame::decode(&bytes[4..]).is_err());
    }

    #[test]
    fn activations_are_checked() {
        let Frame::Activations(a) = sample() else {
            unreachable!()
        };
        a.check(4, 64).unwrap();
        assert!(a.check(8, 64).is_err(), "wrong width");
        assert!(a.check(4, 8).is_err(), "capacity beyond context");
        let mut b = a.clone();
        b.seqs[0].pos = 15;
        assert!(b.check(4, 64).is_err(), "past capacity");
    }
}
