//! Sidecar mode of the same `nodemesh` binary, for the cost comparison.
//!
//! Built on a meshed lab whose node daemons were stopped: every pod gets its
//! own daemon, run in its node's namespace with
//! - `node_name` = the pod's name and its own certificate from the lab CA;
//! - `node_address` = a per-pod underlay address `10.79.<node>.<pod>/32`
//!   added to the node's uplink (other nodes route `10.79.<j>.0/24` via
//!   node j), so each pod daemon has its own QUIC endpoint and admin address;
//! - its own CNI socket and state directory; the pod is registered on it
//!   with the same request `nodemesh-cni` sends (the pod's capture rules,
//!   installed at CNI ADD, already point at ports 15001/15006 in the pod);
//! - a discovery file listing every pod as a "node" whose `pod_cidrs` is the
//!   pod's /32, so tunnels are per pod pair: the sidecar deployment model,
//!   with the proxy code held equal.
//!
//! No daemon change was needed. [`Sidecars`] stops every daemon on drop.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use nodemesh::discovery::model::{ClusterModel, Node, Pod};
use nodemesh_cni::proto::{self, PodRegistration, Request, Response};

use super::BenchError;
use crate::daemon::{self, DaemonPaths, DaemonProcess};
use crate::lab::{Lab, POD_NAMESPACE};
use crate::netns;
use crate::topology;

/// A pod's sidecar underlay address `10.79.<node>.<pod>`.
pub fn sidecar_address(node: usize, pod: usize) -> Ipv4Addr {
    let o = |n: usize| u8::try_from(n).unwrap_or(u8::MAX);
    Ipv4Addr::new(10, 79, o(node), o(pod))
}

/// The running per-pod daemons.
#[derive(Debug, Default)]
pub struct Sidecars {
    procs: Vec<DaemonProcess>,
    admin: Vec<(String, SocketAddr)>,
}

impl Sidecars {
    /// Their pids.
    pub fn pids(&self) -> Vec<u32> {
        self.procs.iter().map(DaemonProcess::pid).collect()
    }

    /// (node netns, admin address) of each daemon.
    pub fn admin(&self) -> &[(String, SocketAddr)] {
        &self.admin
    }

    /// Stops them all (in parallel: each stop waits for its daemon to exit).
    pub fn stop(&mut self) {
        let procs = std::mem::take(&mut self.procs);
        std::thread::scope(|s| {
            for p in procs {
                s.spawn(move || {
                    let _ = p.stop(daemon::STOP_TIMEOUT);
                });
            }
        });
    }
}

impl Drop for Sidecars {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The sidecar-mode discovery: each pod is a node of its own.
pub fn model(pods: &[(String, Ipv4Addr, Ipv4Addr)]) -> ClusterModel {
    ClusterModel {
        nodes: pods
            .iter()
            .map(|(name, ip, addr)| Node {
                name: name.clone(),
                address: IpAddr::V4(*addr),
                pod_cidrs: vec![ipnet::IpNet::from(IpAddr::V4(*ip))],
            })
            .collect(),
        pods: pods
            .iter()
            .map(|(name, ip, _)| Pod {
                namespace: POD_NAMESPACE.into(),
                name: name.clone(),
                service_account: "default".into(),
                node: name.clone(),
                ips: vec![IpAddr::V4(*ip)],
                labels: BTreeMap::from([("app".to_owned(), name.clone())]),
                annotations: BTreeMap::new(),
            })
            .collect(),
        ..ClusterModel::default()
    }
}

fn register(socket: &Path, reg: PodRegistration) -> Result<(), BenchError> {
    let what = format!("registering pod {} on {}", reg.name, socket.display());
    let io = |source| BenchError::Io {
        what: what.clone(),
        source,
    };
    let line =
        proto::encode_line(&Request::Register(reg.clone())).map_err(|e| BenchError::Measure {
            what: what.clone(),
            problem: e.to_string(),
        })?;
    let mut s = UnixStream::connect(socket).map_err(io)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(io)?;
    s.write_all(&line).map_err(io)?;
    let mut answer = Vec::new();
    BufReader::new(&s)
        .read_until(b'\n', &mut answer)
        .map_err(io)?;
    match proto::decode_line::<Response>(&answer) {
        Ok(Response::Registered { .. }) => Ok(()),
        other => Err(BenchError::Measure {
            what,
            problem: format!("daemon answered {other:?}"),
        }),
    }
}

/// Stops `lab`'s node daemons and starts one daemon per pod instead.
pub fn start(lab: &mut Lab, progress: &mut dyn FnMut(&str)) -> Result<Sidecars, BenchError> {
    let nodemesh = lab
        .nodemesh_bin()
        .ok_or_else(|| BenchError::Measure {
            what: "sidecar mode".into(),
            problem: "the lab is not meshed".into(),
        })?
        .to_path_buf();
    let nodes: Vec<(usize, String)> = lab
        .nodes()
        .iter()
        .map(|n| (n.index, n.netns.clone()))
        .collect();
    for (i, _) in &nodes {
        lab.stop_daemon(*i)?;
    }
    let pods = lab.pods();
    let dir = lab.dir().join("sidecar");
    let certs = lab.cert_dir();
    let discovery = dir.join("discovery.yaml");
    std::fs::create_dir_all(&dir).map_err(|source| BenchError::Io {
        what: format!("creating {}", dir.display()),
        source,
    })?;
    // Addresses and routes.
    for (i, ns) in &nodes {
        for (j, _) in &nodes {
            if i != j {
                netns::ip([
                    "-n",
                    ns,
                    "route",
                    "add",
                    &format!("10.79.{j}.0/24"),
                    "via",
                    &topology::node_address(*j).to_string(),
                ])?;
            }
        }
    }
    let mut entries = Vec::new();
    for p in &pods {
        let addr = sidecar_address(p.node, p.index);
        let ns = topology::node_netns(lab.prefix(), p.node);
        netns::ip([
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{addr}/32"),
            "dev",
            topology::NODE_UPLINK,
        ])?;
        entries.push((p.name.clone(), p.ip, addr));
    }
    daemon::write_discovery(&discovery, &model(&entries))?;
    progress(&format!("  sidecar: {} certificates", pods.len()));
    for p in &pods {
        daemon::node_cert(&nodemesh, &certs, &p.name)?;
    }
    let mut sc = Sidecars::default();
    progress(&format!("  sidecar: starting {} daemons", pods.len()));
    let mut paths_of = Vec::new();
    for p in &pods {
        let pdir = dir.join(&p.name);
        let state_dir = pdir.join("pods");
        let queue = pdir.join("queue");
        for d in [&state_dir, &queue] {
            std::fs::create_dir_all(d).map_err(|source| BenchError::Io {
                what: format!("creating {}", d.display()),
                source,
            })?;
        }
        let addr = sidecar_address(p.node, p.index);
        let paths = DaemonPaths {
            config: pdir.join("config.yaml"),
            log: pdir.join("daemon.log"),
            cni_socket: pdir.join("cni.sock"),
            state_dir,
            admin: SocketAddr::new(IpAddr::V4(addr), daemon::ADMIN_PORT),
        };
        let mut config = daemon::node_config(
            &p.name,
            IpAddr::V4(addr),
            &certs,
            &paths,
            &discovery,
            "warn",
        );
        config.cni_queue_dir = queue;
        daemon::write_config(&paths.config, &config)?;
        let ns = topology::node_netns(lab.prefix(), p.node);
        sc.procs
            .push(DaemonProcess::spawn(&nodemesh, &p.name, &ns, &paths)?);
        sc.admin.push((ns, paths.admin));
        paths_of.push(paths);
    }
    for proc in &mut sc.procs {
        proc.wait_ready(daemon::READY_TIMEOUT)?;
    }
    progress(&format!("  sidecar: registering {} pods", pods.len()));
    let state = lab.state().clone();
    for (p, paths) in pods.iter().zip(&paths_of) {
        let inv = state
            .pods
            .iter()
            .find(|s| s.node == p.node && s.index == p.index)
            .map(|s| s.invocation.clone())
            .ok_or_else(|| BenchError::Measure {
                what: "sidecar mode".into(),
                problem: format!("pod {} not in the lab state", p.name),
            })?;
        register(
            &paths.cni_socket,
            PodRegistration {
                container_id: inv.container_id.clone(),
                pod_uid: Some(inv.pod_uid.clone()),
                namespace: inv.pod_namespace.clone(),
                name: inv.pod_name.clone(),
                service_account: None,
                netns: netns::netns_path(&inv.netns),
                ips: vec![IpAddr::V4(p.ip)],
            },
        )?;
    }
    Ok(sc)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_pod_is_a_node_with_its_slash_32() {
        let m = model(&[(
            "n1-p2".into(),
            Ipv4Addr::new(10, 78, 1, 3),
            sidecar_address(1, 2),
        )]);
        assert_eq!(m.nodes[0].name, "n1-p2");
        assert_eq!(m.nodes[0].address, IpAddr::V4(Ipv4Addr::new(10, 79, 1, 2)));
        assert_eq!(m.nodes[0].pod_cidrs[0].to_string(), "10.78.1.3/32");
        assert_eq!(m.pods[0].node, "n1-p2");
    }
}
