//! A DPoP client for tests: an Ed25519 key from a fixed seed that signs RFC 9449 proofs.

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine;
use ed25519_dalek::{Signer, SigningKey};
use sha2::{Digest, Sha256};

/// A device key.
pub struct DeviceKey {
    key: SigningKey,
}

impl DeviceKey {
    /// The key derived from `seed` (the same seed gives the same key).
    pub fn new(seed: u8) -> DeviceKey {
        DeviceKey { key: SigningKey::from_bytes(&[seed; 32]) }
    }

    fn x(&self) -> String {
        B64.encode(self.key.verifying_key().as_bytes())
    }

    /// The RFC 7638 thumbprint a session is bound to.
    pub fn jkt(&self) -> String {
        cascade_dpop::thumbprint(&cascade_dpop::Jwk::Ed25519 { x: self.x() })
            .expect("thumbprint of a valid key")
    }

    /// A proof for `method url`, bound to access token `token`, issued at `iat_s` with id `jti`.
    pub fn proof(&self, method: &str, url: &str, token: &str, iat_s: u64, jti: &str) -> String {
        let header = serde_json::json!({
            "typ": "dpop+jwt",
            "alg": "EdDSA",
            "jwk": { "kty": "OKP", "crv": "Ed25519", "x": self.x() },
        });
        let payload = serde_json::json!({
            "jti": jti,
            "htm": method,
            "htu": url,
            "iat": iat_s,
            "ath": B64.encode(Sha256::digest(token.as_bytes())),
        });
        let signing_input = format!("{}.{}", B64.encode(header.to_string()), B64.encode(payload.to_string()));
        let signature = self.key.sign(signing_input.as_bytes());
        format!("{signing_input}.{}", B64.encode(signature.to_bytes()))
    }
}
