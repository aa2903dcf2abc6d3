//! The delivery engine: takes due recipients from the queue and gets them to the receivers as
//! fast as each receiver allows, and no faster.
//!
//! ```text
//!            take_due (lease)           route (MX)          push
//!  queue ───────────────────► dispatch ──────────► Dest ─────────► ready queue
//!    ▲                                              │ spawns ≤ limit
//!    │ complete_batch (durable)                     ▼
//!    └──────────── record ◄── classify ◄── worker: one SMTP connection, many transactions
//! ```
//!
//! - One dispatcher loop leases due recipients (bounded by [`MAX_IN_FLIGHT`], so memory does not
//!   grow with queue depth), loads and prepares each body once, routes each domain, and groups
//!   recipients of the same message at the same destination into one transaction (split at the
//!   destination's recipients-per-transaction limit).
//! - Each destination ([`Dest`]) has its own ready queue, connection limit (AIMD: halved on a
//!   reputation deferral, +1 after sustained success), pause state, harvesting guard and
//!   optional rate limit. Workers of one destination never wait on another destination's.
//! - A worker owns one connection at a time: it tries the MX hosts in order, carries up to
//!   `max_messages_per_connection` transactions, and ends every connection with
//!   [`Session::close`] (QUIT where the connection allows it).
//! - Every outcome is written to the queue durably before its lease ends, then reported as an
//!   event and a metric. A worker carries its next transactions while earlier ones' outcomes
//!   are being written (up to `delivery.max_unrecorded_per_connection` per worker), except after an
//!   unknown address (its suppression must be durable before anything else is sent) or a
//!   reputation signal, which are recorded, after everything before them, before the worker
//!   goes on.
//! - Shutdown: the dispatcher stops leasing, workers finish the transaction in hand (never cut
//!   off after the dot), QUIT, and ready-but-unsent recipients are released back to scheduled.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use bulksend_config::{RateLimit, Settings, UnknownPolicy};
use bulksend_queue::{Completed, Lease, MessageId, Outcome, Queue, RecipientId, RecipientState};
use rand::Rng;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::classify::{Class, Classified, Classifier};
use crate::events::{rfc3339, Event, EventKind, EventSink};
use crate::metrics as m;
use crate::route::{DestinationKey, Route, RouteError, Router};
use crate::smtp::{
    prepare, Address, ClientSettings, Envelope, MessageData, RcptResult, Session, SessionError,
};

/// Most recipients leased per queue read.
const TAKE_BATCH: usize = 1_000;
/// Most MX addresses tried for one connection (as Postfix's smtp_mx_address_limit).
const MAX_ADDRESSES: usize = 5;
/// How long a recipient evicted from a stuck destination's ready queue waits (plus jitter).
const POSTPONE: Duration = Duration::from_secs(2);
/// A destination whose oldest ready job has waited this long is not keeping up: if it also
/// holds more than its share of the in-flight budget, the overflow is given back.
const STUCK_AFTER: Duration = Duration::from_secs(5);
/// How often scheduled recipients past their lifetime are swept.
const EXPIRE_EVERY: Duration = Duration::from_secs(30);

/// Why the engine could not start.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Tls(#[from] crate::smtp::tls::TlsSetupError),
    #[error(transparent)]
    Classify(#[from] crate::classify::RuleError),
}

/// Counts of what one run did.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct RunSummary {
    pub delivered: u64,
    pub bounced: u64,
    pub deferred: u64,
    pub suppressed: u64,
    pub expired: u64,
    pub unknown: u64,
    pub connections: u64,
    /// Transactions whose envelope went out behind the previous transaction's dot
    /// (`smtp.pipeline_transactions`).
    pub pipelined: u64,
}

#[derive(Debug, Default)]
struct Counters {
    delivered: AtomicU64,
    bounced: AtomicU64,
    deferred: AtomicU64,
    suppressed: AtomicU64,
    expired: AtomicU64,
    unknown: AtomicU64,
    connections: AtomicU64,
    pipelined: AtomicU64,
}

impl Counters {
    fn snapshot(&self) -> RunSummary {
        RunSummary {
            delivered: self.delivered.load(Ordering::Relaxed),
            bounced: self.bounced.load(Ordering::Relaxed),
            deferred: self.deferred.load(Ordering::Relaxed),
            suppressed: self.suppressed.load(Ordering::Relaxed),
            expired: self.expired.load(Ordering::Relaxed),
            unknown: self.unknown.load(Ordering::Relaxed),
            connections: self.connections.load(Ordering::Relaxed),
            pipelined: self.pipelined.load(Ordering::Relaxed),
        }
    }
}

impl RunSummary {
    fn since(&self, before: &RunSummary) -> RunSummary {
        RunSummary {
            delivered: self.delivered - before.delivered,
            bounced: self.bounced - before.bounced,
            deferred: self.deferred - before.deferred,
            suppressed: self.suppressed - before.suppressed,
            expired: self.expired - before.expired,
            unknown: self.unknown - before.unknown,
            connections: self.connections - before.connections,
            pipelined: self.pipelined - before.pipelined,
        }
    }
}

/// A destination's state, for status output and tests.
#[derive(Clone, Debug)]
pub struct DestStatus {
    pub key: DestinationKey,
    pub active: usize,
    pub limit: usize,
    pub max: usize,
    pub ready: usize,
    pub paused_until: Option<Instant>,
    pub pauses: u64,
}

/// The delivery engine. Cheap to clone.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

/// The prepared bodies held in memory for leased recipients, against
/// `delivery.max_in_flight_bytes`.
#[derive(Default)]
struct BodyBudget {
    held: AtomicUsize,
    /// The take loop refills when `held` is at most this (see [`refill_mark`]).
    refill_at: usize,
    /// Told when `held` falls to `refill_at` (the take loop may be waiting for room).
    freed: Notify,
    /// Bytes per message of the last batch taken: sizes the next take.
    per_message: AtomicUsize,
}

/// A prepared body, counted in its [`BodyBudget`] for as long as any job holds it.
struct HeldBody {
    data: MessageData,
    budget: Arc<BodyBudget>,
}

impl HeldBody {
    fn new(data: MessageData, budget: &Arc<BodyBudget>) -> HeldBody {
        budget.held.fetch_add(data.wire.len(), Ordering::AcqRel);
        HeldBody {
            data,
            budget: Arc::clone(budget),
        }
    }
}

impl std::ops::Deref for HeldBody {
    type Target = MessageData;
    fn deref(&self) -> &MessageData {
        &self.data
    }
}

impl Drop for HeldBody {
    fn drop(&mut self) {
        let n = self.data.wire.len();
        let before = self.budget.held.fetch_sub(n, Ordering::AcqRel);
        if crossed(before, n, self.budget.refill_at) {
            self.budget.freed.notify_one();
        }
    }
}

/// How far below its maximum an in-flight budget (recipients, body bytes) must fall before
/// the take loop refills it: a quarter of the maximum, and for recipients at most one take
/// (or [`REFILL_ANYWAY_AFTER`] has passed since the last take). Refilling whenever anything
/// was freed took a few recipients at a time: at 8k messages/s the loop went round ~360
/// times a second, each time a queue request, a group commit of its own and a dispatch with
/// its blocking body load (BENCHMARKS.md, SMTP, "Eighth session").
fn refill_mark(max: usize, cap: usize) -> usize {
    max - (max / 4).clamp(1, cap)
}

/// Whether taking `n` off `before` brings it down to `mark` or below for the first time.
fn crossed(before: usize, n: usize, mark: usize) -> bool {
    before > mark && before.saturating_sub(n) <= mark
}

/// The take loop takes whatever room there is once this long has passed since its last take,
/// above the refill marks too: recipients in long transactions at slow destinations (which
/// [`Inner::rebalance`] does not give back) may keep the count above a mark for minutes, and
/// the room left must still serve the other destinations.
const REFILL_ANYWAY_AFTER: Duration = Duration::from_millis(100);

/// Whether an outcome's durable write may wait in the queue for more to share its commit
/// (`queue.outcome_commit_delay`), or its caller is about to wait for it.
#[derive(Clone, Copy, Debug)]
enum Wait {
    MayWait,
    Urgent,
}

/// What the first take of a run assumes a body weighs, before any was seen.
const FIRST_BODY_ESTIMATE: usize = 1024 * 1024;

struct Inner {
    settings: Arc<Settings>,
    queue: Arc<Queue>,
    router: Arc<Router>,
    client: Arc<ClientSettings>,
    classifier: Classifier,
    events: Arc<dyn EventSink>,
    labels: m::DestinationLabels,
    /// Outcome metrics of recipients with no destination (label "-").
    unrouted: m::OutcomeMetrics,
    dests: Mutex<HashMap<DestinationKey, Arc<Dest>>>,
    in_flight: AtomicUsize,
    /// The take loop refills when `in_flight` is at most this (see [`refill_mark`]).
    refill_at: usize,
    /// Told when `in_flight` falls to `refill_at`.
    room: Notify,
    bodies: Arc<BodyBudget>,
    /// Cancelled at shutdown: workers take no new transaction. Renewed by each run.
    stop: Mutex<CancellationToken>,
    workers: TaskTracker,
    wake: Notify,
    counters: Counters,
    /// When the last recipients given back by [`Inner::rebalance`] are due again.
    postponed_until: Mutex<Option<Instant>>,
    /// The leased recipients the engine holds as jobs, wherever they are (see [`HeldLeases`]).
    held: Arc<HeldLeases>,
}

/// The leased recipients the engine holds: every [`JobRcpt`] is counted here from its
/// creation until it is dropped, in a ready queue, waiting for a rate-limit slot, in a
/// transaction however long the server takes, or in a write of its outcome. The run loop
/// renews all their leases (`queue.lease_timeout`), so only a lease the engine has lost (a
/// job dropped without an outcome) runs out and is handed out again, and no transaction in
/// progress has its recipients sent a second time on another connection.
#[derive(Default)]
struct HeldLeases {
    /// Recipient → how many `JobRcpt`s hold it (two, briefly, if a recipient given back is
    /// leased again before the old one is dropped).
    ids: Mutex<HashMap<RecipientId, u32>>,
}

impl HeldLeases {
    fn hold(self: &Arc<Self>, id: RecipientId) -> HeldLease {
        *lock(&self.ids).entry(id).or_insert(0) += 1;
        HeldLease {
            id,
            held: Arc::clone(self),
        }
    }

    fn ids(&self) -> Vec<RecipientId> {
        lock(&self.ids).keys().copied().collect()
    }
}

/// One recipient's place in [`HeldLeases`], given up when dropped.
struct HeldLease {
    id: RecipientId,
    held: Arc<HeldLeases>,
}

impl Drop for HeldLease {
    fn drop(&mut self) {
        let mut ids = lock(&self.held.ids);
        if let std::collections::hash_map::Entry::Occupied(mut e) = ids.entry(self.id) {
            *e.get_mut() -= 1;
            if *e.get() == 0 {
                e.remove();
            }
        }
    }
}

/// One message to some recipients at one destination: one SMTP transaction.
struct Job {
    message: MessageId,
    sender: Option<Address>,
    data: Arc<HeldBody>,
    rcpts: Vec<JobRcpt>,
    /// When it entered the ready queue (for the head-of-line check).
    queued: Instant,
}

struct JobRcpt {
    id: RecipientId,
    address: Address,
    /// Attempts before this one.
    attempts: u32,
    created: SystemTime,
    /// Keeps its lease renewed while it exists.
    _held: HeldLease,
}

/// Limits of one destination (from `[delivery]`/`[smtp]`, overridden by `[destinations.X]`).
#[derive(Clone, Debug)]
struct Limits {
    max_connections: usize,
    messages_per_connection: usize,
    recipients_per_transaction: usize,
    rate: Option<RateLimit>,
    /// `smtp.pipeline_transactions`: the next envelope goes out behind the dot.
    pipeline: bool,
}

/// A destination: the worker pool for one MX host set.
struct Dest {
    key: DestinationKey,
    /// Its share of the in-flight budget when it is not keeping up: a quarter of
    /// `delivery.max_in_flight` (see [`Inner::rebalance`]).
    ready_cap: usize,
    /// Its metric handles, resolved once.
    metrics: m::DestinationMetrics,
    limits: Limits,
    route: Mutex<Arc<Route>>,
    state: Mutex<DestState>,
    /// Wakes an idle worker when a job arrives.
    notify: Notify,
}

struct DestState {
    ready: VecDeque<Job>,
    /// Recipients in `ready`, held under `Dest::ready_cap`.
    ready_rcpts: usize,
    active: usize,
    limit: usize,
    paused_until: Option<Instant>,
    pause_reason: &'static str,
    /// Consecutive reputation pauses, for the growing pause length.
    pause_level: u32,
    pauses: u64,
    /// Successful transactions since the limit last grew.
    successes: usize,
    /// Recipients tried and unknown users within the window, for the harvesting guard.
    harvest: Harvest,
    /// Earliest time the next message may start (rate limit spacing).
    next_send: Instant,
}

impl Engine {
    pub fn new(
        settings: Arc<Settings>,
        queue: Arc<Queue>,
        router: Arc<Router>,
        events: Arc<dyn EventSink>,
    ) -> Result<Engine, EngineError> {
        let client = Arc::new(ClientSettings::from_config(&settings.smtp)?);
        let classifier = Classifier::new(&settings.classify.rules)?;
        let refill_at = refill_mark(settings.delivery.max_in_flight, TAKE_BATCH);
        let bytes_refill_at = refill_mark(settings.delivery.max_in_flight_bytes, usize::MAX);
        Ok(Engine {
            inner: Arc::new(Inner {
                settings,
                queue,
                router,
                client,
                classifier,
                events,
                labels: m::DestinationLabels::default(),
                unrouted: m::OutcomeMetrics::new("-".into()),
                dests: Mutex::default(),
                in_flight: AtomicUsize::new(0),
                refill_at,
                room: Notify::new(),
                bodies: Arc::new(BodyBudget {
                    per_message: AtomicUsize::new(FIRST_BODY_ESTIMATE),
                    refill_at: bytes_refill_at,
                    ..BodyBudget::default()
                }),
                stop: Mutex::new(CancellationToken::new()),
                workers: TaskTracker::new(),
                wake: Notify::new(),
                counters: Counters::default(),
                postponed_until: Mutex::new(None),
                held: Arc::default(),
            }),
        })
    }

    /// Tells the dispatcher that new work may be due (after an enqueue).
    pub fn wake(&self) {
        self.inner.wake.notify_one();
    }

    /// Delivers until `shutdown` is cancelled or, with `drain`, until nothing is due or in
    /// flight. Then shuts down gracefully and returns what this run did.
    pub async fn run(&self, shutdown: CancellationToken, drain: bool) -> RunSummary {
        let inner = &self.inner;
        let before = inner.counters.snapshot();
        // A previous run's shutdown cancelled these; one run at a time.
        *lock(&inner.stop) = CancellationToken::new();
        inner.workers.reopen();
        let mut last_expire: Option<Instant> = None;
        let mut last_renew = Instant::now();
        let mut last_gauges: Option<Instant> = None;
        let mut last_take = Instant::now();
        loop {
            if shutdown.is_cancelled() {
                break;
            }
            if last_gauges.is_none_or(|t| t.elapsed() >= Duration::from_secs(2)) {
                let paused = self
                    .destinations()
                    .iter()
                    .filter(|d| d.paused_until.is_some())
                    .count();
                metrics::gauge!(m::DESTINATIONS_PAUSED).set(paused as f64);
                metrics::gauge!(m::IN_FLIGHT_BYTES)
                    .set(inner.bodies.held.load(Ordering::Relaxed) as f64);
                last_gauges = Some(Instant::now());
            }
            if let Some(timeout) = inner.queue.lease_timeout() {
                if last_renew.elapsed() >= (timeout / 4).min(Duration::from_secs(60)) {
                    inner.renew_held_leases();
                    last_renew = Instant::now();
                }
            }
            if last_expire.is_none_or(|t| t.elapsed() >= EXPIRE_EVERY) {
                inner.expire_sweep().await;
                last_expire = Some(Instant::now());
            }
            let max = inner.settings.delivery.max_in_flight;
            let room = max.saturating_sub(inner.in_flight.load(Ordering::Acquire));
            let held = inner.bodies.held.load(Ordering::Acquire);
            let bytes_room = inner
                .settings
                .delivery
                .max_in_flight_bytes
                .saturating_sub(held);
            // Below the refill marks (nothing held is always below), or a while after the last
            // take, there is room for a take worth its cost.
            let in_flight = max - room;
            let anyway = last_take.elapsed() >= REFILL_ANYWAY_AFTER;
            let has_room = room > 0 && (in_flight <= inner.refill_at || anyway);
            let has_bytes = bytes_room > 0 && (held <= inner.bodies.refill_at || anyway);
            let tried = has_room && has_bytes;
            let mut took = 0;
            if tried {
                last_take = Instant::now();
                let q = inner.queue.clone();
                // Sized so the bodies fit what is left of the byte budget, as far as the last
                // batch's sizes tell; at least one message, however big.
                let per_message = inner.bodies.per_message.load(Ordering::Relaxed).max(1);
                let limit = room.min(TAKE_BATCH).min((bytes_room / per_message).max(1));
                match tokio::task::spawn_blocking(move || q.take_due(SystemTime::now(), limit))
                    .await
                {
                    Ok(Ok(leases)) => {
                        took = leases.len();
                        if took > 0 {
                            inner.in_flight.fetch_add(took, Ordering::AcqRel);
                            Inner::dispatch(inner, leases).await;
                        }
                    }
                    Ok(Err(e)) => {
                        tracing::error!(error = %e, "cannot take due recipients from the queue")
                    }
                    Err(e) => tracing::error!(error = %e, "queue task failed"),
                }
            }
            if !has_room || !has_bytes {
                inner.rebalance().await;
            }
            if took > 0 {
                continue;
            }
            // Drained: a take found nothing due, nothing is in flight, and nothing given back
            // is about to be due again.
            let postponed = lock(&inner.postponed_until).is_some_and(|t| t > Instant::now());
            if drain && tried && inner.in_flight.load(Ordering::Acquire) == 0 && !postponed {
                break;
            }
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = inner.wake.notified() => {}
                _ = inner.room.notified(), if !has_room => {}
                _ = inner.bodies.freed.notified(), if !has_bytes => {}
                _ = tokio::time::sleep(Duration::from_millis(if drain { 20 } else { 250 })) => {}
            }
        }
        self.shutdown().await;
        inner.counters.snapshot().since(&before)
    }

    async fn shutdown(&self) {
        let inner = &self.inner;
        inner.stop_token().cancel();
        // Ready jobs that no worker has started go back to scheduled, unchanged.
        let dests: Vec<Arc<Dest>> = lock(&inner.dests).values().cloned().collect();
        for d in &dests {
            let jobs: Vec<Job> = lock(&d.state).take_all();
            let items: Vec<(RecipientId, Outcome)> = jobs
                .iter()
                .flat_map(|j| j.rcpts.iter().map(|r| (r.id, Outcome::Released)))
                .collect();
            inner.complete(items).await;
            d.notify.notify_waiters();
        }
        inner.workers.close();
        let grace = inner.settings.delivery.shutdown_grace;
        if tokio::time::timeout(grace, inner.workers.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                grace = %humantime::format_duration(grace),
                "workers still busy after the shutdown grace; their recipients stay leased and return to scheduled at the next start"
            );
        }
        let events = inner.events.clone();
        let _ = tokio::task::spawn_blocking(move || events.flush()).await;
    }

    /// Every destination's state.
    pub fn destinations(&self) -> Vec<DestStatus> {
        let dests: Vec<Arc<Dest>> = lock(&self.inner.dests).values().cloned().collect();
        let mut out: Vec<DestStatus> = dests
            .iter()
            .map(|d| {
                let s = lock(&d.state);
                DestStatus {
                    key: d.key.clone(),
                    active: s.active,
                    limit: s.limit,
                    max: d.limits.max_connections,
                    ready: s.ready.len(),
                    paused_until: s.paused_until.filter(|t| *t > Instant::now()),
                    pauses: s.pauses,
                }
            })
            .collect();
        out.sort_by(|a, b| a.key.cmp(&b.key));
        out
    }

    /// Recipients leased and not yet recorded.
    pub fn in_flight(&self) -> usize {
        self.inner.in_flight.load(Ordering::Acquire)
    }

    /// Bytes of prepared message bodies in memory now (see `delivery.max_in_flight_bytes`).
    pub fn in_flight_bytes(&self) -> usize {
        self.inner.bodies.held.load(Ordering::Acquire)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Inner {
    fn stop_token(&self) -> CancellationToken {
        lock(&self.stop).clone()
    }

    /// Counts one recipient outcome in this run's summary and in the metrics.
    fn tally(&self, kind: EventKind, metrics: &m::OutcomeMetrics, class: &'static str) {
        let c = &self.counters;
        let counter = match kind {
            EventKind::Delivered => &c.delivered,
            EventKind::Bounced => &c.bounced,
            EventKind::Deferred => &c.deferred,
            EventKind::Suppressed => &c.suppressed,
            EventKind::Expired => &c.expired,
            EventKind::Unknown => &c.unknown,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        metrics.increment(kind, class, 1);
    }

    /// Routes leased recipients and hands them to their destinations as transactions.
    async fn dispatch(self: &Arc<Self>, leases: Vec<Lease>) {
        // Group by message, keeping the queue's order.
        let mut order: Vec<MessageId> = Vec::new();
        let mut by_msg: HashMap<MessageId, Vec<Lease>> = HashMap::new();
        for l in leases {
            let id = l.recipient.id.message;
            by_msg
                .entry(id)
                .or_insert_with(|| {
                    order.push(id);
                    Vec::new()
                })
                .push(l);
        }
        // Load and prepare every body once, off the async threads.
        let q = self.queue.clone();
        let ids = order.clone();
        let max = self.settings.smtp.max_message_size;
        let budget = Arc::clone(&self.bodies);
        let bodies = tokio::task::spawn_blocking(move || {
            ids.into_iter()
                .map(|id| {
                    let data = match q.body(id) {
                        Ok(Some(b)) => prepare(&b, max)
                            .map(|d| Arc::new(HeldBody::new(d, &budget)))
                            .map_err(|e| (Class::Permanent, e.to_string())),
                        Ok(None) => Err((
                            Class::Permanent,
                            "message body missing from the queue".to_owned(),
                        )),
                        // Damaged data will not get better; an I/O error may (EMFILE, EIO).
                        Err(e @ bulksend_queue::QueueError::Corrupt { .. }) => {
                            Err((Class::Permanent, format!("cannot read message body: {e}")))
                        }
                        Err(e) => Err((Class::Transient, format!("cannot read message body: {e}"))),
                    };
                    (id, data)
                })
                .collect::<HashMap<_, _>>()
        })
        .await
        .unwrap_or_default();
        let (n, bytes) = bodies
            .values()
            .filter_map(|b| b.as_ref().ok())
            .fold((0, 0), |(n, bytes), b| (n + 1, bytes + b.wire.len()));
        if let Some(per_message) = bytes.checked_div(n) {
            self.bodies
                .per_message
                .store(per_message, Ordering::Relaxed);
        }

        // Route every distinct domain of the batch at once: one slow or silent DNS zone must
        // not make the others wait its timeout in turn.
        let routes = {
            let mut domains: Vec<String> = by_msg
                .values()
                .flatten()
                .map(|l| l.recipient.destination.clone())
                .collect();
            domains.sort_unstable();
            domains.dedup();
            let mut set = tokio::task::JoinSet::new();
            for d in domains {
                let router = self.router.clone();
                set.spawn(async move {
                    let r = router.route(&d).await;
                    (d, r)
                });
            }
            let mut routes: HashMap<String, Result<Arc<Route>, RouteError>> = HashMap::new();
            while let Some(res) = set.join_next().await {
                if let Ok((d, r)) = res {
                    routes.insert(d, r);
                }
            }
            routes
        };
        let mut failed: Vec<(JobRcpt, Classified, bool)> = Vec::new();
        for id in order {
            let Some(leases) = by_msg.remove(&id) else {
                continue;
            };
            let data = match bodies.get(&id) {
                Some(Ok(d)) => d.clone(),
                Some(Err((class, reason))) => {
                    for l in leases {
                        if let Some(r) = job_rcpt(&self.held, &l) {
                            failed.push((r, local(*class, reason), false));
                        } else {
                            self.bad_address(&l).await;
                        }
                    }
                    continue;
                }
                None => {
                    // The blocking task failed: give them back untouched.
                    let items = leases
                        .iter()
                        .map(|l| (l.recipient.id, Outcome::Released))
                        .collect();
                    self.complete(items).await;
                    continue;
                }
            };
            let sender = match leases[0].sender.as_str() {
                "" | "<>" => None,
                s => match Address::parse(s) {
                    Ok(a) => Some(a),
                    Err(e) => {
                        for l in leases {
                            if let Some(r) = job_rcpt(&self.held, &l) {
                                failed.push((
                                    r,
                                    local(Class::Permanent, &format!("bad sender address: {e}")),
                                    false,
                                ));
                            } else {
                                self.bad_address(&l).await;
                            }
                        }
                        continue;
                    }
                },
            };
            // Group this message's recipients by destination.
            let mut per_dest: Vec<(Arc<Dest>, Vec<JobRcpt>)> = Vec::new();
            for l in leases {
                let Some(rcpt) = job_rcpt(&self.held, &l) else {
                    self.bad_address(&l).await;
                    continue;
                };
                let routed = routes
                    .get(&l.recipient.destination)
                    .cloned()
                    .unwrap_or_else(|| Err(RouteError::Transient("route lookup failed".into())));
                match routed {
                    Ok(route) => {
                        let dest = self.dest(&route, &l.recipient.destination);
                        match per_dest.iter_mut().find(|(d, _)| Arc::ptr_eq(d, &dest)) {
                            Some((_, v)) => v.push(rcpt),
                            None => per_dest.push((dest, vec![rcpt])),
                        }
                    }
                    Err(RouteError::Permanent(reason)) => failed.push((
                        rcpt,
                        local(Class::Permanent, &format!("routing: {reason}")),
                        false,
                    )),
                    Err(RouteError::Transient(reason)) => failed.push((
                        rcpt,
                        local(Class::Transient, &format!("routing: {reason}")),
                        false,
                    )),
                }
            }
            for (dest, rcpts) in per_dest {
                let per_tx = dest.limits.recipients_per_transaction.max(1);
                let mut rcpts = rcpts.into_iter().peekable();
                while rcpts.peek().is_some() {
                    let chunk: Vec<JobRcpt> = rcpts.by_ref().take(per_tx).collect();
                    let job = Job {
                        message: id,
                        sender: sender.clone(),
                        data: data.clone(),
                        rcpts: chunk,
                        queued: Instant::now(),
                    };
                    Dest::push(&dest, self, job).await;
                }
            }
        }
        if !failed.is_empty() {
            let key = DestinationKey("-".into());
            self.record(&key, None, failed).await;
        }
    }

    /// Head-of-line isolation: a destination that is not keeping up (its oldest ready job has
    /// waited [`STUCK_AFTER`]) and holds more than its share of the in-flight budgets
    /// (recipients, body bytes) gives the newest overflow back to the queue, due again shortly
    /// (not counted as an attempt), so the budgets serve other destinations meanwhile. A fast
    /// destination never has old jobs, so a single-destination bulk run is never churned.
    async fn rebalance(&self) {
        let dests: Vec<Arc<Dest>> = lock(&self.dests).values().cloned().collect();
        let stuck: Vec<Arc<Dest>> = dests
            .into_iter()
            .filter(|d| {
                let s = lock(&d.state);
                s.ready
                    .front()
                    .is_some_and(|j| j.queued.elapsed() >= STUCK_AFTER)
            })
            .collect();
        // Together, destinations that are not keeping up keep at most one quarter of the
        // budgets (recipients and body bytes), however many of them there are. A body shared
        // with another destination's job counts for each.
        let share = stuck.len().max(1);
        let byte_cap = (self.settings.delivery.max_in_flight_bytes / 4 / share).max(1);
        let mut evicted: Vec<RecipientId> = Vec::new();
        for d in stuck {
            let mut s = lock(&d.state);
            let cap = (d.ready_cap / share).max(1);
            let mut bytes: usize = s.ready.iter().map(|j| j.data.wire.len()).sum();
            while s.ready_rcpts > cap || (bytes > byte_cap && s.ready.len() > 1) {
                let Some(job) = s.ready.pop_back() else { break };
                s.ready_rcpts = s.ready_rcpts.saturating_sub(job.rcpts.len());
                bytes = bytes.saturating_sub(job.data.wire.len());
                evicted.extend(job.rcpts.iter().map(|r| r.id));
            }
        }
        if evicted.is_empty() {
            return;
        }
        tracing::debug!(
            recipients = evicted.len(),
            "destination not keeping up; giving back its overflow"
        );
        let due = SystemTime::now() + POSTPONE + jitter(POSTPONE);
        {
            let mut p = lock(&self.postponed_until);
            let at = Instant::now() + due.duration_since(SystemTime::now()).unwrap_or_default();
            *p = Some(p.map_or(at, |t| t.max(at)));
        }
        let items = evicted
            .into_iter()
            .map(|id| {
                let reason = "waiting for a connection to its destination".to_owned();
                (
                    id,
                    Outcome::Postponed {
                        reason,
                        next_attempt: due,
                    },
                )
            })
            .collect();
        self.complete(items).await;
    }

    /// A queued address that no longer parses (the queue's validation is looser): bounce it,
    /// with an event like any other outcome.
    async fn bad_address(&self, l: &Lease) {
        let reason = format!("invalid recipient address {:?}", l.recipient.address);
        let outcome = Outcome::Bounced {
            reply: reason.clone(),
        };
        self.complete(vec![(l.recipient.id, outcome)]).await;
        self.tally(EventKind::Bounced, &self.unrouted, "permanent");
        self.events.emit(Event {
            event: EventKind::Bounced,
            message_id: l.recipient.id.message.to_string(),
            recipient: l.recipient.address.clone(),
            destination: l.recipient.destination.clone(),
            mx: None,
            code: None,
            enhanced: None,
            text: reason,
            class: "permanent".into(),
            phase: None,
            attempt: l.recipient.attempts + 1,
            at: rfc3339(SystemTime::now()),
            next_attempt: None,
        });
    }

    /// The destination for `route`, created on first use.
    fn dest(self: &Arc<Self>, route: &Arc<Route>, domain: &str) -> Arc<Dest> {
        let mut dests = lock(&self.dests);
        if let Some(d) = dests.get(&route.destination) {
            let mut r = lock(&d.route);
            if !Arc::ptr_eq(&r, route) {
                *r = route.clone();
            }
            return d.clone();
        }
        let s = &self.settings;
        let o = s
            .destinations
            .get(domain)
            .or_else(|| s.destinations.get(&route.destination.0))
            .cloned()
            .unwrap_or_default();
        let rate = o
            .rate_limit
            .as_deref()
            .or(s.delivery.rate_limit.as_deref())
            .and_then(|r| RateLimit::parse(r).ok());
        let limits = Limits {
            max_connections: o
                .max_connections
                .unwrap_or(s.delivery.max_connections_per_destination)
                .max(1),
            messages_per_connection: o
                .max_messages_per_connection
                .unwrap_or(s.smtp.max_messages_per_connection)
                .max(1),
            recipients_per_transaction: o
                .max_recipients_per_transaction
                .unwrap_or(s.smtp.max_recipients_per_transaction)
                .max(1),
            rate,
            pipeline: o
                .pipeline_transactions
                .unwrap_or(s.smtp.pipeline_transactions),
        };
        let metrics = m::DestinationMetrics::new(self.labels.label(&route.destination.0));
        metrics
            .concurrency_limit()
            .set(limits.max_connections as f64);
        let dest = Arc::new(Dest {
            key: route.destination.clone(),
            ready_cap: (s.delivery.max_in_flight / 4).max(1),
            metrics,
            route: Mutex::new(route.clone()),
            state: Mutex::new(DestState {
                ready: VecDeque::new(),
                ready_rcpts: 0,
                active: 0,
                limit: limits.max_connections,
                paused_until: None,
                pause_reason: "",
                pause_level: 0,
                pauses: 0,
                successes: 0,
                harvest: Harvest::default(),
                next_send: Instant::now(),
            }),
            limits,
            notify: Notify::new(),
        });
        dests.insert(route.destination.clone(), dest.clone());
        dest
    }

    /// Renews the leases of every recipient the engine holds ([`HeldLeases`]): a slow or
    /// rate-limited destination may keep its jobs waiting, and a slow server a transaction,
    /// longer than the queue's lease timeout, which would otherwise hand them out a second
    /// time meanwhile.
    fn renew_held_leases(&self) {
        let ids = self.held.ids();
        if !ids.is_empty() {
            self.queue.renew_leases(&ids, SystemTime::now());
        }
    }

    async fn expire_sweep(&self) {
        let q = self.queue.clone();
        let expired =
            match tokio::task::spawn_blocking(move || q.expire_due(SystemTime::now())).await {
                Ok(Ok(v)) => v,
                Ok(Err(e)) => {
                    tracing::error!(error = %e, "expiry sweep failed");
                    return;
                }
                Err(_) => return,
            };
        for r in expired {
            self.tally(EventKind::Expired, &self.unrouted, "expired");
            self.events.emit(Event {
                event: EventKind::Expired,
                message_id: r.id.message.to_string(),
                recipient: r.address.clone(),
                destination: r.destination.clone(),
                mx: None,
                code: None,
                enhanced: None,
                text: r
                    .last_reply
                    .clone()
                    .unwrap_or_else(|| "expired in queue".into()),
                class: "expired".into(),
                phase: None,
                attempt: r.attempts,
                at: rfc3339(SystemTime::now()),
                next_attempt: None,
            });
        }
    }

    /// Writes outcomes durably; logs (never panics) on failure. Decrements in-flight.
    async fn complete(&self, items: Vec<(RecipientId, Outcome)>) -> Vec<Option<Completed>> {
        self.complete_with(items, Wait::MayWait).await
    }

    /// [`Inner::complete`]; with [`Wait::Urgent`] the queue commits at once, even where it would
    /// hold the group for more outcomes (`queue.outcome_commit_delay`).
    async fn complete_with(
        &self,
        items: Vec<(RecipientId, Outcome)>,
        wait: Wait,
    ) -> Vec<Option<Completed>> {
        if items.is_empty() {
            return Vec::new();
        }
        let n = items.len();
        let res = match wait {
            Wait::MayWait => self.queue.complete_batch_async(items).await,
            Wait::Urgent => self.queue.complete_batch_async_urgent(items).await,
        };
        let before = self.in_flight.fetch_sub(n, Ordering::AcqRel);
        if crossed(before, n, self.refill_at) {
            self.room.notify_one();
        }
        match res {
            Ok(v) => v
                .into_iter()
                .map(|r| match r {
                    Ok(c) => Some(c),
                    Err(e) => {
                        tracing::error!(error = %e, "cannot record an outcome");
                        None
                    }
                })
                .collect(),
            Err(e) => {
                tracing::error!(error = %e, "cannot record outcomes; they stay leased until restart");
                vec![None; n]
            }
        }
    }

    /// Turns classified outcomes into queue outcomes, suppression entries, events and metrics.
    /// `pause_until`: when the destination's pause ends, if it is paused (reputation deferrals
    /// are not retried before that).
    async fn record(
        &self,
        dest: &DestinationKey,
        mx: Option<&str>,
        outcomes: Vec<(JobRcpt, Classified, bool)>,
    ) {
        self.record_with_pause(dest, &self.unrouted, mx, outcomes, None, Wait::MayWait)
            .await;
    }

    async fn record_with_pause(
        &self,
        dest: &DestinationKey,
        metrics: &m::OutcomeMetrics,
        mx: Option<&str>,
        outcomes: Vec<(JobRcpt, Classified, bool)>,
        pause_until: Option<SystemTime>,
        wait: Wait,
    ) {
        let now = SystemTime::now();
        let d = &self.settings.delivery;
        let mut items = Vec::with_capacity(outcomes.len());
        let mut kinds = Vec::with_capacity(outcomes.len());
        let mut to_suppress: Vec<(String, String)> = Vec::new();
        for (r, c, suppressed) in &outcomes {
            let attempt = r.attempts + 1;
            let reply = c.reason();
            let retry_at = || {
                let t = now + backoff(d.min_backoff, d.max_backoff, attempt);
                match pause_until {
                    Some(p) if p > t => p + jitter(Duration::from_secs(5)),
                    _ => t,
                }
            };
            let (outcome, kind) = if *suppressed {
                (
                    Outcome::Suppressed {
                        reason: reply.clone(),
                    },
                    EventKind::Suppressed,
                )
            } else {
                match c.class {
                    Class::Delivered => (
                        Outcome::Delivered {
                            reply: reply.clone(),
                        },
                        EventKind::Delivered,
                    ),
                    Class::InvalidRecipient => {
                        to_suppress.push((r.address.as_str().to_owned(), reply.clone()));
                        (
                            Outcome::Bounced {
                                reply: reply.clone(),
                            },
                            EventKind::Bounced,
                        )
                    }
                    Class::Permanent => (
                        Outcome::Bounced {
                            reply: reply.clone(),
                        },
                        EventKind::Bounced,
                    ),
                    Class::Transient | Class::Unreachable | Class::Reputation => (
                        Outcome::Deferred {
                            reply: reply.clone(),
                            next_attempt: retry_at(),
                        },
                        EventKind::Deferred,
                    ),
                    Class::Unknown => match d.unknown_after_dot {
                        UnknownPolicy::Retry => (
                            Outcome::Deferred {
                                reply: reply.clone(),
                                next_attempt: retry_at(),
                            },
                            EventKind::Unknown,
                        ),
                        UnknownPolicy::Final => (
                            Outcome::Unknown {
                                reply: reply.clone(),
                            },
                            EventKind::Unknown,
                        ),
                    },
                }
            };
            items.push((r.id, outcome));
            kinds.push(kind);
        }
        // Suppress before recording the bounce: a crash in between must not let the address
        // be tried again.
        if !to_suppress.is_empty() {
            let q = self.queue.clone();
            let _ = tokio::task::spawn_blocking(move || {
                for (addr, reason) in to_suppress {
                    if let Err(e) = q.suppress_add(&addr, &reason) {
                        tracing::error!(address = %addr, error = %e, "cannot add to the suppression list");
                    }
                }
            })
            .await;
        }
        let next: Vec<Option<SystemTime>> = items
            .iter()
            .map(|(_, o)| match o {
                Outcome::Deferred { next_attempt, .. } => Some(*next_attempt),
                _ => None,
            })
            .collect();
        let done = self.complete_with(items, wait).await;
        for (i, (r, c, _)) in outcomes.iter().enumerate() {
            let mut kind = kinds[i];
            if let Some(Some(Completed {
                state: RecipientState::Expired,
            })) = done.get(i)
            {
                kind = EventKind::Expired;
            }
            let class = match kind {
                EventKind::Expired => "expired",
                EventKind::Suppressed => "suppressed",
                _ => c.class.as_str(),
            };
            self.tally(kind, metrics, class);
            if kind == EventKind::Delivered {
                if let Ok(age) = now.duration_since(r.created) {
                    metrics.delivery_latency(age.as_secs_f64());
                }
            }
            self.events.emit(Event {
                event: kind,
                message_id: r.id.message.to_string(),
                recipient: r.address.as_str().to_owned(),
                destination: dest.0.clone(),
                mx: mx.map(str::to_owned),
                code: c.code,
                enhanced: c.enhanced.map(|e| e.to_string()),
                text: c.text.clone(),
                class: class.to_owned(),
                phase: Some(c.phase.as_str().to_owned()),
                attempt: r.attempts + 1,
                at: rfc3339(now),
                next_attempt: match kind {
                    EventKind::Deferred | EventKind::Unknown => next[i].map(rfc3339),
                    _ => None,
                },
            });
        }
    }
}

impl DestState {
    fn pop(&mut self) -> Option<Job> {
        let job = self.ready.pop_front()?;
        self.ready_rcpts = self.ready_rcpts.saturating_sub(job.rcpts.len());
        Some(job)
    }

    fn take_all(&mut self) -> Vec<Job> {
        self.ready_rcpts = 0;
        self.ready.drain(..).collect()
    }
}

impl Dest {
    /// Queues a job, or defers it at once if the destination is paused; starts a worker if
    /// the pool has room.
    async fn push(dest: &Arc<Dest>, inner: &Arc<Inner>, job: Job) {
        let paused = {
            let mut s = lock(&dest.state);
            match s.paused_until.filter(|t| *t > Instant::now()) {
                Some(until) => Some((until, s.pause_reason)),
                None => {
                    s.ready_rcpts += job.rcpts.len();
                    s.ready.push_back(job);
                    if s.active < s.limit && !inner.stop_token().is_cancelled() {
                        s.active += 1;
                        dest.metrics.connections_open().increment(1.0);
                        let (d, i) = (dest.clone(), inner.clone());
                        inner.workers.spawn(spawnable_worker(i, d));
                    } else {
                        dest.notify.notify_one();
                    }
                    return;
                }
            }
        };
        if let Some((until, reason)) = paused {
            dest.defer_paused(inner, vec![job], until, reason).await;
        }
    }

    /// Defers jobs of a paused destination to the end of the pause (not a bounce).
    async fn defer_paused(&self, inner: &Inner, jobs: Vec<Job>, until: Instant, reason: &str) {
        let until_wall = SystemTime::now() + until.saturating_duration_since(Instant::now());
        let c = local(Class::Reputation, &format!("destination paused ({reason})"));
        let outcomes: Vec<_> = jobs
            .into_iter()
            .flat_map(|j| j.rcpts)
            .map(|r| (r, c.clone(), false))
            .collect();
        inner
            .record_with_pause(
                &self.key,
                &self.metrics.outcomes,
                None,
                outcomes,
                Some(until_wall),
                Wait::MayWait,
            )
            .await;
    }

    /// A reputation/rate signal, or no MX host reachable (`reason`): halve the connection
    /// limit, pause (growing), and defer what is waiting. Returns when the pause ends.
    async fn back_off(&self, inner: &Inner, reason: &'static str) -> Instant {
        let d = &inner.settings.delivery;
        let (until, jobs) = {
            let mut s = lock(&self.state);
            s.successes = 0;
            // Several connections may report the same event: halve and count once per pause;
            // later reports only extend it.
            let now = Instant::now();
            if s.paused_until.is_none_or(|t| t <= now) {
                s.limit = (s.limit / 2).max(1);
                s.pause_level = s.pause_level.saturating_add(1);
                s.pauses += 1;
                self.metrics.pause(reason);
            }
            let pause = d
                .pause_min
                .saturating_mul(2u32.saturating_pow(s.pause_level.saturating_sub(1).min(16)))
                .min(d.pause_max);
            let until = now + pause;
            s.paused_until = Some(s.paused_until.map_or(until, |t| t.max(until)));
            s.pause_reason = reason;
            self.metrics.concurrency_limit().set(s.limit as f64);
            tracing::warn!(destination = %self.key.0, reason, limit = s.limit, pause = %humantime::format_duration(pause), "backing off destination");
            (s.paused_until.unwrap_or(until), s.take_all())
        };
        self.notify.notify_waiters();
        if !jobs.is_empty() {
            self.defer_paused(inner, jobs, until, reason).await;
        }
        until
    }

    /// After a transaction: grow the limit on sustained success and run the harvesting guard.
    async fn on_transaction(&self, inner: &Inner, ok: bool, tried: u32, unknown_users: u32) {
        let d = &inner.settings.delivery;
        let pause = {
            let mut s = lock(&self.state);
            if ok {
                s.successes += 1;
                // "Sustained": as many successes as the current limit, twice over.
                if s.successes >= s.limit * 2 {
                    s.successes = 0;
                    s.pause_level = 0;
                    if s.limit < self.limits.max_connections {
                        s.limit += 1;
                        self.metrics.concurrency_limit().set(s.limit as f64);
                    }
                }
            }
            let now = Instant::now();
            let (t, u) = s.harvest.add(now, d.harvest_window, tried, unknown_users);
            if t >= u64::from(d.harvest_min_sample) && u as f64 / t as f64 >= d.harvest_threshold {
                s.harvest = Harvest::default();
                let until = now + d.harvest_pause;
                s.paused_until = Some(s.paused_until.map_or(until, |p| p.max(until)));
                s.pause_reason = "harvest";
                s.pauses += 1;
                self.metrics.pause("harvest");
                tracing::warn!(
                    destination = %self.key.0, tried = t, unknown = u,
                    pause = %humantime::format_duration(d.harvest_pause),
                    "harvesting guard: too many unknown-user rejections; destination paused"
                );
                Some((until, s.take_all()))
            } else {
                None
            }
        };
        if let Some((until, jobs)) = pause {
            self.notify.notify_waiters();
            self.defer_paused(inner, jobs, until, "harvest").await;
        }
    }

    fn is_paused(&self) -> bool {
        self.pause().is_some()
    }

    /// The end and reason of the current pause, if paused.
    fn pause(&self) -> Option<(Instant, &'static str)> {
        let s = lock(&self.state);
        s.paused_until
            .filter(|t| *t > Instant::now())
            .map(|t| (t, s.pause_reason))
    }
}

/// [`worker`] as a boxed `Send` future: a worker may start its successor, and a directly
/// recursive `async fn` has a type the compiler cannot prove `Send`.
fn spawnable_worker(
    inner: Arc<Inner>,
    dest: Arc<Dest>,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> {
    Box::pin(worker(inner, dest))
}

/// One connection worker of a destination.
///
/// It carries up to `delivery.max_unrecorded_per_connection` transactions whose outcomes
/// are still being written to the queue. A durable write waits for a group commit (an
/// fdatasync, ~1–2 ms here, with spikes), longer than a pipelined transaction on a fast
/// link: with one, a connection spent most of its time waiting for its previous outcome;
/// with 4, all connections still stalled together on slow commits (8: +10–26 % msg/s on
/// loopback in 4 pairs, BENCHMARKS.md). Each outcome's duplicate window stays one group commit long
/// (see the queue's docs); a crash can re-send up to that many transactions per connection.
async fn worker(inner: Arc<Inner>, dest: Arc<Dest>) {
    let idle = inner.settings.smtp.timeouts.idle;
    let mut session: Option<(Session, String)> = None;
    // Earlier transactions' outcomes, still being written to the queue (durably) while this
    // connection carries the next one: at most `max_unrecorded`.
    let max_unrecorded = inner.settings.delivery.max_unrecorded_per_connection;
    let mut recording: VecDeque<tokio::task::JoinHandle<()>> = VecDeque::new();
    // The job whose envelope went out behind the last dot on `session`: that session's next
    // transaction, whatever happens (a server in DATA mode reads anything else as content).
    let mut sent: Option<(Job, Envelope)> = None;
    // A job taken to go out that way and not sent: the next one to start.
    let mut carried: Option<Job> = None;
    // A reputation signal or a pause came while an envelope was sent ahead: finish that
    // transaction, then stop.
    let mut wind_down = false;
    loop {
        let (job, env) = if let Some((job, env)) = sent.take() {
            (job, Some(env))
        } else {
            let job = match carried.take() {
                Some(job) => job,
                None => {
                    let Some(job) = next_job(&inner, &dest, idle).await else {
                        break;
                    };
                    if !wait_for_rate_slot(&inner, &dest, &job).await {
                        // Shutting down: the job was released, never started.
                        break;
                    }
                    job
                }
            };
            match screen(&inner, &dest, job).await {
                Screened::Send(job) => (job, None),
                Screened::Skip => continue,
                Screened::Stop => break,
            }
        };
        if env.is_none() {
            let stale = match session.as_mut() {
                Some((s, _)) => s.probe_stale().await,
                None => true,
            };
            if stale {
                if let Some((s, _)) = session.take() {
                    s.close().await;
                }
                match connect(&inner, &dest).await {
                    Ok(s) => session = Some(s),
                    Err(e) => {
                        // No MX host would talk to us (refused, timed out, or refused us at the
                        // greeting/EHLO/TLS, 5xx included, as Postfix's smtp_skip_5xx_greeting):
                        // the recipients wait, and the destination backs off. Never a bounce.
                        let mut c = inner.classifier.classify(&RcptResult::Failed(e));
                        let reason = if c.class == Class::Reputation || c.reputation_signal {
                            c.class = Class::Reputation;
                            "reputation"
                        } else {
                            c.class = Class::Unreachable;
                            "unreachable"
                        };
                        let until = dest.back_off(&inner, reason).await;
                        let until_wall = Some(
                            SystemTime::now() + until.saturating_duration_since(Instant::now()),
                        );
                        let outcomes = job
                            .rcpts
                            .into_iter()
                            .map(|r| (r, c.clone(), false))
                            .collect();
                        inner
                            .record_with_pause(
                                &dest.key,
                                &dest.metrics.outcomes,
                                None,
                                outcomes,
                                until_wall,
                                Wait::MayWait,
                            )
                            .await;
                        break;
                    }
                }
            }
        }
        let Some((s, mx)) = session.as_mut() else {
            // Only after a failed connect, which ends the loop: a sent-ahead job always has
            // its session.
            break;
        };
        let started = Instant::now();
        let addrs: Vec<Address> = job.rcpts.iter().map(|r| r.address.clone()).collect();
        let this = match env {
            Some(env) => Ok(env),
            None => s.envelope(job.sender.as_ref(), &addrs, &job.data),
        };
        // The next job of this connection, if its envelope can go out behind this dot.
        let after_this = s.transactions() + usize::from(matches!(&this, Ok(e) if !e.is_sent()));
        let next = if dest.limits.pipeline
            && dest.limits.rate.is_none()
            && !wind_down
            && after_this < dest.limits.messages_per_connection
            && this.is_ok()
        {
            let popped = lock(&dest.state).pop();
            match popped {
                Some(next) => match screen(&inner, &dest, next).await {
                    Screened::Send(next) => Some(next),
                    Screened::Skip | Screened::Stop => None,
                },
                None => None,
            }
        } else {
            None
        };
        let next_env = next
            .as_ref()
            .filter(|n| !shares_address(&job, n))
            .and_then(|n| {
                let to: Vec<Address> = n.rcpts.iter().map(|r| r.address.clone()).collect();
                s.envelope(n.sender.as_ref(), &to, &n.data).ok()
            });
        let tx = match this {
            Ok(env) => {
                let (tx, ahead) = s.transact(env, &job.data, next_env).await;
                match (next, ahead) {
                    (Some(n), Some(env)) => {
                        inner.counters.pipelined.fetch_add(1, Ordering::Relaxed);
                        dest.metrics.pipelined();
                        sent = Some((n, env));
                    }
                    (n, _) => carried = n,
                }
                tx
            }
            Err(tx) => {
                carried = next;
                tx
            }
        };
        tracing::debug!(message = %job.message, destination = %dest.key.0, mx = %mx, recipients = addrs.len(), ended = ?tx.ended, "transaction");
        dest.metrics
            .transaction_seconds(started.elapsed().as_secs_f64());
        let mut reputation = false;
        let mut unknown_users = 0u32;
        let mut delivered = false;
        // A reply after the dot is one verdict for every accepted recipient: a "5.1.1" there
        // names a single bad address only when there was a single recipient.
        let after_dot = tx
            .recipients
            .iter()
            .filter(|r| {
                matches!(
                    r,
                    RcptResult::Rejected {
                        phase: crate::smtp::Phase::DataDone,
                        ..
                    }
                )
            })
            .count();
        let outcomes: Vec<(JobRcpt, Classified, bool)> = job
            .rcpts
            .into_iter()
            .zip(&tx.recipients)
            .map(|(r, res)| {
                let mut c = inner.classifier.classify(res);
                if c.class == Class::InvalidRecipient
                    && c.phase == crate::smtp::Phase::DataDone
                    && after_dot > 1
                {
                    c.class = Class::Permanent;
                }
                reputation |= c.class == Class::Reputation || c.reputation_signal;
                unknown_users += u32::from(c.class == Class::InvalidRecipient);
                delivered |= c.class == Class::Delivered;
                (r, c, false)
            })
            .collect();
        let tried = outcomes.len() as u32;
        let until = if reputation {
            Some(dest.back_off(&inner, "reputation").await)
        } else {
            None
        };
        let until_wall =
            until.map(|u| SystemTime::now() + u.saturating_duration_since(Instant::now()));
        let mx_name = mx.clone();
        // An unknown address must be on the suppression list before anything else is sent,
        // and a reputation signal changes what happens next: record those in line, after
        // everything before them. Otherwise the next transaction overlaps with this one's
        // durable write (the lease is held until the write is done; a crash in between
        // re-sends, as it would have before the write).
        let unknown = outcomes
            .iter()
            .any(|(_, c, _)| c.class == Class::InvalidRecipient);
        recording.retain(|r| !r.is_finished());
        if unknown || reputation {
            for r in recording.drain(..) {
                let _ = r.await;
            }
            inner
                .record_with_pause(
                    &dest.key,
                    &dest.metrics.outcomes,
                    Some(&mx_name),
                    outcomes,
                    until_wall,
                    Wait::Urgent,
                )
                .await;
        } else {
            // Urgent when the worker is about to wait for its outcomes (the queue would
            // otherwise hold the group it waits for up to `queue.outcome_commit_delay`).
            let wait = if recording.len() < max_unrecorded {
                Wait::MayWait
            } else {
                Wait::Urgent
            };
            let (i, d) = (inner.clone(), dest.clone());
            recording.push_back(inner.workers.spawn(async move {
                i.record_with_pause(
                    &d.key,
                    &d.metrics.outcomes,
                    Some(&mx_name),
                    outcomes,
                    until_wall,
                    wait,
                )
                .await;
            }));
            // This one included: with 0, it is written before the next data goes out.
            while recording.len() > max_unrecorded {
                if let Some(r) = recording.pop_front() {
                    let _ = r.await;
                }
            }
        }
        dest.on_transaction(&inner, delivered && !reputation, tried, unknown_users)
            .await;
        let stop = reputation || wind_down || dest.is_paused();
        if sent.is_some() {
            // The next transaction is already under way on this connection: it comes first.
            wind_down = stop;
            continue;
        }
        let done =
            tx.ended.is_some() || s.transactions() >= dest.limits.messages_per_connection || stop;
        if done {
            if let Some((s, _)) = session.take() {
                s.close().await;
            }
            if stop {
                break;
            }
        }
    }
    // Taken for this connection and never started (a sent-ahead one only if the loop left
    // without its session, which it does not).
    let unstarted = carried.into_iter().chain(sent.map(|(job, _)| job));
    for job in unstarted {
        give_back(&inner, &dest, job).await;
    }
    for r in recording.drain(..) {
        let _ = r.await;
    }
    // Give the slot back before the (up to two QUIT timeouts long) close, and check under the
    // same lock whether a job arrived meanwhile: a push that saw every slot taken only
    // notified, and nobody is waiting any more.
    let respawn = {
        let mut s = lock(&dest.state);
        s.active = s.active.saturating_sub(1);
        let go = !s.ready.is_empty()
            && s.active < s.limit
            && s.paused_until.is_none_or(|t| t <= Instant::now())
            && !inner.stop_token().is_cancelled();
        if go {
            s.active += 1;
        }
        go
    };
    if respawn {
        let (d, i) = (dest.clone(), inner.clone());
        inner.workers.spawn(spawnable_worker(i, d));
    } else {
        dest.metrics.connections_open().decrement(1.0);
    }
    if let Some((s, _)) = session.take() {
        s.close().await;
    }
}

/// Recipients tried and unknown-user rejections of one destination within the harvesting
/// window, in one-second buckets with running totals: O(1) per transaction and at most one
/// bucket per second of the window, however many transactions there are.
#[derive(Default)]
struct Harvest {
    buckets: VecDeque<(Instant, u64, u64)>,
    tried: u64,
    unknown: u64,
}

impl Harvest {
    const BUCKET: Duration = Duration::from_secs(1);

    /// Counts a transaction and forgets what fell out of `window`; returns the totals.
    fn add(&mut self, now: Instant, window: Duration, tried: u32, unknown: u32) -> (u64, u64) {
        let (tried, unknown) = (u64::from(tried), u64::from(unknown));
        if tried > 0 {
            match self.buckets.back_mut() {
                Some((start, t, u)) if now.duration_since(*start) < Self::BUCKET => {
                    *t += tried;
                    *u += unknown;
                }
                _ => self.buckets.push_back((now, tried, unknown)),
            }
            self.tried += tried;
            self.unknown += unknown;
        }
        while let Some(&(start, t, u)) = self.buckets.front() {
            if now.duration_since(start) <= window {
                break;
            }
            self.buckets.pop_front();
            self.tried -= t;
            self.unknown -= u;
        }
        (self.tried, self.unknown)
    }
}

/// The destination's rate limit, if any: waits for this job's slot (message starts spaced
/// evenly). `false` when bulksend began stopping meanwhile; the job was then released.
async fn wait_for_rate_slot(inner: &Arc<Inner>, dest: &Dest, job: &Job) -> bool {
    let Some(rate) = dest.limits.rate else {
        return true;
    };
    let at = {
        let mut s = lock(&dest.state);
        let at = s.next_send.max(Instant::now());
        s.next_send = at + rate.per / rate.count;
        at
    };
    // Its leases are renewed meanwhile, like those of every job the engine holds.
    let stop = inner.stop_token();
    tokio::select! {
        _ = tokio::time::sleep_until(at.into()) => true,
        _ = stop.cancelled() => {
            release(inner, job).await;
            false
        }
    }
}

/// What [`screen`] decided about a job.
enum Screened {
    /// Send it, to the recipients left.
    Send(Job),
    /// Nobody left to send it to (all suppressed or held back); take the next job.
    Skip,
    /// The destination is paused or bulksend is stopping: the job was deferred or released,
    /// and the worker should take no more.
    Stop,
}

/// The checks right before a job goes out: the destination not paused (another connection
/// may have paused it while the job waited), bulksend not stopping, and no recipient on the
/// suppression list (recorded as suppressed) or with an unreadable entry (held back).
async fn screen(inner: &Arc<Inner>, dest: &Dest, job: Job) -> Screened {
    if let Some((until, reason)) = dest.pause() {
        dest.defer_paused(inner, vec![job], until, reason).await;
        return Screened::Stop;
    }
    if inner.stop_token().is_cancelled() {
        release(inner, &job).await;
        return Screened::Stop;
    }
    let (job, suppressed, unreadable) = split_suppressed(inner, job).await;
    if !unreadable.is_empty() {
        let due = SystemTime::now() + Duration::from_secs(60);
        let items = unreadable
            .iter()
            .map(|r| {
                let reason = "suppression list unreadable".to_owned();
                (
                    r.id,
                    Outcome::Postponed {
                        reason,
                        next_attempt: due,
                    },
                )
            })
            .collect();
        inner.complete(items).await;
    }
    if !suppressed.is_empty() {
        let c = local(Class::Permanent, "address is on the suppression list");
        let outcomes = suppressed
            .into_iter()
            .map(|r| (r, c.clone(), true))
            .collect();
        inner
            .record_with_pause(
                &dest.key,
                &dest.metrics.outcomes,
                None,
                outcomes,
                None,
                Wait::MayWait,
            )
            .await;
    }
    match job {
        Some(job) => Screened::Send(job),
        None => Screened::Skip,
    }
}

/// A job a worker took and will not start: deferred to the end of the destination's pause
/// if there is one, else back to scheduled as it was (no attempt counted).
async fn give_back(inner: &Arc<Inner>, dest: &Dest, job: Job) {
    if let Some((until, reason)) = dest.pause() {
        dest.defer_paused(inner, vec![job], until, reason).await;
    } else {
        release(inner, &job).await;
    }
}

/// Returns a job that was never started to scheduled, as it was (no attempt counted).
async fn release(inner: &Inner, job: &Job) {
    let items = job
        .rcpts
        .iter()
        .map(|r| (r.id, Outcome::Released))
        .collect();
    inner.complete(items).await;
}

/// Whether two jobs have a recipient in common. The second one's envelope would go out
/// before the first one's reply to the dot, which may say (for a single recipient) that
/// the address does not exist: it must not be sent to again before that is recorded.
fn shares_address(a: &Job, b: &Job) -> bool {
    a.rcpts.iter().any(|x| {
        b.rcpts
            .iter()
            .any(|y| x.address.as_str() == y.address.as_str())
    })
}

/// The next job for a worker: waits up to `idle` for one; `None` when the worker should end.
async fn next_job(inner: &Inner, dest: &Dest, idle: Duration) -> Option<Job> {
    let stop = inner.stop_token();
    let deadline = tokio::time::Instant::now() + idle;
    loop {
        let notified = dest.notify.notified();
        {
            let mut s = lock(&dest.state);
            if stop.is_cancelled() || s.paused_until.is_some_and(|t| t > Instant::now()) {
                return None;
            }
            if let Some(job) = s.pop() {
                return Some(job);
            }
        }
        tokio::select! {
            _ = notified => {}
            _ = stop.cancelled() => return None,
            _ = tokio::time::sleep_until(deadline) => return None,
        }
    }
}

/// Connects to the destination's MX hosts in order (at most [`MAX_ADDRESSES`] addresses).
async fn connect(inner: &Inner, dest: &Dest) -> Result<(Session, String), SessionError> {
    let route = lock(&dest.route).clone();
    let mut last = None;
    let mut tried = 0;
    for host in &route.hosts {
        for addr in &host.addrs {
            if tried == MAX_ADDRESSES {
                break;
            }
            tried += 1;
            inner.counters.connections.fetch_add(1, Ordering::Relaxed);
            match Session::connect(*addr, &host.name, inner.client.clone()).await {
                Ok(s) => {
                    dest.metrics.connection(true);
                    return Ok((s, host.name.clone()));
                }
                Err(e) => {
                    dest.metrics.connection(false);
                    tracing::info!(destination = %dest.key.0, mx = %host.name, %addr, error = %e, "connection failed; trying the next MX");
                    last = Some(e);
                }
            }
        }
    }
    Err(last.unwrap_or(SessionError::Connect {
        peer: std::net::SocketAddr::from(([0, 0, 0, 0], 0)),
        detail: "no MX host has an address".into(),
    }))
}

/// Splits off recipients that are on the suppression list, and those whose entry could not
/// be read (held back: neither sent nor marked suppressed).
async fn split_suppressed(
    inner: &Inner,
    mut job: Job,
) -> (Option<Job>, Vec<JobRcpt>, Vec<JobRcpt>) {
    let mut suppressed = Vec::new();
    let mut unreadable = Vec::new();
    let mut keep = Vec::with_capacity(job.rcpts.len());
    for r in job.rcpts.drain(..) {
        match inner.queue.suppressed(r.address.as_str()) {
            Ok(Some(_)) => suppressed.push(r),
            Ok(None) => keep.push(r),
            Err(e) => {
                // Fail safe: an unreadable list must not let a suppressed address through.
                tracing::error!(error = %e, "cannot read the suppression list; holding the recipient");
                unreadable.push(r);
            }
        }
    }
    job.rcpts = keep;
    (
        (!job.rcpts.is_empty()).then_some(job),
        suppressed,
        unreadable,
    )
}

fn job_rcpt(held: &Arc<HeldLeases>, l: &Lease) -> Option<JobRcpt> {
    Some(JobRcpt {
        id: l.recipient.id,
        address: Address::parse(&l.recipient.address).ok()?,
        attempts: l.recipient.attempts,
        created: l.recipient.created,
        _held: held.hold(l.recipient.id),
    })
}

/// A local outcome (no SMTP reply).
fn local(class: Class, text: &str) -> Classified {
    Classified {
        class,
        phase: crate::smtp::Phase::Connect,
        code: None,
        enhanced: None,
        text: text.to_owned(),
        reputation_signal: false,
        rule: "local",
    }
}

/// Exponential back-off for attempt `attempt` (1-based) with ±20 % jitter, within
/// [min, max].
pub fn backoff(min: Duration, max: Duration, attempt: u32) -> Duration {
    let exp = min.saturating_mul(2u32.saturating_pow(attempt.saturating_sub(1).min(30)));
    let base = exp.min(max);
    let factor = rand::thread_rng().gen_range(0.8..=1.2);
    base.mul_f64(factor).clamp(min, max)
}

fn jitter(max: Duration) -> Duration {
    max.mul_f64(rand::thread_rng().gen_range(0.0..=1.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_recipient_is_held_until_its_last_holder_is_dropped() {
        let held = Arc::new(HeldLeases::default());
        let id = |i| RecipientId {
            message: bulksend_queue::MessageId(7),
            index: i,
        };
        let a = held.hold(id(0));
        let b = held.hold(id(1));
        // Given back and leased again before the first holder is gone: held twice.
        let a_again = held.hold(id(0));
        let mut ids = held.ids();
        ids.sort();
        assert_eq!(ids, vec![id(0), id(1)]);
        drop(a);
        assert_eq!(
            held.ids().len(),
            2,
            "the second holder of u0 still holds it"
        );
        drop(a_again);
        assert_eq!(held.ids(), vec![id(1)]);
        drop(b);
        assert!(
            held.ids().is_empty(),
            "a dropped job's lease is no longer renewed"
        );
    }

    #[test]
    fn take_loop_refills_a_quarter_at_a_time_and_is_told_once_per_crossing() {
        // A quarter of the budget, a take's worth at most, at least one.
        assert_eq!(refill_mark(5000, TAKE_BATCH), 4000);
        assert_eq!(refill_mark(400, TAKE_BATCH), 300);
        assert_eq!(refill_mark(4, TAKE_BATCH), 3);
        assert_eq!(refill_mark(3, TAKE_BATCH), 2);
        assert_eq!(refill_mark(256 << 20, usize::MAX), 192 << 20);
        // Told when the count falls to the mark or below, not again while it stays there.
        assert!(crossed(4001, 1, 4000));
        assert!(crossed(4100, 500, 4000));
        assert!(!crossed(4100, 99, 4000));
        assert!(!crossed(4000, 1, 4000));
        assert!(!crossed(3000, 3000, 4000));
    }

    #[test]
    fn harvest_window_totals_are_exact_and_memory_is_bounded() {
        let window = Duration::from_secs(600);
        let t0 = Instant::now();
        let mut h = Harvest::default();
        // A million transactions over 20 minutes: 1,000 buckets at most ever held (600 s of
        // one-second buckets plus one), and the totals are those of the last 600 s.
        let mut last = (0, 0);
        for i in 0..1_000_000u64 {
            let now = t0 + Duration::from_micros(i * 1_200);
            last = h.add(now, window, 2, u32::from(i % 10 == 0));
            assert!(h.buckets.len() <= 602, "{} buckets", h.buckets.len());
        }
        let now = t0 + Duration::from_micros(999_999 * 1_200);
        let (want_t, want_u) = (0..1_000_000u64)
            .filter(|i| {
                let start = t0 + Duration::from_micros(i * 1_200);
                now.duration_since(start) <= window
            })
            .fold((0, 0), |(t, u), i| (t + 2, u + u64::from(i % 10 == 0)));
        // Bucket granularity: the oldest second of the window may already be forgotten
        // (one bucket holds ~834 transactions of 2 recipients).
        assert!(
            last.0 <= want_t && last.0 + 2 * 834 >= want_t,
            "{last:?} vs {want_t}"
        );
        assert!(
            last.1 <= want_u && last.1 + 84 >= want_u,
            "{last:?} vs {want_u}"
        );
        // Long after: everything forgotten.
        assert_eq!(h.add(now + window * 2, window, 0, 0), (0, 0));
        assert!(h.buckets.is_empty());
    }

    #[test]
    fn backoff_grows_and_stays_in_bounds() {
        let (min, max) = (Duration::from_secs(60), Duration::from_secs(3600));
        for attempt in 1..40 {
            let b = backoff(min, max, attempt);
            assert!(b >= min && b <= max, "{attempt}: {b:?}");
        }
        // Attempt 3 is around 4 min (±20 %), attempt 10 is at the cap.
        let b3 = backoff(min, max, 3);
        assert!(
            b3 >= Duration::from_secs(192) && b3 <= Duration::from_secs(288),
            "{b3:?}"
        );
        assert!(backoff(min, max, 10) >= Duration::from_secs(2880));
    }
}
