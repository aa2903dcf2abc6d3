//! One module per subcommand.

pub(crate) mod config;
pub(crate) mod demo;
pub(crate) mod enqueue;
pub(crate) mod queue;
pub(crate) mod serve;
pub(crate) mod suppress;
