//! Server-side SVG charts: no front-end build, readable at a glance on a laptop screen.
//!
//! The trend chart plots a metric over commits in git order (one slot per point, so a long
//! quiet stretch does not squash the interesting ones), draws contract thresholds as
//! dashed lines, marks failing points in red, shades the tok/s spread, and separates
//! segments where the device, fixture or contract changed. The layer chart plots
//! `1 − cosine` and rel-L2 per layer and capture point on log axes (cosines near 1 are
//! unreadable on a linear axis) and highlights the first layer outside its gate.

use std::fmt::Write as _;

use super::views::{RunSeriesBlock, Trend, capture_rank, num, short};

const W: f64 = 960.0;
const H: f64 = 320.0;
const LEFT: f64 = 80.0;
const RIGHT: f64 = 20.0;
const TOP: f64 = 20.0;
const BOTTOM: f64 = 50.0;

/// Escapes text for SVG/XML.
pub fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// A linear map from `[lo, hi]` onto `[a, b]`.
fn scale(x: f64, lo: f64, hi: f64, a: f64, b: f64) -> f64 {
    if hi > lo { a + (x - lo) / (hi - lo) * (b - a) } else { (a + b) / 2.0 }
}

/// `[lo, hi]` of the finite values, padded by 5 %.
fn bounds(values: impl Iterator<Item = f64>) -> Option<(f64, f64)> {
    let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
    for v in values.filter(|v| v.is_finite()) {
        lo = lo.min(v);
        hi = hi.max(v);
    }
    if !lo.is_finite() {
        return None;
    }
    let pad = if hi > lo { (hi - lo) * 0.05 } else { lo.abs().max(1e-12) * 0.05 };
    Some((lo - pad, hi + pad))
}

fn y_axis(svg: &mut String, lo: f64, hi: f64, x0: f64, x1: f64, label: impl Fn(f64) -> String) {
    for i in 0..=4 {
        let v = lo + (hi - lo) * f64::from(i) / 4.0;
        let y = scale(v, lo, hi, H - BOTTOM, TOP);
        let _ = write!(
            svg,
            r##"<line x1="{x0}" y1="{y:.1}" x2="{x1}" y2="{y:.1}" stroke="#e3e3e3"/><text x="{:.1}" y="{:.1}" text-anchor="end" class="tick">{}</text>"##,
            x0 - 6.0,
            y + 4.0,
            esc(&label(v))
        );
    }
}

/// The trend chart of a metric over commits.
pub fn trend(t: &Trend) -> String {
    let mut svg = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {W} {H}" class="chart" role="img" aria-label="{} {} over commits">"#,
        esc(&t.metric),
        esc(&t.statistic)
    );
    let values = t
        .points
        .iter()
        .flat_map(|p| [Some(p.value), p.low, p.high])
        .flatten()
        .chain(t.gates.iter().map(|g| g.threshold));
    let Some((lo, hi)) = bounds(values) else {
        svg.push_str(r#"<text x="480" y="160" text-anchor="middle" class="empty">no points yet</text></svg>"#);
        return svg;
    };
    let n = t.points.len().max(1);
    let x = |i: usize| {
        if n == 1 { (LEFT + W - RIGHT) / 2.0 } else { scale(i as f64, 0.0, (n - 1) as f64, LEFT, W - RIGHT) }
    };
    let y = |v: f64| scale(v, lo, hi, H - BOTTOM, TOP);
    y_axis(&mut svg, lo, hi, LEFT, W - RIGHT, num);

    // segment boundaries
    for (i, w) in t.points.windows(2).enumerate() {
        if w[0].segment != w[1].segment {
            let xb = (x(i) + x(i + 1)) / 2.0;
            let what = t.segments[w[1].segment].change.clone().unwrap_or_default();
            let _ = write!(
                svg,
                r##"<line x1="{xb:.1}" y1="{TOP}" x2="{xb:.1}" y2="{:.1}" stroke="#7a5cff" stroke-dasharray="6 4"/><text x="{:.1}" y="{:.1}" class="seg">new {}</text>"##,
                H - BOTTOM,
                xb + 4.0,
                TOP + 12.0,
                esc(&what)
            );
        }
    }
    // spread band
    let band: Vec<(usize, f64, f64)> =
        t.points.iter().enumerate().filter_map(|(i, p)| Some((i, p.low?, p.high?))).collect();
    if band.len() > 1 {
        let mut pts: Vec<String> = band.iter().map(|(i, _, h)| format!("{:.1},{:.1}", x(*i), y(*h))).collect();
        pts.extend(band.iter().rev().map(|(i, l, _)| format!("{:.1},{:.1}", x(*i), y(*l))));
        let _ =
            write!(svg, r##"<polygon points="{}" fill="#1f6feb" fill-opacity="0.15" stroke="none"/>"##, pts.join(" "));
    }
    // thresholds
    for g in &t.gates {
        let yg = y(g.threshold);
        let colour = if g.severity == "error" { "#d73a49" } else { "#e36209" };
        let _ = write!(
            svg,
            r##"<line x1="{LEFT}" y1="{yg:.1}" x2="{:.1}" y2="{yg:.1}" stroke="{colour}" stroke-width="1.5" stroke-dasharray="8 4"/><text x="{:.1}" y="{:.1}" text-anchor="end" class="gate" fill="{colour}">{} {} {}</text>"##,
            W - RIGHT,
            W - RIGHT - 4.0,
            yg - 5.0,
            esc(&g.gate_id),
            esc(&g.comparison),
            num(g.threshold)
        );
    }
    // the line, broken at NaN and at segment boundaries
    let mut path = String::new();
    let mut pen_up = true;
    let mut prev_seg = usize::MAX;
    for (i, p) in t.points.iter().enumerate() {
        if !p.value.is_finite() {
            pen_up = true;
            continue;
        }
        let cmd = if pen_up || p.segment != prev_seg { 'M' } else { 'L' };
        let _ = write!(path, "{cmd}{:.1},{:.1} ", x(i), y(p.value));
        pen_up = false;
        prev_seg = p.segment;
    }
    let _ = write!(svg, r##"<path d="{path}" fill="none" stroke="#1f6feb" stroke-width="2"/>"##);
    // points: failing ones red and larger, NaN as a cross on the axis
    let r = if n > 200 { 1.5 } else { 3.5 };
    for (i, p) in t.points.iter().enumerate() {
        let title = format!("{} (gen {}): {}", short(&p.commit), p.generation, num(p.value));
        let _ = write!(svg, r#"<a href="/runs/{}"><title>{}</title>"#, p.run_id, esc(&title));
        if p.value.is_finite() {
            let (fill, rad) = if p.failed { ("#d73a49", r + 2.0) } else { ("#1f6feb", r) };
            let cls = if p.failed { "pt failed" } else { "pt" };
            let _ = write!(
                svg,
                r#"<circle cx="{:.1}" cy="{:.1}" r="{rad}" fill="{fill}" class="{cls}"/>"#,
                x(i),
                y(p.value)
            );
        } else {
            let (cx, cy) = (x(i), H - BOTTOM);
            let _ = write!(
                svg,
                r##"<path d="M{:.1},{:.1}L{:.1},{:.1}M{:.1},{:.1}L{:.1},{:.1}" stroke="#d73a49" stroke-width="2" class="pt failed nan"/>"##,
                cx - 4.0,
                cy - 4.0,
                cx + 4.0,
                cy + 4.0,
                cx - 4.0,
                cy + 4.0,
                cx + 4.0,
                cy - 4.0
            );
        }
        svg.push_str("</a>");
    }
    // x labels: about 8 commits
    let step = n.div_ceil(8).max(1);
    for (i, p) in t.points.iter().enumerate().filter(|(i, _)| i % step == 0 || *i == n - 1) {
        let anchor = if n > 1 && i == n - 1 {
            "end"
        } else if n > 1 && i == 0 {
            "start"
        } else {
            "middle"
        };
        let _ = write!(
            svg,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="{anchor}" class="tick">{}</text><text x="{:.1}" y="{:.1}" text-anchor="{anchor}" class="tick sub">gen {}</text>"#,
            x(i),
            H - BOTTOM + 16.0,
            esc(&p.commit[..p.commit.len().min(7)]),
            x(i),
            H - BOTTOM + 30.0,
            p.generation
        );
    }
    svg.push_str("</svg>");
    svg
}

const PALETTE: &[&str] = &["#1f6feb", "#2da44e", "#bf8700", "#8250df", "#cf222e", "#0a7a7a", "#6e7781", "#d4a72c"];

/// `1 − cosine` and rel-L2 per layer and capture point, log axes, two panels.
pub fn layers(b: &RunSeriesBlock) -> String {
    let (pw, ph) = (470.0, 280.0);
    let mut svg = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {} {ph}" class="chart layers" role="img" aria-label="per-layer divergence of {} vs {}">"#,
        2.0 * pw + 20.0,
        esc(&b.model),
        esc(&b.reference)
    );
    if b.layers.is_empty() {
        svg.push_str(r#"<text x="480" y="140" text-anchor="middle" class="empty">no per-layer captures</text></svg>"#);
        return svg;
    }
    let mut captures: Vec<&str> = b.layers.iter().map(|l| l.capture.as_str()).collect();
    captures.sort_by_key(|c| capture_rank(c));
    captures.dedup();
    let max_layer = b.layers.iter().map(|l| l.layer).max().unwrap_or(0).max(1) as f64;
    let panels: [(&str, f64, Box<dyn Fn(&crate::store::LayerParity) -> f64>, Option<f64>); 2] = [
        ("1 − cosine", 0.0, Box::new(|l| 1.0 - l.cosine), b.layer_cosine_gate.map(|g| 1.0 - g)),
        ("rel-L2", pw + 20.0, Box::new(|l| l.rel_l2), None),
    ];
    let (l, r, t, bt) = (60.0, 10.0, 24.0, 36.0);
    for (title, ox, f, gate) in panels.iter() {
        let logv = |v: f64| v.max(1e-12).log10();
        let vals = b.layers.iter().map(|x| logv(f(x))).chain(gate.map(logv));
        let (lo, hi) = bounds(vals).unwrap_or((-12.0, 0.0));
        let (lo, hi) = (lo.floor(), hi.ceil().max(lo.floor() + 1.0));
        let x = |layer: f64| ox + scale(layer, 0.0, max_layer, l, pw - r);
        let y = |v: f64| scale(logv(v), lo, hi, ph - bt, t);
        let _ = write!(svg, r#"<text x="{:.1}" y="14" class="ptitle">{}</text>"#, ox + l, esc(title));
        let mut e = lo as i32;
        while f64::from(e) <= hi {
            let yy = scale(f64::from(e), lo, hi, ph - bt, t);
            let _ = write!(
                svg,
                r##"<line x1="{:.1}" y1="{yy:.1}" x2="{:.1}" y2="{yy:.1}" stroke="#e3e3e3"/><text x="{:.1}" y="{:.1}" text-anchor="end" class="tick">1e{e}</text>"##,
                ox + l,
                ox + pw - r,
                ox + l - 4.0,
                yy + 4.0
            );
            e += 1;
        }
        for layer in 0..=max_layer as i64 {
            let _ = write!(
                svg,
                r#"<text x="{:.1}" y="{:.1}" text-anchor="middle" class="tick">{layer}</text>"#,
                x(layer as f64),
                ph - bt + 14.0
            );
        }
        let _ = write!(svg, r#"<text x="{:.1}" y="{:.1}" class="tick">layer</text>"#, ox + pw - r - 30.0, ph - 4.0);
        if let Some(m) = &b.first_below_gate {
            let xm = x(m.layer as f64);
            let _ = write!(
                svg,
                r##"<rect x="{:.1}" y="{t}" width="12" height="{:.1}" fill="#d73a49" fill-opacity="0.18" class="first-below-gate"><title>first layer outside its gate: {} layer {} ({})</title></rect>"##,
                xm - 6.0,
                ph - bt - t,
                esc(&m.capture),
                m.layer,
                esc(&m.gate)
            );
        }
        if let Some(g) = gate {
            let yg = y(*g);
            let _ = write!(
                svg,
                r##"<line x1="{:.1}" y1="{yg:.1}" x2="{:.1}" y2="{yg:.1}" stroke="#d73a49" stroke-dasharray="6 4"/><text x="{:.1}" y="{:.1}" text-anchor="end" class="gate" fill="#d73a49">gate</text>"##,
                ox + l,
                ox + pw - r,
                ox + pw - r,
                yg - 4.0
            );
        }
        for (ci, c) in captures.iter().enumerate() {
            let colour = PALETTE[ci % PALETTE.len()];
            let mut pts: Vec<(f64, f64, &crate::store::LayerParity)> =
                b.layers.iter().filter(|p| p.capture == *c).map(|p| (x(p.layer as f64), y(f(p)), p)).collect();
            pts.sort_by(|a, b| a.0.total_cmp(&b.0));
            let d: String = pts
                .iter()
                .enumerate()
                .map(|(i, (px, py, _))| format!("{}{px:.1},{py:.1}", if i == 0 { 'M' } else { 'L' }))
                .collect();
            let _ = write!(svg, r#"<path d="{d}" fill="none" stroke="{colour}" stroke-width="1.5"/>"#);
            for (px, py, p) in &pts {
                let _ = write!(
                    svg,
                    r#"<circle cx="{px:.1}" cy="{py:.1}" r="2.5" fill="{colour}"><title>{} layer {}: cosine {}, rel-L2 {}</title></circle>"#,
                    esc(c),
                    p.layer,
                    num(p.cosine),
                    num(p.rel_l2)
                );
            }
            if *ox == 0.0 {
                let _ = write!(
                    svg,
                    r#"<text x="{:.1}" y="{:.1}" class="legend" fill="{colour}">{}</text>"#,
                    l + 8.0 + (ci as f64 % 4.0) * 100.0,
                    t + 12.0 + (ci / 4) as f64 * 12.0,
                    esc(c)
                );
            }
        }
    }
    svg.push_str("</svg>");
    svg
}
