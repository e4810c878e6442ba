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

/// The charts' width unless a title needs more.
const W: f64 = 900.0;
/// Where plots start unless a row label needs more room.
const LEFT: f64 = 230.0;
const RIGHT: f64 = 40.0;
/// Room kept between any text and the chart's right edge.
const EDGE: f64 = 10.0;

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// A conservative width of `s` drawn at `size` px: per-character advances
/// at least those of DejaVu Sans, the wide sans-serif that renderers (rsvg,
/// browsers on Linux) fall back to when Helvetica and Arial are missing,
/// and which is wider than both; bold 10 % wider still. Layout uses it so
/// that no text runs past the edge, whatever font draws it.
pub fn text_width(s: &str, size: f64, bold: bool) -> f64 {
    let em: f64 = s
        .chars()
        .map(|c| match c {
            ' ' | 'i' | 'l' | 'j' | 'I' | '.' | ',' | ':' | ';' | '\'' | '|' | '!' | '(' | ')'
            | '[' | ']' | 'f' | 't' | 'r' => 0.45,
            'm' | 'w' | 'M' | 'W' | '@' | '%' | '&' => 1.0,
            '=' | '+' | '<' | '>' | '~' | '#' => 0.85,
            '0'..='9' => 0.66,
            'A'..='Z' => 0.8,
            c if c.is_ascii() => 0.64,
            _ => 1.0,
        })
        .sum();
    em * size * if bold { 1.1 } else { 1.0 }
}

/// The chart's width: [`W`], or more if its title or subtitle needs it.
fn canvas_width(title: &str, subtitle: &str) -> f64 {
    W.max(20.0 + text_width(title, 17.0, true) + EDGE)
        .max(20.0 + text_width(subtitle, 13.0, false) + EDGE)
        .ceil()
}

fn header(out: &mut String, w: f64, h: f64, title: &str, subtitle: &str) {
    let _ = write!(
        out,
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="Helvetica, Arial, sans-serif" font-size="13">
<rect width="100%" height="100%" fill="#ffffff"/>
<text x="20" y="28" font-size="17" font-weight="bold">{}</text>
<text x="20" y="48" fill="#555">{}</text>
"##,
        esc(title),
        esc(subtitle)
    );
}

/// Where plots start: [`LEFT`], or further right if a row label (drawn
/// right-aligned 12 px before it) needs it.
fn left_margin<'a>(labels: impl Iterator<Item = &'a str>) -> f64 {
    labels
        .map(|l| 20.0 + text_width(l, 13.0, false) + 12.0)
        .fold(LEFT, f64::max)
        .ceil()
}

/// The widest a plot starting at `left` may be on a chart `w` wide, so
/// that each label in `labels` — `(fraction of the plot's width where it
/// is anchored, gap after that point, its width)` — ends [`EDGE`] before
/// the right edge; at most `default`.
fn plot_width(w: f64, left: f64, default: f64, labels: &[(f64, f64, f64)]) -> f64 {
    labels
        .iter()
        .filter(|(f, ..)| *f > 0.0)
        .map(|&(f, gap, tw)| (w - EDGE - left - gap - tw) / f)
        .fold(default, f64::min)
        .max(10.0)
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

/// The label beside a series' median.
fn p50_label(s: &Series) -> String {
    format!("p50 {} (n={})", fmt_ms(median(&s.ms)), s.ms.len())
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
    let frac = |v: f64| (v.max(1e-3).log10() - d0) / (d1 - d0);
    let w = canvas_width(title, subtitle);
    let left = left_margin(series.iter().map(|s| s.label.as_str()));
    // The medians' labels start 6 px right of their line; the last tick's
    // label is centred on it.
    let mut labels: Vec<(f64, f64, f64)> = series
        .iter()
        .filter(|s| !s.ms.is_empty())
        .map(|s| {
            (
                frac(median(&s.ms)),
                6.0,
                text_width(&p50_label(s), 12.0, false),
            )
        })
        .collect();
    labels.push((
        1.0,
        0.0,
        text_width(&fmt_ms(10f64.powf(d1)), 13.0, false) / 2.0,
    ));
    let plot = plot_width(w, left, w - left - RIGHT, &labels);
    let x = |v: f64| left + frac(v) * plot;
    let mut out = String::new();
    header(&mut out, w, h, title, subtitle);
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
        left + plot / 2.0,
        axis_y + 40.0
    );
    for (i, s) in series.iter().enumerate() {
        let cy = top + row * i as f64 + row / 2.0;
        let _ = writeln!(
            out,
            r##"<text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"##,
            left - 12.0,
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
            r##"<line x1="{0:.1}" y1="{1:.1}" x2="{0:.1}" y2="{2:.1}" stroke="#000" stroke-width="2"/><text x="{3:.1}" y="{4:.1}" font-size="12">{5}</text>"##,
            x(m),
            cy - row * 0.35,
            cy + row * 0.35,
            x(m) + 6.0,
            cy - row * 0.22,
            esc(&p50_label(s))
        );
    }
    out.push_str("</svg>\n");
    out
}

/// What [`distribution`] drew, read back from its SVG: title, subtitle
/// and each series with its samples (from the dots' positions on the log
/// axis, to the 0.1 px the file keeps: about 0.1 % of a sample; the median
/// sample as its label shows it). Lets a
/// chart be drawn again with a new layout without running its benchmark
/// again (`cargo bench --bench startup -- --chart docs/img --redraw`).
pub fn read_distribution(svg: &str) -> Option<(String, String, Vec<Series>)> {
    fn attr<'a>(tag: &'a str, name: &str) -> Option<&'a str> {
        let at = tag.find(&format!(" {name}=\""))? + name.len() + 3;
        tag[at..].split('"').next()
    }
    fn unesc(s: &str) -> String {
        s.replace("&lt;", "<")
            .replace("&gt;", ">")
            .replace("&amp;", "&")
    }
    let mut texts = Vec::new();
    let mut ticks: Vec<(f64, f64)> = Vec::new();
    // Label, colour, dots' x, the median as labelled.
    type Read = (String, Option<String>, Vec<f64>, Option<f64>);
    let mut series: Vec<Read> = Vec::new();
    for line in svg.lines() {
        for piece in line.split('<').skip(1) {
            let (tag, content) = piece.split_once('>').unwrap_or((piece, ""));
            if tag.starts_with("text ") {
                texts.push(unesc(content));
                let anchor = attr(tag, "text-anchor");
                if anchor == Some("middle") {
                    let x: f64 = attr(tag, "x")?.parse().ok()?;
                    let ms = content.strip_suffix(" ms").and_then(|v| v.parse().ok());
                    if let Some(ms) = ms {
                        ticks.push((x, ms));
                    }
                } else if anchor == Some("end") {
                    series.push((unesc(content), None, Vec::new(), None));
                } else if let Some(p50) = content.strip_prefix("p50 ") {
                    let v = p50.split_once(" ms").and_then(|(v, _)| v.parse().ok());
                    series.last_mut()?.3 = v;
                }
            } else if tag.starts_with("circle ") {
                let s = series.last_mut()?;
                s.1 = attr(tag, "fill").map(str::to_owned);
                s.2.push(attr(tag, "cx")?.parse().ok()?);
            }
        }
    }
    let (&(x0, v0), &(x1, v1)) = (ticks.first()?, ticks.last()?);
    if x1 <= x0 {
        return None;
    }
    let ms = |x: f64| 10f64.powf(v0.log10() + (x - x0) / (x1 - x0) * (v1.log10() - v0.log10()));
    let series = series
        .into_iter()
        .map(|(label, color, xs, p50)| {
            let mut samples: Vec<f64> = xs.into_iter().map(ms).collect();
            // The median sample takes the value its label shows, so that
            // the label reads the same when drawn again.
            if let Some(p50) = p50.filter(|_| !samples.is_empty()) {
                let mut order: Vec<usize> = (0..samples.len()).collect();
                order.sort_by(|&a, &b| samples[a].total_cmp(&samples[b]));
                samples[order[(order.len() - 1) / 2]] = p50;
            }
            Series {
                label,
                // A chart has a handful of colours; redrawing it leaks them.
                color: Box::leak(color.unwrap_or_else(|| "#888".into()).into_boxed_str()),
                ms: samples,
            }
        })
        .collect();
    Some((texts.first()?.clone(), texts.get(1)?.clone(), series))
}

/// Draws a panel of bars from `top` on a chart `w` wide whose plots start
/// at `left`; returns where the next panel starts.
fn bars_panel(
    out: &mut String,
    (w, left): (f64, f64),
    top: f64,
    (heading, unit, bars): (&str, &str, &[Bar]),
) -> f64 {
    let bh = 30.0;
    let _ = writeln!(
        out,
        r##"<text x="20" y="{:.1}" font-weight="bold">{}</text>"##,
        top + 14.0,
        esc(heading)
    );
    let max = bars.iter().map(|b| b.value).fold(0.0, f64::max).max(1e-9);
    let value = |b: &Bar| format!("{} {unit}", fmt_num(b.value));
    // Each value is written 8 px right of its bar's end.
    let labels: Vec<(f64, f64, f64)> = bars
        .iter()
        .map(|b| (b.value / max, 8.0, text_width(&value(b), 13.0, false)))
        .collect();
    let span = plot_width(w, left, w - left - RIGHT - 130.0, &labels);
    for (i, b) in bars.iter().enumerate() {
        let y = top + 26.0 + i as f64 * (bh + 8.0);
        let bw = (b.value / max * span).max(1.5);
        let _ = writeln!(
            out,
            r##"<text x="{:.1}" y="{:.1}" text-anchor="end">{}</text><rect x="{left}" y="{y:.1}" width="{bw:.1}" height="{bh}" fill="{}"/><text x="{:.1}" y="{:.1}">{}</text>"##,
            left - 12.0,
            y + bh / 2.0 + 4.0,
            esc(&b.label),
            b.color,
            left + bw + 8.0,
            y + bh / 2.0 + 4.0,
            esc(&value(b))
        );
    }
    top + 26.0 + bars.len() as f64 * (bh + 8.0) + 16.0
}

/// A value as a bar's label: whole numbers without decimals (counts), else
/// three significant digits or so.
fn fmt_num(v: f64) -> String {
    if v >= 100.0 || v.fract() == 0.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// Panels of horizontal bars on linear scales, one under the other:
/// `(heading, unit, bars)`, then `notes`, one line each, in grey.
pub fn bar_panels(
    title: &str,
    subtitle: &str,
    panels: &[(&str, &str, Vec<Bar>)],
    notes: &[&str],
) -> String {
    let h = 70.0
        + panels
            .iter()
            .map(|(_, _, b)| 42.0 + b.len() as f64 * 38.0)
            .sum::<f64>()
        + 10.0
        + 20.0 * notes.len() as f64;
    let headings = panels
        .iter()
        .map(|(heading, ..)| 20.0 + text_width(heading, 13.0, true) + EDGE)
        .chain(
            notes
                .iter()
                .map(|n| 20.0 + text_width(n, 12.0, false) + EDGE),
        );
    let w = headings
        .fold(canvas_width(title, subtitle), f64::max)
        .ceil();
    let left = left_margin(
        panels
            .iter()
            .flat_map(|(_, _, b)| b.iter().map(|b| b.label.as_str())),
    );
    let mut out = String::new();
    header(&mut out, w, h, title, subtitle);
    let mut top = 70.0;
    for (heading, unit, bars) in panels {
        top = bars_panel(&mut out, (w, left), top, (heading, unit, bars));
    }
    for (i, n) in notes.iter().enumerate() {
        let _ = writeln!(
            out,
            r##"<text x="20" y="{:.1}" font-size="12" fill="#555">{}</text>"##,
            top + 4.0 + 20.0 * i as f64,
            esc(n)
        );
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
    let w = canvas_width(title, subtitle);
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
    let x = |v: f64| left + (v - x0) / (x1 - x0) * (w - left - right);
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
    header(&mut out, w, h, title, subtitle);
    // Latency panel: decades.
    let mut d = d0;
    while d <= d1 {
        let v = 10f64.powf(d);
        let _ = writeln!(
            out,
            r##"<line x1="{left}" y1="{0:.1}" x2="{1:.1}" y2="{0:.1}" stroke="#ddd"/><text x="{2:.1}" y="{3:.1}" text-anchor="end" fill="#555">{4}</text>"##,
            y(v),
            w - right,
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
            w - right,
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
        left + (w - left - right) / 2.0,
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
            &["memory only"],
        );
        assert!(b.contains(">1 MiB<"), "{b}");
        assert!(b.contains(">memory only<"));
        assert_eq!(fmt_num(91.0), "91");
        assert_eq!(fmt_num(0.271), "0.27");
        assert_eq!(fmt_num(88096.0), "88096");
    }

    /// Every unrotated `<text>` of `svg`: its extent from its anchor, font
    /// size and weight (by [`text_width`]), and the chart's width.
    fn text_extents(svg: &str) -> (f64, Vec<(String, f64, f64)>) {
        let attr = |tag: &str, name: &str| -> Option<String> {
            let at = tag.find(&format!(" {name}=\""))? + name.len() + 3;
            tag[at..].split('"').next().map(str::to_owned)
        };
        let w: f64 = attr(svg.lines().next().unwrap(), "width")
            .unwrap()
            .parse()
            .unwrap();
        let mut out = Vec::new();
        for piece in svg.split("<text").skip(1) {
            let (tag, rest) = piece.split_once('>').unwrap();
            if tag.contains("transform=") {
                continue;
            }
            let content = rest.split("</text>").next().unwrap();
            let content = content
                .replace("&lt;", "<")
                .replace("&gt;", ">")
                .replace("&amp;", "&");
            let x: f64 = attr(tag, "x").unwrap().parse().unwrap();
            let size: f64 = attr(tag, "font-size").map_or(13.0, |s| s.parse().unwrap());
            let bold = attr(tag, "font-weight").is_some_and(|b| b == "bold");
            let tw = text_width(&content, size, bold);
            let (a, b) = match attr(tag, "text-anchor").as_deref() {
                Some("end") => (x - tw, x),
                Some("middle") => (x - tw / 2.0, x + tw / 2.0),
                _ => (x, x + tw),
            };
            out.push((content, a, b));
        }
        (w, out)
    }

    fn assert_no_text_clipped(svg: &str) {
        let (w, texts) = text_extents(svg);
        assert!(!texts.is_empty());
        for (t, a, b) in texts {
            assert!(
                a >= 0.0 && b <= w - EDGE + 0.05,
                "`{t}` spans {a:.1}..{b:.1} of {w}"
            );
        }
    }

    #[test]
    fn no_text_runs_past_the_edges() {
        // The start-up chart's data: a median near the right end whose
        // label used to run off the chart ("p50 734 m…").
        let series = |label: &str, ms: Vec<f64>| Series {
            label: label.into(),
            ms,
            color: "#c33",
        };
        let d = distribution(
            "Module start-up: cold process vs warm launch (greeter, 200 MiB catalog plugin), a long title",
            "AMD EPYC, 2 CPUs, 23.5 GiB RAM, Linux 6.18.44-fc-v1272",
            &[
                series("cold start (greeter)", vec![734.0, 990.0, 700.0]),
                series("a row label much longer than the default margin", vec![2.5, 3.1]),
                series("limit", vec![1.6, 1.9]),
            ],
        );
        assert_no_text_clipped(&d);
        let bar = |label: &str, value: f64| Bar {
            label: label.into(),
            value,
            color: "#36c",
        };
        let b = bar_panels(
            "Memory per module: Ember vs a process each (256 MiB plugin, 1000 modules)",
            "AMD EPYC, 2 CPUs, 23.5 GiB RAM, Linux 6.18.44-fc-v1272",
            &[
                (
                    "host memory per module (MiB, lower is better)",
                    "MiB",
                    vec![bar("Ember: USS", 0.16), bar("naive: own plugin copy", 256.671)],
                ),
                (
                    "modules whose memory fits in 24 GiB (higher is better)",
                    "modules",
                    vec![bar("Ember", 88096.0), bar("naive", 93.0)],
                ),
            ],
            &["a note as long as the one the density chart carries, about what it counts and what it does not count at all"],
        );
        assert_no_text_clipped(&b);
        // The widest bar is no wider for being labelled.
        assert!(b.contains(">88096 modules<"));
    }

    #[test]
    fn a_distribution_reads_back_as_drawn() {
        let series = vec![
            Series {
                label: "cold & slow".into(),
                ms: vec![700.0, 734.0, 760.0],
                color: "#c0392b",
            },
            Series {
                label: "warm".into(),
                ms: vec![2.5, 2.6, 15.0],
                color: "#2980b9",
            },
        ];
        let svg = distribution("title", "machine", &series);
        let (title, subtitle, back) = read_distribution(&svg).unwrap();
        assert_eq!((title.as_str(), subtitle.as_str()), ("title", "machine"));
        assert_eq!(back.len(), 2);
        for (a, b) in series.iter().zip(&back) {
            assert_eq!((&a.label, a.color), (&b.label, b.color));
            for (x, y) in a.ms.iter().zip(&b.ms) {
                assert!((x / y - 1.0).abs() < 0.005, "{x} read back as {y}");
            }
        }
        // Drawn again, the same chart, labels included (a dot may move by
        // 0.1 px).
        let again = distribution(&title, &subtitle, &back);
        let texts = |svg: &str| text_extents(svg).1;
        assert_eq!(texts(&again), texts(&svg));
        assert_eq!(
            again.matches("<circle").count(),
            svg.matches("<circle").count()
        );
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
