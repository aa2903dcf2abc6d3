//! Every metric bulksend exports, declared in one place with its help text, named per
//! Prometheus conventions (`_total` counters, `_seconds` histograms, base units).
//!
//! Label cardinality is bounded: the `destination` label takes at most
//! [`MAX_DESTINATION_LABELS`] distinct values per process; later destinations share "other".

use std::collections::HashSet;
use std::sync::Mutex;

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
/// Labels: destination, reason ("reputation", "harvest", "unreachable").
pub const DESTINATION_PAUSES: &str = "bulksend_destination_pauses_total";
/// One transaction, envelope to the reply after the dot.
pub const SMTP_TRANSACTION_SECONDS: &str = "bulksend_smtp_transaction_seconds";
/// Labels: phase (connect, greeting, ehlo, mail, rcpt, data_init, data_done, ...): from the
/// command (or connection) to its reply.
pub const SMTP_PHASE_SECONDS: &str = "bulksend_smtp_phase_seconds";
pub const DELIVERY_LATENCY_SECONDS: &str = "bulksend_delivery_latency_seconds";
pub const CONNECTIONS_TOTAL: &str = "bulksend_connections_total";
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
    describe_counter!(DESTINATION_PAUSES, "Destination pauses, by reason.");
    describe_counter!(
        CONNECTIONS_TOTAL,
        "SMTP connections attempted, by destination and result."
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
