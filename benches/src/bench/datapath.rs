//! Data-path figures: direct pod to pod, the stunnel mTLS pair, and nodemesh
//! across nodes and within a node, measured in the same run; plus tunnel
//! tuning variants of the cross-node path.
//!
//! Two labs are up together: a plain-bridge lab (`--no-mesh`, 2 nodes x 1
//! pod) for direct and stunnel, and a meshed lab (2 nodes x 2 pods) for
//! nodemesh. Every path is measured by [`measure_all`] with the same load
//! tools ([`super::load`]), the paths taking turns within every run of every
//! figure; proxies' CPU and RSS come from `/proc`. The tuning variants get
//! one meshed lab each, all up at once, and take turns the same way.

use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::load::{self, Echo, Holder};
use super::procfs;
use super::stats::Spread;
use super::{relay_pair, stunnel};
use super::{BenchError, BenchOptions, Selection, Sizes};
use crate::daemon;
use crate::lab::{Lab, LabOptions, PodHandle};
use crate::topology::MAX_PREFIX_LEN;

const SINK_PORT: u16 = 9000;
const ECHO_PORT: u16 = 9001;
const SEQ_ECHO_PORT: u16 = 9002;
const HOLD_PORT: u16 = 9003;
/// The app ports a proxy pair (stunnel's, the plain relay pair) forwards.
const PAIR_PORTS: [u16; 4] = [SINK_PORT, ECHO_PORT, SEQ_ECHO_PORT, HOLD_PORT];

/// Request/response latency at one rate.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LatencyAtRate {
    /// Requests per second (open loop).
    pub rate: u32,
    /// p50, µs.
    pub p50_us: Spread,
    /// p99, µs.
    pub p99_us: Spread,
    /// p99.9, µs.
    pub p999_us: Spread,
}

/// Every figure of one path.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PathResult {
    /// Short key (`direct`, `stunnel`, `nodemesh-cross`, `nodemesh-same`).
    pub key: String,
    /// What the path is.
    pub label: String,
    /// Proxy processes on the path.
    pub proxies: usize,
    /// Single-stream bulk throughput, Gbit/s.
    pub throughput1_gbps: Option<Spread>,
    /// 8-stream bulk throughput (aggregate), Gbit/s.
    pub throughput8_gbps: Option<Spread>,
    /// CPU-seconds per GB summed over the proxies, single stream.
    pub cpu_per_gb1: Option<Spread>,
    /// CPU-seconds per GB summed over the proxies, 8 streams.
    pub cpu_per_gb8: Option<Spread>,
    /// Open-loop request/response latency per rate.
    pub latency: Vec<LatencyAtRate>,
    /// New connection (connect + one exchange + close) p50, µs.
    pub new_conn_p50_us: Option<Spread>,
    /// New connection p99, µs.
    pub new_conn_p99_us: Option<Spread>,
    /// RSS of each proxy process before the figures (tunnel warm, no connection open), KiB.
    pub idle_rss_kib: Vec<u64>,
    /// The same split as [anonymous, file-backed, shared memory] KiB per proxy.
    pub idle_rss_split_kib: Vec<[u64; 3]>,
    /// RSS growth summed over the proxies per open idle connection, bytes.
    pub bytes_per_idle_conn: Option<f64>,
    /// The same, per proxy process, bytes.
    pub bytes_per_idle_conn_by_proxy: Vec<f64>,
    /// Figures that could not be measured, and why.
    pub errors: Vec<String>,
}

/// One tuning variant of the cross-node tunnel.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TuningResult {
    /// Path measured (`nodemesh-cross` or `nodemesh-same`).
    pub path: String,
    /// What was changed.
    pub variant: String,
    /// Whether this is the shipped default.
    pub default: bool,
    /// Single-stream throughput, Gbit/s.
    pub throughput1_gbps: Option<Spread>,
    /// CPU-seconds per GB over both daemons.
    pub cpu_per_gb1: Option<Spread>,
    /// 8-stream throughput, Gbit/s.
    #[serde(default)]
    pub throughput8_gbps: Option<Spread>,
    /// CPU-seconds per GB, 8 streams.
    #[serde(default)]
    pub cpu_per_gb8: Option<Spread>,
    /// Open-loop p50 at the first rate, µs.
    pub p50_us: Option<Spread>,
    /// New connection (connect, one exchange, close) p50, µs.
    #[serde(default)]
    pub new_conn_p50_us: Option<Spread>,
    /// QUIC packets the sending daemon (L1) declared lost over all the
    /// single-stream bulk runs, % of those it sent (cross-node only).
    #[serde(default)]
    pub lost_pct1: Option<f64>,
    /// The same over the 8-stream runs.
    #[serde(default)]
    pub lost_pct8: Option<f64>,
    /// Why a figure is missing.
    pub errors: Vec<String>,
}

/// QUIC packets node 1's daemon has sent to and declared lost on its
/// tunnels, from its metrics (`None` if they could not be scraped).
fn tunnel_packets(lab: &Lab) -> Option<(f64, f64)> {
    let m = lab.metrics(1).ok()?;
    Some((
        crate::metrics::sum(&m, nodemesh::metrics::TUNNEL_PACKETS_SENT, &[]),
        crate::metrics::sum(&m, nodemesh::metrics::TUNNEL_PACKETS_LOST, &[]),
    ))
}

/// Lost packets between two [`tunnel_packets`] readings, % of those sent.
fn lost_pct(before: Option<(f64, f64)>, after: Option<(f64, f64)>) -> Option<f64> {
    let ((s0, l0), (s1, l1)) = (before?, after?);
    (s1 > s0).then(|| 100.0 * (l1 - l0).max(0.0) / (s1 - s0))
}

/// A path under test: where the client runs, where it connects, which
/// processes are the proxies.
#[derive(Debug, Clone)]
pub struct Target {
    /// Result key.
    pub key: String,
    /// Description.
    pub label: String,
    /// Client pod.
    pub src: PodHandle,
    /// Server pod.
    pub dst: PodHandle,
    /// Where the client connects: the server pod, or a proxy pair's client
    /// side in its own namespace.
    pub via: Via,
    /// Proxy pids.
    pub proxies: Vec<u32>,
}

/// How a [`Target`]'s client reaches the server app.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    /// The server pod's address (direct, or captured by the mesh).
    Pod,
    /// The stunnel pair's client side, on 127.0.0.1 in the client pod.
    Stunnel,
    /// The plain relay pair's client side, on 127.0.0.1 in the client pod.
    RelayPair,
}

impl Target {
    fn addr(&self, port: u16) -> SocketAddr {
        match self.via {
            Via::Pod => self.dst.addr(port),
            Via::Stunnel => stunnel::client_addr(port),
            Via::RelayPair => relay_pair::client_addr(port),
        }
    }
}

/// Bulk transfer with CPU accounting: (Gbit/s, CPU-s per GB or `None` without proxies).
fn bulk_once(
    t: &Target,
    streams: usize,
    bytes: u64,
    ticks: f64,
) -> Result<(f64, Option<f64>), BenchError> {
    let sink = t.dst.listen(SINK_PORT)?;
    let run = BulkRun {
        src_netns: &t.src.netns,
        sink,
        addr: t.addr(SINK_PORT),
        proxies: &t.proxies,
        what: &t.key,
    };
    run.measure(streams, bytes, ticks)
}

/// One bulk transfer into a [`load::sink`], with the proxies' CPU.
pub(super) struct BulkRun<'a> {
    /// Where the client runs.
    pub src_netns: &'a str,
    /// The sink's listener (consumed by the run).
    pub sink: std::net::TcpListener,
    /// Where the client connects: the sink, or a proxy in front of it.
    pub addr: SocketAddr,
    /// Processes whose CPU is charged to the transfer.
    pub proxies: &'a [u32],
    /// Names the run in errors.
    pub what: &'a str,
}

impl BulkRun<'_> {
    /// Sends `streams` x `bytes`; (Gbit/s, CPU-s per GB of the proxies or
    /// `None` without any). Fails unless the sink got every byte.
    pub fn measure(
        self,
        streams: usize,
        bytes: u64,
        ticks: f64,
    ) -> Result<(f64, Option<f64>), BenchError> {
        let sink = load::sink(self.sink, streams);
        let cpu0 = procfs::cpu_seconds_sum(self.proxies, ticks)?;
        let elapsed = load::bulk(self.src_netns, self.addr, streams, bytes)?;
        let cpu1 = procfs::cpu_seconds_sum(self.proxies, ticks)?;
        let got = sink
            .join()
            .unwrap_or_else(|_| Err(std::io::Error::other("sink panicked")))
            .map_err(|source| BenchError::Io {
                what: format!("{} sink", self.what),
                source,
            })?;
        let total = bytes * streams as u64;
        if got != total {
            return Err(BenchError::Measure {
                what: format!("{} bulk", self.what),
                problem: format!("sink got {got} of {total} bytes"),
            });
        }
        let gb = total as f64 / 1e9;
        let gbps = gb * 8.0 / elapsed.as_secs_f64().max(1e-9);
        let cpu = (!self.proxies.is_empty()).then(|| (cpu1 - cpu0) / gb);
        Ok((gbps, cpu))
    }
}

fn record<T>(errors: &mut Vec<String>, what: &str, r: Result<T, BenchError>) -> Option<T> {
    match r {
        Ok(v) => Some(v),
        Err(e) => {
            errors.push(format!("{what}: {e}"));
            None
        }
    }
}

fn spread_opt(values: &[f64]) -> Option<Spread> {
    Spread::of(values)
}

/// Warm-up, idle RSS and memory per idle connection of `t`: the figures
/// taken before any bulk transfer grows the proxies' heaps.
fn prelude(
    t: &Target,
    sizes: &Sizes,
    only: &Selection,
    ticks: f64,
    progress: &mut dyn FnMut(&str),
) -> PathResult {
    let mut r = PathResult {
        key: t.key.clone(),
        label: t.label.clone(),
        proxies: t.proxies.len(),
        ..PathResult::default()
    };
    // Warm-up: establishes the tunnel (nodemesh) and TLS session caches.
    let _ = bulk_once(t, 1, 1 << 20, ticks);
    r.idle_rss_kib = t
        .proxies
        .iter()
        .filter_map(|p| procfs::rss_kib(*p).ok())
        .collect();
    r.idle_rss_split_kib = t
        .proxies
        .iter()
        .filter_map(|p| procfs::rss_split_kib(*p).ok())
        .collect();
    progress(&format!(
        "  {}: proxy RSS after warm-up {:?} KiB ([anon, file, shmem] {:?})",
        t.key, r.idle_rss_kib, r.idle_rss_split_kib
    ));

    // Memory per idle connection, first: on a heap that bulk transfers have
    // not yet grown, RSS growth is the connections' own memory rather than
    // reuse of freed allocations.
    if !t.proxies.is_empty() && only.figure("idle-mem") {
        let idle = idle_memory(t, sizes.idle_conns);
        if let Some((sum, by)) = record(&mut r.errors, "idle connections", idle) {
            progress(&format!(
                "  {}: {} idle connections: {:.0} bytes each over the proxies {:?}",
                t.key, sizes.idle_conns, sum, by
            ));
            r.bytes_per_idle_conn = Some(sum);
            r.bytes_per_idle_conn_by_proxy = by;
        }
    }
    r
}

/// Starts one `start` server on `port` per distinct destination pod of
/// `targets` (direct and stunnel share theirs: stunnel forwards to the same
/// pod and port). Returns the servers, to be held for the figure, and for
/// each target whether its server is up; a failure is recorded on the
/// targets that needed it.
fn servers<S>(
    targets: &[Target],
    results: &mut [PathResult],
    port: u16,
    what: &str,
    start: impl Fn(std::net::TcpListener) -> Result<S, BenchError>,
) -> (Vec<S>, Vec<bool>) {
    let mut held = Vec::new();
    let mut up: Vec<(String, bool)> = Vec::new();
    let mut ready = Vec::with_capacity(targets.len());
    for (t, r) in targets.iter().zip(results.iter_mut()) {
        let ok = match up.iter().find(|(netns, _)| *netns == t.dst.netns) {
            Some((_, ok)) => *ok,
            None => {
                let s = t
                    .dst
                    .listen(port)
                    .map_err(BenchError::from)
                    .and_then(&start);
                let s = record(&mut r.errors, what, s);
                let ok = s.is_some();
                held.extend(s);
                up.push((t.dst.netns.clone(), ok));
                ok
            }
        };
        ready.push(ok);
    }
    (held, ready)
}

/// `runs` runs of one figure over the `ready` targets, the targets taking
/// turns within each run. Each value is reported as it comes (`show`); a
/// failed run is recorded on its target. Returns each target's values.
#[allow(clippy::too_many_arguments)]
fn interleaved<T>(
    targets: &[Target],
    ready: &[bool],
    results: &mut [PathResult],
    runs: usize,
    figure: &str,
    mut once: impl FnMut(&Target) -> Result<T, BenchError>,
    show: impl Fn(&T) -> String,
    progress: &mut dyn FnMut(&str),
) -> Vec<Vec<T>> {
    let mut values: Vec<Vec<T>> = targets.iter().map(|_| Vec::new()).collect();
    for run in 1..=runs {
        for (i, t) in targets.iter().enumerate() {
            if !ready.get(i).copied().unwrap_or(false) {
                continue;
            }
            let what = format!("{figure} run {run}");
            if let Some(v) = record(&mut results[i].errors, &what, once(t)) {
                progress(&format!(
                    "  {}: {figure} run {run}/{runs}: {}",
                    t.key,
                    show(&v)
                ));
                values[i].push(v);
            }
        }
    }
    values
}

/// `runs` interleaved bulk runs of `streams` x `bytes` over `targets`; per
/// target, the spread of Gbit/s and of CPU-s/GB.
fn bulk_interleaved(
    targets: &[Target],
    results: &mut [PathResult],
    runs: usize,
    streams: usize,
    bytes: u64,
    ticks: f64,
    progress: &mut dyn FnMut(&str),
) -> Vec<(Option<Spread>, Option<Spread>)> {
    let all = vec![true; targets.len()];
    let got = interleaved(
        targets,
        &all,
        results,
        runs,
        &format!("{streams}-stream bulk"),
        |t| bulk_once(t, streams, bytes, ticks),
        |(gbps, cpu)| {
            let cpu = cpu.map_or(String::new(), |c| format!(", {c:.2} CPU-s/GB"));
            format!("{gbps:.2} Gbit/s{cpu}")
        },
        progress,
    );
    got.iter()
        .map(|runs| {
            let g: Vec<f64> = runs.iter().map(|x| x.0).collect();
            let c: Vec<f64> = runs.iter().filter_map(|x| x.1).collect();
            (spread_opt(&g), spread_opt(&c))
        })
        .collect()
}

/// Measures every figure `only` selects on each of `targets`, interleaved:
/// each run of a figure visits the targets in turn (A B C, A B C, ...), so
/// the drift of a shared machine over the minutes of a run falls on every
/// path alike instead of on whichever path was measured last; the ratios
/// the targets are stated in compare runs taken seconds apart.
pub fn measure_all(
    targets: &[Target],
    sizes: &Sizes,
    only: &Selection,
    progress: &mut dyn FnMut(&str),
) -> Vec<PathResult> {
    let ticks = procfs::clock_ticks();
    let mut rs: Vec<PathResult> = targets
        .iter()
        .map(|t| prelude(t, sizes, only, ticks, progress))
        .collect();

    if only.figure("bulk") {
        for (streams, bytes) in [(1, sizes.bulk_bytes), (8, sizes.bulk8_bytes)] {
            let got = bulk_interleaved(
                targets, &mut rs, sizes.runs, streams, bytes, ticks, progress,
            );
            for (r, spreads) in rs.iter_mut().zip(got) {
                if streams == 1 {
                    (r.throughput1_gbps, r.cpu_per_gb1) = spreads;
                } else {
                    (r.throughput8_gbps, r.cpu_per_gb8) = spreads;
                }
            }
        }
    }

    // Latency at fixed rates.
    if only.figure("latency") {
        let (_echoes, ready) = servers(targets, &mut rs, ECHO_PORT, "echo server", |l| {
            Echo::start(l, sizes.msg_len, false)
        });
        for &rate in &sizes.rates {
            let got = interleaved(
                targets,
                &ready,
                &mut rs,
                sizes.runs.min(3),
                &format!("latency at {rate} req/s"),
                |t| {
                    let secs = Duration::from_secs_f64(sizes.latency_secs);
                    load::open_loop(&t.src.netns, t.addr(ECHO_PORT), rate, secs, sizes.msg_len)
                        .map(|h| load::percentiles_us(&h))
                },
                |q| {
                    format!(
                        "p50 {:.0} µs, p99 {:.0} µs, p99.9 {:.0} µs",
                        q[0], q[1], q[2]
                    )
                },
                progress,
            );
            for (r, q) in rs.iter_mut().zip(got) {
                let at = |k: usize| spread_opt(&q.iter().map(|q| q[k]).collect::<Vec<_>>());
                if let (Some(p50_us), Some(p99_us), Some(p999_us)) = (at(0), at(1), at(2)) {
                    r.latency.push(LatencyAtRate {
                        rate,
                        p50_us,
                        p99_us,
                        p999_us,
                    });
                }
            }
        }
    }

    // New connections.
    if only.figure("new-conn") {
        let got = new_connection_runs(targets, &mut rs, sizes.runs.min(3), sizes, progress);
        for (r, q) in rs.iter_mut().zip(got) {
            r.new_conn_p50_us = spread_opt(&q.iter().map(|q| q[0]).collect::<Vec<_>>());
            r.new_conn_p99_us = spread_opt(&q.iter().map(|q| q[1]).collect::<Vec<_>>());
        }
    }

    for (t, r) in targets.iter().zip(&rs) {
        for e in &r.errors {
            progress(&format!("  {}: FAILED {e}", t.key));
        }
    }
    rs
}

fn idle_memory(t: &Target, n: usize) -> Result<(f64, Vec<f64>), BenchError> {
    let holder = Holder::start(t.dst.listen(HOLD_PORT)?)?;
    let before: Vec<u64> = t
        .proxies
        .iter()
        .map(|p| procfs::rss_kib(*p))
        .collect::<Result<_, _>>()?;
    let conns = load::open_idle(&t.src.netns, t.addr(HOLD_PORT), n)?;
    holder.wait_for(n, Duration::from_secs(60))?;
    let after: Vec<u64> = t
        .proxies
        .iter()
        .map(|p| procfs::rss_kib(*p))
        .collect::<Result<_, _>>()?;
    drop(conns);
    drop(holder);
    let by: Vec<f64> = before
        .iter()
        .zip(&after)
        .map(|(b, a)| (*a as f64 - *b as f64) * 1024.0 / n as f64)
        .collect();
    Ok((by.iter().sum(), by))
}

fn lab_options(opts: &BenchOptions, suffix: &str, nodes: usize, pods: usize) -> LabOptions {
    let mut o = LabOptions::new(format!("{}{suffix}", opts.prefix), nodes, pods);
    o.bin_dir = opts.bin_dir.clone();
    o.log_level = "warn".into();
    o.underlay_mtu = opts.underlay_mtu;
    o
}

fn up(o: LabOptions, progress: &mut dyn FnMut(&str)) -> Result<Lab, BenchError> {
    progress(&format!(
        "building lab {} ({} nodes x {} pods, mesh {})",
        o.prefix,
        o.nodes,
        o.pods_per_node,
        if o.mesh { "on" } else { "off" }
    ));
    Ok(Lab::up(o)?)
}

/// Runs the data-path part (and the tuning variants when asked).
///
/// The plain lab (direct, stunnel) and the meshed lab are up together, so
/// that direct, stunnel and nodemesh across nodes are measured interleaved
/// ([`measure_all`]); nodemesh within a node follows on a restarted daemon,
/// then the tuning variants.
pub fn run(
    opts: &BenchOptions,
    progress: &mut dyn FnMut(&str),
) -> Result<(Vec<PathResult>, Vec<TuningResult>), BenchError> {
    let sizes = &opts.sizes;
    let only = &opts.only;
    check_prefix_room(opts)?;
    let mut targets = Vec::new();
    // Dropped after the interleaved figures, in this order: the proxy pairs,
    // then their lab.
    type Pairs = (Option<stunnel::StunnelPair>, Option<relay_pair::RelayPair>);
    let mut plain: Option<(Pairs, Lab)> = None;
    if opts.parts.datapath
        && (only.path("direct") || only.path("stunnel") || only.path("relay-pair"))
    {
        let lab = up(lab_options(opts, "d", 2, 1).no_mesh(), progress)?;
        let (a, b) = (lab.pod(1, 1)?, lab.pod(2, 1)?);
        let direct = Target {
            key: "direct".into(),
            label: "direct pod to pod, no mesh (2 nodes)".into(),
            src: a.clone(),
            dst: b.clone(),
            via: Via::Pod,
            proxies: Vec::new(),
        };
        let mut pair = None;
        if only.path("stunnel") {
            let nodemesh = daemon::find_binary(daemon::DAEMON_BIN, opts.bin_dir.as_deref())?;
            let p = stunnel::start(
                &nodemesh,
                &lab.dir().join("stunnel"),
                &a.netns,
                &b.netns,
                b.ip,
                &PAIR_PORTS,
            )?;
            targets.push(Target {
                key: "stunnel".into(),
                label: "stunnel mTLS proxy pair (per-connection TLS, 2 nodes)".into(),
                proxies: vec![p.client_pid, p.server_pid],
                via: Via::Stunnel,
                ..direct.clone()
            });
            pair = Some(p);
        }
        let mut relays = None;
        if only.path("relay-pair") {
            let p = relay_pair::start(&a.netns, &b.netns, b.ip, &PAIR_PORTS)?;
            targets.push(Target {
                key: "relay-pair".into(),
                label: "plain TCP relay pair (no TLS; the floor of any two-proxy path, 2 nodes)"
                    .into(),
                proxies: vec![p.client_pid(), p.server_pid()],
                via: Via::RelayPair,
                ..direct.clone()
            });
            relays = Some(p);
        }
        if only.path("direct") {
            targets.insert(0, direct);
        }
        plain = Some(((pair, relays), lab));
    }

    let meshed = opts.parts.datapath && (only.path("nodemesh-cross") || only.path("nodemesh-same"));
    let mut mesh = None;
    if meshed {
        let lab = up(lab_options(opts, "m", 2, 2), progress)?;
        let cross = Target {
            key: "nodemesh-cross".into(),
            label: "nodemesh across nodes (pod -> L1 daemon -> QUIC -> L2 daemon -> pod)".into(),
            src: lab.pod(1, 1)?,
            dst: lab.pod(2, 1)?,
            via: Via::Pod,
            proxies: daemon_pids(&lab, &[1, 2]),
        };
        // `meshed` implies the data-path part is on.
        if only.path("nodemesh-cross") {
            targets.push(cross);
        }
        mesh = Some(lab);
    }

    let mut paths = Vec::new();
    if !targets.is_empty() {
        let keys: Vec<&str> = targets.iter().map(|t| t.key.as_str()).collect();
        progress(&format!(
            "paths {}: measured in turn within every run of every figure",
            keys.join(", ")
        ));
        for t in &targets {
            progress(&format!("  {}: {}", t.key, t.label));
        }
        paths = measure_all(&targets, sizes, only, progress);
    }
    if let Some((pair, lab)) = plain {
        drop(pair);
        drop(lab);
    }

    if let Some(mut lab) = mesh {
        if only.path("nodemesh-same") {
            // A fresh daemon, so its memory figures are not those of a heap the
            // cross-node figures already grew (registrations are restored).
            lab.restart_daemon(1)?;
            let same = Target {
                key: "nodemesh-same".into(),
                label: "nodemesh within a node (pod -> daemon -> pod)".into(),
                src: lab.pod(1, 1)?,
                dst: lab.pod(1, 2)?,
                via: Via::Pod,
                proxies: daemon_pids(&lab, &[1]),
            };
            progress("path nodemesh-same: n1-p1 -> n1-p2 through the node's daemon");
            paths.extend(measure_all(
                std::slice::from_ref(&same),
                sizes,
                only,
                progress,
            ));
        }
    }
    let tuning = if opts.parts.tuning {
        tune(opts, progress)?
    } else {
        Vec::new()
    };
    Ok((paths, tuning))
}

/// Fails before any lab is built if the prefix leaves no room for the
/// labs' suffixes (`d`, `m`, and `t0`.. for the tuning variants).
fn check_prefix_room(opts: &BenchOptions) -> Result<(), BenchError> {
    let tuning = if opts.parts.tuning {
        format!("t{}", chosen_variants(opts).len().saturating_sub(1))
    } else {
        String::new()
    };
    let suffix = if tuning.len() > 1 { tuning } else { "m".into() };
    let longest = format!("{}{suffix}", opts.prefix);
    if longest.len() > MAX_PREFIX_LEN {
        return Err(BenchError::PrefixTooLong {
            prefix: opts.prefix.clone(),
            longest,
            max_len: MAX_PREFIX_LEN,
            fits: MAX_PREFIX_LEN - suffix.len(),
        });
    }
    Ok(())
}

fn daemon_pids(lab: &Lab, nodes: &[usize]) -> Vec<u32> {
    nodes.iter().filter_map(|n| lab.daemon_pid(*n)).collect()
}

type Edit = fn(&mut nodemesh::config::Config);

/// A tuning variant: name, whether it is the shipped default, the config
/// edit, and whether it is measured on the same-node path (else cross-node).
type Variant = (&'static str, bool, Edit, bool);

fn variants() -> Vec<Variant> {
    use nodemesh::relay_splice::TcpRelay;
    vec![
        (
            "default: 8 MiB UDP buffers, 2 MiB stream / 8 MiB connection windows, 1 runtime worker thread",
            true,
            |_| {},
            false,
        ),
        ("UDP buffers 256 KiB (near the kernel default)", false, |c| {
            c.tunnel.udp_buffer = 256 << 10;
        }, false),
        ("UDP buffers 32 MiB", false, |c| {
            c.tunnel.udp_buffer = 32 << 20;
        }, false),
        ("windows 1 MiB stream / 4 MiB connection", false, |c| {
            c.tunnel.stream_window = 1 << 20;
            c.tunnel.connection_window = 4 << 20;
        }, false),
        ("windows 8 MiB stream / 32 MiB connection (the default before the tenth pass)", false, |c| {
            c.tunnel.stream_window = 8 << 20;
            c.tunnel.connection_window = 32 << 20;
        }, false),
        ("windows 32 MiB stream / 128 MiB connection", false, |c| {
            c.tunnel.stream_window = 32 << 20;
            c.tunnel.connection_window = 128 << 20;
        }, false),
        (
            "runtime: 2 worker threads (one per CPU here, tokio's default)",
            false,
            |c| c.worker_threads = 2,
            false,
        ),
        ("runtime: 4 worker threads", false, |c| c.worker_threads = 4, false),
        (
            "congestion: new_reno",
            false,
            |c| c.tunnel.congestion = nodemesh::config::Congestion::NewReno,
            false,
        ),
        (
            "congestion: bbr",
            false,
            |c| c.tunnel.congestion = nodemesh::config::Congestion::Bbr,
            false,
        ),
        (
            "max_udp_payload 1452 (no MTU raise on a jumbo underlay)",
            false,
            |c| c.tunnel.max_udp_payload = 1452,
            false,
        ),
        (
            "initial_mtu = max_udp_payload (no discovery ramp)",
            false,
            |c| c.tunnel.initial_mtu = c.tunnel.max_udp_payload,
            false,
        ),
        ("ACK frequency extension: an ACK every 11th packet (ack_eliciting_threshold 10)", false, |c| {
            c.tunnel.ack_eliciting_threshold = Some(10);
        }, false),
        (
            "GSO off (segmentation_offload: false): one sendmsg per packet",
            false,
            |c| c.tunnel.segmentation_offload = false,
            false,
        ),
        (
            "client_address.preserve: false (into the pod from its own address, no IP_TRANSPARENT)",
            false,
            |c| c.client_address.preserve = false,
            false,
        ),
        (
            "same node, client_address.preserve: false",
            false,
            |c| c.client_address.preserve = false,
            true,
        ),
        ("same node, tcp_relay: copy (64 KiB buffer, epoll)", false, |c| {
            c.tcp_relay = TcpRelay::Copy;
        }, true),
        ("same node, tcp_relay: splice (pipe, epoll)", true, |c| {
            c.tcp_relay = TcpRelay::Splice;
        }, true),
    ]
}

/// The variants `--variants` selects (every one without it).
fn chosen_variants(opts: &BenchOptions) -> Vec<Variant> {
    let chosen = |name: &str| {
        opts.variants.is_empty() || opts.variants.iter().any(|v| name.contains(v.as_str()))
    };
    variants().into_iter().filter(|v| chosen(v.0)).collect()
}

/// New connections (connect, one exchange, close) through every target:
/// a sequential echo server on each destination, a 5-connection warm-up,
/// then `runs` runs of `sizes.new_conns`, the targets taking turns; per
/// target, each run's p50/p99/p99.9 in µs.
fn new_connection_runs(
    targets: &[Target],
    rs: &mut [PathResult],
    runs: usize,
    sizes: &Sizes,
    progress: &mut dyn FnMut(&str),
) -> Vec<Vec<[f64; 3]>> {
    let (_seq, ready) = servers(targets, rs, SEQ_ECHO_PORT, "sequential echo server", |l| {
        Echo::start(l, sizes.msg_len, true)
    });
    for (t, _) in targets.iter().zip(&ready).filter(|(_, ok)| **ok) {
        let _ = load::new_connections(&t.src.netns, t.addr(SEQ_ECHO_PORT), 5, sizes.msg_len);
    }
    interleaved(
        targets,
        &ready,
        rs,
        runs,
        "new connections",
        |t| {
            let addr = t.addr(SEQ_ECHO_PORT);
            load::new_connections(&t.src.netns, addr, sizes.new_conns, sizes.msg_len)
                .map(|h| load::percentiles_us(&h))
        },
        |q| format!("p50 {:.0} µs, p99 {:.0} µs", q[0], q[1]),
        progress,
    )
}

/// The tuning variants, interleaved like the paths: one meshed lab per
/// variant (prefix plus `t<index>`), all up at once, each with its daemons
/// configured for its variant; every run of every figure then visits the
/// variants in turn, so that a variant measured late in the run is not
/// favoured or penalised by the machine's drift.
fn tune(
    opts: &BenchOptions,
    progress: &mut dyn FnMut(&str),
) -> Result<Vec<TuningResult>, BenchError> {
    let sizes = &opts.sizes;
    let ticks = procfs::clock_ticks();
    let variants = chosen_variants(opts);
    let mut labs = Vec::with_capacity(variants.len());
    let mut targets = Vec::with_capacity(variants.len());
    for (i, (variant, _, edit, same_node)) in variants.iter().enumerate() {
        let key = format!("v{i}");
        progress(&format!("tuning {key}: {variant}"));
        let mut lab = up(lab_options(opts, &format!("t{i}"), 2, 2), progress)?;
        for node in [1, 2] {
            lab.update_config(node, |c| {
                if let Some(mtu) = opts.underlay_mtu {
                    // As the lab sets it (IPv4 underlay).
                    c.tunnel.max_udp_payload = u16::try_from(mtu.saturating_sub(28))
                        .unwrap_or(65527)
                        .min(65527);
                }
                edit(c);
            })?;
            lab.restart_daemon(node)?;
        }
        let (dst, nodes): (_, &[usize]) = if *same_node {
            (lab.pod(1, 2)?, &[1])
        } else {
            (lab.pod(2, 1)?, &[1, 2])
        };
        let t = Target {
            key,
            label: (*variant).to_owned(),
            src: lab.pod(1, 1)?,
            dst,
            via: Via::Pod,
            proxies: daemon_pids(&lab, nodes),
        };
        // Warm-up: the tunnel up before the first measured run.
        let _ = bulk_once(&t, 1, 1 << 20, ticks);
        targets.push(t);
        labs.push(lab);
    }
    if targets.is_empty() {
        return Ok(Vec::new());
    }
    progress(&format!(
        "tuning: {} variants measured in turn within every run",
        targets.len()
    ));
    let mut rs: Vec<PathResult> = targets
        .iter()
        .map(|t| PathResult {
            key: t.key.clone(),
            ..PathResult::default()
        })
        .collect();
    // At most 3 runs per variant: a dozen variants at five runs would double
    // the length of a full run.
    let runs = sizes.runs.min(3);
    let mut bulk = Vec::new();
    let mut lost = Vec::new();
    let readings = |labs: &[Lab]| -> Vec<Option<(f64, f64)>> {
        variants
            .iter()
            .zip(labs)
            .map(|((.., same_node), lab)| (!same_node).then(|| tunnel_packets(lab)).flatten())
            .collect()
    };
    for (streams, bytes) in [(1, sizes.bulk_bytes), (8, sizes.bulk8_bytes)] {
        let before = readings(&labs);
        bulk.push(bulk_interleaved(
            &targets, &mut rs, runs, streams, bytes, ticks, progress,
        ));
        let after = readings(&labs);
        lost.push(
            before
                .into_iter()
                .zip(after)
                .map(|(b, a)| lost_pct(b, a))
                .collect::<Vec<_>>(),
        );
    }
    let mut p50 = vec![Vec::new(); targets.len()];
    if let Some(&rate) = sizes.rates.first() {
        let (_echoes, ready) = servers(&targets, &mut rs, ECHO_PORT, "echo server", |l| {
            Echo::start(l, sizes.msg_len, false)
        });
        p50 = interleaved(
            &targets,
            &ready,
            &mut rs,
            runs,
            &format!("latency at {rate} req/s"),
            |t| {
                let secs = Duration::from_secs_f64(sizes.latency_secs);
                load::open_loop(&t.src.netns, t.addr(ECHO_PORT), rate, secs, sizes.msg_len)
                    .map(|h| load::percentiles_us(&h)[0])
            },
            |p50| format!("p50 {p50:.0} µs"),
            progress,
        );
    }
    let new_conn = new_connection_runs(&targets, &mut rs, runs, sizes, progress);
    drop(labs);
    let mut out = Vec::with_capacity(targets.len());
    for (i, ((variant, default, _, same_node), r)) in variants.iter().zip(rs).enumerate() {
        let (g, c) = bulk.first().map_or((None, None), |b| b[i].clone());
        let (g8, c8) = bulk.get(1).map_or((None, None), |b| b[i].clone());
        out.push(TuningResult {
            path: if *same_node {
                "nodemesh-same"
            } else {
                "nodemesh-cross"
            }
            .into(),
            variant: (*variant).into(),
            default: *default,
            throughput1_gbps: g,
            cpu_per_gb1: c,
            throughput8_gbps: g8,
            cpu_per_gb8: c8,
            p50_us: spread_opt(&p50[i]),
            new_conn_p50_us: new_conn
                .get(i)
                .and_then(|q| spread_opt(&q.iter().map(|q| q[0]).collect::<Vec<_>>())),
            lost_pct1: lost.first().and_then(|l| l[i]),
            lost_pct8: lost.get(1).and_then(|l| l[i]),
            errors: r.errors,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::Parts;

    fn opts(prefix: &str, tuning: bool, variants: &[&str]) -> BenchOptions {
        BenchOptions {
            prefix: prefix.into(),
            bin_dir: None,
            docs_dir: "docs".into(),
            sizes: Sizes::quick(),
            quick: true,
            parts: Parts {
                datapath: true,
                tuning,
                cost: false,
                relays: false,
            },
            command: String::new(),
            note: None,
            merge: false,
            only: Selection::default(),
            underlay_mtu: None,
            variants: variants.iter().map(|v| (*v).to_owned()).collect(),
        }
    }

    #[test]
    fn lost_packets_are_a_share_of_those_sent_between_two_readings() {
        assert_eq!(
            lost_pct(Some((100.0, 1.0)), Some((1100.0, 11.0))),
            Some(1.0)
        );
        assert_eq!(
            lost_pct(Some((100.0, 1.0)), Some((100.0, 1.0))),
            None,
            "nothing sent"
        );
        assert_eq!(lost_pct(None, Some((100.0, 1.0))), None, "not scraped");
        assert_eq!(
            lost_pct(Some((0.0, 5.0)), Some((10.0, 0.0))),
            Some(0.0),
            "a reset counter"
        );
    }

    #[test]
    fn the_prefix_must_leave_room_for_every_lab_suffix() {
        let all = variants().len();
        assert!(all > 10, "the test assumes two-digit tuning suffixes");
        // nmbench + t12: 10 characters, the limit.
        check_prefix_room(&opts("nmbench", true, &[])).expect("default prefix fits");
        let e = check_prefix_room(&opts("nmbench12", true, &[])).expect_err("too long");
        assert!(
            matches!(e, BenchError::PrefixTooLong { fits: 7, .. }),
            "{e}"
        );
        // With one variant (suffix t0) one more character fits, and without
        // tuning (suffixes d and m) two more.
        check_prefix_room(&opts("nmbench1", true, &["bbr"])).expect("t0 suffix");
        check_prefix_room(&opts("nmbench12", true, &["bbr"])).expect_err("nmbench12t0");
        check_prefix_room(&opts("nmbench12", false, &[])).expect("d/m suffix only");
        check_prefix_room(&opts("nmbench123", false, &[])).expect_err("11 characters");
    }
}
