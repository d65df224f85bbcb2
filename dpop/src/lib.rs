//! Verification of DPoP proofs (RFC 9449) for Cascade.
//!
//! [`verify`] checks one proof (the `DPoP` request header) against the request it came with,
//! following RFC 9449 §4.3, and refuses it with a precise [`DpopError`] at the first failure.
//! The checks, in order:
//!
//! 1. The proof is at most [`Policy::proof_len_max`] bytes and has exactly three segments, each
//!    base64url without padding.
//! 2. The header is a JSON object with `typ` `dpop+jwt`, no `crit`, `alg` `EdDSA` or `ES256`, and
//!    a public `jwk` (no `d`) of the matching type: OKP/Ed25519 for EdDSA, EC/P-256 for ES256.
//!    The coordinates must be 32 bytes each and form a valid point; Ed25519 keys of small order
//!    or in non-canonical encoding are refused.
//! 3. The signature over `header.payload` (the ASCII text as sent) verifies: 64 bytes for
//!    Ed25519 (strict verification), 64 bytes `r || s` for ES256 (not DER).
//! 4. The payload is a JSON object whose `jti` is a non-empty string of at most
//!    [`Policy::jti_len_max`] bytes, whose `htm` equals the request method exactly, whose `htu`
//!    equals the request URL (see below), whose `iat` (seconds, integer or fractional) is within
//!    [`Policy::iat_window_ms`] of the current time in either direction, and, when the request
//!    carries an access token, whose `ath` is base64url(SHA-256(token)).
//!
//! `htu` and the request URL are compared as `scheme://host[:port]/path`: query and fragment are
//! dropped, scheme and host are lowercased (ASCII), `:443` is dropped for https and `:80` for
//! http, and an empty path is `/`. The path is compared exactly, without percent-decoding or
//! dot-segment removal.
//!
//! Members the crate does not check are ignored. A JSON object with a repeated member name is
//! read with the last value winning, as RFC 7515 §4 permits.
//!
//! Not checked, or not yet supported:
//! - server-provided `nonce` (RFC 9449 §8, §9): a `nonce` member is ignored;
//! - replay: [`verify`] does not remember proofs. Pass each [`Verified`] to a [`ReplayCache`],
//!   which is per process (not shared between instances) and keyed on (jkt, jti), not on the
//!   proof text, because ES256 signatures are malleable;
//! - binding to an access token's `cnf.jkt`: compare [`Verified::jkt`] with it yourself;
//! - algorithms other than EdDSA (Ed25519) and ES256, and RSA keys.
//!
//! No function of the crate panics on any input.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod error;
mod htu;
mod json;
mod jwk;
mod replay;
#[cfg(test)]
mod tests;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

pub use error::DpopError;
pub use jwk::{thumbprint, Jwk};
pub use replay::ReplayCache;

use error::shown;
use jwk::PublicKey;

/// Limits and policy of proof checking.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// How far `iat` may be from the current time, in the past or the future, in milliseconds:
    /// `|now - iat|` must be at most this. Default 60 000.
    pub iat_window_ms: u64,
    /// The longest proof accepted, in bytes. Default 4096.
    pub proof_len_max: usize,
    /// The longest `jti` accepted, in bytes. Default 128.
    pub jti_len_max: usize,
}

impl Default for Policy {
    fn default() -> Self {
        Policy { iat_window_ms: 60_000, proof_len_max: 4096, jti_len_max: 128 }
    }
}

/// What the verifier needs to know about the request the proof is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request<'a> {
    /// The HTTP method, compared with `htm` exactly (case-sensitive).
    pub method: &'a str,
    /// The absolute URL of the request, `scheme://host[:port]/path`; query and fragment are
    /// ignored when comparing with `htu`.
    pub url: &'a str,
    /// The access token sent with the request; when `Some`, the proof must carry
    /// `ath` = base64url(SHA-256(token)).
    pub access_token: Option<&'a str>,
}

/// A proof that passed every check.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Verified {
    /// The RFC 7638 SHA-256 thumbprint of the proof's public key, base64url without padding.
    pub jkt: String,
    /// The proof's `jti`.
    pub jti: String,
    /// The proof's `iat`, in milliseconds since the Unix epoch.
    pub iat_ms: u64,
}

/// Verifies a DPoP proof for `request` at time `now_ms` (milliseconds since the Unix epoch).
///
/// Runs the checks listed in the crate documentation, in order, and returns the first failure.
/// Does not detect replays: pass the result to [`ReplayCache::check_and_insert`].
pub fn verify(
    proof: &str,
    request: &Request<'_>,
    now_ms: u64,
    policy: &Policy,
) -> Result<Verified, DpopError> {
    let segments = Segments::split(proof, policy)?;
    let (jwk, key) = check_header(&segments.header)?;
    key.verify(segments.signing_input.as_bytes(), &segments.signature)?;
    let claims = json::object(&segments.payload, "payload")?;
    let jti = check_jti(&claims, policy)?;
    check_htm(&claims, request)?;
    check_htu(&claims, request)?;
    let iat_ms = check_iat(&claims, now_ms, policy)?;
    check_ath(&claims, request)?;
    Ok(Verified { jkt: jwk::thumbprint_of_valid(&jwk), jti: jti.to_owned(), iat_ms })
}

/// The decoded segments of a proof.
struct Segments<'a> {
    /// `header.payload` as sent: the bytes the signature covers.
    signing_input: &'a str,
    header: Vec<u8>,
    payload: Vec<u8>,
    signature: Vec<u8>,
}

impl<'a> Segments<'a> {
    /// Check 1: length, segment count and base64url of each segment.
    fn split(proof: &'a str, policy: &Policy) -> Result<Self, DpopError> {
        if proof.len() > policy.proof_len_max {
            return Err(DpopError::ProofTooLong { max: policy.proof_len_max });
        }
        let found = proof.split('.').count();
        let wrong_count = || DpopError::SegmentCount { found };
        if found != 3 {
            return Err(wrong_count());
        }
        let (signing_input, signature) = proof.rsplit_once('.').ok_or_else(wrong_count)?;
        let (header, payload) = signing_input.split_once('.').ok_or_else(wrong_count)?;
        Ok(Segments {
            signing_input,
            header: decode_segment(header, "header")?,
            payload: decode_segment(payload, "payload")?,
            signature: decode_segment(signature, "signature")?,
        })
    }
}

/// Decodes one base64url segment without padding.
fn decode_segment(segment: &str, part: &'static str) -> Result<Vec<u8>, DpopError> {
    URL_SAFE_NO_PAD.decode(segment).map_err(|_| DpopError::NotBase64 { part })
}

/// The signature algorithms this crate verifies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Alg {
    EdDsa,
    Es256,
}

impl Alg {
    /// Reads the header `alg`.
    fn parse(alg: &str) -> Result<Self, DpopError> {
        match alg {
            "EdDSA" => Ok(Alg::EdDsa),
            "ES256" => Ok(Alg::Es256),
            _ => Err(DpopError::UnsupportedAlg { alg: shown(alg) }),
        }
    }

    /// The name of the algorithm in JWS.
    fn name(self) -> &'static str {
        match self {
            Alg::EdDsa => "EdDSA",
            Alg::Es256 => "ES256",
        }
    }

    /// Whether a key of this type may be used with this algorithm.
    fn fits(self, jwk: &Jwk) -> bool {
        matches!((self, jwk), (Alg::EdDsa, Jwk::Ed25519 { .. }) | (Alg::Es256, Jwk::P256 { .. }))
    }
}

/// Check 2: the header, returning the proof's key.
fn check_header(header: &[u8]) -> Result<(Jwk, PublicKey), DpopError> {
    let members = json::object(header, "header")?;
    let typ = json::required_str(&members, "header", "typ")?;
    if typ != "dpop+jwt" {
        return Err(DpopError::WrongTyp { found: shown(typ) });
    }
    if members.contains_key("crit") {
        return Err(DpopError::CritUnsupported);
    }
    let alg = Alg::parse(json::required_str(&members, "header", "alg")?)?;
    let jwk = match members.get("jwk") {
        None => return Err(DpopError::MissingMember { part: "header", member: "jwk" }),
        Some(Value::Object(jwk_members)) => Jwk::from_members(jwk_members)?,
        Some(_) => return Err(DpopError::WrongType { part: "header", member: "jwk", expected: "an object" }),
    };
    if !alg.fits(&jwk) {
        return Err(DpopError::AlgKeyMismatch { alg: alg.name(), key: jwk.key_type() });
    }
    let key = PublicKey::from_jwk(&jwk)?;
    Ok((jwk, key))
}

/// Check 4: `jti` is a non-empty string within the length limit.
fn check_jti<'a>(claims: &'a Map<String, Value>, policy: &Policy) -> Result<&'a str, DpopError> {
    let jti = json::required_str(claims, "payload", "jti")?;
    if jti.is_empty() {
        return Err(DpopError::EmptyJti);
    }
    if jti.len() > policy.jti_len_max {
        return Err(DpopError::JtiTooLong { max: policy.jti_len_max });
    }
    Ok(jti)
}

/// Check 4: `htm` equals the request method, case-sensitively.
fn check_htm(claims: &Map<String, Value>, request: &Request<'_>) -> Result<(), DpopError> {
    let htm = json::required_str(claims, "payload", "htm")?;
    if htm != request.method {
        return Err(DpopError::HtmMismatch { htm: shown(htm), method: shown(request.method) });
    }
    Ok(())
}

/// Check 4: `htu` equals the request URL once both are normalized.
fn check_htu(claims: &Map<String, Value>, request: &Request<'_>) -> Result<(), DpopError> {
    let htu = json::required_str(claims, "payload", "htu")?;
    let proof_url = htu::normalize(htu).ok_or_else(|| DpopError::InvalidHtu { htu: shown(htu) })?;
    let request_url = htu::normalize(request.url)
        .ok_or_else(|| DpopError::InvalidRequestUrl { url: shown(request.url) })?;
    if proof_url != request_url {
        return Err(DpopError::HtuMismatch { htu: shown(htu), url: shown(request.url) });
    }
    Ok(())
}

/// Check 4: `iat` is within the window around `now_ms`; returns it in milliseconds.
fn check_iat(claims: &Map<String, Value>, now_ms: u64, policy: &Policy) -> Result<u64, DpopError> {
    let iat_ms = match claims.get("iat") {
        None => return Err(DpopError::MissingMember { part: "payload", member: "iat" }),
        Some(Value::Number(seconds)) => seconds_to_ms(seconds)?,
        Some(_) => return Err(DpopError::WrongType { part: "payload", member: "iat", expected: "a number" }),
    };
    let window_ms = policy.iat_window_ms;
    if iat_ms <= now_ms {
        let age_ms = now_ms - iat_ms;
        if age_ms > window_ms {
            return Err(DpopError::IatTooOld { age_ms, window_ms });
        }
    } else {
        let ahead_ms = iat_ms - now_ms;
        if ahead_ms > window_ms {
            return Err(DpopError::IatInFuture { ahead_ms, window_ms });
        }
    }
    Ok(iat_ms)
}

/// Converts a JSON number of seconds to milliseconds, refusing negative or oversized values.
fn seconds_to_ms(seconds: &serde_json::Number) -> Result<u64, DpopError> {
    if let Some(whole) = seconds.as_u64() {
        return whole.checked_mul(1000).ok_or(DpopError::InvalidIat);
    }
    match seconds.as_f64() {
        // The bound keeps the product near the u64 range; `as` saturates and drops the fraction.
        Some(fractional) if fractional >= 0.0 && fractional < (u64::MAX / 1000) as f64 => {
            Ok((fractional * 1000.0) as u64)
        }
        _ => Err(DpopError::InvalidIat),
    }
}

/// Check 4: when the request carries an access token, `ath` is its hash.
fn check_ath(claims: &Map<String, Value>, request: &Request<'_>) -> Result<(), DpopError> {
    let Some(token) = request.access_token else {
        return Ok(());
    };
    let ath = json::optional_str(claims, "payload", "ath")?.ok_or(DpopError::MissingAth)?;
    let expected = URL_SAFE_NO_PAD.encode(Sha256::digest(token.as_bytes()));
    if !constant_time_eq(ath.as_bytes(), expected.as_bytes()) {
        return Err(DpopError::AthMismatch);
    }
    Ok(())
}

/// Compares two byte strings in time that depends only on their lengths.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |diff, (x, y)| diff | (x ^ y)) == 0
}
