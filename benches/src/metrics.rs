//! Metrics pages of the lab's daemons: the parser is the daemon library's
//! ([`nodemesh::promtext`]), re-exported so the lab and its tests use one.

pub use nodemesh::promtext::{parse, sum, ParseError, Sample};
