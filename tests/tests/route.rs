//! The real resolver path: `HickoryDns` (hickory-resolver over UDP/TCP) and `Router` against
//! the loopback DNS server of `bulksend_tests::dns`. The judge is what that server answered
//! and how many queries it saw.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bulksend_engine::route::{HickoryDns, Route, RouteError, Router};
use bulksend_tests::dns::TestDns;

fn router_on(dns: &TestDns, routes: &[(&str, &str)], timeout: Duration) -> Router {
    let hickory = HickoryDns::new(&[dns.addr], timeout).unwrap();
    let routes: BTreeMap<String, String> = routes
        .iter()
        .map(|(d, t)| ((*d).to_owned(), (*t).to_owned()))
        .collect();
    Router::new(&routes, Some(2525), Arc::new(hickory))
}

fn router(dns: &TestDns) -> Router {
    router_on(dns, &[], Duration::from_secs(2))
}

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn names(r: &Route) -> Vec<&str> {
    r.hosts.iter().map(|h| h.name.as_str()).collect()
}

#[tokio::test]
async fn mx_hosts_in_preference_order_with_real_addresses() {
    let dns = TestDns::start().await;
    dns.add_mx("a.test", 20, "mx2.a.test", 300);
    dns.add_mx("a.test", 5, "mx0.a.test", 300);
    dns.add_mx("a.test", 10, "MX1.a.test", 300);
    dns.add_a("mx0.a.test", "127.0.0.10", 300);
    dns.add_aaaa("mx0.a.test", "::1", 300);
    dns.add_a("mx1.a.test", "127.0.0.11", 300);
    dns.add_aaaa("mx2.a.test", "2001:db8::12", 300);
    let router = router(&dns);

    let r = router.route("A.test.").await.unwrap();
    assert_eq!(names(&r), ["mx0.a.test", "mx1.a.test", "mx2.a.test"]);
    assert_eq!(
        r.hosts.iter().map(|h| h.preference).collect::<Vec<_>>(),
        [5, 10, 20]
    );
    assert_eq!(r.hosts[0].addrs, [sa("127.0.0.10:2525"), sa("[::1]:2525")]);
    assert_eq!(r.hosts[1].addrs, [sa("127.0.0.11:2525")]);
    assert_eq!(r.hosts[2].addrs, [sa("[2001:db8::12]:2525")]);
    assert_eq!(r.destination.0, "mx0.a.test,mx1.a.test,mx2.a.test");
}

#[tokio::test]
async fn no_mx_falls_back_to_the_domains_own_address() {
    let dns = TestDns::start().await;
    dns.add_a("implicit.test", "127.0.0.20", 300);
    let router = router(&dns);
    let r = router.route("implicit.test").await.unwrap();
    assert_eq!(names(&r), ["implicit.test"]);
    assert_eq!(r.hosts[0].preference, 0);
    assert_eq!(r.hosts[0].addrs, [sa("127.0.0.20:2525")]);
    // The MX query really got NODATA, then the address was asked for.
    let log = dns.query_log();
    assert!(
        log.contains(&("implicit.test".into(), "MX".into())),
        "{log:?}"
    );
    assert!(
        log.contains(&("implicit.test".into(), "A".into())),
        "{log:?}"
    );
}

#[tokio::test]
async fn a_name_without_mx_or_address_is_permanent() {
    let dns = TestDns::start().await;
    dns.add_name("empty.test");
    let router = router(&dns);
    match router.route("empty.test").await {
        Err(RouteError::Permanent(m)) => assert!(m.contains("no MX and no address"), "{m}"),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn null_mx_is_permanent() {
    let dns = TestDns::start().await;
    dns.add_mx("null.test", 0, ".", 300);
    dns.add_a("null.test", "127.0.0.1", 300);
    let router = router(&dns);
    match router.route("null.test").await {
        Err(RouteError::Permanent(m)) => assert!(m.contains("null MX"), "{m}"),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn nxdomain_is_permanent() {
    let dns = TestDns::start().await;
    let router = router(&dns);
    match router.route("nowhere.test").await {
        Err(RouteError::Permanent(m)) => assert!(m.contains("NXDOMAIN"), "{m}"),
        other => panic!("{other:?}"),
    }
    assert!(dns.queries() >= 1);
}

#[tokio::test]
async fn servfail_is_transient() {
    let dns = TestDns::start().await;
    dns.set_servfail("broken.test");
    let router = router(&dns);
    match router.route("broken.test").await {
        Err(RouteError::Transient(m)) => assert!(m.contains("server failure"), "{m}"),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn an_mx_host_that_servfails_is_skipped_and_all_failing_is_transient() {
    let dns = TestDns::start().await;
    dns.add_mx("half.test", 10, "bad.half.test", 300);
    dns.add_mx("half.test", 20, "good.half.test", 300);
    dns.set_servfail("bad.half.test");
    dns.add_a("good.half.test", "127.0.0.30", 300);
    dns.add_mx("allbad.test", 10, "bad.half.test", 300);
    let router = router(&dns);
    assert_eq!(
        names(&router.route("half.test").await.unwrap()),
        ["good.half.test"]
    );
    match router.route("allbad.test").await {
        Err(RouteError::Transient(m)) => assert!(m.contains("bad.half.test"), "{m}"),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn an_unanswered_query_times_out_as_transient() {
    let dns = TestDns::start().await;
    dns.set_silent("silent.test");
    let router = router_on(&dns, &[], Duration::from_millis(200));
    let started = std::time::Instant::now();
    match router.route("silent.test").await {
        Err(RouteError::Transient(m)) => assert!(m.contains("timeout"), "{m}"),
        other => panic!("{other:?}"),
    }
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[tokio::test]
async fn second_route_within_ttl_is_served_from_cache() {
    let dns = TestDns::start().await;
    dns.add_mx("cached.test", 10, "mx.cached.test", 300);
    dns.add_a("mx.cached.test", "127.0.0.40", 300);
    let router = router(&dns);
    let first = router.route("cached.test").await.unwrap();
    let after_first = dns.queries();
    assert!(after_first >= 2, "MX and address queries expected");
    let second = router.route("Cached.Test.").await.unwrap();
    assert_eq!(dns.queries(), after_first, "{:?}", dns.query_log());
    assert!(Arc::ptr_eq(&first, &second));

    // Negative answers are cached too.
    let _ = router.route("nowhere.test").await;
    let after_nx = dns.queries();
    let _ = router.route("nowhere.test").await;
    assert_eq!(dns.queries(), after_nx);

    // A fresh router (empty cache) does query again: the counter is real.
    let other = router_on(&dns, &[], Duration::from_secs(2));
    other.route("cached.test").await.unwrap();
    assert!(dns.queries() > after_nx);
}

#[tokio::test]
async fn static_route_host_is_resolved_through_the_same_dns() {
    let dns = TestDns::start().await;
    dns.add_a("relay.test", "127.0.0.50", 300);
    dns.add_mx("a.test", 10, "mx.a.test", 300);
    let router = router_on(
        &dns,
        &[("a.test", "relay.test:2600"), ("b.test", "127.0.0.1:2601")],
        Duration::from_secs(2),
    );
    let r = router.route("a.test").await.unwrap();
    assert_eq!(r.destination.0, "relay.test:2600");
    assert_eq!(r.hosts[0].addrs, [sa("127.0.0.50:2600")]);
    let before = dns.queries();
    let r = router.route("b.test").await.unwrap();
    assert_eq!(r.destination.0, "[127.0.0.1]:2601");
    assert_eq!(dns.queries(), before, "an IP route needs no DNS");
    assert_eq!(dns.queries_for("a.test"), 0, "static routes skip MX");
}
