//! Test support: a scripted SMTP server on loopback that records, from the server's side,
//! exactly what a client sent (every command, which commands arrived in the same read, each
//! message body, whether the client said QUIT) and answers as a test tells it to.
//!
//! The judge in bulksend's tests is what this server saw, never the client's own view.
#![allow(clippy::unwrap_used, unreachable_pub)]

pub mod dns;
pub mod postfix;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket};
use tokio::task::JoinHandle;

/// What the server does in answer to a command (or the greeting, or the final dot).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Send this reply; lines separated by "\n", CRLF added.
    Reply(String),
    /// Send nothing and keep reading (the client's timeout must fire).
    Stall,
    /// Send nothing and stop reading too (so the client's writes block once buffers fill).
    StallRead,
    /// Close the connection at once.
    Close,
    /// Send these bytes exactly.
    Raw(Vec<u8>),
}

pub fn reply(s: &str) -> Action {
    Action::Reply(s.to_owned())
}

/// What one connection looked like from the server's side.
#[derive(Clone, Debug, Default)]
pub struct ConnLog {
    /// Every command line received, in order (without CRLF).
    pub commands: Vec<String>,
    /// The commands grouped by the socket read that delivered them.
    pub batches: Vec<Vec<String>>,
    /// Message bodies received (dot-unstuffed, terminator removed).
    pub messages: Vec<Vec<u8>>,
    /// The client sent QUIT.
    pub quit: bool,
    /// The connection was upgraded with STARTTLS.
    pub tls: bool,
    /// The client closed the connection (EOF or error) rather than the server.
    pub client_closed: bool,
    /// For each message: the command lines that had arrived behind its final dot when the
    /// server replied to it (sent by the client without waiting for that reply).
    pub behind_dot: Vec<Vec<String>>,
}

impl ConnLog {
    /// Commands whose verb (first word, upper-cased) is `verb`.
    pub fn count(&self, verb: &str) -> usize {
        self.commands.iter().filter(|c| verb_of(c) == verb).count()
    }
}

fn verb_of(cmd: &str) -> String {
    let up = cmd.to_ascii_uppercase();
    if up.starts_with("MAIL FROM") {
        return "MAIL".into();
    }
    if up.starts_with("RCPT TO") {
        return "RCPT".into();
    }
    up.split_whitespace().next().unwrap_or("").to_owned()
}

type Handler = dyn Fn(&Ctx<'_>) -> Option<Action> + Send + Sync;

/// What a handler sees.
pub struct Ctx<'a> {
    /// The command line, or "<GREETING>" or "<DOT>".
    pub line: &'a str,
    /// Upper-case verb ("MAIL", "RCPT", "DATA", ...).
    pub verb: String,
    /// Index of this connection (0-based), for scripts that change over time.
    pub conn: usize,
    /// Messages completed on this connection so far (for "<DOT>": including this one).
    pub messages: usize,
    /// The body, for "<DOT>".
    pub body: Option<&'a [u8]>,
}

/// How the server behaves. Defaults: a well-behaved ESMTP server with PIPELINING,
/// ENHANCEDSTATUSCODES and 8BITMIME that accepts everything.
#[derive(Clone)]
pub struct Script {
    pub extensions: Vec<String>,
    /// Called first for every event; `None` falls back to the default behaviour.
    pub handler: Arc<Handler>,
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// Small receive buffer (bytes) on accepted sockets, to make data-block timing observable.
    pub recv_buffer: Option<u32>,
    /// While receiving data: pause this long after each read of up to `trickle_chunk` bytes.
    pub trickle: Option<(Duration, usize)>,
    /// Before replying to the dot of each of the first this many messages of a connection,
    /// wait (up to 5 s) until a DATA command has arrived behind it: a client that does not
    /// pipeline the next envelope behind the dot waits those 5 s.
    pub hold_dot_reply: usize,
}

impl Default for Script {
    fn default() -> Self {
        Script {
            extensions: vec![
                "PIPELINING".into(),
                "SIZE 52428800".into(),
                "8BITMIME".into(),
                "ENHANCEDSTATUSCODES".into(),
                "SMTPUTF8".into(),
            ],
            handler: Arc::new(|_| None),
            tls: None,
            recv_buffer: None,
            trickle: None,
            hold_dot_reply: 0,
        }
    }
}

impl Script {
    pub fn with_handler(
        mut self,
        f: impl Fn(&Ctx<'_>) -> Option<Action> + Send + Sync + 'static,
    ) -> Self {
        self.handler = Arc::new(f);
        self
    }
    pub fn without(mut self, ext: &str) -> Self {
        self.extensions.retain(|e| !e.starts_with(ext));
        self
    }
    pub fn holding_dot_reply(mut self, messages: usize) -> Self {
        self.hold_dot_reply = messages;
        self
    }
    pub fn with_ext(mut self, ext: &str) -> Self {
        self.extensions.push(ext.to_owned());
        self
    }
}

/// A running scripted server. Stops when dropped.
pub struct ScriptedServer {
    pub addr: SocketAddr,
    log: Arc<Mutex<Vec<Arc<Mutex<ConnLog>>>>>,
    /// Connections open now, and the most open at once.
    active: Arc<AtomicUsize>,
    max_active: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl Drop for ScriptedServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl ScriptedServer {
    pub async fn start(script: Script) -> ScriptedServer {
        Self::start_on("127.0.0.1:0".parse().unwrap(), script).await
    }

    pub async fn start_on(addr: SocketAddr, script: Script) -> ScriptedServer {
        let socket = TcpSocket::new_v4().unwrap();
        socket.set_reuseaddr(true).unwrap();
        if let Some(n) = script.recv_buffer {
            socket.set_recv_buffer_size(n).unwrap();
        }
        socket.bind(addr).unwrap();
        let listener: TcpListener = socket.listen(128).unwrap();
        let addr = listener.local_addr().unwrap();
        let log: Arc<Mutex<Vec<Arc<Mutex<ConnLog>>>>> = Arc::default();
        let log2 = log.clone();
        let active = Arc::new(AtomicUsize::new(0));
        let max_active = Arc::new(AtomicUsize::new(0));
        let (a2, m2) = (active.clone(), max_active.clone());
        let task = tokio::spawn(async move {
            let mut n = 0;
            while let Ok((stream, _)) = listener.accept().await {
                let conn_log = Arc::new(Mutex::new(ConnLog::default()));
                log2.lock().unwrap().push(conn_log.clone());
                let script = script.clone();
                let conn = n;
                n += 1;
                let now = a2.fetch_add(1, Ordering::SeqCst) + 1;
                m2.fetch_max(now, Ordering::SeqCst);
                let a3 = a2.clone();
                tokio::spawn(async move {
                    let _ = serve(Box::new(stream), script, conn, conn_log).await;
                    a3.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        ScriptedServer {
            addr,
            log,
            active,
            max_active,
            task,
        }
    }

    /// The most connections that were open at the same time.
    pub fn max_concurrent(&self) -> usize {
        self.max_active.load(Ordering::SeqCst)
    }

    /// Connections open now.
    pub fn open_connections(&self) -> usize {
        self.active.load(Ordering::SeqCst)
    }

    /// Every message body received, over all connections.
    pub fn messages(&self) -> Vec<Vec<u8>> {
        self.connections()
            .into_iter()
            .flat_map(|c| c.messages)
            .collect()
    }

    /// Every command received, over all connections.
    pub fn commands(&self) -> Vec<String> {
        self.connections()
            .into_iter()
            .flat_map(|c| c.commands)
            .collect()
    }

    /// A snapshot of every connection so far.
    pub fn connections(&self) -> Vec<ConnLog> {
        self.log
            .lock()
            .unwrap()
            .iter()
            .map(|c| c.lock().unwrap().clone())
            .collect()
    }

    /// Waits (bounded) until `n` connections have ended, then returns the logs.
    pub async fn wait_closed(&self, n: usize) -> Vec<ConnLog> {
        for _ in 0..500 {
            let conns = self.connections();
            if conns.iter().filter(|c| c.client_closed || c.quit).count() >= n {
                // Give the connection task a moment to record the EOF after QUIT.
                tokio::time::sleep(Duration::from_millis(20)).await;
                return self.connections();
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self.connections()
    }
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

async fn serve(
    mut stream: Box<dyn Io>,
    script: Script,
    conn: usize,
    log: Arc<Mutex<ConnLog>>,
) -> std::io::Result<()> {
    let ctx = |line: &str, messages: usize, body: Option<&[u8]>| -> Option<Action> {
        (script.handler)(&Ctx {
            line,
            verb: verb_of(line),
            conn,
            messages,
            body,
        })
    };
    let mut messages = 0;
    let greeting = ctx("<GREETING>", 0, None).unwrap_or(reply("220 scripted.test ESMTP"));
    match act(&mut stream, &greeting).await? {
        Flow::Go => {}
        Flow::Stop => return Ok(()),
        Flow::StallRead => return hold(stream).await,
        Flow::Stall => {}
    }
    let mut buf: Vec<u8> = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    // After a Stall the server answers nothing more (it keeps reading and logging).
    let mut stalled = false;
    // RCPTs accepted in the current transaction: DATA without any gets 554, as Postfix does.
    let mut rcpt_ok = 0usize;
    loop {
        // One socket read = one batch.
        let n = match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => {
                log.lock().unwrap().client_closed = true;
                return Ok(());
            }
            Ok(n) => n,
        };
        buf.extend_from_slice(&chunk[..n]);
        let mut batch = Vec::new();
        while let Some(pos) = buf.windows(2).position(|w| w == b"\r\n") {
            let line = String::from_utf8_lossy(&buf[..pos]).into_owned();
            buf.drain(..pos + 2);
            batch.push(line.clone());
            {
                let mut l = log.lock().unwrap();
                l.commands.push(line.clone());
            }
            let verb = verb_of(&line);
            if stalled {
                continue;
            }
            let action = match ctx(&line, messages, None) {
                Some(a) => a,
                None if verb == "DATA" && rcpt_ok == 0 => {
                    reply("554 5.5.1 Error: no valid recipients")
                }
                None => default_action(&verb, &script),
            };
            match (verb.as_str(), &action) {
                ("RCPT", Action::Reply(r)) if r.starts_with('2') => rcpt_ok += 1,
                ("MAIL" | "RSET", _) => rcpt_ok = 0,
                _ => {}
            }
            if verb == "QUIT" {
                log.lock().unwrap().quit = true;
            }
            let flow = act(&mut stream, &action).await?;
            match flow {
                Flow::Stop => {
                    push_batch(&log, &mut batch);
                    return Ok(());
                }
                Flow::StallRead => {
                    push_batch(&log, &mut batch);
                    return hold(stream).await;
                }
                Flow::Stall => stalled = true,
                Flow::Go => {}
            }
            if verb == "QUIT" && flow == Flow::Go {
                push_batch(&log, &mut batch);
                let _ = stream.shutdown().await;
                // Read until the client closes so client_closed is recorded.
                let _ = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut chunk)).await;
                log.lock().unwrap().client_closed = true;
                return Ok(());
            }
            if verb == "STARTTLS" && flow == Flow::Go {
                if let (Some(cfg), Action::Reply(r)) = (&script.tls, &action) {
                    if r.starts_with("220") {
                        push_batch(&log, &mut batch);
                        let acceptor = tokio_rustls::TlsAcceptor::from(cfg.clone());
                        let tls = acceptor.accept(stream).await?;
                        log.lock().unwrap().tls = true;
                        stream = Box::new(tls);
                        buf.clear();
                        break;
                    }
                }
            }
            if verb == "DATA" && matches!(&action, Action::Reply(r) if r.starts_with("354")) {
                push_batch(&log, &mut batch);
                let body = read_data(&mut stream, &mut buf, &script).await?;
                if messages < script.hold_dot_reply {
                    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
                    while find(&buf, b"DATA\r\n").is_none() {
                        match tokio::time::timeout_at(deadline, stream.read(&mut chunk)).await {
                            Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&chunk[..n]),
                            _ => break,
                        }
                    }
                }
                let behind: Vec<String> = String::from_utf8_lossy(&buf)
                    .split_inclusive("\r\n")
                    .filter_map(|l| l.strip_suffix("\r\n").map(str::to_owned))
                    .collect();
                log.lock().unwrap().behind_dot.push(behind);
                messages += 1;
                rcpt_ok = 0;
                log.lock().unwrap().messages.push(body.clone());
                let action =
                    ctx("<DOT>", messages, Some(&body)).unwrap_or(reply("250 2.0.0 Ok: queued"));
                match act(&mut stream, &action).await? {
                    Flow::Stop => return Ok(()),
                    Flow::StallRead => return hold(stream).await,
                    Flow::Stall => stalled = true,
                    Flow::Go => {}
                }
            }
        }
        push_batch(&log, &mut batch);
    }
}

fn push_batch(log: &Arc<Mutex<ConnLog>>, batch: &mut Vec<String>) {
    if !batch.is_empty() {
        log.lock().unwrap().batches.push(std::mem::take(batch));
    }
}

fn default_action(verb: &str, script: &Script) -> Action {
    match verb {
        "EHLO" => {
            let mut lines = vec!["250-scripted.test".to_owned()];
            let mut ext = script.extensions.clone();
            if script.tls.is_some() {
                ext.push("STARTTLS".into());
            }
            for e in &ext {
                lines.push(format!("250-{e}"));
            }
            let last = lines.pop().unwrap().replacen("250-", "250 ", 1);
            lines.push(last);
            Action::Reply(lines.join("\n"))
        }
        "HELO" => reply("250 scripted.test"),
        "MAIL" => reply("250 2.1.0 Ok"),
        "RCPT" => reply("250 2.1.5 Ok"),
        "DATA" => reply("354 End data with <CR><LF>.<CR><LF>"),
        "RSET" => reply("250 2.0.0 Ok"),
        "NOOP" => reply("250 2.0.0 Ok"),
        "STARTTLS" if script.tls.is_some() => reply("220 2.0.0 Ready to start TLS"),
        "QUIT" => reply("221 2.0.0 Bye"),
        _ => reply("502 5.5.2 Error: command not recognized"),
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Flow {
    Go,
    Stall,
    StallRead,
    Stop,
}

async fn act(stream: &mut Box<dyn Io>, action: &Action) -> std::io::Result<Flow> {
    match action {
        Action::Reply(text) => {
            let mut out = text.replace('\n', "\r\n");
            out.push_str("\r\n");
            stream.write_all(out.as_bytes()).await?;
            stream.flush().await?;
            Ok(Flow::Go)
        }
        Action::Raw(bytes) => {
            stream.write_all(bytes).await?;
            stream.flush().await?;
            Ok(Flow::Go)
        }
        Action::Stall => Ok(Flow::Stall),
        Action::StallRead => Ok(Flow::StallRead),
        Action::Close => Ok(Flow::Stop),
    }
}

/// Keeps the connection open without reading, until the client goes or 60 s pass.
async fn hold(_stream: Box<dyn Io>) -> std::io::Result<()> {
    tokio::time::sleep(Duration::from_secs(60)).await;
    Ok(())
}

/// Reads message data up to CRLF.CRLF, un-stuffing it. `buf` holds bytes already read.
async fn read_data(
    stream: &mut Box<dyn Io>,
    buf: &mut Vec<u8>,
    script: &Script,
) -> std::io::Result<Vec<u8>> {
    let mut data = std::mem::take(buf);
    let chunk_len = script.trickle.map_or(256 * 1024, |(_, n)| n);
    let mut chunk = vec![0u8; chunk_len];
    // Where to resume the search for the terminator (keeps this linear in the data size).
    let mut searched = 0;
    loop {
        if data.starts_with(b".\r\n") {
            let rest = data.split_off(3);
            *buf = rest;
            return Ok(Vec::new());
        }
        if let Some(pos) = find(&data[searched..], b"\r\n.\r\n").map(|p| p + searched) {
            let rest = data.split_off(pos + 5);
            *buf = rest;
            data.truncate(pos + 2);
            return Ok(unstuff(&data));
        }
        if let Some((pause, _)) = script.trickle {
            tokio::time::sleep(pause).await;
        }
        searched = data.len().saturating_sub(4);
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        data.extend_from_slice(&chunk[..n]);
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn unstuff(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len());
    let mut start = true;
    for &b in data {
        if start && b == b'.' {
            start = false;
            continue;
        }
        start = b == b'\n';
        out.push(b);
    }
    out
}

/// A CA and a server certificate for "mx.test" / 127.0.0.1 signed by it (rcgen), for
/// STARTTLS tests.
pub struct TestPki {
    pub ca_pem: String,
    pub server_config: Arc<rustls::ServerConfig>,
}

impl TestPki {
    pub fn new() -> TestPki {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "bulksend test CA");
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let key = KeyPair::generate().unwrap();
        let params =
            CertificateParams::new(vec!["mx.test".to_owned(), "127.0.0.1".to_owned()]).unwrap();
        let cert = params.signed_by(&key, &ca, &ca_key).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let server_config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![cert.der().clone()],
                rustls_pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
            )
            .unwrap();
        TestPki {
            ca_pem: ca.pem(),
            server_config: Arc::new(server_config),
        }
    }
}

impl Default for TestPki {
    fn default() -> Self {
        Self::new()
    }
}
