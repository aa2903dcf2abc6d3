//! Typed settings for bulksend.
//!
//! One [`Settings`] value is loaded once at start-up from an optional TOML file plus
//! `BULKSEND_*` environment variables (nested keys separated by `__`, e.g.
//! `BULKSEND_SMTP__TIMEOUTS__DATA_DONE=15m`), validated, and then passed around as
//! `Arc<Settings>`. Every struct has `deny_unknown_fields` and a default for every field, so
//! bulksend runs with no file at all and a misspelt key is an error that names it.
//!
//! The key names are part of bulksend's external contract (see DESIGN.md): operators' files and
//! scripts rely on them, so rename nothing; add freely.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Everything that can be configured.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    pub queue: QueueSettings,
    /// Static routes, checked before any MX lookup: recipient domain → `host:port`.
    /// The key `"*"` is a smarthost that takes every domain without a route of its own.
    pub routes: BTreeMap<String, String>,
    pub dns: DnsSettings,
    pub smtp: SmtpSettings,
    pub delivery: DeliverySettings,
    pub events: EventsSettings,
    pub api: ApiSettings,
    pub metrics: MetricsSettings,
    pub log: LogSettings,
    pub classify: ClassifySettings,
    /// Per-destination overrides, keyed by recipient domain or destination key (MX set).
    pub destinations: BTreeMap<String, DestinationOverrides>,
}

/// Extra reply-classification rules, checked before the built-in table (first match wins).
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ClassifySettings {
    pub rules: Vec<ClassifyRule>,
}

/// One classification rule. Every field given must match.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ClassifyRule {
    /// "invalid_recipient" | "permanent" | "transient" | "reputation"
    pub class: String,
    /// A code ("550") or class ("5xx", "4xx").
    pub code: Option<String>,
    /// Enhanced status prefix, e.g. "5.7" or "4.7.1".
    pub enhanced: Option<String>,
    /// "mail" | "rcpt" | "data_init" | "data_done" | ...
    pub phase: Option<String>,
    /// Case-insensitive substring of the reply text.
    pub text: Option<String>,
}

/// Limits for one destination, overriding `[delivery]` and `[smtp]`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DestinationOverrides {
    pub max_connections: Option<usize>,
    pub max_messages_per_connection: Option<usize>,
    pub max_recipients_per_transaction: Option<usize>,
    /// "100/s", "3000/min", "50000/h".
    pub rate_limit: Option<String>,
    pub pipeline_transactions: Option<bool>,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct QueueSettings {
    /// The sled directory.
    pub path: PathBuf,
    /// sled's page cache. Set explicitly so RSS stays bounded whatever the queue depth.
    pub cache_capacity_mb: u64,
    /// How long final recipient records (delivered, bounced, ...) are kept for status
    /// queries before they are purged. Events report every outcome as it happens; this only
    /// bounds `queue show` and the store's size.
    #[serde(with = "humantime_serde")]
    pub final_retention: Duration,
    /// Compact the store on its own (in the background) when its files are mostly dead
    /// space, e.g. after a drain. sled never shrinks its files otherwise.
    pub auto_compact: bool,
    /// A lease not completed or renewed within this time returns to scheduled (a safety net
    /// for a lost lease; the engine renews the leases of every job it holds, in a transaction
    /// or waiting, while it runs). `0s`: off, leases return only with a restart. At least
    /// `delivery.shutdown_grace`, during which nothing is renewed.
    #[serde(with = "humantime_serde")]
    pub lease_timeout: Duration,
    /// How long a group commit of delivery outcomes may wait for more outcomes to share its
    /// sync (an `fdatasync`); an enqueue never waits. Fewer syncs and less CPU per message in
    /// a busy drain, for outcomes durable that much later. `0s`: commit at once. At most 1 s.
    #[serde(with = "humantime_serde")]
    pub outcome_commit_delay: Duration,
    /// Memory for the idempotency keys of the newest messages (~13 bytes a key); past it they
    /// move to run files, where each enqueue with a key reads a block of each. So the index's
    /// memory does not grow with the queue's depth.
    pub idempotency_memory_mb: u64,
    /// Memory for the schedule's zones (which recipients are due when, ~144 bytes per zone
    /// of 64 or more recipients); past it zones are merged and grow, so that it does not
    /// grow with the queue's depth.
    pub schedule_memory_mb: u64,
}

impl Default for QueueSettings {
    fn default() -> Self {
        Self {
            path: PathBuf::from("data/queue"),
            cache_capacity_mb: 64,
            final_retention: Duration::from_secs(7 * 86400),
            auto_compact: true,
            lease_timeout: Duration::from_secs(3600),
            outcome_commit_delay: Duration::from_millis(3),
            idempotency_memory_mb: 8,
            schedule_memory_mb: 4,
        }
    }
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DnsSettings {
    /// Nameservers to query (`ip:port`). Empty: the system resolver (/etc/resolv.conf).
    pub nameservers: Vec<SocketAddr>,
    /// Port to connect to on MX hosts. 25 unless overridden (tests point it at loopback sinks).
    pub smtp_port: Option<u16>,
}

/// STARTTLS policy (per destination in a later version; global for now).
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum TlsPolicy {
    /// Never send STARTTLS.
    Disabled,
    /// Use STARTTLS when the server offers it, without certificate verification (as Postfix's
    /// `may` level: MX certificates are often self-signed, and cleartext would be worse).
    #[default]
    Opportunistic,
    /// Refuse to send unless STARTTLS succeeds with a certificate that verifies against the
    /// webpki roots plus `smtp.tls_ca_file`.
    Required,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SmtpSettings {
    /// Name sent in EHLO/HELO. Should resolve to the sending IP and match its PTR.
    pub helo_name: String,
    pub max_recipients_per_transaction: usize,
    pub max_messages_per_connection: usize,
    /// With PIPELINING, send the next message's envelope (MAIL, RCPT…, DATA) in the same write
    /// as this message's final dot (RFC 2920 §3.1): one round trip per message on a reused
    /// connection instead of two.
    pub pipeline_transactions: bool,
    pub tls: TlsPolicy,
    /// Extra PEM CA certificates trusted for `tls = "required"`, beside the webpki roots.
    pub tls_ca_file: Option<PathBuf>,
    /// Largest message bulksend accepts for sending, in bytes.
    pub max_message_size: usize,
    pub timeouts: Timeouts,
}

impl Default for SmtpSettings {
    fn default() -> Self {
        Self {
            helo_name: "localhost".to_owned(),
            max_recipients_per_transaction: 100,
            max_messages_per_connection: 1000,
            pipeline_transactions: true,
            tls: TlsPolicy::default(),
            tls_ca_file: None,
            max_message_size: 50 * 1024 * 1024,
            timeouts: Timeouts::default(),
        }
    }
}

/// One timeout per SMTP phase (RFC 5321 §4.5.3.2: "per-command timeouts rather than somehow
/// trying to time the entire mail transaction"). Defaults are the RFC's minimums.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct Timeouts {
    /// TCP connect, kept apart from the greeting (a server may accept and delay its 220).
    #[serde(with = "humantime_serde")]
    pub connect: Duration,
    /// Initial 220 greeting (§4.5.3.2.1: 5 min).
    #[serde(with = "humantime_serde")]
    pub greeting: Duration,
    #[serde(with = "humantime_serde")]
    pub ehlo: Duration,
    /// STARTTLS reply and the TLS handshake.
    #[serde(with = "humantime_serde")]
    pub starttls: Duration,
    /// §4.5.3.2.2: 5 min.
    #[serde(with = "humantime_serde")]
    pub mail: Duration,
    /// §4.5.3.2.3: 5 min, per RCPT.
    #[serde(with = "humantime_serde")]
    pub rcpt: Duration,
    /// Awaiting 354 (§4.5.3.2.4: 2 min).
    #[serde(with = "humantime_serde")]
    pub data_init: Duration,
    /// Each data block write (§4.5.3.2.5: 3 min), so the total scales with message size.
    #[serde(with = "humantime_serde")]
    pub data_block: Duration,
    /// Awaiting the reply after the final dot (§4.5.3.2.6: 10 min). A timeout here is
    /// "unknown, possibly delivered" (§6.1), never a plain failure.
    #[serde(with = "humantime_serde")]
    pub data_done: Duration,
    #[serde(with = "humantime_serde")]
    pub rset: Duration,
    /// Awaiting 221 after QUIT.
    #[serde(with = "humantime_serde")]
    pub quit: Duration,
    /// An idle pooled connection is closed (with QUIT) after this, well before a server's
    /// 5-minute idle timeout (§4.5.3.2.7).
    #[serde(with = "humantime_serde")]
    pub idle: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        const MIN: u64 = 60;
        Self {
            connect: Duration::from_secs(30),
            greeting: Duration::from_secs(5 * MIN),
            ehlo: Duration::from_secs(5 * MIN),
            starttls: Duration::from_secs(5 * MIN),
            mail: Duration::from_secs(5 * MIN),
            rcpt: Duration::from_secs(5 * MIN),
            data_init: Duration::from_secs(2 * MIN),
            data_block: Duration::from_secs(3 * MIN),
            data_done: Duration::from_secs(10 * MIN),
            rset: Duration::from_secs(5 * MIN),
            quit: Duration::from_secs(5),
            idle: Duration::from_secs(60),
        }
    }
}

/// What to do with a recipient whose transaction got no reply after the final dot.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum UnknownPolicy {
    /// Record an `unknown` event and try again later (may duplicate; never loses). Postfix does this.
    #[default]
    Retry,
    /// Record `unknown` as final (never duplicates; may lose).
    Final,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DeliverySettings {
    pub max_connections_per_destination: usize,
    /// Most recipients leased from the queue and not yet recorded, over all destinations
    /// (bounds memory). One destination's ready queue may hold at most a quarter of it, so a
    /// slow destination cannot starve the others.
    pub max_in_flight: usize,
    /// Most bytes of prepared message bodies held in memory for leased recipients (bounds
    /// memory when messages are big: `max_in_flight` counts recipients). No more is taken
    /// from the queue while it is reached (and, to take in bigger batches, until it has
    /// fallen to three quarters, or 100 ms have passed); a take is sized from the bodies seen
    /// so far, and one message is always let through, so a body bigger than this still goes.
    pub max_in_flight_bytes: usize,
    /// Transactions per connection whose outcomes may still be being written to the queue
    /// (durably, a group commit each) while the connection carries the next one. A crash can
    /// re-send up to this many transactions per connection; 0 makes every outcome durable
    /// before the next message's data goes out (slower: a connection then waits a group
    /// commit per message; with pipelining the next envelope is already out, which delivers
    /// nothing).
    pub max_unrecorded_per_connection: usize,
    /// Default rate limit per destination: "100/s", "3000/min", "50000/h"; none if unset.
    pub rate_limit: Option<String>,
    #[serde(with = "humantime_serde")]
    pub min_backoff: Duration,
    #[serde(with = "humantime_serde")]
    pub max_backoff: Duration,
    #[serde(with = "humantime_serde")]
    pub max_queue_lifetime: Duration,
    /// First pause of a destination after a reputation/rate deferral; doubles on each further
    /// one, up to `pause_max`.
    #[serde(with = "humantime_serde")]
    pub pause_min: Duration,
    #[serde(with = "humantime_serde")]
    pub pause_max: Duration,
    /// Harvesting guard: within `harvest_window`, if at least `harvest_min_sample` recipients
    /// were tried at a destination and the share rejected as unknown users reaches
    /// `harvest_threshold`, pause the destination for `harvest_pause`.
    #[serde(with = "humantime_serde")]
    pub harvest_window: Duration,
    pub harvest_min_sample: u32,
    pub harvest_threshold: f64,
    #[serde(with = "humantime_serde")]
    pub harvest_pause: Duration,
    pub unknown_after_dot: UnknownPolicy,
    /// On shutdown, how long in-flight transactions may take to finish before being dropped.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
}

impl Default for DeliverySettings {
    fn default() -> Self {
        Self {
            max_connections_per_destination: 20,
            max_in_flight: 5000,
            max_in_flight_bytes: 256 * 1024 * 1024,
            max_unrecorded_per_connection: 8,
            rate_limit: None,
            min_backoff: Duration::from_secs(5 * 60),
            max_backoff: Duration::from_secs(4 * 3600),
            max_queue_lifetime: Duration::from_secs(5 * 86400),
            pause_min: Duration::from_secs(60),
            pause_max: Duration::from_secs(30 * 60),
            harvest_window: Duration::from_secs(10 * 60),
            harvest_min_sample: 50,
            harvest_threshold: 0.10,
            harvest_pause: Duration::from_secs(3600),
            unknown_after_dot: UnknownPolicy::Retry,
            // Above smtp.timeouts.data_done, so a shutdown never drops a connection that is
            // waiting for the reply after the dot.
            shutdown_grace: Duration::from_secs(11 * 60),
        }
    }
}

/// A parsed rate limit: `count` messages per `per`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RateLimit {
    pub count: u32,
    pub per: Duration,
}

impl RateLimit {
    /// Parses "100/s", "3000/min", "50000/h".
    pub fn parse(s: &str) -> Result<RateLimit, String> {
        let (n, unit) = s
            .split_once('/')
            .ok_or_else(|| format!("{s:?} is not N/s, N/min or N/h"))?;
        let count: u32 = n
            .trim()
            .parse()
            .ok()
            .filter(|&c| c > 0)
            .ok_or_else(|| format!("{s:?}: count must be a positive integer"))?;
        let per = match unit.trim() {
            "s" | "sec" => Duration::from_secs(1),
            "m" | "min" => Duration::from_secs(60),
            "h" | "hour" => Duration::from_secs(3600),
            other => return Err(format!("{s:?}: unknown unit {other:?} (s, min, h)")),
        };
        Ok(RateLimit { count, per })
    }
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct EventsSettings {
    /// One JSON object per recipient outcome.
    pub path: PathBuf,
    /// Rotate `path` to `path.1` (shifting older files up) before a line would take it past
    /// this size. 0 = never rotate.
    pub max_file_bytes: u64,
    /// Rotated files kept (`path.1` … `path.N`); older ones are overwritten.
    pub keep_files: usize,
    /// Also POST events, as JSON arrays, to this http:// or https:// URL (at-least-once, in
    /// order). Unset = no webhook.
    pub webhook_url: Option<String>,
    /// Most events in one POST.
    pub webhook_batch: usize,
    /// Longest an event waits for a batch to fill before a partial batch is sent.
    #[serde(with = "humantime_serde")]
    pub webhook_interval: Duration,
    /// Sent as `Authorization: Bearer …`. Prefer BULKSEND_EVENTS__WEBHOOK_TOKEN.
    pub webhook_token: Option<String>,
    /// Retries of a failed POST back off from 1 s, doubling up to this.
    #[serde(with = "humantime_serde")]
    pub webhook_max_backoff: Duration,
    /// Events held while the receiver is down; beyond this the oldest are dropped (and
    /// counted in `bulksend_events_dropped_total`) so memory stays bounded.
    pub webhook_buffer: usize,
}

impl Default for EventsSettings {
    fn default() -> Self {
        Self {
            path: PathBuf::from("data/events.jsonl"),
            max_file_bytes: 100 * 1024 * 1024,
            keep_files: 10,
            webhook_url: None,
            webhook_batch: 500,
            webhook_interval: Duration::from_secs(1),
            webhook_token: None,
            webhook_max_backoff: Duration::from_secs(300),
            webhook_buffer: 100_000,
        }
    }
}

impl EventsSettings {
    fn validate(&self) -> Result<(), String> {
        if self.max_file_bytes > 0 && self.keep_files == 0 {
            return Err(
                "events.keep_files: must be at least 1 when events.max_file_bytes is set".into(),
            );
        }
        if let Some(url) = &self.webhook_url {
            let rest = url
                .strip_prefix("http://")
                .or_else(|| url.strip_prefix("https://"));
            let host = rest.map(|r| r.split(['/', '?', '#']).next().unwrap_or(""));
            if host.is_none_or(|h| h.is_empty() || h.contains(char::is_whitespace)) {
                return Err(format!(
                    "events.webhook_url: {url:?} is not an http:// or https:// URL"
                ));
            }
        }
        if self.webhook_batch == 0 {
            return Err("events.webhook_batch: must be at least 1".into());
        }
        if self.webhook_buffer == 0 {
            return Err("events.webhook_buffer: must be at least 1".into());
        }
        if self.webhook_max_backoff.is_zero() {
            return Err("events.webhook_max_backoff: must be greater than zero".into());
        }
        Ok(())
    }
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ApiSettings {
    pub listen: SocketAddr,
    /// Bearer token required on /api/*. Required when `listen` is not a loopback address.
    pub token: Option<String>,
    /// Largest request body accepted (a batch of messages), in bytes.
    pub max_request_bytes: usize,
}

impl Default for ApiSettings {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8025)),
            token: None,
            max_request_bytes: 32 * 1024 * 1024,
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsSettings {
    pub listen: SocketAddr,
}

impl Default for MetricsSettings {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 9898)),
        }
    }
}

#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Human,
    Json,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LogSettings {
    pub format: LogFormat,
    /// A tracing-subscriber filter, e.g. `info,bulksend_engine=debug`. `RUST_LOG` wins.
    pub level: String,
}

impl Default for LogSettings {
    fn default() -> Self {
        Self {
            format: LogFormat::Human,
            level: "info".to_owned(),
        }
    }
}

/// Why the settings could not be loaded. The message always names the file or key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid configuration ({origin}): {detail}")]
    Invalid { origin: String, detail: String },
}

impl Settings {
    /// Loads the settings: defaults, then `file` (if any), then `BULKSEND_*` variables from
    /// the process environment.
    pub fn load(file: Option<&Path>) -> Result<Settings, ConfigError> {
        Self::load_with_env(file, std::env::vars())
    }

    /// As [`Settings::load`], with the environment given explicitly (for tests).
    pub fn load_with_env(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Settings, ConfigError> {
        let mut builder = config::Config::builder();
        let origin = match file {
            Some(path) => {
                // Read it ourselves: config-rs' own error for a missing file does not say which.
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.to_owned(),
                    source,
                })?;
                builder =
                    builder.add_source(config::File::from_str(&text, config::FileFormat::Toml));
                format!("{} + BULKSEND_* environment", path.display())
            }
            None => "BULKSEND_* environment".to_owned(),
        };
        let env: config::Map<String, String> = env
            .into_iter()
            .filter(|(k, _)| k.starts_with("BULKSEND_"))
            .collect();
        builder = builder.add_source(
            config::Environment::with_prefix("BULKSEND")
                .prefix_separator("_")
                .separator("__")
                .list_separator(",")
                .with_list_parse_key("dns.nameservers")
                .try_parsing(true)
                .source(Some(env)),
        );
        let invalid = |e: config::ConfigError| ConfigError::Invalid {
            origin: origin.clone(),
            detail: e.to_string(),
        };
        let settings: Settings = builder
            .build()
            .map_err(invalid)?
            .try_deserialize()
            .map_err(invalid)?;
        settings.validate().map_err(|detail| ConfigError::Invalid {
            origin: origin.clone(),
            detail,
        })?;
        Ok(settings)
    }

    /// Checks relations serde cannot express. Returns a message naming the key.
    pub fn validate(&self) -> Result<(), String> {
        let s = &self.smtp;
        if s.helo_name.is_empty()
            || s.helo_name
                .contains(|c: char| c.is_whitespace() || c.is_control())
        {
            return Err(format!(
                "smtp.helo_name: invalid hostname {:?}",
                s.helo_name
            ));
        }
        if s.max_recipients_per_transaction == 0 {
            return Err("smtp.max_recipients_per_transaction: must be at least 1".into());
        }
        if s.max_messages_per_connection == 0 {
            return Err("smtp.max_messages_per_connection: must be at least 1".into());
        }
        let t = &s.timeouts;
        for (key, value) in [
            ("connect", t.connect),
            ("greeting", t.greeting),
            ("ehlo", t.ehlo),
            ("starttls", t.starttls),
            ("mail", t.mail),
            ("rcpt", t.rcpt),
            ("data_init", t.data_init),
            ("data_block", t.data_block),
            ("data_done", t.data_done),
            ("rset", t.rset),
            ("quit", t.quit),
        ] {
            if value.is_zero() {
                return Err(format!("smtp.timeouts.{key}: must be greater than zero"));
            }
        }
        let d = &self.delivery;
        let lease = self.queue.lease_timeout;
        if !lease.is_zero() && lease < d.shutdown_grace {
            return Err(format!(
                "queue.lease_timeout ({}) is shorter than delivery.shutdown_grace ({}): leases are \
                 not renewed while transactions finish at shutdown (0s turns the timeout off)",
                humantime::format_duration(lease),
                humantime::format_duration(d.shutdown_grace)
            ));
        }
        if self.queue.outcome_commit_delay > Duration::from_secs(1) {
            return Err(format!(
                "queue.outcome_commit_delay ({}): at most 1s (each delivery outcome may wait \
                 that long to be written)",
                humantime::format_duration(self.queue.outcome_commit_delay)
            ));
        }
        if d.max_in_flight < 4 {
            return Err("delivery.max_in_flight: must be at least 4".into());
        }
        if d.max_in_flight_bytes == 0 {
            return Err("delivery.max_in_flight_bytes: must be at least 1".into());
        }
        if d.max_connections_per_destination == 0 {
            return Err("delivery.max_connections_per_destination: must be at least 1".into());
        }
        if d.min_backoff > d.max_backoff {
            return Err(format!(
                "delivery.min_backoff ({}) is greater than delivery.max_backoff ({})",
                humantime::format_duration(d.min_backoff),
                humantime::format_duration(d.max_backoff)
            ));
        }
        if !(d.harvest_threshold > 0.0 && d.harvest_threshold <= 1.0) {
            return Err(format!(
                "delivery.harvest_threshold: {} is not in (0, 1]",
                d.harvest_threshold
            ));
        }
        if let Some(r) = &d.rate_limit {
            RateLimit::parse(r).map_err(|e| format!("delivery.rate_limit: {e}"))?;
        }
        for (key, o) in &self.destinations {
            if let Some(r) = &o.rate_limit {
                RateLimit::parse(r).map_err(|e| format!("destinations.{key:?}.rate_limit: {e}"))?;
            }
        }
        for (i, rule) in self.classify.rules.iter().enumerate() {
            if !matches!(
                rule.class.as_str(),
                "invalid_recipient" | "permanent" | "transient" | "reputation"
            ) {
                return Err(format!(
                    "classify.rules[{i}].class: {:?} is not invalid_recipient, permanent, transient or reputation",
                    rule.class
                ));
            }
        }
        if !self.api.listen.ip().is_loopback()
            && self.api.token.as_deref().is_none_or(str::is_empty)
        {
            return Err(format!(
                "api.token: required when api.listen ({}) is not a loopback address",
                self.api.listen
            ));
        }
        for (domain, target) in &self.routes {
            if !valid_route_target(target) {
                return Err(format!("routes.{domain:?}: {target:?} is not host:port"));
            }
        }
        self.events.validate()?;
        Ok(())
    }
}

fn valid_route_target(target: &str) -> bool {
    match target.rsplit_once(':') {
        Some((host, port)) => !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p != 0),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::io::Write;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn file(text: &str) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(text.as_bytes()).unwrap();
        f
    }

    #[test]
    fn no_file_gives_rfc_defaults() {
        let s = Settings::load_with_env(None, env(&[])).unwrap();
        assert_eq!(s, Settings::default());
        assert_eq!(s.smtp.timeouts.data_done, Duration::from_secs(600));
        assert_eq!(s.smtp.timeouts.data_init, Duration::from_secs(120));
        assert_eq!(s.api.listen.ip().to_string(), "127.0.0.1");
    }

    #[test]
    fn design_md_example_loads() {
        let f = file(
            r#"
[queue]
path = "/var/spool/bulksend"

[routes]
"example.test" = "127.0.0.1:2525"
"*" = "relay.example.net:587"

[dns]
nameservers = ["127.0.0.1:5353"]

[smtp]
helo_name = "mta.example.net"
max_recipients_per_transaction = 50
tls = "required"

[smtp.timeouts]
data_done = "15m"
quit = "2s"

[delivery]
max_queue_lifetime = "3d"
"#,
        );
        let s = Settings::load_with_env(Some(f.path()), env(&[])).unwrap();
        assert_eq!(s.queue.path, PathBuf::from("/var/spool/bulksend"));
        // A key with a dot in it must stay one key, not become a nested table.
        assert_eq!(s.routes.get("example.test").unwrap(), "127.0.0.1:2525");
        assert_eq!(s.routes.get("*").unwrap(), "relay.example.net:587");
        assert_eq!(s.dns.nameservers, vec!["127.0.0.1:5353".parse().unwrap()]);
        assert_eq!(s.smtp.tls, TlsPolicy::Required);
        assert_eq!(s.smtp.max_recipients_per_transaction, 50);
        assert_eq!(s.smtp.timeouts.data_done, Duration::from_secs(900));
        assert_eq!(s.smtp.timeouts.quit, Duration::from_secs(2));
        // Untouched keys keep their defaults.
        assert_eq!(s.smtp.timeouts.rcpt, Duration::from_secs(300));
        assert_eq!(
            s.delivery.max_queue_lifetime,
            Duration::from_secs(3 * 86400)
        );
    }

    #[test]
    fn environment_overrides_nested_keys() {
        let f = file("[smtp.timeouts]\nrcpt = \"1m\"\n");
        let s = Settings::load_with_env(
            Some(f.path()),
            env(&[
                ("BULKSEND_SMTP__TIMEOUTS__RCPT", "7s"),
                ("BULKSEND_QUEUE__PATH", "/tmp/q"),
                ("BULKSEND_SMTP__MAX_RECIPIENTS_PER_TRANSACTION", "3"),
                ("BULKSEND_DNS__NAMESERVERS", "127.0.0.1:53,127.0.0.2:53"),
                ("UNRELATED", "x"),
            ]),
        )
        .unwrap();
        assert_eq!(s.smtp.timeouts.rcpt, Duration::from_secs(7));
        assert_eq!(s.queue.path, PathBuf::from("/tmp/q"));
        assert_eq!(s.smtp.max_recipients_per_transaction, 3);
        assert_eq!(s.dns.nameservers.len(), 2);
    }

    #[test]
    fn unknown_key_is_an_error_naming_it() {
        let f = file("[smtp]\nhelo_nmae = \"x\"\n");
        let err = Settings::load_with_env(Some(f.path()), env(&[])).unwrap_err();
        assert!(err.to_string().contains("helo_nmae"), "{err}");
    }

    #[test]
    fn bad_values_name_the_key() {
        let f = file("[smtp.timeouts]\nrcpt = \"soon\"\n");
        let err = Settings::load_with_env(Some(f.path()), env(&[])).unwrap_err();
        assert!(err.to_string().contains("rcpt"), "{err}");

        let f = file("[smtp]\ntls = \"sometimes\"\n");
        let err = Settings::load_with_env(Some(f.path()), env(&[])).unwrap_err();
        assert!(err.to_string().contains("sometimes"), "{err}");

        let err = Settings::load_with_env(None, env(&[("BULKSEND_SMTP__TIMEOUTS__QUIT", "0s")]))
            .unwrap_err();
        assert!(err.to_string().contains("smtp.timeouts.quit"), "{err}");

        let f = file("[queue]\noutcome_commit_delay = \"2s\"\n");
        let err = Settings::load_with_env(Some(f.path()), env(&[])).unwrap_err();
        assert!(
            err.to_string().contains("queue.outcome_commit_delay"),
            "{err}"
        );
        let f = file("[queue]\noutcome_commit_delay = \"0s\"\n");
        let s = Settings::load_with_env(Some(f.path()), env(&[])).unwrap();
        assert!(s.queue.outcome_commit_delay.is_zero());

        let f = file("[queue]\nlease_timeout = \"5m\"\n");
        let err = Settings::load_with_env(Some(f.path()), env(&[])).unwrap_err();
        assert!(err.to_string().contains("queue.lease_timeout"), "{err}");
        let f = file("[queue]\nlease_timeout = \"0s\"\n");
        let s = Settings::load_with_env(Some(f.path()), env(&[])).unwrap();
        assert!(s.queue.lease_timeout.is_zero());

        // 0: every outcome written before the next message's data.
        let f = file("[delivery]\nmax_unrecorded_per_connection = 0\n");
        let s = Settings::load_with_env(Some(f.path()), env(&[])).unwrap();
        assert_eq!(s.delivery.max_unrecorded_per_connection, 0);
        let f = file("[destinations.\"a.test\"]\npipeline_transactions = false\n");
        let s = Settings::load_with_env(Some(f.path()), env(&[])).unwrap();
        assert_eq!(s.destinations["a.test"].pipeline_transactions, Some(false));
        assert!(s.smtp.pipeline_transactions);

        let f = file("[routes]\n\"a.test\" = \"nohost\"\n");
        let err = Settings::load_with_env(Some(f.path()), env(&[])).unwrap_err();
        assert!(err.to_string().contains("a.test"), "{err}");
    }

    #[test]
    fn events_webhook_keys() {
        let f = file(
            "[events]\nwebhook_url = \"https://hooks.example.net/bulksend\"\nwebhook_batch = 50\nwebhook_interval = \"250ms\"\nmax_file_bytes = 0\n",
        );
        let s = Settings::load_with_env(Some(f.path()), env(&[])).unwrap();
        assert_eq!(
            s.events.webhook_url.as_deref(),
            Some("https://hooks.example.net/bulksend")
        );
        assert_eq!(s.events.webhook_batch, 50);
        assert_eq!(s.events.webhook_interval, Duration::from_millis(250));
        assert_eq!(s.events.max_file_bytes, 0);
        assert_eq!(s.events.webhook_buffer, 100_000);

        for bad in [
            "ftp://x.test/",
            "hooks.example.net",
            "http://",
            "http:// x/",
        ] {
            let f = file(&format!("[events]\nwebhook_url = {bad:?}\n"));
            let err = Settings::load_with_env(Some(f.path()), env(&[])).unwrap_err();
            assert!(
                err.to_string().contains("events.webhook_url"),
                "{bad}: {err}"
            );
        }
        let err = Settings::load_with_env(None, env(&[("BULKSEND_EVENTS__WEBHOOK_BATCH", "0")]))
            .unwrap_err();
        assert!(err.to_string().contains("events.webhook_batch"), "{err}");
        let err = Settings::load_with_env(None, env(&[("BULKSEND_EVENTS__KEEP_FILES", "0")]))
            .unwrap_err();
        assert!(err.to_string().contains("events.keep_files"), "{err}");
    }

    #[test]
    fn missing_file_names_the_path() {
        let err = Settings::load_with_env(Some(Path::new("/nonexistent/bulksend.toml")), env(&[]))
            .unwrap_err();
        assert!(
            err.to_string().contains("/nonexistent/bulksend.toml"),
            "{err}"
        );
    }
}

#[cfg(test)]
mod example_file {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// deploy/bulksend.toml documents every setting; it must load, and with its commented
    /// examples removed it must equal the defaults (so the documented defaults are true).
    #[test]
    fn deploy_example_is_valid_and_states_the_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/bulksend.toml");
        let s = Settings::load_with_env(Some(&path), Vec::new()).unwrap();
        assert_eq!(s, Settings::default());
        // Every top-level section and every timeout key appears in the file.
        let text = std::fs::read_to_string(&path).unwrap();
        let defaults = toml::Value::try_from(Settings::default()).unwrap();
        for (section, value) in defaults.as_table().unwrap() {
            assert!(
                text.contains(&format!("[{section}]"))
                    || text.contains(&format!("[{section}."))
                    || text.contains(&format!("[[{section}.")),
                "section {section} undocumented"
            );
            if let Some(t) = value.as_table() {
                for key in t.keys() {
                    assert!(
                        text.contains(&format!("{key} ="))
                            || text.contains(&format!("[{section}.{key}]")),
                        "{section}.{key} undocumented"
                    );
                }
            }
        }
    }
}
