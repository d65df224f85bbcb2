//! The one error type of the crate.

use std::fmt;

/// Why a proof was refused, or why the replay cache refused a proof id.
///
/// Text taken from the proof (such as `htm` or `alg`) is shown escaped and cut to 64 characters,
/// so a message is safe to log.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum DpopError {
    /// The proof is longer than [`Policy::proof_len_max`](crate::Policy::proof_len_max).
    #[error("proof longer than {max} bytes")]
    ProofTooLong {
        /// The limit, in bytes.
        max: usize,
    },
    /// The proof does not have exactly three dot-separated segments.
    #[error("proof has {found} segments, expected 3 (header.payload.signature)")]
    SegmentCount {
        /// How many segments the proof has.
        found: usize,
    },
    /// A segment is not base64url without padding.
    #[error("proof {part} is not base64url without padding")]
    NotBase64 {
        /// Which segment: "header", "payload" or "signature".
        part: &'static str,
    },
    /// The header or the payload is not a JSON object.
    #[error("proof {part} is not a JSON object")]
    NotJsonObject {
        /// Which segment: "header" or "payload".
        part: &'static str,
    },
    /// A required member is absent.
    #[error("proof {part} has no {member}")]
    MissingMember {
        /// Where the member belongs: "header", "payload" or "jwk".
        part: &'static str,
        /// The member's name.
        member: &'static str,
    },
    /// A member has the wrong JSON type.
    #[error("proof {part} member {member} must be {expected}")]
    WrongType {
        /// Where the member belongs: "header", "payload" or "jwk".
        part: &'static str,
        /// The member's name.
        member: &'static str,
        /// What it must be, e.g. "a string".
        expected: &'static str,
    },
    /// The header `typ` is not `dpop+jwt`.
    #[error("typ is {found}, expected dpop+jwt")]
    WrongTyp {
        /// The `typ` the proof carries.
        found: String,
    },
    /// The header carries `crit`; no JWS extension is understood, so the proof is refused.
    #[error("crit header is not supported")]
    CritUnsupported,
    /// The header `alg` is not one this crate verifies.
    #[error("unsupported alg {alg}: only EdDSA (Ed25519) and ES256 (P-256)")]
    UnsupportedAlg {
        /// The `alg` the proof carries.
        alg: String,
    },
    /// The `jwk` key type or curve is not one this crate verifies.
    #[error("unsupported jwk kty {kty} crv {crv}: only OKP/Ed25519 and EC/P-256")]
    UnsupportedKey {
        /// The `kty` of the key.
        kty: String,
        /// The `crv` of the key, or "(none)".
        crv: String,
    },
    /// The header `alg` is supported but does not belong with the key's type.
    #[error("alg {alg} does not match the jwk key type {key}")]
    AlgKeyMismatch {
        /// The `alg` of the header.
        alg: &'static str,
        /// The key type: "OKP/Ed25519" or "EC/P-256".
        key: &'static str,
    },
    /// The `jwk` carries a private key (`d`).
    #[error("jwk must not contain a private key")]
    PrivateKey,
    /// A key coordinate is not base64url of the right length.
    #[error("jwk {member} must be {expected} bytes of base64url without padding")]
    BadCoordinate {
        /// The coordinate: "x" or "y".
        member: &'static str,
        /// The required length in bytes.
        expected: usize,
    },
    /// The coordinates decode but do not form a usable public key.
    #[error("jwk is not a valid {key} public key: {reason}")]
    InvalidKey {
        /// The key type: "Ed25519" or "P-256".
        key: &'static str,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The signature has the wrong length for the algorithm.
    #[error("signature is {found} bytes, {alg} needs {expected}")]
    SignatureLength {
        /// The algorithm.
        alg: &'static str,
        /// The required length.
        expected: usize,
        /// The length found.
        found: usize,
    },
    /// The signature does not verify against the proof's key.
    #[error("signature does not verify")]
    BadSignature,
    /// The `jti` is an empty string.
    #[error("jti is empty")]
    EmptyJti,
    /// The `jti` is longer than [`Policy::jti_len_max`](crate::Policy::jti_len_max).
    #[error("jti longer than {max} bytes")]
    JtiTooLong {
        /// The limit, in bytes.
        max: usize,
    },
    /// The `htm` differs from the request method.
    #[error("htm is {htm}, request is {method}")]
    HtmMismatch {
        /// The `htm` of the proof.
        htm: String,
        /// The method of the request.
        method: String,
    },
    /// The `htu` is not an absolute http or https URL.
    #[error("htu {htu} is not an absolute http(s) URL")]
    InvalidHtu {
        /// The `htu` of the proof.
        htu: String,
    },
    /// The request URL given by the caller is not an absolute http or https URL.
    #[error("request URL {url} is not an absolute http(s) URL")]
    InvalidRequestUrl {
        /// The URL of the request.
        url: String,
    },
    /// The `htu` differs from the request URL (after normalization).
    #[error("htu is {htu}, request is {url}")]
    HtuMismatch {
        /// The `htu` of the proof.
        htu: String,
        /// The URL of the request.
        url: String,
    },
    /// The `iat` is not a non-negative number of seconds that fits in milliseconds.
    #[error("iat must be a non-negative number of seconds")]
    InvalidIat,
    /// The `iat` is further in the past than the window allows.
    #[error("proof iat is {} s in the past (window {} s)", Secs(*age_ms), Secs(*window_ms))]
    IatTooOld {
        /// How far in the past, in milliseconds.
        age_ms: u64,
        /// The window, in milliseconds.
        window_ms: u64,
    },
    /// The `iat` is further in the future than the window allows.
    #[error("proof iat is {} s in the future (window {} s)", Secs(*ahead_ms), Secs(*window_ms))]
    IatInFuture {
        /// How far in the future, in milliseconds.
        ahead_ms: u64,
        /// The window, in milliseconds.
        window_ms: u64,
    },
    /// The request carries an access token but the proof has no `ath`.
    #[error("ath is missing but the request carries an access token")]
    MissingAth,
    /// The `ath` is not the hash of the request's access token.
    #[error("ath does not match the access token")]
    AthMismatch,
    /// The (jkt, jti) pair was already seen within the window.
    #[error("proof was already used (same jkt and jti)")]
    Replayed,
    /// The replay cache holds `capacity` unexpired entries and cannot take another.
    #[error("replay cache is full ({capacity} unexpired entries)")]
    ReplayCacheFull {
        /// The capacity of the cache.
        capacity: usize,
    },
}

/// Escapes untrusted text and cuts it to 64 characters for use in an error message.
pub(crate) fn shown(text: &str) -> String {
    const MAX_CHARS: usize = 64;
    let mut out: String = text.chars().take(MAX_CHARS).flat_map(char::escape_debug).collect();
    if text.chars().nth(MAX_CHARS).is_some() {
        out.push('…');
    }
    out
}

/// Milliseconds shown as seconds: "75" for 75 000, "60.5" for 60 500.
struct Secs(u64);

impl fmt::Display for Secs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (whole, frac) = (self.0 / 1000, self.0 % 1000);
        if frac == 0 {
            write!(f, "{whole}")
        } else {
            let digits = format!("{frac:03}");
            write!(f, "{whole}.{}", digits.trim_end_matches('0'))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seconds_are_shown_without_trailing_zeros() {
        assert_eq!(Secs(75_000).to_string(), "75");
        assert_eq!(Secs(60_500).to_string(), "60.5");
        assert_eq!(Secs(1).to_string(), "0.001");
    }

    #[test]
    fn untrusted_text_is_escaped_and_cut() {
        assert_eq!(shown("GET"), "GET");
        assert_eq!(shown("a\nb\"c"), "a\\nb\\\"c");
        let long = "x".repeat(100);
        assert_eq!(shown(&long), format!("{}…", "x".repeat(64)));
    }
}
