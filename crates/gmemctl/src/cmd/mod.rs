//! One module per subcommand.

pub mod bench;
pub mod probe;
pub mod selftest;
pub mod status;
