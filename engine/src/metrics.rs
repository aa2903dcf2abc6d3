//! Every metric bulksend exports, declared in one place with its help text, named per
//! Prometheus conventions (`_total` counters, `_seconds` histograms, base units).
//!
//! Label cardinality is bounded: the `destination` label takes at most
//! [`MAX_DESTINATION_LABELS`] distinct values per process; later destinations share "other".

use std::collections::HashSet;
use std::sync::{Mutex, OnceLock};

use metrics::{Counter, Gauge, Histogram};

use crate::events::EventKind;

pub const RECIPIENTS_ENQUEUED: &str = "bulksend_recipients_enqueued_total";
pub const MESSAGES_ENQUEUED: &str = "bulksend_messages_enqueued_total";
/// Labels: destination, class.
pub const MESSAGES_DELIVERED: &str = "bulksend_messages_delivered_total";
pub const MESSAGES_DEFERRED: &str = "bulksend_messages_deferred_total";
pub const MESSAGES_BOUNCED: &str = "bulksend_messages_bounced_total";
pub const MESSAGES_SUPPRESSED: &str = "bulksend_messages_suppressed_total";
pub const MESSAGES_EXPIRED: &str = "bulksend_messages_expired_total";
pub const MESSAGES_UNKNOWN: &str = "bulksend_messages_unknown_total";
/// Labels: state.
pub const QUEUE_RECIPIENTS: &str = "bulksend_queue_recipients";
/// Labels: destination.
pub const CONNECTIONS_OPEN: &str = "bulksend_connections_open";
pub const CONCURRENCY_LIMIT: &str = "bulksend_destination_concurrency_limit";
pub const DESTINATIONS_PAUSED: &str = "bulksend_destinations_paused";
pub const IN_FLIGHT_BYTES: &str = "bulksend_in_flight_body_bytes";
/// Labels: destination, reason ("reputation", "harvest", "unreachable").
pub const DESTINATION_PAUSES: &str = "bulksend_destination_pauses_total";
/// One transaction, envelope to the reply after the dot.
pub const SMTP_TRANSACTION_SECONDS: &str = "bulksend_smtp_transaction_seconds";
/// Labels: phase (connect, greeting, ehlo, mail, rcpt, data_init, data_done, ...): from the
/// command (or connection) to its reply.
pub const SMTP_PHASE_SECONDS: &str = "bulksend_smtp_phase_seconds";
pub const DELIVERY_LATENCY_SECONDS: &str = "bulksend_delivery_latency_seconds";
pub const CONNECTIONS_TOTAL: &str = "bulksend_connections_total";
/// Labels: destination. Transactions whose envelope went out behind the previous dot.
pub const SMTP_PIPELINED_TRANSACTIONS: &str = "bulksend_smtp_pipelined_transactions_total";
pub const EVENTS_DROPPED: &str = "bulksend_events_dropped_total";

pub const MAX_DESTINATION_LABELS: usize = 200;

/// Registers help texts with the installed recorder. Call once after installing it.
pub fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!(
        MESSAGES_ENQUEUED,
        "Messages accepted into the queue (durable)."
    );
    describe_counter!(RECIPIENTS_ENQUEUED, "Recipients accepted into the queue.");
    describe_counter!(
        MESSAGES_DELIVERED,
        "Recipients delivered (2xx after the dot)."
    );
    describe_counter!(
        MESSAGES_DEFERRED,
        "Recipient delivery attempts deferred for retry, by class."
    );
    describe_counter!(
        MESSAGES_BOUNCED,
        "Recipients bounced (permanent failure), by class."
    );
    describe_counter!(
        MESSAGES_SUPPRESSED,
        "Recipients not sent because the address is suppressed."
    );
    describe_counter!(
        MESSAGES_EXPIRED,
        "Recipients expired after the maximum queue lifetime."
    );
    describe_counter!(
        MESSAGES_UNKNOWN,
        "Transactions with no reply after the dot (possibly delivered)."
    );
    describe_gauge!(
        QUEUE_RECIPIENTS,
        "Recipient records in the queue, by state."
    );
    describe_gauge!(CONNECTIONS_OPEN, "Open SMTP connections, by destination.");
    describe_gauge!(
        CONCURRENCY_LIMIT,
        "Current connection limit (AIMD), by destination."
    );
    describe_gauge!(DESTINATIONS_PAUSED, "Destinations currently paused.");
    describe_gauge!(
        IN_FLIGHT_BYTES,
        Unit::Bytes,
        "Prepared message bodies held in memory for leased recipients (bounded by delivery.max_in_flight_bytes)."
    );
    describe_counter!(DESTINATION_PAUSES, "Destination pauses, by reason.");
    describe_counter!(
        CONNECTIONS_TOTAL,
        "SMTP connections attempted, by destination and result."
    );
    describe_counter!(
        SMTP_PIPELINED_TRANSACTIONS,
        "SMTP transactions whose envelope went out behind the previous message's dot, by destination."
    );
    describe_histogram!(
        SMTP_PHASE_SECONDS,
        Unit::Seconds,
        "Time of one SMTP transaction (envelope to reply after the dot)."
    );
    describe_histogram!(
        DELIVERY_LATENCY_SECONDS,
        Unit::Seconds,
        "Enqueue-to-delivered latency."
    );
    describe_counter!(
        EVENTS_DROPPED,
        "Events dropped because the event writer fell behind."
    );
}

/// Maps destination keys to a bounded set of label values.
#[derive(Debug, Default)]
pub struct DestinationLabels {
    seen: Mutex<HashSet<String>>,
}

impl DestinationLabels {
    pub fn label(&self, destination: &str) -> String {
        let Ok(mut seen) = self.seen.lock() else {
            return "other".into();
        };
        if seen.contains(destination) {
            return destination.to_owned();
        }
        if seen.len() < MAX_DESTINATION_LABELS {
            seen.insert(destination.to_owned());
            return destination.to_owned();
        }
        "other".into()
    }
}

/// The `class` label values of the per-recipient outcome counters: every
/// [`Class`](crate::classify::Class) plus "expired" and "suppressed".
const OUTCOME_CLASSES: [&str; 9] = [
    "delivered",
    "invalid_recipient",
    "permanent",
    "transient",
    "reputation",
    "unreachable",
    "unknown",
    "expired",
    "suppressed",
];

/// The outcome kinds, one counter metric each (see [`outcome_metric`]).
const OUTCOME_KINDS: usize = 6;

/// The `reason` label values of [`DESTINATION_PAUSES`].
const PAUSE_REASONS: [&str; 3] = ["reputation", "harvest", "unreachable"];

/// The index of `kind` among [`OUTCOME_KINDS`], and its counter's name.
fn outcome_metric(kind: EventKind) -> (usize, &'static str) {
    match kind {
        EventKind::Delivered => (0, MESSAGES_DELIVERED),
        EventKind::Deferred => (1, MESSAGES_DEFERRED),
        EventKind::Bounced => (2, MESSAGES_BOUNCED),
        EventKind::Suppressed => (3, MESSAGES_SUPPRESSED),
        EventKind::Expired => (4, MESSAGES_EXPIRED),
        EventKind::Unknown => (5, MESSAGES_UNKNOWN),
    }
}

/// The per-recipient outcome metrics of one `destination` label, resolved once and reused:
/// counting an outcome neither allocates nor looks up the registry.
///
/// Each handle is resolved on first use, so a series appears in the exposition when it is
/// first counted, exactly as with `counter!` at the call site.
#[derive(Debug)]
pub struct OutcomeMetrics {
    destination: String,
    /// By outcome kind (see [`outcome_metric`]) and class (see [`OUTCOME_CLASSES`]).
    counters: [[OnceLock<Counter>; OUTCOME_CLASSES.len()]; OUTCOME_KINDS],
    delivery_latency: OnceLock<Histogram>,
}

impl OutcomeMetrics {
    pub fn new(destination: String) -> OutcomeMetrics {
        OutcomeMetrics {
            destination,
            counters: Default::default(),
            delivery_latency: OnceLock::new(),
        }
    }

    /// Counts `n` recipients with outcome `kind` and `class` label.
    pub fn increment(&self, kind: EventKind, class: &'static str, n: u64) {
        let (k, name) = outcome_metric(kind);
        match OUTCOME_CLASSES.iter().position(|c| *c == class) {
            Some(c) => self.counters[k][c]
                .get_or_init(|| {
                    metrics::counter!(name, "destination" => self.destination.clone(), "class" => class)
                })
                .increment(n),
            // Not a known class: still counted, only not cached.
            None => metrics::counter!(name, "destination" => self.destination.clone(), "class" => class)
                .increment(n),
        }
    }

    /// Records one enqueue-to-delivered latency ([`DELIVERY_LATENCY_SECONDS`], unlabelled).
    pub fn delivery_latency(&self, seconds: f64) {
        self.delivery_latency
            .get_or_init(|| metrics::histogram!(DELIVERY_LATENCY_SECONDS))
            .record(seconds);
    }
}

/// Every metric handle one destination uses, resolved once per destination (each on first
/// use, as [`OutcomeMetrics`]).
#[derive(Debug)]
pub struct DestinationMetrics {
    pub outcomes: OutcomeMetrics,
    connections_open: OnceLock<Gauge>,
    concurrency_limit: OnceLock<Gauge>,
    /// [`CONNECTIONS_TOTAL`] with result "ok", "failed".
    connections: [OnceLock<Counter>; 2],
    /// By [`PAUSE_REASONS`].
    pauses: [OnceLock<Counter>; PAUSE_REASONS.len()],
    transaction_seconds: OnceLock<Histogram>,
    pipelined: OnceLock<Counter>,
}

impl DestinationMetrics {
    /// `label`: the destination's label value (from [`DestinationLabels::label`]).
    pub fn new(label: String) -> DestinationMetrics {
        DestinationMetrics {
            outcomes: OutcomeMetrics::new(label),
            connections_open: OnceLock::new(),
            concurrency_limit: OnceLock::new(),
            connections: Default::default(),
            pauses: Default::default(),
            transaction_seconds: OnceLock::new(),
            pipelined: OnceLock::new(),
        }
    }

    fn label(&self) -> String {
        self.outcomes.destination.clone()
    }

    /// [`CONNECTIONS_OPEN`] for this destination.
    pub fn connections_open(&self) -> &Gauge {
        self.connections_open
            .get_or_init(|| metrics::gauge!(CONNECTIONS_OPEN, "destination" => self.label()))
    }

    /// [`CONCURRENCY_LIMIT`] for this destination.
    pub fn concurrency_limit(&self) -> &Gauge {
        self.concurrency_limit
            .get_or_init(|| metrics::gauge!(CONCURRENCY_LIMIT, "destination" => self.label()))
    }

    /// Counts one connection attempt in [`CONNECTIONS_TOTAL`].
    pub fn connection(&self, ok: bool) {
        let result = if ok { "ok" } else { "failed" };
        self.connections[usize::from(!ok)]
            .get_or_init(|| {
                metrics::counter!(CONNECTIONS_TOTAL, "destination" => self.label(), "result" => result)
            })
            .increment(1);
    }

    /// Counts one pause in [`DESTINATION_PAUSES`].
    pub fn pause(&self, reason: &'static str) {
        match PAUSE_REASONS.iter().position(|r| *r == reason) {
            Some(i) => self.pauses[i]
                .get_or_init(|| {
                    metrics::counter!(DESTINATION_PAUSES, "destination" => self.label(), "reason" => reason)
                })
                .increment(1),
            None => metrics::counter!(DESTINATION_PAUSES, "destination" => self.label(), "reason" => reason)
                .increment(1),
        }
    }

    /// Counts one transaction in [`SMTP_PIPELINED_TRANSACTIONS`].
    pub fn pipelined(&self) {
        self.pipelined
            .get_or_init(
                || metrics::counter!(SMTP_PIPELINED_TRANSACTIONS, "destination" => self.label()),
            )
            .increment(1);
    }

    /// Records one transaction's time in [`SMTP_TRANSACTION_SECONDS`] (unlabelled).
    pub fn transaction_seconds(&self, seconds: f64) {
        self.transaction_seconds
            .get_or_init(|| metrics::histogram!(SMTP_TRANSACTION_SECONDS))
            .record(seconds);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::classify::Class;
    use metrics::{Key, KeyName, Metadata, Recorder, SharedString, Unit};

    /// Records the key of every registration.
    #[derive(Default)]
    struct Keys(Mutex<Vec<String>>);

    impl Keys {
        fn push(&self, key: &Key) {
            let labels: Vec<String> = key
                .labels()
                .map(|l| format!("{}={}", l.key(), l.value()))
                .collect();
            if let Ok(mut v) = self.0.lock() {
                v.push(format!("{}{{{}}}", key.name(), labels.join(",")));
            }
        }
    }

    impl Recorder for Keys {
        fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
        fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
        fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
        fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
            self.push(key);
            Counter::noop()
        }
        fn register_gauge(&self, key: &Key, _: &Metadata<'_>) -> Gauge {
            self.push(key);
            Gauge::noop()
        }
        fn register_histogram(&self, key: &Key, _: &Metadata<'_>) -> Histogram {
            self.push(key);
            Histogram::noop()
        }
    }

    #[test]
    fn every_class_label_is_cached() {
        for c in [
            Class::Delivered,
            Class::InvalidRecipient,
            Class::Permanent,
            Class::Transient,
            Class::Reputation,
            Class::Unreachable,
            Class::Unknown,
        ] {
            assert!(OUTCOME_CLASSES.contains(&c.as_str()), "{c:?}");
        }
    }

    #[test]
    fn handles_are_resolved_once_with_the_same_names_and_labels() {
        let keys = Keys::default();
        metrics::with_local_recorder(&keys, || {
            let d = DestinationMetrics::new("example.com".into());
            for _ in 0..3 {
                d.outcomes.increment(EventKind::Delivered, "delivered", 1);
                d.outcomes.increment(EventKind::Deferred, "transient", 1);
                d.outcomes.delivery_latency(0.5);
                d.connections_open().increment(1.0);
                d.concurrency_limit().set(4.0);
                d.connection(true);
                d.connection(false);
                d.pause("harvest");
                d.transaction_seconds(0.1);
            }
        });
        let got = keys.0.into_inner().unwrap_or_default();
        assert_eq!(
            got,
            [
                "bulksend_messages_delivered_total{destination=example.com,class=delivered}",
                "bulksend_messages_deferred_total{destination=example.com,class=transient}",
                "bulksend_delivery_latency_seconds{}",
                "bulksend_connections_open{destination=example.com}",
                "bulksend_destination_concurrency_limit{destination=example.com}",
                "bulksend_connections_total{destination=example.com,result=ok}",
                "bulksend_connections_total{destination=example.com,result=failed}",
                "bulksend_destination_pauses_total{destination=example.com,reason=harvest}",
                "bulksend_smtp_transaction_seconds{}",
            ]
        );
    }
}
