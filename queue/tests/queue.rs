#![allow(clippy::unwrap_used)]
//! State transitions, idempotency, expiry, suppression, recovery, corruption, bad input.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bulksend_queue::{
    Completed, MessageId, NewMessage, Outcome, Queue, QueueError, QueueOptions, RecipientId,
    RecipientState,
};

fn opts() -> QueueOptions {
    QueueOptions {
        cache_capacity_bytes: 8 << 20,
        ..QueueOptions::default()
    }
}

fn open(dir: &tempfile::TempDir) -> Queue {
    Queue::open(dir.path(), opts()).unwrap()
}

fn msg(to: &[&str]) -> NewMessage {
    NewMessage {
        idempotency_key: None,
        sender: "news@sender.test".into(),
        recipients: to.iter().map(|s| s.to_string()).collect(),
        body: b"Subject: hi\r\n\r\nhello\r\n".to_vec(),
    }
}

fn open_with_lifetime(dir: &tempfile::TempDir, lifetime: Duration) -> Queue {
    let opts = QueueOptions {
        max_queue_lifetime: lifetime,
        ..opts()
    };
    Queue::open(dir.path(), opts).unwrap()
}

fn later(secs: u64) -> SystemTime {
    SystemTime::now() + Duration::from_secs(secs)
}

fn state(q: &Queue, id: RecipientId) -> RecipientState {
    q.message(id.message)
        .unwrap()
        .unwrap()
        .recipients
        .into_iter()
        .find(|r| r.id == id)
        .unwrap()
        .state
}

#[test]
fn enqueue_take_deliver_removes_body() {
    let dir = tempfile::tempdir().unwrap();
    let q = open(&dir);
    let e = q
        .enqueue(msg(&["a@One.test", "b@two.test", "c@one.test"]))
        .unwrap();
    assert!(!e.duplicate);
    assert!(e.suppressed.is_empty());
    let info = q.message(e.id).unwrap().unwrap();
    assert_eq!(info.recipients.len(), 3);
    assert_eq!(info.recipients[0].destination, "one.test");
    assert_eq!(info.recipients[0].address, "a@One.test");
    assert!(info
        .recipients
        .iter()
        .all(|r| r.state == RecipientState::Scheduled));
    assert_eq!(q.stats().by_state[&RecipientState::Scheduled], 3);
    assert_eq!(q.stats().by_destination["one.test"], 2);
    assert!(q.stats().oldest_due.is_some());

    let leases = q.take_due(later(1), 10).unwrap();
    assert_eq!(leases.len(), 3);
    // Same message + destination adjacent: a, c (one.test), then b.
    let order: Vec<u32> = leases.iter().map(|l| l.recipient.id.index).collect();
    assert_eq!(order, vec![0, 2, 1]);
    assert_eq!(leases[0].sender, "news@sender.test");
    assert!(leases
        .iter()
        .all(|l| l.recipient.state == RecipientState::Leased));
    assert_eq!(state(&q, leases[0].recipient.id), RecipientState::Leased);
    assert!(q.take_due(later(1), 10).unwrap().is_empty());
    assert_eq!(q.stats().by_state[&RecipientState::Leased], 3);

    let body = q.body(e.id).unwrap().unwrap();
    assert_eq!(body, msg(&[]).body);
    let ids: Vec<RecipientId> = leases.iter().map(|l| l.recipient.id).collect();
    let done = q
        .complete(
            ids[0],
            Outcome::Delivered {
                reply: "250 ok".into(),
            },
        )
        .unwrap();
    assert_eq!(
        done,
        Completed {
            state: RecipientState::Delivered
        }
    );
    assert!(
        q.body(e.id).unwrap().is_some(),
        "body stays while recipients pending"
    );
    let res = q
        .complete_batch(vec![
            (
                ids[1],
                Outcome::Delivered {
                    reply: "250 ok".into(),
                },
            ),
            (
                ids[2],
                Outcome::Delivered {
                    reply: "250 ok".into(),
                },
            ),
        ])
        .unwrap();
    assert!(res
        .iter()
        .all(|r| r.as_ref().unwrap().state == RecipientState::Delivered));
    assert_eq!(
        q.body(e.id).unwrap(),
        None,
        "body deleted when last recipient final"
    );
    let info = q.message(e.id).unwrap().unwrap();
    assert!(info
        .recipients
        .iter()
        .all(|r| r.state == RecipientState::Delivered && r.attempts == 1));
    assert_eq!(info.recipients[0].last_reply.as_deref(), Some("250 ok"));
    assert_eq!(q.stats().by_state[&RecipientState::Delivered], 3);
    assert!(q.stats().by_destination.is_empty());
    assert_eq!(q.stats().oldest_due, None);
}

#[test]
fn every_outcome() {
    let dir = tempfile::tempdir().unwrap();
    let q = open(&dir);
    let e = q
        .enqueue(msg(&[
            "a@x.test", "b@x.test", "c@x.test", "d@x.test", "e@x.test", "f@x.test",
        ]))
        .unwrap();
    let leases = q.take_due(later(1), 10).unwrap();
    assert_eq!(leases.len(), 6);
    let id = |i: u32| RecipientId {
        message: e.id,
        index: i,
    };
    let next = later(3600);
    let res = q
        .complete_batch(vec![
            (
                id(0),
                Outcome::Bounced {
                    reply: "550 5.1.1 unknown".into(),
                },
            ),
            (
                id(1),
                Outcome::Deferred {
                    reply: "451 later".into(),
                    next_attempt: next,
                },
            ),
            (
                id(2),
                Outcome::Suppressed {
                    reason: "listed".into(),
                },
            ),
            (
                id(3),
                Outcome::Unknown {
                    reply: "timeout after dot".into(),
                },
            ),
            (id(4), Outcome::Released),
            (
                id(5),
                Outcome::Delivered {
                    reply: "250".into(),
                },
            ),
        ])
        .unwrap();
    let states: Vec<RecipientState> = res.into_iter().map(|r| r.unwrap().state).collect();
    use RecipientState::*;
    assert_eq!(
        states,
        vec![Bounced, Scheduled, Suppressed, Unknown, Scheduled, Delivered]
    );
    let info = q.message(e.id).unwrap().unwrap();
    let attempts: Vec<u32> = info.recipients.iter().map(|r| r.attempts).collect();
    assert_eq!(attempts, vec![1, 1, 0, 1, 0, 1]);
    assert!(Bounced.is_final() && Unknown.is_final() && Suppressed.is_final());
    assert!(!Scheduled.is_final() && !Leased.is_final());

    // Released is due again right away; the deferred one only after next_attempt.
    let again = q.take_due(later(1), 10).unwrap();
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].recipient.id, id(4));
    q.complete(id(4), Outcome::Released).unwrap();
    let later_leases = q.take_due(next + Duration::from_secs(1), 10).unwrap();
    let mut got: Vec<u32> = later_leases.iter().map(|l| l.recipient.id.index).collect();
    got.sort();
    assert_eq!(got, vec![1, 4]);
    assert_eq!(
        later_leases
            .iter()
            .find(|l| l.recipient.id == id(1))
            .unwrap()
            .recipient
            .attempts,
        1
    );

    // Completing something not leased / unknown fails, and changes nothing.
    let err = q
        .complete(
            id(0),
            Outcome::Delivered {
                reply: "250".into(),
            },
        )
        .unwrap_err();
    assert!(
        matches!(err, QueueError::NotLeased { state: Bounced, .. }),
        "{err}"
    );
    let missing = RecipientId {
        message: MessageId(1),
        index: 0,
    };
    assert!(matches!(
        q.complete(missing, Outcome::Released).unwrap_err(),
        QueueError::NotFound(_)
    ));
}

#[test]
fn deferred_beyond_lifetime_expires() {
    let dir = tempfile::tempdir().unwrap();
    let q = open_with_lifetime(&dir, Duration::from_secs(600));
    let e = q.enqueue(msg(&["a@x.test", "b@x.test"])).unwrap();
    let leases = q.take_due(later(1), 10).unwrap();
    let r0 = leases[0].recipient.id;
    let r1 = leases[1].recipient.id;
    let c = q
        .complete(
            r0,
            Outcome::Deferred {
                reply: "451 4.7.1 try later".into(),
                next_attempt: later(3600),
            },
        )
        .unwrap();
    assert_eq!(c.state, RecipientState::Expired);
    let rec = q.message(e.id).unwrap().unwrap().recipients.remove(0);
    assert_eq!(rec.state, RecipientState::Expired);
    assert_eq!(rec.last_reply.as_deref(), Some("451 4.7.1 try later"));
    assert_eq!(rec.attempts, 1);
    // Within the lifetime it is scheduled.
    let c = q
        .complete(
            r1,
            Outcome::Deferred {
                reply: "451".into(),
                next_attempt: later(60),
            },
        )
        .unwrap();
    assert_eq!(c.state, RecipientState::Scheduled);
    assert!(q.body(e.id).unwrap().is_some());
}

/// A deferral to a time before the message was created (a caller's clock, a clock stepped
/// back) is taken when due and expires only at the message's own lifetime: the schedule
/// keeps a zone's due and created times as separate bounds, and expiry reads the record.
#[test]
fn a_deferral_into_the_past_is_taken_and_expires_on_time() {
    let dir = tempfile::tempdir().unwrap();
    let q = open_with_lifetime(&dir, Duration::from_secs(3600));
    q.enqueue(msg(&["a@x.test"])).unwrap();
    let rid = q.take_due(later(1), 10).unwrap()[0].recipient.id;
    let into_the_past = || Outcome::Deferred {
        reply: "451 later".into(),
        next_attempt: SystemTime::now() - Duration::from_secs(2 * 3600),
    };
    let c = q.complete(rid, into_the_past()).unwrap();
    assert_eq!(c.state, RecipientState::Scheduled);
    // Due for two hours, but created just now: within its lifetime.
    assert!(q.expire_due(SystemTime::now()).unwrap().is_empty());
    let again = q.take_due(SystemTime::now(), 10).unwrap();
    assert_eq!(again.len(), 1, "taken, not skipped as expired");
    q.complete(rid, into_the_past()).unwrap();
    // Past its lifetime it is not taken, and expires.
    assert!(q.take_due(later(3601), 10).unwrap().is_empty());
    let expired = q.expire_due(later(3601)).unwrap();
    assert_eq!(expired.len(), 1);
    assert_eq!(state(&q, rid), RecipientState::Expired);
}

#[test]
fn expire_due_and_take_skips_expired() {
    let dir = tempfile::tempdir().unwrap();
    let q = open_with_lifetime(&dir, Duration::from_secs(60));
    let e = q.enqueue(msg(&["a@x.test", "b@y.test"])).unwrap();
    // Give one a transient reply first.
    let l = q.take_due_for("y.test", later(1), 10).unwrap();
    assert_eq!(l.len(), 1);
    q.complete(
        l[0].recipient.id,
        Outcome::Deferred {
            reply: "421 busy".into(),
            next_attempt: later(30),
        },
    )
    .unwrap();
    assert!(
        q.expire_due(later(10)).unwrap().is_empty(),
        "not yet expired"
    );
    // Past the lifetime take_due hands out nothing...
    assert!(q.take_due(later(120), 10).unwrap().is_empty());
    // ...and expire_due returns both.
    let mut expired = q.expire_due(later(120)).unwrap();
    expired.sort_by_key(|r| r.id);
    assert_eq!(expired.len(), 2);
    assert!(expired.iter().all(|r| r.state == RecipientState::Expired));
    assert_eq!(expired[0].last_reply.as_deref(), Some("expired in queue"));
    assert_eq!(expired[1].last_reply.as_deref(), Some("421 busy"));
    assert_eq!(q.body(e.id).unwrap(), None);
    assert!(q.expire_due(later(120)).unwrap().is_empty());
    assert_eq!(q.stats().by_state[&RecipientState::Expired], 2);
}

#[test]
fn idempotent_enqueue() {
    let dir = tempfile::tempdir().unwrap();
    let q = open(&dir);
    let mut m = msg(&["a@x.test"]);
    m.idempotency_key = Some("order-42".into());
    let first = q.enqueue(m.clone()).unwrap();
    let second = q.enqueue(m.clone()).unwrap();
    assert!(!first.duplicate);
    assert!(second.duplicate);
    assert_eq!(first.id, second.id);
    assert_eq!(q.list(None, 100).unwrap().len(), 1, "nothing stored twice");
    // Inside one batch too.
    let mut m2 = msg(&["b@x.test"]);
    m2.idempotency_key = Some("order-43".into());
    let res = q.enqueue_batch(vec![m2.clone(), m2, m.clone()]).unwrap();
    let res: Vec<_> = res.into_iter().map(|r| r.unwrap()).collect();
    assert!(!res[0].duplicate && res[1].duplicate && res[2].duplicate);
    assert_eq!(res[0].id, res[1].id);
    assert_eq!(res[2].id, first.id);
    assert_eq!(q.list(None, 100).unwrap().len(), 2);
    assert_eq!(
        q.message(first.id)
            .unwrap()
            .unwrap()
            .idempotency_key
            .as_deref(),
        Some("order-42")
    );
    // Survives a reopen.
    drop(q);
    let q = open(&dir);
    let again = q.enqueue(m).unwrap();
    assert!(again.duplicate);
    assert_eq!(again.id, first.id);
}

#[test]
fn suppression() {
    let dir = tempfile::tempdir().unwrap();
    let q = open(&dir);
    assert!(q.suppress_add("Bob@X.test", "5.1.1 unknown user").unwrap());
    assert!(!q.suppress_add("bob@x.test", "again").unwrap());
    let s = q.suppressed("BOB@x.TEST").unwrap().unwrap();
    assert_eq!(s.address, "bob@x.test");
    assert_eq!(s.reason, "5.1.1 unknown user");
    assert_eq!(q.suppress_list().unwrap().len(), 1);

    let e = q.enqueue(msg(&["bob@x.test", "alice@x.test"])).unwrap();
    assert_eq!(e.suppressed, vec!["bob@x.test".to_string()]);
    let info = q.message(e.id).unwrap().unwrap();
    assert_eq!(info.recipients[0].state, RecipientState::Suppressed);
    assert_eq!(info.recipients[1].state, RecipientState::Scheduled);
    let leases = q.take_due(later(1), 10).unwrap();
    assert_eq!(leases.len(), 1, "suppressed recipient never scheduled");
    assert_eq!(leases[0].recipient.address, "alice@x.test");

    // All recipients suppressed: stored as final, no body kept.
    let e2 = q.enqueue(msg(&["BOB@x.test"])).unwrap();
    assert_eq!(e2.suppressed.len(), 1);
    assert_eq!(q.body(e2.id).unwrap(), None);

    assert!(q.suppress_remove("bob@X.test").unwrap());
    assert!(!q.suppress_remove("bob@x.test").unwrap());
    assert!(q.suppressed("bob@x.test").unwrap().is_none());
    let e3 = q.enqueue(msg(&["bob@x.test"])).unwrap();
    assert!(e3.suppressed.is_empty());
    // The list is read again at open.
    assert!(q.suppress_add("carol@x.test", "5.1.1").unwrap());
    drop(q);
    let q = open(&dir);
    let e4 = q.enqueue(msg(&["carol@x.test", "bob@x.test"])).unwrap();
    assert_eq!(e4.suppressed, vec!["carol@x.test".to_string()]);
    assert!(matches!(
        q.suppress_add("bob\r\n@x.test", "x").unwrap_err(),
        QueueError::InvalidInput(_)
    ));
}

#[test]
fn leases_recovered_after_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let q = open(&dir);
    let e = q.enqueue(msg(&["a@x.test", "b@y.test"])).unwrap();
    let e2 = q.enqueue(msg(&["c@x.test"])).unwrap();
    let leases = q.take_due(later(1), 10).unwrap();
    assert_eq!(leases.len(), 3);
    q.complete(
        RecipientId {
            message: e2.id,
            index: 0,
        },
        Outcome::Delivered {
            reply: "250".into(),
        },
    )
    .unwrap();
    drop(q); // the "crash": two leases never completed

    let q = open(&dir);
    let info = q.message(e.id).unwrap().unwrap();
    assert!(info
        .recipients
        .iter()
        .all(|r| r.state == RecipientState::Scheduled));
    let stats = q.stats();
    assert_eq!(stats.by_state[&RecipientState::Scheduled], 2);
    assert_eq!(stats.by_state[&RecipientState::Delivered], 1);
    assert_eq!(stats.by_state.get(&RecipientState::Leased), None);
    assert_eq!(stats.by_destination["x.test"], 1);
    assert_eq!(stats.by_destination["y.test"], 1);
    let again = q.take_due(later(1), 10).unwrap();
    assert_eq!(again.len(), 2);
    assert!(again.iter().all(|l| l.recipient.id.message == e.id));
    // New ids stay above the old ones.
    let e3 = q.enqueue(msg(&["d@x.test"])).unwrap();
    assert!(e3.id > e2.id);
}

#[test]
fn corrupt_store_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    {
        let q = open(&dir);
        for i in 0..50 {
            q.enqueue(msg(&[&format!("u{i}@x.test")])).unwrap();
        }
    }
    let db = dir.path().join("db");
    let len = std::fs::metadata(&db).unwrap().len() as usize;
    let garbage: Vec<u8> = (0..len.max(4096)).map(|i| (i * 31 % 251) as u8).collect();
    std::fs::write(&db, garbage).unwrap();
    let err = match Queue::open(dir.path(), opts()) {
        Ok(_) => panic!("opened a corrupt store"),
        Err(e) => e,
    };
    let text = err.to_string();
    assert!(
        matches!(err, QueueError::Open { .. } | QueueError::Corrupt { .. }),
        "{text}"
    );
    assert!(text.contains(&dir.path().display().to_string()), "{text}");

    // A directory holding something that is not a queue at all.
    let dir2 = tempfile::tempdir().unwrap();
    std::fs::write(dir2.path().join("conf"), b"nonsense\n").unwrap();
    std::fs::write(dir2.path().join("db"), b"\xff\xfe garbage").unwrap();
    let err = Queue::open(dir2.path(), opts()).err().expect("must fail");
    assert!(
        err.to_string().contains(&dir2.path().display().to_string()),
        "{err}"
    );
}

/// sled 0.34.7 reads the snapshot file that sorts last, and an unfinished one (killed while
/// sled wrote it) does: the queue removes it before opening sled (found by the crash test).
#[test]
fn unfinished_sled_snapshot_left_by_a_crash_is_removed_at_open() {
    let dir = tempfile::tempdir().unwrap();
    {
        let q = open(&dir);
        for i in 0..50 {
            q.enqueue(msg(&[&format!("u{i}@x.test")])).unwrap();
        }
    }
    let unfinished = dir.path().join("snap.FFFFFFFFFFFFFFFF.generating");
    std::fs::write(&unfinished, b"").unwrap();
    let q = Queue::open(dir.path(), opts()).unwrap();
    assert!(!unfinished.exists());
    assert_eq!(
        q.stats().by_state.get(&RecipientState::Scheduled),
        Some(&50)
    );
}

#[test]
fn bad_input_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let q = open(&dir);
    for bad in [
        "victim@x.test\r\nRCPT TO:<other@y.test>",
        "a@x.test\n",
        "a\0@x.test",
        "no-at-sign",
        "@x.test",
        "a@",
        "",
        "a b@x.test",
        "<a@x.test>",
    ] {
        let err = q.enqueue(msg(&[bad])).unwrap_err();
        assert!(matches!(err, QueueError::InvalidInput(_)), "{bad:?}: {err}");
    }
    let err = q.enqueue(msg(&[])).unwrap_err();
    assert!(matches!(err, QueueError::InvalidInput(_)), "{err}");
    let mut m = msg(&["a@x.test"]);
    m.sender = "evil\r\n@x.test".into();
    assert!(matches!(
        q.enqueue(m).unwrap_err(),
        QueueError::InvalidInput(_)
    ));
    let mut m = msg(&["a@x.test"]);
    m.sender = String::new(); // null reverse-path is fine
    q.enqueue(m).unwrap();
    // A batch keeps the good ones.
    let res = q
        .enqueue_batch(vec![
            msg(&["ok@x.test"]),
            msg(&["bad\r@x.test"]),
            msg(&["ok2@x.test"]),
        ])
        .unwrap();
    assert!(res[0].is_ok() && res[1].is_err() && res[2].is_ok());
    assert_eq!(q.list(None, 100).unwrap().len(), 3);
    assert!("zz".parse::<MessageId>().is_err());
    assert!("0123456789abcdef.x".parse::<RecipientId>().is_err());
}

#[test]
fn ids_display_and_parse() {
    let id = MessageId(0x0123_4567_89ab_cdef);
    assert_eq!(id.to_string(), "0123456789abcdef");
    assert_eq!("0123456789abcdef".parse::<MessageId>().unwrap(), id);
    let r = RecipientId {
        message: id,
        index: 12,
    };
    assert_eq!(r.to_string(), "0123456789abcdef.12");
    assert_eq!(r.to_string().parse::<RecipientId>().unwrap(), r);
    assert_eq!(
        serde_json::to_string(&RecipientState::Delivered).unwrap(),
        "\"delivered\""
    );
    assert_eq!(
        "unknown".parse::<RecipientState>().unwrap(),
        RecipientState::Unknown
    );
}

#[test]
fn retry_delete_purge_list() {
    let dir = tempfile::tempdir().unwrap();
    let q = open(&dir);
    let mut m = msg(&["a@x.test", "b@x.test"]);
    m.idempotency_key = Some("k1".into());
    let e = q.enqueue(m.clone()).unwrap();
    let leases = q.take_due(later(1), 10).unwrap();
    q.complete_batch(vec![
        (
            leases[0].recipient.id,
            Outcome::Deferred {
                reply: "451".into(),
                next_attempt: later(3600),
            },
        ),
        (
            leases[1].recipient.id,
            Outcome::Delivered {
                reply: "250".into(),
            },
        ),
    ])
    .unwrap();
    assert!(q.take_due(later(1), 10).unwrap().is_empty());
    assert_eq!(q.retry(e.id).unwrap(), 1);
    assert_eq!(q.take_due(later(1), 10).unwrap().len(), 1);
    assert_eq!(q.list(Some(RecipientState::Leased), 10).unwrap().len(), 1);
    assert_eq!(
        q.list(Some(RecipientState::Delivered), 10).unwrap().len(),
        1
    );
    assert_eq!(q.list(None, 1).unwrap().len(), 1);

    // Delete removes everything, including the idempotency key.
    assert!(q.delete(e.id).unwrap());
    assert!(!q.delete(e.id).unwrap());
    assert!(q.message(e.id).unwrap().is_none());
    assert!(q.body(e.id).unwrap().is_none());
    assert!(q.list(None, 10).unwrap().is_empty());
    assert!(q.stats().by_state.values().all(|&n| n == 0));
    assert!(matches!(
        q.complete(leases[0].recipient.id, Outcome::Released)
            .unwrap_err(),
        QueueError::NotFound(_)
    ));
    let e2 = q.enqueue(m).unwrap();
    assert!(!e2.duplicate);

    // Purge drops final records (and the message once all are gone).
    let l = q.take_due(later(1), 10).unwrap();
    q.complete(
        l[0].recipient.id,
        Outcome::Bounced {
            reply: "550".into(),
        },
    )
    .unwrap();
    assert_eq!(
        q.purge_final(SystemTime::now() - Duration::from_secs(60))
            .unwrap(),
        0
    );
    assert_eq!(q.purge_final(later(1)).unwrap(), 1);
    assert_eq!(q.message(e2.id).unwrap().unwrap().recipients.len(), 1);
    q.complete(
        l[1].recipient.id,
        Outcome::Delivered {
            reply: "250".into(),
        },
    )
    .unwrap();
    assert_eq!(q.purge_final(later(1)).unwrap(), 1);
    assert!(q.message(e2.id).unwrap().is_none());
    assert!(q.list(None, 10).unwrap().is_empty());
    q.flush().unwrap();
}

/// Records that become final in one group commit share one final-index entry. Deleting the
/// message its entry is named after must not lose the others: they are still purged.
#[test]
fn records_final_together_are_purged_even_after_one_is_deleted() {
    let dir = tempfile::tempdir().unwrap();
    let q = open(&dir);
    let ids: Vec<MessageId> = ["a@x.test", "b@x.test", "c@y.test", "d@y.test"]
        .iter()
        .map(|to| q.enqueue(msg(&[to])).unwrap().id)
        .collect();
    let leases = q.take_due(later(1), 10).unwrap();
    assert_eq!(leases.len(), 4);
    let outcomes = leases
        .iter()
        .map(|l| {
            let o = if l.recipient.destination == "x.test" {
                Outcome::Delivered {
                    reply: "250".into(),
                }
            } else {
                Outcome::Bounced {
                    reply: "550 5.1.1".into(),
                }
            };
            (l.recipient.id, o)
        })
        .collect();
    for r in q.complete_batch(outcomes).unwrap() {
        r.unwrap();
    }
    // The first to become final, and so the one the entry is named after.
    assert!(q.delete(ids[0]).unwrap());
    assert_eq!(q.purge_final(later(1)).unwrap(), 3);
    for id in &ids {
        assert!(q.message(*id).unwrap().is_none(), "{id:?} purged");
    }
    assert!(q.list(None, 10).unwrap().is_empty());
    assert_eq!(q.purge_final(later(1)).unwrap(), 0);
    q.flush().unwrap();
}

#[test]
fn take_due_for_one_destination() {
    let dir = tempfile::tempdir().unwrap();
    let q = open(&dir);
    q.enqueue(msg(&["a@x.test", "b@Y.test"])).unwrap();
    q.enqueue(msg(&["c@y.test"])).unwrap();
    let l = q.take_due_for("Y.TEST", later(1), 10).unwrap();
    assert_eq!(l.len(), 2);
    assert!(l.iter().all(|l| l.recipient.destination == "y.test"));
    assert!(q.take_due_for("y.test", later(1), 10).unwrap().is_empty());
    assert_eq!(q.take_due_for("x.test", later(1), 1).unwrap().len(), 1);
    assert!(q.take_due(later(1), 10).unwrap().is_empty());
    // Not due yet.
    q.enqueue(msg(&["d@z.test"])).unwrap();
    assert!(q
        .take_due_for("z.test", SystemTime::now() - Duration::from_secs(5), 10)
        .unwrap()
        .is_empty());
}

#[test]
fn large_body_and_concurrency() {
    let dir = tempfile::tempdir().unwrap();
    let q = Arc::new(open(&dir));
    let big: Vec<u8> = (0..1_000_003u32).map(|i| (i % 253) as u8).collect();
    let mut m = msg(&["a@x.test"]);
    m.body = big.clone();
    let e = q.enqueue(m).unwrap();
    assert_eq!(q.body(e.id).unwrap().unwrap(), big);
    assert_eq!(q.message(e.id).unwrap().unwrap().size, big.len() as u64);
    let mut empty = msg(&["a@x.test"]);
    empty.body.clear();
    let e0 = q.enqueue(empty).unwrap();
    assert_eq!(q.body(e0.id).unwrap(), Some(Vec::new()));

    let threads: Vec<_> = (0..8)
        .map(|t| {
            let q = Arc::clone(&q);
            std::thread::spawn(move || {
                (0..50)
                    .map(|i| q.enqueue(msg(&[&format!("u{t}-{i}@x.test")])).unwrap().id)
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let mut ids: Vec<MessageId> = threads
        .into_iter()
        .flat_map(|t| t.join().unwrap())
        .collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 400);
    assert_eq!(q.stats().by_state[&RecipientState::Scheduled], 402);
}

#[test]
fn second_open_of_same_path_fails_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let _q = open(&dir);
    let err = Queue::open(dir.path(), opts()).err().expect("locked");
    assert!(
        err.to_string().contains(&dir.path().display().to_string()),
        "{err}"
    );
}

#[test]
fn postponed_is_not_an_attempt_and_keeps_the_last_reply() {
    let dir = tempfile::tempdir().unwrap();
    let q = open(&dir);
    let e = q.enqueue(msg(&["a@x.test", "b@x.test"])).unwrap();
    let leases = q.take_due(SystemTime::now(), 10).unwrap();
    assert_eq!(leases.len(), 2);
    let (a, b) = (leases[0].recipient.id, leases[1].recipient.id);
    // a: deferred once (an attempt), then postponed: attempts stay 1, the reply stays.
    q.complete(
        a,
        Outcome::Deferred {
            reply: "451 later".into(),
            next_attempt: SystemTime::now(),
        },
    )
    .unwrap();
    let again = q.take_due(later(1), 10).unwrap();
    assert_eq!(again.len(), 1);
    let done = q
        .complete(
            a,
            Outcome::Postponed {
                reason: "ready queue full".into(),
                next_attempt: later(60),
            },
        )
        .unwrap();
    assert_eq!(done.state, RecipientState::Scheduled);
    // b: postponed at once: no attempt, the reason recorded since there was no reply.
    q.complete(
        b,
        Outcome::Postponed {
            reason: "ready queue full".into(),
            next_attempt: later(60),
        },
    )
    .unwrap();
    let info = q.message(e.id).unwrap().unwrap();
    let ra = info.recipients.iter().find(|r| r.id == a).unwrap();
    let rb = info.recipients.iter().find(|r| r.id == b).unwrap();
    assert_eq!(
        (ra.attempts, ra.last_reply.as_deref()),
        (1, Some("451 later"))
    );
    assert_eq!(
        (rb.attempts, rb.last_reply.as_deref()),
        (0, Some("ready queue full"))
    );
    assert!(
        q.take_due(later(30), 10).unwrap().is_empty(),
        "not due before next_attempt"
    );
    let l = q.take_due(later(61), 10).unwrap();
    assert_eq!(l.len(), 2);
    // Postponed past the lifetime: expired (without counting an attempt).
    let past = SystemTime::now() + opts().max_queue_lifetime + Duration::from_secs(3600);
    let done = q
        .complete(
            l[0].recipient.id,
            Outcome::Postponed {
                reason: "x".into(),
                next_attempt: past,
            },
        )
        .unwrap();
    assert_eq!(done.state, RecipientState::Expired);
}

/// Bodies up to 256 bytes are stored inside the message's metadata, bigger ones in segment
/// files: both must read back the same across a reopen, stay while a recipient is pending
/// and go with the last final one (also after a crash-like reopen with leases outstanding).
#[test]
fn inline_and_segment_bodies_across_reopen_and_finalization() {
    let dir = tempfile::tempdir().unwrap();
    let sizes = [0usize, 1, 255, 256, 257, 4096, 8192, 70_001];
    let bodies: Vec<Vec<u8>> = sizes
        .iter()
        .map(|&n| (0..n).map(|i| (i % 251) as u8).collect())
        .collect();
    let mut ids = Vec::new();
    {
        let q = open(&dir);
        for b in &bodies {
            let mut m = msg(&["a@x.test", "b@y.test"]);
            m.body = b.clone();
            ids.push(q.enqueue(m).unwrap().id);
        }
        // Lease everything, then "crash" (drop without completing).
        assert_eq!(q.take_due(later(1), 100).unwrap().len(), 2 * sizes.len());
    }
    let q = open(&dir);
    for (id, b) in ids.iter().zip(&bodies) {
        assert_eq!(q.body(*id).unwrap().as_ref(), Some(b), "size {}", b.len());
        assert_eq!(q.message(*id).unwrap().unwrap().size, b.len() as u64);
    }
    let leases = q.take_due(later(1), 100).unwrap();
    assert_eq!(leases.len(), 2 * sizes.len(), "leases returned on reopen");
    let (first, second): (Vec<_>, Vec<_>) = leases
        .iter()
        .map(|l| l.recipient.id)
        .partition(|r| r.index == 0);
    let delivered = || Outcome::Delivered {
        reply: "250 ok".into(),
    };
    for r in &first {
        q.complete(*r, delivered()).unwrap();
    }
    for (id, b) in ids.iter().zip(&bodies) {
        assert_eq!(
            q.body(*id).unwrap().as_ref(),
            Some(b),
            "one recipient pending"
        );
    }
    for r in &second {
        q.complete(*r, delivered()).unwrap();
    }
    drop(q);
    let q = open(&dir);
    for id in &ids {
        assert_eq!(
            q.body(*id).unwrap(),
            None,
            "body gone with the last recipient"
        );
        assert!(
            q.message(*id).unwrap().is_some(),
            "records kept until purged"
        );
    }
    assert_eq!(q.purge_final(later(1)).unwrap(), 2 * sizes.len());
    for id in &ids {
        assert!(q.message(*id).unwrap().is_none());
    }
}

fn dir_bytes(p: &std::path::Path) -> u64 {
    std::fs::read_dir(p)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            let m = e.metadata().unwrap();
            if m.is_dir() {
                dir_bytes(&e.path())
            } else {
                m.len()
            }
        })
        .sum()
}

/// Options that let a test-sized store (a few MiB) be compacted on its own.
fn small_compaction_opts() -> QueueOptions {
    QueueOptions {
        compact_min_disk_bytes: 4 << 20,
        ..opts()
    }
}

/// A drained queue gives its disk space back: the writer compacts on its own once sled's
/// files are much bigger than what is left, and everything still live (a scheduled message
/// with a big body in a segment file, a leased one, suppressions, idempotency keys) survives
/// the copy and a reopen.
#[test]
fn drained_queue_is_compacted_and_keeps_live_data() {
    let dir = tempfile::tempdir().unwrap();
    let o = small_compaction_opts();
    let q = Queue::open(dir.path(), o.clone()).unwrap();
    let body = vec![b'x'; 3000];
    let batch: Vec<NewMessage> = (0..4000)
        .map(|i| NewMessage {
            body: body.clone(),
            ..msg(&[&format!("u{i}@bulk.test")])
        })
        .collect();
    for r in q.enqueue_batch(batch).unwrap() {
        r.unwrap();
    }
    // What must survive: a message that stays scheduled (big body, idempotency key), one
    // that stays leased, and a suppression.
    let big: Vec<u8> = (0..50_000u32).map(|i| (i % 241) as u8).collect();
    let keep = q
        .enqueue(NewMessage {
            idempotency_key: Some("keep-1".into()),
            body: big.clone(),
            ..msg(&["keep@later.test"])
        })
        .unwrap();
    q.suppress_add("gone@x.test", "550 5.1.1 unknown").unwrap();
    let mut held = None;
    loop {
        let leases = q.take_due(later(1), 1000).unwrap();
        if leases.is_empty() {
            break;
        }
        let mut done = Vec::new();
        for l in leases {
            let r = l.recipient.id;
            if r.message == keep.id {
                done.push((
                    r,
                    Outcome::Deferred {
                        reply: "451 later".into(),
                        next_attempt: later(3600),
                    },
                ));
            } else if held.is_none() {
                held = Some(r);
            } else {
                done.push((
                    r,
                    Outcome::Delivered {
                        reply: "250 ok".into(),
                    },
                ));
            }
        }
        for r in q.complete_batch(done).unwrap() {
            r.unwrap();
        }
    }
    let held = held.unwrap();
    q.purge_final(later(1)).unwrap();
    let full = q.stats().disk_bytes;
    assert!(full > 8 << 20, "filled store is {full} bytes");

    // The writer looks ~2 s after the last change; give it up to 30 s. The counted size drops
    // when the store is switched (and a segment forgotten), the files go a moment later:
    // wait for both.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while (q.stats().disk_bytes * 4 > full || dir_bytes(dir.path()) * 4 > full)
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(100));
    }
    let after = q.stats().disk_bytes;
    assert!(after * 4 <= full, "not compacted: {full} -> {after} bytes");
    let files = dir_bytes(dir.path());
    assert!(
        files * 4 <= full,
        "old files left behind: {files} bytes in the directory, {full} before"
    );

    let check = |q: &Queue| {
        assert_eq!(q.body(keep.id).unwrap().unwrap(), big);
        assert!(q.suppressed("GONE@x.test").unwrap().is_some());
        let again = q
            .enqueue(NewMessage {
                idempotency_key: Some("keep-1".into()),
                ..msg(&["keep@later.test"])
            })
            .unwrap();
        assert!(again.duplicate);
        assert_eq!(again.id, keep.id);
        assert_eq!(q.body(held.message).unwrap().unwrap(), body);
    };
    check(&q);
    assert_eq!(state(&q, held), RecipientState::Leased);
    // Writes after the switch land in the new store, durably.
    let fresh = q.enqueue(msg(&["new@x.test"])).unwrap();
    drop(q);
    let q = Queue::open(dir.path(), o).unwrap();
    check(&q);
    assert_eq!(
        state(&q, held),
        RecipientState::Scheduled,
        "lease undone on open"
    );
    assert!(q.message(fresh.id).unwrap().is_some());
    // A forced compaction of a store with live data keeps it too.
    let c = q.compact().unwrap();
    assert!(c.keys > 0);
    check(&q);
    drop(q);
    let q = Queue::open(dir.path(), opts()).unwrap();
    check(&q);
    assert_eq!(q.stats().by_state[&RecipientState::Scheduled], 3);
}

/// The automatic compaction copies in the background while writes go on; whatever was
/// written during the copy (enqueues, completions, suppressions) is in the new store after
/// the switch, and after a reopen.
#[test]
fn background_compaction_keeps_writes_made_while_it_copies() {
    use std::collections::HashMap;
    use std::sync::atomic::{AtomicBool, Ordering};
    let dir = tempfile::tempdir().unwrap();
    let o = small_compaction_opts();
    let q = Arc::new(Queue::open(dir.path(), o.clone()).unwrap());
    let body = vec![b'y'; 3000];
    for chunk in 0..24 {
        let batch: Vec<NewMessage> = (0..1000)
            .map(|i| NewMessage {
                body: body.clone(),
                ..msg(&[&format!("u{chunk}-{i}@bulk.test")])
            })
            .collect();
        for r in q.enqueue_batch(batch).unwrap() {
            r.unwrap();
        }
    }
    for _ in 0..22 {
        let leases = q.take_due(later(1), 1000).unwrap();
        let done = leases
            .iter()
            .map(|l| {
                (
                    l.recipient.id,
                    Outcome::Delivered {
                        reply: "250 ok".into(),
                    },
                )
            })
            .collect();
        for r in q.complete_batch(done).unwrap() {
            r.unwrap();
        }
    }
    q.purge_final(later(1)).unwrap();

    // Writes all along, until well after the switch.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (q, stop) = (Arc::clone(&q), Arc::clone(&stop));
        std::thread::spawn(move || {
            let mut enqueued = Vec::new();
            let mut completed: HashMap<RecipientId, RecipientState> = HashMap::new();
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let e = q
                    .enqueue(NewMessage {
                        idempotency_key: Some(format!("during-{i}")),
                        ..msg(&[&format!("w{i}@during.test")])
                    })
                    .unwrap();
                enqueued.push((i, e.id));
                if i.is_multiple_of(3) {
                    for l in q.take_due(SystemTime::now(), 2).unwrap() {
                        let r = l.recipient.id;
                        let st = q
                            .complete(
                                r,
                                Outcome::Bounced {
                                    reply: "550 no".into(),
                                },
                            )
                            .unwrap()
                            .state;
                        completed.insert(r, st);
                    }
                }
                if i.is_multiple_of(50) {
                    q.suppress_add(&format!("s{i}@during.test"), "550 5.1.1")
                        .unwrap();
                }
                i += 1;
            }
            (enqueued, completed)
        })
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !dir.path().join("CURRENT").exists() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(dir.path().join("CURRENT").exists(), "no compaction");
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    let (enqueued, completed) = writer.join().unwrap();
    assert!(enqueued.len() > 10, "{} writes", enqueued.len());

    let check = |q: &Queue| {
        for (i, id) in &enqueued {
            let info = q
                .message(*id)
                .unwrap()
                .unwrap_or_else(|| panic!("{id} lost"));
            assert_eq!(
                info.idempotency_key.as_deref(),
                Some(&*format!("during-{i}"))
            );
            if i.is_multiple_of(50) {
                assert!(q
                    .suppressed(&format!("s{i}@during.test"))
                    .unwrap()
                    .is_some());
            }
        }
        for (r, st) in &completed {
            assert_eq!(state(q, *r), *st, "{r}");
        }
    };
    check(&q);
    let generations = std::fs::read_dir(dir.path())
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with("gen-")
        })
        .count();
    assert_eq!(generations, 1);
    drop(q);
    let q = Queue::open(dir.path(), o).unwrap();
    check(&q);
}

/// The body segment files of a queue directory, by name.
fn segment_files(dir: &std::path::Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir.join("bodies"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".seg"))
        .collect();
    v.sort();
    v
}

/// Bodies over 256 bytes live in segment files outside sled. A segment file is deleted once no
/// pending message refers to it (the current one too, once it holds 1 MiB or more); the body
/// of a deferred message does not pin its big segment: it is moved to a new one, and read back
/// the same, also after a reopen, until it is final.
#[test]
fn big_bodies_live_in_segment_files_that_go_when_unreferenced() {
    let dir = tempfile::tempdir().unwrap();
    let body = |i: u32| -> Vec<u8> { (0..100_000u32).map(|j| ((i * 7 + j) % 253) as u8).collect() };
    let q = open(&dir);
    let ids: Vec<MessageId> = (0..400u32)
        .map(|i| {
            let m = NewMessage {
                body: body(i),
                ..msg(&[&format!("u{i}@x.test")])
            };
            q.enqueue(m).unwrap().id
        })
        .collect();
    // 40 MB of bodies: two 32 MiB segments.
    assert_eq!(segment_files(dir.path()).len(), 2);
    assert!(q.stats().disk_bytes >= 40_000_000);
    loop {
        let leases = q.take_due(later(1), 100).unwrap();
        if leases.is_empty() {
            break;
        }
        let done = leases
            .iter()
            .map(|l| {
                let r = l.recipient.id;
                let o = if r.message == ids[0] {
                    Outcome::Deferred {
                        reply: "451 later".into(),
                        next_attempt: later(3600),
                    }
                } else {
                    Outcome::Delivered {
                        reply: "250 ok".into(),
                    }
                };
                (r, o)
            })
            .collect();
        for r in q.complete_batch(done).unwrap() {
            r.unwrap();
        }
    }
    q.flush().unwrap();
    // Segment 2 (current, drained) is gone at once. Segment 1 (32 MiB) holds one pending
    // body: the writer relocates it to a new segment (it looks ~2 s after the last change)
    // and deletes segment 1.
    let want = vec!["000000000003.seg".to_string()];
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while (segment_files(dir.path()) != want || q.stats().disk_bytes >= 8_000_000)
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(segment_files(dir.path()), want, "deferred body relocated");
    let disk = q.stats().disk_bytes;
    assert!(disk < 8_000_000, "{disk} bytes on disk");
    assert_eq!(q.body(ids[0]).unwrap().unwrap(), body(0));
    assert_eq!(q.body(ids[1]).unwrap(), None);
    drop(q);
    let q = open(&dir);
    assert_eq!(q.body(ids[0]).unwrap().unwrap(), body(0));
    let leases = q.take_due(later(7200), 10).unwrap();
    assert_eq!(leases.len(), 1);
    q.complete(
        leases[0].recipient.id,
        Outcome::Delivered {
            reply: "250 ok".into(),
        },
    )
    .unwrap();
    q.flush().unwrap();
    assert!(
        segment_files(dir.path()).is_empty(),
        "drained: no segment left"
    );
    assert!(q.stats().disk_bytes < 40_000_000);
}

/// A body damaged on disk is a clear error when read, never garbage or a panic; and a body
/// cut short (a power cut that lost the unsynced tail of a segment: the message was never
/// acknowledged) removes its message when the queue is opened, keeping the others.
#[test]
fn torn_or_damaged_segment_body_is_caught() {
    use std::os::unix::fs::FileExt;
    let dir = tempfile::tempdir().unwrap();
    let q = open(&dir);
    let big = |b: u8| NewMessage {
        body: vec![b; 10_000],
        ..msg(&["a@x.test"])
    };
    let a = q.enqueue(big(b'a')).unwrap().id;
    let b = q.enqueue(big(b'b')).unwrap().id;
    let c = q.enqueue(msg(&["c@x.test"])).unwrap().id;
    let files = segment_files(dir.path());
    assert_eq!(files.len(), 1);
    let seg = dir.path().join("bodies").join(&files[0]);
    let f = std::fs::OpenOptions::new().write(true).open(&seg).unwrap();
    f.write_all_at(b"A", 5).unwrap();
    match q.body(a) {
        Err(QueueError::Corrupt { detail, .. }) => assert!(detail.contains("checksum"), "{detail}"),
        other => panic!("damaged body read as {other:?}"),
    }
    assert_eq!(q.body(b).unwrap().unwrap(), vec![b'b'; 10_000]);
    drop(q);
    f.set_len(15_000).unwrap();
    let q = open(&dir);
    assert!(q.message(a).unwrap().is_none(), "damaged message removed");
    assert!(q.message(b).unwrap().is_none(), "cut-short message removed");
    assert!(q.body(c).unwrap().is_some(), "the others stay");
    assert_eq!(q.stats().by_state[&RecipientState::Scheduled], 1);
    q.flush().unwrap();
    assert!(segment_files(dir.path()).is_empty());
}

/// The async completion gives the same per-item results as the blocking one, and what it
/// recorded is there after a reopen. (A clean drop syncs, so this does not show that the
/// reply waited for the fdatasync; the crash test does that for the blocking path, which
/// shares the writer and syncer.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn complete_batch_async_records_outcomes_durably() {
    let dir = tempfile::tempdir().unwrap();
    let q = Arc::new(open(&dir));
    let e = q.enqueue(msg(&["a@x.test", "b@x.test"])).unwrap();
    let leases = q.take_due(later(1), 10).unwrap();
    assert_eq!(leases.len(), 2);
    let (a, b) = (leases[0].recipient.id, leases[1].recipient.id);
    // Several at once from tasks, as the engine's workers do.
    let mut tasks = Vec::new();
    for (id, outcome) in [
        (
            a,
            Outcome::Delivered {
                reply: "250 2.0.0 ok".into(),
            },
        ),
        (
            b,
            Outcome::Bounced {
                reply: "550 5.1.1 no such user".into(),
            },
        ),
    ] {
        let q = Arc::clone(&q);
        tasks.push(tokio::spawn(async move {
            q.complete_batch_async(vec![(id, outcome)]).await
        }));
    }
    for t in tasks {
        let res = t.await.unwrap().unwrap();
        assert!(matches!(res.as_slice(), [Ok(_)]), "{res:?}");
    }
    // Completing again: not leased any more, reported per item.
    let again = q
        .complete_batch_async(vec![(
            a,
            Outcome::Delivered {
                reply: "250".into(),
            },
        )])
        .await
        .unwrap();
    assert!(matches!(
        again.as_slice(),
        [Err(QueueError::NotLeased {
            state: RecipientState::Delivered,
            ..
        })]
    ));
    assert!(q.complete_batch_async(Vec::new()).await.unwrap().is_empty());
    drop(q);
    let q = open(&dir);
    assert_eq!(state(&q, a), RecipientState::Delivered);
    assert_eq!(state(&q, b), RecipientState::Bounced);
    assert_eq!(
        q.body(e.id).unwrap(),
        None,
        "body gone with the last recipient"
    );
}

/// The async enqueue stores what the blocking one stores: one message per idempotency key
/// (also across the two APIs), an `Err` in the slot of an invalid message of a batch, and
/// everything there after a reopen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enqueue_async_matches_the_blocking_enqueue() {
    let dir = tempfile::tempdir().unwrap();
    let q = Arc::new(open(&dir));
    let mut tasks = Vec::new();
    for i in 0..16 {
        let q = Arc::clone(&q);
        let mut m = msg(&[&format!("u{i}@x.test")]);
        m.idempotency_key = Some(format!("order-{}", i % 8));
        tasks.push(tokio::spawn(async move { q.enqueue_async(m).await }));
    }
    let mut ids = std::collections::HashMap::new();
    let mut fresh = 0;
    for (i, t) in tasks.into_iter().enumerate() {
        let e = t.await.unwrap().unwrap();
        fresh += usize::from(!e.duplicate);
        assert_eq!(
            *ids.entry(i % 8).or_insert(e.id),
            e.id,
            "key order-{}",
            i % 8
        );
    }
    assert_eq!(fresh, 8, "one message per key");
    // The blocking API sees the same keys.
    let mut m = msg(&["late@x.test"]);
    m.idempotency_key = Some("order-3".into());
    let e = q.enqueue(m).unwrap();
    assert!(e.duplicate);
    assert_eq!(e.id, ids[&3]);
    // A batch with a bad message: its slot fails, the others are stored.
    let res = q
        .enqueue_batch_async(vec![
            msg(&["b1@y.test"]),
            msg(&["not an address"]),
            msg(&["b2@y.test"]),
        ])
        .await
        .unwrap();
    assert!(res[0].is_ok() && res[2].is_ok(), "{res:?}");
    assert!(
        matches!(res[1], Err(QueueError::InvalidInput(_))),
        "{res:?}"
    );
    assert!(q.enqueue_batch_async(Vec::new()).await.unwrap().is_empty());
    assert!(matches!(
        q.enqueue_async(msg(&[])).await,
        Err(QueueError::InvalidInput(_))
    ));
    let kept = res[2].as_ref().unwrap().id;
    drop(q);
    let q = open(&dir);
    assert_eq!(q.list(None, 100).unwrap().len(), 10);
    let info = q.message(kept).unwrap().unwrap();
    assert_eq!(info.recipients[0].address, "b2@y.test");
}

/// Final records older than `final_retention` are purged by the writer on its own, the first
/// time right after open (records can age while the process is down).
#[test]
fn final_records_past_retention_are_purged_after_open() {
    let dir = tempfile::tempdir().unwrap();
    let short = QueueOptions {
        final_retention: Duration::from_millis(1),
        ..opts()
    };
    let kept = QueueOptions {
        final_retention: Duration::from_secs(3600),
        ..opts()
    };
    {
        let q = Queue::open(dir.path(), kept.clone()).unwrap();
        let e = q.enqueue(msg(&["a@x.test"])).unwrap();
        let l = q.take_due(later(1), 10).unwrap();
        q.complete(
            l[0].recipient.id,
            Outcome::Delivered {
                reply: "250".into(),
            },
        )
        .unwrap();
        assert!(q.message(e.id).unwrap().is_some());
    }
    // Within the retention the record stays across an open.
    {
        let q = Queue::open(dir.path(), kept).unwrap();
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(q.list(None, 10).unwrap().len(), 1, "kept: within retention");
    }
    let q = Queue::open(dir.path(), short).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !q.list(None, 10).unwrap().is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "final record not purged after open"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(q.stats().by_state.get(&RecipientState::Delivered), None);
}

/// A purge bigger than one sled batch (1,000 records per batch) removes every final record,
/// message and idempotency key, and leaves the pending ones alone.
#[test]
fn purge_spanning_several_batches_removes_everything_final() {
    let dir = tempfile::tempdir().unwrap();
    let q = open(&dir);
    let n = 2_500;
    let batch: Vec<NewMessage> = (0..n)
        .map(|i| {
            let mut m = msg(&[&format!("u{i}@x.test")]);
            m.idempotency_key = Some(format!("k{i}"));
            m
        })
        .collect();
    let ids: Vec<MessageId> = q
        .enqueue_batch(batch.clone())
        .unwrap()
        .into_iter()
        .map(|r| r.unwrap().id)
        .collect();
    let pending = q.enqueue(msg(&["still@x.test"])).unwrap().id;
    let leases = q.take_due(later(1), n + 1).unwrap();
    assert_eq!(leases.len(), n + 1);
    let done: Vec<_> = leases
        .iter()
        .filter(|l| l.recipient.id.message != pending)
        .map(|l| {
            (
                l.recipient.id,
                Outcome::Delivered {
                    reply: "250".into(),
                },
            )
        })
        .collect();
    assert_eq!(done.len(), n);
    for r in q.complete_batch(done).unwrap() {
        r.unwrap();
    }
    assert_eq!(q.purge_final(later(1)).unwrap(), n);
    assert_eq!(q.purge_final(later(1)).unwrap(), 0);
    for id in [ids[0], ids[999], ids[1000], ids[n - 1]] {
        assert!(q.message(id).unwrap().is_none());
    }
    assert_eq!(
        q.list(None, 10).unwrap().len(),
        1,
        "only the leased one left"
    );
    assert_eq!(q.stats().by_state[&RecipientState::Leased], 1);
    let delivered = q.stats().by_state.get(&RecipientState::Delivered).copied();
    assert_eq!(delivered.unwrap_or(0), 0, "no delivered record left");
    // The idempotency keys went with their messages: the same keys are new messages again.
    let again = q.enqueue_batch(batch).unwrap();
    assert!(again.iter().all(|r| !r.as_ref().unwrap().duplicate));
}

/// The writer keeps an in-memory filter of the suppression list and rebuilds it when it has
/// grown past what it was sized for (4,096 keys at first): no suppressed address may slip
/// through, before, during or after the rebuilds.
#[test]
fn many_suppressions_are_all_found_at_enqueue() {
    let dir = tempfile::tempdir().unwrap();
    let q = Arc::new(open(&dir));
    let threads: Vec<_> = (0..16)
        .map(|t| {
            let q = Arc::clone(&q);
            std::thread::spawn(move || {
                for i in 0..400 {
                    assert!(q
                        .suppress_add(&format!("s{t}-{i}@x.test"), "5.1.1")
                        .unwrap());
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(q.suppress_list().unwrap().len(), 16 * 400);
    let mut batch = Vec::new();
    for t in 0..16 {
        for i in (0..400).step_by(7) {
            batch.push(msg(&[
                &format!("S{t}-{i}@X.test"),
                &format!("n{t}-{i}@x.test"),
            ]));
        }
    }
    for e in q.enqueue_batch(batch).unwrap() {
        let e = e.unwrap();
        assert_eq!(e.suppressed.len(), 1, "{:?}", e.suppressed);
        assert!(e.suppressed[0].starts_with('S'));
    }
}

/// A lease held past `lease_timeout` is taken back by a later `take_due`, as if released: its
/// recipient is leased again in that same call, with no attempt counted; a lease within the
/// timeout and a completed one are left alone.
#[test]
fn lease_past_the_timeout_is_taken_back() {
    let dir = tempfile::tempdir().unwrap();
    let q = Queue::open(
        dir.path(),
        QueueOptions {
            lease_timeout: Some(Duration::from_secs(600)),
            ..opts()
        },
    )
    .unwrap();
    q.enqueue(msg(&["a@x.test", "b@x.test"])).unwrap();
    let t0 = SystemTime::now();
    let leases = q.take_due(t0, 10).unwrap();
    assert_eq!(leases.len(), 2);
    let (lost, done) = (leases[0].recipient.id, leases[1].recipient.id);
    q.complete(
        done,
        Outcome::Delivered {
            reply: "250".into(),
        },
    )
    .unwrap();
    assert!(q
        .take_due(t0 + Duration::from_secs(599), 10)
        .unwrap()
        .is_empty());
    assert_eq!(state(&q, lost), RecipientState::Leased);

    let again = q.take_due(t0 + Duration::from_secs(601), 10).unwrap();
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].recipient.id, lost);
    assert_eq!(
        again[0].recipient.attempts, 0,
        "a taken-back lease is no attempt"
    );
    assert_eq!(state(&q, lost), RecipientState::Leased);
    assert_eq!(state(&q, done), RecipientState::Delivered);
    assert_eq!(q.stats().by_state[&RecipientState::Leased], 1);
    // The new lease is an ordinary one.
    q.complete(
        lost,
        Outcome::Delivered {
            reply: "250".into(),
        },
    )
    .unwrap();
    assert!(q
        .take_due(t0 + Duration::from_secs(1300), 10)
        .unwrap()
        .is_empty());
}

/// With no lease timeout a lease stays until it is completed (or the process restarts).
#[test]
fn without_a_lease_timeout_leases_stay() {
    let dir = tempfile::tempdir().unwrap();
    let q = Queue::open(
        dir.path(),
        QueueOptions {
            lease_timeout: None,
            ..opts()
        },
    )
    .unwrap();
    q.enqueue(msg(&["a@x.test"])).unwrap();
    let t0 = SystemTime::now();
    let id = q.take_due(t0, 10).unwrap()[0].recipient.id;
    assert!(q
        .take_due(t0 + Duration::from_secs(86_400), 10)
        .unwrap()
        .is_empty());
    assert_eq!(state(&q, id), RecipientState::Leased);
}

/// Outcomes recorded through `complete_batch_async` may wait `outcome_commit_delay` for
/// more to share their commit, once the group before had `outcome_commit_siblings` of them;
/// anything else in the group commits it at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outcomes_wait_for_company_but_an_enqueue_commits_at_once() {
    let delivered = || Outcome::Delivered {
        reply: "250 2.0.0 ok".into(),
    };
    let open_with = |dir: &tempfile::TempDir, delay: Duration, siblings: usize| {
        Arc::new(
            Queue::open(
                dir.path(),
                QueueOptions {
                    outcome_commit_delay: delay,
                    outcome_commit_siblings: siblings,
                    ..opts()
                },
            )
            .unwrap(),
        )
    };

    // At low load (the group before had fewer outcomes than `siblings`) an outcome does not
    // wait.
    let dir = tempfile::tempdir().unwrap();
    let q = open_with(&dir, Duration::from_secs(30), 4);
    q.enqueue(msg(&["a@x.test"])).unwrap();
    let a = q.take_due(later(1), 10).unwrap()[0].recipient.id;
    let res = tokio::time::timeout(
        Duration::from_secs(20),
        q.complete_batch_async(vec![(a, delivered())]),
    )
    .await
    .expect("a lone outcome is committed at once");
    assert!(matches!(res.unwrap().as_slice(), [Ok(_)]));
    drop(q);

    // Without that condition, an outcome alone waits the delay out (a lower bound only: a
    // busy machine adds to it).
    let dir = tempfile::tempdir().unwrap();
    let q = open_with(&dir, Duration::from_millis(300), 0);
    q.enqueue(msg(&["a@x.test"])).unwrap();
    let a = q.take_due(later(1), 10).unwrap()[0].recipient.id;
    let started = std::time::Instant::now();
    let res = q
        .complete_batch_async(vec![(a, delivered())])
        .await
        .unwrap();
    assert!(matches!(res.as_slice(), [Ok(_)]), "{res:?}");
    assert!(
        started.elapsed() >= Duration::from_millis(290),
        "{:?}",
        started.elapsed()
    );
    drop(q);

    // With a long delay, an enqueue arriving meanwhile commits the group, the held outcomes
    // with it, and does not wait itself.
    let dir = tempfile::tempdir().unwrap();
    let q = open_with(&dir, Duration::from_secs(30), 0);
    q.enqueue(msg(&["a@x.test", "b@x.test"])).unwrap();
    let leases = q.take_due(later(1), 10).unwrap();
    let mut held: Vec<_> = leases
        .iter()
        .map(|l| Box::pin(q.complete_batch_async(vec![(l.recipient.id, delivered())])))
        .collect();
    // Polled once each, here: the request is handed to the writer on the first poll.
    for f in &mut held {
        assert!(
            tokio::time::timeout(Duration::ZERO, f).await.is_err(),
            "outcomes are held"
        );
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    for f in &mut held {
        assert!(
            tokio::time::timeout(Duration::ZERO, f).await.is_err(),
            "outcomes are still held"
        );
    }
    let started = std::time::Instant::now();
    let q2 = Arc::clone(&q);
    let e = tokio::task::spawn_blocking(move || q2.enqueue(msg(&["c@x.test"])))
        .await
        .unwrap()
        .unwrap();
    for f in held {
        let res = tokio::time::timeout(Duration::from_secs(20), f)
            .await
            .expect("held outcomes committed with the enqueue")
            .unwrap();
        assert!(matches!(res.as_slice(), [Ok(_)]), "{res:?}");
    }
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "{:?}",
        started.elapsed()
    );
    for l in &leases {
        assert_eq!(state(&q, l.recipient.id), RecipientState::Delivered);
    }
    assert!(q.message(e.id).unwrap().is_some());
}

/// `complete_batch_async_urgent` commits its group at once, and the outcomes held in it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_urgent_outcome_commits_the_held_group() {
    let dir = tempfile::tempdir().unwrap();
    let q = Queue::open(
        dir.path(),
        QueueOptions {
            outcome_commit_delay: Duration::from_secs(30),
            outcome_commit_siblings: 0,
            ..opts()
        },
    )
    .unwrap();
    q.enqueue(msg(&["a@x.test", "b@x.test"])).unwrap();
    let leases = q.take_due(later(1), 10).unwrap();
    let delivered = |i: usize| {
        vec![(
            leases[i].recipient.id,
            Outcome::Delivered {
                reply: "250 2.0.0 ok".into(),
            },
        )]
    };
    let mut held = Box::pin(q.complete_batch_async(delivered(0)));
    assert!(tokio::time::timeout(Duration::ZERO, &mut held)
        .await
        .is_err());
    let urgent = tokio::time::timeout(
        Duration::from_secs(20),
        q.complete_batch_async_urgent(delivered(1)),
    )
    .await
    .expect("an urgent outcome does not wait");
    assert!(matches!(urgent.unwrap().as_slice(), [Ok(_)]));
    let res = tokio::time::timeout(Duration::from_secs(20), held)
        .await
        .expect("the held outcome went with it");
    assert!(matches!(res.unwrap().as_slice(), [Ok(_)]));
}
