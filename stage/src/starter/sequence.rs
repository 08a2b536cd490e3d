//! One request's life at the starter: which tokens go into the next pass, sampling,
//! streamed text with stop strings, and the reply messages.

use crate::starter::intake::Job;
use lime_kernels::{Sampler, TextStream, TextTokenizer};
use lime_schemas::{Final, FinishReason, SeqSlot, TextPiece, Timing, Usage};
use std::time::Instant;

/// A sequence in generation.
pub struct Sequence<'t> {
    /// The request it answers, as the intake checked it.
    pub job: Job,
    sampler: Sampler,
    /// Prompt then generated tokens.
    history: Vec<u32>,
    /// Tokens already sent through the model (their keys and values are cached).
    fed: usize,
    /// Taken when the sequence finishes and its last partial character is flushed.
    text: Option<TextStream<'t>>,
    stops: StopMatcher,
    pieces: u32,
    /// When the scheduler admitted it; from `job.received` to here is its
    /// time in the queue.
    pub admitted: Instant,
    first_token: Option<Instant>,
    last_logits: Option<Vec<f32>>,
}

/// What sampling one token led to.
pub enum Step {
    /// Text to stream (maybe empty) and the sequence goes on.
    Continue(Option<String>),
    /// The last text and why it ended.
    Done(Option<String>, FinishReason),
}

impl<'t> Sequence<'t> {
    /// A sequence with nothing fed through the model yet; its text is decoded
    /// with `tokenizer`.
    pub fn new(job: Job, tokenizer: &'t TextTokenizer, admitted: Instant) -> Self {
        Self {
            sampler: Sampler::new(job.sampling.clone()),
            history: job.prompt.clone(),
            fed: 0,
            text: Some(tokenizer.stream()),
            stops: StopMatcher::new(job.stops.clone()),
            pieces: 0,
            admitted,
            first_token: None,
            last_logits: None,
            job,
        }
    }

    /// Prompt and generated tokens so far.
    pub fn tokens(&self) -> usize {
        self.history.len()
    }

    /// Tokens of the cache this sequence may fill.
    pub fn capacity(&self) -> usize {
        self.job.prompt.len() + self.job.max_tokens
    }

    /// The tokens of its next pass, at most `budget` (prompts longer than that are
    /// prefilled over several passes).
    pub fn next_input(&self, budget: usize) -> &[u32] {
        let end = self.history.len().min(self.fed + budget.max(1));
        &self.history[self.fed..end]
    }

    /// Its next pass as a micro-batch slot of `len` tokens.
    pub fn slot(&self, id: u64, len: usize) -> SeqSlot {
        SeqSlot {
            id,
            pos: self.fed as u32,
            len: len as u32,
            capacity: self.capacity() as u32,
        }
    }

    /// Forgets the cached tokens: after a new plan the stages hold no caches, and
    /// the next passes recompute them from the prompt and the tokens generated so
    /// far. The kernels give every token the same bits however it is batched, so
    /// the rebuilt caches and the next token equal the ones a run without the
    /// new plan has.
    pub fn restart(&mut self) {
        self.fed = 0;
    }

    /// Records that a pass of `len` tokens came back; true when it was the last
    /// known token, so that its logits give the next one.
    pub fn fed(&mut self, len: usize) -> bool {
        self.fed += len;
        self.fed == self.history.len()
    }

    /// Samples the next token from `logits` and decides whether to go on.
    pub fn sample(&mut self, logits: &[f32], eos: &[u32]) -> lime_kernels::Result<(u32, Step)> {
        let token = self.sampler.next(logits, &self.history);
        self.history.push(token);
        self.first_token.get_or_insert_with(Instant::now);
        if self.job.return_logits {
            self.last_logits = Some(logits.to_vec());
        }
        if !self.job.ignore_eos && eos.contains(&token) {
            return Ok((token, Step::Done(self.flush_text()?, FinishReason::Stop)));
        }
        let piece = match self.text.as_mut() {
            Some(stream) => stream.step(token)?,
            None => None,
        };
        let (emit, stopped) = match piece {
            Some(text) => self.stops.push(&text),
            None => (None, false),
        };
        let step = if stopped {
            Step::Done(emit, FinishReason::Stop)
        } else if self.generated().len() >= self.job.max_tokens {
            Step::Done(join(emit, self.flush_text()?), FinishReason::Length)
        } else {
            Step::Continue(emit)
        };
        Ok((token, step))
    }

    fn flush_text(&mut self) -> lime_kernels::Result<Option<String>> {
        let tail = self
            .text
            .take()
            .map(TextStream::finish)
            .transpose()?
            .flatten();
        let (emit, _) = match tail {
            Some(t) => self.stops.push(&t),
            None => (None, false),
        };
        Ok(join(emit, self.stops.flush()))
    }

    /// The tokens generated so far, the prompt left out.
    pub fn generated(&self) -> &[u32] {
        &self.history[self.job.prompt.len()..]
    }

    /// The next piece of streamed text.
    pub fn piece(&mut self, text: String) -> TextPiece {
        let seq = self.pieces;
        self.pieces += 1;
        TextPiece {
            id: self.job.id.clone(),
            seq,
            text,
            done: false,
        }
    }

    /// The final message.
    pub fn finish(&mut self, reason: FinishReason) -> Final {
        let now = Instant::now();
        let ms = |d: std::time::Duration| d.as_secs_f64() * 1e3;
        let first = self.first_token.unwrap_or(now);
        let n = self.generated().len();
        let decode = now.duration_since(first).as_secs_f64();
        let tpot = if n > 1 {
            decode * 1e3 / (n - 1) as f64
        } else {
            0.0
        };
        Final {
            id: self.job.id.clone(),
            done: true,
            finish_reason: reason,
            usage: Usage {
                prompt_tokens: self.job.prompt.len() as u32,
                completion_tokens: n as u32,
                total_tokens: (self.job.prompt.len() + n) as u32,
            },
            timing: Timing {
                queue_ms: ms(self.admitted.duration_since(self.job.received)),
                ttft_ms: ms(first.duration_since(self.job.received)),
                total_ms: ms(now.duration_since(self.job.received)),
                tpot_ms: tpot,
                tokens_per_s: if n > 1 && decode > 0.0 {
                    (n - 1) as f64 / decode
                } else {
                    0.0
                },
            },
            token_ids: self.job.return_token_ids.then(|| self.generated().to_vec()),
            logits: self.last_logits.take(),
        }
    }
}

fn join(a: Option<String>, b: Option<String>) -> Option<String> {
    match (a, b) {
        (Some(mut a), Some(b)) => {
            a.push_str(&b);
            Some(a)
        }
        (a, b) => a.or(b),
    }
}

/// Finds stop strings in streamed text, holding back any tail that could be the
/// start of one so that a stop string is never partly streamed.
pub struct StopMatcher {
    stops: Vec<String>,
    held: String,
    stopped: bool,
}

impl StopMatcher {
    /// A matcher for `stops`; with none, all text streams at once.
    pub fn new(stops: Vec<String>) -> Self {
        Self {
            stops,
            held: String::new(),
            stopped: false,
        }
    }

    /// Adds text; returns what can be streamed now and whether a stop string ended it.
    pub fn push(&mut self, text: &str) -> (Option<String>, bool) {
        if self.stopped {
            return (None, true);
        }
        self.held.push_str(text);
        if let Some(at) = self
            .stops
            .iter()
            .filter_map(|s| self.held.find(s.as_str()))
            .min()
        {
            self.held.truncate(at);
            self.stopped = true;
            return (non_empty(std::mem::take(&mut self.held)), true);
        }
        let keep = self
            .stops
            .iter()
            .map(|s| longest_prefix_suffix(&self.held, s))
            .max()
            .unwrap_or(0);
        let split = self.held.len() - keep;
        let rest = self.held.split_off(split);
        let emit = std::mem::replace(&mut self.held, rest);
        (non_empty(emit), false)
    }

    /// Releases held text at the end of the stream.
    pub fn flush(&mut self) -> Option<String> {
        if self.stopped {
            return None;
        }
        non_empty(std::mem::take(&mut self.held))
    }
}

fn non_empty(s: String) -> Option<String> {
    (!s.is_empty()).then_some(s)
}

/// Length of the longest suffix of `text` that is a proper prefix of `stop`, on a
/// character boundary.
fn longest_prefix_suffix(text: &str, stop: &str) -> usize {
    let max = text.len().min(stop.len().saturating_sub(1));
    (1..=max)
        .rev()
        .find(|&n| {
            text.is_char_boundary(text.len() - n)
                && stop.is_char_boundary(n)
                && text.ends_with(&stop[..n])
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], pieces: &[&str]) -> (String, bool) {
        let mut m = StopMatcher::new(stops.iter().map(|s| s.to_string()).collect());
        let mut out = String::new();
        for p in pieces {
            let (emit, stopped) = m.push(p);
            out.push_str(&emit.unwrap_or_default());
            if stopped {
                return (out, true);
            }
        }
        out.push_str(&m.flush().unwrap_or_default());
        (out, false)
    }

    #[test]
    fn stop_strings_split_over_pieces() {
        assert_eq!(
            run(&["END"], &["ab", "cE", "N", "Dxy"]),
            ("abc".into(), true)
        );
        assert_eq!(run(&["END"], &["ab", "E", "Nx"]), ("abENx".into(), false));
        assert_eq!(run(&["\n\n"], &["a\n", "\nb"]), ("a".into(), true));
        assert_eq!(run(&[], &["a", "b"]), ("ab".into(), false));
        assert_eq!(run(&["é!"], &["caf", "é", "?"]), ("café?".into(), false));
    }
}
