//! One module per subcommand.

pub mod bench;
pub mod demo;
pub mod host;
pub mod migrate;
pub mod probe;
pub mod recover;
pub mod run;
pub mod selftest;
pub mod status;
