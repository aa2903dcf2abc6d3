//! The SMTP client session on tokio: one TCP (optionally TLS) connection to one server,
//! carrying one or more transactions.
//!
//! Rules this file enforces (DESIGN.md, RFC 5321, RFC 2920):
//! - Every command's reply has its own deadline, computed once from that phase's configured
//!   timeout and held across the write and every read of the reply (`timeout_at`), so a server
//!   that trickles bytes cannot stretch it. Data is written in blocks, each with its own
//!   deadline, so the budget grows with the message size.
//! - With PIPELINING, RSET (if needed) + MAIL + every RCPT + DATA go out in one write and the
//!   replies are read in order; without it, lock-step.
//! - With PIPELINING, the next transaction's envelope may go out in the same write as this
//!   one's final dot (RFC 2920 §3.1: content may open a group), only when every recipient of
//!   this one was accepted; its replies are read after the dot's, and it must then be the
//!   session's next transaction ([`Session::transact`]).
//! - After the final dot the client waits the full DATA-termination timeout. A timeout or a
//!   lost connection there is [`RcptResult::Unknown`]: possibly delivered (RFC 5321 §6.1).
//! - A session ends through [`Session::close`], which sends QUIT and waits for the 221 whenever
//!   the connection can still carry a command. A 421, a timeout, an I/O error or a failure in
//!   the middle of the data leave no such connection, and those end without QUIT.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bulksend_config::{SmtpSettings, Timeouts, TlsPolicy};
use bytes::{Buf, BytesMut};
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::{timeout_at, Instant};
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use super::command::{Address, Command, MailParams, Phase};
use super::data::MessageData;
use super::ext::Extensions;
use super::reply::{parse_reply, Parsed, Reply, ReplyError};
use super::tls::{TlsConfigs, TlsSetupError};

/// Size of one data block write (RFC 5321 §4.5.3.2.5 times each one).
pub const DATA_BLOCK: usize = 64 * 1024;

/// What a session needs to know, built once from the settings and shared.
#[derive(Clone, Debug)]
pub struct ClientSettings {
    pub helo_name: String,
    pub timeouts: Timeouts,
    pub tls: TlsPolicy,
    pub tls_configs: TlsConfigs,
}

impl ClientSettings {
    pub fn from_config(smtp: &SmtpSettings) -> Result<ClientSettings, TlsSetupError> {
        Ok(ClientSettings {
            helo_name: smtp.helo_name.clone(),
            timeouts: smtp.timeouts.clone(),
            tls: smtp.tls,
            tls_configs: TlsConfigs::new(smtp.tls_ca_file.as_deref())?,
        })
    }
}

/// Why a session (or the connection attempt) ended. `Clone` so that one error can be the
/// outcome of every recipient it affected.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SessionError {
    #[error("connect to {peer} failed: {detail}")]
    Connect { peer: SocketAddr, detail: String },
    #[error("timeout after {} in {phase}", humanize(*.after))]
    Timeout { phase: Phase, after: Duration },
    #[error("I/O error in {phase}: {detail}")]
    Io { phase: Phase, detail: String },
    #[error("connection closed by the server in {phase}")]
    Closed { phase: Phase },
    #[error("protocol error in {phase}: {source}")]
    Protocol { phase: Phase, source: ReplyError },
    #[error("unexpected reply in {phase}: {reply}")]
    Unexpected { phase: Phase, reply: Reply },
    #[error("server is closing the connection in {phase}: {reply}")]
    ServerClosing { phase: Phase, reply: Reply },
    #[error("{phase} refused: {reply}")]
    Refused { phase: Phase, reply: Reply },
    #[error("TLS handshake failed: {detail}")]
    Tls { detail: String },
    #[error("TLS is required but the server does not offer STARTTLS")]
    TlsNotOffered,
}

impl SessionError {
    pub fn phase(&self) -> Phase {
        match self {
            SessionError::Connect { .. } => Phase::Connect,
            SessionError::Timeout { phase, .. }
            | SessionError::Io { phase, .. }
            | SessionError::Closed { phase }
            | SessionError::Protocol { phase, .. }
            | SessionError::Unexpected { phase, .. }
            | SessionError::ServerClosing { phase, .. }
            | SessionError::Refused { phase, .. } => *phase,
            SessionError::Tls { .. } | SessionError::TlsNotOffered => Phase::StartTls,
        }
    }

    /// The server's reply, when the error is one.
    pub fn reply(&self) -> Option<&Reply> {
        match self {
            SessionError::Unexpected { reply, .. }
            | SessionError::ServerClosing { reply, .. }
            | SessionError::Refused { reply, .. } => Some(reply),
            _ => None,
        }
    }

    /// Whether a QUIT can still be sent afterwards: the connection is up and the client and
    /// server agree on where the dialogue is.
    fn allows_quit(&self) -> bool {
        match self {
            SessionError::Refused { .. }
            | SessionError::Unexpected { .. }
            | SessionError::Protocol { .. }
            | SessionError::TlsNotOffered => true,
            SessionError::Connect { .. }
            | SessionError::Timeout { .. }
            | SessionError::Io { .. }
            | SessionError::Closed { .. }
            | SessionError::ServerClosing { .. }
            | SessionError::Tls { .. } => false,
        }
    }
}

fn humanize(d: Duration) -> String {
    format!("{:.3}s", d.as_secs_f64())
}

/// The fate of one recipient in one transaction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RcptResult {
    /// 2xx after the dot.
    Delivered(Reply),
    /// 5xx in `phase` (MAIL, RCPT, DATA or after the dot).
    Rejected { phase: Phase, reply: Reply },
    /// 4xx in `phase`: try again later.
    Deferred { phase: Phase, reply: Reply },
    /// The connection failed before the end of the data: not delivered, try again.
    Failed(SessionError),
    /// The data was sent but no reply to the dot came (timeout or lost connection): possibly
    /// delivered (RFC 5321 §6.1). Retrying risks a duplicate; dropping risks a loss.
    Unknown(SessionError),
    /// Not attempted because this server cannot take it (SIZE limit, no SMTPUTF8). Permanent
    /// for this server.
    NotAttempted { reason: String },
}

/// The outcome of [`Session::send`]: one result per recipient, in the order given.
#[derive(Clone, Debug)]
pub struct Transaction {
    pub recipients: Vec<RcptResult>,
    /// Set when the session cannot carry another transaction; the caller should
    /// [`Session::close`] it (which QUITs only when that is still possible).
    pub ended: Option<SessionError>,
}

impl Transaction {
    fn all(n: usize, r: RcptResult, ended: Option<SessionError>) -> Transaction {
        Transaction {
            recipients: vec![r; n],
            ended,
        }
    }
}

/// The envelope of one transaction on one session: MAIL, RCPT…, DATA (see
/// [`Session::envelope`] and [`Session::transact`]).
#[derive(Debug)]
pub struct Envelope {
    cmds: Vec<Command>,
    /// Recipients.
    n: usize,
    /// Written behind the previous transaction's dot; its replies are due.
    sent: bool,
}

impl Envelope {
    /// Whether it went out behind the previous transaction's data: then it must be the
    /// session's next transaction.
    pub fn is_sent(&self) -> bool {
        self.sent
    }

    fn encode(&self) -> Vec<u8> {
        encode_all(&self.cmds)
    }
}

/// Commands as they go on the wire, one after the other (a pipelined group).
fn encode_all(cmds: &[Command]) -> Vec<u8> {
    let mut wire = Vec::with_capacity(cmds.len() * 40);
    for c in cmds {
        c.encode(&mut wire);
    }
    wire
}

enum Stream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
    /// Only while the TCP stream is handed to the TLS handshake; every operation fails.
    Detached,
}

fn detached() -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::NotConnected, "stream detached")
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            Stream::Detached => Poll::Ready(Err(detached())),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            Stream::Detached => Poll::Ready(Err(detached())),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
            Stream::Detached => Poll::Ready(Err(detached())),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            Stream::Detached => Poll::Ready(Ok(())),
        }
    }
}

/// Whether the connection can carry another command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Link {
    /// In sync and idle: another transaction, or QUIT.
    Ready,
    /// Unusable for mail, but QUIT may still be sent (after a refusal or garbage reply).
    QuitOnly,
    /// Gone or out of sync (timeout, I/O error, 421, failure mid-data): close without QUIT.
    Dead,
}

/// An open SMTP session.
pub struct Session {
    stream: Stream,
    /// One persistent read buffer; replies are parsed out of it in place.
    buf: BytesMut,
    peer: SocketAddr,
    settings: Arc<ClientSettings>,
    greeting: Reply,
    ext: Extensions,
    tls: bool,
    link: Link,
    /// MAIL was accepted but the transaction did not complete: RSET before the next one.
    needs_rset: bool,
    transactions: usize,
    /// An envelope went out behind the last dot and its replies are due: the next
    /// transaction must be that one (see [`Session::transact`]).
    ahead: bool,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("peer", &self.peer)
            .field("ext", &self.ext)
            .field("tls", &self.tls)
            .field("link", &self.link)
            .field("transactions", &self.transactions)
            .field("ahead", &self.ahead)
            .finish()
    }
}

impl Session {
    /// Connects, reads the greeting, says EHLO (HELO if EHLO is refused with 5xx), and
    /// negotiates STARTTLS per policy. `server_name` is the MX host name, for TLS.
    pub async fn connect(
        peer: SocketAddr,
        server_name: &str,
        settings: Arc<ClientSettings>,
    ) -> Result<Session, SessionError> {
        match Self::connect_once(peer, server_name, settings.clone(), settings.tls).await {
            // Opportunistic TLS whose handshake failed: the connection is gone, so try once
            // more in clear, as Postfix's `may` level does.
            Err(SessionError::Tls { detail }) if settings.tls == TlsPolicy::Opportunistic => {
                tracing::info!(%peer, %detail, "STARTTLS handshake failed; retrying without TLS");
                Self::connect_once(peer, server_name, settings, TlsPolicy::Disabled).await
            }
            other => other,
        }
    }

    async fn connect_once(
        peer: SocketAddr,
        server_name: &str,
        settings: Arc<ClientSettings>,
        tls: TlsPolicy,
    ) -> Result<Session, SessionError> {
        let t = &settings.timeouts;
        let started = Instant::now();
        let deadline = started + t.connect;
        let tcp = match timeout_at(deadline, TcpStream::connect(peer)).await {
            Ok(Ok(tcp)) => {
                metrics::histogram!(crate::metrics::SMTP_PHASE_SECONDS, "phase" => "connect")
                    .record(started.elapsed().as_secs_f64());
                tcp
            }
            Ok(Err(e)) => {
                return Err(SessionError::Connect {
                    peer,
                    detail: e.to_string(),
                })
            }
            Err(_) => {
                return Err(SessionError::Timeout {
                    phase: Phase::Connect,
                    after: t.connect,
                })
            }
        };
        // Commands are written whole; Nagle would only delay them.
        let _ = tcp.set_nodelay(true);
        let mut session = Session {
            stream: Stream::Plain(tcp),
            buf: BytesMut::with_capacity(4096),
            peer,
            settings: settings.clone(),
            greeting: Reply::new(220, ""),
            ext: Extensions::default(),
            tls: false,
            link: Link::Ready,
            needs_rset: false,
            transactions: 0,
            ahead: false,
        };
        match session.handshake(server_name, tls).await {
            Ok(()) => Ok(session),
            Err(e) => {
                session.link = if e.allows_quit() {
                    Link::QuitOnly
                } else {
                    Link::Dead
                };
                session.close().await;
                Err(e)
            }
        }
    }

    async fn handshake(&mut self, server_name: &str, tls: TlsPolicy) -> Result<(), SessionError> {
        let greeting = self
            .read_reply(Phase::Greeting, self.deadline(Phase::Greeting))
            .await?;
        if greeting.code != 220 {
            return Err(refusal(Phase::Greeting, greeting));
        }
        self.greeting = greeting;
        self.ehlo(true).await?;
        if tls == TlsPolicy::Disabled {
            return Ok(());
        }
        if !self.ext.starttls {
            return match tls {
                TlsPolicy::Required => Err(SessionError::TlsNotOffered),
                _ => Ok(()),
            };
        }
        let reply = self.command(&Command::StartTls).await?;
        if reply.code != 220 {
            return match tls {
                TlsPolicy::Required => Err(refusal(Phase::StartTls, reply)),
                // Still in sync and in clear: carry on without TLS.
                _ => Ok(()),
            };
        }
        self.start_tls(server_name, tls).await?;
        // RFC 3207 §4.2: forget what was learnt before TLS and say EHLO again.
        self.ehlo(false).await
    }

    async fn ehlo(&mut self, helo_fallback: bool) -> Result<(), SessionError> {
        let name = self.settings.helo_name.clone();
        let reply = self.command(&Command::Ehlo(name.clone())).await?;
        if reply.code == 250 {
            self.ext = Extensions::from_ehlo(&reply);
            return Ok(());
        }
        if !(helo_fallback && reply.is_permanent()) {
            return Err(refusal(Phase::Ehlo, reply));
        }
        let reply = self.command(&Command::Helo(name)).await?;
        if reply.code != 250 {
            return Err(refusal(Phase::Ehlo, reply));
        }
        self.ext = Extensions::default();
        Ok(())
    }

    async fn start_tls(&mut self, server_name: &str, tls: TlsPolicy) -> Result<(), SessionError> {
        let config = match tls {
            TlsPolicy::Required => self.settings.tls_configs.verified.clone(),
            _ => self.settings.tls_configs.unverified.clone(),
        };
        let name = ServerName::try_from(server_name.to_owned()).map_err(|e| SessionError::Tls {
            detail: format!("bad server name {server_name:?}: {e}"),
        })?;
        // Anything the server sent after its 220 would be a plaintext injection (CVE-2011-0411
        // class): refuse to carry it into the TLS session.
        if !self.buf.is_empty() {
            return Err(SessionError::Protocol {
                phase: Phase::StartTls,
                source: ReplyError::BadCode("data after STARTTLS reply".into()),
            });
        }
        let Stream::Plain(tcp) = std::mem::replace(&mut self.stream, Stream::Detached) else {
            return Err(SessionError::Tls {
                detail: "STARTTLS on a TLS session".into(),
            });
        };
        let deadline = self.deadline(Phase::StartTls);
        let connector = TlsConnector::from(config);
        match timeout_at(deadline, connector.connect(name, tcp)).await {
            Ok(Ok(tls)) => {
                self.stream = Stream::Tls(Box::new(tls));
                self.tls = true;
                Ok(())
            }
            Ok(Err(e)) => Err(SessionError::Tls {
                detail: e.to_string(),
            }),
            Err(_) => Err(SessionError::Timeout {
                phase: Phase::StartTls,
                after: self.settings.timeouts.starttls,
            }),
        }
    }

    pub fn peer(&self) -> SocketAddr {
        self.peer
    }
    pub fn extensions(&self) -> &Extensions {
        &self.ext
    }
    pub fn greeting(&self) -> &Reply {
        &self.greeting
    }
    pub fn is_tls(&self) -> bool {
        self.tls
    }
    /// Transactions attempted on this connection.
    pub fn transactions(&self) -> usize {
        self.transactions
    }
    /// Can carry another transaction.
    pub fn is_usable(&self) -> bool {
        self.link == Link::Ready
    }

    /// Before reusing an idle connection: has the server closed it, or said something
    /// unprompted (typically "421 4.4.2 idle timeout")? Polls the socket once without
    /// waiting. A stale session is marked dead, so [`Session::close`] sends nothing.
    pub async fn probe_stale(&mut self) -> bool {
        if self.link != Link::Ready {
            return true;
        }
        if self.ahead {
            // Replies to the envelope sent ahead are due; they are not unprompted.
            return false;
        }
        if self.buf.is_empty() {
            self.buf.reserve(512);
            // Poll the read exactly once (`read_buf` is cancel-safe). Not with a zero
            // `tokio::time::timeout`: tokio rounds its deadline up to the next millisecond
            // tick, so that cost up to a millisecond per transaction, more than a pipelined
            // transaction on loopback takes (BENCHMARKS.md, SMTP, "Sixth session").
            let mut read = std::pin::pin!(self.stream.read_buf(&mut self.buf));
            match std::future::poll_fn(|cx| Poll::Ready(Future::poll(read.as_mut(), cx))).await {
                Poll::Pending => return false,
                Poll::Ready(Ok(n)) if n > 0 => {}
                Poll::Ready(_) => {
                    self.link = Link::Dead;
                    return true;
                }
            }
        }
        tracing::debug!(peer = %self.peer, "pooled connection went stale");
        self.link = Link::Dead;
        true
    }

    /// Sends one message to `recipients` (one transaction). Returns a result for every
    /// recipient, in order. Call only while [`Session::is_usable`].
    pub async fn send(
        &mut self,
        sender: Option<&Address>,
        recipients: &[Address],
        data: &MessageData,
    ) -> Transaction {
        match self.envelope(sender, recipients, data) {
            Ok(env) => self.transact(env, data, None).await.0,
            Err(tx) => tx,
        }
    }

    /// The envelope (MAIL, RCPT…, DATA) of a message to `recipients` on this session, or, when
    /// this server cannot take the message (SIZE limit, no SMTPUTF8), the transaction's result
    /// without any I/O.
    pub fn envelope(
        &self,
        sender: Option<&Address>,
        recipients: &[Address],
        data: &MessageData,
    ) -> Result<Envelope, Transaction> {
        let n = recipients.len();
        if let Some(limit) = self.ext.size_limit() {
            if data.size as u64 > limit {
                let reason = format!(
                    "message is {} octets; the server's SIZE limit is {limit}",
                    data.size
                );
                return Err(Transaction::all(
                    n,
                    RcptResult::NotAttempted { reason },
                    None,
                ));
            }
        }
        let smtputf8 =
            sender.is_some_and(Address::is_utf8) || recipients.iter().any(Address::is_utf8);
        if smtputf8 && !self.ext.smtputf8 {
            let reason = "an address needs SMTPUTF8, which the server does not offer".to_owned();
            return Err(Transaction::all(
                n,
                RcptResult::NotAttempted { reason },
                None,
            ));
        }
        let params = MailParams {
            size: self.ext.size.map(|_| data.size),
            eight_bit: data.eight_bit && self.ext.eight_bit_mime,
            smtputf8,
        };
        let mut cmds = Vec::with_capacity(n + 2);
        cmds.push(Command::MailFrom(sender.cloned(), params));
        cmds.extend(recipients.iter().cloned().map(Command::RcptTo));
        cmds.push(Command::Data);
        Ok(Envelope {
            cmds,
            n,
            sent: false,
        })
    }

    /// Carries one transaction: `env` is either new (built by [`Session::envelope`]) or the
    /// one the previous call on this session returned as sent ahead.
    ///
    /// `next`, when given, is the envelope of the message this connection carries after this
    /// one. With PIPELINING it goes out in the same write as this message's final dot (RFC
    /// 2920 §3.1: message content may be the first "command" of a group, and a group may
    /// end with DATA), so a reused connection needs one round trip per message instead of
    /// two. It is sent only when every recipient of this transaction was accepted and the
    /// body is being sent; the envelope comes back (with [`Envelope::is_sent`]) only when the
    /// reply to this dot left the session usable: then its replies are on their way and it
    /// must be this session's next transaction. Otherwise `None`: nothing of it reached a
    /// server that will act on it, and the message can go anywhere, as if never tried.
    pub async fn transact(
        &mut self,
        env: Envelope,
        data: &MessageData,
        next: Option<Envelope>,
    ) -> (Transaction, Option<Envelope>) {
        let n = env.n;
        let ahead = std::mem::take(&mut self.ahead);
        if self.link != Link::Ready || env.sent != ahead {
            // A sent-ahead envelope must be the next transaction; anything else is out of
            // step with what the server has been sent.
            if ahead || env.sent {
                self.link = Link::Dead;
            }
            let e = SessionError::Closed { phase: Phase::Mail };
            return (
                Transaction::all(n, RcptResult::Failed(e.clone()), Some(e)),
                None,
            );
        }
        let mut cmds = env.cmds;
        if !env.sent {
            self.transactions += 1;
            if self.needs_rset {
                cmds.insert(0, Command::Rset);
            }
        }
        let next = next.filter(|_| self.ext.pipelining);
        let mut slots = vec![Slot::Waiting; n];
        let mut sent_next = None;
        let ended = match self.exchange_envelope(&cmds, &mut slots, env.sent).await {
            Err(e) => Some(e),
            Ok(false) => None,
            Ok(true) => match self.data(&data.wire, &mut slots, next).await {
                Ok(sent) => {
                    sent_next = sent;
                    None
                }
                Err(e) => Some(e),
            },
        };
        let ended = ended.or_else(|| {
            (self.link != Link::Ready).then_some(SessionError::Closed { phase: Phase::Mail })
        });
        let recipients = slots
            .into_iter()
            .map(|s| match s {
                Slot::Done(r) => r,
                // Only reachable if the session ended without settling them: not delivered.
                Slot::Waiting | Slot::Accepted => RcptResult::Failed(
                    ended
                        .clone()
                        .unwrap_or(SessionError::Closed { phase: Phase::Mail }),
                ),
            })
            .collect();
        (Transaction { recipients, ended }, sent_next)
    }

    /// Sends the envelope (RSET?, MAIL, RCPT…, DATA) and settles every recipient that was
    /// refused. `Ok(true)`: DATA got 354 with at least one accepted recipient, send the body.
    /// `Ok(false)`: the transaction is over and the session still usable. `Err`: the session
    /// ended (every unsettled recipient has been settled with that error).
    ///
    /// With PIPELINING (RFC 2920) the whole envelope goes out in one write and the replies
    /// are read in order, each with its phase's full timeout from the moment the previous
    /// reply arrived. Without it, lock-step: stop at a refused MAIL, and skip DATA when no
    /// recipient was accepted. `written`: the envelope already went out behind the previous
    /// transaction's data, and only its replies are read.
    async fn exchange_envelope(
        &mut self,
        cmds: &[Command],
        slots: &mut [Slot],
        written: bool,
    ) -> Result<bool, SessionError> {
        let pipelined = self.ext.pipelining || written;
        let first_deadline = self.deadline(cmds[0].phase());
        if pipelined && !written {
            let wire = encode_all(cmds);
            if let Err(e) = self.write(cmds[0].phase(), &wire, first_deadline).await {
                return Err(settle_all(slots, RcptResult::Failed(e.clone()), e));
            }
        }
        let mut mail_refused: Option<Reply> = None;
        let mut rcpt_index = 0;
        for (i, cmd) in cmds.iter().enumerate() {
            let phase = cmd.phase();
            let reply = if pipelined {
                let deadline = if i == 0 {
                    first_deadline
                } else {
                    self.deadline(phase)
                };
                self.read_reply(phase, deadline).await
            } else {
                self.command(cmd).await
            };
            let reply = match reply {
                Ok(r) if r.is_closing() => {
                    self.link = Link::Dead;
                    let e = SessionError::ServerClosing {
                        phase,
                        reply: r.clone(),
                    };
                    return Err(settle_all(slots, negative(phase, r), e));
                }
                // `command` already turned a 421 into this error.
                Err(SessionError::ServerClosing { phase, reply }) => {
                    let e = SessionError::ServerClosing {
                        phase,
                        reply: reply.clone(),
                    };
                    return Err(settle_all(slots, negative(phase, reply), e));
                }
                Ok(r) => r,
                Err(e) => {
                    if pipelined {
                        // Replies to the rest of the batch are still on their way: a QUIT now
                        // would be answered out of step (or read as message data).
                        self.link = Link::Dead;
                    }
                    return Err(settle_all(slots, RcptResult::Failed(e.clone()), e));
                }
            };
            match cmd {
                Command::Rset if reply.code == 250 => self.needs_rset = false,
                Command::Rset => {
                    // Out of step with the server: nothing after this can be trusted. With
                    // the rest of the batch still in flight, not even a QUIT.
                    self.link = if pipelined {
                        Link::Dead
                    } else {
                        Link::QuitOnly
                    };
                    let e = refusal(Phase::Rset, reply);
                    return Err(settle_all(slots, RcptResult::Failed(e.clone()), e));
                }
                Command::MailFrom(..) if reply.code == 250 => self.needs_rset = true,
                Command::MailFrom(..) => {
                    settle_all(slots, negative(Phase::Mail, reply.clone()), ());
                    if !pipelined {
                        return Ok(false);
                    }
                    // Pipelined: the RCPT and DATA replies (503s) must still be read.
                    mail_refused = Some(reply);
                }
                Command::RcptTo(_) => {
                    if mail_refused.is_none() {
                        slots[rcpt_index] = if reply.code / 100 == 2 {
                            Slot::Accepted
                        } else {
                            Slot::Done(negative(Phase::Rcpt, reply))
                        };
                    }
                    rcpt_index += 1;
                    let none_accepted = !slots.iter().any(|s| matches!(s, Slot::Accepted));
                    if !pipelined && rcpt_index == slots.len() && none_accepted {
                        // Nobody to send to: no DATA. RSET comes before the next MAIL.
                        return Ok(false);
                    }
                }
                Command::Data => return self.after_data_reply(reply, slots).await,
                Command::Ehlo(_) | Command::Helo(_) | Command::StartTls | Command::Quit => {}
            }
        }
        // The envelope always ends with DATA, which returns above.
        Ok(false)
    }

    /// Handles the reply to DATA.
    async fn after_data_reply(
        &mut self,
        reply: Reply,
        slots: &mut [Slot],
    ) -> Result<bool, SessionError> {
        let accepted = slots.iter().any(|s| matches!(s, Slot::Accepted));
        match reply.code {
            354 if accepted => Ok(true),
            354 => {
                // RFC 2920 §3.1: a server may answer 354 though every RCPT failed. End the
                // empty data at once so the dialogue stays in step; its reply means nothing.
                let deadline = self.deadline(Phase::DataDone);
                self.write(Phase::DataDone, b".\r\n", deadline).await?;
                let reply = self.read_reply(Phase::DataDone, deadline).await?;
                self.needs_rset = false;
                if reply.is_closing() {
                    self.link = Link::Dead;
                    let e = SessionError::ServerClosing {
                        phase: Phase::DataDone,
                        reply,
                    };
                    return Err(e);
                }
                Ok(false)
            }
            400..=599 => {
                for s in slots.iter_mut().filter(|s| matches!(s, Slot::Accepted)) {
                    *s = Slot::Done(negative(Phase::DataInit, reply.clone()));
                }
                Ok(false)
            }
            _ => {
                self.link = Link::QuitOnly;
                let e = SessionError::Unexpected {
                    phase: Phase::DataInit,
                    reply,
                };
                Err(settle_all(slots, RcptResult::Failed(e.clone()), e))
            }
        }
    }

    /// After 354: the body in blocks, then the reply to the dot, which settles every accepted
    /// recipient. `Err` when the session ended. `next` (see [`Session::transact`]) goes out
    /// with the last block when every recipient was accepted; `Ok(Some(next))` when it did
    /// and the session is still in step.
    async fn data(
        &mut self,
        wire: &[u8],
        slots: &mut [Slot],
        next: Option<Envelope>,
    ) -> Result<Option<Envelope>, SessionError> {
        self.needs_rset = false;
        // A refused recipient may be an unknown user, whose suppression the caller must
        // record before anything more is sent to this server.
        let next = next.filter(|_| slots.iter().all(|s| matches!(s, Slot::Accepted)));
        let trailer = next.as_ref().map(Envelope::encode).unwrap_or_default();
        if let Err(e) = self.write_data(wire, &trailer).await {
            // The terminator is the last thing written, so the server has not got it all:
            // not delivered.
            return Err(settle_all(slots, RcptResult::Failed(e.clone()), e));
        }
        if next.is_some() {
            self.transactions += 1;
        }
        let deadline = self.deadline(Phase::DataDone);
        let outcome = match self.read_reply(Phase::DataDone, deadline).await {
            Ok(reply) if reply.code / 100 == 2 => RcptResult::Delivered(reply),
            Ok(reply) if reply.is_closing() => {
                self.link = Link::Dead;
                let e = SessionError::ServerClosing {
                    phase: Phase::DataDone,
                    reply: reply.clone(),
                };
                return Err(settle_all(slots, negative(Phase::DataDone, reply), e));
            }
            Ok(reply) if reply.code >= 400 => negative(Phase::DataDone, reply),
            Ok(reply) => {
                // With the next envelope's replies on their way, not even a QUIT is in step.
                self.link = if next.is_some() {
                    Link::Dead
                } else {
                    Link::QuitOnly
                };
                let e = SessionError::Unexpected {
                    phase: Phase::DataDone,
                    reply,
                };
                return Err(settle_all(slots, RcptResult::Unknown(e.clone()), e));
            }
            Err(e) => {
                tracing::warn!(peer = %self.peer, error = %e, "no reply after end of data: outcome unknown");
                return Err(settle_all(slots, RcptResult::Unknown(e.clone()), e));
            }
        };
        settle_all(slots, outcome, ());
        Ok(next.map(|mut env| {
            env.sent = true;
            self.ahead = true;
            env
        }))
    }

    /// Writes the stuffed data in blocks, each under its own data-block deadline; `trailer`
    /// (the next envelope, or nothing) goes in the last block's write.
    async fn write_data(&mut self, wire: &[u8], trailer: &[u8]) -> Result<(), SessionError> {
        let mut blocks = wire.chunks(DATA_BLOCK).peekable();
        while let Some(block) = blocks.next() {
            let deadline = self.deadline(Phase::DataBlock);
            if blocks.peek().is_none() && !trailer.is_empty() {
                let mut last = Vec::with_capacity(block.len() + trailer.len());
                last.extend_from_slice(block);
                last.extend_from_slice(trailer);
                self.write(Phase::DataBlock, &last, deadline).await?;
            } else {
                self.write(Phase::DataBlock, block, deadline).await?;
            }
        }
        Ok(())
    }

    /// Ends the session: QUIT and wait for the reply (bounded by the QUIT timeout) whenever
    /// the connection can still carry a command, then close the stream. Never fails.
    pub async fn close(mut self) -> Option<Reply> {
        if self.ahead {
            // The server is working through an envelope whose DATA it will answer with 354:
            // a QUIT now would be read as message data. Callers finish that transaction
            // first; this is a last resort.
            tracing::warn!(peer = %self.peer, "closing with a pipelined envelope unanswered");
            self.link = Link::Dead;
        }
        let reply = if self.link == Link::Dead {
            None
        } else {
            self.command(&Command::Quit).await.ok()
        };
        if self.link != Link::Dead {
            let deadline = self.deadline(Phase::Quit);
            let _ = timeout_at(deadline, self.stream.shutdown()).await;
        }
        reply
    }

    /// Sends one command and reads its reply under the command's deadline.
    async fn command(&mut self, cmd: &Command) -> Result<Reply, SessionError> {
        let phase = cmd.phase();
        let deadline = self.deadline(phase);
        let mut wire = Vec::with_capacity(64);
        cmd.encode(&mut wire);
        self.write(phase, &wire, deadline).await?;
        let reply = self.read_reply(phase, deadline).await?;
        if reply.is_closing() && phase != Phase::Quit {
            self.link = Link::Dead;
            return Err(SessionError::ServerClosing { phase, reply });
        }
        Ok(reply)
    }

    fn deadline(&self, phase: Phase) -> Instant {
        Instant::now() + phase.timeout(&self.settings.timeouts)
    }

    async fn write(
        &mut self,
        phase: Phase,
        bytes: &[u8],
        deadline: Instant,
    ) -> Result<(), SessionError> {
        let io = async {
            self.stream.write_all(bytes).await?;
            self.stream.flush().await
        };
        match timeout_at(deadline, io).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => {
                self.link = Link::Dead;
                Err(SessionError::Io {
                    phase,
                    detail: e.to_string(),
                })
            }
            Err(_) => {
                self.link = Link::Dead;
                Err(SessionError::Timeout {
                    phase,
                    after: phase.timeout(&self.settings.timeouts),
                })
            }
        }
    }

    async fn read_reply(&mut self, phase: Phase, deadline: Instant) -> Result<Reply, SessionError> {
        loop {
            match parse_reply(&self.buf) {
                Ok(Parsed::Reply(reply, used)) => {
                    self.buf.advance(used);
                    // The deadline was set when the wait began: recover that moment.
                    let waited = phase
                        .timeout(&self.settings.timeouts)
                        .saturating_sub(deadline.saturating_duration_since(Instant::now()));
                    metrics::histogram!(crate::metrics::SMTP_PHASE_SECONDS, "phase" => phase.as_str())
                        .record(waited.as_secs_f64());
                    tracing::trace!(peer = %self.peer, %phase, %reply, "reply");
                    return Ok(reply);
                }
                Ok(Parsed::Incomplete) => {}
                Err(source) => {
                    self.buf.clear();
                    self.link = Link::QuitOnly;
                    return Err(SessionError::Protocol { phase, source });
                }
            }
            self.buf.reserve(4096);
            match timeout_at(deadline, self.stream.read_buf(&mut self.buf)).await {
                Ok(Ok(0)) => {
                    self.link = Link::Dead;
                    return Err(SessionError::Closed { phase });
                }
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    self.link = Link::Dead;
                    return Err(SessionError::Io {
                        phase,
                        detail: e.to_string(),
                    });
                }
                Err(_) => {
                    self.link = Link::Dead;
                    return Err(SessionError::Timeout {
                        phase,
                        after: phase.timeout(&self.settings.timeouts),
                    });
                }
            }
        }
    }
}

/// A recipient's place in a transaction in progress.
#[derive(Clone, Debug)]
enum Slot {
    Waiting,
    /// RCPT accepted; settled by the DATA reply or the reply to the dot.
    Accepted,
    Done(RcptResult),
}

/// Settles every recipient not yet settled with `r`, and passes `ret` through (so a caller can
/// settle and return the session error in one expression).
fn settle_all<T>(slots: &mut [Slot], r: RcptResult, ret: T) -> T {
    for s in slots.iter_mut() {
        if !matches!(s, Slot::Done(_)) {
            *s = Slot::Done(r.clone());
        }
    }
    ret
}

/// A 4xx or 5xx reply as a recipient result.
fn negative(phase: Phase, reply: Reply) -> RcptResult {
    if reply.is_permanent() {
        RcptResult::Rejected { phase, reply }
    } else {
        RcptResult::Deferred { phase, reply }
    }
}

fn refusal(phase: Phase, reply: Reply) -> SessionError {
    if reply.is_closing() {
        SessionError::ServerClosing { phase, reply }
    } else {
        SessionError::Refused { phase, reply }
    }
}
