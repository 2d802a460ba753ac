//! The report: `docs/benchmarks.md` (tables, targets, method), raw
//! `docs/benchmarks/results.json`, and SVG plots in `docs/benchmarks/`.
//!
//! Hand-written analysis lives in `docs/benchmarks/notes.md` and is copied
//! verbatim into the generated page, so regenerating keeps it.

use std::fmt::Write as _;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::datapath::PathResult;
use super::stats::{show_opt, Spread};
use super::svg::{self, Bar, Series};
use super::{BenchError, BenchOptions, Results};

/// Where and how a run happened.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Meta {
    /// Start, UTC.
    pub started: String,
    /// End, UTC.
    pub finished: String,
    /// The command.
    pub command: String,
    /// Quick mode.
    pub quick: bool,
    /// `nproc`.
    pub nproc: String,
    /// CPU model (`lscpu`).
    pub cpu: String,
    /// `uname -r`.
    pub kernel: String,
    /// Total memory.
    pub memory: String,
    /// Build profile of the binaries measured.
    pub profile: String,
    /// `git rev-parse --short HEAD` (+ `-dirty`).
    pub commit: String,
    /// Load average at start.
    pub loadavg: String,
    /// Conditions noted by the operator.
    pub note: Option<String>,
    /// Sizes used.
    pub sizes: Option<super::Sizes>,
    /// Parts kept from an earlier run (`--merge`), and which run.
    #[serde(default)]
    pub merged_from: Option<String>,
}

fn sh(cmd: &str, args: &[&str]) -> String {
    std::process::Command::new(cmd)
        .args(args)
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

/// Now, UTC, as `YYYY-MM-DD HH:MM:SS UTC`.
pub fn now_utc() -> String {
    sh("date", &["-u", "+%Y-%m-%d %H:%M:%S UTC"])
}

impl Meta {
    /// Reads the machine description.
    pub fn collect(opts: &BenchOptions) -> Self {
        let lscpu = sh("lscpu", &[]);
        let cpu = lscpu
            .lines()
            .find(|l| l.starts_with("Model name:"))
            .map(|l| l["Model name:".len()..].trim().to_owned())
            .unwrap_or_default();
        let memory = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|m| {
                let l = m.lines().find(|l| l.starts_with("MemTotal:"))?.to_owned();
                let kib: f64 = l.split_whitespace().nth(1)?.parse().ok()?;
                Some(format!("{:.1} GiB", kib / 1024.0 / 1024.0))
            })
            .unwrap_or_default();
        let bin = crate::daemon::find_binary(crate::daemon::DAEMON_BIN, opts.bin_dir.as_deref())
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        // The ELF and program headers are at the start of the file.
        let head = std::fs::File::open(&bin).and_then(|f| {
            let mut head = Vec::new();
            std::io::Read::read_to_end(&mut std::io::Read::take(f, 64 * 1024), &mut head)
                .map(|_| head)
        });
        let static_pie = head.is_ok_and(|elf| !has_interpreter(&elf));
        let profile = if bin.contains("/release/") && static_pie {
            "release, statically linked as in the container image (scripts/image)".to_owned()
        } else if bin.contains("/release/") {
            "release (dynamically linked)".to_owned()
        } else if bin.contains("/debug/") {
            "debug (workspace crates opt-level 0, dependencies opt-level 2)".to_owned()
        } else {
            format!("unknown ({bin})")
        };
        let dirty = !sh("git", &["status", "--porcelain", "--untracked-files=no"]).is_empty();
        Self {
            started: now_utc(),
            finished: String::new(),
            command: opts.command.clone(),
            quick: opts.quick,
            nproc: sh("nproc", &[]),
            cpu,
            kernel: sh("uname", &["-r"]),
            memory,
            profile,
            commit: format!(
                "{}{}",
                sh("git", &["rev-parse", "--short", "HEAD"]),
                if dirty { "-dirty" } else { "" }
            ),
            loadavg: std::fs::read_to_string("/proc/loadavg")
                .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
                .unwrap_or_default(),
            note: opts.note.clone(),
            sizes: Some(opts.sizes.clone()),
            merged_from: None,
        }
    }

    /// One line.
    pub fn summary(&self) -> String {
        format!(
            "{} CPUs ({}), {}, Linux {}, load {}",
            self.nproc, self.cpu, self.memory, self.kernel, self.loadavg
        )
    }
}

/// Verdict of one target.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Verdict {
    /// The target as the issue states it.
    pub target: String,
    /// What was measured.
    pub measured: String,
    /// Met, missed, or not measured (`None`).
    pub met: Option<bool>,
}

fn path<'a>(r: &'a Results, key: &str) -> Option<&'a PathResult> {
    r.paths.iter().find(|p| p.key == key)
}

fn lat(p: &PathResult, rate: u32) -> Option<&super::datapath::LatencyAtRate> {
    p.latency.iter().find(|l| l.rate == rate)
}

/// Evaluates the issue's targets against `r`.
pub fn verdicts(r: &Results) -> Vec<Verdict> {
    let mut v = Vec::new();
    let cross = path(r, "nodemesh-cross");
    let direct = path(r, "direct");
    let stunnel = path(r, "stunnel");
    let floor = path(r, "relay-pair");
    // 1. Throughput.
    let t = "cross-node single-stream throughput ≥ 1.3× the stunnel mTLS pair".to_owned();
    match (
        cross.and_then(|p| p.throughput1_gbps.as_ref()),
        stunnel.and_then(|p| p.throughput1_gbps.as_ref()),
    ) {
        (Some(n), Some(s)) => {
            let ratio = n.median / s.median;
            v.push(Verdict {
                target: t,
                measured: format!(
                    "{:.2} vs {:.2} Gbit/s = {ratio:.2}× (need 1.3×{})",
                    n.median,
                    s.median,
                    if ratio < 1.3 {
                        format!(
                            "; needs {:.2} Gbit/s, {:.0} % more",
                            1.3 * s.median,
                            (1.3 / ratio - 1.0) * 100.0
                        )
                    } else {
                        String::new()
                    }
                ),
                met: Some(ratio >= 1.3),
            });
        }
        _ => v.push(Verdict {
            target: t,
            measured: "not measured".into(),
            met: None,
        }),
    }
    // 2. Added latency at 1000 req/s.
    for (q, limit, name) in [(0usize, 60.0, "p50"), (1, 150.0, "p99")] {
        let t = format!("added request/response latency at 1,000 req/s, {name} ≤ {limit:.0} µs");
        let get = |p: Option<&PathResult>| -> Option<f64> {
            let l = lat(p?, 1000)?;
            Some(if q == 0 {
                l.p50_us.median
            } else {
                l.p99_us.median
            })
        };
        match (get(cross), get(direct)) {
            (Some(n), Some(d)) if n < d => v.push(Verdict {
                target: t,
                measured: format!(
                    "inconclusive: {n:.0} µs with the mesh, {d:.0} µs direct (the baseline's tail is the scheduler's on this loaded machine)"
                ),
                met: None,
            }),
            (Some(n), Some(d)) => {
                let added = n - d;
                v.push(Verdict {
                    target: t,
                    measured: format!(
                        "{n:.0} − {d:.0} = {added:.0} µs{}{}",
                        if added > limit {
                            format!(" (over by {:.0} µs)", added - limit)
                        } else {
                            String::new()
                        },
                        // What two bare proxies add on this machine, measured alongside.
                        get(floor).map_or(String::new(), |f| format!(
                            "; a plain TCP relay pair adds {:.0} µs",
                            f - d
                        ))
                    ),
                    met: Some(added <= limit),
                });
            }
            _ => v.push(Verdict {
                target: t,
                measured: "not measured".into(),
                met: None,
            }),
        }
    }
    // 3. New connections.
    // "Added" as the latency target defines it: nodemesh minus direct.
    let t = "new-connection latency added over a warm tunnel ≤ 2× direct (p50; added = nodemesh − direct)"
        .to_owned();
    match (
        cross.and_then(|p| p.new_conn_p50_us.as_ref()),
        direct.and_then(|p| p.new_conn_p50_us.as_ref()),
    ) {
        (Some(n), Some(d)) => {
            let added = n.median - d.median;
            let limit = 2.0 * d.median;
            v.push(Verdict {
                target: t,
                measured: format!(
                    "{:.0} − {:.0} = {added:.0} µs added, limit 2 × {:.0} = {limit:.0} µs \
                     (nodemesh {:.2}× direct){}{}",
                    n.median,
                    d.median,
                    d.median,
                    n.median / d.median,
                    if added > limit {
                        format!("; over by {:.0} µs", added - limit)
                    } else {
                        String::new()
                    },
                    floor.and_then(|p| p.new_conn_p50_us.as_ref()).map_or(
                        String::new(),
                        |f| format!(
                            "; a plain TCP relay pair, which has no warm tunnel and connects \
                             across the nodes each time, adds {:.0} µs",
                            f.median - d.median
                        )
                    )
                ),
                met: Some(added <= limit),
            });
        }
        _ => v.push(Verdict {
            target: t,
            measured: "not measured".into(),
            met: None,
        }),
    }
    // 4. Idle RSS and per-connection memory.
    let t = "idle RSS ≤ 10 MiB per daemon".to_owned();
    match cross.filter(|p| !p.idle_rss_kib.is_empty()) {
        Some(p) => {
            let max = p.idle_rss_kib.iter().copied().max().unwrap_or(0) as f64 / 1024.0;
            let anon = p.idle_rss_split_kib.iter().map(|s| s[0]).max().unwrap_or(0) as f64 / 1024.0;
            v.push(Verdict {
                target: t,
                measured: format!(
                    "{max:.1} MiB (largest daemon, tunnel up, no connection; of which anonymous {anon:.1} MiB, the rest mapped binary and libraries)"
                ),
                met: Some(max <= 10.0),
            });
        }
        None => v.push(Verdict {
            target: t,
            measured: "not measured".into(),
            met: None,
        }),
    }
    let t = "≤ 4 KiB of daemon memory per open proxied connection".to_owned();
    match cross.filter(|p| !p.bytes_per_idle_conn_by_proxy.is_empty()) {
        Some(p) => {
            let max = p
                .bytes_per_idle_conn_by_proxy
                .iter()
                .copied()
                .fold(0.0, f64::max);
            v.push(Verdict {
                target: t,
                measured: format!(
                    "{:.1} KiB per daemon (largest; {:.1} KiB over both daemons){}",
                    max / 1024.0,
                    p.bytes_per_idle_conn.unwrap_or(0.0) / 1024.0,
                    if max > 4096.0 {
                        format!(", {:.0}× over", max / 4096.0)
                    } else {
                        String::new()
                    }
                ),
                met: Some(max <= 4096.0),
            });
        }
        None => v.push(Verdict {
            target: t,
            measured: "not measured".into(),
            met: None,
        }),
    }
    // 5. Cost at 30 pods per node.
    let at = |mode: &str, p: usize| {
        r.cost
            .iter()
            .find(|c| c.mode == mode && c.pods_per_node == p && c.errors.is_empty())
    };
    let p = if at("node", 30).is_some() {
        30
    } else {
        r.cost.iter().map(|c| c.pods_per_node).max().unwrap_or(0)
    };
    let t = "at 30 pods per node, total proxy memory per node ≤ 1/10 of sidecar mode".to_owned();
    match (at("node", p), at("sidecar", p)) {
        (Some(n), Some(s)) => {
            let ratio = n.rss_open_kib as f64 / s.rss_open_kib.max(1) as f64;
            v.push(Verdict {
                target: t,
                measured: format!(
                    "P={p}: {:.1} vs {:.1} MiB per node = 1/{:.1}{}",
                    n.rss_open_kib as f64 / 3.0 / 1024.0,
                    s.rss_open_kib as f64 / 3.0 / 1024.0,
                    1.0 / ratio.max(1e-9),
                    if p == 30 { "" } else { " (P=30 not run)" }
                ),
                met: (p == 30).then_some(ratio <= 0.1),
            });
        }
        _ => v.push(Verdict {
            target: t,
            measured: "not measured".into(),
            met: None,
        }),
    }
    let t = "tunnels equal the number of node pairs (3 nodes: 3 pairs)".to_owned();
    match at("node", p) {
        Some(n) => v.push(Verdict {
            target: t,
            measured: format!(
                "{:.0} QUIC connections at P={p} (sidecar: {}), independent of P",
                n.tunnels,
                at("sidecar", p).map_or("—".into(), |s| format!("{:.0}", s.tunnels))
            ),
            met: Some(n.tunnels <= crate::demo::max_tunnels(3) as f64),
        }),
        None => v.push(Verdict {
            target: t,
            measured: "not measured".into(),
            met: None,
        }),
    }
    v
}

fn bar(p: &PathResult, s: Option<&Spread>) -> Option<Bar> {
    s.map(|s| Bar {
        label: p.key.clone(),
        value: s.median,
        low: s.min,
        high: s.max,
    })
}

fn write_file(path: &Path, text: &str) -> Result<(), BenchError> {
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d).map_err(|source| BenchError::Io {
            what: format!("creating {}", d.display()),
            source,
        })?;
    }
    std::fs::write(path, text).map_err(|source| BenchError::Io {
        what: format!("writing {}", path.display()),
        source,
    })
}

/// SVG plots: (file name, svg text).
pub fn plots(r: &Results) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let bars = |f: &dyn Fn(&PathResult) -> Option<&Spread>| -> Vec<Bar> {
        r.paths.iter().filter_map(|p| bar(p, f(p))).collect()
    };
    let b = bars(&|p| p.throughput1_gbps.as_ref());
    if !b.is_empty() {
        out.push((
            "throughput-1.svg".into(),
            svg::bar_chart(
                "Single-stream bulk throughput (median, min–max)",
                "Gbit/s",
                &b,
            ),
        ));
    }
    let b = bars(&|p| p.throughput8_gbps.as_ref());
    if !b.is_empty() {
        out.push((
            "throughput-8.svg".into(),
            svg::bar_chart("8-stream bulk throughput (median, min–max)", "Gbit/s", &b),
        ));
    }
    let b = bars(&|p| p.cpu_per_gb1.as_ref());
    if !b.is_empty() {
        out.push((
            "cpu-per-gb.svg".into(),
            svg::bar_chart("Proxy CPU per GB, single stream", "CPU-seconds / GB", &b),
        ));
    }
    let b = bars(&|p| p.latency.first().map(|l| &l.p99_us));
    if !b.is_empty() {
        let rate = r
            .paths
            .iter()
            .find_map(|p| p.latency.first())
            .map_or(0, |l| l.rate);
        out.push((
            "latency-p99.svg".into(),
            svg::bar_chart(&format!("Request/response p99 at {rate} req/s"), "µs", &b),
        ));
    }
    let b = bars(&|p| p.new_conn_p50_us.as_ref());
    if !b.is_empty() {
        out.push((
            "new-connection.svg".into(),
            svg::bar_chart(
                "New connection: connect + 1 exchange + close (p50)",
                "µs",
                &b,
            ),
        ));
    }
    let series = |mode: &str| Series {
        name: mode.to_owned(),
        points: r
            .cost
            .iter()
            .filter(|c| c.mode == mode && c.errors.is_empty())
            .map(|c| (c.pods_per_node as f64, c.rss_open_kib as f64 / 3.0 / 1024.0))
            .collect(),
    };
    if !r.cost.is_empty() {
        let ratios: Vec<String> = r
            .cost
            .iter()
            .filter(|c| c.mode == "node" && c.errors.is_empty())
            .filter_map(|n| {
                let s = r.cost.iter().find(|c| {
                    c.mode == "sidecar" && c.pods_per_node == n.pods_per_node && c.errors.is_empty()
                })?;
                Some(format!(
                    "P={}: {:.1}×",
                    n.pods_per_node,
                    s.rss_open_kib as f64 / n.rss_open_kib.max(1) as f64
                ))
            })
            .collect();
        let note = if ratios.is_empty() {
            String::new()
        } else {
            format!("sidecar / node memory: {}", ratios.join(", "))
        };
        out.push((
            "memory-vs-pods.svg".into(),
            svg::line_chart(
                "Proxy memory per node vs pods per node (connections open)",
                &note,
                "pods per node",
                "MiB RSS per node",
                &[series("node"), series("sidecar")],
            ),
        ));
    }
    out
}

fn yes_no(m: Option<bool>) -> &'static str {
    match m {
        Some(true) => "**met**",
        Some(false) => "**missed**",
        None => "not measured",
    }
}

/// The markdown page.
pub fn markdown(
    r: &Results,
    notes: Option<&str>,
    micro: Option<&str>,
    plot_names: &[String],
) -> String {
    let m = &r.meta;
    let mut o = String::new();
    let _ = writeln!(o, "# Benchmarks\n");
    let _ = writeln!(
        o,
        "Generated by `scripts/bench` (`nodemesh-lab bench`); do not edit by hand except \
         `docs/benchmarks/notes.md`, which is copied in below. Raw numbers: \
         [benchmarks/results.json](benchmarks/results.json).\n"
    );
    let _ = writeln!(o, "| | |\n|---|---|");
    let _ = writeln!(o, "| command | `{}` |", m.command);
    let _ = writeln!(
        o,
        "| run | {} → {}{} |",
        m.started,
        m.finished,
        if m.quick {
            " (**quick mode**: small sizes, not for publication)"
        } else {
            ""
        }
    );
    let _ = writeln!(
        o,
        "| machine | {} CPUs, {}, {} RAM, Linux {} |",
        m.nproc, m.cpu, m.memory, m.kernel
    );
    let _ = writeln!(o, "| load average at start | {} |", m.loadavg);
    let _ = writeln!(o, "| binaries | {} |", m.profile);
    let _ = writeln!(o, "| commit | {} |", m.commit);
    if let Some(n) = &m.note {
        let _ = writeln!(o, "| conditions | {n} |");
    }
    if let Some(f) = &m.merged_from {
        let _ = writeln!(o, "| merged | {} |", f.replace('|', "/"));
    }
    if let Some(s) = &m.sizes {
        let _ = writeln!(
            o,
            "| sizes | {} runs per figure; bulk {} MiB (1 stream), 8 × {} MiB; latency {} s per run at {:?} req/s, {} B messages; {} new connections per run; {} idle connections; cost P ∈ {:?} at {} req/s total for {} s |",
            s.runs,
            s.bulk_bytes >> 20,
            s.bulk8_bytes >> 20,
            s.latency_secs,
            s.rates,
            s.msg_len,
            s.new_conns,
            s.idle_conns,
            s.pods,
            s.cost_rate,
            s.cost_secs
        );
    }
    let _ = writeln!(
        o,
        "\nEvery figure is the median of its runs with the min–max range in parentheses. \
         Direct, the two proxy pairs (stunnel's, and the plain TCP relay pair) and nodemesh \
         across nodes take turns within every run of every figure (run 1 of each, then run 2 \
         of each, ...), so drift of the machine during the run falls on all of them alike; \
         nodemesh within a node follows them.\n"
    );

    let _ = writeln!(
        o,
        "## Targets (issue 6)\n\n| target | measured | verdict |\n|---|---|---|"
    );
    for v in verdicts(r) {
        let _ = writeln!(o, "| {} | {} | {} |", v.target, v.measured, yes_no(v.met));
    }

    if !r.paths.is_empty() {
        let _ = writeln!(o, "\n## Data path\n");
        for p in &r.paths {
            let _ = writeln!(
                o,
                "- `{}`: {} ({} proxy process{})",
                p.key,
                p.label,
                p.proxies,
                if p.proxies == 1 { "" } else { "es" }
            );
        }
        let _ = writeln!(o, "\n### Bulk throughput and proxy CPU\n\n| path | 1 stream Gbit/s | 8 streams Gbit/s | CPU-s/GB (1 stream) | CPU-s/GB (8 streams) |\n|---|---|---|---|---|");
        for p in &r.paths {
            let _ = writeln!(
                o,
                "| {} | {} | {} | {} | {} |",
                p.key,
                show_opt(p.throughput1_gbps.as_ref(), 2),
                show_opt(p.throughput8_gbps.as_ref(), 2),
                show_opt(p.cpu_per_gb1.as_ref(), 2),
                show_opt(p.cpu_per_gb8.as_ref(), 2)
            );
        }
        let _ = writeln!(o, "\nCPU-s/GB is user+system CPU of the proxy processes (`/proc/<pid>/stat`) per 10⁹ bytes moved; the direct path has no proxy.\n");
        let _ = writeln!(o, "### Request/response latency (open loop, corrected for coordinated omission)\n\n| path | rate req/s | p50 µs | p99 µs | p99.9 µs |\n|---|---|---|---|---|");
        for p in &r.paths {
            for l in &p.latency {
                let _ = writeln!(
                    o,
                    "| {} | {} | {} | {} | {} |",
                    p.key,
                    l.rate,
                    l.p50_us.show(0),
                    l.p99_us.show(0),
                    l.p999_us.show(0)
                );
            }
        }
        let _ = writeln!(o, "\nOne connection; each request is scheduled at a fixed interval and its latency is measured from that *intended* send time to the full response, so a stall is charged to every request queued behind it. HDR histogram, ns resolution, 3 significant digits.\n");
        let _ = writeln!(o, "### New connections and memory\n\n| path | new connection p50 µs | p99 µs | proxy RSS after warm-up KiB [anon/file] | bytes per open idle connection (all proxies) | per proxy |\n|---|---|---|---|---|---|");
        for p in &r.paths {
            let _ = writeln!(
                o,
                "| {} | {} | {} | {} | {} | {} |",
                p.key,
                show_opt(p.new_conn_p50_us.as_ref(), 0),
                show_opt(p.new_conn_p99_us.as_ref(), 0),
                if p.idle_rss_kib.is_empty() {
                    "—".to_owned()
                } else {
                    p.idle_rss_kib
                        .iter()
                        .enumerate()
                        .map(|(i, k)| match p.idle_rss_split_kib.get(i) {
                            Some(s) => format!("{k} [{}/{}]", s[0], s[1]),
                            None => k.to_string(),
                        })
                        .collect::<Vec<_>>()
                        .join(", ")
                },
                p.bytes_per_idle_conn
                    .map_or("—".into(), |b| format!("{b:.0}")),
                if p.bytes_per_idle_conn_by_proxy.is_empty() {
                    "—".to_owned()
                } else {
                    p.bytes_per_idle_conn_by_proxy
                        .iter()
                        .map(|b| format!("{b:.0}"))
                        .collect::<Vec<_>>()
                        .join(" / ")
                }
            );
        }
        let _ = writeln!(o, "\nNew connection = connect + one {}-byte exchange + close, sequential, over a warm tunnel. Bytes per idle connection = RSS growth of the proxies with N connections open (each through to the server) divided by N.\n", m.sizes.as_ref().map_or(64, |s| s.msg_len));
        let errs: Vec<String> = r
            .paths
            .iter()
            .flat_map(|p| p.errors.iter().map(move |e| format!("{}: {e}", p.key)))
            .collect();
        if !errs.is_empty() {
            let _ = writeln!(o, "Figures that failed in this run:\n");
            for e in errs {
                let _ = writeln!(o, "- {e}");
            }
            let _ = writeln!(o);
        }
    }

    if !r.tuning.is_empty() {
        let _ = writeln!(o, "## Tuning (one lab per variant, all up at once, the variants measured in turn within every run; CPU over the daemons on the path)\n\n| path | variant | 1 stream Gbit/s | CPU-s/GB (1) | 8 streams Gbit/s | CPU-s/GB (8) | packets lost % (1 / 8 streams) | p50 µs at first rate | new connection p50 µs |\n|---|---|---|---|---|---|---|---|---|");
        for t in &r.tuning {
            let pct = |p: Option<f64>| p.map_or("—".to_owned(), |p| format!("{p:.2}"));
            let _ = writeln!(
                o,
                "| {} | {}{} | {} | {} | {} | {} | {} / {} | {} | {} |",
                t.path,
                t.variant,
                if t.default { " (**default**)" } else { "" },
                show_opt(t.throughput1_gbps.as_ref(), 2),
                show_opt(t.cpu_per_gb1.as_ref(), 2),
                show_opt(t.throughput8_gbps.as_ref(), 2),
                show_opt(t.cpu_per_gb8.as_ref(), 2),
                pct(t.lost_pct1),
                pct(t.lost_pct8),
                show_opt(t.p50_us.as_ref(), 0),
                show_opt(t.new_conn_p50_us.as_ref(), 0)
            );
        }
        let _ = writeln!(o);
    }

    if !r.relays.is_empty() {
        let _ = writeln!(o, "## Plain-TCP relay engines (one relay process per engine in one pod's namespace, client and sink on 127.0.0.1, the engines measured in turn within every run; CPU of the relay process)\n\nThese decide how the daemon relays its TCP ↔ TCP legs (same-node delivery, passthrough): `copy` and `splice` are the daemon's own relays (`tcp_relay` in the config) on its runtime (tokio, one worker); `tokio-uring` is measured here only (`nodemesh-lab relay-engine`), to be adopted if it were faster. The same choice through the whole daemon is the pair of same-node variants in the tuning table.\n\n| engine | what | 1 stream Gbit/s | CPU-s/GB (1) | 8 streams Gbit/s | CPU-s/GB (8) |\n|---|---|---|---|---|---|");
        for e in &r.relays {
            let failed = if e.errors.is_empty() {
                String::new()
            } else {
                format!(" (failed: {})", e.errors.join("; ").replace('|', "/"))
            };
            let _ = writeln!(
                o,
                "| {}{} | {}{} | {} | {} | {} | {} |",
                e.engine,
                if e.default { " (**default**)" } else { "" },
                e.label,
                failed,
                show_opt(e.throughput1_gbps.as_ref(), 2),
                show_opt(e.cpu_per_gb1.as_ref(), 3),
                show_opt(e.throughput8_gbps.as_ref(), 2),
                show_opt(e.cpu_per_gb8.as_ref(), 3)
            );
        }
        let _ = writeln!(o);
    }

    if !r.cost.is_empty() {
        let _ = writeln!(
            o,
            "## Cost: one daemon per node versus one per pod (sidecar mode)\n"
        );
        let _ = writeln!(o, "3 nodes, P pods per node; pod k of each node talks to pod k of both other nodes (6P connections). Sidecar mode runs the same `nodemesh` binary once per pod (own identity, own QUIC endpoint; every pod is a \"node\" in discovery), so the comparison isolates the deployment model. The fixed load is 256-byte request/response exchanges paced evenly over all connections; CPU is the proxies' total over the load window, divided by its length. The p50 column is as seen by the load generator, whose clients and servers all run on one thread of the benchmark process: a check that the load was served, not a latency figure (the data-path section has those).\n");
        let _ = writeln!(o, "| P | mode | proxies | RSS idle MiB | RSS, connections open MiB | RSS after load MiB | per node MiB (open) | CPU cores at fixed load | achieved req/s | p50 µs | app connections | QUIC connections |\n|---|---|---|---|---|---|---|---|---|---|---|---|");
        for c in &r.cost {
            if !c.errors.is_empty() {
                let _ = writeln!(
                    o,
                    "| {} | {} | — | failed: {} | | | | | | | | |",
                    c.pods_per_node,
                    c.mode,
                    c.errors.join("; ").replace('|', "/")
                );
                continue;
            }
            let mib = |k: u64| k as f64 / 1024.0;
            let _ = writeln!(
                o,
                "| {} | {} | {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.3} | {:.0} | {:.0} | {} | {:.0} |",
                c.pods_per_node, c.mode, c.proxies, mib(c.rss_idle_kib), mib(c.rss_open_kib), mib(c.rss_loaded_kib),
                mib(c.rss_open_kib) / 3.0, c.cpu_cores, c.achieved_rate, c.p50_us, c.connections, c.tunnels
            );
        }
        let _ = writeln!(o, "\n| P | memory ratio node / sidecar (connections open) | CPU ratio node / sidecar |\n|---|---|---|");
        let mut ps: Vec<usize> = r.cost.iter().map(|c| c.pods_per_node).collect();
        ps.dedup();
        for p in ps {
            let f = |mode: &str| {
                r.cost
                    .iter()
                    .find(|c| c.pods_per_node == p && c.mode == mode && c.errors.is_empty())
            };
            if let (Some(n), Some(s)) = (f("node"), f("sidecar")) {
                let _ = writeln!(
                    o,
                    "| {p} | 1/{:.1} | 1/{:.1} |",
                    s.rss_open_kib as f64 / n.rss_open_kib.max(1) as f64,
                    s.cpu_cores / n.cpu_cores.max(1e-9)
                );
            } else {
                let _ = writeln!(o, "| {p} | (sidecar not run) | |");
            }
        }
        let _ = writeln!(o);
    }

    if let Some(m) = micro {
        let _ = writeln!(
            o,
            "## Micro-benchmarks (criterion)\n\n`benches/benches/micro.rs`: the stream header and status codec, `Registry::resolve` (pod IP hit, CIDR-only, passthrough) at 10/100/1000 nodes of 30 pods, and `PolicyIndex::evaluate` (an allowed and a default-denied connection) with 1/10/100 ALLOW policies in the namespace. Output of the run (`docs/benchmarks/micro.txt`):\n\n```\n{}\n```\n",
            m.trim_end()
        );
    }
    if !plot_names.is_empty() {
        let _ = writeln!(o, "## Plots\n");
        for name in plot_names {
            let _ = writeln!(o, "![{name}](benchmarks/{name})\n");
        }
    }
    if let Some(n) = notes {
        let _ = writeln!(o, "{}", n.trim_end());
    }
    o
}

/// Writes the JSON, the plots and the page under `opts.docs_dir`.
pub fn write(opts: &BenchOptions, r: &Results) -> Result<(), BenchError> {
    let dir = opts.docs_dir.join("benchmarks");
    let json = serde_json::to_string_pretty(r).map_err(|e| BenchError::Measure {
        what: "results".into(),
        problem: e.to_string(),
    })?;
    write_file(&dir.join("results.json"), &json)?;
    let mut names = Vec::new();
    for (name, text) in plots(r) {
        write_file(&dir.join(&name), &text)?;
        names.push(name);
    }
    let notes = std::fs::read_to_string(dir.join("notes.md")).ok();
    let micro = std::fs::read_to_string(dir.join("micro.txt")).ok();
    write_file(
        &opts.docs_dir.join("benchmarks.md"),
        &markdown(r, notes.as_deref(), micro.as_deref(), &names),
    )
}

/// Whether an ELF64 little-endian file has a program interpreter (PT_INTERP):
/// a dynamically linked executable. False for anything unparsable.
fn has_interpreter(elf: &[u8]) -> bool {
    let u16_at = |o: usize| elf.get(o..o + 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
    let u64_at = |o: usize| {
        elf.get(o..o + 8)
            .and_then(|b| <[u8; 8]>::try_from(b).ok())
            .map(u64::from_le_bytes)
    };
    if elf.get(..4) != Some(b"\x7fELF".as_slice()) {
        return false;
    }
    let (Some(phoff), Some(phentsize), Some(phnum)) = (u64_at(0x20), u16_at(0x36), u16_at(0x38))
    else {
        return false;
    };
    let Ok(phoff) = usize::try_from(phoff) else {
        return false;
    };
    (0..usize::from(phnum)).any(|i| {
        let at = phoff + i * usize::from(phentsize);
        elf.get(at..at + 4) == Some(3u32.to_le_bytes().as_slice())
    })
}

#[cfg(test)]
mod tests {
    use super::has_interpreter;

    #[test]
    fn interpreter_is_found_in_a_dynamic_executable_only() {
        // This test binary is linked dynamically (the workspace default).
        let me = std::fs::read(std::env::current_exe().expect("test binary path"))
            .expect("test binary readable");
        assert!(has_interpreter(&me));
        // The same headers with PT_INTERP renamed to PT_NULL: no interpreter.
        let mut stripped = me[..4096.min(me.len())].to_vec();
        let phoff = u64::from_le_bytes(stripped[0x20..0x28].try_into().expect("8 bytes")) as usize;
        let (size, num) = (
            u16::from_le_bytes([stripped[0x36], stripped[0x37]]) as usize,
            u16::from_le_bytes([stripped[0x38], stripped[0x39]]) as usize,
        );
        for i in 0..num {
            let at = phoff + i * size;
            if stripped[at..at + 4] == 3u32.to_le_bytes() {
                stripped[at..at + 4].copy_from_slice(&0u32.to_le_bytes());
            }
        }
        assert!(!has_interpreter(&stripped));
        assert!(!has_interpreter(b"not an elf file"));
        assert!(!has_interpreter(b"\x7fELF"));
    }
}
