//! The `cascade` binary: runs a node (`serve`), talks to one (client commands), or exercises one
//! (`demo`, `load`). See `cascade --help`, including the exit codes.
//!
//! This file only hands over to the command line in `cli/`; it must not hold logic of its own.

mod cli;

fn main() -> std::process::ExitCode {
    cli::main()
}
