//! Process-wide memory settings of a node.

/// Turn transparent huge pages off for this process (Linux; elsewhere nothing to do).
///
/// mimalloc asks the kernel for huge pages on its segments, and it hands memory it freed back to
/// the kernel after 10 ms; touching that memory again then made the kernel zero a whole 2 MiB
/// page. Under checks that zeroing was a fifth of the node's CPU (perf, 400,000 sessions), and
/// turning huge pages off took checks from 7,300–12,500/s to 17,700–18,500/s and their p99 from
/// 22–34 ms to 7.5–9 ms there. At 1,000,000 sessions one run showed no gain for unary checks,
/// a gain for batches, and the same RSS (BENCHMARKS.md).
pub fn disable_transparent_huge_pages() -> std::io::Result<()> {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: PR_SET_THP_DISABLE takes plain integers and touches no memory of ours.
        let done = unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) };
        if done != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}
