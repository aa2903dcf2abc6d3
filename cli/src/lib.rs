//! The `bulksend` library half: the message format shared by the CLI and the HTTP injection
//! API, the API server, and its client. The binary (`main.rs`, `app.rs`, `cmd/`) holds one
//! module per subcommand.

pub mod api;
pub mod client;
pub mod compose;
