//! Checks the Grafana dashboard that ships in `manifests/grafana/` against
//! what the daemons really export.
//!
//! Owns a small reader of the dashboard's PromQL: the `nodemesh_*` metric
//! names, the label names in selectors and `by (...)` / `without (...)`
//! clauses, and the `{{label}}` placeholders of legends. [`problems`] compares
//! them with scraped samples (labels must exist on the metric) and with the
//! metric names the daemon's source declares; the end-to-end tests scrape a
//! lab after real traffic and require no problem.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::metrics::Sample;

/// Labels Prometheus adds at scrape time, not the daemon.
const SCRAPE_LABELS: [&str; 2] = ["instance", "job"];

/// The dashboard file, from the repository root.
pub fn path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifests/grafana/nodemesh.json")
}

/// One query of the dashboard: where it is, its PromQL and its legend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Query {
    /// Panel title, or `variable <name>`.
    pub place: String,
    /// The PromQL expression.
    pub expr: String,
    /// The legend format, if any.
    pub legend: Option<String>,
}

/// Every query of the dashboard: panel targets (rows included) and query
/// variables.
pub fn queries(dashboard: &Value) -> Vec<Query> {
    let mut out = Vec::new();
    fn panels(list: &Value, out: &mut Vec<Query>) {
        for p in list.as_array().into_iter().flatten() {
            let title = p["title"].as_str().unwrap_or("(untitled)").to_owned();
            for t in p["targets"].as_array().into_iter().flatten() {
                if let Some(expr) = t["expr"].as_str() {
                    out.push(Query {
                        place: title.clone(),
                        expr: expr.to_owned(),
                        legend: t["legendFormat"].as_str().map(str::to_owned),
                    });
                }
            }
            panels(&p["panels"], out);
        }
    }
    panels(&dashboard["panels"], &mut out);
    for v in dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
    {
        let q = &v["query"];
        let expr = q["query"].as_str().or_else(|| q.as_str());
        if v["type"] == "query" {
            if let Some(expr) = expr {
                out.push(Query {
                    place: format!("variable {}", v["name"].as_str().unwrap_or("?")),
                    expr: expr.to_owned(),
                    legend: None,
                });
            }
        }
    }
    out
}

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// Prefixes of the daemon's metric names: its own, and the standard
/// process metrics it exports (`daemon/src/process_metrics.rs`).
const PREFIXES: [&str; 2] = ["nodemesh_", "process_"];

/// The daemon's metric names in `expr` ([`PREFIXES`]), in order of
/// appearance.
pub fn metric_names(expr: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let mut next = 0;
    let mut before: Option<char> = None;
    for (i, c) in expr.char_indices() {
        let after_name = before.is_some_and(is_name_char);
        before = Some(c);
        if i < next || after_name || !PREFIXES.iter().any(|p| expr[i..].starts_with(p)) {
            continue;
        }
        let tail = &expr[i..];
        let end = tail.find(|c: char| !is_name_char(c)).unwrap_or(tail.len());
        if !out.iter().any(|n| n == &tail[..end]) {
            out.push(tail[..end].to_owned());
        }
        next = i + end;
    }
    out
}

/// Label names `expr` uses: matchers inside `{...}` (outside quoted values),
/// and the lists of `by (...)` / `without (...)`; also the second argument
/// of `label_values(metric, label)`.
pub fn label_names(expr: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    // Selectors.
    let mut rest = expr;
    while let Some(open) = rest.find('{') {
        let Some(close) = rest[open..].find('}') else {
            break;
        };
        let body = &rest[open + 1..open + close];
        let mut in_quote = false;
        let mut name = String::new();
        for c in body.chars() {
            match c {
                '"' => {
                    in_quote = !in_quote;
                    name.clear();
                }
                _ if in_quote => {}
                c if is_name_char(c) => name.push(c),
                '=' | '!' | '~' => {
                    if !name.is_empty() {
                        out.insert(std::mem::take(&mut name));
                    }
                }
                _ => name.clear(),
            }
        }
        rest = &rest[open + close + 1..];
    }
    out.extend(grouping_labels(expr));
    if let Some(args) = expr
        .strip_prefix("label_values(")
        .and_then(|a| a.strip_suffix(')'))
    {
        if let Some((_, label)) = args.rsplit_once(',') {
            out.insert(label.trim().to_owned());
        }
    }
    out
}

/// The labels of the `by (...)` and `without (...)` clauses of `expr`.
pub fn grouping_labels(expr: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for keyword in ["by", "without"] {
        let mut rest = expr;
        while let Some(i) = rest.find(keyword) {
            let before_ok = rest[..i]
                .chars()
                .next_back()
                .is_none_or(|c| !is_name_char(c));
            let after = rest[i + keyword.len()..].trim_start();
            if before_ok && after.starts_with('(') {
                if let Some(close) = after.find(')') {
                    for l in after[1..close].split(',') {
                        let l = l.trim();
                        if !l.is_empty() {
                            out.insert(l.to_owned());
                        }
                    }
                }
            }
            rest = &rest[i + keyword.len()..];
        }
    }
    out
}

/// The `{{label}}` placeholders of a legend format.
pub fn legend_labels(legend: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = legend;
    while let Some(i) = rest.find("{{") {
        let Some(end) = rest[i..].find("}}") else {
            break;
        };
        out.insert(rest[i + 2..i + end].trim().to_owned());
        rest = &rest[i + end + 2..];
    }
    out
}

/// Metric names the daemon's source declares: every `"nodemesh_…"` (or
/// other [`PREFIXES`]) string literal under `daemon/src`.
pub fn declared_metric_names() -> std::io::Result<BTreeSet<String>> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../daemon/src");
    let mut out = BTreeSet::new();
    let mut dirs = vec![root];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir)? {
            let path = entry?.path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let text = std::fs::read_to_string(&path)?;
                for prefix in PREFIXES {
                    for piece in text.split(&format!("\"{prefix}")).skip(1) {
                        let end = piece
                            .find(|c: char| !is_name_char(c))
                            .unwrap_or(piece.len());
                        if piece[end..].starts_with('"') {
                            out.insert(format!("{prefix}{}", &piece[..end]));
                        }
                    }
                }
            }
        }
    }
    Ok(out)
}

/// The name a histogram series belongs to (`x_bucket`, `x_sum`, `x_count` → `x`).
fn base_name(name: &str) -> &str {
    ["_bucket", "_sum", "_count"]
        .iter()
        .find_map(|s| name.strip_suffix(s))
        .unwrap_or(name)
}

/// What is wrong with the dashboard, one line each (empty: nothing):
/// - a metric the daemon does not declare;
/// - a label a query uses that the scraped samples of its metric do not have
///   (checked for the metrics present in `samples`);
/// - a legend placeholder the query's result cannot carry (not in its
///   `by (...)` list, when it aggregates).
pub fn problems(dashboard: &Value, samples: &[Sample], declared: &BTreeSet<String>) -> Vec<String> {
    let mut labels_of: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for s in samples {
        labels_of
            .entry(s.name.as_str())
            .or_default()
            .extend(s.labels.keys().map(String::as_str));
    }
    let mut out = Vec::new();
    let queries = queries(dashboard);
    if queries.is_empty() {
        out.push("the dashboard has no query".to_owned());
    }
    for q in &queries {
        let names = metric_names(&q.expr);
        if names.is_empty() {
            out.push(format!("{}: no nodemesh metric in {:?}", q.place, q.expr));
        }
        let used: BTreeSet<String> = label_names(&q.expr)
            .into_iter()
            .filter(|l| !SCRAPE_LABELS.contains(&l.as_str()))
            .collect();
        for name in &names {
            if !declared.contains(name) && !declared.contains(base_name(name)) {
                out.push(format!(
                    "{}: {name} is not a metric the daemon declares",
                    q.place
                ));
            }
            if let Some(have) = labels_of.get(name.as_str()) {
                for l in &used {
                    if !have.contains(l.as_str()) {
                        out.push(format!(
                            "{}: label {l} is not on {name} (it has {:?})",
                            q.place, have
                        ));
                    }
                }
            }
        }
        if let Some(legend) = &q.legend {
            // An aggregation keeps only its grouping labels (none without a
            // `by`); a legend placeholder for any other label shows nothing.
            let aggregates = ["sum", "min", "max", "avg", "count", "histogram_quantile"]
                .iter()
                .any(|f| q.expr.starts_with(f));
            let kept = grouping_labels(&q.expr);
            for l in legend_labels(legend) {
                if aggregates && !kept.contains(&l) {
                    out.push(format!(
                        "{}: legend uses {{{{{l}}}}}, which the query aggregates away",
                        q.place
                    ));
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_names_selectors_groupings_and_legends() {
        let e = r#"sum by (src_workload, direction) (rate(nodemesh_tcp_bytes_total{reporter="source", instance=~"$i", dst_namespace!="a,b={c}"}[5m])) / sum(nodemesh_tcp_bytes_total)"#;
        assert_eq!(metric_names(e), vec!["nodemesh_tcp_bytes_total"]);
        assert_eq!(
            label_names(e),
            [
                "direction",
                "dst_namespace",
                "instance",
                "reporter",
                "src_workload"
            ]
            .iter()
            .map(|s| s.to_string())
            .collect()
        );
        assert_eq!(
            legend_labels("{{src_workload}} → {{ direction }}"),
            ["direction", "src_workload"]
                .iter()
                .map(|s| s.to_string())
                .collect()
        );
        assert_eq!(
            label_names("label_values(nodemesh_pods_registered, instance)"),
            BTreeSet::from(["instance".to_owned()])
        );
        assert!(metric_names("rate(xnodemesh_a[1m])").is_empty());
        assert_eq!(
            metric_names("rate(process_cpu_seconds_total[1m]) + nodemesh_process_x + é process_y"),
            vec![
                "process_cpu_seconds_total",
                "nodemesh_process_x",
                "process_y"
            ]
        );
    }

    fn sample(name: &str, labels: &[&str]) -> Sample {
        Sample {
            name: name.into(),
            labels: labels.iter().map(|l| (l.to_string(), "v".into())).collect(),
            value: 1.0,
        }
    }

    #[test]
    fn flags_unknown_metrics_missing_labels_and_legends_aggregated_away() {
        let dash = serde_json::json!({"panels": [{"title": "p", "targets": [
            {"expr": "sum by (reason) (rate(nodemesh_x_total{peer=\"a\"}[1m]))", "legendFormat": "{{reason}} {{peer}}"},
            {"expr": "nodemesh_nope"},
        ]}]});
        let declared = BTreeSet::from(["nodemesh_x_total".to_owned()]);
        let p = problems(&dash, &[sample("nodemesh_x_total", &["reason"])], &declared);
        assert!(
            p.iter()
                .any(|l| l.contains("label peer is not on nodemesh_x_total")),
            "{p:?}"
        );
        assert!(
            p.iter()
                .any(|l| l.contains("nodemesh_nope is not a metric")),
            "{p:?}"
        );
        assert!(
            p.iter()
                .any(|l| l.contains("{{peer}}, which the query aggregates away")),
            "{p:?}"
        );
        let fine = serde_json::json!({"panels": [{"title": "p", "targets": [
            {"expr": "sum by (reason) (rate(nodemesh_x_total{instance=~\"$i\"}[1m]))", "legendFormat": "{{reason}}"}]}]});
        assert_eq!(
            problems(&fine, &[sample("nodemesh_x_total", &["reason"])], &declared),
            Vec::<String>::new()
        );
    }

    #[test]
    fn the_shipped_dashboard_names_only_declared_metrics_and_consistent_legends() {
        let text = std::fs::read_to_string(path()).expect("manifests/grafana/nodemesh.json");
        let dash: Value = serde_json::from_str(&text).expect("valid JSON");
        let declared = declared_metric_names().expect("daemon sources");
        assert!(declared.contains("nodemesh_connections_opened_total"));
        assert_eq!(problems(&dash, &[], &declared), Vec::<String>::new());
        assert!(queries(&dash).len() >= 20, "every panel has its queries");
    }
}
