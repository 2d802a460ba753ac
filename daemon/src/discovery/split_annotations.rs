//! The Kubernetes annotations of a Service's traffic split
//! (`nodemesh.io/split-label`, `nodemesh.io/split-weights`), parsed into the
//! model's [`TrafficSplit`].
//!
//! Owns the annotation syntax and its errors. Pure text parsing, without the
//! Kubernetes client, so the fuzz crate (built without the `kubernetes`
//! feature) fuzzes it; the `kubernetes` source applies it to each Service.

use super::model::{SplitError, TrafficSplit, MAX_SPLIT_WEIGHT};

/// Service annotation naming the pod label whose values are the groups of
/// the service's traffic split, e.g. `track`.
pub const SPLIT_LABEL_ANNOTATION: &str = "nodemesh.io/split-label";

/// Service annotation giving each group's weight: comma-separated
/// `<label value>=<weight>`, e.g. `stable=90,canary=10` (weights
/// `0..=10000`; spaces around entries are ignored).
pub const SPLIT_WEIGHTS_ANNOTATION: &str = "nodemesh.io/split-weights";

/// Why a Service's split annotations are ignored.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SplitAnnotationError {
    /// The weights are given without the label.
    #[error("{SPLIT_WEIGHTS_ANNOTATION} is set but {SPLIT_LABEL_ANNOTATION} is not; set both (e.g. {SPLIT_LABEL_ANNOTATION}: track) or neither")]
    MissingLabel,
    /// The label is given without the weights.
    #[error("{SPLIT_LABEL_ANNOTATION} is set but {SPLIT_WEIGHTS_ANNOTATION} is not; set both (e.g. {SPLIT_WEIGHTS_ANNOTATION}: \"stable=90,canary=10\") or neither")]
    MissingWeights,
    /// An entry of the weights is not `<value>=<weight>`.
    #[error("entry {entry:?} is not <label value>=<weight>; write e.g. \"stable=90,canary=10\"")]
    BadEntry {
        /// The entry.
        entry: String,
    },
    /// A weight is not a whole number.
    #[error("weight {weight:?} of {value:?} is not a whole number; weights are 0..={max}", max = MAX_SPLIT_WEIGHT)]
    BadWeight {
        /// The label value.
        value: String,
        /// What was written as its weight.
        weight: String,
    },
    /// The annotations parse but the split cannot be used.
    #[error(transparent)]
    Invalid(#[from] SplitError),
}

impl SplitAnnotationError {
    /// The annotation at fault.
    pub fn annotation(&self) -> &'static str {
        match self {
            Self::MissingLabel | Self::Invalid(SplitError::EmptyLabel) => SPLIT_LABEL_ANNOTATION,
            _ => SPLIT_WEIGHTS_ANNOTATION,
        }
    }
}

/// Parses a Service's split annotations: `Ok(None)` when neither is set.
pub fn parse_split(
    label: Option<&str>,
    weights: Option<&str>,
) -> Result<Option<TrafficSplit>, SplitAnnotationError> {
    let (label, weights) = match (label, weights) {
        (None, None) => return Ok(None),
        (Some(_), None) => return Err(SplitAnnotationError::MissingWeights),
        (None, Some(_)) => return Err(SplitAnnotationError::MissingLabel),
        (Some(l), Some(w)) => (l, w),
    };
    let mut parsed = Vec::new();
    for entry in weights.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        let Some((value, weight)) = entry.split_once('=') else {
            return Err(SplitAnnotationError::BadEntry {
                entry: entry.to_owned(),
            });
        };
        let (value, weight) = (value.trim(), weight.trim());
        if value.is_empty() {
            return Err(SplitAnnotationError::BadEntry {
                entry: entry.to_owned(),
            });
        }
        let weight: u32 = weight
            .parse()
            .map_err(|_| SplitAnnotationError::BadWeight {
                value: value.to_owned(),
                weight: weight.to_owned(),
            })?;
        parsed.push((value.to_owned(), weight));
    }
    let split = TrafficSplit {
        label: label.trim().to_owned(),
        weights: parsed,
    };
    split.check()?;
    Ok(Some(split))
}
