//! Discovery: where the cluster model comes from.
//!
//! [`model`] is the one model every source produces; [`file`] is the YAML
//! source for standalone use, the lab and tests; [`kubernetes`] watches the
//! API server; [`split_annotations`] parses a Service's traffic-split
//! annotations.

pub mod file;
#[cfg(feature = "kubernetes")]
pub mod kubernetes;
pub mod model;
pub mod split_annotations;
