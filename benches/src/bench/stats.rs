//! Summaries of repeated measurements: median and spread (min/max) of runs.

use serde::{Deserialize, Serialize};

/// The runs of one figure: every value, and their median, minimum and maximum.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Spread {
    /// Median of the runs.
    pub median: f64,
    /// Smallest run.
    pub min: f64,
    /// Largest run.
    pub max: f64,
    /// Every run, in the order measured.
    pub runs: Vec<f64>,
}

impl Spread {
    /// The spread of `values`; `None` when there are none (or any is NaN).
    pub fn of(values: &[f64]) -> Option<Self> {
        if values.is_empty() || values.iter().any(|v| v.is_nan()) {
            return None;
        }
        let mut sorted = values.to_vec();
        sorted.sort_by(f64::total_cmp);
        let n = sorted.len();
        let median = if n % 2 == 1 {
            sorted[n / 2]
        } else {
            (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
        };
        Some(Self {
            median,
            min: sorted[0],
            max: sorted[n - 1],
            runs: values.to_vec(),
        })
    }

    /// `median (min–max)` with `digits` decimals.
    pub fn show(&self, digits: usize) -> String {
        if self.runs.len() == 1 {
            return format!("{:.*}", digits, self.median);
        }
        format!(
            "{:.*} ({:.*}–{:.*})",
            digits, self.median, digits, self.min, digits, self.max
        )
    }
}

/// `show` of an optional spread, `—` when absent.
pub fn show_opt(s: Option<&Spread>, digits: usize) -> String {
    s.map_or_else(|| "—".to_owned(), |s| s.show(digits))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even_counts() {
        let s = Spread::of(&[3.0, 1.0, 2.0]).expect("some");
        assert_eq!((s.median, s.min, s.max), (2.0, 1.0, 3.0));
        assert_eq!(s.runs, vec![3.0, 1.0, 2.0]);
        let s = Spread::of(&[4.0, 1.0, 2.0, 3.0]).expect("some");
        assert_eq!(s.median, 2.5);
        assert!(Spread::of(&[]).is_none());
        assert!(Spread::of(&[1.0, f64::NAN]).is_none());
    }

    #[test]
    fn shows_median_and_range() {
        let s = Spread::of(&[1.0, 2.0, 4.0]).expect("some");
        assert_eq!(s.show(1), "2.0 (1.0–4.0)");
        assert_eq!(Spread::of(&[5.0]).expect("some").show(0), "5");
        assert_eq!(show_opt(None, 1), "—");
    }
}
