//! The deployment-model cost comparison: one nodemesh daemon per node versus
//! one per pod (sidecar mode of the same binary, [`super::sidecar`]).
//!
//! For each P in the run's pod counts: a 3-node meshed lab with P pods per
//! node; pod k of node i talks to pod k of each other node (6P connections,
//! each pod a client of 2 peers and a server of 2). Measured in node mode,
//! then the node daemons are replaced by per-pod daemons and measured again:
//! total proxy RSS (idle, with the connections open, after load), total
//! proxy CPU at a fixed total request rate, and the number of QUIC
//! connections (tunnels) from the daemons' metrics: each connection is
//! counted once, by the daemon that dialled it, and carries streams both
//! ways, so node mode needs at most one per node pair (3 for 3 nodes).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::procfs;
use super::sidecar;
use super::{BenchError, BenchOptions, Sizes};
use crate::demo;
use crate::http;
use crate::lab::{Lab, LabOptions, PodHandle};
use crate::metrics;

const COST_PORT: u16 = 9100;
const MSG_LEN: usize = 256;

/// One (pods per node, mode) point.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct CostPoint {
    /// Pods per node.
    pub pods_per_node: usize,
    /// `node` or `sidecar`.
    pub mode: String,
    /// Proxy processes in the cluster.
    pub proxies: usize,
    /// Total proxy RSS before any connection, KiB.
    pub rss_idle_kib: u64,
    /// Total proxy RSS with every connection open (after one exchange each), KiB.
    pub rss_open_kib: u64,
    /// Total proxy RSS at the end of the fixed load, KiB.
    pub rss_loaded_kib: u64,
    /// Total proxy CPU during the fixed load, in cores (CPU-seconds per second).
    pub cpu_cores: f64,
    /// Requests per second achieved during the load.
    pub achieved_rate: f64,
    /// Median request latency during the load, µs.
    pub p50_us: f64,
    /// Application connections open.
    pub connections: usize,
    /// QUIC mTLS connections (tunnels) open, from the daemons' metrics
    /// (`nodemesh_tunnels_open{direction="dialled"}` summed: each once).
    pub tunnels: f64,
    /// Why something is missing.
    pub errors: Vec<String>,
}

fn pairs(pods: &[PodHandle], nodes: usize) -> Vec<(PodHandle, PodHandle)> {
    let mut out = Vec::new();
    for a in pods {
        for b in pods {
            if a.node != b.node && a.index == b.index && b.node <= nodes {
                out.push((a.clone(), b.clone()));
            }
        }
    }
    out
}

fn io(what: &str) -> impl Fn(std::io::Error) -> BenchError + '_ {
    move |source| BenchError::Io {
        what: what.to_owned(),
        source,
    }
}

/// The fixed load: servers in every destination pod, one connection per pair.
struct Load {
    rt: tokio::runtime::Runtime,
    conns: Vec<tokio::net::TcpStream>,
    servers: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn open(pairs: &[(PodHandle, PodHandle)]) -> Result<Self, BenchError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(io("cost load runtime"))?;
        let mut servers = Vec::new();
        let mut dsts: Vec<&PodHandle> = pairs.iter().map(|p| &p.1).collect();
        dsts.sort_by_key(|p| (p.node, p.index));
        dsts.dedup();
        for d in dsts {
            let l = d.listen(COST_PORT)?;
            l.set_nonblocking(true).map_err(io("listener"))?;
            let _guard = rt.enter();
            let l = tokio::net::TcpListener::from_std(l).map_err(io("listener"))?;
            servers.push(rt.spawn(async move {
                while let Ok((mut s, _)) = l.accept().await {
                    let _ = s.set_nodelay(true);
                    tokio::spawn(async move {
                        let mut buf = [0u8; MSG_LEN];
                        while s.read_exact(&mut buf).await.is_ok() {
                            if s.write_all(&buf).await.is_err() {
                                break;
                            }
                        }
                    });
                }
            }));
        }
        let mut conns = Vec::new();
        for (a, b) in pairs {
            let s = a.connect(b.addr(COST_PORT))?;
            s.set_nonblocking(true).map_err(io("connection"))?;
            let _guard = rt.enter();
            conns.push(tokio::net::TcpStream::from_std(s).map_err(io("connection"))?);
        }
        let mut load = Self { rt, conns, servers };
        // One exchange each: every tunnel is up before anything is measured.
        let conns = std::mem::take(&mut load.conns);
        load.conns = load
            .rt
            .block_on(async move {
                let mut out = Vec::new();
                for mut c in conns {
                    let mut buf = [0u8; MSG_LEN];
                    c.write_all(&buf).await?;
                    c.read_exact(&mut buf).await?;
                    out.push(c);
                }
                Ok::<_, std::io::Error>(out)
            })
            .map_err(io("first exchange"))?;
        Ok(load)
    }

    /// `rate` requests/s spread over all connections for `secs`; returns
    /// (requests done, median latency µs, elapsed).
    fn run(&mut self, rate: u32, secs: f64) -> Result<(u64, f64, Duration), BenchError> {
        let n = self.conns.len().max(1);
        let period = Duration::from_secs_f64(n as f64 / f64::from(rate.max(1)));
        let dur = Duration::from_secs_f64(secs);
        let conns = std::mem::take(&mut self.conns);
        let start = Instant::now();
        let (conns, lats) = self
            .rt
            .block_on(async move {
                let mut tasks = Vec::new();
                for (i, mut c) in conns.into_iter().enumerate() {
                    // Stagger the connections across one period.
                    let offset = period.mul_f64(i as f64 / n as f64);
                    tasks.push(tokio::spawn(async move {
                        let mut lats = Vec::new();
                        let mut tick =
                            tokio::time::interval_at(tokio::time::Instant::now() + offset, period);
                        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                        let end = tokio::time::Instant::now() + dur;
                        let mut buf = [0u8; MSG_LEN];
                        loop {
                            let at = tick.tick().await;
                            if at >= end {
                                break;
                            }
                            c.write_all(&buf).await?;
                            c.read_exact(&mut buf).await?;
                            lats.push(at.elapsed().as_micros() as u64);
                        }
                        Ok::<_, std::io::Error>((c, lats))
                    }));
                }
                let mut conns = Vec::new();
                let mut lats = Vec::new();
                for t in tasks {
                    let (c, l) = t
                        .await
                        .unwrap_or_else(|e| Err(std::io::Error::other(e.to_string())))?;
                    conns.push(c);
                    lats.extend(l);
                }
                Ok::<_, std::io::Error>((conns, lats))
            })
            .map_err(io("fixed load"))?;
        let elapsed = start.elapsed();
        self.conns = conns;
        let mut lats = lats;
        lats.sort_unstable();
        let p50 = lats.get(lats.len() / 2).copied().unwrap_or(0) as f64;
        Ok((lats.len() as u64, p50, elapsed))
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.conns.clear();
        for s in &self.servers {
            s.abort();
        }
    }
}

fn tunnels(admin: &[(String, SocketAddr)]) -> Result<f64, BenchError> {
    let mut total = 0.0;
    for (ns, addr) in admin {
        let r = http::get(ns, *addr, "/metrics", Duration::from_secs(5))?;
        let samples = metrics::parse(&r.body).map_err(crate::LabError::from)?;
        total += demo::open_tunnels(&samples);
    }
    Ok(total)
}

fn measure(
    mode: &str,
    p: usize,
    pids: &[u32],
    admin: &[(String, SocketAddr)],
    pairs: &[(PodHandle, PodHandle)],
    sizes: &Sizes,
    progress: &mut dyn FnMut(&str),
) -> CostPoint {
    let mut pt = CostPoint {
        pods_per_node: p,
        mode: mode.into(),
        proxies: pids.len(),
        connections: pairs.len(),
        ..CostPoint::default()
    };
    let r = (|| -> Result<(), BenchError> {
        let ticks = procfs::clock_ticks();
        pt.rss_idle_kib = procfs::rss_kib_sum(pids)?;
        let mut load = Load::open(pairs)?;
        pt.rss_open_kib = procfs::rss_kib_sum(pids)?;
        pt.tunnels = tunnels(admin)?;
        let cpu0 = procfs::cpu_seconds_sum(pids, ticks)?;
        let (done, p50, elapsed) = load.run(sizes.cost_rate, sizes.cost_secs)?;
        let cpu1 = procfs::cpu_seconds_sum(pids, ticks)?;
        pt.rss_loaded_kib = procfs::rss_kib_sum(pids)?;
        pt.cpu_cores = (cpu1 - cpu0) / elapsed.as_secs_f64();
        pt.achieved_rate = done as f64 / elapsed.as_secs_f64();
        pt.p50_us = p50;
        Ok(())
    })();
    if let Err(e) = r {
        pt.errors.push(e.to_string());
        progress(&format!("  {mode} P={p}: FAILED {e}"));
    }
    progress(&format!(
        "  {mode} P={p}: {} proxies, RSS idle {:.1} MiB / open {:.1} MiB / loaded {:.1} MiB, CPU {:.3} cores at {:.0} req/s, {} tunnels, p50 {:.0} µs",
        pt.proxies,
        pt.rss_idle_kib as f64 / 1024.0,
        pt.rss_open_kib as f64 / 1024.0,
        pt.rss_loaded_kib as f64 / 1024.0,
        pt.cpu_cores,
        pt.achieved_rate,
        pt.tunnels,
        pt.p50_us
    ));
    pt
}

/// Runs the comparison for every P of the run.
pub fn run(
    opts: &BenchOptions,
    progress: &mut dyn FnMut(&str),
) -> Result<Vec<CostPoint>, BenchError> {
    let sizes = &opts.sizes;
    let mut out = Vec::new();
    for &p in &sizes.pods {
        let mut o = LabOptions::new(format!("{}c", opts.prefix), 3, p);
        o.bin_dir = opts.bin_dir.clone();
        o.log_level = "warn".into();
        progress(&format!("cost: building 3-node lab with {p} pods per node"));
        let mut lab = match Lab::up(o) {
            Ok(lab) => lab,
            Err(e) => {
                // Keep the points measured so far; record this one as failed.
                progress(&format!("  P={p}: lab FAILED {e}"));
                for mode in ["node", "sidecar"] {
                    out.push(CostPoint {
                        pods_per_node: p,
                        mode: mode.into(),
                        errors: vec![format!("lab: {e}")],
                        ..CostPoint::default()
                    });
                }
                if crate::lab::interrupted() {
                    return Err(e.into());
                }
                continue;
            }
        };
        let pods = lab.pods();
        let pairs = pairs(&pods, 3);
        let pids: Vec<u32> = (1..=3).filter_map(|n| lab.daemon_pid(n)).collect();
        let admin: Vec<(String, SocketAddr)> = lab
            .nodes()
            .iter()
            .filter_map(|n| n.daemon.as_ref().map(|d| (n.netns.clone(), d.admin)))
            .collect();
        out.push(measure("node", p, &pids, &admin, &pairs, sizes, progress));
        if p <= sizes.sidecar_max_pods {
            progress(&format!("cost: sidecar mode, {} per-pod daemons", 3 * p));
            match sidecar::start(&mut lab, progress) {
                Ok(mut sc) => {
                    let pids = sc.pids();
                    let admin = sc.admin().to_vec();
                    out.push(measure(
                        "sidecar", p, &pids, &admin, &pairs, sizes, progress,
                    ));
                    sc.stop();
                }
                Err(e) => {
                    progress(&format!("  sidecar P={p}: FAILED {e}"));
                    out.push(CostPoint {
                        pods_per_node: p,
                        mode: "sidecar".into(),
                        errors: vec![e.to_string()],
                        ..CostPoint::default()
                    });
                }
            }
        } else {
            progress(&format!(
                "cost: sidecar mode skipped at P={p} (over --sidecar-max-pods)"
            ));
        }
        progress(&format!("cost: removing lab {}", lab.prefix()));
        for problem in lab.down() {
            progress(&format!("  teardown: {problem}"));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn pod(node: usize, index: usize) -> PodHandle {
        PodHandle {
            node,
            index,
            namespace: "lab".into(),
            name: format!("n{node}-p{index}"),
            netns: format!("x-n{node}-p{index}"),
            ip: Ipv4Addr::new(10, 78, node as u8, index as u8 + 1),
            ip6: None,
        }
    }

    #[test]
    fn each_pod_talks_to_its_peer_on_every_other_node() {
        let pods: Vec<_> = (1..=3)
            .flat_map(|n| (1..=2).map(move |k| pod(n, k)))
            .collect();
        let ps = pairs(&pods, 3);
        assert_eq!(ps.len(), 6 * 2);
        assert!(ps
            .iter()
            .all(|(a, b)| a.node != b.node && a.index == b.index));
    }
}
