//! The live view of the cluster the data path reads.
//!
//! Owns two things: the **discovery snapshot** (nodes, pods, pod CIDRs),
//! replaced whole by a discovery source, and the **local pods** registered by
//! the CNI plugin on this node. Readers clone an `Arc` of the snapshot under a
//! lock held only for that pointer copy, so a reload never blocks the data
//! path; local pods live in a `DashMap`.
//!
//! [`Registry::resolve`] turns an original destination into a [`Route`].

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, RwLock};

use dashmap::DashMap;
use ipnet::IpNet;

use crate::balancer::Balancer;
use crate::discovery::model::{ClusterModel, Node, Pod};
use crate::identity::KnownNodes;
use crate::pods::LocalPod;

/// A pod as the data path sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodInfo {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// Service account.
    pub service_account: String,
    /// Node it is scheduled on.
    pub node: String,
    /// Workload name for metrics: label `app` or `app.kubernetes.io/name`,
    /// else the pod name.
    pub workload: String,
}

impl PodInfo {
    fn from_model(p: &Pod) -> Self {
        let workload = p
            .labels
            .get("app.kubernetes.io/name")
            .or_else(|| p.labels.get("app"))
            .cloned()
            .unwrap_or_else(|| p.name.clone());
        Self {
            namespace: p.namespace.clone(),
            name: p.name.clone(),
            service_account: p.service_account.clone(),
            node: p.node.clone(),
            workload,
        }
    }
}

/// One immutable discovery snapshot.
#[derive(Debug, Default)]
pub struct Snapshot {
    nodes: HashMap<String, Node>,
    pods_by_ip: HashMap<IpAddr, Arc<PodInfo>>,
    cidrs: Vec<(IpNet, String)>,
    /// Generation, incremented by each apply.
    pub generation: u64,
}

impl Snapshot {
    /// Builds a snapshot from a validated model.
    pub fn from_model(model: &ClusterModel, generation: u64) -> Self {
        let nodes = model
            .nodes
            .iter()
            .map(|n| (n.name.clone(), n.clone()))
            .collect();
        let mut pods_by_ip = HashMap::new();
        for p in &model.pods {
            let info = Arc::new(PodInfo::from_model(p));
            for ip in &p.ips {
                pods_by_ip.insert(*ip, info.clone());
            }
        }
        let mut cidrs: Vec<(IpNet, String)> = model
            .nodes
            .iter()
            .flat_map(|n| n.pod_cidrs.iter().map(|c| (*c, n.name.clone())))
            .collect();
        // Longest prefix first.
        cidrs.sort_by_key(|c| std::cmp::Reverse(c.0.prefix_len()));
        Self {
            nodes,
            pods_by_ip,
            cidrs,
            generation,
        }
    }

    /// A node by name.
    pub fn node(&self, name: &str) -> Option<&Node> {
        self.nodes.get(name)
    }

    /// A pod by one of its IPs.
    pub fn pod(&self, ip: IpAddr) -> Option<&Arc<PodInfo>> {
        self.pods_by_ip.get(&ip)
    }

    /// The node whose pod CIDR holds `ip`, longest prefix first.
    pub fn node_for_cidr(&self, ip: IpAddr) -> Option<&str> {
        self.cidrs
            .iter()
            .find(|(c, _)| c.contains(&ip))
            .map(|(_, n)| n.as_str())
    }

    /// Number of nodes and pods.
    pub fn counts(&self) -> (usize, usize) {
        (self.nodes.len(), self.pods_by_ip.len())
    }
}

/// Where a connection's original destination goes.
#[derive(Debug, Clone)]
pub enum Route {
    /// A meshed pod on this node: deliver locally.
    Local(Arc<LocalPod>),
    /// A pod on another node: through the tunnel to that node.
    Remote {
        /// Peer node name.
        node: String,
        /// Peer tunnel address.
        addr: SocketAddr,
    },
    /// Anything else: straight out of the source pod.
    Passthrough,
}

/// The registry. Cheap to share: wrap in `Arc`.
#[derive(Debug)]
pub struct Registry {
    node_name: String,
    tunnel_port: u16,
    snapshot: RwLock<Arc<Snapshot>>,
    local: DashMap<String, Arc<LocalPod>>,
    local_by_ip: DashMap<IpAddr, Arc<LocalPod>>,
    services: Balancer,
}

impl Registry {
    /// An empty registry for `node_name`; peers' tunnels are on `tunnel_port`.
    pub fn new(node_name: &str, tunnel_port: u16) -> Self {
        Self {
            node_name: node_name.to_owned(),
            tunnel_port,
            snapshot: RwLock::new(Arc::new(Snapshot::default())),
            local: DashMap::new(),
            local_by_ip: DashMap::new(),
            services: Balancer::default(),
        }
    }

    /// This node's name.
    pub fn node_name(&self) -> &str {
        &self.node_name
    }

    /// The current snapshot.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        match self.snapshot.read() {
            Ok(g) => g.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Replaces the discovery snapshot.
    pub fn apply(&self, model: &ClusterModel) {
        let generation = self.snapshot().generation + 1;
        let next = Arc::new(Snapshot::from_model(model, generation));
        match self.snapshot.write() {
            Ok(mut g) => *g = next,
            Err(poisoned) => *poisoned.into_inner() = next,
        }
        self.services.apply(&model.services);
    }

    /// The services (`ClusterIP:port` → endpoints) and their balancer.
    pub fn services(&self) -> &Balancer {
        &self.services
    }

    /// Adds a local pod (replacing one with the same container id).
    pub fn insert_local(&self, pod: Arc<LocalPod>) {
        if let Some(old) = self.local.insert(pod.container_id.clone(), pod.clone()) {
            for ip in &old.ips {
                self.local_by_ip.remove(ip);
            }
        }
        for ip in &pod.ips {
            self.local_by_ip.insert(*ip, pod.clone());
        }
    }

    /// Removes a local pod by container id.
    pub fn remove_local(&self, container_id: &str) -> Option<Arc<LocalPod>> {
        let (_, pod) = self.local.remove(container_id)?;
        for ip in &pod.ips {
            self.local_by_ip
                .remove_if(ip, |_, v| v.container_id == pod.container_id);
        }
        Some(pod)
    }

    /// A local pod by container id.
    pub fn local(&self, container_id: &str) -> Option<Arc<LocalPod>> {
        self.local.get(container_id).map(|e| e.value().clone())
    }

    /// A local pod by IP.
    pub fn local_by_ip(&self, ip: IpAddr) -> Option<Arc<LocalPod>> {
        self.local_by_ip.get(&ip).map(|e| e.value().clone())
    }

    /// All local pods.
    pub fn locals(&self) -> Vec<Arc<LocalPod>> {
        self.local.iter().map(|e| e.value().clone()).collect()
    }

    /// Number of local pods.
    pub fn local_count(&self) -> usize {
        self.local.len()
    }

    /// Resolves an original destination address.
    pub fn resolve(&self, dst: IpAddr) -> Route {
        if let Some(pod) = self.local_by_ip(dst) {
            return Route::Local(pod);
        }
        let snap = self.snapshot();
        let node = match snap.pod(dst) {
            Some(p) => Some(p.node.as_str()),
            None => snap.node_for_cidr(dst),
        };
        match node.and_then(|n| snap.node(n)) {
            Some(n) if n.name != self.node_name => Route::Remote {
                node: n.name.clone(),
                addr: SocketAddr::new(n.address, self.tunnel_port),
            },
            _ => Route::Passthrough,
        }
    }
}

impl KnownNodes for Registry {
    fn is_known(&self, node: &str) -> bool {
        self.snapshot().node(node).is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model() -> ClusterModel {
        serde_yaml::from_str(
            r#"
nodes:
  - {name: n1, address: 10.77.0.1, pod_cidrs: [10.78.1.0/24]}
  - {name: n2, address: 10.77.0.2, pod_cidrs: [10.78.2.0/24]}
pods:
  - {namespace: default, name: web-1, node: n2, ips: [10.78.9.9], labels: {app: web}}
"#,
        )
        .expect("model")
    }

    #[test]
    fn resolves_by_pod_then_cidr_then_passthrough() {
        let r = Registry::new("n1", 15008);
        r.apply(&model());
        match r.resolve("10.78.9.9".parse().expect("ip")) {
            Route::Remote { node, addr } => {
                assert_eq!(node, "n2");
                assert_eq!(addr, "10.77.0.2:15008".parse().expect("addr"));
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            r.resolve("10.78.2.7".parse().expect("ip")),
            Route::Remote { .. }
        ));
        // Own CIDR but not registered: not meshed here, pass through.
        assert!(matches!(
            r.resolve("10.78.1.7".parse().expect("ip")),
            Route::Passthrough
        ));
        assert!(matches!(
            r.resolve("192.0.2.1".parse().expect("ip")),
            Route::Passthrough
        ));
        assert_eq!(
            r.snapshot()
                .pod("10.78.9.9".parse().expect("ip"))
                .expect("pod")
                .workload,
            "web"
        );
        assert!(r.is_known("n2"));
        assert!(!r.is_known("n3"));
    }
}
