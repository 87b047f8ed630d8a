//! Line plots written twice from one display list: as SVG (text drawn by the viewer) and
//! as PNG (rasterized here, text from the built-in bitmap font, so the image looks the
//! same on a machine without fonts). Several panels stack vertically and share the
//! legend, which sits right of the panels.

use super::font;

pub type Rgb = [u8; 3];

/// Series colours: distinct in hue and lightness (Okabe–Ito, readable by colour-blind
/// viewers), then black for the float reference when a plot has one.
pub const PALETTE: [Rgb; 7] = [
    [0, 114, 178],
    [213, 94, 0],
    [0, 158, 115],
    [204, 121, 167],
    [230, 159, 0],
    [86, 180, 233],
    [120, 120, 120],
];

#[derive(Clone, Debug)]
pub struct Series {
    pub label: String,
    pub color: Rgb,
    pub points: Vec<(f64, f64)>,
}

#[derive(Clone, Debug)]
pub struct Panel {
    pub y_label: String,
    pub x_label: String,
    /// log10 y axis; values ≤ 0 are drawn on the bottom edge.
    pub log_y: bool,
    /// Fixed y range (else from the data).
    pub y_range: Option<(f64, f64)>,
    pub series: Vec<Series>,
}

#[derive(Clone, Debug)]
pub struct Figure {
    pub title: String,
    pub panels: Vec<Panel>,
    /// A line under the legend (e.g. what was averaged).
    pub note: Option<String>,
}

/// Drawing primitives in pixel coordinates (origin top left).
enum Prim {
    Line {
        pts: Vec<(f64, f64)>,
        color: Rgb,
        width: f64,
    },
    Rect {
        x: f64,
        y: f64,
        w: f64,
        h: f64,
        fill: Option<Rgb>,
        stroke: Option<Rgb>,
    },
    Text {
        x: f64,
        y: f64,
        text: String,
        scale: usize,
        /// 0 = left, 1 = centre, 2 = right (of x).
        anchor: u8,
        vertical: bool,
        color: Rgb,
    },
}

const W: f64 = 960.0;
const PANEL_H: f64 = 300.0;
const TOP: f64 = 44.0;
const LEFT: f64 = 84.0;
const PLOT_W: f64 = 560.0;
const PANEL_GAP: f64 = 64.0;
const BLACK: Rgb = [0, 0, 0];
const GRID: Rgb = [225, 225, 225];
const TEXT: Rgb = [30, 30, 30];

/// "Nice" ticks covering [lo, hi]: steps of 1, 2 or 5 × 10^k, about `n` of them.
fn linear_ticks(lo: f64, hi: f64, n: usize) -> Vec<f64> {
    let span = (hi - lo).max(1e-12);
    let raw = span / n as f64;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * mag)
        .find(|s| span / s <= n as f64 + 0.5)
        .unwrap_or(10.0 * mag);
    let first = (lo / step).ceil() as i64;
    let last = (hi / step).floor() as i64;
    (first..=last).map(|k| k as f64 * step).collect()
}

fn tick_label(v: f64, step: f64) -> String {
    if v == 0.0 {
        return "0".into();
    }
    let decimals = if step >= 1.0 {
        0
    } else {
        (-step.log10().floor()) as usize
    };
    if v.abs() >= 1e5 || v.abs() < 1e-3 {
        format!("{v:.0e}")
    } else {
        format!("{v:.decimals$}")
    }
}

/// Axis range of a panel: (lo, hi) in axis units (log10 for log panels).
fn y_extent(p: &Panel) -> (f64, f64) {
    if let Some((a, b)) = p.y_range {
        return if p.log_y {
            (a.log10(), b.log10())
        } else {
            (a, b)
        };
    }
    let vals: Vec<f64> = p
        .series
        .iter()
        .flat_map(|s| s.points.iter().map(|q| q.1))
        .filter(|v| v.is_finite() && (!p.log_y || *v > 0.0))
        .map(|v| if p.log_y { v.log10() } else { v })
        .collect();
    if vals.is_empty() {
        return (0.0, 1.0);
    }
    let lo = vals.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = vals.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if p.log_y {
        (lo.floor(), hi.ceil().max(lo.floor() + 1.0))
    } else if hi - lo < 1e-9 {
        (lo - 1.0, hi + 1.0)
    } else {
        let pad = (hi - lo) * 0.05;
        (lo - pad, hi + pad)
    }
}

impl Figure {
    fn height(&self) -> f64 {
        TOP + self.panels.len() as f64 * (PANEL_H + PANEL_GAP) + 8.0
    }

    fn display_list(&self) -> Vec<Prim> {
        let mut out = vec![Prim::Rect {
            x: 0.0,
            y: 0.0,
            w: W,
            h: self.height(),
            fill: Some([255, 255, 255]),
            stroke: None,
        }];
        out.push(Prim::Text {
            x: LEFT + PLOT_W / 2.0,
            y: 20.0,
            text: self.title.clone(),
            scale: 2,
            anchor: 1,
            vertical: false,
            color: TEXT,
        });
        let (x_lo, x_hi) = {
            let xs: Vec<f64> = self
                .panels
                .iter()
                .flat_map(|p| p.series.iter().flat_map(|s| s.points.iter().map(|q| q.0)))
                .collect();
            let lo = xs.iter().copied().fold(f64::INFINITY, f64::min);
            let hi = xs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            if xs.is_empty() {
                (0.0, 1.0)
            } else if hi <= lo {
                (lo - 1.0, lo + 1.0)
            } else {
                (lo, hi)
            }
        };
        for (k, p) in self.panels.iter().enumerate() {
            let top = TOP + k as f64 * (PANEL_H + PANEL_GAP);
            let (y_lo, y_hi) = y_extent(p);
            let px = |x: f64| LEFT + (x - x_lo) / (x_hi - x_lo) * PLOT_W;
            let py = |v: f64| {
                let a = if p.log_y {
                    if v > 0.0 {
                        v.log10()
                    } else {
                        y_lo
                    }
                } else {
                    v
                };
                let a = a.clamp(y_lo, y_hi);
                top + PANEL_H - (a - y_lo) / (y_hi - y_lo) * PANEL_H
            };
            // Grid and y ticks.
            let yt: Vec<f64> = if p.log_y {
                (y_lo.ceil() as i64..=y_hi.floor() as i64)
                    .map(|e| e as f64)
                    .collect()
            } else {
                linear_ticks(y_lo, y_hi, 6)
            };
            let ystep = if yt.len() > 1 { yt[1] - yt[0] } else { 1.0 };
            for &v in &yt {
                let y = top + PANEL_H - (v - y_lo) / (y_hi - y_lo) * PANEL_H;
                out.push(Prim::Line {
                    pts: vec![(LEFT, y), (LEFT + PLOT_W, y)],
                    color: GRID,
                    width: 1.0,
                });
                out.push(Prim::Line {
                    pts: vec![(LEFT - 5.0, y), (LEFT, y)],
                    color: BLACK,
                    width: 1.0,
                });
                let label = if p.log_y {
                    format!("1e{}", v as i64)
                } else {
                    tick_label(v, ystep)
                };
                out.push(Prim::Text {
                    x: LEFT - 8.0,
                    y,
                    text: label,
                    scale: 1,
                    anchor: 2,
                    vertical: false,
                    color: TEXT,
                });
            }
            let xt = linear_ticks(x_lo, x_hi, 8);
            let xstep = if xt.len() > 1 { xt[1] - xt[0] } else { 1.0 };
            for &v in &xt {
                let x = px(v);
                out.push(Prim::Line {
                    pts: vec![(x, top), (x, top + PANEL_H)],
                    color: GRID,
                    width: 1.0,
                });
                out.push(Prim::Line {
                    pts: vec![(x, top + PANEL_H), (x, top + PANEL_H + 5.0)],
                    color: BLACK,
                    width: 1.0,
                });
                out.push(Prim::Text {
                    x,
                    y: top + PANEL_H + 14.0,
                    text: tick_label(v, xstep),
                    scale: 1,
                    anchor: 1,
                    vertical: false,
                    color: TEXT,
                });
            }
            out.push(Prim::Rect {
                x: LEFT,
                y: top,
                w: PLOT_W,
                h: PANEL_H,
                fill: None,
                stroke: Some(BLACK),
            });
            out.push(Prim::Text {
                x: LEFT + PLOT_W / 2.0,
                y: top + PANEL_H + 32.0,
                text: p.x_label.clone(),
                scale: 1,
                anchor: 1,
                vertical: false,
                color: TEXT,
            });
            out.push(Prim::Text {
                x: 18.0,
                y: top + PANEL_H / 2.0,
                text: p.y_label.clone(),
                scale: 1,
                anchor: 1,
                vertical: true,
                color: TEXT,
            });
            let n = p.series.len();
            for (k, s) in p.series.iter().enumerate() {
                // Earlier series are drawn wider, so coinciding lines stay visible as
                // nested stripes (e.g. several exact tables at cosine 1).
                let width = 2.0 + 2.0 * (n - 1 - k) as f64;
                let pts: Vec<(f64, f64)> = s
                    .points
                    .iter()
                    .filter(|q| q.0.is_finite() && !q.1.is_nan())
                    .map(|&(x, y)| (px(x), py(y)))
                    .collect();
                if pts.len() == 1 {
                    let (x, y) = pts[0];
                    out.push(Prim::Rect {
                        x: x - 2.0,
                        y: y - 2.0,
                        w: 4.0,
                        h: 4.0,
                        fill: Some(s.color),
                        stroke: None,
                    });
                }
                out.push(Prim::Line {
                    pts,
                    color: s.color,
                    width,
                });
            }
        }
        // The legend: every label once, in first-seen order.
        let mut seen: Vec<(&str, Rgb)> = vec![];
        for s in self.panels.iter().flat_map(|p| &p.series) {
            if !seen.iter().any(|(l, _)| *l == s.label) {
                seen.push((&s.label, s.color));
            }
        }
        let lx = LEFT + PLOT_W + 24.0;
        let ly = TOP;
        let lh = 18.0 * seen.len() as f64 + 12.0;
        out.push(Prim::Rect {
            x: lx,
            y: ly,
            w: W - lx - 10.0,
            h: lh,
            fill: None,
            stroke: Some([160, 160, 160]),
        });
        for (i, (label, color)) in seen.iter().enumerate() {
            let y = ly + 15.0 + 18.0 * i as f64;
            out.push(Prim::Line {
                pts: vec![(lx + 8.0, y), (lx + 36.0, y)],
                color: *color,
                width: 3.0,
            });
            out.push(Prim::Text {
                x: lx + 44.0,
                y,
                text: label.to_string(),
                scale: 1,
                anchor: 0,
                vertical: false,
                color: TEXT,
            });
        }
        if let Some(note) = &self.note {
            // Wrapped to the legend's width.
            // A few characters of slack: an SVG viewer's monospace font may be wider.
            let per_line = ((W - lx - 10.0) / font::CELL_W as f64) as usize - 4;
            let mut line = String::new();
            let mut lines = vec![];
            for word in note.split_whitespace() {
                if !line.is_empty() && line.len() + 1 + word.len() > per_line {
                    lines.push(std::mem::take(&mut line));
                }
                if !line.is_empty() {
                    line.push(' ');
                }
                line.push_str(word);
            }
            if !line.is_empty() {
                lines.push(line);
            }
            for (i, l) in lines.into_iter().enumerate() {
                out.push(Prim::Text {
                    x: lx,
                    y: ly + lh + 16.0 + 12.0 * i as f64,
                    text: l,
                    scale: 1,
                    anchor: 0,
                    vertical: false,
                    color: [90, 90, 90],
                });
            }
        }
        out
    }

    pub fn svg(&self) -> String {
        let h = self.height();
        let hex = |c: Rgb| format!("#{:02x}{:02x}{:02x}", c[0], c[1], c[2]);
        let esc = |s: &str| {
            s.replace('&', "&amp;")
                .replace('<', "&lt;")
                .replace('>', "&gt;")
        };
        let mut s = format!(
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{W}\" height=\"{h}\" viewBox=\"0 0 {W} {h}\" font-family=\"DejaVu Sans Mono, Menlo, Consolas, monospace\">\n"
        );
        for p in self.display_list() {
            match p {
                Prim::Line { pts, color, width } => {
                    if pts.len() < 2 {
                        continue;
                    }
                    let d: Vec<String> = pts.iter().map(|(x, y)| format!("{x:.1},{y:.1}")).collect();
                    s.push_str(&format!(
                        "<polyline fill=\"none\" stroke=\"{}\" stroke-width=\"{width}\" stroke-linejoin=\"round\" points=\"{}\"/>\n",
                        hex(color),
                        d.join(" ")
                    ));
                }
                Prim::Rect {
                    x,
                    y,
                    w,
                    h,
                    fill,
                    stroke,
                } => s.push_str(&format!(
                    "<rect x=\"{x:.1}\" y=\"{y:.1}\" width=\"{w:.1}\" height=\"{h:.1}\" fill=\"{}\" stroke=\"{}\"/>\n",
                    fill.map(hex).unwrap_or("none".into()),
                    stroke.map(hex).unwrap_or("none".into())
                )),
                Prim::Text {
                    x,
                    y,
                    text,
                    scale,
                    anchor,
                    vertical,
                    color,
                } => {
                    let a = ["start", "middle", "end"][anchor as usize];
                    let size = 10 * scale;
                    let rot = if vertical {
                        format!(" transform=\"rotate(-90 {x:.1} {y:.1})\"")
                    } else {
                        String::new()
                    };
                    // Baseline below the centre line by about a third of the size
                    // (viewers differ in dominant-baseline support).
                    let base = y + 0.35 * size as f64;
                    s.push_str(&format!(
                        "<text x=\"{x:.1}\" y=\"{base:.1}\" font-size=\"{size}\" text-anchor=\"{a}\" fill=\"{}\"{rot}>{}</text>\n",
                        hex(color),
                        esc(&text)
                    ));
                }
            }
        }
        s.push_str("</svg>\n");
        s
    }

    /// RGB pixels, row-major, with the size.
    pub fn raster(&self) -> (Vec<u8>, usize, usize) {
        let (w, h) = (W as usize, self.height().ceil() as usize);
        let mut c = Canvas {
            px: vec![255; w * h * 3],
            w,
            h,
        };
        for p in self.display_list() {
            match p {
                Prim::Line { pts, color, width } => {
                    for seg in pts.windows(2) {
                        c.segment(seg[0], seg[1], width, color);
                    }
                }
                Prim::Rect {
                    x,
                    y,
                    w: rw,
                    h: rh,
                    fill,
                    stroke,
                } => {
                    if let Some(f) = fill {
                        c.fill(x, y, rw, rh, f);
                    }
                    if let Some(st) = stroke {
                        let (x0, y0, x1, y1) = (x, y, x + rw, y + rh);
                        for (a, b) in [
                            ((x0, y0), (x1, y0)),
                            ((x1, y0), (x1, y1)),
                            ((x1, y1), (x0, y1)),
                            ((x0, y1), (x0, y0)),
                        ] {
                            c.segment(a, b, 1.0, st);
                        }
                    }
                }
                Prim::Text {
                    x,
                    y,
                    text,
                    scale,
                    anchor,
                    vertical,
                    color,
                } => c.text(x, y, &text, scale, anchor, vertical, color),
            }
        }
        (c.px, w, h)
    }

    pub fn png(&self) -> Vec<u8> {
        let (px, w, h) = self.raster();
        encode_png(&px, w, h)
    }
}

pub fn encode_png(rgb: &[u8], w: usize, h: usize) -> Vec<u8> {
    let mut out = Vec::new();
    let mut enc = png::Encoder::new(&mut out, w as u32, h as u32);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    // Encoding an in-memory buffer of the declared size cannot fail.
    let mut writer = enc.write_header().expect("PNG header");
    writer
        .write_image_data(rgb)
        .expect("PNG data of the declared size");
    drop(writer);
    out
}

pub struct Canvas {
    pub px: Vec<u8>,
    pub w: usize,
    pub h: usize,
}

impl Canvas {
    pub fn put(&mut self, x: i64, y: i64, c: Rgb) {
        if x >= 0 && y >= 0 && (x as usize) < self.w && (y as usize) < self.h {
            let at = (y as usize * self.w + x as usize) * 3;
            self.px[at..at + 3].copy_from_slice(&c);
        }
    }

    fn fill(&mut self, x: f64, y: f64, w: f64, h: f64, c: Rgb) {
        for yy in y.round() as i64..(y + h).round() as i64 {
            for xx in x.round() as i64..(x + w).round() as i64 {
                self.put(xx, yy, c);
            }
        }
    }

    /// A segment `width` pixels thick: square stamps every half pixel along it.
    fn segment(&mut self, a: (f64, f64), b: (f64, f64), width: f64, c: Rgb) {
        let len = ((b.0 - a.0).powi(2) + (b.1 - a.1).powi(2)).sqrt();
        let n = (len * 2.0).ceil().max(1.0) as usize;
        let r = (width / 2.0).max(0.5);
        for i in 0..=n {
            let f = i as f64 / n as f64;
            let (x, y) = (a.0 + (b.0 - a.0) * f, a.1 + (b.1 - a.1) * f);
            let (x0, x1) = ((x - r + 0.5).floor() as i64, (x + r - 0.5).floor() as i64);
            let (y0, y1) = ((y - r + 0.5).floor() as i64, (y + r - 0.5).floor() as i64);
            for yy in y0..=y1.max(y0) {
                for xx in x0..=x1.max(x0) {
                    self.put(xx, yy, c);
                }
            }
        }
    }

    /// Text vertically centred on y; `vertical` reads bottom to top, centred on (x, y).
    #[allow(clippy::too_many_arguments)]
    pub fn text(
        &mut self,
        x: f64,
        y: f64,
        s: &str,
        scale: usize,
        anchor: u8,
        vertical: bool,
        c: Rgb,
    ) {
        let tw = font::text_width(s, scale) as f64;
        let th = (font::CELL_H * scale) as f64;
        let start = match anchor {
            0 => 0.0,
            1 => -tw / 2.0,
            _ => -tw,
        };
        for (i, ch) in s.chars().enumerate() {
            for col in 0..5 {
                for row in 0..font::CELL_H {
                    if !font::ink(ch, col, row) {
                        continue;
                    }
                    for dy in 0..scale {
                        for dx in 0..scale {
                            // Glyph coordinates along (u) and across (v) the text.
                            let u = start + ((i * font::CELL_W + col) * scale + dx) as f64;
                            let v = ((row * scale + dy) as f64) - th / 2.0 + 1.0;
                            let (px, py) = if vertical {
                                (x + v, y - u)
                            } else {
                                (x + u, y + v)
                            };
                            self.put(px.round() as i64, py.round() as i64, c);
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_round_numbers_inside_the_range() {
        assert_eq!(
            linear_ticks(0.0, 980.0, 8),
            vec![0.0, 200.0, 400.0, 600.0, 800.0]
        );
        let t = linear_ticks(0.93, 1.001, 6);
        assert!(t.iter().all(|v| (0.93..=1.001).contains(v)), "{t:?}");
        assert!(t.len() >= 3, "{t:?}");
        assert_eq!(tick_label(0.95, 0.01), "0.95");
        assert_eq!(tick_label(400.0, 200.0), "400");
    }

    fn figure() -> Figure {
        Figure {
            title: "test".into(),
            note: Some("a note".into()),
            panels: vec![Panel {
                y_label: "y".into(),
                x_label: "t".into(),
                log_y: true,
                y_range: None,
                series: vec![Series {
                    label: "a".into(),
                    color: PALETTE[0],
                    points: vec![(0.0, 1e-3), (10.0, 0.0), (20.0, 1e-1)],
                }],
            }],
        }
    }

    #[test]
    fn svg_and_png_carry_the_same_figure() {
        let f = figure();
        let svg = f.svg();
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains(">test</text>") && svg.contains(">1e-3</text>"));
        let (px, w, h) = f.raster();
        assert_eq!(px.len(), w * h * 3);
        // The series colour is drawn somewhere, the background stays white.
        assert!(px.chunks(3).any(|p| p == PALETTE[0]));
        assert_eq!(&px[..3], &[255, 255, 255]);
        let png = f.png();
        assert_eq!(&png[1..4], b"PNG");
    }
}
