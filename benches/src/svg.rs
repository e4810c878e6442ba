//! Hand-written SVG charts for the benchmark results: no plotting
//! dependency, deterministic output.

use std::fmt::Write;

/// One row of a distribution chart.
#[derive(Debug, Clone)]
pub struct Series {
    /// Row label.
    pub label: String,
    /// Samples, in milliseconds.
    pub ms: Vec<f64>,
    /// Fill colour (CSS).
    pub color: &'static str,
}

/// One bar.
#[derive(Debug, Clone)]
pub struct Bar {
    /// Label.
    pub label: String,
    /// Value.
    pub value: f64,
    /// Fill colour (CSS).
    pub color: &'static str,
}

const W: f64 = 900.0;
const LEFT: f64 = 230.0;
const RIGHT: f64 = 40.0;

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

fn header(out: &mut String, h: f64, title: &str, subtitle: &str) {
    let _ = write!(
        out,
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{h}" viewBox="0 0 {W} {h}" font-family="Helvetica, Arial, sans-serif" font-size="13">
<rect width="100%" height="100%" fill="#ffffff"/>
<text x="20" y="28" font-size="17" font-weight="bold">{}</text>
<text x="20" y="48" fill="#555">{}</text>
"##,
        esc(title),
        esc(subtitle)
    );
}

fn fmt_ms(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0} ms")
    } else if v >= 1.0 {
        format!("{v:.2} ms")
    } else {
        format!("{v:.3} ms")
    }
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    s[(s.len() - 1) / 2]
}

/// A strip plot of start-up times on a log scale: one row per series, one
/// dot per sample, the median marked.
pub fn distribution(title: &str, subtitle: &str, series: &[Series]) -> String {
    let row = 56.0;
    let top = 70.0;
    let h = top + row * series.len() as f64 + 60.0;
    let all = series.iter().flat_map(|s| s.ms.iter().copied());
    let (lo, hi) = all.fold((f64::MAX, f64::MIN), |(a, b), v| (a.min(v), b.max(v)));
    let (lo, hi) = if lo > hi { (1.0, 10.0) } else { (lo, hi) };
    let d0 = lo.max(1e-3).log10().floor();
    let d1 = hi.max(1e-3).log10().ceil().max(d0 + 1.0);
    let x = |v: f64| LEFT + (v.max(1e-3).log10() - d0) / (d1 - d0) * (W - LEFT - RIGHT);
    let mut out = String::new();
    header(&mut out, h, title, subtitle);
    let axis_y = top + row * series.len() as f64 + 8.0;
    let mut d = d0;
    while d <= d1 {
        let v = 10f64.powf(d);
        let xv = x(v);
        let _ = writeln!(
            out,
            r##"<line x1="{xv:.1}" y1="{top}" x2="{xv:.1}" y2="{axis_y}" stroke="#ddd"/><text x="{xv:.1}" y="{:.1}" text-anchor="middle" fill="#555">{}</text>"##,
            axis_y + 18.0,
            fmt_ms(v)
        );
        d += 1.0;
    }
    let _ = writeln!(
        out,
        r##"<text x="{:.1}" y="{:.1}" text-anchor="middle" fill="#555">milliseconds (log scale), one dot per sample</text>"##,
        LEFT + (W - LEFT - RIGHT) / 2.0,
        axis_y + 40.0
    );
    for (i, s) in series.iter().enumerate() {
        let cy = top + row * i as f64 + row / 2.0;
        let _ = writeln!(
            out,
            r##"<text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"##,
            LEFT - 12.0,
            cy + 4.0,
            esc(&s.label)
        );
        if s.ms.is_empty() {
            continue;
        }
        for (k, v) in s.ms.iter().enumerate() {
            // Deterministic jitter so overlapping samples stay visible.
            let j = ((k * 7919) % 17) as f64 / 16.0 - 0.5;
            let _ = writeln!(
                out,
                r##"<circle cx="{:.1}" cy="{:.1}" r="3" fill="{}" fill-opacity="0.45"/>"##,
                x(*v),
                cy + j * row * 0.5,
                s.color
            );
        }
        let m = median(&s.ms);
        let _ = writeln!(
            out,
            r##"<line x1="{0:.1}" y1="{1:.1}" x2="{0:.1}" y2="{2:.1}" stroke="#000" stroke-width="2"/><text x="{3:.1}" y="{4:.1}" font-size="12">p50 {5} (n={6})</text>"##,
            x(m),
            cy - row * 0.35,
            cy + row * 0.35,
            x(m) + 6.0,
            cy - row * 0.22,
            fmt_ms(m),
            s.ms.len()
        );
    }
    out.push_str("</svg>\n");
    out
}

fn bars_panel(out: &mut String, top: f64, heading: &str, unit: &str, bars: &[Bar]) -> f64 {
    let bh = 30.0;
    let _ = writeln!(
        out,
        r##"<text x="20" y="{:.1}" font-weight="bold">{}</text>"##,
        top + 14.0,
        esc(heading)
    );
    let max = bars.iter().map(|b| b.value).fold(0.0, f64::max).max(1e-9);
    let span = W - LEFT - RIGHT - 130.0;
    for (i, b) in bars.iter().enumerate() {
        let y = top + 26.0 + i as f64 * (bh + 8.0);
        let w = (b.value / max * span).max(1.5);
        let _ = writeln!(
            out,
            r##"<text x="{:.1}" y="{:.1}" text-anchor="end">{}</text><rect x="{LEFT}" y="{y:.1}" width="{w:.1}" height="{bh}" fill="{}"/><text x="{:.1}" y="{:.1}">{} {}</text>"##,
            LEFT - 12.0,
            y + bh / 2.0 + 4.0,
            esc(&b.label),
            b.color,
            LEFT + w + 8.0,
            y + bh / 2.0 + 4.0,
            fmt_num(b.value),
            esc(unit)
        );
    }
    top + 26.0 + bars.len() as f64 * (bh + 8.0) + 16.0
}

fn fmt_num(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// Panels of horizontal bars on linear scales, one under the other:
/// `(heading, unit, bars)`.
pub fn bar_panels(title: &str, subtitle: &str, panels: &[(&str, &str, Vec<Bar>)]) -> String {
    let h = 70.0
        + panels
            .iter()
            .map(|(_, _, b)| 42.0 + b.len() as f64 * 38.0)
            .sum::<f64>()
        + 10.0;
    let mut out = String::new();
    header(&mut out, h, title, subtitle);
    let mut top = 70.0;
    for (heading, unit, bars) in panels {
        top = bars_panel(&mut out, top, heading, unit, bars);
    }
    out.push_str("</svg>\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn charts_are_well_formed() {
        let d = distribution(
            "t <&>",
            "s",
            &[
                Series {
                    label: "cold".into(),
                    ms: vec![1500.0, 1700.0],
                    color: "#c33",
                },
                Series {
                    label: "warm".into(),
                    ms: vec![0.8, 0.9, 1.2],
                    color: "#36c",
                },
            ],
        );
        assert!(d.starts_with("<svg") && d.trim_end().ends_with("</svg>"));
        assert!(d.contains("t &lt;&amp;&gt;"));
        assert_eq!(d.matches("<circle").count(), 5);
        assert!(d.contains("p50 0.900 ms (n=3)"));
        let b = bar_panels(
            "m",
            "s",
            &[(
                "per module",
                "MiB",
                vec![Bar {
                    label: "ember".into(),
                    value: 1.0,
                    color: "#36c",
                }],
            )],
        );
        assert!(b.contains("1.00 MiB"));
    }
}
