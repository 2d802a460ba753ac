//! The `kubernetes` discovery source: the cluster model from the API server.
//!
//! Owns the watches (kube-rs `watcher`, with its default exponential backoff
//! on errors) of Nodes, Pods, Services, EndpointSlices
//! (`discovery.k8s.io/v1`), Namespaces (their mesh mode, label
//! [`MODE_LABEL`]) and `authorizationpolicies.nodemesh.io`, the small
//! records each object is converted into **as soon as it arrives** (only the
//! fields discovery uses are kept, so memory stays bounded on large
//! clusters), and building a [`ClusterModel`] from them for the registry.
//!
//! Consistency: each kind has a store that follows the watcher's protocol. A
//! (re)list — at start, and after a watch fell out of the API server's window
//! (`410 Gone`) — is buffered (`Init` … `InitApply` … `InitDone`) and swapped
//! in whole when it completes, so the registry never sees a half-listed kind
//! and is not emptied while a relist runs. A watch that merely dropped resumes
//! from its last resourceVersion. The registry gets its first model once every
//! kind has completed its first list; that marks discovery synced (readiness).
//! Later updates are coalesced: everything already received is applied, then
//! one model is built.
//!
//! Policies are kept as their `spec` JSON ([`PolicyRecord`]) and converted
//! into the model's `AuthorizationPolicy` when a model is built; a policy that
//! does not convert or validate is left out with a warning, never the model.
//! Pods are kept from the moment they are scheduled, before they have an
//! address, so a CNI ADD can learn that a pod opted out
//! (`nodemesh.io/inject: disabled`, the only annotation kept).
//!
//! A Service's traffic split (canary) comes from its annotations
//! [`SPLIT_LABEL_ANNOTATION`] and [`SPLIT_WEIGHTS_ANNOTATION`], parsed when
//! the Service arrives. Malformed ones never refuse anything: the service is
//! kept without a split, with a warning naming the service, the annotation
//! and the problem, and `nodemesh_discovery_invalid_total{kind="traffic_split"}`.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;

use futures::stream::{BoxStream, SelectAll};
use futures::{FutureExt, StreamExt};
use ipnet::IpNet;
use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::discovery::v1 as disc;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::{Api, ApiResource, DynamicObject};
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use kube::{Client, ResourceExt};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::model::{
    is_dns_label, AuthorizationPolicy, ClusterModel, Endpoint, Mode, Namespace, Node, Pod,
    Protocol, Service, ServicePort, TrafficSplit, INJECT_ANNOTATION,
};
use crate::admin::Readiness;
use crate::metrics as m;
use crate::registry::Registry;

/// Most watch events folded into one model rebuild, so that a flood of
/// updates still reaches the registry regularly.
pub const MAX_BATCH: usize = 1000;

/// Label of an EndpointSlice naming its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// Label of a Namespace setting its mesh mode: `strict` or `permissive`
/// (absent: permissive; any other value: permissive, with a warning).
pub const MODE_LABEL: &str = "nodemesh.io/mode";

/// `kind` label of `nodemesh_discovery_invalid_total` for split annotations.
pub const INVALID_TRAFFIC_SPLIT: &str = "traffic_split";

pub use super::split_annotations::{
    parse_split, SplitAnnotationError, SPLIT_LABEL_ANNOTATION, SPLIT_WEIGHTS_ANNOTATION,
};

/// The split of Service `namespace/name` from its annotations; a malformed
/// one is logged at warn, counted, and gives no split.
fn split_of(
    namespace: &str,
    name: &str,
    annotations: &std::collections::BTreeMap<String, String>,
) -> Option<TrafficSplit> {
    let label = annotations.get(SPLIT_LABEL_ANNOTATION).map(String::as_str);
    let weights = annotations
        .get(SPLIT_WEIGHTS_ANNOTATION)
        .map(String::as_str);
    match parse_split(label, weights) {
        Ok(split) => split,
        Err(e) => {
            let annotation = e.annotation();
            let value = annotations.get(annotation).map_or("", String::as_str);
            warn!(service = %format_args!("{namespace}/{name}"), annotation, value = %value, problem = %e,
                "traffic split annotation ignored; the service is balanced over all its ready endpoints");
            metrics::counter!(m::DISCOVERY_INVALID, "kind" => INVALID_TRAFFIC_SPLIT).increment(1);
            None
        }
    }
}

/// The policy custom resource.
pub fn policy_resource() -> ApiResource {
    ApiResource {
        group: "nodemesh.io".into(),
        version: "v1alpha1".into(),
        api_version: "nodemesh.io/v1alpha1".into(),
        kind: "AuthorizationPolicy".into(),
        plural: "authorizationpolicies".into(),
    }
}

/// A watched kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// `v1/Node`.
    Node,
    /// `v1/Pod`.
    Pod,
    /// `v1/Service`.
    Service,
    /// `discovery.k8s.io/v1/EndpointSlice`.
    EndpointSlice,
    /// `v1/Namespace`.
    Namespace,
    /// `nodemesh.io/v1alpha1/AuthorizationPolicy`.
    Policy,
}

impl Kind {
    /// Every watched kind.
    pub const ALL: [Kind; 6] = [
        Kind::Node,
        Kind::Pod,
        Kind::Service,
        Kind::EndpointSlice,
        Kind::Namespace,
        Kind::Policy,
    ];

    /// Name for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Node => "nodes",
            Kind::Pod => "pods",
            Kind::Service => "services",
            Kind::EndpointSlice => "endpointslices",
            Kind::Namespace => "namespaces",
            Kind::Policy => "authorizationpolicies",
        }
    }
}

// ---------------------------------------------------------------------------
// Records: the fields kept of each object.
// ---------------------------------------------------------------------------

/// What is kept of a Node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeRecord {
    /// Name.
    pub name: String,
    /// Its `InternalIP`s, then its `ExternalIP`s, each in the order the
    /// kubelet listed them (primary family first): where its daemon's tunnel
    /// can be; [`NodeRecord::tunnel_address`] picks one.
    pub addresses: Vec<IpAddr>,
    /// `spec.podCIDRs` (or `spec.podCIDR`).
    pub pod_cidrs: Vec<IpNet>,
}

impl NodeRecord {
    /// `None` for a node without a usable address (not routable yet).
    pub fn from_object(n: &core::Node) -> Option<Self> {
        let listed = n.status.as_ref()?.addresses.as_ref()?;
        let of_type = |kind: &'static str| {
            listed
                .iter()
                .filter(move |a| a.type_ == kind)
                .filter_map(|a| a.address.parse::<IpAddr>().ok())
        };
        let addresses: Vec<IpAddr> = of_type("InternalIP").chain(of_type("ExternalIP")).collect();
        if addresses.is_empty() {
            return None;
        }
        let spec = n.spec.as_ref();
        let mut cidrs: Vec<&String> = spec
            .and_then(|s| s.pod_cidrs.as_ref())
            .map(|v| v.iter().collect())
            .unwrap_or_default();
        if cidrs.is_empty() {
            cidrs.extend(spec.and_then(|s| s.pod_cidr.as_ref()));
        }
        Some(Self {
            name: n.name_any(),
            addresses,
            pod_cidrs: cidrs.iter().filter_map(|c| c.parse().ok()).collect(),
        })
    }

    /// Where this node's daemon is dialled from a daemon bound on `local`:
    /// its first address of `local`'s family (a tunnel endpoint bound to an
    /// IPv4 address cannot reach an IPv6 one, and the reverse), else its
    /// first address. With no `local` (unknown), its first address. On a
    /// dual-stack cluster this keeps every tunnel in the family of the
    /// nodes' `status.hostIP`, whatever order a node lists its addresses in.
    pub fn tunnel_address(&self, local: Option<IpAddr>) -> Option<IpAddr> {
        local
            .and_then(|l| {
                self.addresses
                    .iter()
                    .find(|a| a.is_ipv4() == l.is_ipv4())
                    .copied()
            })
            .or_else(|| self.addresses.first().copied())
    }
}

/// What is kept of a Pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodRecord {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// Service account.
    pub service_account: String,
    /// Node.
    pub node: String,
    /// `status.podIPs`.
    pub ips: Vec<IpAddr>,
    /// Labels, sorted by key. A vector, not a map: a `BTreeMap` node takes
    /// ~0.5 KiB even for the two or three labels a pod typically has.
    pub labels: Vec<(String, String)>,
    /// Annotated `nodemesh.io/inject: disabled` (the only annotation kept).
    pub inject_disabled: bool,
}

impl PodRecord {
    /// `None` for pods that have no address of their own: not scheduled or
    /// not started yet, finished (`Succeeded`/`Failed`), or `hostNetwork`.
    pub fn from_object(p: &core::Pod) -> Option<Self> {
        let spec = p.spec.as_ref()?;
        if spec.host_network == Some(true) {
            return None;
        }
        let status = p.status.as_ref()?;
        if matches!(status.phase.as_deref(), Some("Succeeded" | "Failed")) {
            return None;
        }
        let mut ips: Vec<IpAddr> = status
            .pod_ips
            .iter()
            .flatten()
            .filter_map(|i| i.ip.parse().ok())
            .collect();
        if ips.is_empty() {
            ips.extend(
                status
                    .pod_ip
                    .as_ref()
                    .and_then(|i| i.parse::<IpAddr>().ok()),
            );
        }
        // A pod without an address yet is kept (with no IPs): the CNI ADD of a
        // pending pod asks whether it opted out of the mesh.
        Some(Self {
            namespace: p.namespace().unwrap_or_default(),
            name: p.name_any(),
            service_account: spec
                .service_account_name
                .clone()
                .unwrap_or_else(|| "default".to_owned()),
            node: spec.node_name.clone()?,
            ips,
            labels: p
                .labels()
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            inject_disabled: p.annotations().get(INJECT_ANNOTATION).map(String::as_str)
                == Some("disabled"),
        })
    }
}

/// A service port's target: a number, or a container port name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetPort {
    /// A port number.
    Number(u16),
    /// A named container port (resolved through the EndpointSlices).
    Name(String),
}

/// What is kept of a Service port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServicePortRecord {
    /// Name.
    pub name: Option<String>,
    /// Port on the cluster IPs.
    pub port: u16,
    /// Target.
    pub target: TargetPort,
    /// Protocol.
    pub protocol: Protocol,
}

/// What is kept of a Service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceRecord {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// Cluster IPs (empty when headless).
    pub cluster_ips: Vec<IpAddr>,
    /// Ports.
    pub ports: Vec<ServicePortRecord>,
    /// Traffic split from the annotations, if set and valid.
    pub split: Option<TrafficSplit>,
}

fn protocol(p: Option<&str>) -> Option<Protocol> {
    match p.unwrap_or("TCP") {
        "TCP" => Some(Protocol::Tcp),
        "UDP" => Some(Protocol::Udp),
        "SCTP" => Some(Protocol::Sctp),
        _ => None,
    }
}

impl ServiceRecord {
    /// `None` for `ExternalName` services (nothing to balance).
    pub fn from_object(s: &core::Service) -> Option<Self> {
        let spec = s.spec.as_ref()?;
        if spec.type_.as_deref() == Some("ExternalName") {
            return None;
        }
        let mut ips: Vec<&String> = spec
            .cluster_ips
            .as_ref()
            .map(|v| v.iter().collect())
            .unwrap_or_default();
        if ips.is_empty() {
            ips.extend(spec.cluster_ip.as_ref());
        }
        let ports = spec
            .ports
            .iter()
            .flatten()
            .filter_map(|p| {
                let port = u16::try_from(p.port).ok().filter(|p| *p != 0)?;
                let target = match &p.target_port {
                    None => TargetPort::Number(port),
                    Some(IntOrString::Int(n)) => {
                        TargetPort::Number(u16::try_from(*n).ok().filter(|p| *p != 0)?)
                    }
                    Some(IntOrString::String(name)) => TargetPort::Name(name.clone()),
                };
                Some(ServicePortRecord {
                    name: p.name.clone(),
                    port,
                    target,
                    protocol: protocol(p.protocol.as_deref())?,
                })
            })
            .collect();
        let (namespace, name) = (s.namespace().unwrap_or_default(), s.name_any());
        let split = split_of(&namespace, &name, s.annotations());
        Some(Self {
            namespace,
            name,
            // "None" (headless) and "" do not parse: dropped.
            cluster_ips: ips.iter().filter_map(|i| i.parse().ok()).collect(),
            ports,
            split,
        })
    }
}

/// What is kept of one endpoint of an EndpointSlice.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointRecord {
    /// Addresses.
    pub ips: Vec<IpAddr>,
    /// `nodeName`.
    pub node: Option<String>,
    /// `conditions.ready` (absent means ready).
    pub ready: bool,
    /// `targetRef.name` when it is a Pod.
    pub pod: Option<String>,
}

/// What is kept of an EndpointSlice.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SliceRecord {
    /// Namespace.
    pub namespace: String,
    /// The Service it belongs to (label `kubernetes.io/service-name`).
    pub service: String,
    /// Ports: service port name → endpoint port number, with protocol.
    pub ports: Vec<(Option<String>, u16, Protocol)>,
    /// Endpoints.
    pub endpoints: Vec<EndpointRecord>,
}

impl SliceRecord {
    /// `None` for slices of no service, or of FQDN addresses.
    pub fn from_object(s: &disc::EndpointSlice) -> Option<Self> {
        if s.address_type == "FQDN" {
            return None;
        }
        let service = s.labels().get(SERVICE_NAME_LABEL)?.clone();
        let ports = s
            .ports
            .iter()
            .flatten()
            .filter_map(|p| {
                let port = u16::try_from(p.port?).ok().filter(|p| *p != 0)?;
                Some((p.name.clone(), port, protocol(p.protocol.as_deref())?))
            })
            .collect();
        let endpoints = s
            .endpoints
            .iter()
            .map(|e| EndpointRecord {
                ips: e.addresses.iter().filter_map(|a| a.parse().ok()).collect(),
                node: e.node_name.clone(),
                ready: e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true),
                pod: e
                    .target_ref
                    .as_ref()
                    .filter(|r| r.kind.as_deref() == Some("Pod"))
                    .and_then(|r| r.name.clone()),
            })
            .collect();
        Some(Self {
            namespace: s.namespace().unwrap_or_default(),
            service,
            ports,
            endpoints,
        })
    }
}

/// What is kept of a Namespace: its name and mesh mode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamespaceRecord {
    /// Name.
    pub name: String,
    /// From the label [`MODE_LABEL`].
    pub mode: Mode,
}

impl NamespaceRecord {
    /// Always `Some`: a namespace without the label, or with a value other
    /// than `strict` / `permissive` (logged at warn), is permissive. A bad
    /// label never refuses the model.
    pub fn from_object(n: &core::Namespace) -> Option<Self> {
        let name = n.name_any();
        let mode = match n.labels().get(MODE_LABEL).map(String::as_str) {
            None | Some("permissive") => Mode::Permissive,
            Some("strict") => Mode::Strict,
            Some(other) => {
                warn!(namespace = %name, label = MODE_LABEL, value = %other,
                    "namespace mode label is neither strict nor permissive; the namespace is permissive");
                Mode::Permissive
            }
        };
        Some(Self { name, mode })
    }
}

/// What is kept of an AuthorizationPolicy: its `spec`, unconverted.
#[derive(Debug, Clone, PartialEq)]
pub struct PolicyRecord {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// `spec` as sent by the API server (schema: the CRD).
    pub spec: serde_json::Value,
}

impl PolicyRecord {
    /// The policy in the model's terms, or `None` (logged at warn) when its
    /// spec does not convert or validate: one bad object must not refuse the
    /// whole model. The CRD's schema rejects most such objects at admission.
    pub fn to_model(&self) -> Option<AuthorizationPolicy> {
        let mut obj = match &self.spec {
            serde_json::Value::Object(m) => m.clone(),
            _ => serde_json::Map::new(),
        };
        obj.insert("name".into(), self.name.clone().into());
        obj.insert("namespace".into(), self.namespace.clone().into());
        let policy: AuthorizationPolicy = match serde_json::from_value(obj.into()) {
            Ok(p) => p,
            Err(e) => {
                warn!(policy = %format_args!("{}/{}", self.namespace, self.name), error = %e,
                    "AuthorizationPolicy ignored: its spec does not match the schema");
                return None;
            }
        };
        let alone = ClusterModel {
            policies: vec![policy],
            ..ClusterModel::default()
        };
        if let Err(e) = alone.validate() {
            warn!(policy = %format_args!("{}/{}", self.namespace, self.name), error = %e,
                "AuthorizationPolicy ignored: invalid");
            return None;
        }
        alone.policies.into_iter().next()
    }

    /// Keeps namespace, name and `spec`.
    pub fn from_object(p: &DynamicObject) -> Option<Self> {
        Some(Self {
            namespace: p.namespace().unwrap_or_default(),
            name: p.name_any(),
            spec: p.data.get("spec").cloned().unwrap_or_default(),
        })
    }
}

// ---------------------------------------------------------------------------
// Stores and state.
// ---------------------------------------------------------------------------

/// The records of one kind, following the watcher's list/watch protocol.
#[derive(Debug)]
pub struct Store<T> {
    items: HashMap<String, T>,
    relist: Option<HashMap<String, T>>,
    synced: bool,
}

impl<T> Default for Store<T> {
    fn default() -> Self {
        Self {
            items: HashMap::new(),
            relist: None,
            synced: false,
        }
    }
}

/// A watcher event reduced to a key and the record (`None`: the object is
/// not usable, treated as absent).
pub type Keyed<T> = (String, Option<T>);

impl<T> Store<T> {
    /// Applies one event; returns whether the visible items changed.
    pub fn apply(&mut self, event: Event<Keyed<T>>) -> bool {
        match event {
            Event::Apply((key, Some(rec))) => {
                self.items.insert(key, rec);
                true
            }
            Event::Apply((key, None)) | Event::Delete((key, _)) => {
                self.items.remove(&key).is_some()
            }
            Event::Init => {
                self.relist = Some(HashMap::new());
                false
            }
            Event::InitApply((key, rec)) => {
                if let Some(rec) = rec {
                    self.relist
                        .get_or_insert_with(HashMap::new)
                        .insert(key, rec);
                }
                false
            }
            Event::InitDone => {
                self.items = self.relist.take().unwrap_or_default();
                self.synced = true;
                true
            }
        }
    }

    /// Whether the first list completed.
    pub fn synced(&self) -> bool {
        self.synced
    }

    /// The records, by `namespace/name` (or name, for cluster-scoped kinds).
    pub fn items(&self) -> &HashMap<String, T> {
        &self.items
    }

    /// Marks the kind listed and empty (its resource does not exist).
    fn mark_absent(&mut self) -> bool {
        let changed = !self.items.is_empty() || !self.synced;
        self.items.clear();
        self.relist = None;
        self.synced = true;
        changed
    }
}

/// One update from a watch stream, already reduced to records.
#[derive(Debug)]
pub enum Update {
    /// Nodes.
    Node(Event<Keyed<NodeRecord>>),
    /// Pods.
    Pod(Event<Keyed<PodRecord>>),
    /// Services.
    Service(Event<Keyed<ServiceRecord>>),
    /// EndpointSlices.
    EndpointSlice(Event<Keyed<SliceRecord>>),
    /// Namespaces.
    Namespace(Event<Keyed<NamespaceRecord>>),
    /// Policies.
    Policy(Event<Keyed<PolicyRecord>>),
}

/// Everything the source knows: one store per kind.
#[derive(Debug, Default)]
pub struct KubeState {
    /// Nodes by name.
    pub nodes: Store<NodeRecord>,
    /// Pods by `namespace/name`.
    pub pods: Store<PodRecord>,
    /// Services by `namespace/name`.
    pub services: Store<ServiceRecord>,
    /// EndpointSlices by `namespace/name`.
    pub slices: Store<SliceRecord>,
    /// Namespaces by name.
    pub namespaces: Store<NamespaceRecord>,
    /// Policies by `namespace/name`.
    pub policies: Store<PolicyRecord>,
    /// This daemon's node address (`node_address`), whose family the
    /// tunnels use: see [`NodeRecord::tunnel_address`].
    pub local_address: Option<IpAddr>,
}

impl KubeState {
    /// Applies an update; returns whether anything visible changed.
    pub fn apply(&mut self, update: Update) -> bool {
        match update {
            Update::Node(e) => self.nodes.apply(e),
            Update::Pod(e) => self.pods.apply(e),
            Update::Service(e) => self.services.apply(e),
            Update::EndpointSlice(e) => self.slices.apply(e),
            Update::Namespace(e) => self.namespaces.apply(e),
            Update::Policy(e) => self.policies.apply(e),
        }
    }

    /// Whether every kind completed its first list.
    pub fn synced(&self) -> bool {
        self.nodes.synced()
            && self.pods.synced()
            && self.services.synced()
            && self.slices.synced()
            && self.namespaces.synced()
            && self.policies.synced()
    }

    /// Kinds whose first list has not completed.
    pub fn unsynced(&self) -> Vec<&'static str> {
        let s = [
            (Kind::Node, self.nodes.synced()),
            (Kind::Pod, self.pods.synced()),
            (Kind::Service, self.services.synced()),
            (Kind::EndpointSlice, self.slices.synced()),
            (Kind::Namespace, self.namespaces.synced()),
            (Kind::Policy, self.policies.synced()),
        ];
        s.iter()
            .filter(|(_, ok)| !ok)
            .map(|(k, _)| k.as_str())
            .collect()
    }

    /// The policies, unconverted.
    pub fn policies(&self) -> impl Iterator<Item = &PolicyRecord> {
        self.policies.items().values()
    }

    /// Builds a model that validates: entries that would contradict others
    /// (a pod on an unknown node, an IP claimed twice, ...) are left out and
    /// logged at debug, since the API server's kinds are not mutually
    /// consistent at every instant. Output is sorted, so it is deterministic.
    pub fn model(&self) -> ClusterModel {
        let mut nodes: Vec<Node> = self
            .nodes
            .items()
            .values()
            .filter_map(|n| {
                Some(Node {
                    name: n.name.clone(),
                    address: n.tunnel_address(self.local_address)?,
                    pod_cidrs: n.pod_cidrs.clone(),
                })
            })
            .collect();
        nodes.sort_by(|a, b| a.name.cmp(&b.name));
        let node_names: HashSet<&str> = nodes.iter().map(|n| n.name.as_str()).collect();

        let mut pod_recs: Vec<&PodRecord> = self.pods.items().values().collect();
        pod_recs.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        let mut pod_ips = HashSet::new();
        let mut pods = Vec::with_capacity(pod_recs.len());
        for p in pod_recs {
            if !node_names.contains(p.node.as_str()) {
                debug!(pod = %format_args!("{}/{}", p.namespace, p.name), node = %p.node, "pod on an unknown node left out");
                continue;
            }
            if p.ips.iter().any(|ip| pod_ips.contains(ip)) {
                debug!(pod = %format_args!("{}/{}", p.namespace, p.name), "pod IP claimed twice; later pod left out");
                continue;
            }
            pod_ips.extend(p.ips.iter().copied());
            pods.push(Pod {
                namespace: p.namespace.clone(),
                name: p.name.clone(),
                service_account: p.service_account.clone(),
                node: p.node.clone(),
                ips: p.ips.clone(),
                labels: p.labels.iter().cloned().collect(),
                annotations: if p.inject_disabled {
                    [(INJECT_ANNOTATION.to_owned(), "disabled".to_owned())].into()
                } else {
                    Default::default()
                },
            });
        }

        let mut slices_of: HashMap<(&str, &str), Vec<&SliceRecord>> = HashMap::new();
        let mut slice_keys: Vec<(&String, &SliceRecord)> = self.slices.items().iter().collect();
        slice_keys.sort_by(|a, b| a.0.cmp(b.0));
        for (_, s) in slice_keys {
            slices_of
                .entry((s.namespace.as_str(), s.service.as_str()))
                .or_default()
                .push(s);
        }
        let mut svc_recs: Vec<&ServiceRecord> = self.services.items().values().collect();
        svc_recs.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        let mut cluster_ips = HashSet::new();
        let mut services = Vec::new();
        for s in svc_recs {
            if s.cluster_ips
                .iter()
                .any(|ip| cluster_ips.contains(ip) || pod_ips.contains(ip))
            {
                debug!(service = %format_args!("{}/{}", s.namespace, s.name), "cluster IP claimed twice; left out");
                continue;
            }
            let slices = slices_of
                .get(&(s.namespace.as_str(), s.name.as_str()))
                .map(Vec::as_slice)
                .unwrap_or_default();
            let mut ports = Vec::new();
            let mut seen_ports = HashSet::new();
            for p in &s.ports {
                // EndpointSlice ports carry the service port's name and the
                // resolved target port number.
                let resolved = slices.iter().find_map(|sl| {
                    sl.ports
                        .iter()
                        .find(|(n, _, proto)| *n == p.name && *proto == p.protocol)
                        .map(|(_, port, _)| *port)
                });
                let target_port = match (&p.target, resolved) {
                    (_, Some(n)) => n,
                    (TargetPort::Number(n), None) => *n,
                    (TargetPort::Name(_), None) => continue,
                };
                if seen_ports.insert((p.port, p.protocol)) {
                    ports.push(ServicePort {
                        name: p.name.clone(),
                        port: p.port,
                        target_port,
                        protocol: p.protocol,
                    });
                }
            }
            if ports.is_empty() {
                continue;
            }
            let mut endpoints = Vec::new();
            let mut seen = HashSet::new();
            for sl in slices {
                for e in &sl.endpoints {
                    for ip in &e.ips {
                        if seen.insert(*ip) {
                            endpoints.push(Endpoint {
                                ip: *ip,
                                node: e.node.clone().filter(|n| node_names.contains(n.as_str())),
                                ready: e.ready,
                                target_ref: e.pod.clone(),
                            });
                        }
                    }
                }
            }
            cluster_ips.extend(s.cluster_ips.iter().copied());
            services.push(Service {
                namespace: s.namespace.clone(),
                name: s.name.clone(),
                cluster_ips: s.cluster_ips.clone(),
                ports,
                endpoints,
                split: s.split.clone(),
            });
        }
        let mut policies: Vec<AuthorizationPolicy> = self
            .policies
            .items()
            .values()
            .filter_map(PolicyRecord::to_model)
            .collect();
        policies.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        // Only strict namespaces are listed: permissive is the default. The
        // API server only admits DNS-label names; anything else is left out
        // rather than refusing the model.
        let mut namespaces: Vec<Namespace> = self
            .namespaces
            .items()
            .values()
            .filter(|n| n.mode == Mode::Strict)
            .filter(|n| {
                let ok = is_dns_label(&n.name);
                if !ok {
                    debug!(namespace = %n.name, "namespace with an invalid name left out");
                }
                ok
            })
            .map(|n| Namespace {
                name: n.name.clone(),
                mode: n.mode,
            })
            .collect();
        namespaces.sort_by(|a, b| a.name.cmp(&b.name));
        ClusterModel {
            nodes,
            pods,
            namespaces,
            services,
            policies,
        }
    }
}

fn key_of<K: ResourceExt>(o: &K) -> String {
    match o.namespace() {
        Some(ns) => format!("{ns}/{}", o.name_any()),
        None => o.name_any(),
    }
}

/// Reduces a watcher event to records, converting each object at once.
fn reduce<K: ResourceExt, T>(event: Event<K>, f: impl Fn(&K) -> Option<T>) -> Event<Keyed<T>> {
    let conv = |o: K| (key_of(&o), f(&o));
    match event {
        Event::Apply(o) => Event::Apply(conv(o)),
        Event::Delete(o) => Event::Delete((key_of(&o), None)),
        Event::Init => Event::Init,
        Event::InitApply(o) => Event::InitApply(conv(o)),
        Event::InitDone => Event::InitDone,
    }
}

type KindStream = BoxStream<'static, (Kind, Result<Update, watcher::Error>)>;

fn watch_kind<K, T>(
    kind: Kind,
    api: Api<K>,
    convert: fn(&K) -> Option<T>,
    wrap: fn(Event<Keyed<T>>) -> Update,
) -> KindStream
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
    K::DynamicType: Default + Clone + Eq + std::hash::Hash,
    T: Send + 'static,
{
    watcher::watcher(api, watcher::Config::default())
        .default_backoff()
        .map(move |r| (kind, r.map(|e| wrap(reduce(e, convert)))))
        .boxed()
}

/// The merged watch streams of every kind.
pub fn streams(client: &Client) -> SelectAll<KindStream> {
    let policies: Api<DynamicObject> = Api::all_with(client.clone(), &policy_resource());
    let policy_stream = watcher::watcher(policies, watcher::Config::default())
        .default_backoff()
        .map(|r| {
            (
                Kind::Policy,
                r.map(|e| Update::Policy(reduce(e, PolicyRecord::from_object))),
            )
        })
        .boxed();
    futures::stream::select_all([
        watch_kind(
            Kind::Node,
            Api::<core::Node>::all(client.clone()),
            NodeRecord::from_object,
            Update::Node,
        ),
        watch_kind(
            Kind::Pod,
            Api::<core::Pod>::all(client.clone()),
            PodRecord::from_object,
            Update::Pod,
        ),
        watch_kind(
            Kind::Service,
            Api::<core::Service>::all(client.clone()),
            ServiceRecord::from_object,
            Update::Service,
        ),
        watch_kind(
            Kind::EndpointSlice,
            Api::<disc::EndpointSlice>::all(client.clone()),
            SliceRecord::from_object,
            Update::EndpointSlice,
        ),
        watch_kind(
            Kind::Namespace,
            Api::<core::Namespace>::all(client.clone()),
            NamespaceRecord::from_object,
            Update::Namespace,
        ),
        policy_stream,
    ])
}

fn is_not_found(e: &watcher::Error) -> bool {
    match e {
        watcher::Error::InitialListFailed(kube::Error::Api(r)) => r.code == 404,
        _ => false,
    }
}

/// Builds a client from the environment: the kubeconfig if one is set
/// (`KUBECONFIG`, `~/.kube/config`), else the in-cluster service account.
pub async fn infer_client() -> Result<Client, KubeError> {
    let config = kube::Config::infer()
        .await
        .map_err(|e| KubeError::NoConfig(e.to_string()))?;
    Client::try_from(config).map_err(|e| KubeError::Client(e.to_string()))
}

/// Why the `kubernetes` source could not start.
#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    /// Neither a kubeconfig nor the in-cluster environment was found.
    #[error("no Kubernetes client configuration (kubeconfig or in-cluster service account): {0}")]
    NoConfig(String),
    /// The configuration was found but the client could not be built.
    #[error("cannot build the Kubernetes client: {0}")]
    Client(String),
}

/// Infers the client (retrying with a 5 s pause while it fails, reported in
/// readiness), then [`run`]s until `shutdown`.
pub async fn run_inferred(
    node_address: IpAddr,
    registry: Arc<Registry>,
    ready: Arc<Readiness>,
    shutdown: CancellationToken,
) {
    let client = loop {
        match infer_client().await {
            Ok(c) => break c,
            Err(e) => {
                warn!(error = %e, "kubernetes discovery cannot start; retrying");
                ready.set_discovery_error(Some(e.to_string()));
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(std::time::Duration::from_secs(5)) => {}
                }
            }
        }
    };
    run(client, node_address, registry, ready, shutdown).await;
}

/// Watches every kind with `client` and applies the model to `registry`
/// until `shutdown`. Marks discovery synced in `ready` once every kind has
/// been listed. Peers are dialled in the family of `node_address`, the
/// address this daemon's tunnel endpoint is bound to.
pub async fn run(
    client: Client,
    node_address: IpAddr,
    registry: Arc<Registry>,
    ready: Arc<Readiness>,
    shutdown: CancellationToken,
) {
    let mut streams = streams(&client);
    let mut state = KubeState {
        local_address: Some(node_address),
        ..KubeState::default()
    };
    let mut dirty = false;
    let mut applied_once = false;
    info!("kubernetes discovery: listing nodes, pods, services, endpointslices, namespaces, authorizationpolicies");
    loop {
        let item = tokio::select! {
            _ = shutdown.cancelled() => return,
            item = streams.next() => item,
        };
        let Some(first) = item else {
            warn!("kubernetes watch streams ended");
            return;
        };
        // Coalesce whatever is already waiting (up to MAX_BATCH events) into
        // one model.
        let mut next = Some(first);
        let mut batch = 0;
        while let Some((kind, res)) = next.take() {
            batch += 1;
            match res {
                Ok(update) => dirty |= state.apply(update),
                Err(e) if kind == Kind::Policy && is_not_found(&e) => {
                    if state.policies.mark_absent() {
                        warn!("authorizationpolicies.nodemesh.io is not installed; no policies (install the CRD)");
                        dirty = true;
                    }
                }
                Err(e) => {
                    warn!(kind = kind.as_str(), error = %e, "kubernetes watch error; retrying with backoff, the registry keeps its model");
                    metrics::counter!(m::DISCOVERY_RELOADS, "source" => "kubernetes", "result" => "error")
                        .increment(1);
                    if !applied_once {
                        ready.set_discovery_error(Some(format!(
                            "kubernetes {}: {e}",
                            kind.as_str()
                        )));
                    }
                }
            }
            if batch < MAX_BATCH {
                next = streams.next().now_or_never().flatten();
            }
        }
        if !dirty || !state.synced() {
            if !state.synced() {
                debug!(waiting_for = ?state.unsynced(), "kubernetes discovery not synced yet");
            }
            continue;
        }
        dirty = false;
        let model = state.model();
        if let Err(e) = model.validate() {
            // model() leaves out what would not validate; this is a bug.
            warn!(error = %e, "kubernetes model refused; keeping the last good model");
            metrics::counter!(m::DISCOVERY_RELOADS, "source" => "kubernetes", "result" => "error")
                .increment(1);
            continue;
        }
        registry.apply(&model);
        metrics::counter!(m::DISCOVERY_RELOADS, "source" => "kubernetes", "result" => "ok")
            .increment(1);
        if !applied_once {
            applied_once = true;
            info!(
                nodes = model.nodes.len(),
                pods = model.pods.len(),
                services = model.services.len(),
                strict_namespaces = model.namespaces.len(),
                policies = state.policies.items().len(),
                "kubernetes discovery synced"
            );
            ready.set_discovery_error(None);
            ready.mark_discovery_synced();
        } else {
            debug!(
                nodes = model.nodes.len(),
                pods = model.pods.len(),
                services = model.services.len(),
                "kubernetes discovery applied"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(name: &str) -> Keyed<String> {
        (name.to_owned(), Some(name.to_uppercase()))
    }

    #[test]
    fn a_relist_is_swapped_in_whole_when_done() {
        let mut s: Store<String> = Store::default();
        assert!(!s.apply(Event::Init));
        assert!(!s.apply(Event::InitApply(rec("a"))));
        assert!(
            s.items().is_empty() && !s.synced(),
            "nothing visible mid-list"
        );
        assert!(s.apply(Event::InitDone));
        assert!(s.synced());
        assert!(s.apply(Event::Apply(rec("b"))));
        assert_eq!(s.items().len(), 2);

        // Relist (after 410 Gone): the old items stay visible until InitDone,
        // then whatever the relist lacks is gone.
        s.apply(Event::Init);
        s.apply(Event::InitApply(rec("c")));
        assert_eq!(s.items().len(), 2, "old items kept while relisting");
        s.apply(Event::InitDone);
        let mut keys: Vec<&String> = s.items().keys().collect();
        keys.sort();
        assert_eq!(keys, ["c"]);

        // An object that became unusable is removed; a delete too.
        s.apply(Event::Apply(("c".into(), None)));
        assert!(s.items().is_empty());
        s.apply(Event::Apply(rec("d")));
        assert!(s.apply(Event::Delete(("d".into(), None))));
        assert!(!s.apply(Event::Delete(("d".into(), None))));
    }

    fn node(name: &str, addresses: &[(&str, &str)]) -> core::Node {
        let listed: Vec<serde_json::Value> = addresses
            .iter()
            .map(|(t, a)| serde_json::json!({"type": t, "address": a}))
            .collect();
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name},
            "status": {"addresses": listed},
        }))
        .expect("node")
    }

    #[test]
    fn peers_are_dialled_in_the_family_of_the_local_node_address() {
        let dual = NodeRecord::from_object(&node(
            "dual",
            &[
                ("Hostname", "dual"),
                ("ExternalIP", "203.0.113.1"),
                ("InternalIP", "192.0.2.1"),
                ("InternalIP", "2001:db8::1"),
            ],
        ))
        .expect("kept");
        assert_eq!(
            dual.addresses,
            ["192.0.2.1", "2001:db8::1", "203.0.113.1"].map(|a| a.parse::<IpAddr>().expect("ip"))
        );
        let v6_first = NodeRecord::from_object(&node(
            "v6-first",
            &[("InternalIP", "2001:db8::2"), ("InternalIP", "192.0.2.2")],
        ))
        .expect("kept");
        let v4_only = NodeRecord::from_object(&node("v4-only", &[("InternalIP", "192.0.2.3")]))
            .expect("kept");
        let at = |r: &NodeRecord, local: Option<&str>| {
            r.tunnel_address(local.map(|l| l.parse().expect("ip")))
                .map(|a| a.to_string())
        };
        // An IPv4 endpoint dials IPv4, an IPv6 one IPv6, whatever the order.
        assert_eq!(at(&dual, Some("192.0.2.9")).as_deref(), Some("192.0.2.1"));
        assert_eq!(
            at(&dual, Some("2001:db8::9")).as_deref(),
            Some("2001:db8::1")
        );
        assert_eq!(
            at(&v6_first, Some("192.0.2.9")).as_deref(),
            Some("192.0.2.2")
        );
        // No address of the local family: the first (the dial will say why
        // it fails); local unknown: the first.
        assert_eq!(
            at(&v4_only, Some("2001:db8::9")).as_deref(),
            Some("192.0.2.3")
        );
        assert_eq!(at(&v6_first, None).as_deref(), Some("2001:db8::2"));
        // No InternalIP: the ExternalIP; no address at all: not kept.
        let external =
            NodeRecord::from_object(&node("ext", &[("ExternalIP", "203.0.113.4")])).expect("kept");
        assert_eq!(at(&external, None).as_deref(), Some("203.0.113.4"));
        assert!(NodeRecord::from_object(&node("none", &[("Hostname", "none")])).is_none());

        // The model carries the chosen address.
        let mut st = KubeState {
            local_address: Some("2001:db8::9".parse().expect("ip")),
            ..KubeState::default()
        };
        st.nodes.apply(Event::Apply(("dual".into(), Some(dual))));
        assert_eq!(
            st.model().nodes[0].address,
            "2001:db8::1".parse::<IpAddr>().expect("ip")
        );
    }

    #[test]
    fn config_accepts_the_kubernetes_source() {
        let c: crate::config::Config =
            serde_yaml::from_str("node_name: n1\ndiscovery: {source: kubernetes}\n")
                .expect("parse");
        assert_eq!(
            c.discovery.source,
            crate::config::DiscoverySource::Kubernetes
        );
    }

    #[test]
    fn named_target_ports_resolve_through_slices_and_unknown_nodes_are_dropped() {
        let mut st = KubeState::default();
        st.nodes.apply(Event::Apply((
            "n1".into(),
            Some(NodeRecord {
                name: "n1".into(),
                addresses: vec!["192.0.2.1".parse().expect("ip")],
                pod_cidrs: vec![],
            }),
        )));
        st.services.apply(Event::Apply((
            "shop/web".into(),
            Some(ServiceRecord {
                namespace: "shop".into(),
                name: "web".into(),
                cluster_ips: vec!["10.96.0.10".parse().expect("ip")],
                ports: vec![
                    ServicePortRecord {
                        name: Some("http".into()),
                        port: 80,
                        target: TargetPort::Name("http".into()),
                        protocol: Protocol::Tcp,
                    },
                    ServicePortRecord {
                        name: Some("admin".into()),
                        port: 81,
                        target: TargetPort::Name("admin".into()),
                        protocol: Protocol::Tcp,
                    },
                ],
                split: None,
            }),
        )));
        st.slices.apply(Event::Apply((
            "shop/web-abc".into(),
            Some(SliceRecord {
                namespace: "shop".into(),
                service: "web".into(),
                ports: vec![(Some("http".into()), 8080, Protocol::Tcp)],
                endpoints: vec![EndpointRecord {
                    ips: vec!["10.244.1.5".parse().expect("ip")],
                    node: Some("n9".into()),
                    ready: true,
                    pod: Some("web-1".into()),
                }],
            }),
        )));
        let m = st.model();
        m.validate().expect("valid");
        let s = &m.services[0];
        assert_eq!(s.ports.len(), 1, "unresolvable named port left out");
        assert_eq!(s.ports[0].target_port, 8080);
        assert_eq!(s.endpoints[0].node, None, "unknown node dropped");
    }
}

#[cfg(test)]
mod conversion_tests {
    use super::*;
    use crate::discovery::model::SplitError;

    fn record(spec: serde_json::Value) -> PolicyRecord {
        PolicyRecord {
            namespace: "shop".into(),
            name: "web".into(),
            spec,
        }
    }

    #[test]
    fn policies_convert_and_bad_ones_are_left_out() {
        let good = record(serde_json::json!({
            "selector": {"matchLabels": {"app": "web"}},
            "action": "ALLOW",
            "rules": [{"from": [{"principals": ["spiffe://cluster.local/ns/front/*"]}], "to": [{"ports": [8080]}]}]
        }));
        let p = good.to_model().expect("converts");
        assert_eq!((p.namespace.as_str(), p.name.as_str()), ("shop", "web"));
        assert_eq!(p.rules[0].to[0].ports, vec![8080]);
        // Unknown field, bad action, invalid CIDR: each left out, never a panic.
        for bad in [
            serde_json::json!({"action": "ALLOW", "bogus": 1}),
            serde_json::json!({"action": "MAYBE"}),
            serde_json::json!({"action": "DENY", "rules": [{"from": [{"ipBlocks": ["10.0.0.1/8"]}]}]}),
            serde_json::json!("not an object"),
        ] {
            assert!(record(bad.clone()).to_model().is_none(), "{bad}");
        }
    }

    fn namespace(name: &str, mode: Option<&str>) -> core::Namespace {
        let labels = match mode {
            Some(v) => serde_json::json!({ MODE_LABEL: v, "team": "x" }),
            None => serde_json::json!({"team": "x"}),
        };
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "labels": labels}
        }))
        .expect("namespace")
    }

    #[test]
    fn namespace_mode_comes_from_the_label_and_bad_values_are_permissive() {
        for (value, mode) in [
            (None, Mode::Permissive),
            (Some("permissive"), Mode::Permissive),
            (Some("strict"), Mode::Strict),
            (Some("Strict"), Mode::Permissive),
            (Some(""), Mode::Permissive),
            (Some("enforce"), Mode::Permissive),
        ] {
            let rec = NamespaceRecord::from_object(&namespace("shop", value)).expect("kept");
            assert_eq!((rec.name.as_str(), rec.mode), ("shop", mode), "{value:?}");
        }
    }

    #[test]
    fn a_bad_mode_value_is_logged_with_the_namespace_and_the_value() {
        let (logs, subscriber) = crate::test_log::Captured::text();
        tracing::subscriber::with_default(subscriber, || {
            NamespaceRecord::from_object(&namespace("batch", Some("enforce")));
            NamespaceRecord::from_object(&namespace("shop", Some("strict")));
            NamespaceRecord::from_object(&namespace("web", None));
        });
        let out = logs.output();
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 1, "only the bad value is logged: {out}");
        assert!(lines[0].contains("WARN"), "{out}");
        assert!(lines[0].contains("namespace=batch"), "{out}");
        assert!(lines[0].contains("value=enforce"), "{out}");
    }

    #[test]
    fn the_model_lists_only_strict_namespaces_sorted() {
        let mut st = KubeState::default();
        for (name, mode) in [
            ("zeta", Some("strict")),
            ("alpha", Some("strict")),
            ("mid", None),
            ("odd", Some("yes")),
        ] {
            st.namespaces.apply(Event::Apply((
                name.to_owned(),
                NamespaceRecord::from_object(&namespace(name, mode)),
            )));
        }
        let m = st.model();
        m.validate().expect("valid");
        let names: Vec<(&str, Mode)> = m
            .namespaces
            .iter()
            .map(|n| (n.name.as_str(), n.mode))
            .collect();
        assert_eq!(names, [("alpha", Mode::Strict), ("zeta", Mode::Strict)]);
    }

    #[test]
    fn split_annotations_parse_and_bad_ones_are_named() {
        let ok = parse_split(Some("track"), Some(" stable=90 , canary = 10,"))
            .expect("valid")
            .expect("split");
        assert_eq!(ok.label, "track");
        assert_eq!(
            ok.weights,
            [("stable".to_owned(), 90), ("canary".to_owned(), 10)]
        );
        assert_eq!(parse_split(None, None), Ok(None));
        let cases: [(Option<&str>, Option<&str>, SplitAnnotationError, &str); 9] = [
            (
                Some("track"),
                None,
                SplitAnnotationError::MissingWeights,
                SPLIT_WEIGHTS_ANNOTATION,
            ),
            (
                None,
                Some("a=1"),
                SplitAnnotationError::MissingLabel,
                SPLIT_LABEL_ANNOTATION,
            ),
            (
                Some("track"),
                Some("stable:90"),
                SplitAnnotationError::BadEntry {
                    entry: "stable:90".into(),
                },
                SPLIT_WEIGHTS_ANNOTATION,
            ),
            (
                Some("track"),
                Some("=90"),
                SplitAnnotationError::BadEntry {
                    entry: "=90".into(),
                },
                SPLIT_WEIGHTS_ANNOTATION,
            ),
            (
                Some("track"),
                Some("stable=ninety"),
                SplitAnnotationError::BadWeight {
                    value: "stable".into(),
                    weight: "ninety".into(),
                },
                SPLIT_WEIGHTS_ANNOTATION,
            ),
            (
                Some("track"),
                Some("stable=-1"),
                SplitAnnotationError::BadWeight {
                    value: "stable".into(),
                    weight: "-1".into(),
                },
                SPLIT_WEIGHTS_ANNOTATION,
            ),
            (
                Some(" "),
                Some("stable=1"),
                SplitAnnotationError::Invalid(SplitError::EmptyLabel),
                SPLIT_LABEL_ANNOTATION,
            ),
            (
                Some("track"),
                Some("stable=0,canary=0"),
                SplitAnnotationError::Invalid(SplitError::AllZero),
                SPLIT_WEIGHTS_ANNOTATION,
            ),
            (
                Some("track"),
                Some("a=1,a=2"),
                SplitAnnotationError::Invalid(SplitError::DuplicateValue { value: "a".into() }),
                SPLIT_WEIGHTS_ANNOTATION,
            ),
        ];
        for (label, weights, want, annotation) in cases {
            let e = parse_split(label, weights).expect_err(weights.unwrap_or("-"));
            assert_eq!(e, want);
            assert_eq!(e.annotation(), annotation, "{e}");
        }
        assert!(matches!(
            parse_split(Some("track"), Some("")),
            Err(SplitAnnotationError::Invalid(SplitError::NoWeights { .. }))
        ));
        assert!(matches!(
            parse_split(Some("track"), Some("a=10001")),
            Err(SplitAnnotationError::Invalid(SplitError::WeightTooLarge {
                weight: 10_001,
                ..
            }))
        ));
    }

    fn annotated_service(annotations: serde_json::Value) -> core::Service {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "web", "namespace": "shop", "annotations": annotations},
            "spec": {"clusterIP": "10.96.0.10", "ports": [{"port": 80, "targetPort": 8080}]}
        }))
        .expect("service")
    }

    #[test]
    fn a_malformed_split_keeps_the_service_warns_and_counts() {
        let (logs, subscriber) = crate::test_log::Captured::text();
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        let (good, bad, none) = tracing::subscriber::with_default(subscriber, || {
            metrics::with_local_recorder(&recorder, || {
                (
                    ServiceRecord::from_object(&annotated_service(serde_json::json!({
                        SPLIT_LABEL_ANNOTATION: "track",
                        SPLIT_WEIGHTS_ANNOTATION: "stable=90,canary=10",
                    }))),
                    ServiceRecord::from_object(&annotated_service(serde_json::json!({
                        SPLIT_LABEL_ANNOTATION: "track",
                        SPLIT_WEIGHTS_ANNOTATION: "stable=90%,canary=10%",
                    }))),
                    ServiceRecord::from_object(&annotated_service(serde_json::json!({}))),
                )
            })
        });
        let good = good.expect("kept");
        assert_eq!(
            good.split.as_ref().map(|s| s.weights.len()),
            Some(2),
            "{good:?}"
        );
        let bad = bad.expect("kept without a split");
        assert_eq!(bad.split, None);
        assert_eq!(bad.ports.len(), 1, "the rest of the service is kept");
        assert_eq!(none.expect("kept").split, None);

        let out = logs.output();
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 1, "only the bad split is logged: {out}");
        for want in [
            "WARN",
            "service=shop/web",
            "annotation=\"nodemesh.io/split-weights\"",
            "stable=90%",
            "weight \"90%\" of \"stable\" is not a whole number",
        ] {
            assert!(lines[0].contains(want), "{want} in {out}");
        }
        let page = handle.render();
        assert!(
            page.contains(r#"nodemesh_discovery_invalid_total{kind="traffic_split"} 1"#),
            "{page}"
        );
    }

    #[test]
    fn pending_pods_are_kept_with_their_opt_out() {
        let pod: core::Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "legacy", "namespace": "shop",
                         "annotations": {"nodemesh.io/inject": "disabled"}},
            "spec": {"nodeName": "n1", "containers": []},
            "status": {"phase": "Pending"}
        }))
        .expect("pod");
        let rec = PodRecord::from_object(&pod).expect("kept while pending");
        assert!(rec.ips.is_empty());
        assert!(rec.inject_disabled);
    }
}
