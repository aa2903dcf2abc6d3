//! `bulksend queue stats|list|show|retry|delete|compact`: inspect and act on the local queue.

use std::path::Path;
use std::time::SystemTime;

use anyhow::Context;
use bulksend_engine::events::rfc3339;
use bulksend_queue::{MessageId, RecipientRecord, RecipientState};

use crate::app;

#[derive(Debug, clap::Subcommand)]
pub(crate) enum QueueCmd {
    /// Recipients by state and destination, the oldest due, disk use.
    Stats {
        #[arg(long)]
        json: bool,
    },
    /// Recipient records, optionally of one state.
    List {
        /// scheduled, leased, delivered, bounced, expired, suppressed, unknown
        #[arg(long)]
        state: Option<String>,
        #[arg(long, default_value_t = 100)]
        limit: usize,
        #[arg(long)]
        json: bool,
    },
    /// One message with every recipient's state.
    Show {
        id: String,
        #[arg(long)]
        json: bool,
    },
    /// Make a message's waiting recipients due now.
    Retry { id: String },
    /// Remove a message and all its records.
    Delete { id: String },
    /// Rewrite the store with only its live data, giving freed disk space back (a running
    /// `serve` does this by itself once a drained store is mostly dead space).
    Compact {
        #[arg(long)]
        json: bool,
    },
}

fn parse_state(s: &str) -> anyhow::Result<RecipientState> {
    serde_json::from_value(serde_json::Value::String(s.to_ascii_lowercase()))
        .map_err(|_| anyhow::anyhow!("unknown state {s:?} (scheduled, leased, delivered, bounced, expired, suppressed, unknown)"))
}

fn parse_id(s: &str) -> anyhow::Result<MessageId> {
    s.parse()
        .map_err(|_| anyhow::anyhow!("{s:?} is not a message id (16 hex digits)"))
}

fn record_json(r: &RecipientRecord) -> serde_json::Value {
    serde_json::json!({
        "recipient_id": r.id.to_string(),
        "address": r.address,
        "destination": r.destination,
        "state": r.state.as_str(),
        "attempts": r.attempts,
        "next_attempt": rfc3339(r.next_attempt),
        "created": rfc3339(r.created),
        "updated": rfc3339(r.updated),
        "last_reply": r.last_reply,
    })
}

pub(crate) fn run(config: Option<&Path>, cmd: QueueCmd) -> anyhow::Result<i32> {
    let settings = app::settings(config)?;
    let queue = app::open_queue(&settings)?;
    match cmd {
        QueueCmd::Stats { json } => {
            let s = queue.stats();
            if json {
                let v = serde_json::json!({
                    "by_state": s.by_state.iter().map(|(k, v)| (k.as_str(), *v)).collect::<std::collections::BTreeMap<_, _>>(),
                    "by_destination": s.by_destination,
                    "oldest_due": s.oldest_due.map(rfc3339),
                    "disk_bytes": s.disk_bytes,
                });
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                println!("queue: {}", settings.queue.path.display());
                for (state, n) in &s.by_state {
                    println!("  {:<11} {n}", state.as_str());
                }
                if let Some(t) = s.oldest_due {
                    let age = SystemTime::now().duration_since(t).unwrap_or_default();
                    println!(
                        "  oldest due  {} ({} ago)",
                        rfc3339(t),
                        humantime::format_duration(std::time::Duration::from_secs(age.as_secs()))
                    );
                }
                println!("  disk        {} bytes", s.disk_bytes);
                let mut dests: Vec<_> = s.by_destination.iter().collect();
                dests.sort_by(|a, b| b.1.cmp(a.1));
                if !dests.is_empty() {
                    println!("waiting by destination (top 20):");
                    for (d, n) in dests.into_iter().take(20) {
                        println!("  {n:>8}  {d}");
                    }
                }
            }
        }
        QueueCmd::List { state, limit, json } => {
            let state = state.as_deref().map(parse_state).transpose()?;
            let records = queue.list(state, limit)?;
            if json {
                let v: Vec<_> = records.iter().map(record_json).collect();
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                for r in records {
                    println!(
                        "{}  {:<10} {:>3}  {}  {}",
                        r.id,
                        r.state.as_str(),
                        r.attempts,
                        r.address,
                        r.last_reply.as_deref().unwrap_or("")
                    );
                }
            }
        }
        QueueCmd::Show { id, json } => {
            let id = parse_id(&id)?;
            let info = queue
                .message(id)?
                .with_context(|| format!("no message {id}"))?;
            let v = serde_json::json!({
                "id": info.id.to_string(),
                "sender": info.sender,
                "created": rfc3339(info.created),
                "size": info.size,
                "idempotency_key": info.idempotency_key,
                "recipients": info.recipients.iter().map(record_json).collect::<Vec<_>>(),
            });
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                println!(
                    "message {} from <{}> ({} bytes, created {})",
                    info.id,
                    info.sender,
                    info.size,
                    rfc3339(info.created)
                );
                for r in &info.recipients {
                    println!(
                        "  {:<10} {:>3}  {}  {}",
                        r.state.as_str(),
                        r.attempts,
                        r.address,
                        r.last_reply.as_deref().unwrap_or("")
                    );
                }
            }
        }
        QueueCmd::Retry { id } => {
            let n = queue.retry(parse_id(&id)?)?;
            println!("{n} recipient(s) due now");
        }
        QueueCmd::Delete { id } => {
            let id = parse_id(&id)?;
            if queue.delete(id)? {
                println!("deleted {id}");
            } else {
                eprintln!("no message {id}");
                return Ok(1);
            }
        }
        QueueCmd::Compact { json } => {
            let c = queue.compact()?;
            if json {
                println!(
                    "{}",
                    serde_json::json!({
                        "disk_bytes_before": c.disk_before,
                        "disk_bytes_after": c.disk_after,
                        "keys": c.keys,
                        "seconds": c.duration.as_secs_f64(),
                    })
                );
            } else {
                println!(
                    "compacted: {} -> {} bytes on disk, {} keys copied in {:.2} s",
                    c.disk_before,
                    c.disk_after,
                    c.keys,
                    c.duration.as_secs_f64()
                );
            }
        }
    }
    Ok(0)
}
