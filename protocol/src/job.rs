//! Mass revocation: which sessions a job selects, how it runs on a shard, and what it leaves in
//! the audit trail. Pure data and pure predicates, so every replica decides the same way.

use crate::command::{Reason, Revocation, WatermarkScope};
use crate::ids::{SessionId, UserKey};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

/// A job's id, the same on every shard it runs on; drawn by the node that starts it.
pub type JobId = u64;

/// Printed form of a job id: `job_` + 16 hex digits.
pub fn job_id_to_string(id: JobId) -> String {
    format!("job_{id:016x}")
}

/// Parse `job_<16 hex>` (or bare hex).
pub fn parse_job_id(s: &str) -> Option<JobId> {
    let hex = s.strip_prefix("job_").unwrap_or(s);
    if hex.is_empty() || hex.len() > 16 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u64::from_str_radix(hex, 16).ok()
}

/// A CIDR prefix matched against the `ip` a session was created from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpPrefix {
    pub addr: IpAddr,
    pub len: u8,
}

impl IpPrefix {
    /// Whether `ip` (as stored in session metadata) is inside the prefix. An `ip` that does not
    /// parse, or is of the other family, is outside.
    pub fn contains(&self, ip: &str) -> bool {
        let Ok(ip) = ip.parse::<IpAddr>() else { return false };
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = if self.len == 0 { 0 } else { u32::MAX << (32 - u32::from(self.len)) };
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = if self.len == 0 { 0 } else { u128::MAX << (128 - u32::from(self.len)) };
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

impl fmt::Display for IpPrefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

impl FromStr for IpPrefix {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (addr, len) = s.split_once('/').ok_or("must be a CIDR prefix like 10.0.0.0/8")?;
        let addr: IpAddr = addr.parse().map_err(|_| format!("{addr:?} is not an IP address"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let len: u8 = len.parse().map_err(|_| format!("prefix length {len:?} is not a number"))?;
        if len > max {
            return Err(format!("prefix length {len} is longer than {max}"));
        }
        Ok(IpPrefix { addr, len })
    }
}

/// Which sessions a mass revocation selects. Every condition given must hold; an empty filter
/// is refused by the API (it would select everything).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionFilter {
    pub tenant: Option<String>,
    pub client_id: Option<String>,
    /// With `tenant`: one user.
    pub user_id: Option<String>,
    /// With `tenant` and `user_id`: one device.
    pub device_id: Option<String>,
    /// Sessions created at or before this time.
    pub created_before_ms: Option<u64>,
    /// Sessions whose assurance level is below this.
    pub aal_below: Option<u8>,
    pub ip_prefix: Option<IpPrefix>,
    /// Region recorded in the session's metadata.
    pub region: Option<String>,
}

/// Facts about a session that a filter looks at.
pub struct SessionFacts<'a> {
    pub user: &'a UserKey,
    pub client_id: &'a str,
    pub device_id: Option<&'a str>,
    pub created_at_ms: u64,
    pub aal: u8,
    pub ip: &'a str,
    pub region: &'a str,
}

impl SessionFilter {
    pub fn is_empty(&self) -> bool {
        *self == SessionFilter::default()
    }

    /// Whether the filter only touches one user (and so one shard).
    pub fn single_user(&self) -> Option<UserKey> {
        match (&self.tenant, &self.user_id) {
            (Some(t), Some(u)) => Some(UserKey::new(t.clone(), u.clone())),
            _ => None,
        }
    }

    /// Whether a user could hold matching sessions (lets a scan skip users of other tenants).
    pub fn may_match_user(&self, user: &UserKey) -> bool {
        self.tenant.as_ref().is_none_or(|t| *t == user.tenant)
            && self.user_id.as_ref().is_none_or(|u| *u == user.user_id)
    }

    pub fn matches(&self, s: &SessionFacts<'_>) -> bool {
        self.may_match_user(s.user)
            && self.client_id.as_deref().is_none_or(|c| c == s.client_id)
            && self.device_id.as_deref().is_none_or(|d| Some(d) == s.device_id)
            && self.created_before_ms.is_none_or(|t| s.created_at_ms <= t)
            && self.aal_below.is_none_or(|a| s.aal < a)
            && self.ip_prefix.as_ref().is_none_or(|p| p.contains(s.ip))
            && self.region.as_deref().is_none_or(|r| r == s.region)
    }

    /// The watermark that revokes exactly what this filter selects, with its "not before" time
    /// (0 = the time the command applies), if one can: a tenant, a client of a tenant, a user or
    /// a device, optionally "created before". Such a job is one O(1) command per shard.
    pub fn watermark(&self) -> Option<(WatermarkScope, u64)> {
        if self.aal_below.is_some() || self.ip_prefix.is_some() || self.region.is_some() {
            return None;
        }
        let tenant = self.tenant.clone()?;
        let not_before = self.created_before_ms.unwrap_or(0);
        let scope = match (&self.client_id, &self.user_id, &self.device_id) {
            (None, None, None) => WatermarkScope::Tenant { tenant },
            (Some(client_id), None, None) => WatermarkScope::Client { tenant, client_id: client_id.clone() },
            (None, Some(user_id), None) => {
                WatermarkScope::User { user: UserKey::new(tenant, user_id.clone()) }
            }
            (None, Some(user_id), Some(device_id)) => WatermarkScope::Device {
                user: UserKey::new(tenant, user_id.clone()),
                device_id: device_id.clone(),
            },
            _ => return None,
        };
        Some((scope, not_before))
    }
}

impl fmt::Display for SessionFilter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts = Vec::new();
        if let Some(t) = &self.tenant {
            parts.push(format!("tenant={t}"));
        }
        if let Some(c) = &self.client_id {
            parts.push(format!("client={c}"));
        }
        if let Some(u) = &self.user_id {
            parts.push(format!("user={u}"));
        }
        if let Some(d) = &self.device_id {
            parts.push(format!("device={d}"));
        }
        if let Some(t) = self.created_before_ms {
            parts.push(format!("created_before_ms={t}"));
        }
        if let Some(a) = self.aal_below {
            parts.push(format!("aal_below={a}"));
        }
        if let Some(p) = &self.ip_prefix {
            parts.push(format!("ip={p}"));
        }
        if let Some(r) = &self.region {
            parts.push(format!("region={r}"));
        }
        f.write_str(&parts.join(" "))
    }
}

/// A user or one of their devices, as listed in a bulk revocation.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Target {
    User(UserKey),
    Device { user: UserKey, device_id: String },
}

impl Target {
    pub fn user(&self) -> &UserKey {
        match self {
            Target::User(u) | Target::Device { user: u, .. } => u,
        }
    }
}

/// What a job does.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum JobSelector {
    /// Sessions matching a filter, found by scanning the shard's users in bounded steps (or,
    /// when the filter is a watermark, revoked at once and only counted by the scan).
    Filter(SessionFilter),
    /// Users and devices streamed in numbered chunks by the caller.
    List,
}

/// What the caller asked for.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobSpec {
    pub selector: JobSelector,
    pub revocation: Revocation,
    /// Count what would be revoked; change nothing.
    pub dry_run: bool,
}

/// Where a job is on one shard.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum JobState {
    Running,
    Done,
    Cancelled,
}

impl JobState {
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Running => "running",
            JobState::Done => "done",
            JobState::Cancelled => "cancelled",
        }
    }
}

/// How a shard executes a job (decided when the job starts there).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum JobMode {
    /// Revoke each matching session as the scan reaches it.
    Revoke,
    /// Count matching active sessions; change nothing.
    DryRun,
    /// A watermark revoked everything at start; the scan counts the sessions it newly covered:
    /// created after `previous_ms` and at or before `watermark_ms`, active at `at_ms`.
    Tally { scope: WatermarkScope, previous_ms: u64, watermark_ms: u64, at_ms: u64 },
    /// Revoke (or, dry run, count) the users and devices of each chunk the caller sends.
    List,
}

/// A job as one shard knows it. Replicated: every replica holds the same record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Job {
    pub id: JobId,
    pub spec: JobSpec,
    pub mode: JobMode,
    pub state: JobState,
    pub started_ms: u64,
    /// 0 while running.
    pub finished_ms: u64,
    /// Scan jobs: the last user scanned (the next step starts after it).
    pub cursor: Option<UserKey>,
    /// List jobs: the highest chunk number applied (chunks at or below it are not applied again).
    pub last_chunk: u64,
    pub users_scanned: u64,
    /// Sessions revoked (dry run: that would be revoked; tally: newly covered).
    pub sessions: u64,
    /// Who cancelled, if cancelled.
    pub cancelled_by: String,
}

impl Job {
    /// Whether the shard's leader still has scan steps to propose for it.
    pub fn scanning(&self) -> bool {
        self.state == JobState::Running && matches!(self.spec.selector, JobSelector::Filter(_))
    }
}

/// What an audit record is about.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum AuditAction {
    RevokeSession {
        session_id: SessionId,
    },
    RevokeFamily {
        session_id: SessionId,
    },
    RevokeDevice {
        device_id: String,
    },
    RevokeUser,
    Watermark {
        scope: WatermarkScope,
        watermark_ms: u64,
    },
    /// Refresh-token reuse detected: the family was revoked.
    RefreshReuse {
        session_id: SessionId,
    },
    /// Sessions evicted to make room under the per-user session limit.
    SessionLimit,
    /// A mass revocation finished or was cancelled on this shard.
    Job {
        job: JobId,
        selector: JobSelector,
        state: JobState,
    },
}

/// One entry of the audit trail: who, why, when, what, how many. Written by the state machine
/// for every revocation, so it is replicated like everything else.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditRecord {
    pub at_ms: u64,
    pub actor: String,
    pub reason: Reason,
    pub text: String,
    /// The user concerned, for single-user actions.
    pub user: Option<UserKey>,
    pub action: AuditAction,
    /// Sessions the action revoked.
    pub sessions: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ip_prefixes_match_by_family_and_length() {
        let p: IpPrefix = "10.1.0.0/16".parse().unwrap();
        assert!(p.contains("10.1.200.3"));
        assert!(!p.contains("10.2.0.1"));
        assert!(!p.contains("::1"));
        assert!(!p.contains("not an ip"));
        let all: IpPrefix = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains("192.168.1.1"));
        let v6: IpPrefix = "2001:db8::/32".parse().unwrap();
        assert!(v6.contains("2001:db8:1::7"));
        assert!("10.0.0.0/33".parse::<IpPrefix>().is_err());
        assert!("10.0.0.0".parse::<IpPrefix>().is_err());
    }

    #[test]
    fn only_plain_scopes_are_watermarks() {
        let tenant = SessionFilter { tenant: Some("t".into()), ..Default::default() };
        assert_eq!(tenant.watermark(), Some((WatermarkScope::Tenant { tenant: "t".into() }, 0)));
        let aal = SessionFilter { aal_below: Some(2), ..tenant.clone() };
        assert_eq!(aal.watermark(), None);
        let user_and_client =
            SessionFilter { client_id: Some("c".into()), user_id: Some("u".into()), ..tenant.clone() };
        assert_eq!(user_and_client.watermark(), None);
        let before = SessionFilter { created_before_ms: Some(5), ..tenant };
        assert_eq!(before.watermark(), Some((WatermarkScope::Tenant { tenant: "t".into() }, 5)));
        let no_tenant = SessionFilter { created_before_ms: Some(5), ..Default::default() };
        assert_eq!(no_tenant.watermark(), None);
    }

    #[test]
    fn job_ids_round_trip() {
        let id = 0x00ab_cdef_0123_4567;
        assert_eq!(parse_job_id(&job_id_to_string(id)), Some(id));
        assert_eq!(parse_job_id("job_xyz"), None);
    }
}
