//! Throughput against tasks, as an SVG line chart: one line per implementation, a log scale for
//! calls/s (idem and its baselines differ by orders of magnitude once a cache answers). Written
//! by hand (a few lines of SVG) rather than with a plotting crate, which would add dozens of
//! crates to every build of the benchmarks.

use std::fmt::Write as _;

/// One line: its name and its (tasks, calls/s) points.
pub(crate) struct Series {
    pub(crate) name: String,
    pub(crate) points: Vec<(f64, f64)>,
}

const COLOURS: [&str; 6] = [
    "#d62728", "#ff7f0e", "#1f77b4", "#7f7f7f", "#2ca02c", "#9467bd",
];

/// The chart of `series`, titled `title`; x is tasks (a log scale too: 1, 16, 64).
fn svg(title: &str, series: &[Series]) -> String {
    let (w, h, left, right, top, bottom) = (720.0, 420.0, 80.0, 220.0, 40.0, 50.0);
    let pts = || series.iter().flat_map(|s| s.points.iter());
    let lg = |v: f64| v.max(1e-9).log10();
    let (x0, x1) = bounds(pts().map(|p| lg(p.0)));
    let (y0, y1) = bounds(pts().map(|p| lg(p.1)));
    let (y0, y1) = (y0.floor(), y1.ceil().max(y0.floor() + 1.0));
    let px = |x: f64| left + (lg(x) - x0) / (x1 - x0).max(1e-9) * (w - left - right);
    let py = |y: f64| h - bottom - (lg(y) - y0) / (y1 - y0) * (h - top - bottom);
    let mut out = String::new();
    let _ = write!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = write!(
        out,
        r#"<rect width="{w}" height="{h}" fill="white"/><text x="{left}" y="24" font-size="14">{}</text>"#,
        escape(title)
    );
    // Decades on y, each labelled.
    let mut decade = y0;
    while decade <= y1 {
        let y = py(10f64.powf(decade));
        let _ = write!(
            out,
            r##"<line x1="{left}" x2="{}" y1="{y:.1}" y2="{y:.1}" stroke="#ddd"/><text x="{}" y="{:.1}" text-anchor="end">{}</text>"##,
            w - right,
            left - 6.0,
            y + 4.0,
            human(10f64.powf(decade))
        );
        decade += 1.0;
    }
    let mut xs: Vec<f64> = pts().map(|p| p.0).collect();
    xs.sort_by(f64::total_cmp);
    xs.dedup();
    for x in xs {
        let _ = write!(
            out,
            r#"<text x="{:.1}" y="{}" text-anchor="middle">{x}</text>"#,
            px(x),
            h - bottom + 18.0
        );
    }
    let _ = write!(
        out,
        r#"<text x="{:.1}" y="{}" text-anchor="middle">tasks</text><text x="16" y="{:.1}" transform="rotate(-90 16 {:.1})" text-anchor="middle">calls/s (log)</text>"#,
        (left + w - right) / 2.0,
        h - 12.0,
        h / 2.0,
        h / 2.0
    );
    for (i, s) in series.iter().enumerate() {
        let colour = COLOURS[i % COLOURS.len()];
        let path: Vec<String> = s
            .points
            .iter()
            .map(|&(x, y)| format!("{:.1},{:.1}", px(x), py(y)))
            .collect();
        let _ = write!(
            out,
            r#"<polyline fill="none" stroke="{colour}" stroke-width="2" points="{}"/>"#,
            path.join(" ")
        );
        for &(x, y) in &s.points {
            let _ = write!(
                out,
                r#"<circle cx="{:.1}" cy="{:.1}" r="3" fill="{colour}"/>"#,
                px(x),
                py(y)
            );
        }
        let ly = top + 16.0 + i as f64 * 20.0;
        let _ = write!(
            out,
            r#"<line x1="{}" x2="{}" y1="{ly}" y2="{ly}" stroke="{colour}" stroke-width="2"/><text x="{}" y="{}">{}</text>"#,
            w - right + 12.0,
            w - right + 36.0,
            w - right + 42.0,
            ly + 4.0,
            escape(&s.name)
        );
    }
    out.push_str("</svg>\n");
    out
}

fn bounds(values: impl Iterator<Item = f64>) -> (f64, f64) {
    values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
        (lo.min(v), hi.max(v))
    })
}

fn human(v: f64) -> String {
    match v {
        v if v >= 1e6 => format!("{}M", v / 1e6),
        v if v >= 1e3 => format!("{}k", v / 1e3),
        v => format!("{v}"),
    }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// Write the chart to cargo's temporary directory for benchmarks (`target/tmp/<file>`), and say
/// where.
pub(crate) fn write(file: &str, title: &str, series: &[Series]) {
    let path = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(file);
    match std::fs::write(&path, svg(title, series)) {
        Ok(()) => println!("\nplot: {}", path.display()),
        Err(e) => eprintln!("plot {} not written: {e}", path.display()),
    }
}
