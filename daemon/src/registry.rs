//! The live view of the cluster the data path reads.
//!
//! Owns three things: the **discovery snapshot** (nodes, pods, pod CIDRs,
//! namespace modes, the compiled authorization policies), replaced whole by a
//! discovery source; the **local pods** registered by the CNI plugin on this
//! node; and the table of **live admitted connections**, re-evaluated against
//! each new snapshot so that connections policy no longer allows are closed. Readers clone an `Arc` of the snapshot under a
//! lock held only for that pointer copy, so a reload never blocks the data
//! path; local pods live in a `DashMap`.
//!
//! [`Registry::resolve`] turns an original destination into a [`Route`].

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, RwLock};

use dashmap::DashMap;
use ipnet::IpNet;
use tracing::warn;

use crate::balancer::Balancer;
use crate::discovery::model::{ClusterModel, Mode, Node, Pod};
use crate::identity::KnownNodes;
use crate::metrics as m;
use crate::pods::LocalPod;
use crate::policy::{self, Client, Decision, LiveConns, PolicyIndex, Target};

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
    /// Labels (policy selectors).
    pub labels: BTreeMap<String, String>,
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
            labels: p.labels.clone(),
        }
    }
}

/// One immutable discovery snapshot.
#[derive(Debug, Default)]
pub struct Snapshot {
    nodes: HashMap<String, Node>,
    pods_by_ip: HashMap<IpAddr, Arc<PodInfo>>,
    cidrs: Vec<(IpNet, String)>,
    modes: HashMap<String, Mode>,
    policies: PolicyIndex,
    /// `(namespace, name)` of pods annotated `nodemesh.io/inject: disabled`.
    opted_out: HashSet<(String, String)>,
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
            modes: model
                .namespaces
                .iter()
                .map(|n| (n.name.clone(), n.mode))
                .collect(),
            policies: PolicyIndex::build(&model.policies),
            opted_out: model
                .pods
                .iter()
                .filter(|p| p.injection_disabled())
                .map(|p| (p.namespace.clone(), p.name.clone()))
                .collect(),
            generation,
        }
    }

    /// Whether discovery says pod `namespace/name` opted out of the mesh
    /// (annotation `nodemesh.io/inject: disabled`).
    pub fn injection_disabled(&self, namespace: &str, name: &str) -> bool {
        // A borrowed-key lookup without allocating: the set is small and the
        // check runs once per pod start.
        self.opted_out
            .iter()
            .any(|(ns, n)| ns == namespace && n == name)
    }

    /// The mode of namespace `ns` (`permissive` unless discovery says otherwise).
    pub fn mode(&self, ns: &str) -> Mode {
        self.modes.get(ns).copied().unwrap_or_default()
    }

    /// The compiled authorization policies.
    pub fn policies(&self) -> &PolicyIndex {
        &self.policies
    }

    /// Authorizes a connection from `client` to the pod at `dst`: its
    /// namespace and labels come from discovery; a pod discovery does not
    /// know yet is taken to be in `fallback_ns` (as registered by the CNI)
    /// with no labels.
    pub fn authorize(&self, dst: SocketAddr, fallback_ns: &str, client: &Client<'_>) -> Decision {
        static NO_LABELS: BTreeMap<String, String> = BTreeMap::new();
        let (namespace, labels) = match self.pod(dst.ip()) {
            Some(p) => (p.namespace.as_str(), &p.labels),
            None => (fallback_ns, &NO_LABELS),
        };
        self.policies.evaluate(
            &Target {
                namespace,
                labels,
                port: dst.port(),
            },
            client,
        )
    }

    /// The namespace of the pod at `ip` per discovery, else `fallback_ns`.
    pub fn namespace_of<'a>(&'a self, ip: IpAddr, fallback_ns: &'a str) -> &'a str {
        self.pod(ip).map_or(fallback_ns, |p| p.namespace.as_str())
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
    live: LiveConns,
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
            live: LiveConns::default(),
            services: Balancer::default(),
        }
    }

    /// The connections admitted into local pods and still open.
    pub fn live(&self) -> &LiveConns {
        &self.live
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

    /// Replaces the discovery snapshot, then closes the live connections the
    /// new one refuses (returns how many).
    pub fn apply(&self, model: &ClusterModel) -> usize {
        let generation = self.snapshot().generation + 1;
        let next = Arc::new(Snapshot::from_model(model, generation));
        match self.snapshot.write() {
            Ok(mut g) => *g = next.clone(),
            Err(poisoned) => *poisoned.into_inner() = next.clone(),
        }
        self.services.apply(&model.services, &model.pods);
        self.revoke(&next)
    }

    /// Re-evaluates every live connection against `snap` and cancels those it
    /// refuses: plaintext into a namespace now `strict`, or policy now denying.
    fn revoke(&self, snap: &Snapshot) -> usize {
        let revoked = self.live.revoke(|c| {
            let ns = snap.namespace_of(c.dst.ip(), &c.dst_namespace);
            if c.is_plaintext() && snap.mode(ns) == Mode::Strict {
                return Some((policy::REASON_PLAINTEXT_REFUSED, None));
            }
            match snap.authorize(c.dst, &c.dst_namespace, &c.client()) {
                Decision::Allow => None,
                Decision::Deny { reason, policy } => {
                    Some((policy::REASON_POLICY_REVOKED, Some((reason, policy))))
                }
            }
        });
        for (c, (reason, why)) in &revoked {
            let src_identity = c
                .identity
                .as_ref()
                .map_or("none (plaintext)", |p| p.principal.as_str());
            warn!(
                reason,
                peer.node = c.peer_node.as_deref().unwrap_or("none (local or plaintext)"),
                server.addr = %c.dst,
                client.addr = %c.src_ip,
                src.identity = src_identity,
                policy = why.as_ref().map_or("", |(_, p)| &**p),
                decision = why.as_ref().map_or("", |(d, _)| d.as_str()),
                "open connection no longer allowed; closing it"
            );
            metrics::counter!(m::DENIED, "reporter" => "destination", "reason" => *reason)
                .increment(1);
        }
        revoked.len()
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

    #[test]
    fn a_policy_change_closes_only_the_connections_it_now_refuses() {
        use crate::policy::live::{LiveConn, OwnedPeer};
        use tokio_util::sync::CancellationToken;

        let r = Registry::new("n2", 15008);
        r.apply(&model());
        let conn = |src_ns: &str, plaintext: bool| LiveConn {
            dst: "10.78.9.9:80".parse().expect("addr"),
            dst_namespace: "default".into(),
            identity: (!plaintext).then(|| OwnedPeer {
                principal: format!("spiffe://cluster.local/ns/{src_ns}/sa/default"),
                namespace: src_ns.into(),
                service_account: "default".into(),
            }),
            src_ip: "10.78.1.5".parse().expect("ip"),
            peer_node: None,
            cancel: CancellationToken::new(),
        };
        let from_a = r.live().register(conn("a", false));
        let from_b = r.live().register(conn("b", false));
        let plain = r.live().register(conn("", true));

        let mut m = model();
        m.policies = serde_yaml::from_str(
            "[{name: no-a, namespace: default, selector: {matchLabels: {app: web}}, action: DENY, rules: [{from: [{namespaces: [a]}]}]}]",
        )
        .expect("policy");
        m.validate().expect("valid");
        assert_eq!(r.apply(&m), 1);
        assert!(from_a.token().is_cancelled());
        assert!(!from_b.token().is_cancelled() && !plain.token().is_cancelled());

        m.namespaces = serde_yaml::from_str("[{name: default, mode: strict}]").expect("ns");
        assert_eq!(r.apply(&m), 1);
        assert!(plain.token().is_cancelled());
        assert!(!from_b.token().is_cancelled());
        drop((from_a, from_b, plain));
        assert!(r.live().is_empty());
    }

    #[test]
    fn opted_out_pods_are_known_before_they_have_an_address() {
        let model: ClusterModel = serde_yaml::from_str(
            r#"
nodes: [{name: n1, address: 10.77.0.1}]
pods:
  - {namespace: shop, name: legacy, node: n1, annotations: {nodemesh.io/inject: disabled}}
  - {namespace: shop, name: web, node: n1, annotations: {nodemesh.io/inject: enabled}}
"#,
        )
        .expect("model");
        model
            .validate()
            .expect("pending pods without ips are valid");
        let snap = Snapshot::from_model(&model, 1);
        assert!(snap.injection_disabled("shop", "legacy"));
        assert!(!snap.injection_disabled("shop", "web"));
        assert!(!snap.injection_disabled("other", "legacy"));
    }
}
