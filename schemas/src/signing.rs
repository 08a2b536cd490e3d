//! The ring key and what it vouches for. Every stage of a ring and the
//! broker's planner hold the same pre-shared key; the data plane's handshake
//! proves it (in `lime-stage`), and every plan on `lime/control/plan` carries an
//! HMAC-SHA-256 made with it, so that a stage follows only plans made by a
//! holder of the key, whoever can publish on the topic.

use crate::Plan;
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// Shortest key accepted: 128 bits.
const MIN_KEY_BYTES: usize = 16;
/// What a plan's signature is over, before the plan's bytes: no other MAC made
/// with the key (a handshake proof) can pass for a plan's.
const PLAN_LABEL: &[u8] = b"lime plan v1\n";

/// The ring's pre-shared key.
#[derive(Clone)]
pub struct RingKey(Vec<u8>);

impl std::fmt::Debug for RingKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RingKey(..)")
    }
}

/// What a stage makes of a plan's signature.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signature {
    /// Made with this key over this very plan: the stage may follow it.
    Valid,
    /// Unsigned: a stage that holds the key refuses it.
    Missing,
    /// Signed, but not with this key or not over this plan: forged or altered.
    Wrong,
}

impl RingKey {
    /// A key file's text: hex (e.g. `openssl rand -hex 32`), whitespace ignored.
    pub fn from_hex(text: &str) -> Result<Self, String> {
        let digits: Vec<u8> = text.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
        if !digits.len().is_multiple_of(2) {
            return Err("an odd number of hex digits".into());
        }
        let key = digits
            .chunks(2)
            .map(|pair| {
                let hex = std::str::from_utf8(pair).map_err(|_| "not hex".to_string())?;
                u8::from_str_radix(hex, 16).map_err(|_| format!("{hex:?} is not hex"))
            })
            .collect::<Result<Vec<u8>, String>>()?;
        if key.len() < MIN_KEY_BYTES {
            return Err(format!(
                "{} bytes; at least {MIN_KEY_BYTES} are needed (openssl rand -hex 32)",
                key.len()
            ));
        }
        Ok(Self(key))
    }

    /// An HMAC-SHA-256 keyed with the ring key, `label` already fed to it.
    pub fn mac(&self, label: &[u8]) -> Hmac<Sha256> {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.0).expect("HMAC takes any key length");
        mac.update(label);
        mac
    }

    /// Signs `plan`: its `signature` becomes the MAC of its JSON without one.
    pub fn sign(&self, plan: &mut Plan) {
        plan.signature = None;
        let mac = self.plan_mac(plan).finalize().into_bytes();
        plan.signature = Some(mac.iter().map(|b| format!("{b:02x}")).collect());
    }

    /// Whether `plan` was signed with this key (compared in constant time).
    pub fn check(&self, plan: &Plan) -> Signature {
        let Some(hex) = &plan.signature else {
            return Signature::Missing;
        };
        let Ok(given) = RingKey::from_hex(hex).map(|k| k.0) else {
            return Signature::Wrong;
        };
        let unsigned = Plan {
            signature: None,
            ..plan.clone()
        };
        match self.plan_mac(&unsigned).verify_slice(&given) {
            Ok(()) => Signature::Valid,
            Err(_) => Signature::Wrong,
        }
    }

    fn plan_mac(&self, unsigned: &Plan) -> Hmac<Sha256> {
        // Serialising the same plan always gives the same bytes: its fields
        // have a fixed order and no maps, and floats print as they parse
        // (serde_json's `float_roundtrip`, set in the workspace: without it a
        // parsed figure may come back a bit off, and the plan with it).
        let bytes = serde_json::to_vec(unsigned).unwrap_or_default();
        let mut mac = self.mac(PLAN_LABEL);
        mac.update(&bytes);
        mac
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::PlanStage;

    fn plan() -> Plan {
        let stages = ["s0", "s1"]
            .map(|n| PlanStage {
                name: n.into(),
                data_addr: "127.0.0.1:7000".into(),
                offloaded: None,
            })
            .to_vec();
        Plan::even(7, stages, 2, 8).unwrap()
    }

    #[test]
    fn a_signed_plan_checks_after_a_round_trip_and_not_once_changed() {
        let key = RingKey::from_hex(&"ab".repeat(32)).unwrap();
        let mut p = plan();
        assert_eq!(key.check(&p), Signature::Missing);
        key.sign(&mut p);
        let wire = serde_json::to_string(&p).unwrap();
        let back: Plan = serde_json::from_str(&wire).unwrap();
        assert_eq!(key.check(&back), Signature::Valid);
        let mut forged = back.clone();
        forged.epoch += 1;
        assert_eq!(key.check(&forged), Signature::Wrong);
        let mut moved = back.clone();
        moved.stages[1].data_addr = "10.9.9.9:7000".into();
        assert_eq!(key.check(&moved), Signature::Wrong);
        let other = RingKey::from_hex(&"cd".repeat(32)).unwrap();
        assert_eq!(other.check(&back), Signature::Wrong);
        let mut junk = back;
        junk.signature = Some("zz".into());
        assert_eq!(key.check(&junk), Signature::Wrong);
    }

    /// The planner's figures are arbitrary doubles: each must parse back to
    /// the bits it was printed from, or a plan fails its own signature (the
    /// workspace enables serde_json's `float_roundtrip` for this).
    #[test]
    fn a_signed_plan_with_measured_figures_checks_after_a_round_trip() {
        let key = RingKey::from_hex(&"ab".repeat(32)).unwrap();
        let mut bits = 0x2545_f491_4f6c_dd1d_u64;
        let mut figure = |scale: f64| {
            bits ^= bits << 13;
            bits ^= bits >> 7;
            bits ^= bits << 17;
            (bits >> 11) as f64 / (1u64 << 53) as f64 * scale
        };
        for _ in 0..2000 {
            let mut p = plan();
            p.prediction = Some(crate::PlanPrediction {
                time_per_token_s: figure(1.0),
                tokens_per_s: figure(500.0),
                ttft_s: figure(10.0),
                burst_prefill_s: figure(60.0),
                slowest_link_mbit_per_s: figure(1000.0),
                reason: "profiles".into(),
            });
            key.sign(&mut p);
            let back: Plan = serde_json::from_str(&serde_json::to_string(&p).unwrap()).unwrap();
            assert_eq!(key.check(&back), Signature::Valid, "{:?}", p.prediction);
        }
    }

    #[test]
    fn short_or_malformed_keys_are_refused() {
        assert!(RingKey::from_hex("abcd").is_err());
        assert!(RingKey::from_hex("abc").is_err());
        assert!(RingKey::from_hex(&"zz".repeat(16)).is_err());
        assert!(RingKey::from_hex(&format!("{}\n", "0f".repeat(16))).is_ok());
    }
}
