//! nodemesh: a per-node service mesh proxy.
//!
//! The daemon takes each meshed pod's TCP traffic on listeners it owns inside
//! the pod's network namespace (L1), carries it over one multiplexed QUIC mTLS
//! tunnel per peer node, and delivers it into the destination pod (L2).

pub mod config;
pub mod discovery;
pub mod identity;
pub mod relay;
pub mod tunnel;
