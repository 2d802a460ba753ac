//! Discovery: where the cluster model comes from.
pub mod model;
