//! nodemesh: a per-node service mesh proxy.
//!
//! The daemon takes each meshed pod's TCP traffic on listeners it owns inside
//! the pod's network namespace (L1, [`outbound`]), carries it over one
//! multiplexed QUIC mTLS tunnel per peer node ([`tunnel`]), and delivers it into
//! the destination pod (L2, [`inbound`]). Pods are registered by the CNI plugin
//! over [`cni_server`]; the cluster model comes from [`discovery`] into the
//! [`registry`]. [`app`] wires it together; `main` is only argument parsing.
//! A new daemon takes over from a running one without a refused connection
//! ([`handover`], over `SO_REUSEPORT` groups steered by [`reuseport`]).

pub mod access_log;
pub mod admin;
pub mod admin_client;
pub mod app;
pub mod balancer;
pub mod cli;
pub mod cni_server;
pub mod config;
pub mod discovery;
pub mod handover;
pub mod host_files;
pub mod identity;
pub mod inbound;
pub mod limits;
pub mod log_control;
pub mod memory_limit;
pub mod metrics;
pub mod netns;
pub mod outbound;
pub mod outbound_service;
pub mod pods;
pub mod policy;
pub mod process_metrics;
pub mod promtext;
pub mod proxy;
pub mod registry;
pub mod relay;
pub mod relay_splice;
pub mod reuseport;
pub mod rtnl;
pub mod stat;
#[cfg(test)]
mod test_log;
pub mod tunnel;
