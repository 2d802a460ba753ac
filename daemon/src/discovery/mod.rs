//! Discovery: where the cluster model comes from.
//!
//! [`model`] is the one model every source produces; [`file`] is the YAML
//! source for standalone use, the lab and tests; [`kubernetes`] watches the
//! API server.

pub mod file;
#[cfg(feature = "kubernetes")]
pub mod kubernetes;
pub mod model;
