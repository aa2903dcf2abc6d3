//! bulksend's delivery engine.
//!
//! ```text
//! queue (due recipients) ──► schedule: per-destination pools ──► smtp::Session ──► receiver
//!            ▲                                                        │
//!            └────────────── outcome (classify) ◄──────── RcptResult ◄┘
//! ```
//!
//! - [`smtp`]: the pipelined SMTP client (RFC 5321, RFC 2920, RFC 3207), sans-IO core plus a
//!   tokio session with one deadline per command and per data block.
//! - [`sink`]: a small receiving SMTP server that accepts everything, used by `bulksend demo`
//!   and by benchmarks as a fast loopback peer.

pub mod classify;
pub mod delivery;
pub mod events;
pub mod metrics;
pub mod route;
pub mod sink;
pub mod smtp;
