//! `tfmqc sample` and the runtime's embedding API (`Denoiser`): sampling works on the
//! original and on compiled files, steps come from the time-step set S, and a time step
//! outside S is refused.

mod common;
use common::*;

use std::path::Path;

use tfmqc_runtime::{Denoiser, Error, Sampler, Tensor};

/// Decodes a PNG: (width, height, color type, pixels).
fn decode(path: &Path) -> (u32, u32, png::ColorType, Vec<u8>) {
    let file = std::fs::File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut reader = png::Decoder::new(std::io::BufReader::new(file))
        .read_info()
        .expect("a valid PNG header");
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf).expect("valid PNG data");
    buf.truncate(info.buffer_size());
    (info.width, info.height, info.color_type, buf)
}

/// `count` 16×16 gray samples, ×4, 2 px apart, ⌈√count⌉ columns.
fn assert_digits_grid(path: &Path, count: usize) {
    let cols = (1..=count).find(|k| k * k >= count).unwrap();
    let rows = count.div_ceil(cols);
    let (w, h, color, pixels) = decode(path);
    assert_eq!(
        (w as usize, h as usize),
        (cols * 64 + (cols - 1) * 2, rows * 64 + (rows - 1) * 2)
    );
    assert_eq!(color, png::ColorType::Grayscale);
    // Digits: dark background, bright strokes.
    let dark = pixels.iter().filter(|&&p| p < 64).count();
    let bright = pixels.iter().filter(|&&p| p > 192).count();
    assert!(
        dark > pixels.len() / 4 && bright > pixels.len() / 50,
        "{dark} dark, {bright} bright of {}",
        pixels.len()
    );
}

fn sample_ok(model: &Path, out: &Path, extra: &[&str]) {
    let mut args = vec![
        "sample",
        model.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    tfmqc_ok(&args);
}

#[test]
fn samples_the_original_model_into_a_png_grid() {
    let dir = tmpdir();
    let (a, b) = (dir.path().join("a.png"), dir.path().join("b.png"));
    let model = model_path("ddpm_digits");
    sample_ok(&model, &a, &["--steps", "10", "--count", "4"]);
    assert_digits_grid(&a, 4);
    // Same seed, same bytes; another count gives another grid shape.
    sample_ok(&model, &b, &["--steps", "10", "--count", "4"]);
    assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
    sample_ok(
        &model,
        &b,
        &[
            "--steps",
            "10",
            "--count",
            "3",
            "--sampler",
            "ddpm",
            "--seed",
            "5",
        ],
    );
    assert_digits_grid(&b, 3);
}

#[test]
fn samples_with_each_sampler_of_the_runtime() {
    let dir = tmpdir();
    let model = model_path("ddpm_digits");
    // Euler's linspace spacing lands on whole steps at 10 (999 = 9·111); DPM-Solver++ and
    // DDPM at any count.
    for (sampler, steps) in [("euler", "10"), ("dpm++", "20"), ("ddpm", "25")] {
        let png = dir.path().join(format!("{sampler}.png"));
        sample_ok(
            &model,
            &png,
            &["--steps", steps, "--count", "4", "--sampler", sampler],
        );
        assert_digits_grid(&png, 4);
    }
    // At 20 steps Euler's linspace time steps are fractional: refused, nothing written.
    let png = dir.path().join("frac.png");
    let r = tfmqc(&[
        "sample",
        model.to_str().unwrap(),
        "-o",
        png.to_str().unwrap(),
        "--sampler",
        "euler",
        "--steps",
        "20",
    ]);
    assert_eq!(r.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&r.stderr).contains("fractional"));
    assert!(!png.exists());
}

#[test]
fn samples_a_quantized_model_at_step_counts_inside_its_set() {
    let dir = tmpdir();
    let q = dir.path().join("q.onnx");
    tfmqc_ok(&[
        model_path("ddpm_digits").to_str().unwrap(),
        "-o",
        q.to_str().unwrap(),
        "--timesteps",
        "ddim:50",
        "--calib-samples",
        "2",
        "--calib-steps",
        "5",
    ]);
    let png = dir.path().join("q.png");
    sample_ok(&q, &png, &["--steps", "10", "--count", "4"]);
    assert_digits_grid(&png, 4);
    // DDIM at 7 steps visits t = 852, outside S = ddim:50: a loud error naming the step
    // counts that fit, and no file.
    std::fs::remove_file(&png).unwrap();
    let r = tfmqc(&[
        "sample",
        q.to_str().unwrap(),
        "-o",
        png.to_str().unwrap(),
        "--steps",
        "7",
    ]);
    assert_eq!(r.status.code(), Some(1));
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(
        err.contains("t = 852") && err.contains("1, 2, 5, 10, 25"),
        "{err}"
    );
    assert!(!png.exists());

    let d = Denoiser::load(&q).unwrap();
    assert_eq!(d.timestep_count(), 50);
    let traj = d.trajectory(Sampler::Ddim, 10).unwrap();
    assert_eq!((traj.len(), traj[0], traj[9]), (10, 900, 0));
    assert!(d.trajectory(Sampler::Ddim, 7).is_err());
    let x = d.sample(0, 10, &[], 2, Sampler::Ddim).unwrap();
    assert_eq!(x.shape(), &[2, 1, 16, 16]);
}

#[test]
fn a_time_step_outside_the_set_is_an_api_error() {
    let dir = tmpdir();
    let folded = dir.path().join("f.onnx");
    tfmqc_ok(&[
        model_path("ddpm_digits").to_str().unwrap(),
        "-o",
        folded.to_str().unwrap(),
        "--passes",
        "detect-tib,fold-tib",
        "--timesteps",
        "ddim:50",
    ]);
    let d = Denoiser::load(&folded).unwrap();
    let x = Tensor::zero::<f32>(&[2, 1, 16, 16]).unwrap();
    let eps = d.denoise(&x, 40, &[]).unwrap();
    assert_eq!(eps.shape(), &[2, 1, 16, 16]);
    for t in [7, 999, 1000, -20] {
        let err = d.denoise(&x, t, &[]).unwrap_err();
        assert!(matches!(err, Error::BadInput(_)), "{err:?}");
        let msg = err.to_string();
        assert!(
            msg.contains(&format!("time step {t} ")) && msg.contains("50 steps"),
            "{msg}"
        );
    }
    // Conditioning the model does not take is refused too.
    let extra = [("y", Tensor::zero::<i64>(&[2]).unwrap())];
    assert!(d.denoise(&x, 40, &extra).is_err());
}

#[test]
fn bad_sample_requests_exit_1_and_write_nothing() {
    let dir = tmpdir();
    let out = dir.path().join("x.png");
    let o = out.to_str().unwrap();
    let model = model_path("ddpm_digits");
    let m = model.to_str().unwrap();
    for args in [
        vec!["sample", "no/such/model.onnx", "-o", o],
        vec!["sample", m, "-o", o, "--steps", "0"],
        vec!["sample", m, "-o", o, "--sampler", "heun"],
        vec!["sample", m, "-o", o, "--guidance-scale", "2"],
    ] {
        let r = tfmqc(&args);
        assert_eq!(r.status.code(), Some(1), "{args:?}");
        assert!(!String::from_utf8_lossy(&r.stderr).is_empty());
        assert!(!out.exists(), "{args:?}");
    }
}

/// PSNR in dB of `other` against `reference`, both in [-1, 1] after clipping (peak-to-peak
/// 2, as the images the grid shows).
fn psnr_db(reference: &[f32], other: &[f32]) -> f64 {
    assert_eq!(reference.len(), other.len());
    let clip = |v: f32| v.clamp(-1.0, 1.0) as f64;
    let mse = reference
        .iter()
        .zip(other)
        .map(|(&a, &b)| (clip(a) - clip(b)).powi(2))
        .sum::<f64>()
        / reference.len() as f64;
    10.0 * (4.0 / mse.max(1e-20)).log10()
}

fn values(t: &Tensor) -> Vec<f32> {
    t.to_plain_array_view::<f32>()
        .unwrap()
        .iter()
        .copied()
        .collect()
}

/// The sampling-fidelity bar: the trained digits model quantized W8A8 by the
/// default pipeline, sampled by the runtime (quantized layers on the int8 kernels) with
/// DDIM from the same seeds as the float model, gives samples within 30 dB PSNR of the
/// float samples; `tfmqc sample` draws the same grid.
#[test]
fn int8_samples_are_within_30_db_of_float_samples_at_w8a8() {
    const COUNT: usize = 8;
    const STEPS: usize = 50;
    const MIN_PSNR_DB: f64 = 30.0;
    let dir = tmpdir();
    let q = dir.path().join("q.onnx");
    let float_path = model_path("ddpm_digits");
    tfmqc_ok(&[float_path.to_str().unwrap(), "-o", q.to_str().unwrap()]);

    let float = Denoiser::load(&float_path).unwrap();
    let int8 = Denoiser::load(&q).unwrap();
    assert_eq!(float.int8_ops(), 0);
    assert!(int8.int8_ops() > 0, "no convolution runs in int8");
    let mut worst = f64::INFINITY;
    for seed in [0, 1] {
        let a = float
            .sample(seed, STEPS, &[], COUNT, Sampler::Ddim)
            .unwrap();
        let b = int8.sample(seed, STEPS, &[], COUNT, Sampler::Ddim).unwrap();
        let psnr = psnr_db(&values(&a), &values(&b));
        eprintln!(
            "seed {seed}: {COUNT} samples × {STEPS} DDIM steps, int8 vs float PSNR {psnr:.2} dB"
        );
        worst = worst.min(psnr);
    }
    assert!(
        worst >= MIN_PSNR_DB,
        "PSNR {worst:.2} dB < {MIN_PSNR_DB} dB"
    );

    // The CLI's grids: the int8 one is a grid of digits, close to the float one pixel
    // for pixel (8-bit levels, gaps excluded).
    let (fa, qa) = (dir.path().join("float.png"), dir.path().join("int8.png"));
    let count = COUNT.to_string();
    let steps = STEPS.to_string();
    let extra = ["--steps", steps.as_str(), "--count", count.as_str()];
    sample_ok(&float_path, &fa, &extra);
    sample_ok(&q, &qa, &extra);
    assert_digits_grid(&qa, COUNT);
    let (w, _, _, fp) = decode(&fa);
    let (_, _, _, qp) = decode(&qa);
    // Cells are 64 px with 2 px gaps, ⌈√COUNT⌉ columns: a pixel belongs to a sample
    // unless it falls in a gap or in an empty cell of the last row.
    let cols = (1..=COUNT).find(|k| k * k >= COUNT).unwrap();
    let in_sample =
        |x: usize, y: usize| x % 66 < 64 && y % 66 < 64 && (y / 66) * cols + x / 66 < COUNT;
    let (mut se, mut n) = (0f64, 0usize);
    for (k, (&a, &b)) in fp.iter().zip(&qp).enumerate() {
        let (x, y) = (k % w as usize, k / w as usize);
        if in_sample(x, y) {
            se += (a as f64 - b as f64).powi(2);
            n += 1;
        }
    }
    let png_psnr = 10.0 * (255f64.powi(2) / (se / n as f64).max(1e-20)).log10();
    eprintln!("PNG grids: int8 vs float PSNR {png_psnr:.2} dB over {n} sample pixels");
    assert!(png_psnr >= MIN_PSNR_DB, "grid PSNR {png_psnr:.2} dB");
}
