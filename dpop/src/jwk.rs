//! Public JWKs: parsing, validation, RFC 7638 thumbprints and signature verification.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use crate::error::shown;
use crate::json::{optional_str, required_str};
use crate::DpopError;

/// A parsed public JWK of a supported type; coordinates are base64url without padding, as sent.
///
/// Serde reads and writes the JSON form: `{"kty":"OKP","crv":"Ed25519","x":..}` or
/// `{"kty":"EC","crv":"P-256","x":..,"y":..}`. Reading ignores other members and refuses a `d`
/// (private key) member. It does not decode the coordinates; [`thumbprint`] does.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "Map<String, Value>", into = "JwkMembers")]
pub enum Jwk {
    /// An Ed25519 key (`kty` OKP, `crv` Ed25519).
    Ed25519 {
        /// The 32-byte public key.
        x: String,
    },
    /// A P-256 key (`kty` EC, `crv` P-256).
    P256 {
        /// The 32-byte x coordinate.
        x: String,
        /// The 32-byte y coordinate.
        y: String,
    },
}

/// Computes the RFC 7638 SHA-256 thumbprint of a public JWK, as base64url without padding.
///
/// The key is validated first (coordinate lengths, point on the curve), so the thumbprint is
/// only ever given for a key that [`verify`](crate::verify) would accept.
pub fn thumbprint(jwk: &Jwk) -> Result<String, DpopError> {
    PublicKey::from_jwk(jwk)?;
    Ok(thumbprint_of_valid(jwk))
}

/// The thumbprint of a key already validated by [`PublicKey::from_jwk`].
///
/// Strict base64url decoding to an exact length means each coordinate string is the one
/// canonical encoding of its bytes, so the strings can be hashed as they are.
pub(crate) fn thumbprint_of_valid(jwk: &Jwk) -> String {
    // Required members only, in lexicographic order, no whitespace (RFC 7638 §3.2).
    let canonical = match jwk {
        Jwk::Ed25519 { x } => format!(r#"{{"crv":"Ed25519","kty":"OKP","x":"{x}"}}"#),
        Jwk::P256 { x, y } => format!(r#"{{"crv":"P-256","kty":"EC","x":"{x}","y":"{y}"}}"#),
    };
    URL_SAFE_NO_PAD.encode(Sha256::digest(canonical.as_bytes()))
}

impl Jwk {
    /// Reads a JWK from the members of its JSON object.
    pub(crate) fn from_members(members: &Map<String, Value>) -> Result<Self, DpopError> {
        if members.contains_key("d") {
            return Err(DpopError::PrivateKey);
        }
        let kty = required_str(members, "jwk", "kty")?;
        let crv = optional_str(members, "jwk", "crv")?;
        match (kty, crv) {
            ("OKP", Some("Ed25519")) => Ok(Jwk::Ed25519 { x: required_str(members, "jwk", "x")?.to_owned() }),
            ("EC", Some("P-256")) => Ok(Jwk::P256 {
                x: required_str(members, "jwk", "x")?.to_owned(),
                y: required_str(members, "jwk", "y")?.to_owned(),
            }),
            _ => Err(DpopError::UnsupportedKey {
                kty: shown(kty),
                crv: crv.map_or_else(|| "(none)".to_owned(), shown),
            }),
        }
    }

    /// The key type as shown in errors.
    pub(crate) fn key_type(&self) -> &'static str {
        match self {
            Jwk::Ed25519 { .. } => "OKP/Ed25519",
            Jwk::P256 { .. } => "EC/P-256",
        }
    }
}

impl TryFrom<Map<String, Value>> for Jwk {
    type Error = DpopError;

    fn try_from(members: Map<String, Value>) -> Result<Self, DpopError> {
        Jwk::from_members(&members)
    }
}

/// The JSON form a [`Jwk`] is written as.
#[derive(Serialize)]
struct JwkMembers {
    kty: &'static str,
    crv: &'static str,
    x: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    y: Option<String>,
}

impl From<Jwk> for JwkMembers {
    fn from(jwk: Jwk) -> Self {
        match jwk {
            Jwk::Ed25519 { x } => JwkMembers { kty: "OKP", crv: "Ed25519", x, y: None },
            Jwk::P256 { x, y } => JwkMembers { kty: "EC", crv: "P-256", x, y: Some(y) },
        }
    }
}

/// A validated public key, ready to verify signatures.
pub(crate) enum PublicKey {
    Ed25519(ed25519_dalek::VerifyingKey),
    P256(p256::ecdsa::VerifyingKey),
}

/// Length of an Ed25519 public key and of each P-256 coordinate.
const COORDINATE_LEN: usize = 32;
/// Length of an Ed25519 signature and of an ES256 signature in JWS form (r || s).
const SIGNATURE_LEN: usize = 64;

impl PublicKey {
    /// Decodes and validates the coordinates of a JWK.
    pub(crate) fn from_jwk(jwk: &Jwk) -> Result<Self, DpopError> {
        match jwk {
            Jwk::Ed25519 { x } => ed25519_key(&coordinate(x, "x")?).map(PublicKey::Ed25519),
            Jwk::P256 { x, y } => p256_key(&coordinate(x, "x")?, &coordinate(y, "y")?).map(PublicKey::P256),
        }
    }

    /// Checks a JWS signature over `message`.
    pub(crate) fn verify(&self, message: &[u8], signature: &[u8]) -> Result<(), DpopError> {
        match self {
            PublicKey::Ed25519(key) => {
                let bytes = signature_bytes(signature, "EdDSA")?;
                let signature = ed25519_dalek::Signature::from_bytes(&bytes);
                // Strict: refuses non-canonical signatures and small-order keys.
                key.verify_strict(message, &signature).map_err(|_| DpopError::BadSignature)
            }
            PublicKey::P256(key) => {
                use p256::ecdsa::signature::Verifier;
                let bytes = signature_bytes(signature, "ES256")?;
                // JWS form r || s (RFC 7518 §3.4), not DER; zero or out-of-range scalars fail here.
                let signature =
                    p256::ecdsa::Signature::from_slice(&bytes).map_err(|_| DpopError::BadSignature)?;
                key.verify(message, &signature).map_err(|_| DpopError::BadSignature)
            }
        }
    }
}

/// Decodes one 32-byte coordinate.
fn coordinate(value: &str, member: &'static str) -> Result<[u8; COORDINATE_LEN], DpopError> {
    let bad = || DpopError::BadCoordinate { member, expected: COORDINATE_LEN };
    let bytes = URL_SAFE_NO_PAD.decode(value).map_err(|_| bad())?;
    <[u8; COORDINATE_LEN]>::try_from(bytes.as_slice()).map_err(|_| bad())
}

/// Builds an Ed25519 key, refusing non-canonical encodings and small-order points.
fn ed25519_key(x: &[u8; COORDINATE_LEN]) -> Result<ed25519_dalek::VerifyingKey, DpopError> {
    let invalid = |reason| DpopError::InvalidKey { key: "Ed25519", reason };
    if !ed25519_y_is_canonical(x) {
        return Err(invalid("x is not a canonical point encoding"));
    }
    let key = ed25519_dalek::VerifyingKey::from_bytes(x).map_err(|_| invalid("x is not a curve point"))?;
    if key.is_weak() {
        return Err(invalid("x is a small-order point"));
    }
    Ok(key)
}

/// Whether the y coordinate (little-endian, top bit is the sign of x) is below 2^255 - 19.
fn ed25519_y_is_canonical(x: &[u8; COORDINATE_LEN]) -> bool {
    let [first, middle @ .., last] = x;
    let at_least_p = *last & 0x7f == 0x7f && middle.iter().all(|&b| b == 0xff) && *first >= 0xed;
    !at_least_p
}

/// Builds a P-256 key from affine coordinates, refusing points not on the curve.
fn p256_key(
    x: &[u8; COORDINATE_LEN],
    y: &[u8; COORDINATE_LEN],
) -> Result<p256::ecdsa::VerifyingKey, DpopError> {
    let mut sec1 = Vec::with_capacity(1 + 2 * COORDINATE_LEN);
    sec1.push(0x04); // uncompressed point
    sec1.extend_from_slice(x);
    sec1.extend_from_slice(y);
    p256::ecdsa::VerifyingKey::from_sec1_bytes(&sec1)
        .map_err(|_| DpopError::InvalidKey { key: "P-256", reason: "the point is not on the curve" })
}

/// Checks the length of a signature.
fn signature_bytes(signature: &[u8], alg: &'static str) -> Result<[u8; SIGNATURE_LEN], DpopError> {
    <[u8; SIGNATURE_LEN]>::try_from(signature).map_err(|_| DpopError::SignatureLength {
        alg,
        expected: SIGNATURE_LEN,
        found: signature.len(),
    })
}
