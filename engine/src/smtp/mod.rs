//! The SMTP client: a sans-IO core ([`reply`], [`command`], [`ext`], [`data`]) that takes and
//! returns bytes and imports no I/O, and a thin tokio layer ([`client`], [`tls`]) that owns the
//! connection and applies a deadline to every command and every data block.

pub mod client;
pub mod command;
pub mod data;
pub mod ext;
pub mod reply;
pub mod tls;

pub use client::{ClientSettings, Envelope, RcptResult, Session, SessionError, Transaction};
pub use command::{Address, AddressError, Command, Phase};
pub use data::{prepare, DataError, MessageData};
pub use ext::Extensions;
pub use reply::{EnhancedStatus, Reply, ReplyError};
