//! `nodemesh stat` and `nodemesh top`: the golden signals of every workload
//! edge, read from the admin API (`/metrics`) of one or many daemons.
//!
//! Owns the sampling (two scrapes of every daemon an interval apart), the
//! arithmetic that turns the counters into a window's rates per edge
//! (traffic, success, bytes, duration percentiles, mTLS) and per daemon
//! (pods, active connections, tunnels, certificate expiry, connections
//! refused by admission limits, relay buffer memory), and the tables.
//! Pure functions over [`Sample`]s ([`window`], [`render`]); the scrape is
//! [`crate::admin_client`].

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::metrics as m;
use crate::promtext::{self, Sample};

/// How long one scrape may take.
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(5);

/// Which daemon's view of a connection to count: each connection is
/// reported by its source node's daemon (L1) and its destination node's
/// (L2); counting one side counts it once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Side {
    /// The source node's daemon (L1): every connection a meshed pod opens.
    Source,
    /// The destination node's daemon (L2): also connections from unmeshed
    /// clients, and the denials decided there.
    Destination,
}

impl Side {
    fn label(self) -> &'static str {
        match self {
            Side::Source => "source",
            Side::Destination => "destination",
        }
    }
}

/// A source and destination workload.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct EdgeKey {
    /// `namespace/workload` of the client.
    pub src: String,
    /// `namespace/workload` of the server.
    pub dst: String,
}

/// One edge over a window.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EdgeStats {
    /// Connections opened per second.
    pub opened_per_s: f64,
    /// Connections that failed before relaying, per second.
    pub failed_per_s: f64,
    /// Bytes per second, client to server.
    pub out_bytes_per_s: f64,
    /// Bytes per second, server to client.
    pub in_bytes_per_s: f64,
    /// Opened connections carried with mTLS (`tls="true"`), per second.
    pub tls_per_s: f64,
    /// Routes seen (`tunnel`, `local`, `passthrough`, `plaintext`).
    pub routes: BTreeSet<String>,
    /// p50 and p99 of the duration of connections closed in the window,
    /// seconds (bucket upper bounds), if any closed.
    pub duration_p50_p99: Option<(f64, f64)>,
}

impl EdgeStats {
    /// Share of connection attempts that were relayed.
    pub fn success(&self) -> Option<f64> {
        let total = self.opened_per_s + self.failed_per_s;
        (total > 0.0).then(|| self.opened_per_s / total)
    }
}

/// One daemon at the end of the window.
#[derive(Debug, Clone, PartialEq)]
pub struct DaemonStats {
    /// Its admin address.
    pub addr: SocketAddr,
    /// Pods it serves.
    pub pods: f64,
    /// Connections it relays now.
    pub active: f64,
    /// Tunnel connections open.
    pub tunnels: f64,
    /// Days until its earliest certificate expires, if it reports one.
    pub cert_days: Option<f64>,
    /// Connections refused by its admission limits per second in the
    /// window (`nodemesh_connections_limited_total`).
    pub limited_per_s: f64,
    /// Bytes of relay buffers lent to busy connections now.
    pub relay_buffer_bytes: f64,
    /// Busy connection directions per second that found the relay buffer
    /// budget spent in the window.
    pub fallbacks_per_s: f64,
    /// CPU the daemon used in the window, percent of one core
    /// (`process_cpu_seconds_total`), if it reports it.
    pub cpu_percent: Option<f64>,
    /// Its resident memory now (`process_resident_memory_bytes`), if it
    /// reports it.
    pub resident_bytes: Option<f64>,
}

/// A counter's increase from `before` to `after` (a restarted daemon's
/// counters start again at zero: then the whole value counts).
fn increase(before: f64, after: f64) -> f64 {
    if after >= before {
        after - before
    } else {
        after
    }
}

fn key(s: &Sample) -> EdgeKey {
    EdgeKey {
        src: format!("{}/{}", s.label("src_namespace"), s.label("src_workload")),
        dst: format!("{}/{}", s.label("dst_namespace"), s.label("dst_workload")),
    }
}

/// Identity of a series (name and labels) within one daemon's page.
fn series_id(s: &Sample) -> (String, Vec<(String, String)>) {
    (
        s.name.clone(),
        s.labels
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
    )
}

/// The per-edge rates between two scrapes of the same daemons (`before[i]`
/// and `after[i]` are daemon `i`), over `seconds`, counting `side`'s reports.
pub fn window(
    before: &[Vec<Sample>],
    after: &[Vec<Sample>],
    seconds: f64,
    side: Side,
) -> BTreeMap<EdgeKey, EdgeStats> {
    let mut edges: BTreeMap<EdgeKey, EdgeStats> = BTreeMap::new();
    // Duration histogram deltas per edge: upper bound -> cumulative count.
    let mut buckets: BTreeMap<EdgeKey, BTreeMap<u64, f64>> = BTreeMap::new();
    let seconds = seconds.max(f64::EPSILON);
    let bucket_name = format!("{}_bucket", m::CONNECTION_DURATION);
    let relevant = [m::CONNECTIONS_OPENED, m::CONNECTIONS_FAILED, m::TCP_BYTES];
    for (b, a) in before.iter().zip(after) {
        let old: BTreeMap<_, f64> = b.iter().map(|s| (series_id(s), s.value)).collect();
        for s in a {
            if s.label("reporter") != side.label() {
                continue;
            }
            let delta = increase(old.get(&series_id(s)).copied().unwrap_or(0.0), s.value);
            if s.name == bucket_name {
                let le = match s.label("le") {
                    "+Inf" => f64::INFINITY,
                    v => v.parse().unwrap_or(f64::INFINITY),
                };
                *buckets
                    .entry(key(s))
                    .or_default()
                    .entry(le.to_bits())
                    .or_insert(0.0) += delta;
                continue;
            }
            let rate = delta / seconds;
            let name = s.name.as_str();
            if !relevant.contains(&name) {
                continue;
            }
            let e = edges.entry(key(s)).or_default();
            if name == m::CONNECTIONS_OPENED {
                e.opened_per_s += rate;
                if s.label("tls") == "true" {
                    e.tls_per_s += rate;
                }
                if delta > 0.0 {
                    e.routes.insert(s.label("route").to_owned());
                }
            } else if name == m::CONNECTIONS_FAILED {
                e.failed_per_s += rate;
            } else if s.label("direction") == "src_to_dst" {
                e.out_bytes_per_s += rate;
            } else {
                e.in_bytes_per_s += rate;
            }
        }
    }
    for (k, b) in buckets {
        let mut bounds: Vec<(f64, f64)> = b
            .into_iter()
            .map(|(bits, count)| (f64::from_bits(bits), count))
            .collect();
        bounds.sort_by(|x, y| x.0.total_cmp(&y.0));
        let total = bounds.last().map_or(0.0, |b| b.1);
        if total > 0.0 {
            let q = |p: f64| {
                bounds
                    .iter()
                    .find(|(_, c)| *c >= p * total)
                    .map_or(f64::INFINITY, |(le, _)| *le)
            };
            edges.entry(k).or_default().duration_p50_p99 = Some((q(0.5), q(0.99)));
        }
    }
    // Edges with no activity in the window are not shown.
    edges.retain(|_, e| {
        e.opened_per_s > 0.0
            || e.failed_per_s > 0.0
            || e.out_bytes_per_s > 0.0
            || e.in_bytes_per_s > 0.0
            || e.duration_p50_p99.is_some()
    });
    edges
}

/// The daemon's CPU and memory ([`crate::process_metrics`]).
const CPU_SECONDS: &str = "process_cpu_seconds_total";
const RESIDENT_BYTES: &str = "process_resident_memory_bytes";

/// A daemon's gauges from its page at the end of a `secs` window, and its
/// rates over the window from the page at its start (`before`).
pub fn daemon(
    addr: SocketAddr,
    before: &[Sample],
    page: &[Sample],
    secs: f64,
    now_unix: f64,
) -> DaemonStats {
    let sum = |name| promtext::sum(page, name, &[]);
    let rate = |name| {
        let b = promtext::sum(before, name, &[]);
        increase(b, sum(name)) / secs.max(f64::MIN_POSITIVE)
    };
    let cert_days = page
        .iter()
        .filter(|s| s.name == crate::identity::reload::CERT_EXPIRY_METRIC)
        .map(|s| (s.value - now_unix) / 86_400.0)
        .reduce(f64::min);
    let reported = |name: &str| page.iter().any(|s| s.name == name);
    DaemonStats {
        cpu_percent: reported(CPU_SECONDS).then(|| 100.0 * rate(CPU_SECONDS)),
        resident_bytes: reported(RESIDENT_BYTES).then(|| sum(RESIDENT_BYTES)),
        addr,
        pods: sum(m::PODS_REGISTERED),
        active: sum(m::CONNECTIONS_ACTIVE),
        tunnels: sum(m::TUNNELS_OPEN),
        cert_days,
        limited_per_s: rate(m::CONNECTIONS_LIMITED),
        relay_buffer_bytes: sum(m::RELAY_BUFFER_BYTES),
        fallbacks_per_s: rate(m::RELAY_BUFFER_FALLBACKS),
    }
}

/// `v` bytes in binary units: `1.5 MiB`.
fn size(v: f64) -> String {
    let units = ["B", "KiB", "MiB", "GiB"];
    let mut v = v;
    let mut i = 0;
    while v >= 1024.0 && i + 1 < units.len() {
        v /= 1024.0;
        i += 1;
    }
    format!("{v:.1} {}", units[i])
}

fn bytes(v: f64) -> String {
    format!("{}/s", size(v))
}

fn seconds(v: f64) -> String {
    if v.is_infinite() {
        "> 1h".into()
    } else if v < 1.0 {
        format!("{:.0}ms", v * 1000.0)
    } else {
        format!("{v:.0}s")
    }
}

/// The two tables: edges by connection rate, then the daemons.
pub fn render(
    edges: &BTreeMap<EdgeKey, EdgeStats>,
    daemons: &[DaemonStats],
    seconds_window: f64,
    side: Side,
) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{} daemon(s), {:.1} s window, connections as reported by the {} daemon",
        daemons.len(),
        seconds_window,
        side.label()
    );
    let mut rows: Vec<_> = edges.iter().collect();
    rows.sort_by(|a, b| {
        b.1.opened_per_s
            .total_cmp(&a.1.opened_per_s)
            .then(a.0.cmp(b.0))
    });
    let w_src = rows
        .iter()
        .map(|(k, _)| k.src.len())
        .max()
        .unwrap_or(0)
        .max(6);
    let w_dst = rows
        .iter()
        .map(|(k, _)| k.dst.len())
        .max()
        .unwrap_or(0)
        .max(11);
    let _ = writeln!(
        out,
        "\n{:<w_src$}  {:<w_dst$}  {:<6}  {:<11}  {:>8}  {:>8}  {:>13}  {:>13}  {:>6}  {:>6}",
        "SOURCE", "DESTINATION", "MTLS", "ROUTE", "CONN/S", "SUCCESS", "OUT", "IN", "P50", "P99"
    );
    if rows.is_empty() {
        let _ = writeln!(out, "(no connection activity in the window)");
    }
    for (k, e) in rows {
        let mtls = if e.opened_per_s == 0.0 {
            "-"
        } else if (e.tls_per_s - e.opened_per_s).abs() < 1e-9 {
            "yes"
        } else if e.tls_per_s == 0.0 {
            "no"
        } else {
            "partly"
        };
        let routes = e.routes.iter().cloned().collect::<Vec<_>>().join(",");
        let success = e
            .success()
            .map_or("-".into(), |s| format!("{:.1}%", s * 100.0));
        let (p50, p99) = e
            .duration_p50_p99
            .map_or(("-".into(), "-".into()), |(a, b)| (seconds(a), seconds(b)));
        let _ = writeln!(
            out,
            "{:<w_src$}  {:<w_dst$}  {:<6}  {:<11}  {:>8.1}  {:>8}  {:>13}  {:>13}  {:>6}  {:>6}",
            k.src,
            k.dst,
            mtls,
            if routes.is_empty() { "-" } else { &routes },
            e.opened_per_s,
            success,
            bytes(e.out_bytes_per_s),
            bytes(e.in_bytes_per_s),
            p50,
            p99
        );
    }
    let _ = writeln!(
        out,
        "\n{:<22}  {:>6}  {:>10}  {:>5}  {:>7}  {:>7}  {:>13}  {:>9}  {:>10}  {:>10}",
        "DAEMON",
        "CPU",
        "RSS",
        "PODS",
        "ACTIVE",
        "TUNNELS",
        "CERT EXPIRES",
        "LIMITED/s",
        "RELAY BUF",
        "FALLBACK/s"
    );
    for d in daemons {
        let cert = d
            .cert_days
            .map_or("-".into(), |days| format!("in {days:.1} d"));
        let _ = writeln!(
            out,
            "{:<22}  {:>6}  {:>10}  {:>5.0}  {:>7.0}  {:>7.0}  {:>13}  {:>9.1}  {:>10}  {:>10.1}",
            d.addr.to_string(),
            d.cpu_percent.map_or("-".into(), |p| format!("{p:.1}%")),
            d.resident_bytes.map_or("-".into(), size),
            d.pods,
            d.active,
            d.tunnels,
            cert,
            d.limited_per_s,
            size(d.relay_buffer_bytes),
            d.fallbacks_per_s
        );
    }
    out
}

/// A daemon that could not be read.
#[derive(Debug, thiserror::Error)]
#[error("cannot read http://{addr}/metrics: {problem} (is the daemon running, and is --admin its admin_addr?)")]
pub struct ScrapeError {
    /// The admin address.
    pub addr: SocketAddr,
    /// What failed.
    pub problem: String,
}

/// Scrapes every daemon once.
pub fn scrape(addrs: &[SocketAddr]) -> Result<Vec<Vec<Sample>>, ScrapeError> {
    addrs
        .iter()
        .map(|&addr| {
            let fail = |problem: String| ScrapeError { addr, problem };
            let r = crate::admin_client::get(addr, "/metrics", SCRAPE_TIMEOUT).map_err(fail)?;
            if r.status != 200 {
                return Err(fail(format!("status {}", r.status)));
            }
            promtext::parse(&r.body).map_err(|e| fail(e.to_string()))
        })
        .collect()
}

fn now_unix() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// `nodemesh stat` (once) and `nodemesh top` (`repeat`: until interrupted).
pub fn run(
    addrs: &[SocketAddr],
    interval: Duration,
    side: Side,
    repeat: bool,
) -> Result<(), ScrapeError> {
    let clear = repeat && std::io::IsTerminal::is_terminal(&std::io::stdout());
    let mut before = scrape(addrs)?;
    let mut t0 = Instant::now();
    eprintln!(
        "nodemesh: read {} daemon(s); measuring a {:.1} s window{}",
        addrs.len(),
        interval.as_secs_f64(),
        if repeat {
            ", again until interrupted"
        } else {
            ""
        }
    );
    loop {
        std::thread::sleep(interval);
        let after = scrape(addrs)?;
        let t1 = Instant::now();
        let secs = (t1 - t0).as_secs_f64();
        let edges = window(&before, &after, secs, side);
        let now = now_unix();
        let daemons: Vec<_> = addrs
            .iter()
            .zip(before.iter().zip(&after))
            .map(|(a, (b, page))| daemon(*a, b, page, secs, now))
            .collect();
        if clear {
            print!("\x1b[2J\x1b[H");
        }
        print!("{}", render(&edges, &daemons, secs, side));
        if !repeat {
            return Ok(());
        }
        println!();
        before = after;
        t0 = t1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(name: &str, labels: &[(&str, &str)], value: f64) -> Sample {
        Sample {
            name: name.into(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            value,
        }
    }

    fn edge(reporter: &str, extra: &[(&'static str, &'static str)]) -> Vec<(&'static str, String)> {
        let mut l: Vec<(&'static str, String)> = vec![
            ("reporter", reporter.to_owned()),
            ("src_namespace", "a".into()),
            ("src_workload", "client".into()),
            ("dst_namespace", "b".into()),
            ("dst_workload", "server".into()),
            ("tls", "true".into()),
            ("route", "tunnel".into()),
        ];
        l.extend(extra.iter().map(|(k, v)| (*k, v.to_string())));
        l
    }

    fn with(name: &str, labels: &[(&'static str, String)], value: f64) -> Sample {
        let l: Vec<(&str, &str)> = labels.iter().map(|(k, v)| (*k, v.as_str())).collect();
        s(name, &l, value)
    }

    #[test]
    fn rates_success_bytes_and_percentiles_over_a_window() {
        let bucket = |le: &'static str, v| {
            with(
                "nodemesh_connection_duration_seconds_bucket",
                &edge("source", &[("le", le)]),
                v,
            )
        };
        let before = vec![vec![
            with(m::CONNECTIONS_OPENED, &edge("source", &[]), 100.0),
            with(
                m::CONNECTIONS_FAILED,
                &edge("source", &[("reason", "no_route")]),
                1.0,
            ),
            with(
                m::TCP_BYTES,
                &edge("source", &[("direction", "src_to_dst")]),
                1000.0,
            ),
            bucket("0.001", 0.0),
            bucket("0.01", 50.0),
            bucket("+Inf", 100.0),
            // The other side's report of the same connections is not counted.
            with(m::CONNECTIONS_OPENED, &edge("destination", &[]), 100.0),
        ]];
        let after = vec![vec![
            with(m::CONNECTIONS_OPENED, &edge("source", &[]), 120.0),
            with(
                m::CONNECTIONS_FAILED,
                &edge("source", &[("reason", "no_route")]),
                6.0,
            ),
            with(
                m::TCP_BYTES,
                &edge("source", &[("direction", "src_to_dst")]),
                11_000.0,
            ),
            with(
                m::TCP_BYTES,
                &edge("source", &[("direction", "dst_to_src")]),
                500.0,
            ),
            bucket("0.001", 0.0),
            bucket("0.01", 130.0),
            bucket("+Inf", 200.0),
            with(m::CONNECTIONS_OPENED, &edge("destination", &[]), 900.0),
        ]];
        let w = window(&before, &after, 10.0, Side::Source);
        assert_eq!(w.len(), 1);
        let (k, e) = w.iter().next().expect("one edge");
        assert_eq!((k.src.as_str(), k.dst.as_str()), ("a/client", "b/server"));
        assert_eq!(e.opened_per_s, 2.0);
        assert_eq!(e.failed_per_s, 0.5);
        assert_eq!(e.success(), Some(0.8));
        assert_eq!(e.out_bytes_per_s, 1000.0);
        // A series new in the window counts from zero.
        assert_eq!(e.in_bytes_per_s, 50.0);
        assert_eq!(e.tls_per_s, 2.0);
        assert_eq!(e.routes, BTreeSet::from(["tunnel".to_owned()]));
        // 100 closed in the window: 80 within 10 ms, 20 longer.
        assert_eq!(e.duration_p50_p99, Some((0.01, f64::INFINITY)));
        let text = render(&w, &[], 10.0, Side::Source);
        assert!(text.contains("a/client"), "{text}");
        assert!(text.contains("80.0%"), "{text}");
        assert!(text.contains("yes"), "{text}");
    }

    #[test]
    fn a_restarted_daemon_and_idle_edges() {
        let before = vec![vec![with(
            m::CONNECTIONS_OPENED,
            &edge("source", &[]),
            500.0,
        )]];
        // Restarted: the counter is lower than before.
        let after = vec![vec![with(m::CONNECTIONS_OPENED, &edge("source", &[]), 5.0)]];
        let w = window(&before, &after, 1.0, Side::Source);
        assert_eq!(w.values().next().map(|e| e.opened_per_s), Some(5.0));
        let idle = window(&after, &after, 1.0, Side::Source);
        assert!(idle.is_empty());
        assert!(render(&idle, &[], 1.0, Side::Source).contains("no connection activity"));
    }

    #[test]
    fn daemon_gauges_and_certificate_expiry() {
        let page = vec![
            s(m::PODS_REGISTERED, &[], 3.0),
            s(m::CONNECTIONS_ACTIVE, &[], 7.0),
            s(
                m::TUNNELS_OPEN,
                &[("peer", "n2"), ("direction", "dialled")],
                1.0,
            ),
            s(
                m::TUNNELS_OPEN,
                &[("peer", "n3"), ("direction", "accepted")],
                1.0,
            ),
            s(
                crate::identity::reload::CERT_EXPIRY_METRIC,
                &[("kind", "node")],
                86_400.0 * 12.0,
            ),
            s(
                crate::identity::reload::CERT_EXPIRY_METRIC,
                &[("kind", "bundle")],
                86_400.0 * 30.0,
            ),
        ];
        let limited = |v: f64, workload: &str| {
            s(
                m::CONNECTIONS_LIMITED,
                &[("limit", "pod"), ("workload", workload)],
                v,
            )
        };
        let before = vec![
            limited(4.0, "a"),
            s(m::RELAY_BUFFER_FALLBACKS, &[], 10.0),
            s(CPU_SECONDS, &[], 1.5),
        ];
        let mut page = page;
        page.extend([
            limited(10.0, "a"),
            limited(2.0, "b"),
            s(m::RELAY_BUFFER_FALLBACKS, &[], 30.0),
            s(m::RELAY_BUFFER_BYTES, &[], 3.0 * 1024.0 * 1024.0),
            s(CPU_SECONDS, &[], 1.6),
            s(RESIDENT_BYTES, &[], 9.5 * 1024.0 * 1024.0),
        ]);
        let addr: SocketAddr = "10.0.0.1:15020".parse().expect("addr");
        let d = daemon(addr, &before, &page, 2.0, 86_400.0 * 2.0);
        assert_eq!((d.pods, d.active, d.tunnels), (3.0, 7.0, 2.0));
        assert_eq!(d.cert_days, Some(10.0));
        // (10 + 2 - 4) refusals and (30 - 10) fallbacks in 2 s.
        assert_eq!((d.limited_per_s, d.fallbacks_per_s), (4.0, 10.0));
        assert_eq!(d.relay_buffer_bytes, 3.0 * 1024.0 * 1024.0);
        // 0.1 CPU-s in 2 s.
        assert!((d.cpu_percent.expect("cpu") - 5.0).abs() < 1e-9);
        assert_eq!(d.resident_bytes, Some(9.5 * 1024.0 * 1024.0));
        let text = render(&BTreeMap::new(), &[d], 1.0, Side::Destination);
        assert!(text.contains("10.0.0.1:15020"), "{text}");
        assert!(text.contains("in 10.0 d"), "{text}");
        assert!(
            text.contains("LIMITED/s")
                && text.contains("3.0 MiB")
                && text.contains("5.0%")
                && text.contains("9.5 MiB"),
            "{text}"
        );
    }

    #[test]
    fn an_unreachable_daemon_is_named_with_the_fix() {
        // A port nobody listens on: held bound, never listening (a closed
        // one could be taken by another test's listener meanwhile).
        let bound = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
            .expect("socket");
        bound
            .bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
            .expect("bind");
        let addr = bound
            .local_addr()
            .ok()
            .and_then(|a| a.as_socket())
            .expect("port");
        let err = scrape(&[addr]).expect_err("nothing listens");
        let text = err.to_string();
        assert!(
            text.contains(&addr.to_string()) && text.contains("--admin"),
            "{text}"
        );
    }
}
