//! A tiny SVG chart writer (bar charts with min/max whiskers, line charts),
//! so the benchmark report needs no plotting crate.

use std::fmt::Write as _;

const WIDTH: f64 = 720.0;
const HEIGHT: f64 = 400.0;
const LEFT: f64 = 80.0;
const RIGHT: f64 = 180.0;
const TOP: f64 = 50.0;
const BOTTOM: f64 = 90.0;
const COLORS: [&str; 6] = [
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b",
];

/// One bar: its label, median value and the run range drawn as a whisker.
#[derive(Debug, Clone, PartialEq)]
pub struct Bar {
    /// Label under the bar.
    pub label: String,
    /// Height (the median).
    pub value: f64,
    /// Lowest run.
    pub low: f64,
    /// Highest run.
    pub high: f64,
}

/// One line of a line chart.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    /// Legend name.
    pub name: String,
    /// (x, y) points, drawn in order.
    pub points: Vec<(f64, f64)>,
}

/// Escapes text for SVG.
pub fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A "nice" axis maximum at or above `max` (1, 2 or 5 times a power of ten).
pub fn nice_max(max: f64) -> f64 {
    if !(max.is_finite() && max > 0.0) {
        return 1.0;
    }
    let pow = 10f64.powf(max.log10().floor());
    for m in [1.0, 2.0, 5.0, 10.0] {
        if m * pow >= max {
            return m * pow;
        }
    }
    10.0 * pow
}

fn fmt_tick(v: f64) -> String {
    if v == 0.0 {
        "0".into()
    } else if v.abs() >= 100.0 || v.fract() == 0.0 {
        format!("{v:.0}")
    } else if v.abs() >= 1.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

fn header(out: &mut String, title: &str, y_label: &str) {
    let _ = write!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif" font-size="12">
<rect width="100%" height="100%" fill="white"/>
<text x="{}" y="22" text-anchor="middle" font-size="15">{}</text>
<text transform="translate(18 {}) rotate(-90)" text-anchor="middle">{}</text>
"#,
        WIDTH / 2.0,
        escape(title),
        TOP + (HEIGHT - TOP - BOTTOM) / 2.0,
        escape(y_label)
    );
}

fn y_axis(out: &mut String, y_max: f64) {
    let plot_h = HEIGHT - TOP - BOTTOM;
    for i in 0..=5 {
        let v = y_max * f64::from(i) / 5.0;
        let y = TOP + plot_h - plot_h * f64::from(i) / 5.0;
        let _ = writeln!(
            out,
            r##"<line x1="{LEFT}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#ddd"/><text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"##,
            WIDTH - RIGHT,
            LEFT - 6.0,
            y + 4.0,
            fmt_tick(v)
        );
    }
    let _ = writeln!(
        out,
        r#"<line x1="{LEFT}" y1="{TOP}" x2="{LEFT}" y2="{:.1}" stroke="black"/><line x1="{LEFT}" y1="{:.1}" x2="{:.1}" y2="{:.1}" stroke="black"/>"#,
        HEIGHT - BOTTOM,
        HEIGHT - BOTTOM,
        WIDTH - RIGHT,
        HEIGHT - BOTTOM
    );
}

/// A bar chart of `bars` with min–max whiskers.
pub fn bar_chart(title: &str, y_label: &str, bars: &[Bar]) -> String {
    let mut out = String::new();
    header(&mut out, title, y_label);
    let y_max = nice_max(bars.iter().map(|b| b.high.max(b.value)).fold(0.0, f64::max));
    y_axis(&mut out, y_max);
    let plot_w = WIDTH - LEFT - RIGHT;
    let plot_h = HEIGHT - TOP - BOTTOM;
    let slot = plot_w / bars.len().max(1) as f64;
    let y_of = |v: f64| TOP + plot_h - plot_h * (v / y_max).clamp(0.0, 1.0);
    for (i, b) in bars.iter().enumerate() {
        let x = LEFT + slot * i as f64 + slot * 0.15;
        let w = slot * 0.7;
        let y = y_of(b.value);
        let color = COLORS[i % COLORS.len()];
        let _ = writeln!(
            out,
            r#"<rect x="{x:.1}" y="{y:.1}" width="{w:.1}" height="{:.1}" fill="{color}"/>"#,
            TOP + plot_h - y
        );
        let cx = x + w / 2.0;
        let _ = writeln!(
            out,
            r#"<line x1="{cx:.1}" y1="{:.1}" x2="{cx:.1}" y2="{:.1}" stroke="black"/><text x="{cx:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
            y_of(b.low),
            y_of(b.high),
            y_of(b.high) - 4.0,
            fmt_tick(b.value)
        );
        let _ = writeln!(
            out,
            r#"<text transform="translate({cx:.1} {:.1}) rotate(30)" text-anchor="start">{}</text>"#,
            HEIGHT - BOTTOM + 14.0,
            escape(&b.label)
        );
    }
    out.push_str("</svg>\n");
    out
}

/// A line chart of `series` on linear axes starting at 0; `note` (may be
/// empty) is written under the title.
pub fn line_chart(
    title: &str,
    note: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series],
) -> String {
    let mut out = String::new();
    header(&mut out, title, y_label);
    if !note.is_empty() {
        let _ = writeln!(
            out,
            r#"<text x="{}" y="36" text-anchor="middle" font-size="11">{}</text>"#,
            WIDTH / 2.0,
            escape(note)
        );
    }
    let all = || series.iter().flat_map(|s| s.points.iter());
    let x_max = nice_max(all().map(|p| p.0).fold(0.0, f64::max));
    let y_max = nice_max(all().map(|p| p.1).fold(0.0, f64::max));
    y_axis(&mut out, y_max);
    let plot_w = WIDTH - LEFT - RIGHT;
    let plot_h = HEIGHT - TOP - BOTTOM;
    let x_of = |v: f64| LEFT + plot_w * (v / x_max).clamp(0.0, 1.0);
    let y_of = |v: f64| TOP + plot_h - plot_h * (v / y_max).clamp(0.0, 1.0);
    for i in 0..=5 {
        let v = x_max * f64::from(i) / 5.0;
        let _ = writeln!(
            out,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
            x_of(v),
            HEIGHT - BOTTOM + 16.0,
            fmt_tick(v)
        );
    }
    let _ = writeln!(
        out,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
        LEFT + plot_w / 2.0,
        HEIGHT - BOTTOM + 40.0,
        escape(x_label)
    );
    for (i, s) in series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let pts: Vec<String> = s
            .points
            .iter()
            .map(|(x, y)| format!("{:.1},{:.1}", x_of(*x), y_of(*y)))
            .collect();
        let _ = writeln!(
            out,
            r#"<polyline fill="none" stroke="{color}" stroke-width="2" points="{}"/>"#,
            pts.join(" ")
        );
        for (x, y) in &s.points {
            let _ = writeln!(
                out,
                r#"<circle cx="{:.1}" cy="{:.1}" r="3" fill="{color}"/>"#,
                x_of(*x),
                y_of(*y)
            );
        }
        let ly = TOP + 10.0 + 18.0 * i as f64;
        let lx = WIDTH - RIGHT + 12.0;
        let _ = writeln!(
            out,
            r#"<line x1="{lx:.1}" y1="{ly:.1}" x2="{:.1}" y2="{ly:.1}" stroke="{color}" stroke-width="2"/><text x="{:.1}" y="{:.1}">{}</text>"#,
            lx + 18.0,
            lx + 24.0,
            ly + 4.0,
            escape(&s.name)
        );
    }
    out.push_str("</svg>\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nice_maxima() {
        assert_eq!(nice_max(0.0), 1.0);
        assert_eq!(nice_max(3.2), 5.0);
        assert_eq!(nice_max(10.0), 10.0);
        assert_eq!(nice_max(101.0), 200.0);
        assert_eq!(nice_max(f64::NAN), 1.0);
    }

    #[test]
    fn bar_chart_is_well_formed_svg() {
        let svg = bar_chart(
            "Throughput <1 stream>",
            "Gbit/s",
            &[
                Bar {
                    label: "direct".into(),
                    value: 30.0,
                    low: 28.0,
                    high: 31.0,
                },
                Bar {
                    label: "a&b".into(),
                    value: 4.0,
                    low: 3.5,
                    high: 4.2,
                },
            ],
        );
        assert!(svg.starts_with("<svg"));
        assert!(svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches("<rect").count(), 3, "background + 2 bars");
        assert!(svg.contains("Throughput &lt;1 stream&gt;"));
        assert!(svg.contains("a&amp;b"));
    }

    #[test]
    fn line_chart_has_one_polyline_per_series() {
        let svg = line_chart(
            "Memory",
            "sidecar / node: 10×",
            "pods per node",
            "MiB",
            &[
                Series {
                    name: "node".into(),
                    points: vec![(1.0, 10.0), (10.0, 12.0)],
                },
                Series {
                    name: "sidecar".into(),
                    points: vec![(1.0, 10.0), (10.0, 100.0)],
                },
            ],
        );
        assert_eq!(svg.matches("<polyline").count(), 2);
        assert_eq!(svg.matches("<circle").count(), 4);
        assert!(svg.contains("sidecar / node: 10×"));
    }
}
