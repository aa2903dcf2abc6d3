//! What every command needs: settings, logging, the queue, and (for `serve`/`demo`) the engine.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use bulksend_config::{LogFormat, Settings};
use bulksend_engine::delivery::Engine;
use bulksend_engine::events::{EventSink, FileEvents};
use bulksend_engine::route::{HickoryDns, Router};
use bulksend_queue::{Queue, QueueOptions};

/// Loads and validates the settings (file optional, then `BULKSEND_*`).
pub(crate) fn settings(file: Option<&Path>) -> anyhow::Result<Arc<Settings>> {
    Ok(Arc::new(Settings::load(file)?))
}

/// Installs the tracing subscriber: `RUST_LOG` wins over `log.level`.
pub(crate) fn init_logging(settings: &Settings) {
    use tracing_subscriber::EnvFilter;
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&settings.log.level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match settings.log.format {
        LogFormat::Human => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

pub(crate) fn queue_options(settings: &Settings) -> QueueOptions {
    QueueOptions {
        cache_capacity_bytes: settings.queue.cache_capacity_mb * 1024 * 1024,
        max_queue_lifetime: settings.delivery.max_queue_lifetime,
        final_retention: settings.queue.final_retention,
        auto_compact: settings.queue.auto_compact,
        lease_timeout: Some(settings.queue.lease_timeout).filter(|t| !t.is_zero()),
        outcome_commit_delay: settings.queue.outcome_commit_delay,
        idempotency_memory_bytes: settings.queue.idempotency_memory_mb * 1024 * 1024,
        schedule_memory_bytes: settings.queue.schedule_memory_mb * 1024 * 1024,
        ..QueueOptions::default()
    }
}

/// Opens the queue, with a hint when another process holds it.
pub(crate) fn open_queue(settings: &Settings) -> anyhow::Result<Arc<Queue>> {
    let path = &settings.queue.path;
    std::fs::create_dir_all(path)
        .with_context(|| format!("cannot create queue directory {}", path.display()))?;
    Queue::open(path, queue_options(settings))
        .map(Arc::new)
        .map_err(|e| {
            let text = e.to_string();
            if text.contains("lock") || text.contains("WouldBlock") || text.contains("temporarily unavailable") {
                anyhow::anyhow!(
                    "{text}\nhint: the queue at {} is in use; is `bulksend serve` running? Then use --server URL",
                    path.display()
                )
            } else {
                anyhow::Error::new(e)
            }
        })
}

/// Builds the delivery engine on `queue`, with events written to `events`.
pub(crate) fn engine(
    settings: &Arc<Settings>,
    queue: Arc<Queue>,
    events: Arc<dyn EventSink>,
) -> anyhow::Result<Engine> {
    let dns = HickoryDns::new(&settings.dns.nameservers, Duration::from_secs(5))
        .map_err(|e| anyhow::anyhow!("DNS resolver: {e}"))?;
    let router = Arc::new(Router::new(
        &settings.routes,
        settings.dns.smtp_port,
        Arc::new(dns),
    ));
    Ok(Engine::new(settings.clone(), queue, router, events)?)
}

/// The sink `serve` emits to: the (rotating) events file, plus the webhook when
/// `events.webhook_url` is set.
pub(crate) fn file_events(settings: &Settings) -> anyhow::Result<Arc<dyn EventSink>> {
    use bulksend_engine::events::{Fanout, Rotation, WebhookEvents, WebhookOptions};
    let path = &settings.events.path;
    let file = FileEvents::open_rotating(path, Rotation::from_settings(&settings.events))
        .with_context(|| format!("cannot open events file {}", path.display()))?;
    let mut sinks: Vec<Arc<dyn EventSink>> = vec![Arc::new(file)];
    if let Some(opts) = WebhookOptions::from_settings(&settings.events) {
        let url = opts.url.clone();
        let hook = WebhookEvents::start(opts)
            .with_context(|| format!("cannot start the events webhook for {url}"))?;
        sinks.push(Arc::new(hook));
    }
    Ok(Arc::new(Fanout(sinks)))
}

/// Installs the Prometheus recorder with an HTTP listener on `metrics.listen`.
pub(crate) fn install_metrics(settings: &Settings) -> anyhow::Result<()> {
    use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
    const BUCKETS: &[f64] = &[
        0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 3600.0,
        86400.0,
    ];
    PrometheusBuilder::new()
        .with_http_listener(settings.metrics.listen)
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), BUCKETS)?
        .install()
        .with_context(|| format!("cannot serve metrics on {}", settings.metrics.listen))?;
    bulksend_engine::metrics::describe();
    Ok(())
}

/// Publishes queue depth by state every few seconds (cheap: the queue keeps counters).
pub(crate) fn spawn_queue_gauges(queue: Arc<Queue>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            let stats = queue.stats();
            for (state, n) in &stats.by_state {
                metrics::gauge!(bulksend_engine::metrics::QUEUE_RECIPIENTS, "state" => state.as_str()).set(*n as f64);
            }
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// Every queue key an operator sets reaches the queue (a key dropped here would be
    /// silently ignored).
    #[test]
    fn queue_options_carry_the_config_keys() {
        let mut settings = Settings::default();
        settings.queue.cache_capacity_mb = 17;
        settings.delivery.max_queue_lifetime = Duration::from_secs(3 * 3600);
        settings.queue.final_retention = Duration::from_secs(90);
        settings.queue.auto_compact = false;
        settings.queue.lease_timeout = Duration::from_secs(7200);
        settings.queue.outcome_commit_delay = Duration::from_millis(11);
        let o = queue_options(&settings);
        assert_eq!(o.outcome_commit_delay, Duration::from_millis(11));
        assert_eq!(o.lease_timeout, Some(Duration::from_secs(7200)));
        assert_eq!(o.cache_capacity_bytes, 17 << 20);
        assert_eq!(o.max_queue_lifetime, Duration::from_secs(3 * 3600));
        assert_eq!(o.final_retention, Duration::from_secs(90));
        assert!(!o.auto_compact);
        assert!(o.durable, "the service always runs durable");
        settings.queue.lease_timeout = Duration::ZERO;
        assert_eq!(queue_options(&settings).lease_timeout, None, "0s: off");
    }
}
