//! The nodemesh lab: a simulated multi-node cluster in network namespaces.
//!
//! A lab is an underlay namespace holding a Linux bridge, N node namespaces
//! joined to it (each optionally running a `nodemesh` daemon), and pods whose
//! namespaces are wired through the real CNI chain (`bridge` + `host-local`,
//! then `nodemesh-cni`), called exactly as a container runtime calls it.
//!
//! - [`lab`]: [`Lab`] (up, down, daemons, pods) and cleanup by prefix.
//! - [`topology`]: naming and addressing of namespaces, links and CIDRs.
//! - [`cni`]: the mini container runtime executing a CNI conflist.
//! - [`certs`]: certificate rotation and expiry helpers for tests.
//! - [`daemon`]: locating binaries, certificates, config, spawning daemons.
//! - [`netns`]: sockets and commands inside a network namespace.
//! - [`traffic`]: deterministic hashed transfers for end-to-end checks.
//! - [`http`]: a minimal HTTP/1.1 GET for the daemons' admin endpoints.
//! - [`metrics`]: a Prometheus text-format parser.
//! - [`demo`]: the per-edge table shown by `nodemesh-lab demo`.
//! - [`exec`]: running external commands with a deadline.
//! - [`bench`]: `nodemesh-lab bench`, the benchmark run and its report.

pub mod bench;
pub mod certs;
pub mod cni;
pub mod daemon;
pub mod dashboard;
pub mod demo;
pub mod error;
pub mod exec;
pub mod http;
pub mod lab;
pub mod metrics;
pub mod netns;
pub mod relay_engine;
pub mod topology;
pub mod traffic;

pub use error::LabError;
pub use lab::{Lab, LabOptions, PodHandle};
