//! bincode 2 encoding of everything replicated or sent between nodes. One configuration, with a
//! decode size limit so a hostile or corrupt payload cannot make a node allocate without bound.

use crate::command::{Envelope, FORMAT_VERSION};
use serde::{de::DeserializeOwned, Serialize};

/// Largest payload any decode will accept.
pub const DECODE_BYTES_MAX: usize = 64 << 20;

/// Why bytes could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("encode failed: {0}")]
    Encode(#[from] bincode::error::EncodeError),
    #[error("decode failed: {0}")]
    Decode(#[from] bincode::error::DecodeError),
    #[error("log entry format version {found} is not supported by this build (supports {supported})")]
    UnsupportedVersion { found: u8, supported: u8 },
    #[error("{trailing} trailing bytes after the encoded value")]
    Trailing { trailing: usize },
}

fn config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<DECODE_BYTES_MAX>()
}

/// Encode any serde value.
pub fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, CodecError> {
    Ok(bincode::serde::encode_to_vec(value, config())?)
}

/// Decode a serde value, refusing trailing bytes.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
    let (value, read) = bincode::serde::decode_from_slice(bytes, config())?;
    if read != bytes.len() {
        return Err(CodecError::Trailing { trailing: bytes.len() - read });
    }
    Ok(value)
}

/// Decode a log entry's command, checking its format version.
pub fn decode_envelope(bytes: &[u8]) -> Result<Envelope, CodecError> {
    let envelope: Envelope = decode(bytes)?;
    if envelope.version != FORMAT_VERSION {
        return Err(CodecError::UnsupportedVersion { found: envelope.version, supported: FORMAT_VERSION });
    }
    Ok(envelope)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::command::{Command, Reason, Revocation};
    use crate::ids::SessionId;

    /// Log entries round-trip and carry their format version (issue: versioned log format).
    #[test]
    fn envelope_roundtrip_and_version_check() {
        let env = Envelope::new(
            42,
            Command::RevokeSession {
                session_id: SessionId { shard: 3, nonce: 7 },
                revocation: Revocation::new(Reason::Logout, "alice", "bye"),
            },
        );
        let bytes = encode(&env).unwrap();
        assert_eq!(decode_envelope(&bytes).unwrap(), env);
        let future = Envelope { version: FORMAT_VERSION + 1, ..env };
        let err = decode_envelope(&encode(&future).unwrap()).unwrap_err();
        assert!(matches!(err, CodecError::UnsupportedVersion { .. }), "{err}");
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        for bytes in [&[][..], &[0xff; 3], &[1, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x0f]] {
            assert!(decode_envelope(bytes).is_err());
        }
    }
}
