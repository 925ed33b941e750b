//! A small hand-written SVG plot of the merge's progress over time next to the plain-copy
//! reference (a copy of the same bytes progresses from 0 to 100 % in `plain_copy_s`) and,
//! when measured, the scattered-copy reference (the changed blocks copied to their own places,
//! 0 to 100 % in `scattered_copy_s`).

use std::fmt::Write;

const WIDTH: f64 = 640.0;
const HEIGHT: f64 = 360.0;
const LEFT: f64 = 60.0;
const RIGHT: f64 = 20.0;
const TOP: f64 = 40.0;
const BOTTOM: f64 = 50.0;

/// What the plot shows.
pub struct ProgressPlot<'a> {
    /// Title line.
    pub title: &'a str,
    /// Merge samples: (seconds since `initiate_merge`, percent merged).
    pub samples: &'a [(f64, f64)],
    /// Total merge time, s.
    pub merge_s: f64,
    /// Plain-copy time of the same bytes, s.
    pub plain_copy_s: f64,
    /// Scattered-copy time of the changed blocks to their own places, s (NaN: not drawn).
    pub scattered_copy_s: f64,
}

/// A "nice" tick step for a range of `span` (1, 2 or 5 times a power of ten, about 5 ticks).
fn tick_step(span: f64) -> f64 {
    if span <= 0.0 || !span.is_finite() {
        return 1.0;
    }
    let raw = span / 5.0;
    let power = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|m| m * power)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * power);
    step.max(f64::MIN_POSITIVE)
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// The SVG document.
pub fn render(plot: &ProgressPlot<'_>) -> String {
    let finite = |v: f64| if v.is_finite() { v.max(0.0) } else { 0.0 };
    let t_end = plot.samples.iter().map(|s| finite(s.0)).fold(
        finite(plot.merge_s)
            .max(finite(plot.plain_copy_s))
            .max(finite(plot.scattered_copy_s)),
        f64::max,
    );
    let t_max = if t_end > 0.0 { t_end * 1.05 } else { 1.0 };
    let plot_w = WIDTH - LEFT - RIGHT;
    let plot_h = HEIGHT - TOP - BOTTOM;
    let x = |t: f64| LEFT + finite(t) / t_max * plot_w;
    let y = |p: f64| TOP + plot_h - p.clamp(0.0, 100.0) / 100.0 * plot_h;

    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(
        s,
        r#"<rect width="{WIDTH}" height="{HEIGHT}" fill="white"/>"#
    );
    let _ = writeln!(
        s,
        r#"<text x="{}" y="22" text-anchor="middle" font-size="14">{}</text>"#,
        WIDTH / 2.0,
        escape(plot.title)
    );
    // Grid and axis labels.
    for p in (0..=100).step_by(25) {
        let py = y(f64::from(p));
        let _ = writeln!(
            s,
            r##"<line x1="{LEFT}" y1="{py:.1}" x2="{:.1}" y2="{py:.1}" stroke="#ddd"/><text x="{:.1}" y="{:.1}" text-anchor="end">{p} %</text>"##,
            LEFT + plot_w,
            LEFT - 6.0,
            py + 4.0
        );
    }
    let step = tick_step(t_max);
    let mut t = 0.0;
    while t <= t_max + step * 1e-9 {
        let px = x(t);
        let _ = writeln!(
            s,
            r##"<line x1="{px:.1}" y1="{TOP}" x2="{px:.1}" y2="{:.1}" stroke="#eee"/><text x="{px:.1}" y="{:.1}" text-anchor="middle">{}</text>"##,
            TOP + plot_h,
            TOP + plot_h + 16.0,
            trim_number(t)
        );
        t += step;
    }
    let _ = writeln!(
        s,
        r##"<rect x="{LEFT}" y="{TOP}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#444"/>"##
    );
    let _ = writeln!(
        s,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">seconds since initiate_merge</text>"#,
        LEFT + plot_w / 2.0,
        HEIGHT - 12.0
    );
    // The plain copy's reference: 0 to 100 % in plain_copy_s.
    let copy_end = finite(plot.plain_copy_s);
    let _ = writeln!(
        s,
        r##"<polyline fill="none" stroke="#999" stroke-width="2" stroke-dasharray="6 4" points="{:.1},{:.1} {:.1},{:.1}"/>"##,
        x(0.0),
        y(0.0),
        x(copy_end),
        y(100.0)
    );
    // The scattered copy's reference, when measured: 0 to 100 % in scattered_copy_s.
    let scattered = plot
        .scattered_copy_s
        .is_finite()
        .then(|| finite(plot.scattered_copy_s));
    if let Some(end) = scattered {
        let _ = writeln!(
            s,
            r##"<polyline fill="none" stroke="#d9822b" stroke-width="2" stroke-dasharray="2 3" points="{:.1},{:.1} {:.1},{:.1}"/>"##,
            x(0.0),
            y(0.0),
            x(end),
            y(100.0)
        );
    }
    // The merge: merge_percent samples, as a step line (the percent holds until the next).
    let mut points = String::new();
    let mut last: Option<(f64, f64)> = None;
    for &(t, p) in plot.samples {
        if let Some((_, lp)) = last {
            let _ = write!(points, "{:.1},{:.1} ", x(t), y(lp));
        }
        let _ = write!(points, "{:.1},{:.1} ", x(t), y(p));
        last = Some((t, p));
    }
    let _ = writeln!(
        s,
        r##"<polyline fill="none" stroke="#1f6fb4" stroke-width="2" points="{}"/>"##,
        points.trim_end()
    );
    // Legend.
    let lx = LEFT + plot_w - 250.0;
    let rows = if scattered.is_some() { 3.0 } else { 2.0 };
    let ly = TOP + plot_h - 8.0 - 18.0 * rows;
    let _ = writeln!(
        s,
        r##"<rect x="{:.1}" y="{:.1}" width="244" height="{:.1}" fill="white" stroke="#ccc"/>"##,
        lx - 4.0,
        ly - 14.0,
        4.0 + 18.0 * rows
    );
    let _ = writeln!(
        s,
        r##"<line x1="{lx:.1}" y1="{:.1}" x2="{:.1}" y2="{:.1}" stroke="#1f6fb4" stroke-width="2"/><text x="{:.1}" y="{:.1}">merge_percent ({} s)</text>"##,
        ly - 4.0,
        lx + 24.0,
        ly - 4.0,
        lx + 30.0,
        ly,
        trim_number(finite(plot.merge_s))
    );
    let _ = writeln!(
        s,
        r##"<line x1="{lx:.1}" y1="{:.1}" x2="{:.1}" y2="{:.1}" stroke="#999" stroke-width="2" stroke-dasharray="6 4"/><text x="{:.1}" y="{:.1}">plain O_DIRECT copy + fsync ({} s)</text>"##,
        ly + 14.0,
        lx + 24.0,
        ly + 14.0,
        lx + 30.0,
        ly + 18.0,
        trim_number(copy_end)
    );
    if let Some(end) = scattered {
        let _ = writeln!(
            s,
            r##"<line x1="{lx:.1}" y1="{:.1}" x2="{:.1}" y2="{:.1}" stroke="#d9822b" stroke-width="2" stroke-dasharray="2 3"/><text x="{:.1}" y="{:.1}">scattered copy to own places ({} s)</text>"##,
            ly + 32.0,
            lx + 24.0,
            ly + 32.0,
            lx + 30.0,
            ly + 36.0,
            trim_number(end)
        );
    }
    s.push_str("</svg>\n");
    s
}

/// `v` with at most three decimals and no trailing zeros.
fn trim_number(v: f64) -> String {
    let text = format!("{v:.3}");
    let text = text.trim_end_matches('0').trim_end_matches('.');
    if text.is_empty() {
        "0".into()
    } else {
        text.into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plot_has_both_lines_and_stays_inside_the_canvas() {
        let samples = [(0.0, 0.0), (0.5, 30.0), (1.0, 70.0), (1.4, 100.0)];
        let svg = render(&ProgressPlot {
            title: "merge <demo> & copy",
            samples: &samples,
            merge_s: 1.4,
            plain_copy_s: 0.7,
            scattered_copy_s: 2.1,
        });
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains("merge &lt;demo&gt; &amp; copy"));
        assert!(svg.contains("merge_percent (1.4 s)"));
        assert!(svg.contains("copy + fsync (0.7 s)"));
        assert!(svg.contains("scattered copy to own places (2.1 s)"));
        assert_eq!(svg.matches("<polyline").count(), 3);
        // Every coordinate of every polyline lies inside the plot.
        for line in svg.lines().filter(|l| l.starts_with("<polyline")) {
            let points = line
                .split("points=\"")
                .nth(1)
                .unwrap()
                .split('"')
                .next()
                .unwrap();
            for pair in points.split_whitespace() {
                let (px, py) = pair.split_once(',').unwrap();
                let (px, py): (f64, f64) = (px.parse().unwrap(), py.parse().unwrap());
                assert!((LEFT..=WIDTH - RIGHT).contains(&px), "{pair}");
                assert!((TOP..=HEIGHT - BOTTOM).contains(&py), "{pair}");
            }
        }
        // The step line: 4 samples give 4 + 3 points.
        let merge_line = svg
            .lines()
            .find(|l| l.contains("#1f6fb4\" stroke-width=\"2\" points"))
            .unwrap();
        assert_eq!(merge_line.matches(',').count(), 7);
    }

    #[test]
    fn degenerate_input_still_renders() {
        let svg = render(&ProgressPlot {
            title: "empty",
            samples: &[],
            merge_s: f64::NAN,
            plain_copy_s: 0.0,
            scattered_copy_s: f64::NAN,
        });
        assert!(svg.contains("</svg>") && !svg.contains("NaN") && !svg.contains("inf"));
        assert!(!svg.contains("scattered copy"), "not measured, not drawn");
    }

    #[test]
    fn ticks_are_round_numbers() {
        assert_eq!(tick_step(10.0), 2.0);
        assert!((tick_step(0.3) - 0.1).abs() < 1e-12);
        assert_eq!(tick_step(70.0), 20.0);
        assert_eq!(trim_number(2.500), "2.5");
        assert_eq!(trim_number(0.0), "0");
    }
}
