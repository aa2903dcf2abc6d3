//! `bulksend enqueue`: one message from flags or an .eml file, or many from JSON lines, into the
//! local queue or through a running server's API (`--server URL`).
//!
//! Every message is validated first; bad JSON lines are reported with their line numbers and
//! the good ones are still enqueued. Exit status: 0 all accepted, 2 some lines rejected (the
//! rest enqueued), 1 a fatal error.

use std::io::{BufRead, IsTerminal};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use bulksend_queue::Queue;
use serde::Serialize;

use crate::app;
use bulksend::client::ApiClient;
use bulksend::compose::JsonMessage;

/// Messages per durable batch (local) or per request (`--server`).
const BATCH: usize = 500;
/// Bad lines listed in the summary (all are printed to stderr).
const MAX_LISTED_ERRORS: usize = 100;

#[derive(Debug, Default, clap::Args)]
pub(crate) struct EnqueueArgs {
    /// Envelope sender and From.
    #[arg(long)]
    pub(crate) from: Option<String>,
    /// Recipient (repeatable).
    #[arg(long)]
    pub(crate) to: Vec<String>,
    #[arg(long)]
    pub(crate) subject: Option<String>,
    /// Plain-text body.
    #[arg(long, conflicts_with = "body_file")]
    pub(crate) body: Option<String>,
    /// Plain-text body from a file.
    #[arg(long)]
    pub(crate) body_file: Option<PathBuf>,
    /// A ready RFC 5322 message (needs --from and --to for the envelope).
    #[arg(long, conflicts_with_all = ["subject", "body", "body_file", "jsonl"])]
    pub(crate) eml: Option<PathBuf>,
    /// JSON lines, one message per line ("-" = stdin).
    #[arg(long, conflicts_with_all = ["from", "to", "subject", "body", "body_file"])]
    pub(crate) jsonl: Option<String>,
    /// Idempotency key for a single message.
    #[arg(long)]
    pub(crate) id: Option<String>,
    /// Send through a running server's API instead of opening the queue.
    #[arg(long)]
    pub(crate) server: Option<String>,
    /// Bearer token for --server (default: api.token from the config).
    #[arg(long, env = "BULKSEND_API_TOKEN")]
    pub(crate) token: Option<String>,
}

#[derive(Debug, Default, Serialize)]
struct Summary {
    enqueued: u64,
    duplicates: u64,
    suppressed: u64,
    rejected: u64,
    ids: Vec<String>,
    errors: Vec<LineError>,
}

#[derive(Debug, Serialize)]
struct LineError {
    line: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    field: Option<String>,
    error: String,
}

/// Where accepted messages go.
enum Target {
    Local(Arc<Queue>),
    Server(ApiClient),
}

pub(crate) fn run(config: Option<&Path>, args: EnqueueArgs) -> anyhow::Result<i32> {
    let settings = app::settings(config)?;
    let max = settings.smtp.max_message_size;
    let target = match &args.server {
        Some(url) => Target::Server(ApiClient::new(
            url,
            args.token.clone().or(settings.api.token.clone()),
        )),
        None => Target::Local(app::open_queue(&settings)?),
    };
    let mut summary = Summary::default();
    if let Some(src) = &args.jsonl {
        jsonl(src, &target, max, &mut summary)?;
    } else {
        let msg = single(&args)?;
        // A bad flag is a fatal error naming the field, not a "rejected line".
        msg.build(max)
            .map_err(|e| anyhow::anyhow!("invalid message: {e}"))?;
        submit(&target, vec![(1, msg)], max, &mut summary)?;
    }
    // Keep the id list short in bulk runs; single enqueues print their id.
    if summary.ids.len() > 10 {
        summary.ids.clear();
    }
    println!("{}", serde_json::to_string(&summary)?);
    Ok(if summary.rejected > 0 { 2 } else { 0 })
}

fn single(args: &EnqueueArgs) -> anyhow::Result<JsonMessage> {
    let from = args
        .from
        .clone()
        .context("--from is required (or use --jsonl)")?;
    anyhow::ensure!(!args.to.is_empty(), "at least one --to is required");
    let mut msg = JsonMessage {
        id: args.id.clone(),
        from,
        to: args.to.clone(),
        ..JsonMessage::default()
    };
    if let Some(path) = &args.eml {
        let raw = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
        let raw = String::from_utf8(raw).with_context(|| {
            format!("{}: not UTF-8 (8-bit bodies: encode them)", path.display())
        })?;
        msg.raw = Some(raw);
    } else {
        msg.subject = args.subject.clone();
        msg.text = match (&args.body, &args.body_file) {
            (Some(b), _) => Some(b.clone()),
            (None, Some(p)) => Some(
                std::fs::read_to_string(p)
                    .with_context(|| format!("cannot read {}", p.display()))?,
            ),
            (None, None) => anyhow::bail!("--body, --body-file or --eml is required"),
        };
    }
    Ok(msg)
}

fn jsonl(src: &str, target: &Target, max: usize, summary: &mut Summary) -> anyhow::Result<()> {
    let reader: Box<dyn BufRead> = if src == "-" {
        Box::new(std::io::stdin().lock())
    } else {
        let f = std::fs::File::open(src).with_context(|| format!("cannot open {src}"))?;
        Box::new(std::io::BufReader::new(f))
    };
    let size = if src == "-" {
        None
    } else {
        std::fs::metadata(src).ok().map(|m| m.len())
    };
    let bar = progress(size);
    let mut batch = Vec::with_capacity(BATCH);
    for (i, line) in reader.lines().enumerate() {
        let n = i + 1;
        let line = line.with_context(|| format!("line {n}: cannot read"))?;
        if let Some(b) = &bar {
            b.inc(line.len() as u64 + 1);
        }
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<JsonMessage>(&line) {
            Ok(m) => batch.push((n, m)),
            Err(e) => reject(summary, n, None, format!("invalid JSON: {e}")),
        }
        if batch.len() == BATCH {
            submit(target, std::mem::take(&mut batch), max, summary)?;
        }
    }
    submit(target, batch, max, summary)?;
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    Ok(())
}

fn progress(size: Option<u64>) -> Option<indicatif::ProgressBar> {
    let size = size.filter(|&s| s > 1 << 20)?;
    if !std::io::stderr().is_terminal() {
        return None;
    }
    let bar = indicatif::ProgressBar::new(size);
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
    ) {
        bar.set_style(style);
    }
    Some(bar)
}

fn reject(summary: &mut Summary, line: usize, field: Option<String>, error: String) {
    eprintln!(
        "line {line}: {}{error}",
        field
            .as_deref()
            .map(|f| format!("{f}: "))
            .unwrap_or_default()
    );
    summary.rejected += 1;
    if summary.errors.len() < MAX_LISTED_ERRORS {
        summary.errors.push(LineError { line, field, error });
    }
}

/// Validates each message, then enqueues the valid ones in one durable batch (or request).
fn submit(
    target: &Target,
    msgs: Vec<(usize, JsonMessage)>,
    max: usize,
    summary: &mut Summary,
) -> anyhow::Result<()> {
    if msgs.is_empty() {
        return Ok(());
    }
    let mut good = Vec::with_capacity(msgs.len());
    for (n, m) in msgs {
        match m.build(max) {
            Ok(built) => good.push((n, m, built)),
            Err(e) => reject(summary, n, Some(e.field), e.message),
        }
    }
    match target {
        Target::Local(queue) => {
            let lines: Vec<usize> = good.iter().map(|(n, _, _)| *n).collect();
            let results = queue.enqueue_batch(good.into_iter().map(|(_, _, b)| b).collect())?;
            for (n, r) in lines.into_iter().zip(results) {
                match r {
                    Ok(e) => {
                        count(summary, e.id.to_string(), e.duplicate, e.suppressed.len());
                    }
                    Err(e) => reject(summary, n, None, e.to_string()),
                }
            }
        }
        Target::Server(client) => {
            let msgs: Vec<JsonMessage> = good.into_iter().map(|(_, m, _)| m).collect();
            for r in client.post_messages(&msgs)? {
                count(summary, r.id, r.duplicate, r.suppressed.len());
            }
        }
    }
    Ok(())
}

fn count(summary: &mut Summary, id: String, duplicate: bool, suppressed: usize) {
    if duplicate {
        summary.duplicates += 1;
    } else {
        summary.enqueued += 1;
    }
    summary.suppressed += suppressed as u64;
    summary.ids.push(id);
}
