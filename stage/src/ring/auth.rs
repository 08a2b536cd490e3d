//! Who may join the ring: with a pre-shared key (`data.key_file`), each link's
//! handshake is a mutual challenge-response. The connecting stage's hello
//! carries a fresh nonce; the listener answers with its own nonce and an
//! HMAC-SHA-256 over both hellos; the connecting stage checks it and answers
//! with its own HMAC (under a different label, so neither can be replayed as
//! the other). A stranger without the key can neither inject activations into
//! a stage nor receive any from one.

use hmac::{Hmac, Mac};
pub use lime_schemas::signing::RingKey;
use lime_schemas::Hello;
use sha2::Sha256;
use std::path::Path;

/// Reads a key file: hex (e.g. `openssl rand -hex 32`), whitespace ignored.
pub fn load_key(path: &Path) -> anyhow::Result<RingKey> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| anyhow::anyhow!("reading the ring key {}: {e}", path.display()))?;
    RingKey::from_hex(&text).map_err(|e| anyhow::anyhow!("the ring key {}: {e}", path.display()))
}

/// Which end a proof speaks for.
#[derive(Debug, Clone, Copy)]
pub enum Side {
    /// The stage that was connected to (the next stage).
    Listener,
    /// The stage that connected (the previous stage).
    Connector,
}

/// The handshake's proofs of the ring key.
pub trait Handshake {
    /// `side`'s proof for the handshake of these two hellos.
    fn proof(&self, side: Side, connector: &Hello, listener: &Hello) -> [u8; 32];
    /// Whether `mac` is `side`'s proof for these hellos (in constant time).
    fn verify(&self, side: Side, connector: &Hello, listener: &Hello, mac: &[u8; 32]) -> bool;
}

impl Handshake for RingKey {
    fn proof(&self, side: Side, connector: &Hello, listener: &Hello) -> [u8; 32] {
        handshake_mac(self, side, connector, listener)
            .finalize()
            .into_bytes()
            .into()
    }

    fn verify(&self, side: Side, connector: &Hello, listener: &Hello, mac: &[u8; 32]) -> bool {
        handshake_mac(self, side, connector, listener)
            .verify_slice(mac)
            .is_ok()
    }
}

fn handshake_mac(key: &RingKey, side: Side, connector: &Hello, listener: &Hello) -> Hmac<Sha256> {
    let label: &[u8] = match side {
        Side::Listener => b"lime ring: listener",
        Side::Connector => b"lime ring: connector",
    };
    let mut mac = key.mac(b"");
    for part in [
        label,
        &connector.version.to_le_bytes(),
        &connector.epoch.to_le_bytes(),
        connector.from.as_bytes(),
        &connector.nonce,
        listener.from.as_bytes(),
        &listener.nonce,
    ] {
        mac.update(&(part.len() as u64).to_le_bytes());
        mac.update(part);
    }
    mac
}

/// A fresh challenge.
pub fn nonce() -> [u8; 32] {
    let mut n = [0u8; 32];
    // Without the OS's randomness there is no safe nonce; the handshake then
    // fails for this link (the all-zero nonce is never accepted by `check`).
    if getrandom::fill(&mut n).is_err() {
        tracing::error!("the OS gave no random bytes for a handshake nonce");
        n = [0; 32];
    }
    n
}

/// Whether a peer's nonce can be a real challenge.
pub fn plausible(nonce: &[u8; 32]) -> bool {
    nonce.iter().any(|&b| b != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hellos() -> (Hello, Hello) {
        (Hello::new(7, "s0", [1; 32]), Hello::new(7, "s1", [2; 32]))
    }

    #[test]
    fn proofs_check_out_only_with_the_key_side_and_hellos() {
        let key = RingKey::from_hex(&"ab".repeat(32)).unwrap();
        let other = RingKey::from_hex(&"cd".repeat(32)).unwrap();
        let (c, l) = hellos();
        let p = key.proof(Side::Listener, &c, &l);
        assert!(key.verify(Side::Listener, &c, &l, &p));
        assert!(!other.verify(Side::Listener, &c, &l, &p), "another key");
        assert!(
            !key.verify(Side::Connector, &c, &l, &p),
            "the other side's label"
        );
        let replayed = Hello::new(7, "s0", [3; 32]);
        assert!(
            !key.verify(Side::Listener, &replayed, &l, &p),
            "another nonce"
        );
        let renamed = Hello::new(7, "s9", [1; 32]);
        assert!(
            !key.verify(Side::Listener, &renamed, &l, &p),
            "another name"
        );
    }

    #[test]
    fn nonces_are_fresh() {
        let (a, b) = (nonce(), nonce());
        assert_ne!(a, b);
        assert!(plausible(&a));
    }
}
