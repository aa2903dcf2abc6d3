//! `bulksend`: a high-throughput bulk email sending engine. See README.md.

use std::path::PathBuf;
use std::process::ExitCode;

mod app;
mod cmd;
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "bulksend",
    version,
    about = "High-throughput bulk email sending engine"
)]
struct Cli {
    /// TOML configuration file (every key also settable as BULKSEND_SECTION__KEY).
    #[arg(long, global = true, env = "BULKSEND_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run delivery, the HTTP injection API and /metrics.
    Serve {
        /// Deliver until nothing is due or in flight, print a summary, exit.
        #[arg(long)]
        drain: bool,
    },
    /// Put messages into the queue (flags, --eml, or --jsonl), locally or via --server.
    Enqueue(cmd::enqueue::EnqueueArgs),
    /// Inspect and act on the queue.
    #[command(subcommand)]
    Queue(cmd::queue::QueueCmd),
    /// The suppression list.
    #[command(subcommand)]
    Suppress(cmd::suppress::SuppressCmd),
    /// Configuration.
    #[command(subcommand)]
    Config(ConfigCmd),
    /// Self-contained run on loopback: a sink, a fresh queue, real delivery.
    Demo(cmd::demo::DemoArgs),
}

#[derive(Debug, Subcommand)]
enum ConfigCmd {
    /// Validate and print the effective configuration.
    Check,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = cli.config.as_deref();
    let result = match cli.command {
        Command::Enqueue(args) => cmd::enqueue::run(config, args),
        Command::Queue(c) => cmd::queue::run(config, c),
        Command::Suppress(c) => cmd::suppress::run(config, c),
        Command::Config(ConfigCmd::Check) => cmd::config::check(config),
        Command::Serve { drain } => {
            runtime().and_then(|rt| rt.block_on(cmd::serve::run(config, drain)).map(|()| 0))
        }
        Command::Demo(args) => runtime().and_then(|rt| rt.block_on(cmd::demo::run(args))),
    };
    match result {
        Ok(code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}
