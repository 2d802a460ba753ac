//! The Prometheus text exposition format, read: a pure parser of the pages
//! the admin endpoint `/metrics` serves, and sums over samples. Used by
//! `nodemesh stat` / `top` and by the lab's tests and benchmarks.

use std::collections::BTreeMap;

/// One sample: metric name, labels, value.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// Metric name (with `_total`, `_bucket`... suffixes as exposed).
    pub name: String,
    /// Label pairs.
    pub labels: BTreeMap<String, String>,
    /// Value.
    pub value: f64,
}

impl Sample {
    /// The value of label `key`, or `""`.
    pub fn label(&self, key: &str) -> &str {
        self.labels.get(key).map_or("", String::as_str)
    }
}

/// A line that is not valid exposition format.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("metrics line {line}: {problem}: {text:?}")]
pub struct ParseError {
    /// 1-based line number.
    pub line: usize,
    /// What is wrong.
    pub problem: &'static str,
    /// The line.
    pub text: String,
}

/// Parses a whole page. Comments (`# HELP`, `# TYPE`) and blank lines are skipped.
pub fn parse(text: &str) -> Result<Vec<Sample>, ParseError> {
    let mut samples = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let err = |problem| ParseError {
            line: i + 1,
            problem,
            text: raw.to_owned(),
        };
        samples.push(parse_line(line).map_err(err)?);
    }
    Ok(samples)
}

fn parse_line(line: &str) -> Result<Sample, &'static str> {
    let name_end = line
        .find(|c: char| c == '{' || c.is_whitespace())
        .ok_or("no value")?;
    let name = &line[..name_end];
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
    {
        return Err("bad metric name");
    }
    let mut rest = &line[name_end..];
    let mut labels = BTreeMap::new();
    if let Some(body) = rest.strip_prefix('{') {
        rest = parse_labels(body, &mut labels)?;
    }
    let mut fields = rest.split_whitespace();
    let value = fields.next().ok_or("no value")?;
    let value = parse_value(value).ok_or("bad value")?;
    // An optional timestamp may follow; nothing else.
    if let Some(ts) = fields.next() {
        ts.parse::<i64>().map_err(|_| "bad timestamp")?;
    }
    if fields.next().is_some() {
        return Err("trailing text");
    }
    Ok(Sample {
        name: name.to_owned(),
        labels,
        value,
    })
}

/// Parses `k="v",...}` and returns what follows the `}`.
fn parse_labels<'a>(
    mut s: &'a str,
    labels: &mut BTreeMap<String, String>,
) -> Result<&'a str, &'static str> {
    loop {
        s = s.trim_start();
        if let Some(rest) = s.strip_prefix('}') {
            return Ok(rest);
        }
        let eq = s.find('=').ok_or("label without '='")?;
        let key = s[..eq].trim();
        if key.is_empty() || !key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err("bad label name");
        }
        s = s[eq + 1..].trim_start();
        s = s.strip_prefix('"').ok_or("label value not quoted")?;
        let mut value = String::new();
        let mut chars = s.char_indices();
        let end = loop {
            match chars.next() {
                None => return Err("unterminated label value"),
                Some((i, '"')) => break i,
                Some((_, '\\')) => match chars.next() {
                    Some((_, 'n')) => value.push('\n'),
                    Some((_, c @ ('\\' | '"'))) => value.push(c),
                    _ => return Err("bad escape in label value"),
                },
                Some((_, c)) => value.push(c),
            }
        };
        labels.insert(key.to_owned(), value);
        s = s[end + 1..].trim_start();
        if let Some(rest) = s.strip_prefix(',') {
            s = rest;
        } else if !s.starts_with('}') {
            return Err("expected ',' or '}' after label");
        }
    }
}

fn parse_value(s: &str) -> Option<f64> {
    match s {
        "+Inf" | "Inf" => Some(f64::INFINITY),
        "-Inf" => Some(f64::NEG_INFINITY),
        "NaN" => Some(f64::NAN),
        _ => s.parse().ok(),
    }
}

/// Sum of the samples named `name` whose labels include every pair of `filter`.
pub fn sum(samples: &[Sample], name: &str, filter: &[(&str, &str)]) -> f64 {
    let total: f64 = samples
        .iter()
        .filter(|s| s.name == name && filter.iter().all(|(k, v)| s.label(k) == *v))
        .map(|s| s.value)
        .sum();
    // An empty float sum is -0.0; show it as 0.
    total + 0.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_sum_is_positive_zero() {
        let z = sum(&[], "x", &[]);
        assert!(z == 0.0 && z.is_sign_positive());
    }

    const PAGE: &str = r#"# HELP nodemesh_tcp_bytes_total Bytes relayed.
# TYPE nodemesh_tcp_bytes_total counter
nodemesh_tcp_bytes_total{direction="src_to_dst",reporter="source",src_workload="a",route="tunnel"} 1024
nodemesh_tcp_bytes_total{direction="dst_to_src",reporter="source",src_workload="a",route="tunnel"} 2048 1700000000000
nodemesh_tunnels_open{peer="n2"} 1
up 1
weird{msg="a \"q\" \\ b\nc", x = "1" ,} NaN
"#;

    #[test]
    fn parses_samples_labels_and_escapes() {
        let s = parse(PAGE).expect("parse");
        assert_eq!(s.len(), 5);
        assert_eq!(s[0].name, "nodemesh_tcp_bytes_total");
        assert_eq!(s[0].label("direction"), "src_to_dst");
        assert_eq!(s[0].value, 1024.0);
        assert_eq!(s[1].value, 2048.0);
        assert_eq!(s[2].label("peer"), "n2");
        assert!(s[3].labels.is_empty());
        assert_eq!(s[4].label("msg"), "a \"q\" \\ b\nc");
        assert_eq!(s[4].label("x"), "1");
        assert!(s[4].value.is_nan());
        assert_eq!(
            sum(&s, "nodemesh_tcp_bytes_total", &[("reporter", "source")]),
            3072.0
        );
        assert_eq!(
            sum(
                &s,
                "nodemesh_tcp_bytes_total",
                &[("direction", "dst_to_src")]
            ),
            2048.0
        );
    }

    #[test]
    fn rejects_malformed_lines_with_their_number() {
        for bad in [
            "x{a=\"1\"",
            "x{a=1} 2",
            "x 1 2 3",
            "x abc",
            "x{a=\"1\" b=\"2\"} 1",
            "x{a=\"\\t\"} 1",
            "x",
        ] {
            let err = parse(&format!("# c\n{bad}\n")).expect_err(bad);
            assert_eq!(err.line, 2, "{bad}");
        }
    }
}
