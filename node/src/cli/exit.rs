//! Exit codes of the `cascade` binary, in one place, and the mapping from an error to its code.
//!
//! This file decides how a failure is reported (code and one `error:` line); it must not print
//! results, retry, or know about any particular subcommand.

use std::fmt;
use tonic::Code;

/// The command did what was asked.
pub const SUCCESS: u8 = 0;
/// Unexpected or internal error (including a failed `demo` step and a server-side INTERNAL).
pub const INTERNAL: u8 = 1;
/// Usage error: bad flags or arguments (clap uses the same code).
pub const USAGE: u8 = 2;
/// The server refused the request; its message says why.
pub const REFUSED: u8 = 3;
/// The server could not be reached, was UNAVAILABLE, or the deadline ran out.
pub const UNREACHABLE: u8 = 4;
/// `check`: the session is not VALID (the status is printed); `drill`: a promise was broken.
pub const NOT_VALID: u8 = 5;

/// The exit-code table shown at the end of `--help`.
pub const HELP: &str = "\
Exit codes:
  0  success
  1  unexpected or internal error (a demo step that did not behave as promised)
  2  usage error (bad flags or arguments)
  3  the server refused the request: INVALID_ARGUMENT, NOT_FOUND, FAILED_PRECONDITION,
     ALREADY_EXISTS, RESOURCE_EXHAUSTED, PERMISSION_DENIED, UNAUTHENTICATED
  4  server unreachable, UNAVAILABLE, or DEADLINE_EXCEEDED (see --timeout-ms)
  5  check: the session is not VALID (its status is printed);
     drill: a promise was broken during the drill (the report says which)";

/// A gRPC call that ended in a non-OK status, kept as plain data so it prints as one line.
#[derive(Debug)]
pub struct RpcError {
    /// The RPC that failed, e.g. `CheckSession`.
    pub rpc: &'static str,
    pub code: Code,
    /// The server's status message (or ours, for a local deadline).
    pub message: String,
}

impl fmt::Display for RpcError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let verb = if code_exit(self.code) == REFUSED { "refused" } else { "failed" };
        write!(f, "{} {verb}: {}", self.rpc, code_name(self.code))?;
        if !self.message.is_empty() {
            write!(f, ": {}", self.message)?;
        }
        Ok(())
    }
}

impl std::error::Error for RpcError {}

/// The server could not be reached at all (connection refused, DNS, TLS, connect timeout).
#[derive(Debug)]
pub struct Unreachable {
    pub addr: String,
    /// The transport error with its causes, flattened to one line.
    pub detail: String,
}

impl fmt::Display for Unreachable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "cannot reach the server at {}: {} (is `cascade serve` running? see --addr)",
            self.addr, self.detail
        )
    }
}

impl std::error::Error for Unreachable {}

/// A usage problem clap could not see (e.g. a malformed `--addr`).
#[derive(Debug)]
pub struct Usage(pub String);

impl fmt::Display for Usage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Usage {}

/// Exit code for a gRPC status code.
pub fn code_exit(code: Code) -> u8 {
    match code {
        Code::InvalidArgument
        | Code::NotFound
        | Code::FailedPrecondition
        | Code::AlreadyExists
        | Code::ResourceExhausted
        | Code::PermissionDenied
        | Code::Unauthenticated => REFUSED,
        Code::Unavailable | Code::DeadlineExceeded => UNREACHABLE,
        _ => INTERNAL,
    }
}

/// Exit code for any error a command returned: the first cause we recognise decides.
pub fn error_exit(err: &anyhow::Error) -> u8 {
    for cause in err.chain() {
        if let Some(rpc) = cause.downcast_ref::<RpcError>() {
            return code_exit(rpc.code);
        }
        if cause.is::<Unreachable>() {
            return UNREACHABLE;
        }
        if cause.is::<Usage>() {
            return USAGE;
        }
    }
    INTERNAL
}

/// The proto name of a gRPC status code, as gRPC documentation spells it.
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The documented exit codes are what callers' scripts branch on: pin the mapping.
    #[test]
    fn status_codes_map_to_documented_exits() {
        assert_eq!(code_exit(Code::InvalidArgument), REFUSED);
        assert_eq!(code_exit(Code::NotFound), REFUSED);
        assert_eq!(code_exit(Code::ResourceExhausted), REFUSED);
        assert_eq!(code_exit(Code::Unauthenticated), REFUSED);
        assert_eq!(code_exit(Code::Unavailable), UNREACHABLE);
        assert_eq!(code_exit(Code::DeadlineExceeded), UNREACHABLE);
        assert_eq!(code_exit(Code::Internal), INTERNAL);
    }

    #[test]
    fn error_chain_is_searched_for_a_known_cause() {
        let rpc = RpcError { rpc: "CheckSession", code: Code::NotFound, message: "no such session".into() };
        let err = anyhow::Error::new(rpc).context("checking cs_x");
        assert_eq!(error_exit(&err), REFUSED);
        assert_eq!(format!("{err:#}"), "checking cs_x: CheckSession refused: NOT_FOUND: no such session");
        let err = anyhow::Error::new(Unreachable { addr: "http://x".into(), detail: "refused".into() });
        assert_eq!(error_exit(&err), UNREACHABLE);
        assert_eq!(error_exit(&anyhow::anyhow!("boom")), INTERNAL);
    }
}
