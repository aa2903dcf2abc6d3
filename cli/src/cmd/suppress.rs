//! `bulksend suppress list|add|remove|import|export`: the suppression list.
//!
//! Import/export format: one address per line, optionally `address,reason`; lines starting
//! with `#` are comments. Export writes `address,reason,time` (RFC 3339).

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};

use anyhow::Context;
use bulksend_engine::events::rfc3339;
use bulksend_engine::smtp::Address;

use crate::app;

#[derive(Debug, clap::Subcommand)]
pub(crate) enum SuppressCmd {
    List {
        #[arg(long)]
        json: bool,
    },
    Add {
        address: String,
        #[arg(long, default_value = "added by operator")]
        reason: String,
    },
    Remove {
        address: String,
    },
    /// Add every address of FILE ("-" = stdin).
    Import {
        file: String,
        #[arg(long, default_value = "imported")]
        reason: String,
    },
    /// Write the list to FILE (default stdout).
    Export {
        #[arg(long)]
        output: Option<PathBuf>,
    },
}

pub(crate) fn run(config: Option<&Path>, cmd: SuppressCmd) -> anyhow::Result<i32> {
    let settings = app::settings(config)?;
    let queue = app::open_queue(&settings)?;
    match cmd {
        SuppressCmd::List { json } => {
            let list = queue.suppress_list()?;
            if json {
                let v: Vec<_> = list
                    .iter()
                    .map(|s| serde_json::json!({"address": s.address, "reason": s.reason, "at": rfc3339(s.at)}))
                    .collect();
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                for s in list {
                    println!("{}  {}  {}", s.address, rfc3339(s.at), s.reason);
                }
            }
        }
        SuppressCmd::Add { address, reason } => {
            let a = Address::parse(&address).map_err(|e| anyhow::anyhow!("{address:?}: {e}"))?;
            let added = queue.suppress_add(a.as_str(), &reason)?;
            println!(
                "{} {}",
                if added {
                    "added"
                } else {
                    "already suppressed:"
                },
                a
            );
        }
        SuppressCmd::Remove { address } => {
            if queue.suppress_remove(&address)? {
                println!("removed {address}");
            } else {
                eprintln!("{address} is not suppressed");
                return Ok(1);
            }
        }
        SuppressCmd::Import { file, reason } => {
            let reader: Box<dyn BufRead> = if file == "-" {
                Box::new(std::io::stdin().lock())
            } else {
                Box::new(std::io::BufReader::new(
                    std::fs::File::open(&file).with_context(|| format!("cannot open {file}"))?,
                ))
            };
            let (mut added, mut bad) = (0u64, 0u64);
            for (i, line) in reader.lines().enumerate() {
                let line = line?;
                let line = line.trim();
                if line.is_empty() || line.starts_with('#') {
                    continue;
                }
                let (addr, why) = line.split_once(',').unwrap_or((line, reason.as_str()));
                match Address::parse(addr) {
                    Ok(a) => {
                        if queue.suppress_add(a.as_str(), why.trim())? {
                            added += 1;
                        }
                    }
                    Err(e) => {
                        eprintln!("line {}: {addr:?}: {e}", i + 1);
                        bad += 1;
                    }
                }
            }
            println!("{}", serde_json::json!({"added": added, "rejected": bad}));
            if bad > 0 {
                return Ok(2);
            }
        }
        SuppressCmd::Export { output } => {
            let mut out: Box<dyn Write> = match &output {
                Some(p) => Box::new(
                    std::fs::File::create(p)
                        .with_context(|| format!("cannot create {}", p.display()))?,
                ),
                None => Box::new(std::io::stdout().lock()),
            };
            for s in queue.suppress_list()? {
                writeln!(
                    out,
                    "{},{},{}",
                    s.address,
                    s.reason.replace(',', ";"),
                    rfc3339(s.at)
                )?;
            }
        }
    }
    Ok(0)
}
