//! The figures `tfmqc eval --plots DIR` writes: temporal-feature error and output SQNR
//! per step (SVG and PNG), and a grid of samples.

use std::collections::BTreeMap;
use std::path::Path;

use tfmqc_passes::onnx;

use super::plot::{self, Figure, Panel, Series, PALETTE};
use super::report::{FeatureError, QuantResult};
use super::{fail, font, Samples};
use crate::{user_error, Failure};

/// Samples shown per model in samples.png.
const GRID_ROWS: usize = 8;

/// The figures of `--plots` in `dir`: the files written, by kind.
pub(super) fn write_plots(
    dir: &Path,
    quants: &[QuantResult],
    set: &[i64],
    samples: &Samples,
) -> Result<BTreeMap<&'static str, String>, Failure> {
    let feature_errors: Vec<&[FeatureError]> = quants
        .iter()
        .map(|q| q.temporal_features.values.as_slice())
        .collect();
    std::fs::create_dir_all(dir).map_err(|e| user_error(format!("{}: {e}", dir.display())))?;
    let write = |name: &str, bytes: &[u8]| -> Result<String, Failure> {
        let p = dir.join(name);
        onnx::write_atomic(&p, bytes).map_err(fail)?;
        Ok(p.display().to_string())
    };
    let mut files = BTreeMap::new();
    let color = |k: usize| PALETTE[k % PALETTE.len()];
    if feature_errors.iter().any(|e| !e.is_empty()) {
        // Mean over the frontier values at each t (the JSON has each value).
        let mean_at = |errs: &[FeatureError], f: &dyn Fn(&FeatureError) -> &Vec<f64>| {
            set.iter()
                .enumerate()
                .map(|(i, &t)| {
                    let v: f64 = errs.iter().map(|e| f(e)[i]).sum::<f64>() / errs.len() as f64;
                    (t as f64, v)
                })
                .collect::<Vec<_>>()
        };
        let mut cos = vec![];
        let mut mse = vec![];
        for (k, (q, errs)) in quants.iter().zip(&feature_errors).enumerate() {
            if errs.is_empty() {
                continue;
            }
            cos.push(Series {
                label: q.label.clone(),
                color: color(k),
                points: mean_at(errs, &|e| &e.cosine),
            });
            mse.push(Series {
                label: q.label.clone(),
                color: color(k),
                points: mean_at(errs, &|e| &e.rel_mse),
            });
        }
        let n_values = feature_errors.iter().map(|e| e.len()).max().unwrap_or(0);
        let fig = Figure {
            title: "Temporal features: quantized vs float".into(),
            note: Some(format!(
                "Mean over the {n_values} TIB frontier values (the temporal features) at each time step t in S. An exact table (tfmqc --tib lut) has cosine 1 and relative MSE 0, drawn on the bottom edge."
            )),
            panels: vec![
                Panel {
                    y_label: "cosine similarity".into(),
                    x_label: "time step t".into(),
                    log_y: false,
                    y_range: None,
                    series: cos,
                },
                Panel {
                    y_label: "relative MSE (log)".into(),
                    x_label: "time step t".into(),
                    log_y: true,
                    y_range: None,
                    series: mse,
                },
            ],
        };
        files.insert(
            "temporal_features_svg",
            write("temporal_features.svg", fig.svg().as_bytes())?,
        );
        files.insert(
            "temporal_features_png",
            write("temporal_features.png", &fig.png())?,
        );
    }
    let series: Vec<Series> = quants
        .iter()
        .enumerate()
        .map(|(k, q)| Series {
            label: q.label.clone(),
            color: color(k),
            points: q
                .step_sqnr_db
                .per_step
                .iter()
                .map(|s| (s.t as f64, s.db))
                .collect(),
        })
        .collect();
    let fig = Figure {
        title: "Denoiser output SQNR per step".into(),
        note: Some("SQNR = 10 log10(sum y^2 / sum (y - yq)^2) of the noise prediction, on the inputs of float DDIM trajectories.".into()),
        panels: vec![Panel {
            y_label: "output SQNR (dB)".into(),
            x_label: "time step t".into(),
            log_y: false,
            y_range: None,
            series,
        }],
    };
    files.insert(
        "step_sqnr_svg",
        write("step_sqnr.svg", fig.svg().as_bytes())?,
    );
    files.insert("step_sqnr_png", write("step_sqnr.png", &fig.png())?);
    let labels: Vec<&str> = std::iter::once("float")
        .chain(quants.iter().map(|q| q.label.as_str()))
        .collect();
    let mut columns = vec![samples.float.as_slice()];
    columns.extend(samples.quant.iter().map(|v| v.as_slice()));
    files.insert(
        "samples_png",
        write(
            "samples.png",
            &samples_grid(&columns, &labels, samples.dims),
        )?,
    );
    Ok(files)
}

/// Columns float | QUANT... of the first GRID_ROWS samples, ×4, with a label on top of
/// each column; 3 channels as RGB, else the first channel in grey (as `tfmqc sample`).
fn samples_grid(columns: &[&[f32]], labels: &[&str], [n, c, h, w]: [usize; 4]) -> Vec<u8> {
    const SCALE: usize = 4;
    const GAP: usize = 6;
    const HEAD: usize = 20;
    let rows = n.min(GRID_ROWS);
    let cell_w = (w * SCALE).max(
        labels
            .iter()
            .map(|l| font::text_width(l, 1))
            .max()
            .unwrap_or(0)
            + 4,
    );
    let width = columns.len() * (cell_w + GAP) + GAP;
    let height = HEAD + rows * (h * SCALE + GAP) + GAP;
    let mut canvas = plot::Canvas {
        px: vec![255; width * height * 3],
        w: width,
        h: height,
    };
    let level = |v: f32| (((v.clamp(-1.0, 1.0) + 1.0) * 127.5).round()) as u8;
    for (k, col) in columns.iter().enumerate() {
        let x0 = GAP + k * (cell_w + GAP);
        canvas.text(
            (x0 + cell_w / 2) as f64,
            (HEAD / 2) as f64,
            labels[k],
            1,
            1,
            false,
            [30, 30, 30],
        );
        let ox = x0 + (cell_w - w * SCALE) / 2;
        for s in 0..rows {
            let oy = HEAD + s * (h * SCALE + GAP);
            for y in 0..h * SCALE {
                for x in 0..w * SCALE {
                    let at = |ch: usize| col[((s * c + ch) * h + y / SCALE) * w + x / SCALE];
                    let rgb = if c == 3 {
                        [level(at(0)), level(at(1)), level(at(2))]
                    } else {
                        let g = level(at(0));
                        [g, g, g]
                    };
                    canvas.put((ox + x) as i64, (oy + y) as i64, rgb);
                }
            }
        }
    }
    plot::encode_png(&canvas.px, width, height)
}
