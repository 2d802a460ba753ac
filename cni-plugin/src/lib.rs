//! nodemesh-cni library.
