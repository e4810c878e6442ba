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

/// One request in a [`timeline`]: when it started and how long it took.
#[derive(Debug, Clone, Copy)]
pub struct Dot {
    /// Start, in milliseconds on the chart's time axis.
    pub x_ms: f64,
    /// Latency, in milliseconds.
    pub y_ms: f64,
    /// Whether it failed (drawn as a red cross).
    pub failed: bool,
}

/// A count over time in a [`timeline`]: each value holds until the next.
#[derive(Debug, Clone)]
pub struct Steps {
    /// Legend.
    pub label: String,
    /// Line colour (CSS).
    pub color: &'static str,
    /// `(time in ms, value)`, in time order.
    pub points: Vec<(f64, f64)>,
}

/// A labelled vertical line across a [`timeline`].
#[derive(Debug, Clone)]
pub struct Marker {
    /// Time, in milliseconds.
    pub x_ms: f64,
    /// Label.
    pub label: String,
}

/// A "nice" tick step (1, 2 or 5 × 10^k) for about `n` ticks over `span`.
fn nice_step(span: f64, n: f64) -> f64 {
    let raw = (span / n).max(1e-9);
    let mag = 10f64.powf(raw.log10().floor());
    let f = raw / mag;
    mag * if f <= 1.0 {
        1.0
    } else if f <= 2.0 {
        2.0
    } else if f <= 5.0 {
        5.0
    } else {
        10.0
    }
}

/// Request latency over time (one dot per request, log scale) above step
/// lines of counts (e.g. old and new replicas) on the same time axis, with
/// vertical markers across both.
pub fn timeline(
    title: &str,
    subtitle: &str,
    dots: &[Dot],
    steps: &[Steps],
    markers: &[Marker],
) -> String {
    let (left, right) = (80.0, 30.0);
    let (lat_top, lat_h) = (90.0, 260.0);
    let (cnt_top, cnt_h) = (lat_top + lat_h + 40.0, 150.0);
    let h = cnt_top + cnt_h + 70.0;
    let xs = dots
        .iter()
        .map(|d| d.x_ms)
        .chain(steps.iter().flat_map(|s| s.points.iter().map(|p| p.0)))
        .chain(markers.iter().map(|m| m.x_ms));
    let (x0, x1) = xs.fold((f64::MAX, f64::MIN), |(a, b), v| (a.min(v), b.max(v)));
    let (x0, x1) = if x0 < x1 { (x0, x1) } else { (0.0, 1.0) };
    let x = |v: f64| left + (v - x0) / (x1 - x0) * (W - left - right);
    let (y0, y1) = dots.iter().fold((f64::MAX, f64::MIN), |(a, b), d| {
        (a.min(d.y_ms), b.max(d.y_ms))
    });
    let (y0, y1) = if y0 <= y1 { (y0, y1) } else { (0.1, 10.0) };
    let d0 = y0.max(1e-3).log10().floor();
    let d1 = y1.max(1e-3).log10().ceil().max(d0 + 1.0);
    let y = |v: f64| lat_top + lat_h - (v.max(1e-3).log10() - d0) / (d1 - d0) * lat_h;
    let cmax = steps
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.1))
        .fold(1.0, f64::max);
    let cy = |v: f64| cnt_top + cnt_h - v / cmax * cnt_h;
    let mut out = String::new();
    header(&mut out, h, title, subtitle);
    // Latency panel: decades.
    let mut d = d0;
    while d <= d1 {
        let v = 10f64.powf(d);
        let _ = writeln!(
            out,
            r##"<line x1="{left}" y1="{0:.1}" x2="{1:.1}" y2="{0:.1}" stroke="#ddd"/><text x="{2:.1}" y="{3:.1}" text-anchor="end" fill="#555">{4}</text>"##,
            y(v),
            W - right,
            left - 6.0,
            y(v) + 4.0,
            fmt_ms(v)
        );
        d += 1.0;
    }
    let _ = writeln!(
        out,
        r##"<text x="{left}" y="{:.1}" font-weight="bold">request latency (log scale), one dot per request by its start; red: failed</text>"##,
        lat_top - 12.0
    );
    // Count panel: a few integer ticks.
    let step = nice_step(cmax, 4.0).max(1.0);
    let mut v = 0.0;
    while v <= cmax + 1e-9 {
        let _ = writeln!(
            out,
            r##"<line x1="{left}" y1="{0:.1}" x2="{1:.1}" y2="{0:.1}" stroke="#ddd"/><text x="{2:.1}" y="{3:.1}" text-anchor="end" fill="#555">{v}</text>"##,
            cy(v),
            W - right,
            left - 6.0,
            cy(v) + 4.0
        );
        v += step;
    }
    let mut lx = left;
    let _ = writeln!(
        out,
        r##"<text x="{left}" y="{:.1}" font-weight="bold">replicas</text>"##,
        cnt_top - 12.0
    );
    lx += 80.0;
    for s in steps {
        let _ = writeln!(
            out,
            r##"<rect x="{lx:.1}" y="{:.1}" width="14" height="4" fill="{}"/><text x="{:.1}" y="{:.1}">{}</text>"##,
            cnt_top - 18.0,
            s.color,
            lx + 18.0,
            cnt_top - 12.0,
            esc(&s.label)
        );
        lx += 30.0 + 7.5 * s.label.len() as f64;
    }
    // Time axis.
    let axis_y = cnt_top + cnt_h;
    let tstep = nice_step(x1 - x0, 8.0);
    let mut t = (x0 / tstep).ceil() * tstep;
    while t <= x1 + 1e-9 {
        let xv = x(t);
        let _ = writeln!(
            out,
            r##"<line x1="{xv:.1}" y1="{lat_top}" x2="{xv:.1}" y2="{axis_y}" stroke="#f0f0f0"/><text x="{xv:.1}" y="{:.1}" text-anchor="middle" fill="#555">{}</text>"##,
            axis_y + 18.0,
            t.round()
        );
        t += tstep;
    }
    let _ = writeln!(
        out,
        r##"<text x="{:.1}" y="{:.1}" text-anchor="middle" fill="#555">milliseconds since the call</text>"##,
        left + (W - left - right) / 2.0,
        axis_y + 40.0
    );
    for m in markers {
        let xv = x(m.x_ms);
        let _ = writeln!(
            out,
            r##"<line x1="{xv:.1}" y1="{lat_top}" x2="{xv:.1}" y2="{axis_y}" stroke="#444" stroke-dasharray="4 3"/><text x="{:.1}" y="{:.1}" font-size="11" text-anchor="end" transform="rotate(-90 {0:.1} {1:.1})">{}</text>"##,
            xv - 3.0,
            lat_top + 4.0,
            esc(&m.label)
        )
        .map(|_| ());
    }
    for dot in dots {
        let (px, py) = (x(dot.x_ms), y(dot.y_ms));
        if dot.failed {
            let _ = writeln!(
                out,
                r##"<path d="M{0:.1} {1:.1}l6 6m0 -6l-6 6" stroke="#c0392b" stroke-width="2"/>"##,
                px - 3.0,
                py - 3.0
            );
        } else {
            let _ = writeln!(
                out,
                r##"<circle cx="{px:.1}" cy="{py:.1}" r="2" fill="#2471a3" fill-opacity="0.4"/>"##
            );
        }
    }
    for s in steps {
        let mut d = String::new();
        let mut last: Option<f64> = None;
        for &(t, v) in &s.points {
            match last {
                None => {
                    let _ = write!(d, "M{:.1} {:.1}", x(t), cy(v));
                }
                Some(_) => {
                    let _ = write!(d, " H{:.1} V{:.1}", x(t), cy(v));
                }
            }
            last = Some(v);
        }
        if last.is_some() {
            let _ = write!(d, " H{:.1}", x(x1));
        }
        let _ = writeln!(
            out,
            r##"<path d="{d}" fill="none" stroke="{}" stroke-width="2.5"/>"##,
            s.color
        );
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

    #[test]
    fn timeline_is_well_formed() {
        let t = timeline(
            "deploy",
            "s",
            &[
                Dot {
                    x_ms: -10.0,
                    y_ms: 0.5,
                    failed: false,
                },
                Dot {
                    x_ms: 40.0,
                    y_ms: 3.0,
                    failed: true,
                },
            ],
            &[Steps {
                label: "old".into(),
                color: "#c33",
                points: vec![(-10.0, 8.0), (20.0, 4.0), (35.0, 0.0)],
            }],
            &[Marker {
                x_ms: 20.0,
                label: "cutover".into(),
            }],
        );
        assert!(t.starts_with("<svg") && t.trim_end().ends_with("</svg>"));
        assert_eq!(t.matches("<circle").count(), 1);
        assert!(t.contains("stroke=\"#c0392b\""));
        assert!(t.contains(">cutover<"));
        assert_eq!(nice_step(100.0, 8.0), 20.0);
    }
}
