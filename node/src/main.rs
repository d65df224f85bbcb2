//! The `cascade` binary: runs a node (`serve`), talks to one (client commands), or exercises one
//! (`demo`, `load`). See `cascade --help`, including the exit codes.
//!
//! This file only hands over to the command line in `cli/`; it must not hold logic of its own.

mod cli;

/// mimalloc, not glibc's malloc: allocation was a fifth of a node's CPU under checks; with
/// mimalloc, checks/s went up 15 to 20% (BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    cli::main()
}
