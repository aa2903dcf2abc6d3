//! A small authoritative DNS server on loopback (UDP and TCP on the same port) for tests of the
//! real resolver: a test adds MX/A/AAAA records with TTLs, marks names as broken (SERVFAIL) or
//! silent (never answered), and afterwards asks how many queries arrived.
//!
//! Answers: records of the asked type → NOERROR with them; a known name without records of that
//! type → NOERROR with no answers (NODATA); an unknown name → NXDOMAIN. Names match without
//! regard to case or a trailing dot.
//!
//! ```no_run
//! # async fn demo() {
//! let dns = bulksend_tests::dns::TestDns::start().await;
//! dns.add_mx("a.test", 10, "mx.a.test", 300);
//! dns.add_a("mx.a.test", "127.0.0.1", 300);
//! // point bulksend_engine::route::HickoryDns::new(&[dns.addr], ..) at it
//! assert_eq!(dns.queries(), 0);
//! # }
//! ```
#![allow(clippy::unwrap_used, unreachable_pub)]

use std::collections::HashMap;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex};

use hickory_proto::op::{Edns, Message, OpCode, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, MX};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::task::{JoinHandle, JoinSet};

#[derive(Default, Clone)]
struct Node {
    mx: Vec<(u16, String, u32)>,
    a: Vec<(Ipv4Addr, u32)>,
    aaaa: Vec<(Ipv6Addr, u32)>,
    servfail: bool,
    silent: bool,
}

#[derive(Default)]
struct State {
    zone: HashMap<String, Node>,
    /// Every query received: (name as normalised, record type).
    log: Vec<(String, RecordType)>,
}

/// A running loopback DNS server. Stops when dropped.
pub struct TestDns {
    /// The UDP and TCP address (127.0.0.1, same port).
    pub addr: SocketAddr,
    state: Arc<Mutex<State>>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for TestDns {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

fn key(name: &str) -> String {
    let n = name.trim();
    n.strip_suffix('.').unwrap_or(n).to_ascii_lowercase()
}

impl TestDns {
    /// Binds UDP and TCP on one free port of 127.0.0.1 and starts answering.
    pub async fn start() -> TestDns {
        let (udp, tcp) = bind_pair().await;
        let addr = udp.local_addr().unwrap();
        let state: Arc<Mutex<State>> = Arc::default();
        let udp_task = tokio::spawn(serve_udp(udp, state.clone()));
        let tcp_task = tokio::spawn(serve_tcp(tcp, state.clone()));
        TestDns {
            addr,
            state,
            tasks: vec![udp_task, tcp_task],
        }
    }

    fn node(&self, name: &str, f: impl FnOnce(&mut Node)) {
        let mut st = self.state.lock().unwrap();
        f(st.zone.entry(key(name)).or_default());
    }

    /// Adds an MX record. `exchange` "." (or "") makes a null MX (RFC 7505).
    pub fn add_mx(&self, domain: &str, preference: u16, exchange: &str, ttl: u32) {
        let exchange = exchange.to_owned();
        self.node(domain, |n| n.mx.push((preference, exchange, ttl)));
    }

    pub fn add_a(&self, host: &str, ip: &str, ttl: u32) {
        let ip: Ipv4Addr = ip.parse().unwrap();
        self.node(host, |n| n.a.push((ip, ttl)));
    }

    pub fn add_aaaa(&self, host: &str, ip: &str, ttl: u32) {
        let ip: Ipv6Addr = ip.parse().unwrap();
        self.node(host, |n| n.aaaa.push((ip, ttl)));
    }

    /// Makes `name` exist without any records (every query for it gets NODATA).
    pub fn add_name(&self, name: &str) {
        self.node(name, |_| {});
    }

    /// Every query for `name` gets SERVFAIL.
    pub fn set_servfail(&self, name: &str) {
        self.node(name, |n| n.servfail = true);
    }

    /// Queries for `name` are never answered (the resolver times out).
    pub fn set_silent(&self, name: &str) {
        self.node(name, |n| n.silent = true);
    }

    /// Number of queries received so far (UDP and TCP).
    pub fn queries(&self) -> usize {
        self.state.lock().unwrap().log.len()
    }

    /// Number of queries received for `name` (any type).
    pub fn queries_for(&self, name: &str) -> usize {
        let k = key(name);
        self.state
            .lock()
            .unwrap()
            .log
            .iter()
            .filter(|(n, _)| *n == k)
            .count()
    }

    /// Every query so far as (name, type), e.g. ("a.test", "MX").
    pub fn query_log(&self) -> Vec<(String, String)> {
        self.state
            .lock()
            .unwrap()
            .log
            .iter()
            .map(|(n, t)| (n.clone(), t.to_string()))
            .collect()
    }
}

async fn bind_pair() -> (UdpSocket, TcpListener) {
    for _ in 0..50 {
        let udp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = udp.local_addr().unwrap();
        if let Ok(tcp) = TcpListener::bind(addr).await {
            return (udp, tcp);
        }
    }
    panic!("no port free for both UDP and TCP on 127.0.0.1");
}

async fn serve_udp(socket: UdpSocket, state: Arc<Mutex<State>>) {
    let mut buf = vec![0u8; 65535];
    loop {
        let Ok((n, peer)) = socket.recv_from(&mut buf).await else {
            continue;
        };
        if let Some(reply) = answer(&buf[..n], &state) {
            let _ = socket.send_to(&reply, peer).await;
        }
    }
}

async fn serve_tcp(listener: TcpListener, state: Arc<Mutex<State>>) {
    // Connection tasks live in this set, so aborting this task stops them too.
    let mut conns = JoinSet::new();
    while let Ok((stream, _)) = listener.accept().await {
        conns.spawn(serve_tcp_conn(stream, state.clone()));
        while conns.try_join_next().is_some() {}
    }
}

/// RFC 1035 §4.2.2: each message is preceded by a two-byte length.
async fn serve_tcp_conn(mut stream: TcpStream, state: Arc<Mutex<State>>) {
    loop {
        let mut len = [0u8; 2];
        if stream.read_exact(&mut len).await.is_err() {
            return;
        }
        let mut msg = vec![0u8; usize::from(u16::from_be_bytes(len))];
        if stream.read_exact(&mut msg).await.is_err() {
            return;
        }
        if let Some(reply) = answer(&msg, &state) {
            let Ok(len) = u16::try_from(reply.len()) else {
                return;
            };
            let mut out = len.to_be_bytes().to_vec();
            out.extend_from_slice(&reply);
            if stream.write_all(&out).await.is_err() {
                return;
            }
        }
    }
}

fn name(s: &str) -> Name {
    if s.is_empty() || s == "." {
        return Name::root();
    }
    let mut n = Name::from_ascii(s).unwrap();
    n.set_fqdn(true);
    n
}

/// The encoded response to one query, or None to stay silent.
fn answer(bytes: &[u8], state: &Mutex<State>) -> Option<Vec<u8>> {
    let req = Message::from_vec(bytes).ok()?;
    let query = req.queries.first()?.clone();
    let qname = key(&query.name.to_ascii());
    let qtype = query.query_type;
    let node = {
        let mut st = state.lock().unwrap();
        st.log.push((qname.clone(), qtype));
        st.zone.get(&qname).cloned()
    };
    let mut resp = Message::response(req.metadata.id, OpCode::Query);
    resp.add_query(query.clone());
    resp.metadata.authoritative = true;
    resp.metadata.recursion_desired = req.metadata.recursion_desired;
    resp.metadata.recursion_available = true;
    if req.edns.is_some() {
        let mut edns = Edns::new();
        edns.set_max_payload(1232);
        resp.set_edns(edns);
    }
    match node {
        None => resp.metadata.response_code = ResponseCode::NXDomain,
        Some(n) if n.silent => return None,
        Some(n) if n.servfail => resp.metadata.response_code = ResponseCode::ServFail,
        Some(n) => {
            // The owner name is echoed as asked (resolvers may randomise its case).
            let owner = query.name.clone();
            let records: Vec<Record> = match qtype {
                RecordType::MX => {
                    n.mx.iter()
                        .map(|(p, x, ttl)| {
                            Record::from_rdata(owner.clone(), *ttl, RData::MX(MX::new(*p, name(x))))
                        })
                        .collect()
                }
                RecordType::A => {
                    n.a.iter()
                        .map(|(ip, ttl)| Record::from_rdata(owner.clone(), *ttl, RData::A(A(*ip))))
                        .collect()
                }
                RecordType::AAAA => n
                    .aaaa
                    .iter()
                    .map(|(ip, ttl)| {
                        Record::from_rdata(owner.clone(), *ttl, RData::AAAA(AAAA(*ip)))
                    })
                    .collect(),
                _ => Vec::new(),
            };
            resp.add_answers(records);
        }
    }
    resp.to_vec().ok()
}
