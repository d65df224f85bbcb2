//! Reading members of untrusted JSON objects with precise errors.

use serde_json::{Map, Value};

use crate::DpopError;

/// Parses bytes as a JSON object.
pub(crate) fn object(bytes: &[u8], part: &'static str) -> Result<Map<String, Value>, DpopError> {
    match serde_json::from_slice(bytes) {
        Ok(Value::Object(members)) => Ok(members),
        _ => Err(DpopError::NotJsonObject { part }),
    }
}

/// A string member that must be present.
pub(crate) fn required_str<'a>(
    members: &'a Map<String, Value>,
    part: &'static str,
    member: &'static str,
) -> Result<&'a str, DpopError> {
    optional_str(members, part, member)?.ok_or(DpopError::MissingMember { part, member })
}

/// A string member that may be absent.
pub(crate) fn optional_str<'a>(
    members: &'a Map<String, Value>,
    part: &'static str,
    member: &'static str,
) -> Result<Option<&'a str>, DpopError> {
    match members.get(member) {
        None => Ok(None),
        Some(Value::String(text)) => Ok(Some(text)),
        Some(_) => Err(DpopError::WrongType { part, member, expected: "a string" }),
    }
}
