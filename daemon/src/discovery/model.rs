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
