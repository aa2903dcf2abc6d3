//! `bulksend serve [--drain]`: delivery, the HTTP injection API and /metrics in one process.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use tokio_util::sync::CancellationToken;

use crate::app;
use bulksend::api;

pub(crate) async fn run(config: Option<&Path>, drain: bool) -> anyhow::Result<()> {
    let settings = app::settings(config)?;
    app::init_logging(&settings);
    app::install_metrics(&settings)?;
    let queue = app::open_queue(&settings)?;
    let events = app::file_events(&settings)?;
    let engine = app::engine(&settings, queue.clone(), events)?;
    let gauges = app::spawn_queue_gauges(queue.clone());

    let shutdown = CancellationToken::new();
    spawn_signal_handler(shutdown.clone());

    let ready = Arc::new(AtomicBool::new(false));
    let listener = tokio::net::TcpListener::bind(settings.api.listen)
        .await
        .with_context(|| format!("cannot listen on api.listen {}", settings.api.listen))?;
    let state = Arc::new(api::ApiState {
        queue: queue.clone(),
        wake: Some(engine.clone()),
        token: settings.api.token.clone(),
        max_message_size: settings.smtp.max_message_size,
        max_request_bytes: settings.api.max_request_bytes,
        ready: ready.clone(),
    });
    let api_stop = CancellationToken::new();
    let api_task = tokio::spawn(api::serve(listener, state, api_stop.clone()));
    tracing::info!(
        api = %settings.api.listen, metrics = %settings.metrics.listen,
        queue = %settings.queue.path.display(), drain, "bulksend serving"
    );

    ready.store(true, Ordering::SeqCst);
    let started = Instant::now();
    let summary = engine.run(shutdown.clone(), drain).await;
    ready.store(false, Ordering::SeqCst);
    api_stop.cancel();
    let _ = api_task.await;
    gauges.abort();
    queue.flush().context("final queue flush")?;
    let elapsed = started.elapsed().as_secs_f64();
    tracing::info!(?summary, elapsed_s = elapsed, "bulksend stopped");
    if drain {
        let stats = queue.stats();
        let out = serde_json::json!({
            "summary": summary,
            "elapsed_seconds": elapsed,
            "delivered_per_second": summary.delivered as f64 / elapsed.max(1e-9),
            "queue": stats.by_state.iter().map(|(k, v)| (k.as_str(), *v)).collect::<std::collections::BTreeMap<_, _>>(),
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
    }
    Ok(())
}

/// SIGTERM or ctrl-c: stop taking work, finish what is in flight, QUIT, exit 0.
pub(crate) fn spawn_signal_handler(token: CancellationToken) {
    tokio::spawn(async move {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            let mut term = match signal(SignalKind::terminate()) {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!(error = %e, "cannot install SIGTERM handler");
                    let _ = tokio::signal::ctrl_c().await;
                    token.cancel();
                    return;
                }
            };
            tokio::select! {
                _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
                _ = tokio::signal::ctrl_c() => tracing::info!("interrupt: shutting down"),
            }
        }
        #[cfg(not(unix))]
        let _ = tokio::signal::ctrl_c().await;
        token.cancel();
    });
}
