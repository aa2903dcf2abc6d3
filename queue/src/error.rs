use std::path::PathBuf;

use crate::{RecipientId, RecipientState};

/// Everything the queue can fail with.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// The store could not be opened (missing permissions, locked by another process,
    /// unreadable or corrupt sled files, wrong schema version).
    #[error("cannot open queue at {}: {source}", path.display())]
    Open {
        path: PathBuf,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A stored value could not be decoded.
    #[error("corrupt queue data in {} at key {key}: {detail}", path.display())]
    Corrupt {
        path: PathBuf,
        key: String,
        detail: String,
    },
    #[error("queue I/O error: {0}")]
    Io(#[from] std::io::Error),
    #[error("queue storage error: {0}")]
    Sled(#[from] sled::Error),
    /// Rejected input: no recipients, address without '@', CR/LF/NUL in an address, ...
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// No such recipient (never existed, deleted or purged).
    #[error("no recipient {0} in the queue")]
    NotFound(RecipientId),
    /// `complete` on a recipient that is not leased.
    #[error("recipient {id} is {state}, not leased")]
    NotLeased {
        id: RecipientId,
        state: RecipientState,
    },
    /// The writer thread is gone: the queue was shut down, or a flush/fsync failed (after a
    /// failed fsync nothing written since the last good one can be trusted, so the queue
    /// refuses further writes; reopen it).
    #[error("queue is closed{}", if reason.is_empty() { String::new() } else { format!(": {reason}") })]
    Closed { reason: String },
}
