//! Subcommand implementations of the CLI.
pub(crate) mod bench;
