//! Recipient domain → destination: which hosts to try, in which order, and which worker pool
//! (one [`DestinationKey`]) they belong to.
//!
//! Order of rules for a (lower-cased, trailing-dot-free) domain:
//! 1. an address literal (`[192.0.2.1]`, `[IPv6:2001:db8::1]`) is delivered to that address
//!    (RFC 5321 §4.1.3);
//! 2. a static route for exactly that domain, then the `"*"` smarthost (from config);
//! 3. MX lookup (RFC 5321 §5.1): hosts by preference, equal preferences shuffled; no MX records
//!    means the implicit MX (the domain's own A/AAAA, preference 0); a null MX (RFC 7505) means
//!    the domain accepts no mail at all.
//!
//! DNS sits behind the small [`Dns`] trait: [`HickoryDns`] in production, an in-memory zone in
//! unit tests. [`Router`] caches every answer (see [`Router::route`] for the TTLs) and lets only
//! one lookup per domain run at a time, so a burst of messages to one domain costs one lookup.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use hickory_resolver::config::{NameServerConfig, ResolveHosts, ResolverConfig};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::net::{DnsError as HickoryDnsError, NetError};
use hickory_resolver::proto::op::ResponseCode;
use hickory_resolver::proto::rr::{Name, RData, RecordType};
use hickory_resolver::TokioResolver;
use rand::seq::SliceRandom;
use tokio::time::Instant;

/// Identifies a destination: the set of hosts mail for a domain goes to. Domains that share an
/// MX set share a destination (one worker pool, one set of limits).
///
/// Forms: `"mx1.a.test,mx2.a.test"` (the sorted MX names, or the domain itself for an implicit
/// MX), `"[127.0.0.1]:2525"` for a route to an IP address, `"relay.test:587"` for a static route
/// to a host name.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DestinationKey(pub String);

impl std::fmt::Display for DestinationKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// One host to try, with its addresses (SMTP port applied).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MxHost {
    /// Lower-case host name without trailing dot (for static routes to an IP: the IP).
    pub name: String,
    pub preference: u16,
    /// A records first, then AAAA, as DNS returned them.
    pub addrs: Vec<SocketAddr>,
}

/// Where mail for one domain goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    pub destination: DestinationKey,
    /// Try order: preference ascending, equal preferences shuffled (RFC 5321 §5.1). Never empty,
    /// and every host has at least one address.
    pub hosts: Vec<MxHost>,
}

/// Why a domain cannot be routed now.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    /// Retrying will not help: NXDOMAIN, null MX (RFC 7505), no address for any host, an
    /// invalid domain. Recipients should bounce.
    #[error("permanent routing failure: {0}")]
    Permanent(String),
    /// SERVFAIL, timeout, network error, a bad static route: retry later.
    #[error("temporary routing failure: {0}")]
    Transient(String),
}

/// A boxed `Send` future (so [`Dns`] stays object safe without an extra crate).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Records of one lookup and how long they may be used.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Answer<T> {
    pub records: T,
    /// The minimum TTL of the records.
    pub ttl: Duration,
}

/// A DNS lookup failure, as far as routing cares.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DnsError {
    #[error("NXDOMAIN")]
    NxDomain,
    /// The name exists but has no records of the asked type (NODATA).
    #[error("no records of that type")]
    NoRecords,
    #[error("server failure: {0}")]
    ServFail(String),
    #[error("timeout")]
    Timeout,
    /// The name cannot be a DNS name at all (bad syntax, too long, failed IDNA).
    #[error("invalid name: {0}")]
    InvalidName(String),
    #[error("{0}")]
    Other(String),
}

/// An MX answer: (preference, exchange) pairs.
pub type MxAnswer = Result<Answer<Vec<(u16, String)>>, DnsError>;
/// An address answer: A and AAAA together.
pub type IpAnswer = Result<Answer<Vec<IpAddr>>, DnsError>;

/// The lookups routing needs. Small so unit tests can use an in-memory zone.
pub trait Dns: Send + Sync + 'static {
    /// MX records of `domain`: (preference, exchange). The exchange may be "." or "" (null MX).
    fn mx(&self, domain: &str) -> BoxFuture<'_, MxAnswer>;
    /// A and AAAA records of `host` (A first). Ok only with at least one address.
    fn ips(&self, host: &str) -> BoxFuture<'_, IpAnswer>;
}

/// A [`Dns`] that knows no names (every lookup is NXDOMAIN): for setups that use static
/// routes or a smarthost only, such as tests and benchmarks.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoDns;

impl Dns for NoDns {
    fn mx(&self, _: &str) -> BoxFuture<'_, MxAnswer> {
        Box::pin(async { Err(DnsError::NxDomain) })
    }
    fn ips(&self, _: &str) -> BoxFuture<'_, IpAnswer> {
        Box::pin(async { Err(DnsError::NxDomain) })
    }
}

/// [`Dns`] over hickory-resolver.
pub struct HickoryDns {
    resolver: TokioResolver,
}

impl HickoryDns {
    /// `nameservers` empty: the system configuration (`/etc/resolv.conf`); otherwise exactly
    /// those servers, UDP with TCP fallback. Names are always queried fully qualified (no search
    /// domains), `/etc/hosts` is not consulted, and the resolver's own cache is off because
    /// [`Router`] caches whole routes. Fails (as `Transient`) only if the system configuration
    /// cannot be read.
    pub fn new(nameservers: &[SocketAddr], timeout: Duration) -> Result<HickoryDns, RouteError> {
        let config_err = |e: NetError| RouteError::Transient(format!("DNS resolver setup: {e}"));
        let mut builder = if nameservers.is_empty() {
            TokioResolver::builder(TokioRuntimeProvider::default()).map_err(config_err)?
        } else {
            let servers = nameservers
                .iter()
                .map(|addr| {
                    let mut ns = NameServerConfig::udp_and_tcp(addr.ip());
                    for conn in &mut ns.connections {
                        conn.port = addr.port();
                    }
                    ns
                })
                .collect();
            TokioResolver::builder_with_config(
                ResolverConfig::from_name_servers(servers),
                TokioRuntimeProvider::default(),
            )
        };
        let opts = builder.options_mut();
        opts.timeout = timeout;
        opts.attempts = 2;
        opts.cache_size = 0;
        opts.use_hosts_file = ResolveHosts::Never;
        opts.try_tcp_on_error = true;
        let resolver = builder.build().map_err(config_err)?;
        Ok(HickoryDns { resolver })
    }

    async fn lookup_ips(&self, name: Name, rtype: RecordType) -> IpAnswer {
        let lookup = self
            .resolver
            .lookup(name, rtype)
            .await
            .map_err(map_net_error)?;
        let mut ttl = u32::MAX;
        let mut ips = Vec::new();
        for r in lookup.answers() {
            let ip = match &r.data {
                RData::A(a) if rtype == RecordType::A => IpAddr::V4(a.0),
                RData::AAAA(a) if rtype == RecordType::AAAA => IpAddr::V6(a.0),
                _ => continue,
            };
            ttl = ttl.min(r.ttl);
            ips.push(ip);
        }
        if ips.is_empty() {
            return Err(DnsError::NoRecords);
        }
        Ok(Answer {
            records: ips,
            ttl: Duration::from_secs(u64::from(ttl)),
        })
    }
}

fn fqdn(name: &str) -> Result<Name, DnsError> {
    let mut n = Name::from_utf8(name).map_err(|e| DnsError::InvalidName(format!("{name}: {e}")))?;
    n.set_fqdn(true);
    Ok(n)
}

fn map_net_error(e: NetError) -> DnsError {
    match e {
        NetError::Dns(HickoryDnsError::NoRecordsFound(nr)) => match nr.response_code {
            ResponseCode::NXDomain => DnsError::NxDomain,
            _ => DnsError::NoRecords,
        },
        NetError::Dns(HickoryDnsError::ResponseCode(code)) => DnsError::ServFail(code.to_string()),
        NetError::Timeout => DnsError::Timeout,
        other => DnsError::Other(other.to_string()),
    }
}

impl Dns for HickoryDns {
    fn mx(&self, domain: &str) -> BoxFuture<'_, MxAnswer> {
        let name = fqdn(domain);
        Box::pin(async move {
            let lookup = self
                .resolver
                .lookup(name?, RecordType::MX)
                .await
                .map_err(map_net_error)?;
            let mut ttl = u32::MAX;
            let mut mx = Vec::new();
            // Only MX data counts; a CNAME chain's TTL is already folded into these records.
            for r in lookup.answers() {
                if let RData::MX(m) = &r.data {
                    ttl = ttl.min(r.ttl);
                    mx.push((m.preference, m.exchange.to_ascii()));
                }
            }
            if mx.is_empty() {
                return Err(DnsError::NoRecords);
            }
            Ok(Answer {
                records: mx,
                ttl: Duration::from_secs(u64::from(ttl)),
            })
        })
    }

    fn ips(&self, host: &str) -> BoxFuture<'_, IpAnswer> {
        let name = fqdn(host);
        Box::pin(async move {
            let name = name?;
            let (a, aaaa) = tokio::join!(
                self.lookup_ips(name.clone(), RecordType::A),
                self.lookup_ips(name, RecordType::AAAA)
            );
            combine_ips(a, aaaa)
        })
    }
}

/// Merges the A and AAAA answers: any address wins; otherwise a transient failure of either
/// wins (it might have had addresses); NXDOMAIN only if the name does not exist for both.
fn combine_ips(a: IpAnswer, aaaa: IpAnswer) -> IpAnswer {
    match (a, aaaa) {
        (Ok(mut a), Ok(b)) => {
            a.records.extend(b.records);
            a.ttl = a.ttl.min(b.ttl);
            Ok(a)
        }
        (Ok(x), Err(_)) | (Err(_), Ok(x)) => Ok(x),
        (Err(e), Err(f)) => Err(match (e, f) {
            (DnsError::NxDomain, DnsError::NxDomain) => DnsError::NxDomain,
            (e, _) if is_transient(&e) => e,
            (_, f) if is_transient(&f) => f,
            (DnsError::InvalidName(m), _) | (_, DnsError::InvalidName(m)) => {
                DnsError::InvalidName(m)
            }
            _ => DnsError::NoRecords,
        }),
    }
}

fn is_transient(e: &DnsError) -> bool {
    match e {
        DnsError::NxDomain | DnsError::NoRecords | DnsError::InvalidName(_) => false,
        DnsError::ServFail(_) | DnsError::Timeout | DnsError::Other(_) => true,
    }
}

/// Shortest time a successful route is cached, whatever the TTLs say.
pub const MIN_TTL: Duration = Duration::from_secs(5);
/// Longest time a successful route is cached, so DNS changes are seen within the hour.
pub const MAX_TTL: Duration = Duration::from_secs(3600);
/// How long a permanent failure (NXDOMAIN, null MX, no address) is cached: the usual negative
/// caching time when no SOA minimum is at hand (RFC 2308 §5 suggests 1–3 h as a maximum).
pub const PERMANENT_TTL: Duration = Duration::from_secs(300);
/// How long a transient failure is cached: short, but long enough that a burst of messages to a
/// broken domain costs one lookup, not one per message.
pub const TRANSIENT_TTL: Duration = Duration::from_secs(10);
/// A route that lacks some hosts because their lookups failed transiently is kept at most this
/// long, so the missing hosts are looked up again soon.
pub const PARTIAL_TTL: Duration = Duration::from_secs(30);
/// At most this many MX hosts are resolved per domain (bounds the work a hostile zone causes).
pub const MAX_MX_HOSTS: usize = 16;

/// A parsed static route target: `host:port`, `[ipv6]:port`, or `host` (default port).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    pub host: TargetHost,
    pub port: u16,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TargetHost {
    Ip(IpAddr),
    /// Lower-case, no trailing dot; resolved to A/AAAA.
    Name(String),
}

impl Target {
    /// Parses a route target; `default_port` applies when none is given. Config validation can
    /// call this to reject bad targets at startup.
    pub fn parse(s: &str, default_port: u16) -> Result<Target, String> {
        let s = s.trim();
        let bad = || format!("invalid route target {s:?} (expected host:port)");
        let (host, port) = if let Some(rest) = s.strip_prefix('[') {
            let (ip, after) = rest.split_once(']').ok_or_else(bad)?;
            let port = match after {
                "" => None,
                p => Some(p.strip_prefix(':').ok_or_else(bad)?),
            };
            let ip: IpAddr = ip.parse().map_err(|_| bad())?;
            (TargetHost::Ip(ip), port)
        } else if let Ok(ip) = s.parse::<IpAddr>() {
            // A bare IPv6 address has colons but no port.
            (TargetHost::Ip(ip), None)
        } else {
            let (host, port) = match s.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (s, None),
            };
            let host = normalize_domain(host);
            if let Ok(ip) = host.parse::<IpAddr>() {
                (TargetHost::Ip(ip), port)
            } else if valid_ascii_domain(&host) {
                (TargetHost::Name(host), port)
            } else {
                return Err(bad());
            }
        };
        let port = match port {
            None => default_port,
            Some(p) => p.parse::<u16>().ok().filter(|p| *p != 0).ok_or_else(bad)?,
        };
        Ok(Target { host, port })
    }

    fn destination(&self) -> DestinationKey {
        DestinationKey(match &self.host {
            TargetHost::Ip(ip) => format!("[{ip}]:{}", self.port),
            TargetHost::Name(n) => format!("{n}:{}", self.port),
        })
    }
}

/// Lower-cases and drops surrounding space and one trailing dot.
fn normalize_domain(d: &str) -> String {
    let d = d.trim();
    d.strip_suffix('.').unwrap_or(d).to_lowercase()
}

/// LDH-ish syntax check for ASCII names (underscore tolerated, as resolvers do). Non-ASCII
/// names are left to the resolver's IDNA conversion.
fn valid_ascii_domain(d: &str) -> bool {
    !d.is_empty()
        && d.len() <= 253
        && d.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

/// `[192.0.2.1]` or `[IPv6:2001:db8::1]` (RFC 5321 §4.1.3), already lower-cased.
fn address_literal(d: &str) -> Option<Result<IpAddr, String>> {
    let inner = d.strip_prefix('[')?.strip_suffix(']')?;
    let parsed = match inner.strip_prefix("ipv6:") {
        Some(v6) => v6.parse::<std::net::Ipv6Addr>().map(IpAddr::V6).ok(),
        None => inner.parse::<std::net::Ipv4Addr>().map(IpAddr::V4).ok(),
    };
    Some(parsed.ok_or_else(|| format!("invalid address literal {d}")))
}

/// Addresses no SMTP server can be at.
fn usable(ip: &IpAddr) -> bool {
    !(ip.is_unspecified() || ip.is_multicast())
}

type Outcome = Result<Arc<Route>, RouteError>;

struct Entry {
    outcome: Outcome,
    expires: Instant,
}

/// One cache slot per domain. The async lock is held during the lookup, so concurrent callers
/// for the same domain wait for the first one's answer instead of querying too.
type Slot = Arc<tokio::sync::Mutex<Option<Entry>>>;

/// Maps recipient domains to routes, with a cache. Share it as `Arc<Router>`.
pub struct Router {
    statics: HashMap<String, Result<Target, String>>,
    smarthost: Option<Result<Target, String>>,
    port: u16,
    dns: Arc<dyn Dns>,
    cache: Mutex<Cache>,
}

struct Cache {
    slots: HashMap<String, Slot>,
    /// When the map reaches this size, expired slots are swept (amortised; keeps memory
    /// proportional to the domains seen within the TTLs, not to all domains ever seen).
    sweep_at: usize,
}

const SWEEP_MIN: usize = 1024;

impl Router {
    /// `routes`: domain → `"host:port"`, `"*"` = smarthost for every other domain.
    /// `smtp_port`: the port used for MX hosts and for route targets without one (default 25;
    /// tests point it at a loopback server). A target that does not parse makes routing for
    /// its domain fail transiently (an operator error must not bounce mail); use
    /// [`Target::parse`] to reject it at startup instead.
    pub fn new(
        routes: &BTreeMap<String, String>,
        smtp_port: Option<u16>,
        dns: Arc<dyn Dns>,
    ) -> Router {
        let port = smtp_port.unwrap_or(25);
        let mut statics = HashMap::new();
        let mut smarthost = None;
        for (domain, target) in routes {
            let parsed = Target::parse(target, port);
            if domain.trim() == "*" {
                smarthost = Some(parsed);
            } else {
                statics.insert(normalize_domain(domain), parsed);
            }
        }
        Router {
            statics,
            smarthost,
            port,
            dns,
            cache: Mutex::new(Cache {
                slots: HashMap::new(),
                sweep_at: SWEEP_MIN,
            }),
        }
    }

    /// The route for `domain`, from cache when fresh.
    ///
    /// Cached for: success, the minimum TTL of all records used, clamped to
    /// [`MIN_TTL`, `MAX_TTL`] ([`PARTIAL_TTL`] at most if some host lookups failed
    /// transiently); permanent failure, [`PERMANENT_TTL`]; transient failure, [`TRANSIENT_TTL`].
    /// Routes to IP addresses need no DNS and are cached for [`MAX_TTL`].
    pub async fn route(&self, domain: &str) -> Result<Arc<Route>, RouteError> {
        let domain = normalize_domain(domain);
        let slot = self.slot(&domain);
        let mut guard = slot.lock().await;
        let now = Instant::now();
        if let Some(entry) = guard.as_ref() {
            if entry.expires > now {
                return entry.outcome.clone();
            }
        }
        let (outcome, ttl) = self.resolve(&domain).await;
        *guard = Some(Entry {
            outcome: outcome.clone(),
            expires: Instant::now() + ttl,
        });
        outcome
    }

    /// Drops every cached route (e.g. after a config reload or for an operator's "retry now").
    pub fn clear_cache(&self) {
        self.cache
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .slots
            .clear();
    }

    fn slot(&self, domain: &str) -> Slot {
        let mut cache = self.cache.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(slot) = cache.slots.get(domain) {
            return slot.clone();
        }
        if cache.slots.len() >= cache.sweep_at {
            let now = Instant::now();
            // A slot someone holds (lookup in flight) is kept; try_lock never waits.
            cache.slots.retain(|_, s| match s.try_lock() {
                Ok(g) => g.as_ref().is_some_and(|e| e.expires > now),
                Err(_) => true,
            });
            cache.sweep_at = (cache.slots.len() * 2).max(SWEEP_MIN);
        }
        let slot = Slot::default();
        cache.slots.insert(domain.to_owned(), slot.clone());
        slot
    }

    /// The uncached lookup: outcome and how long to keep it.
    async fn resolve(&self, domain: &str) -> (Outcome, Duration) {
        match self.resolve_inner(domain).await {
            Ok((route, ttl)) => (Ok(Arc::new(route)), ttl),
            Err(e @ RouteError::Permanent(_)) => (Err(e), PERMANENT_TTL),
            Err(e @ RouteError::Transient(_)) => (Err(e), TRANSIENT_TTL),
        }
    }

    async fn resolve_inner(&self, domain: &str) -> Result<(Route, Duration), RouteError> {
        if domain.is_empty() {
            return Err(RouteError::Permanent("empty domain".into()));
        }
        if let Some(lit) = address_literal(domain) {
            let ip = lit.map_err(RouteError::Permanent)?;
            let target = Target {
                host: TargetHost::Ip(ip),
                port: self.port,
            };
            return self.resolve_target(&target).await;
        }
        if let Some(target) = self.statics.get(domain).or(self.smarthost.as_ref()) {
            let target = target
                .as_ref()
                .map_err(|e| RouteError::Transient(e.clone()))?;
            return self.resolve_target(target).await;
        }
        if domain.is_ascii() && !valid_ascii_domain(domain) {
            return Err(RouteError::Permanent(format!("invalid domain {domain:?}")));
        }
        self.resolve_mx(domain).await
    }

    /// A static route. Its DNS failures are all transient: the target is the operator's
    /// choice, and a missing host there is a configuration problem, not the recipient's.
    async fn resolve_target(&self, target: &Target) -> Result<(Route, Duration), RouteError> {
        let (name, addrs, ttl) = match &target.host {
            TargetHost::Ip(ip) => (
                ip.to_string(),
                vec![SocketAddr::new(*ip, target.port)],
                MAX_TTL,
            ),
            TargetHost::Name(host) => {
                let ans =
                    self.dns.ips(host).await.map_err(|e| {
                        RouteError::Transient(format!("static route host {host}: {e}"))
                    })?;
                let addrs: Vec<SocketAddr> = ans
                    .records
                    .iter()
                    .filter(|ip| usable(ip))
                    .map(|ip| SocketAddr::new(*ip, target.port))
                    .collect();
                if addrs.is_empty() {
                    return Err(RouteError::Transient(format!(
                        "static route host {host} has no usable address"
                    )));
                }
                (host.clone(), addrs, ans.ttl.clamp(MIN_TTL, MAX_TTL))
            }
        };
        let route = Route {
            destination: target.destination(),
            hosts: vec![MxHost {
                name,
                preference: 0,
                addrs,
            }],
        };
        Ok((route, ttl))
    }

    async fn resolve_mx(&self, domain: &str) -> Result<(Route, Duration), RouteError> {
        let mx = match self.dns.mx(domain).await {
            Ok(ans) if !ans.records.is_empty() => ans,
            Ok(_) | Err(DnsError::NoRecords) => return self.implicit_mx(domain).await,
            Err(DnsError::NxDomain) => {
                return Err(RouteError::Permanent(format!(
                    "domain {domain} does not exist (NXDOMAIN)"
                )));
            }
            Err(DnsError::InvalidName(m)) => return Err(RouteError::Permanent(m)),
            Err(e @ (DnsError::ServFail(_) | DnsError::Timeout | DnsError::Other(_))) => {
                return Err(RouteError::Transient(format!(
                    "MX lookup for {domain}: {e}"
                )));
            }
        };
        // RFC 7505 §3: a null MX is "." (an empty exchange name) and must be the only MX.
        // If it is mixed with real ones anyway, the real ones are used.
        let mut records: Vec<(u16, String)> = mx
            .records
            .into_iter()
            .map(|(pref, name)| (pref, normalize_domain(&name)))
            .collect();
        let had_any = !records.is_empty();
        records.retain(|(_, name)| !name.is_empty());
        if records.is_empty() && had_any {
            return Err(RouteError::Permanent(format!(
                "domain {domain} does not accept mail (null MX, RFC 7505)"
            )));
        }
        // A host listed twice keeps its best preference.
        records.sort_by(|a, b| a.1.cmp(&b.1).then(a.0.cmp(&b.0)));
        records.dedup_by(|later, kept| later.1 == kept.1);
        // Preference ascending, equal preferences in random order (RFC 5321 §5.1).
        records.sort_by_key(|(pref, _)| *pref);
        {
            let mut rng = rand::thread_rng();
            let mut i = 0;
            while i < records.len() {
                let pref = records[i].0;
                let j = records[i..]
                    .iter()
                    .position(|r| r.0 != pref)
                    .map_or(records.len(), |k| i + k);
                records[i..j].shuffle(&mut rng);
                i = j;
            }
        }
        records.truncate(MAX_MX_HOSTS);

        let mut names: Vec<&str> = records.iter().map(|(_, n)| n.as_str()).collect();
        names.sort_unstable();
        names.dedup();
        let destination = DestinationKey(names.join(","));

        // Resolve the hosts concurrently, keep the try order.
        let mut lookups = tokio::task::JoinSet::new();
        for (i, (_, name)) in records.iter().enumerate() {
            let dns = self.dns.clone();
            let name = name.clone();
            lookups.spawn(async move { (i, dns.ips(&name).await) });
        }
        let mut results: Vec<Option<IpAnswer>> = vec![None; records.len()];
        // A task that panicked leaves its host at None: counted as a transient failure.
        while let Some(joined) = lookups.join_next().await {
            if let Ok((i, r)) = joined {
                if let Some(slot) = results.get_mut(i) {
                    *slot = Some(r);
                }
            }
        }

        let mut ttl = mx.ttl;
        let mut hosts = Vec::new();
        let mut transient: Vec<String> = Vec::new();
        let mut permanent: Vec<String> = Vec::new();
        for ((pref, name), result) in records.into_iter().zip(results) {
            match result {
                Some(Ok(ans)) => {
                    let addrs: Vec<SocketAddr> = ans
                        .records
                        .iter()
                        .filter(|ip| usable(ip))
                        .map(|ip| SocketAddr::new(*ip, self.port))
                        .collect();
                    if addrs.is_empty() {
                        permanent.push(format!("{name}: no usable address"));
                        continue;
                    }
                    ttl = ttl.min(ans.ttl);
                    hosts.push(MxHost {
                        name,
                        preference: pref,
                        addrs,
                    });
                }
                Some(Err(e)) if is_transient(&e) => transient.push(format!("{name}: {e}")),
                Some(Err(e)) => permanent.push(format!("{name}: {e}")),
                None => transient.push(format!("{name}: lookup did not finish")),
            }
        }
        if hosts.is_empty() {
            let mut why = transient.clone();
            why.extend(permanent);
            let msg = format!("no MX host of {domain} has an address ({})", why.join("; "));
            return Err(if transient.is_empty() {
                RouteError::Permanent(msg)
            } else {
                RouteError::Transient(msg)
            });
        }
        let mut ttl = ttl.clamp(MIN_TTL, MAX_TTL);
        if !transient.is_empty() {
            ttl = ttl.min(PARTIAL_TTL);
        }
        Ok((Route { destination, hosts }, ttl))
    }

    /// RFC 5321 §5.1: no MX records → the domain itself is the only host, preference 0.
    async fn implicit_mx(&self, domain: &str) -> Result<(Route, Duration), RouteError> {
        let ans = match self.dns.ips(domain).await {
            Ok(ans) => ans,
            Err(e @ (DnsError::NxDomain | DnsError::NoRecords | DnsError::InvalidName(_))) => {
                return Err(RouteError::Permanent(format!(
                    "domain {domain} has no MX and no address ({e})"
                )));
            }
            Err(e @ (DnsError::ServFail(_) | DnsError::Timeout | DnsError::Other(_))) => {
                return Err(RouteError::Transient(format!(
                    "address lookup for {domain} (implicit MX): {e}"
                )));
            }
        };
        let addrs: Vec<SocketAddr> = ans
            .records
            .iter()
            .filter(|ip| usable(ip))
            .map(|ip| SocketAddr::new(*ip, self.port))
            .collect();
        if addrs.is_empty() {
            return Err(RouteError::Permanent(format!(
                "domain {domain} has no MX and no usable address"
            )));
        }
        let route = Route {
            destination: DestinationKey(domain.to_owned()),
            hosts: vec![MxHost {
                name: domain.to_owned(),
                preference: 0,
                addrs,
            }],
        };
        Ok((route, ans.ttl.clamp(MIN_TTL, MAX_TTL)))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use std::collections::BTreeSet;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// An in-memory zone. Unknown names are NXDOMAIN; a name listed only in `ips` has no MX
    /// (NODATA), as in real DNS.
    #[derive(Default)]
    struct Zone {
        mx: Mutex<HashMap<String, MxAnswer>>,
        ips: Mutex<HashMap<String, IpAnswer>>,
        mx_calls: AtomicUsize,
        ip_calls: AtomicUsize,
        /// Every lookup takes this long (to make concurrent callers overlap).
        delay: Duration,
    }

    fn secs(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    impl Zone {
        fn mx(self, domain: &str, ttl: u64, records: &[(u16, &str)]) -> Self {
            let records = records.iter().map(|(p, n)| (*p, (*n).to_owned())).collect();
            self.mx.lock().unwrap().insert(
                domain.into(),
                Ok(Answer {
                    records,
                    ttl: secs(ttl),
                }),
            );
            self
        }
        fn mx_err(self, domain: &str, e: DnsError) -> Self {
            self.mx.lock().unwrap().insert(domain.into(), Err(e));
            self
        }
        fn ip(self, host: &str, ttl: u64, ips: &[&str]) -> Self {
            let records = ips.iter().map(|s| s.parse().unwrap()).collect();
            self.ips.lock().unwrap().insert(
                host.into(),
                Ok(Answer {
                    records,
                    ttl: secs(ttl),
                }),
            );
            self
        }
        fn ip_err(self, host: &str, e: DnsError) -> Self {
            self.ips.lock().unwrap().insert(host.into(), Err(e));
            self
        }
        fn calls(&self) -> usize {
            self.mx_calls.load(Ordering::SeqCst) + self.ip_calls.load(Ordering::SeqCst)
        }
    }

    impl Dns for Zone {
        fn mx(&self, domain: &str) -> BoxFuture<'_, MxAnswer> {
            let domain = domain.to_owned();
            Box::pin(async move {
                self.mx_calls.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(self.delay).await;
                if let Some(r) = self.mx.lock().unwrap().get(&domain) {
                    return r.clone();
                }
                if self.ips.lock().unwrap().contains_key(&domain) {
                    return Err(DnsError::NoRecords);
                }
                Err(DnsError::NxDomain)
            })
        }
        fn ips(&self, host: &str) -> BoxFuture<'_, IpAnswer> {
            let host = host.to_owned();
            Box::pin(async move {
                self.ip_calls.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(self.delay).await;
                if let Some(r) = self.ips.lock().unwrap().get(&host) {
                    return r.clone();
                }
                if self.mx.lock().unwrap().contains_key(&host) {
                    return Err(DnsError::NoRecords);
                }
                Err(DnsError::NxDomain)
            })
        }
    }

    fn router(zone: Zone) -> (Router, Arc<Zone>) {
        router_with(zone, &[], None)
    }

    fn router_with(zone: Zone, routes: &[(&str, &str)], port: Option<u16>) -> (Router, Arc<Zone>) {
        let zone = Arc::new(zone);
        let routes = routes
            .iter()
            .map(|(d, t)| ((*d).to_owned(), (*t).to_owned()))
            .collect();
        (Router::new(&routes, port, zone.clone()), zone)
    }

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn names(r: &Route) -> Vec<&str> {
        r.hosts.iter().map(|h| h.name.as_str()).collect()
    }

    fn permanent(r: Result<Arc<Route>, RouteError>) -> String {
        match r {
            Err(RouteError::Permanent(m)) => m,
            other => panic!("expected a permanent failure, got {other:?}"),
        }
    }

    fn transient(r: Result<Arc<Route>, RouteError>) -> String {
        match r {
            Err(RouteError::Transient(m)) => m,
            other => panic!("expected a transient failure, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn mx_hosts_in_preference_order_with_addresses_and_port() {
        let zone = Zone::default()
            .mx(
                "a.test",
                300,
                &[(20, "mx2.a.test."), (5, "MX0.a.test"), (10, "mx1.a.test")],
            )
            .ip("mx0.a.test", 300, &["192.0.2.10", "2001:db8::10"])
            .ip("mx1.a.test", 300, &["192.0.2.11"])
            .ip("mx2.a.test", 300, &["192.0.2.12"]);
        let (router, _) = router(zone);
        let r = router.route("a.test").await.unwrap();
        assert_eq!(names(&r), ["mx0.a.test", "mx1.a.test", "mx2.a.test"]);
        assert_eq!(
            r.hosts.iter().map(|h| h.preference).collect::<Vec<_>>(),
            [5, 10, 20]
        );
        assert_eq!(
            r.hosts[0].addrs,
            [sa("192.0.2.10:25"), sa("[2001:db8::10]:25")]
        );
        assert_eq!(
            r.destination,
            DestinationKey("mx0.a.test,mx1.a.test,mx2.a.test".into())
        );
    }

    #[tokio::test]
    async fn smtp_port_override_applies_to_mx_hosts() {
        let zone = Zone::default().mx("a.test", 300, &[(10, "mx.a.test")]).ip(
            "mx.a.test",
            300,
            &["127.0.0.1"],
        );
        let (router, _) = router_with(zone, &[], Some(2525));
        let r = router.route("a.test").await.unwrap();
        assert_eq!(r.hosts[0].addrs, [sa("127.0.0.1:2525")]);
    }

    #[tokio::test]
    async fn equal_preferences_are_shuffled_but_stay_within_their_rank() {
        let zone = Zone::default()
            .mx(
                "a.test",
                300,
                &[
                    (10, "x.a.test"),
                    (10, "y.a.test"),
                    (10, "z.a.test"),
                    (20, "last.a.test"),
                    (5, "first.a.test"),
                ],
            )
            .ip("x.a.test", 300, &["192.0.2.1"])
            .ip("y.a.test", 300, &["192.0.2.2"])
            .ip("z.a.test", 300, &["192.0.2.3"])
            .ip("last.a.test", 300, &["192.0.2.4"])
            .ip("first.a.test", 300, &["192.0.2.5"]);
        let (router, _) = router(zone);
        let mut orders = BTreeSet::new();
        for _ in 0..200 {
            router.clear_cache();
            let r = router.route("a.test").await.unwrap();
            let n = names(&r);
            assert_eq!(n.len(), 5);
            assert_eq!(n[0], "first.a.test");
            assert_eq!(n[4], "last.a.test");
            let mut middle: Vec<&str> = n[1..4].to_vec();
            orders.insert(middle.join(","));
            middle.sort_unstable();
            assert_eq!(middle, ["x.a.test", "y.a.test", "z.a.test"]);
            // The destination does not depend on the shuffle.
            assert_eq!(
                r.destination.0,
                "first.a.test,last.a.test,x.a.test,y.a.test,z.a.test"
            );
        }
        // 6 permutations; all of them turn up in 200 runs except with negligible probability.
        assert_eq!(orders.len(), 6, "{orders:?}");
    }

    #[tokio::test]
    async fn no_mx_means_implicit_mx_from_the_domains_own_addresses() {
        let zone = Zone::default().ip("b.test", 300, &["192.0.2.20", "2001:db8::20"]);
        let (router, _) = router(zone);
        let r = router.route("b.test").await.unwrap();
        assert_eq!(
            r.hosts,
            [MxHost {
                name: "b.test".into(),
                preference: 0,
                addrs: vec![sa("192.0.2.20:25"), sa("[2001:db8::20]:25")]
            }]
        );
        assert_eq!(r.destination.0, "b.test");
    }

    #[tokio::test]
    async fn empty_mx_answer_is_treated_as_no_mx() {
        let zone = Zone::default()
            .mx("b.test", 300, &[])
            .ip("b.test", 300, &["192.0.2.20"]);
        let (router, _) = router(zone);
        assert_eq!(names(&router.route("b.test").await.unwrap()), ["b.test"]);
    }

    #[tokio::test]
    async fn no_mx_and_no_address_is_permanent() {
        let zone = Zone::default()
            .mx("c.test", 300, &[])
            .ip_err("c.test", DnsError::NoRecords);
        let (router, _) = router(zone);
        let m = permanent(router.route("c.test").await);
        assert!(m.contains("no MX and no address"), "{m}");
    }

    #[tokio::test]
    async fn implicit_mx_servfail_is_transient() {
        let zone = Zone::default()
            .mx_err("c.test", DnsError::NoRecords)
            .ip_err("c.test", DnsError::ServFail("SERVFAIL".into()));
        let (router, _) = router(zone);
        transient(router.route("c.test").await);
    }

    #[tokio::test]
    async fn null_mx_is_permanent() {
        for exchange in [".", ""] {
            let zone = Zone::default().mx("null.test", 300, &[(0, exchange)]).ip(
                "null.test",
                300,
                &["192.0.2.1"],
            );
            let (router, _) = router(zone);
            let m = permanent(router.route("null.test").await);
            assert!(m.contains("null MX, RFC 7505"), "{m}");
        }
    }

    #[tokio::test]
    async fn null_mx_mixed_with_real_mx_uses_the_real_ones() {
        let zone = Zone::default()
            .mx("d.test", 300, &[(0, "."), (10, "mx.d.test")])
            .ip("mx.d.test", 300, &["192.0.2.1"]);
        let (router, _) = router(zone);
        assert_eq!(names(&router.route("d.test").await.unwrap()), ["mx.d.test"]);
    }

    #[tokio::test]
    async fn nxdomain_is_permanent() {
        let (router, _) = router(Zone::default());
        let m = permanent(router.route("nowhere.test").await);
        assert!(m.contains("NXDOMAIN"), "{m}");
    }

    #[tokio::test]
    async fn servfail_and_timeout_are_transient() {
        let zone = Zone::default()
            .mx_err("sf.test", DnsError::ServFail("SERVFAIL".into()))
            .mx_err("to.test", DnsError::Timeout)
            .mx_err("io.test", DnsError::Other("connection refused".into()));
        let (router, _) = router(zone);
        for d in ["sf.test", "to.test", "io.test"] {
            transient(router.route(d).await);
        }
    }

    #[tokio::test]
    async fn a_host_listed_twice_is_tried_once_at_its_best_preference() {
        let zone = Zone::default()
            .mx(
                "a.test",
                300,
                &[(30, "x.a.test"), (20, "y.a.test"), (10, "X.a.test.")],
            )
            .ip("x.a.test", 300, &["192.0.2.1"])
            .ip("y.a.test", 300, &["192.0.2.2"]);
        let (router, _) = router(zone);
        let r = router.route("a.test").await.unwrap();
        assert_eq!(names(&r), ["x.a.test", "y.a.test"]);
        assert_eq!(r.hosts[0].preference, 10);
    }

    #[tokio::test(start_paused = true)]
    async fn expired_cache_slots_are_swept() {
        let (router, _) = router(Zone::default());
        for i in 0..SWEEP_MIN + 10 {
            permanent(router.route(&format!("d{i}.test")).await);
        }
        let len = || router.cache.lock().unwrap().slots.len();
        assert!(len() >= SWEEP_MIN);
        tokio::time::advance(PERMANENT_TTL + secs(1)).await;
        for i in 0..SWEEP_MIN {
            permanent(router.route(&format!("e{i}.test")).await);
        }
        // The d* slots expired and went at the sweep; the map did not double.
        assert!(len() <= SWEEP_MIN + 10, "{}", len());
    }

    #[tokio::test]
    async fn hosts_without_address_are_skipped() {
        let zone = Zone::default()
            .mx("e.test", 300, &[(10, "gone.e.test"), (20, "mx.e.test")])
            .ip("mx.e.test", 300, &["192.0.2.1"]);
        let (router, _) = router(zone);
        assert_eq!(names(&router.route("e.test").await.unwrap()), ["mx.e.test"]);
    }

    #[tokio::test]
    async fn no_host_with_address_is_permanent_unless_a_lookup_failed_transiently() {
        let zone = Zone::default()
            .mx("f.test", 300, &[(10, "gone1.f.test"), (20, "gone2.f.test")])
            .mx("g.test", 300, &[(10, "gone.g.test"), (20, "broken.g.test")])
            .ip_err("broken.g.test", DnsError::Timeout)
            .mx("h.test", 300, &[(10, "zero.h.test")])
            .ip("zero.h.test", 300, &["0.0.0.0"]);
        let (router, _) = router(zone);
        let m = permanent(router.route("f.test").await);
        assert!(
            m.contains("gone1.f.test") && m.contains("gone2.f.test"),
            "{m}"
        );
        let m = transient(router.route("g.test").await);
        assert!(m.contains("broken.g.test"), "{m}");
        permanent(router.route("h.test").await);
    }

    #[tokio::test]
    async fn static_route_beats_smarthost_beats_mx() {
        let zone = Zone::default()
            .mx("a.test", 300, &[(10, "mx.a.test")])
            .ip("mx.a.test", 300, &["192.0.2.1"])
            .ip("relay.test", 300, &["192.0.2.99"]);
        let routes = [
            ("Static.Test.", "127.0.0.1:2525"),
            ("*", "relay.test:587"),
            ("v6.test", "[::1]:26"),
        ];
        let (router, _) = router_with(zone, &routes, None);
        let r = router.route("static.test").await.unwrap();
        assert_eq!(r.destination.0, "[127.0.0.1]:2525");
        assert_eq!(r.hosts[0].addrs, [sa("127.0.0.1:2525")]);
        let r = router.route("v6.test").await.unwrap();
        assert_eq!(r.destination.0, "[::1]:26");
        // Everything else, even a domain with MX records, goes to the smarthost.
        let r = router.route("a.test").await.unwrap();
        assert_eq!(r.destination.0, "relay.test:587");
        assert_eq!(
            r.hosts,
            [MxHost {
                name: "relay.test".into(),
                preference: 0,
                addrs: vec![sa("192.0.2.99:587")]
            }]
        );
        assert_eq!(
            router.route("other.test").await.unwrap().destination.0,
            "relay.test:587"
        );
    }

    #[tokio::test]
    async fn static_route_without_port_uses_the_smtp_port_and_bad_targets_are_transient() {
        let zone = Zone::default().ip("relay.test", 300, &["192.0.2.99"]);
        let routes = [
            ("a.test", "relay.test"),
            ("b.test", "relay.test:notaport"),
            ("c.test", "missing.test:25"),
        ];
        let (router, _) = router_with(zone, &routes, Some(2526));
        assert_eq!(
            router.route("a.test").await.unwrap().hosts[0].addrs,
            [sa("192.0.2.99:2526")]
        );
        transient(router.route("b.test").await);
        // A static route's host that does not resolve is the operator's problem: retry.
        transient(router.route("c.test").await);
    }

    #[tokio::test]
    async fn address_literals_route_directly() {
        let (router, zone) = router_with(Zone::default(), &[("*", "relay.test:25")], Some(2525));
        let r = router.route("[127.0.0.1]").await.unwrap();
        assert_eq!(r.destination.0, "[127.0.0.1]:2525");
        assert_eq!(r.hosts[0].addrs, [sa("127.0.0.1:2525")]);
        let r = router.route("[IPv6:::1]").await.unwrap();
        assert_eq!(r.hosts[0].addrs, [sa("[::1]:2525")]);
        permanent(router.route("[not.an.ip]").await);
        permanent(router.route("[::1]").await); // IPv6 needs the "IPv6:" tag
        assert_eq!(zone.calls(), 0);
    }

    #[tokio::test]
    async fn invalid_domains_are_permanent_without_dns() {
        let (router, zone) = router(Zone::default());
        for d in ["", ".", "a..test", "a b.test", "x@y.test"] {
            permanent(router.route(d).await);
        }
        assert_eq!(zone.calls(), 0);
    }

    #[tokio::test]
    async fn domains_sharing_mx_hosts_share_a_destination() {
        let zone = Zone::default()
            .mx(
                "one.test",
                300,
                &[(10, "mx1.hoster.test"), (20, "mx2.hoster.test")],
            )
            .mx(
                "two.test",
                300,
                &[(5, "MX2.hoster.test."), (5, "mx1.hoster.test")],
            )
            .mx("three.test", 300, &[(10, "mx1.hoster.test")])
            .ip("mx1.hoster.test", 300, &["192.0.2.1"])
            .ip("mx2.hoster.test", 300, &["192.0.2.2"]);
        let (router, _) = router(zone);
        let one = router.route("one.test").await.unwrap();
        let two = router.route("two.test").await.unwrap();
        let three = router.route("three.test").await.unwrap();
        assert_eq!(one.destination, two.destination);
        assert_eq!(one.destination.0, "mx1.hoster.test,mx2.hoster.test");
        assert_ne!(one.destination, three.destination);
    }

    #[tokio::test(start_paused = true)]
    async fn cache_respects_the_minimum_ttl_of_the_records_used() {
        // MX TTL 600, but one host's addresses only 60: the route lives 60 s.
        let zone = Zone::default()
            .mx("a.test", 600, &[(10, "mx1.a.test"), (20, "mx2.a.test")])
            .ip("mx1.a.test", 600, &["192.0.2.1"])
            .ip("mx2.a.test", 60, &["192.0.2.2"]);
        let (router, zone) = router(zone);
        let first = router.route("A.Test.").await.unwrap();
        assert_eq!(zone.calls(), 3);
        tokio::time::advance(secs(59)).await;
        let again = router.route("a.test").await.unwrap();
        assert!(Arc::ptr_eq(&first, &again));
        assert_eq!(zone.calls(), 3);
        tokio::time::advance(secs(2)).await;
        router.route("a.test").await.unwrap();
        assert_eq!(zone.calls(), 6);
    }

    #[tokio::test(start_paused = true)]
    async fn ttls_are_clamped() {
        let zone = Zone::default()
            .mx("short.test", 0, &[(10, "mx.short.test")])
            .ip("mx.short.test", 1, &["192.0.2.1"])
            .mx("long.test", 86400, &[(10, "mx.long.test")])
            .ip("mx.long.test", 86400, &["192.0.2.1"]);
        let (router, zone) = router(zone);
        router.route("short.test").await.unwrap();
        router.route("long.test").await.unwrap();
        assert_eq!(zone.calls(), 4);
        tokio::time::advance(MIN_TTL - secs(1)).await;
        router.route("short.test").await.unwrap();
        assert_eq!(zone.calls(), 4);
        tokio::time::advance(secs(2)).await;
        router.route("short.test").await.unwrap();
        assert_eq!(zone.calls(), 6);
        tokio::time::advance(MAX_TTL).await;
        router.route("long.test").await.unwrap();
        assert_eq!(zone.calls(), 8);
    }

    #[tokio::test(start_paused = true)]
    async fn failures_are_cached_permanent_longer_than_transient() {
        let zone = Zone::default().mx_err("sf.test", DnsError::ServFail("SERVFAIL".into()));
        let (router, zone) = router(zone);
        permanent(router.route("nx.test").await);
        transient(router.route("sf.test").await);
        assert_eq!(zone.calls(), 2);
        tokio::time::advance(TRANSIENT_TTL - secs(1)).await;
        permanent(router.route("nx.test").await);
        transient(router.route("sf.test").await);
        assert_eq!(zone.calls(), 2);
        tokio::time::advance(secs(2)).await;
        transient(router.route("sf.test").await);
        assert_eq!(zone.calls(), 3);
        permanent(router.route("nx.test").await);
        assert_eq!(zone.calls(), 3);
        tokio::time::advance(PERMANENT_TTL).await;
        permanent(router.route("nx.test").await);
        assert_eq!(zone.calls(), 4);
    }

    #[tokio::test(start_paused = true)]
    async fn a_route_missing_a_host_after_a_transient_failure_is_kept_briefly() {
        let zone = Zone::default()
            .mx("a.test", 3600, &[(10, "mx1.a.test"), (20, "mx2.a.test")])
            .ip("mx1.a.test", 3600, &["192.0.2.1"])
            .ip_err("mx2.a.test", DnsError::Timeout);
        let (router, zone) = router(zone);
        assert_eq!(
            names(&router.route("a.test").await.unwrap()),
            ["mx1.a.test"]
        );
        tokio::time::advance(PARTIAL_TTL + secs(1)).await;
        router.route("a.test").await.unwrap();
        assert_eq!(zone.calls(), 6);
    }

    #[tokio::test(start_paused = true)]
    async fn concurrent_lookups_for_one_domain_do_not_stampede() {
        let zone = Zone {
            delay: Duration::from_millis(100),
            ..Zone::default()
        }
        .mx("a.test", 300, &[(10, "mx.a.test")])
        .ip("mx.a.test", 300, &["192.0.2.1"]);
        let (router, zone) = router(zone);
        let router = Arc::new(router);
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..20 {
            let router = router.clone();
            tasks.spawn(async move { router.route("a.test").await });
        }
        while let Some(r) = tasks.join_next().await {
            r.unwrap().unwrap();
        }
        assert_eq!(zone.calls(), 2);
    }

    #[test]
    fn target_parsing() {
        let ip = |s: &str| TargetHost::Ip(s.parse().unwrap());
        let name = |s: &str| TargetHost::Name(s.into());
        let ok: &[(&str, TargetHost, u16)] = &[
            ("127.0.0.1:2525", ip("127.0.0.1"), 2525),
            ("127.0.0.1", ip("127.0.0.1"), 25),
            ("[::1]:26", ip("::1"), 26),
            ("[::1]", ip("::1"), 25),
            ("::1", ip("::1"), 25),
            ("Relay.Example.TEST.:587", name("relay.example.test"), 587),
            ("relay.test", name("relay.test"), 25),
        ];
        for (s, host, port) in ok {
            assert_eq!(
                Target::parse(s, 25),
                Ok(Target {
                    host: host.clone(),
                    port: *port
                }),
                "{s}"
            );
        }
        for s in [
            "",
            ":25",
            "relay.test:",
            "relay.test:0",
            "relay.test:65536",
            "[::1]x",
            "[nope]:25",
            "a b:25",
        ] {
            assert!(Target::parse(s, 25).is_err(), "{s:?} should not parse");
        }
    }

    #[test]
    fn a_and_aaaa_answers_combine() {
        let v4: IpAddr = "192.0.2.1".parse().unwrap();
        let v6: IpAddr = "2001:db8::1".parse().unwrap();
        let ok = |ip: IpAddr, ttl| {
            Ok(Answer {
                records: vec![ip],
                ttl: secs(ttl),
            })
        };
        let both = combine_ips(ok(v4, 30), ok(v6, 20)).unwrap();
        assert_eq!((both.records, both.ttl), (vec![v4, v6], secs(20)));
        assert_eq!(
            combine_ips(ok(v4, 30), Err(DnsError::Timeout))
                .unwrap()
                .records,
            [v4]
        );
        assert_eq!(
            combine_ips(Err(DnsError::NoRecords), ok(v6, 5))
                .unwrap()
                .records,
            [v6]
        );
        let sf = || DnsError::ServFail("x".into());
        let cases = [
            (DnsError::NxDomain, DnsError::NxDomain, DnsError::NxDomain),
            (
                DnsError::NoRecords,
                DnsError::NoRecords,
                DnsError::NoRecords,
            ),
            (DnsError::NxDomain, DnsError::NoRecords, DnsError::NoRecords),
            (DnsError::NoRecords, sf(), sf()),
            (DnsError::Timeout, DnsError::NxDomain, DnsError::Timeout),
        ];
        for (a, b, want) in cases {
            assert_eq!(
                combine_ips(Err(a.clone()), Err(b.clone())),
                Err(want),
                "{a:?} + {b:?}"
            );
        }
    }
}
