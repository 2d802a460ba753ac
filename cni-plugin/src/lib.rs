//! nodemesh-cni: the chained CNI plugin that captures pod traffic into the node daemon.

pub mod proto;
