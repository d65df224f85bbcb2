//! Bugs planted on purpose, to prove that the simulator's checkers catch them (DESIGN §6).
//!
//! Compiled in only with the `planted-bugs` feature, which only the simulator enables, and even
//! then off until the simulator plants one. Without the feature [`planted`] is a constant
//! `false` and the code behind it is dead.

/// A known bug that production code can be told to commit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Bug {
    /// The log acknowledges an append to Raft before the bytes are synced (breaks P1 when a
    /// majority loses power).
    AckBeforeFlush,
    /// A shard leader answers checks without a freshness proof (breaks P2 when it is cut off).
    StaleLeaderRead,
    /// Revoking a session skips its last SSO child (breaks P3).
    SkipCascadeChild,
}

impl Bug {
    pub const ALL: [Bug; 3] = [Bug::AckBeforeFlush, Bug::StaleLeaderRead, Bug::SkipCascadeChild];

    pub fn name(self) -> &'static str {
        match self {
            Bug::AckBeforeFlush => "ack-before-flush",
            Bug::StaleLeaderRead => "stale-leader-read",
            Bug::SkipCascadeChild => "skip-cascade-child",
        }
    }

    pub fn from_name(name: &str) -> Option<Bug> {
        Bug::ALL.into_iter().find(|b| b.name() == name)
    }

    #[cfg(feature = "planted-bugs")]
    fn bit(self) -> u8 {
        match self {
            Bug::AckBeforeFlush => 1,
            Bug::StaleLeaderRead => 2,
            Bug::SkipCascadeChild => 4,
        }
    }
}

#[cfg(feature = "planted-bugs")]
static PLANTED: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);

/// Turn `bugs` on (and every other bug off) for the whole process.
#[cfg(feature = "planted-bugs")]
pub fn plant(bugs: &[Bug]) {
    let bits = bugs.iter().fold(0, |acc, b| acc | b.bit());
    PLANTED.store(bits, std::sync::atomic::Ordering::SeqCst);
}

/// Whether production code must commit `bug` now.
#[inline]
pub fn planted(bug: Bug) -> bool {
    #[cfg(feature = "planted-bugs")]
    {
        PLANTED.load(std::sync::atomic::Ordering::Relaxed) & bug.bit() != 0
    }
    #[cfg(not(feature = "planted-bugs"))]
    {
        let _ = bug;
        false
    }
}

/// The environment variable through which a node process is told to plant bugs (the chaos
/// harness uses it): a comma-separated list of [`Bug::name`]s.
pub const ENV: &str = "CASCADE_PLANTED_BUGS";

/// Plants the bugs `$CASCADE_PLANTED_BUGS` names. Unset or empty: nothing. A name that is not a
/// bug, or any name in a binary built without the `planted-bugs` feature, is an error: a node
/// told to misbehave must never silently behave (or the reverse).
pub fn plant_from_env() -> Result<Vec<Bug>, String> {
    let Ok(list) = std::env::var(ENV) else { return Ok(Vec::new()) };
    let mut bugs = Vec::new();
    for name in list.split(',').map(str::trim).filter(|n| !n.is_empty()) {
        let bug = Bug::from_name(name).ok_or_else(|| {
            let known: Vec<&str> = Bug::ALL.iter().map(|b| b.name()).collect();
            format!("{ENV}: no planted bug {name:?}; known: {}", known.join(", "))
        })?;
        bugs.push(bug);
    }
    if bugs.is_empty() {
        return Ok(bugs);
    }
    #[cfg(feature = "planted-bugs")]
    {
        plant(&bugs);
        Ok(bugs)
    }
    #[cfg(not(feature = "planted-bugs"))]
    {
        Err(format!("{ENV} is set but this binary was built without the planted-bugs feature"))
    }
}
