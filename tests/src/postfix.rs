//! A private Postfix on loopback, for tests and benchmarks against a receiver we did not write.
//!
//! Everything lives in one temporary directory: `etc/` (`config_directory`: main.cf, master.cf,
//! the maps and the delivery script), `spool/` (`queue_directory`), `data/`
//! (`data_directory`), `mail/` (delivered messages) and `maillog` (Postfix's own log, written
//! by `postlogd` through `maillog_file`). `smtpd` listens on `127.0.0.1:<free port>` only;
//! nothing outside the directory is created or changed, and the instance is stopped on drop
//! (`postfix stop`, then SIGKILL of the master if it is still there).
//!
//! Two delivery modes:
//! - **sink** (default): mail for `opts.domain` is accepted only for the listed users
//!   (`smtpd_reject_unlisted_recipient` against `virtual_mailbox_maps`, so others get
//!   `550 5.1.1 ... User unknown`) and handed to a `pipe` transport that writes one file per
//!   message with its recipients, so a test can count messages and hash their content.
//! - **relay**: everything is relayed to `opts.relayhost` (the benchmark's `smtp-sink`), with
//!   Postfix's default client settings.
//!
//! Postfix needs root to start (it drops privileges to the `postfix` user). Error output of the
//! `postfix` command goes to syslog, which a test machine may not have, so failures here
//! quote the instance's `maillog` instead.

use std::io::Write as _;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// Where Debian installs the `postfix` command.
pub const POSTFIX: &str = "/usr/sbin/postfix";

/// Whether Postfix is installed (tests skip when it is not).
pub fn installed() -> bool {
    Path::new(POSTFIX).exists()
}

/// How the private instance is configured.
#[derive(Clone, Debug)]
pub struct PostfixOptions {
    /// The domain Postfix accepts mail for in sink mode.
    pub domain: String,
    /// Local parts of the known users of `domain`; every other address is rejected at RCPT.
    pub users: Vec<String>,
    /// Relay mode: send everything to this host instead of delivering it locally.
    pub relayhost: Option<SocketAddr>,
    /// Put every message accepted by `smtpd` on hold (benchmark fill; release with
    /// [`PostfixInstance::release_held`]).
    pub hold: bool,
    /// `default_process_limit` (so also the most concurrent `smtpd` sessions).
    pub process_limit: u32,
    /// Further main.cf settings, applied last.
    pub extra: Vec<(String, String)>,
}

impl Default for PostfixOptions {
    fn default() -> Self {
        PostfixOptions {
            domain: "sink.test".into(),
            users: Vec::new(),
            relayhost: None,
            hold: false,
            process_limit: 100,
            extra: Vec::new(),
        }
    }
}

/// A running private Postfix. Stops when dropped.
pub struct PostfixInstance {
    /// Where `smtpd` listens.
    pub addr: SocketAddr,
    /// `syslog_name` of this instance (unique per process and instance).
    pub name: String,
    dir: tempfile::TempDir,
    stopped: bool,
}

/// One message as the sink-mode `pipe` transport received it.
#[derive(Clone, Debug)]
pub struct Delivered {
    /// Envelope recipients of this delivery (one delivery per message and queue run).
    pub recipients: Vec<String>,
    /// The message without the `Received:` header Postfix prepended, LF line endings
    /// (Postfix stores lines without their CRLF).
    pub content: Vec<u8>,
}

/// One `smtpd` session, from its "disconnect from" log line.
#[derive(Clone, Debug)]
pub struct Session {
    pub line: String,
    /// The client sent QUIT (`quit=1`).
    pub quit: bool,
}

static SEQ: AtomicUsize = AtomicUsize::new(0);

impl PostfixInstance {
    /// Writes the configuration, creates the queue (`postfix check`), starts Postfix and
    /// waits (bounded) until `smtpd` answers.
    pub fn start(opts: PostfixOptions) -> Result<PostfixInstance> {
        if !installed() {
            bail!("{POSTFIX} not found: apt-get install postfix");
        }
        let dir = tempfile::Builder::new()
            .prefix("bulksend-postfix-")
            .tempdir()?;
        let root = dir.path().to_path_buf();
        // Postfix daemons run as the postfix user (and the pipe as nobody): they must be able to
        // traverse the directory.
        set_mode(&root, 0o755)?;
        for d in ["etc", "spool", "data", "mail"] {
            std::fs::create_dir(root.join(d))?;
        }
        set_mode(&root.join("mail"), 0o777)?;
        let data = root.join("data");
        chown_postfix(&data)?;
        let port = free_port()?;
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let name = format!(
            "bulksend-pf-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        let inst = PostfixInstance {
            addr,
            name,
            dir,
            stopped: true,
        };
        inst.write_config(&opts)?;
        inst.postfix(&["check"])?;
        inst.postfix(&["start"])?;
        let mut inst = inst;
        inst.stopped = false;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            // A polite probe (greeting, QUIT, 221), so the log holds no "lost connection"
            // of ours.
            if probe(addr).is_ok() {
                break;
            }
            if Instant::now() > deadline {
                bail!(
                    "postfix did not listen on {addr} within 30 s; maillog:\n{}",
                    inst.maillog()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(inst)
    }

    fn etc(&self) -> PathBuf {
        self.dir.path().join("etc")
    }

    /// The instance's directory (config, queue, deliveries, log).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// `queue_directory`.
    pub fn spool(&self) -> PathBuf {
        self.dir.path().join("spool")
    }

    fn write_config(&self, o: &PostfixOptions) -> Result<()> {
        let root = self.dir.path();
        let etc = self.etc();
        let r = root.display();
        let mut main: Vec<(String, String)> = vec![
            ("compatibility_level".into(), "3.6".into()),
            ("config_directory".into(), format!("{r}/etc")),
            ("queue_directory".into(), format!("{r}/spool")),
            ("data_directory".into(), format!("{r}/data")),
            ("mail_owner".into(), "postfix".into()),
            ("setgid_group".into(), "postdrop".into()),
            ("syslog_name".into(), self.name.clone()),
            ("maillog_file".into(), format!("{r}/maillog")),
            ("maillog_file_prefixes".into(), format!("{r}")),
            ("inet_interfaces".into(), "127.0.0.1".into()),
            ("inet_protocols".into(), "ipv4".into()),
            ("myhostname".into(), "postfix.test".into()),
            ("mydomain".into(), "postfix.test".into()),
            ("mydestination".into(), String::new()),
            ("mynetworks".into(), "127.0.0.0/8".into()),
            ("alias_maps".into(), String::new()),
            ("alias_database".into(), String::new()),
            ("biff".into(), "no".into()),
            ("smtpd_banner".into(), "$myhostname ESMTP".into()),
            ("default_process_limit".into(), o.process_limit.to_string()),
            ("message_size_limit".into(), (50 * 1024 * 1024).to_string()),
            // Client restrictions at connect time, so a deferral is one 4xx greeting per
            // session, not one 4xx per pipelined RCPT (which would count towards
            // smtpd_hard_error_limit).
            ("smtpd_delay_reject".into(), "no".into()),
            // The strictest pipelining checks Postfix has: a client that sends a command
            // where RFC 2920 does not allow it is disconnected ("SMTP protocol
            // synchronization"), and its message rejected at DATA. bulksend's next envelope
            // goes out behind the dot, which must pass these.
            ("smtpd_forbid_unauth_pipelining".into(), "yes".into()),
            (
                "smtpd_data_restrictions".into(),
                "reject_unauth_pipelining".into(),
            ),
            (
                "smtpd_client_restrictions".into(),
                format!("check_client_access cidr:{r}/etc/clients"),
            ),
            (
                "smtpd_recipient_restrictions".into(),
                // HOLD needs a queue file, so it acts at RCPT, not at connect.
                if o.hold {
                    "check_client_access static:HOLD, permit_mynetworks, reject_unauth_destination"
                        .into()
                } else {
                    "permit_mynetworks, reject_unauth_destination".into()
                },
            ),
        ];
        if let Some(relay) = o.relayhost {
            main.push((
                "relayhost".into(),
                format!("[{}]:{}", relay.ip(), relay.port()),
            ));
            main.push(("relay_domains".into(), String::new()));
        } else {
            main.extend([
                ("relay_domains".into(), String::new()),
                ("smtpd_reject_unlisted_recipient".into(), "yes".into()),
                ("virtual_mailbox_domains".into(), o.domain.clone()),
                (
                    "virtual_mailbox_maps".into(),
                    format!("texthash:{r}/etc/vmailbox"),
                ),
                ("virtual_transport".into(), "sinkpipe".into()),
                ("sinkpipe_destination_recipient_limit".into(), "1000".into()),
            ]);
        }
        main.extend(o.extra.iter().cloned());
        let mut text = String::new();
        for (k, v) in &main {
            text.push_str(&format!("{k} = {v}\n"));
        }
        std::fs::write(etc.join("main.cf"), text)?;

        let mut users = String::new();
        for u in &o.users {
            users.push_str(&format!("{u}@{} ok\n", o.domain));
        }
        std::fs::write(etc.join("vmailbox"), users)?;
        std::fs::write(etc.join("clients"), "# no deferral\n")?;
        // One file per message: the recipients on the first line, then the message.
        let script = etc.join("deliver.sh");
        std::fs::write(
            &script,
            "#!/bin/sh\n\
             f=\"$1/$(date +%s%N).$$\"\n\
             shift\n\
             { printf 'X-Sink-Rcpts: %s\\n' \"$*\"; cat; } > \"$f.tmp\" && mv \"$f.tmp\" \"$f.eml\"\n",
        )?;
        set_mode(&script, 0o755)?;

        let master = format!(
            "{addr} inet n - n - - smtpd\n\
             pickup    unix  n - n 60 1 pickup\n\
             cleanup   unix  n - n - 0 cleanup\n\
             qmgr      unix  n - n 300 1 qmgr\n\
             tlsmgr    unix  - - n 1000? 1 tlsmgr\n\
             rewrite   unix  - - n - - trivial-rewrite\n\
             bounce    unix  - - n - 0 bounce\n\
             defer     unix  - - n - 0 bounce\n\
             trace     unix  - - n - 0 bounce\n\
             verify    unix  - - n - 1 verify\n\
             flush     unix  n - n 1000? 0 flush\n\
             proxymap  unix  - - n - - proxymap\n\
             proxywrite unix - - n - 1 proxymap\n\
             smtp      unix  - - n - - smtp\n\
             relay     unix  - - n - - smtp\n\
             showq     unix  n - n - - showq\n\
             error     unix  - - n - - error\n\
             retry     unix  - - n - - error\n\
             discard   unix  - - n - - discard\n\
             local     unix  - n n - - local\n\
             virtual   unix  - n n - - virtual\n\
             lmtp      unix  - - n - - lmtp\n\
             anvil     unix  - - n - 1 anvil\n\
             scache    unix  - - n - 1 scache\n\
             postlog   unix-dgram n - n - 1 postlogd\n\
             sinkpipe  unix  - n n - - pipe user=nobody argv={script} {r}/mail ${{recipient}}\n",
            addr = self.addr,
            script = script.display(),
        );
        std::fs::write(etc.join("master.cf"), master)?;
        Ok(())
    }

    /// Runs `postfix -c DIR <args>` (bounded: 60 s).
    pub fn postfix(&self, args: &[&str]) -> Result<()> {
        self.run_tool(POSTFIX, args)
    }

    /// Runs a Postfix tool (`/usr/sbin/postsuper`, ...) with `-c DIR` first.
    pub fn run_tool(&self, tool: &str, args: &[&str]) -> Result<()> {
        let etc = self.etc();
        let mut cmd = Command::new(tool);
        cmd.arg("-c").arg(&etc).args(args);
        let out = run_bounded(cmd, Duration::from_secs(60))
            .with_context(|| format!("{tool} {args:?}"))?;
        if !out.status.success() {
            bail!(
                "{tool} -c {} {args:?} failed ({}): {}{}\nmaillog:\n{}",
                etc.display(),
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
                self.maillog()
            );
        }
        Ok(())
    }

    /// Makes `smtpd` answer every new session with `reply` (e.g. "450 4.7.1 try again later")
    /// instead of its greeting, or (None) stops doing so. Takes effect with a reload: sessions
    /// already open finish as they were.
    pub fn set_client_reply(&self, reply: Option<&str>) -> Result<()> {
        let text = match reply {
            Some(r) => format!("127.0.0.0/8 {r}\n"),
            None => "# no deferral\n".into(),
        };
        let path = self.etc().join("clients");
        let tmp = self.etc().join("clients.tmp");
        std::fs::write(&tmp, text)?;
        std::fs::rename(&tmp, &path)?;
        self.postfix(&["reload"])
    }

    /// Postfix's log so far.
    pub fn maillog(&self) -> String {
        std::fs::read(self.dir.path().join("maillog"))
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// Lines of the log that show a misbehaving client (see [`BAD_CLIENT_MARKERS`]).
    pub fn client_problems(&self) -> Vec<String> {
        self.maillog()
            .lines()
            .filter(|l| BAD_CLIENT_MARKERS.iter().any(|m| l.contains(m)))
            .map(str::to_owned)
            .collect()
    }

    /// Every finished `smtpd` session.
    pub fn sessions(&self) -> Vec<Session> {
        self.maillog()
            .lines()
            .filter(|l| l.contains("/smtpd[") && l.contains(": disconnect from "))
            .map(|l| Session {
                line: l.to_owned(),
                quit: l.split_whitespace().any(|w| w == "quit=1"),
            })
            .collect()
    }

    /// How many log lines contain `needle`.
    pub fn log_count(&self, needle: &str) -> usize {
        self.maillog()
            .lines()
            .filter(|l| l.contains(needle))
            .count()
    }

    /// Messages delivered so far in sink mode.
    pub fn delivered(&self) -> Result<Vec<Delivered>> {
        let mut out = Vec::new();
        for entry in std::fs::read_dir(self.dir.path().join("mail"))? {
            let path = entry?.path();
            if path.extension().is_none_or(|e| e != "eml") {
                continue;
            }
            let raw = std::fs::read(&path)?;
            out.push(parse_delivery(&raw).with_context(|| path.display().to_string())?);
        }
        Ok(out)
    }

    /// Delivered files so far (cheap: no parsing).
    pub fn delivered_count(&self) -> usize {
        std::fs::read_dir(self.dir.path().join("mail"))
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .filter(|e| e.path().extension().is_some_and(|x| x == "eml"))
                    .count()
            })
            .unwrap_or(0)
    }

    /// Messages in Postfix's queue (maildrop, incoming, active, deferred, hold).
    pub fn queue_len(&self) -> usize {
        ["maildrop", "incoming", "active", "deferred", "hold"]
            .iter()
            .map(|q| count_files(&self.spool().join(q)))
            .sum()
    }

    /// Messages on hold.
    pub fn held(&self) -> usize {
        count_files(&self.spool().join("hold"))
    }

    /// Releases every held message and asks the queue manager to deliver now.
    pub fn release_held(&self) -> Result<()> {
        self.run_tool("/usr/sbin/postsuper", &["-H", "ALL"])?;
        self.run_tool("/usr/sbin/postqueue", &["-f"])
    }

    /// The master's pid, from `spool/pid/master.pid`.
    pub fn master_pid(&self) -> Option<u32> {
        std::fs::read_to_string(self.spool().join("pid/master.pid"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// CPU time (user + system, in clock ticks) used so far by this Postfix: the master, the
    /// children it has reaped (cutime/cstime) and its live children (and what they reaped).
    pub fn cpu_ticks(&self) -> u64 {
        let Some(master) = self.master_pid() else {
            return 0;
        };
        let mut total = 0;
        if let Some(s) = proc_stat(master) {
            total += s.utime + s.stime + s.cutime + s.cstime;
        }
        if let Ok(rd) = std::fs::read_dir("/proc") {
            for e in rd.filter_map(|e| e.ok()) {
                let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                    continue;
                };
                if let Some(s) = proc_stat(pid) {
                    if s.ppid == master {
                        total += s.utime + s.stime + s.cutime + s.cstime;
                    }
                }
            }
        }
        total
    }

    /// Stops Postfix (bounded) and waits until the master is gone.
    pub fn stop(&mut self) -> Result<()> {
        if self.stopped {
            return Ok(());
        }
        self.stopped = true;
        let pid = self.master_pid();
        let res = self.postfix(&["stop"]);
        if let Some(pid) = pid {
            let deadline = Instant::now() + Duration::from_secs(10);
            while Path::new(&format!("/proc/{pid}")).exists() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            if Path::new(&format!("/proc/{pid}")).exists() {
                let _ = Command::new("kill")
                    .args(["-KILL", &pid.to_string()])
                    .status();
            }
        }
        res
    }
}

impl Drop for PostfixInstance {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            eprintln!("stopping private postfix {}: {e:#}", self.name);
        }
        if std::env::var_os("BULKSEND_KEEP_POSTFIX").is_some() {
            let kept = self.dir.path().to_path_buf();
            eprintln!("keeping {}", kept.display());
            std::mem::forget(std::mem::replace(
                &mut self.dir,
                tempfile::tempdir().expect("tempdir"),
            ));
        }
    }
}

/// `smtpd` log phrases that mean the client misbehaved or broke off.
pub const BAD_CLIENT_MARKERS: &[&str] = &[
    "lost connection after",
    "timeout after",
    "improper command pipelining",
    "protocol synchronization",
    "too many errors",
    "non-SMTP command",
];

fn parse_delivery(raw: &[u8]) -> Result<Delivered> {
    let nl = raw
        .iter()
        .position(|&b| b == b'\n')
        .context("no recipient line")?;
    let first = String::from_utf8_lossy(&raw[..nl]);
    let recipients = first
        .strip_prefix("X-Sink-Rcpts: ")
        .context("no X-Sink-Rcpts")?
        .split_whitespace()
        .map(str::to_owned)
        .collect();
    let mut rest = &raw[nl + 1..];
    // Drop the Received: header Postfix prepended (first line and its continuations).
    if rest.starts_with(b"Received:") {
        loop {
            let end = rest
                .iter()
                .position(|&b| b == b'\n')
                .map_or(rest.len(), |p| p + 1);
            rest = &rest[end..];
            if !(rest.starts_with(b" ") || rest.starts_with(b"\t")) {
                break;
            }
        }
    }
    Ok(Delivered {
        recipients,
        content: rest.to_vec(),
    })
}

/// CRLF → LF, as Postfix stores and hands over a message.
pub fn to_lf(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len());
    let mut i = 0;
    while i < data.len() {
        if data[i] == b'\r' && data.get(i + 1) == Some(&b'\n') {
            i += 1;
            continue;
        }
        out.push(data[i]);
        i += 1;
    }
    out
}

/// Reads the greeting, says QUIT and reads the 221.
fn probe(addr: SocketAddr) -> Result<()> {
    use std::io::{BufRead, BufReader};
    let s = TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut r = BufReader::new(s.try_clone()?);
    let mut line = String::new();
    r.read_line(&mut line)?;
    if !line.starts_with("220 ") {
        bail!("greeting: {line:?}");
    }
    (&s).write_all(b"QUIT\r\n")?;
    line.clear();
    r.read_line(&mut line)?;
    Ok(())
}

/// A port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

fn count_files(dir: &Path) -> usize {
    // Queue directories may be hashed into subdirectories (hash_queue_names).
    let Ok(rd) = std::fs::read_dir(dir) else {
        return 0;
    };
    rd.filter_map(|e| e.ok())
        .map(|e| {
            let p = e.path();
            if p.is_dir() {
                count_files(&p)
            } else {
                1
            }
        })
        .sum()
}

fn set_mode(path: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {}", path.display()))
}

fn chown_postfix(path: &Path) -> Result<()> {
    let passwd = std::fs::read_to_string("/etc/passwd")?;
    let line = passwd
        .lines()
        .find(|l| l.starts_with("postfix:"))
        .context("no postfix user in /etc/passwd")?;
    let f: Vec<&str> = line.split(':').collect();
    let uid: u32 = f.get(2).context("passwd")?.parse()?;
    let gid: u32 = f.get(3).context("passwd")?.parse()?;
    std::os::unix::fs::chown(path, Some(uid), Some(gid))
        .with_context(|| format!("chown postfix {}", path.display()))
}

/// Runs a command with a time limit, killing it when the limit passes.
pub fn run_bounded(mut cmd: Command, limit: Duration) -> Result<std::process::Output> {
    cmd.stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn()?;
    let deadline = Instant::now() + limit;
    loop {
        if child.try_wait()?.is_some() {
            return Ok(child.wait_with_output()?);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output()?;
            bail!(
                "timed out after {limit:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A few fields of `/proc/PID/stat`.
#[derive(Clone, Copy, Debug, Default)]
pub struct ProcStat {
    pub ppid: u32,
    pub utime: u64,
    pub stime: u64,
    pub cutime: u64,
    pub cstime: u64,
}

/// Reads `/proc/PID/stat` (times in clock ticks, normally 100 per second).
pub fn proc_stat(pid: u32) -> Option<ProcStat> {
    parse_stat(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// `/proc/self/stat`.
pub fn self_stat() -> Option<ProcStat> {
    parse_stat(&std::fs::read_to_string("/proc/self/stat").ok()?)
}

fn parse_stat(s: &str) -> Option<ProcStat> {
    // The command name is in parentheses and may contain spaces: split after the last ')'.
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state): ppid = field 4, utime = 14, stime = 15, cutime = 16,
    // cstime = 17.
    let n = |i: usize| -> Option<u64> { f.get(i - 3)?.parse().ok() };
    Some(ProcStat {
        ppid: u32::try_from(n(4)?).ok()?,
        utime: n(14)?,
        stime: n(15)?,
        cutime: n(16)?,
        cstime: n(17)?,
    })
}

/// Peak resident set size of this process (`VmHWM`), in KiB.
pub fn peak_rss_kib() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    s.lines()
        .find(|l| l.starts_with("VmHWM:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Clock ticks per second for `/proc` times. Linux reports USER_HZ = 100 on every common
/// architecture; `getconf CLK_TCK` is asked in case this one differs.
pub fn clock_ticks() -> u64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100)
}

/// Writes `text` to stderr at once (test progress that survives a hung test).
pub fn progress(text: &str) {
    let mut e = std::io::stderr().lock();
    let _ = writeln!(e, "{text}");
}
