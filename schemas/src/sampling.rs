//! How the next token is chosen: the sampling half of a generation request.

use serde::{Deserialize, Serialize};

/// The parameters a request gives for choosing each next token.
///
/// `temperature == 0` means greedy decoding (the highest logit, lowest id on ties);
/// every other field is then ignored but still validated. Filters apply in the order
/// repetition penalty, temperature, top-k, top-p, as in Hugging Face transformers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SamplingParams {
    /// Softmax temperature; 0 selects greedy decoding.
    pub temperature: f32,
    /// Keep the smallest set of most likely tokens whose probability reaches `top_p`.
    pub top_p: f32,
    /// Keep only the `top_k` most likely tokens; 0 keeps all.
    pub top_k: usize,
    /// CTRL-style penalty on tokens already in the sequence; 1 disables it.
    pub repetition_penalty: f32,
    /// Seed of the sampler's random stream; the same seed gives the same tokens.
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            repetition_penalty: 1.0,
            seed: 0,
        }
    }
}

/// A sampling parameter outside the range where it means anything.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("invalid sampling parameter `{field}`: {reason}")]
pub struct SamplingError {
    /// The request field at fault, as spelt in JSON.
    pub field: &'static str,
    /// The range it must be in.
    pub reason: String,
}

impl SamplingParams {
    /// Greedy decoding: deterministic, the reference for every exactness test.
    pub fn greedy() -> Self {
        Self::default()
    }

    /// Whether these parameters select the most likely token without randomness.
    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0
    }

    /// Checks every field, so that a bad request is refused before it is queued.
    pub fn validate(&self) -> Result<(), SamplingError> {
        let err = |field, reason: &str| {
            Err(SamplingError {
                field,
                reason: reason.to_string(),
            })
        };
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return err("temperature", "must be a finite number >= 0");
        }
        if !self.top_p.is_finite() || self.top_p <= 0.0 || self.top_p > 1.0 {
            return err("top_p", "must be in (0, 1]");
        }
        if !self.repetition_penalty.is_finite() || self.repetition_penalty <= 0.0 {
            return err("repetition_penalty", "must be a finite number > 0");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_greedy_and_valid() {
        let p = SamplingParams::default();
        assert!(p.is_greedy());
        p.validate().unwrap();
    }

    #[test]
    fn unknown_fields_are_refused() {
        let e = serde_json::from_str::<SamplingParams>(r#"{"temperature":0.5,"top_q":1}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("top_q"), "{e}");
    }

    #[test]
    fn out_of_range_values_name_the_field() {
        for (json, field) in [
            (r#"{"temperature":-1}"#, "temperature"),
            (r#"{"top_p":0}"#, "top_p"),
            (r#"{"top_p":1.5}"#, "top_p"),
            (r#"{"repetition_penalty":0}"#, "repetition_penalty"),
        ] {
            let p: SamplingParams = serde_json::from_str(json).unwrap();
            assert_eq!(p.validate().unwrap_err().field, field, "{json}");
        }
    }
}
