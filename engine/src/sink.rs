//! A small receiving SMTP server that accepts every message: the peer for `bulksend demo`,
//! for benchmarks when Postfix's `smtp-sink` is not installed, and for tests.
//!
//! It advertises PIPELINING and answers every complete command of one read with one write, so
//! it never becomes the bottleneck of a pipelining client. Optionally it rejects recipients
//! whose local part starts with `unknown` with `550 5.1.1`, so a demo shows bounces and
//! suppression. It counts what it received; it keeps no message.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// Counters of what the sink received.
#[derive(Debug, Default)]
pub struct SinkStats {
    pub connections: AtomicU64,
    pub messages: AtomicU64,
    /// Accepted RCPTs of completed messages.
    pub recipients: AtomicU64,
    pub rejected_recipients: AtomicU64,
    pub bytes: AtomicU64,
    /// Sessions that ended with QUIT.
    pub quits: AtomicU64,
}

/// Behaviour switches.
#[derive(Clone, Debug, Default)]
pub struct SinkOptions {
    /// Reject `RCPT TO:<unknown...@...>` with 550 5.1.1.
    pub reject_unknown: bool,
}

/// A running sink; stops when dropped.
pub struct Sink {
    pub addr: SocketAddr,
    pub stats: Arc<SinkStats>,
    task: JoinHandle<()>,
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Sink {
    pub async fn start(addr: SocketAddr, opts: SinkOptions) -> std::io::Result<Sink> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let stats = Arc::new(SinkStats::default());
        let s = stats.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                s.connections.fetch_add(1, Ordering::Relaxed);
                let s = s.clone();
                let opts = opts.clone();
                tokio::spawn(async move {
                    let _ = serve(stream, &s, &opts).await;
                });
            }
        });
        Ok(Sink { addr, stats, task })
    }
}

async fn serve(
    mut stream: TcpStream,
    stats: &SinkStats,
    opts: &SinkOptions,
) -> std::io::Result<()> {
    let _ = stream.set_nodelay(true);
    stream
        .write_all(b"220 sink.bulksend.test ESMTP\r\n")
        .await?;
    let mut buf: Vec<u8> = Vec::with_capacity(64 * 1024);
    let mut out: Vec<u8> = Vec::with_capacity(4096);
    let mut chunk = vec![0u8; 64 * 1024];
    let mut in_data = false;
    let mut data_len = 0u64;
    let mut rcpts = 0u64;
    loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
        let mut pos = 0;
        loop {
            if in_data {
                // Look for CRLF.CRLF; the buffer keeps only the last 4 bytes of earlier reads.
                let end = if buf[pos..].starts_with(b".\r\n") {
                    Some(pos)
                } else {
                    find(&buf[pos..], b"\r\n.\r\n").map(|i| pos + i + 2)
                };
                match end {
                    Some(dot) => {
                        data_len += (dot - pos) as u64;
                        pos = dot + 3;
                        in_data = false;
                        stats.messages.fetch_add(1, Ordering::Relaxed);
                        stats.recipients.fetch_add(rcpts, Ordering::Relaxed);
                        stats.bytes.fetch_add(data_len, Ordering::Relaxed);
                        rcpts = 0;
                        data_len = 0;
                        out.extend_from_slice(b"250 2.0.0 Ok: queued\r\n");
                    }
                    None => {
                        // Keep the last 4 bytes: the terminator may straddle reads.
                        let keep = buf.len().saturating_sub(4).max(pos);
                        data_len += (keep - pos) as u64;
                        pos = keep;
                        break;
                    }
                }
                continue;
            }
            let Some(eol) = find(&buf[pos..], b"\r\n") else {
                if buf.len() - pos > 4096 {
                    out.extend_from_slice(b"500 5.5.2 Line too long\r\n");
                    stream.write_all(&out).await?;
                    return Ok(());
                }
                break;
            };
            let line = &buf[pos..pos + eol];
            pos += eol + 2;
            let upper = line.get(..4).map(|v| v.to_ascii_uppercase());
            match upper.as_deref() {
                Some(b"EHLO") => out.extend_from_slice(
                    b"250-sink.bulksend.test\r\n250-PIPELINING\r\n250-SIZE 104857600\r\n250-8BITMIME\r\n250-ENHANCEDSTATUSCODES\r\n250 SMTPUTF8\r\n",
                ),
                Some(b"HELO") => out.extend_from_slice(b"250 sink.bulksend.test\r\n"),
                Some(b"MAIL") => {
                    rcpts = 0;
                    out.extend_from_slice(b"250 2.1.0 Ok\r\n");
                }
                Some(b"RCPT") => {
                    let unknown = opts.reject_unknown
                        && line
                            .iter()
                            .position(|&b| b == b'<')
                            .is_some_and(|i| line[i + 1..].to_ascii_lowercase().starts_with(b"unknown"));
                    if unknown {
                        stats.rejected_recipients.fetch_add(1, Ordering::Relaxed);
                        out.extend_from_slice(b"550 5.1.1 Recipient address rejected: User unknown\r\n");
                    } else {
                        rcpts += 1;
                        out.extend_from_slice(b"250 2.1.5 Ok\r\n");
                    }
                }
                Some(b"DATA") if rcpts > 0 => {
                    in_data = true;
                    out.extend_from_slice(b"354 End data with <CR><LF>.<CR><LF>\r\n");
                }
                Some(b"DATA") => out.extend_from_slice(b"554 5.5.1 Error: no valid recipients\r\n"),
                Some(b"RSET") => {
                    rcpts = 0;
                    out.extend_from_slice(b"250 2.0.0 Ok\r\n");
                }
                Some(b"NOOP") => out.extend_from_slice(b"250 2.0.0 Ok\r\n"),
                Some(b"QUIT") => {
                    out.extend_from_slice(b"221 2.0.0 Bye\r\n");
                    stats.quits.fetch_add(1, Ordering::Relaxed);
                    stream.write_all(&out).await?;
                    return Ok(());
                }
                _ => out.extend_from_slice(b"502 5.5.2 Error: command not recognized\r\n"),
            }
        }
        buf.drain(..pos);
        if !out.is_empty() {
            stream.write_all(&out).await?;
            out.clear();
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::smtp::{prepare, Address, ClientSettings, RcptResult, Session};
    use bulksend_config::{SmtpSettings, TlsPolicy};

    #[tokio::test]
    async fn sink_accepts_pipelined_mail_and_rejects_unknown() {
        let sink = Sink::start(
            "127.0.0.1:0".parse().unwrap(),
            SinkOptions {
                reject_unknown: true,
            },
        )
        .await
        .unwrap();
        let smtp = SmtpSettings {
            tls: TlsPolicy::Disabled,
            ..SmtpSettings::default()
        };
        let settings = Arc::new(ClientSettings::from_config(&smtp).unwrap());
        let mut s = Session::connect(sink.addr, "sink", settings).await.unwrap();
        let body = format!("Subject: x\r\n\r\n{}", ".line\r\n".repeat(20_000));
        let data = prepare(body.as_bytes(), usize::MAX).unwrap();
        let to = [
            Address::parse("a@x.test").unwrap(),
            Address::parse("unknown1@x.test").unwrap(),
        ];
        for _ in 0..3 {
            let tx = s
                .send(Some(&Address::parse("f@y.test").unwrap()), &to, &data)
                .await;
            assert!(matches!(tx.recipients[0], RcptResult::Delivered(_)));
            assert!(matches!(tx.recipients[1], RcptResult::Rejected { .. }));
        }
        s.close().await;
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert_eq!(sink.stats.messages.load(Ordering::Relaxed), 3);
        assert_eq!(sink.stats.recipients.load(Ordering::Relaxed), 3);
        assert_eq!(sink.stats.rejected_recipients.load(Ordering::Relaxed), 3);
        assert_eq!(sink.stats.quits.load(Ordering::Relaxed), 1);
        // Stuffed wire size minus the terminator, per message.
        assert_eq!(
            sink.stats.bytes.load(Ordering::Relaxed),
            3 * (data.wire.len() as u64 - 3)
        );
    }
}
