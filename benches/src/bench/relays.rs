//! The plain-TCP relay engines, compared in one run: the daemon's epoll
//! copy relay (its default), its splice(2) relay, and tokio-uring.
//!
//! Owns the part of the benchmark that settles which engine the daemon uses
//! for TCP ↔ TCP legs (same-node delivery, passthrough): each engine runs as
//! its own process ([`crate::relay_engine`], `nodemesh-lab relay-engine`)
//! in the pod namespace of a one-pod plain lab (suffix `r`); a bulk client
//! sends through it on 127.0.0.1 to a sink on 127.0.0.1, so the relay's own
//! cost is as large a share of the total as it can be. A run visits no
//! relay (the direct baseline) and every engine in turn, single stream and
//! 8 streams, so the engines are compared on runs taken seconds apart. CPU
//! is the relay process's, per GB relayed.

use std::io::{BufRead, BufReader};
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::process::{Child, Command, Stdio};

use clap::ValueEnum;
use serde::{Deserialize, Serialize};

use super::datapath::BulkRun;
use super::stats::Spread;
use super::{procfs, BenchError, BenchOptions};
use crate::lab::{Lab, LabOptions};
use crate::relay_engine::Engine;

/// The relay figure moves this many times the data-path bulk sizes: an
/// engine relays a GB in a fraction of a second here, and CPU time is read
/// in 10 ms clock ticks.
pub const SIZE_SCALE: u64 = 4;

/// One engine's figures (or the direct baseline's, `engine` = `none`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RelayEngineResult {
    /// `none` (no relay: client straight to the sink), `copy`, `splice`, `tokio-uring`.
    pub engine: String,
    /// What it is.
    pub label: String,
    /// Whether this is the daemon's default engine.
    pub default: bool,
    /// Single-stream throughput, Gbit/s.
    pub throughput1_gbps: Option<Spread>,
    /// CPU-seconds of the relay process per GB, single stream.
    pub cpu_per_gb1: Option<Spread>,
    /// 8-stream throughput (aggregate), Gbit/s.
    pub throughput8_gbps: Option<Spread>,
    /// CPU-seconds of the relay process per GB, 8 streams.
    pub cpu_per_gb8: Option<Spread>,
    /// Figures that could not be measured, and why.
    pub errors: Vec<String>,
}

/// A relay-engine process; killed on drop.
#[derive(Debug)]
pub(crate) struct EngineProcess {
    child: Child,
    /// Where each listener accepts, in the order of the pairs it was given.
    addrs: Vec<SocketAddr>,
}

impl Drop for EngineProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl EngineProcess {
    /// Starts `engine` in `netns`, relaying to `to`; returns once it listens.
    fn start(engine: Engine, netns: &str, to: SocketAddr) -> Result<Self, BenchError> {
        Self::start_pairs(
            engine,
            netns,
            &[(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)), to)],
        )
    }

    /// Starts `engine` in `netns` with one listener per `(listen, to)` pair
    /// (at least one); returns once every listener listens.
    pub(crate) fn start_pairs(
        engine: Engine,
        netns: &str,
        pairs: &[(SocketAddr, SocketAddr)],
    ) -> Result<Self, BenchError> {
        if pairs.is_empty() {
            return Err(BenchError::Measure {
                what: format!("relay engine {}", engine.name()),
                problem: "no address to listen on was given".into(),
            });
        }
        let exe = std::env::current_exe().map_err(|source| BenchError::Io {
            what: "finding nodemesh-lab's own path to start a relay engine".into(),
            source,
        })?;
        let mut command = Command::new("ip");
        command
            .args(["netns", "exec", netns])
            .arg(exe)
            .args(["relay-engine", "--engine"])
            // The value the subcommand's parser derives for it.
            .arg(
                engine
                    .to_possible_value()
                    .map_or_else(String::new, |v| v.get_name().to_owned()),
            );
        for (listen, to) in pairs {
            command
                .args(["--listen", &listen.to_string()])
                .args(["--to", &to.to_string()]);
        }
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|source| BenchError::Io {
                what: format!("starting relay engine {} in {netns}", engine.name()),
                source,
            })?;
        let stdout = child.stdout.take();
        let mut process = Self {
            child,
            addrs: Vec::with_capacity(pairs.len()),
        };
        let mut lines = stdout.map(|out| BufReader::new(out).lines());
        for _ in pairs {
            let line = match lines.as_mut().and_then(Iterator::next) {
                Some(Ok(l)) => l,
                Some(Err(source)) => {
                    return Err(BenchError::Io {
                        what: format!("reading relay engine {}'s address", engine.name()),
                        source,
                    })
                }
                None => String::new(),
            };
            let addr = parse_listening(&line).ok_or_else(|| BenchError::Measure {
                what: format!("relay engine {}", engine.name()),
                problem: format!(
                    "expected `listening <addr>` on its stdout, got {:?} (its stderr is above)",
                    line.trim_end()
                ),
            })?;
            process.addrs.push(addr);
        }
        Ok(process)
    }

    /// Where the first listener accepts ([`Self::start_pairs`] refuses to
    /// start without one, so there is a first).
    fn addr(&self) -> SocketAddr {
        self.addrs[0]
    }

    /// The process id.
    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }
}

/// The address in a relay engine's first line, `listening <addr>`.
pub fn parse_listening(line: &str) -> Option<SocketAddr> {
    line.trim_end().strip_prefix("listening ")?.parse().ok()
}

/// One bulk transfer of `streams` x `bytes` to `addr` (the sink's, or an
/// engine's relaying to it): (Gbit/s, CPU-s/GB of `relay`, if any).
fn bulk_once(
    netns: &str,
    sink_listener: &TcpListener,
    addr: SocketAddr,
    relay: Option<u32>,
    streams: usize,
    bytes: u64,
    ticks: f64,
) -> Result<(f64, Option<f64>), BenchError> {
    let sink = sink_listener.try_clone().map_err(|source| BenchError::Io {
        what: "cloning the sink's listener".into(),
        source,
    })?;
    let proxies: Vec<u32> = relay.into_iter().collect();
    let run = BulkRun {
        src_netns: netns,
        sink,
        addr,
        proxies: &proxies,
        what: "relay engine",
    };
    run.measure(streams, bytes, ticks)
}

/// The engines in the order every run visits them: `None` is the direct
/// baseline.
pub const ORDER: [Option<Engine>; 4] = [
    None,
    Some(Engine::Copy),
    Some(Engine::Splice),
    Some(Engine::Uring),
];

/// The engine the daemon uses unless configured otherwise.
fn default_engine() -> Engine {
    match nodemesh::relay_splice::TcpRelay::default() {
        nodemesh::relay_splice::TcpRelay::Copy => Engine::Copy,
        nodemesh::relay_splice::TcpRelay::Splice => Engine::Splice,
    }
}

/// The results' name of an entry of [`ORDER`].
fn key(engine: Option<Engine>) -> &'static str {
    engine.map_or("none", Engine::name)
}

fn describe(engine: Option<Engine>) -> &'static str {
    match engine {
        None => "no relay: client to sink on 127.0.0.1 (baseline)",
        Some(Engine::Copy) => {
            "the daemon's copy relay: epoll readiness, read/write through a 64 KiB buffer"
        }
        Some(Engine::Splice) => {
            "the daemon's splice(2) relay: socket → pipe → socket in the kernel"
        }
        Some(Engine::Uring) => "tokio-uring 0.5: io_uring read/write through owned 64 KiB buffers",
    }
}

/// Runs the relay-engine comparison.
pub fn run(
    opts: &BenchOptions,
    progress: &mut dyn FnMut(&str),
) -> Result<Vec<RelayEngineResult>, BenchError> {
    let sizes = &opts.sizes;
    let mut o = LabOptions::new(format!("{}r", opts.prefix), 1, 1).no_mesh();
    o.bin_dir = opts.bin_dir.clone();
    o.log_level = "warn".into();
    progress(&format!(
        "relay engines: building lab {} (1 node x 1 pod, mesh off)",
        o.prefix
    ));
    let lab = Lab::up(o)?;
    let pod = lab.pod(1, 1)?;
    let sink_listener =
        crate::netns::tcp_listen(&pod.netns, SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))?;
    let sink_addr = sink_listener
        .local_addr()
        .map_err(|source| BenchError::Io {
            what: "the sink's address".into(),
            source,
        })?;
    // One process per entry of ORDER (none for the baseline).
    let engines = ORDER
        .iter()
        .map(|e| {
            e.map(|e| EngineProcess::start(e, &pod.netns, sink_addr))
                .transpose()
        })
        .collect::<Result<Vec<_>, _>>()?;
    let ticks = procfs::clock_ticks();
    let mut results: Vec<RelayEngineResult> = ORDER
        .iter()
        .map(|e| RelayEngineResult {
            engine: key(*e).into(),
            label: describe(*e).into(),
            default: *e == Some(default_engine()),
            throughput1_gbps: None,
            cpu_per_gb1: None,
            throughput8_gbps: None,
            cpu_per_gb8: None,
            errors: Vec::new(),
        })
        .collect();
    for (streams, bytes) in [
        (1usize, sizes.bulk_bytes * SIZE_SCALE),
        (8, sizes.bulk8_bytes * SIZE_SCALE),
    ] {
        let mut gbps = vec![Vec::new(); ORDER.len()];
        let mut cpu = vec![Vec::new(); ORDER.len()];
        for run in 1..=sizes.runs {
            for (i, (e, process)) in ORDER.iter().zip(&engines).enumerate() {
                let (addr, pid) = process
                    .as_ref()
                    .map_or((sink_addr, None), |p| (p.addr(), Some(p.pid())));
                let name = key(*e);
                match bulk_once(&pod.netns, &sink_listener, addr, pid, streams, bytes, ticks) {
                    Ok((g, c)) => {
                        progress(&format!(
                            "relay engines: {streams}-stream run {run}/{}: {name} {g:.2} Gbit/s{}",
                            sizes.runs,
                            c.map_or(String::new(), |c| format!(", {c:.3} CPU-s/GB"))
                        ));
                        gbps[i].push(g);
                        cpu[i].extend(c);
                    }
                    Err(err) => {
                        progress(&format!("relay engines: {name}, {streams} streams: {err}"));
                        results[i].errors.push(format!("{streams} streams: {err}"));
                    }
                }
            }
        }
        for (i, r) in results.iter_mut().enumerate() {
            let (g, c) = (Spread::of(&gbps[i]), Spread::of(&cpu[i]));
            if streams == 1 {
                r.throughput1_gbps = g;
                r.cpu_per_gb1 = c;
            } else {
                r.throughput8_gbps = g;
                r.cpu_per_gb8 = c;
            }
        }
    }
    drop(engines);
    progress(&format!("relay engines: removing lab {}", lab.prefix()));
    drop(lab);
    Ok(results)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_engine_address_line_is_parsed_or_refused() {
        assert_eq!(
            parse_listening("listening 127.0.0.1:4242\n"),
            Some(SocketAddr::from((Ipv4Addr::LOCALHOST, 4242)))
        );
        assert_eq!(parse_listening("listening nowhere\n"), None);
        assert_eq!(parse_listening(""), None);
        assert_eq!(parse_listening("127.0.0.1:4242"), None);
    }

    #[test]
    fn every_run_visits_the_baseline_then_each_engine_once() {
        let names: Vec<&str> = ORDER.iter().map(|e| key(*e)).collect();
        assert_eq!(names, ["none", "copy", "splice", "tokio-uring"]);
    }
}
