//! Input limits for every field a caller controls, and the checks that enforce them. The API
//! layer turns a [`FieldError`] into INVALID_ARGUMENT with the message below.

/// Tenant names, in bytes.
pub const TENANT_LEN_MAX: usize = 64;
/// User ids, client ids and device ids, in bytes.
pub const ID_LEN_MAX: usize = 128;
/// RFC 7638 SHA-256 thumbprints are exactly 43 base64url characters.
pub const JKT_LEN: usize = 43;
/// Authentication method references per session.
pub const AMR_VALUES_MAX: usize = 8;
/// One authentication method reference, in bytes.
pub const AMR_LEN_MAX: usize = 32;
/// Revocation free text, in bytes.
pub const TEXT_LEN_MAX: usize = 256;
/// Revocation actor, in bytes.
pub const ACTOR_LEN_MAX: usize = 128;
/// Session metadata: ip, user agent, region, in bytes.
pub const IP_LEN_MAX: usize = 64;
pub const USER_AGENT_LEN_MAX: usize = 256;
pub const REGION_LEN_MAX: usize = 32;
/// Highest authenticator assurance level (NIST SP 800-63B).
pub const AAL_MAX: u8 = 3;
/// Longest session lifetime accepted: one year.
pub const TTL_MS_MAX: u64 = 366 * 24 * 3600 * 1000;
/// Checks in one batch call.
pub const CHECK_BATCH_LEN_MAX: usize = 256;

/// A field that failed validation; the message says which field and what is allowed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {problem}")]
pub struct FieldError {
    pub field: &'static str,
    pub problem: String,
}

impl FieldError {
    pub fn new(field: &'static str, problem: impl Into<String>) -> Self {
        FieldError { field, problem: problem.into() }
    }
}

/// A required identifier: non-empty, at most `max` bytes, printable ASCII without spaces or `/`.
pub fn check_id(field: &'static str, value: &str, max: usize) -> Result<(), FieldError> {
    if value.is_empty() {
        return Err(FieldError::new(field, "must not be empty"));
    }
    if value.len() > max {
        return Err(FieldError::new(field, format!("must be at most {max} bytes, got {}", value.len())));
    }
    if !value.bytes().all(|b| b.is_ascii_graphic() && b != b'/') {
        return Err(FieldError::new(field, "must be printable ASCII without spaces or '/'"));
    }
    Ok(())
}

/// Optional free text: at most `max` bytes (any UTF-8; control characters refused).
pub fn check_text(field: &'static str, value: &str, max: usize) -> Result<(), FieldError> {
    if value.len() > max {
        return Err(FieldError::new(field, format!("must be at most {max} bytes, got {}", value.len())));
    }
    if value.chars().any(char::is_control) {
        return Err(FieldError::new(field, "must not contain control characters"));
    }
    Ok(())
}

/// A key thumbprint: exactly 43 base64url characters (SHA-256, RFC 7638).
pub fn check_jkt(field: &'static str, value: &str) -> Result<(), FieldError> {
    let ok =
        value.len() == JKT_LEN && value.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(FieldError::new(field, "must be a 43-character base64url SHA-256 thumbprint (RFC 7638)"))
    }
}

/// An assurance level 1..=3.
pub fn check_aal(field: &'static str, value: u32) -> Result<u8, FieldError> {
    match u8::try_from(value) {
        Ok(aal @ 1..=AAL_MAX) => Ok(aal),
        _ => Err(FieldError::new(field, format!("must be between 1 and {AAL_MAX}, got {value}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_bounded_and_printable() {
        assert!(check_id("user_id", "alice", ID_LEN_MAX).is_ok());
        assert_eq!(check_id("user_id", "", 8).unwrap_err().to_string(), "user_id: must not be empty");
        assert!(check_id("user_id", &"a".repeat(9), 8).is_err());
        assert!(check_id("user_id", "a b", 8).is_err());
        assert!(check_id("user_id", "a/b", 8).is_err());
        assert!(check_id("user_id", "é", 8).is_err());
    }

    #[test]
    fn jkt_and_aal() {
        assert!(check_jkt("jkt", &"A".repeat(43)).is_ok());
        assert!(check_jkt("jkt", &"A".repeat(42)).is_err());
        assert!(check_jkt("jkt", &format!("{}=", "A".repeat(42))).is_err());
        assert_eq!(check_aal("aal", 2), Ok(2));
        assert!(check_aal("aal", 0).is_err());
        assert!(check_aal("aal", 4).is_err());
        assert!(check_aal("aal", 256 + 2).is_err());
    }
}
