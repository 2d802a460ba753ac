//! The cluster model every discovery source produces.
//!
//! Owns the plain data types of nodes and pods, as read from a source, and
//! their validation. The live, concurrently-read view is `registry`; sources
//! (`discovery::file`) build a [`ClusterModel`] and hand it over whole.

use std::collections::{BTreeMap, HashSet};
use std::net::IpAddr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::config::is_dns_subdomain;

/// Everything discovery knows about the cluster at one moment.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterModel {
    /// Nodes running a nodemesh daemon.
    #[serde(default)]
    pub nodes: Vec<Node>,
    /// Pods, meshed or not.
    #[serde(default)]
    pub pods: Vec<Pod>,
    /// Services and their endpoints (ClusterIP:port → endpoints).
    #[serde(default)]
    pub services: Vec<Service>,
}

/// A node and where its daemon is reached.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Node {
    /// Kubernetes node name; also the node's identity
    /// `spiffe://<trust-domain>/nodemesh/node/<name>`.
    pub name: String,
    /// Address of the node's tunnel endpoint.
    pub address: IpAddr,
    /// Pod CIDRs allocated to the node: addresses in them route to it.
    #[serde(default)]
    pub pod_cidrs: Vec<IpNet>,
}

/// A pod.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pod {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// Service account. Default `default`.
    #[serde(default = "default_sa")]
    pub service_account: String,
    /// Node the pod is scheduled on.
    pub node: String,
    /// The pod's addresses.
    pub ips: Vec<IpAddr>,
    /// Labels (used by policy selectors).
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

fn default_sa() -> String {
    "default".to_owned()
}

/// A model that cannot be used, naming the entry and the problem.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ModelError {
    /// Two nodes share a name.
    #[error("nodes[{index}]: node name {name:?} appears twice; node names must be unique")]
    DuplicateNode {
        /// Position in `nodes`.
        index: usize,
        /// The name.
        name: String,
    },
    /// A node name is not a DNS subdomain.
    #[error("nodes[{index}].name: {name:?} is not a valid node name (lowercase DNS subdomain)")]
    BadNodeName {
        /// Position in `nodes`.
        index: usize,
        /// The name.
        name: String,
    },
    /// A pod names a node that is not in `nodes`.
    #[error("pods[{index}] ({namespace}/{name}): node {node:?} is not listed under nodes")]
    UnknownNode {
        /// Position in `pods`.
        index: usize,
        /// Pod namespace.
        namespace: String,
        /// Pod name.
        name: String,
        /// The node it names.
        node: String,
    },
    /// Two pods claim the same IP.
    #[error("pods[{index}] ({namespace}/{name}): IP {ip} already belongs to another pod")]
    DuplicatePodIp {
        /// Position in `pods`.
        index: usize,
        /// Pod namespace.
        namespace: String,
        /// Pod name.
        name: String,
        /// The IP.
        ip: IpAddr,
    },
    /// A pod has no IPs.
    #[error("pods[{index}] ({namespace}/{name}): ips is empty; list at least one address")]
    NoPodIps {
        /// Position in `pods`.
        index: usize,
        /// Pod namespace.
        namespace: String,
        /// Pod name.
        name: String,
    },
    /// A service entry is inconsistent.
    #[error(transparent)]
    Service(#[from] ServiceError),
}

impl ClusterModel {
    /// Checks cross-references; the first problem found is returned.
    pub fn validate(&self) -> Result<(), ModelError> {
        let mut names = HashSet::new();
        for (index, n) in self.nodes.iter().enumerate() {
            if !is_dns_subdomain(&n.name) {
                return Err(ModelError::BadNodeName {
                    index,
                    name: n.name.clone(),
                });
            }
            if !names.insert(n.name.as_str()) {
                return Err(ModelError::DuplicateNode {
                    index,
                    name: n.name.clone(),
                });
            }
        }
        let mut ips = HashSet::new();
        for (index, p) in self.pods.iter().enumerate() {
            if !names.contains(p.node.as_str()) {
                return Err(ModelError::UnknownNode {
                    index,
                    namespace: p.namespace.clone(),
                    name: p.name.clone(),
                    node: p.node.clone(),
                });
            }
            if p.ips.is_empty() {
                return Err(ModelError::NoPodIps {
                    index,
                    namespace: p.namespace.clone(),
                    name: p.name.clone(),
                });
            }
            for ip in &p.ips {
                if !ips.insert(*ip) {
                    return Err(ModelError::DuplicatePodIp {
                        index,
                        namespace: p.namespace.clone(),
                        name: p.name.clone(),
                        ip: *ip,
                    });
                }
            }
        }
        self.validate_services()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = r#"
nodes:
  - name: n1
    address: 10.77.0.1
    pod_cidrs: [10.78.1.0/24]
  - name: n2
    address: 10.77.0.2
pods:
  - namespace: default
    name: client
    node: n1
    ips: [10.78.1.2]
    labels: {app: client}
  - namespace: shop
    name: web
    service_account: web
    node: n2
    ips: [10.78.2.2]
"#;

    #[test]
    fn example_parses_and_validates() {
        let m: ClusterModel = serde_yaml::from_str(EXAMPLE).expect("parse");
        m.validate().expect("valid");
        assert_eq!(m.pods[0].service_account, "default");
        assert_eq!(m.nodes[0].pod_cidrs[0].to_string(), "10.78.1.0/24");
    }

    #[test]
    fn bad_references_are_named() {
        let mut m: ClusterModel = serde_yaml::from_str(EXAMPLE).expect("parse");
        m.pods[1].node = "n9".into();
        assert!(m
            .validate()
            .expect_err("unknown node")
            .to_string()
            .contains("pods[1] (shop/web)"));
        let mut m: ClusterModel = serde_yaml::from_str(EXAMPLE).expect("parse");
        m.pods[1].ips = m.pods[0].ips.clone();
        assert!(matches!(
            m.validate(),
            Err(ModelError::DuplicatePodIp { index: 1, .. })
        ));
        let mut m: ClusterModel = serde_yaml::from_str(EXAMPLE).expect("parse");
        m.nodes[1].name = "n1".into();
        assert!(matches!(
            m.validate(),
            Err(ModelError::DuplicateNode { index: 1, .. })
        ));
    }
}

// ---------------------------------------------------------------------------
// Services: the file source's shape of what Services + EndpointSlices give.
// ---------------------------------------------------------------------------

/// A Service: virtual addresses and ports, and the endpoints behind them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Service {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// Cluster IPs (one per family); empty for a headless service, which is
    /// then not balanced by nodemesh (clients connect to pod IPs directly).
    #[serde(default)]
    pub cluster_ips: Vec<IpAddr>,
    /// Ports.
    pub ports: Vec<ServicePort>,
    /// Endpoints (what the EndpointSlices of the service list).
    #[serde(default)]
    pub endpoints: Vec<Endpoint>,
}

/// One port of a service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServicePort {
    /// Port name (required by Kubernetes when a service has several ports).
    #[serde(default)]
    pub name: Option<String>,
    /// The port on the cluster IPs.
    pub port: u16,
    /// The port on the endpoints (already resolved if it was named).
    pub target_port: u16,
    /// Protocol. Only TCP is proxied. Default `TCP`.
    #[serde(default)]
    pub protocol: Protocol,
}

/// A service port's protocol.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Protocol {
    /// TCP: balanced by nodemesh.
    #[default]
    #[serde(rename = "TCP")]
    Tcp,
    /// UDP: not proxied.
    #[serde(rename = "UDP")]
    Udp,
    /// SCTP: not proxied.
    #[serde(rename = "SCTP")]
    Sctp,
}

/// One endpoint of a service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Endpoint {
    /// Address of the endpoint (a pod IP).
    pub ip: IpAddr,
    /// Node the endpoint runs on, if known; must be listed under `nodes`.
    #[serde(default)]
    pub node: Option<String>,
    /// Whether it may receive new connections. Default true.
    #[serde(default = "default_true")]
    pub ready: bool,
    /// Name of the pod behind it (`targetRef`), if any.
    #[serde(default)]
    pub target_ref: Option<String>,
}

fn default_true() -> bool {
    true
}

/// A service entry that cannot be used, naming the entry and the problem.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ServiceError {
    /// Two services share namespace and name.
    #[error("services[{index}] ({namespace}/{name}): service appears twice")]
    DuplicateService {
        /// Position in `services`.
        index: usize,
        /// Namespace.
        namespace: String,
        /// Name.
        name: String,
    },
    /// A service has no ports.
    #[error("services[{index}] ({namespace}/{name}): ports is empty; list at least one port")]
    NoPorts {
        /// Position in `services`.
        index: usize,
        /// Namespace.
        namespace: String,
        /// Name.
        name: String,
    },
    /// A port or target port is 0.
    #[error(
        "services[{index}] ({namespace}/{name}).ports[{port_index}]: port and target_port must be 1..=65535"
    )]
    ZeroPort {
        /// Position in `services`.
        index: usize,
        /// Namespace.
        namespace: String,
        /// Name.
        name: String,
        /// Position in `ports`.
        port_index: usize,
    },
    /// Two ports of a service share a port number and protocol.
    #[error("services[{index}] ({namespace}/{name}).ports[{port_index}]: port {port}/{protocol:?} appears twice")]
    DuplicatePort {
        /// Position in `services`.
        index: usize,
        /// Namespace.
        namespace: String,
        /// Name.
        name: String,
        /// Position in `ports`.
        port_index: usize,
        /// The port.
        port: u16,
        /// Its protocol.
        protocol: Protocol,
    },
    /// Two services claim the same cluster IP.
    #[error("services[{index}] ({namespace}/{name}): cluster IP {ip} already belongs to another service")]
    DuplicateClusterIp {
        /// Position in `services`.
        index: usize,
        /// Namespace.
        namespace: String,
        /// Name.
        name: String,
        /// The IP.
        ip: IpAddr,
    },
    /// A cluster IP is also a pod's IP.
    #[error("services[{index}] ({namespace}/{name}): cluster IP {ip} is also a pod IP")]
    ClusterIpIsPodIp {
        /// Position in `services`.
        index: usize,
        /// Namespace.
        namespace: String,
        /// Name.
        name: String,
        /// The IP.
        ip: IpAddr,
    },
    /// An endpoint names a node that is not in `nodes`.
    #[error("services[{index}] ({namespace}/{name}).endpoints[{endpoint_index}]: node {node:?} is not listed under nodes")]
    UnknownEndpointNode {
        /// Position in `services`.
        index: usize,
        /// Namespace.
        namespace: String,
        /// Name.
        name: String,
        /// Position in `endpoints`.
        endpoint_index: usize,
        /// The node it names.
        node: String,
    },
    /// An endpoint IP is listed twice in one service.
    #[error(
        "services[{index}] ({namespace}/{name}).endpoints[{endpoint_index}]: IP {ip} appears twice"
    )]
    DuplicateEndpoint {
        /// Position in `services`.
        index: usize,
        /// Namespace.
        namespace: String,
        /// Name.
        name: String,
        /// Position in `endpoints`.
        endpoint_index: usize,
        /// The IP.
        ip: IpAddr,
    },
}

impl ClusterModel {
    /// Checks the services: unique names, ports, cluster IPs, known nodes.
    pub fn validate_services(&self) -> Result<(), ServiceError> {
        let nodes: HashSet<&str> = self.nodes.iter().map(|n| n.name.as_str()).collect();
        let pod_ips: HashSet<IpAddr> = self
            .pods
            .iter()
            .flat_map(|p| p.ips.iter().copied())
            .collect();
        let mut names = HashSet::new();
        let mut cluster_ips = HashSet::new();
        for (index, s) in self.services.iter().enumerate() {
            let (namespace, name) = (s.namespace.clone(), s.name.clone());
            if !names.insert((s.namespace.as_str(), s.name.as_str())) {
                return Err(ServiceError::DuplicateService {
                    index,
                    namespace,
                    name,
                });
            }
            if s.ports.is_empty() {
                return Err(ServiceError::NoPorts {
                    index,
                    namespace,
                    name,
                });
            }
            let mut ports = HashSet::new();
            for (port_index, p) in s.ports.iter().enumerate() {
                if p.port == 0 || p.target_port == 0 {
                    return Err(ServiceError::ZeroPort {
                        index,
                        namespace,
                        name,
                        port_index,
                    });
                }
                if !ports.insert((p.port, p.protocol)) {
                    return Err(ServiceError::DuplicatePort {
                        index,
                        namespace,
                        name,
                        port_index,
                        port: p.port,
                        protocol: p.protocol,
                    });
                }
            }
            for ip in &s.cluster_ips {
                if pod_ips.contains(ip) {
                    return Err(ServiceError::ClusterIpIsPodIp {
                        index,
                        namespace,
                        name,
                        ip: *ip,
                    });
                }
                if !cluster_ips.insert(*ip) {
                    return Err(ServiceError::DuplicateClusterIp {
                        index,
                        namespace,
                        name,
                        ip: *ip,
                    });
                }
            }
            let mut endpoint_ips = HashSet::new();
            for (endpoint_index, e) in s.endpoints.iter().enumerate() {
                if let Some(node) = &e.node {
                    if !nodes.contains(node.as_str()) {
                        return Err(ServiceError::UnknownEndpointNode {
                            index,
                            namespace,
                            name,
                            endpoint_index,
                            node: node.clone(),
                        });
                    }
                }
                if !endpoint_ips.insert(e.ip) {
                    return Err(ServiceError::DuplicateEndpoint {
                        index,
                        namespace,
                        name,
                        endpoint_index,
                        ip: e.ip,
                    });
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod service_tests {
    use super::*;

    const EXAMPLE: &str = r#"
nodes:
  - {name: n1, address: 10.77.0.1}
  - {name: n2, address: 10.77.0.2}
pods:
  - {namespace: shop, name: web-1, node: n1, ips: [10.78.1.2]}
services:
  - namespace: shop
    name: web
    cluster_ips: [10.96.0.10]
    ports: [{name: http, port: 80, target_port: 8080}]
    endpoints:
      - {ip: 10.78.1.2, node: n1, target_ref: web-1}
      - {ip: 10.78.2.2, node: n2, ready: false}
"#;

    fn example() -> ClusterModel {
        serde_yaml::from_str(EXAMPLE).expect("parse")
    }

    #[test]
    fn example_parses_with_defaults() {
        let m = example();
        m.validate().expect("valid");
        let s = &m.services[0];
        assert_eq!(s.ports[0].protocol, Protocol::Tcp);
        assert!(s.endpoints[0].ready);
        assert!(!s.endpoints[1].ready);
        assert_eq!(s.endpoints[0].target_ref.as_deref(), Some("web-1"));
    }

    #[test]
    fn errors_name_the_entry() {
        let mut m = example();
        m.services.push(m.services[0].clone());
        let e = m.validate().expect_err("dup");
        assert!(matches!(
            e,
            ModelError::Service(ServiceError::DuplicateService { index: 1, .. })
        ));
        assert!(e.to_string().contains("services[1] (shop/web)"), "{e}");

        let mut m = example();
        m.services[0].endpoints[1].node = Some("n9".into());
        let e = m.validate().expect_err("node");
        assert!(
            e.to_string().contains("endpoints[1]") && e.to_string().contains("\"n9\""),
            "{e}"
        );

        let mut m = example();
        m.services[0].ports[0].target_port = 0;
        assert!(matches!(
            m.validate(),
            Err(ModelError::Service(ServiceError::ZeroPort {
                port_index: 0,
                ..
            }))
        ));

        let mut m = example();
        let mut other = m.services[0].clone();
        other.name = "other".into();
        m.services.push(other);
        assert!(matches!(
            m.validate(),
            Err(ModelError::Service(ServiceError::DuplicateClusterIp {
                index: 1,
                ..
            }))
        ));

        let mut m = example();
        m.services[0].cluster_ips = vec!["10.78.1.2".parse().expect("ip")];
        assert!(matches!(
            m.validate(),
            Err(ModelError::Service(ServiceError::ClusterIpIsPodIp { .. }))
        ));

        let mut m = example();
        m.services[0].endpoints[1].ip = m.services[0].endpoints[0].ip;
        assert!(matches!(
            m.validate(),
            Err(ModelError::Service(ServiceError::DuplicateEndpoint {
                endpoint_index: 1,
                ..
            }))
        ));

        let mut m = example();
        let p = m.services[0].ports[0].clone();
        m.services[0].ports.push(p);
        assert!(matches!(
            m.validate(),
            Err(ModelError::Service(ServiceError::DuplicatePort {
                port: 80,
                ..
            }))
        ));

        let mut m = example();
        m.services[0].ports.clear();
        assert!(matches!(
            m.validate(),
            Err(ModelError::Service(ServiceError::NoPorts { .. }))
        ));
    }
}
