//! Tests of weight-rounding reconstruction against plain references.

use super::*;

/// A random layer: W [n, k] with a few large weights, inputs X [k, s] correlated
/// through a low-rank mix plus noise and per-feature offsets.
fn layer(n: usize, k: usize, s: usize, rank: usize, seed: u64) -> (Vec<f32>, Vec<f32>) {
    let mut rng = SplitMix64::new(seed);
    let w: Vec<f32> = (0..n * k)
        .map(|_| (rng.normal() * 0.1 / (k as f64).sqrt()) as f32)
        .collect();
    let mix: Vec<f64> = (0..k * rank).map(|_| rng.normal()).collect();
    let off: Vec<f64> = (0..k).map(|_| rng.normal() * 0.5).collect();
    let mut x = vec![0f32; k * s];
    for c in 0..s {
        let z: Vec<f64> = (0..rank).map(|_| rng.normal()).collect();
        for i in 0..k {
            let v: f64 =
                (0..rank).map(|r| mix[i * rank + r] * z[r]).sum::<f64>() / (rank as f64).sqrt();
            x[i * s + c] = (v + 0.3 * rng.normal() + off[i]) as f32;
        }
    }
    (w, x)
}

fn minmax_scales(w: &[f32], n: usize, k: usize, qmax: i32) -> Vec<f32> {
    (0..n)
        .map(|r| {
            let m = w[r * k..(r + 1) * k]
                .iter()
                .fold(0f32, |a, v| a.max(v.abs()));
            if m > 0.0 {
                m / qmax as f32
            } else {
                1.0
            }
        })
        .collect()
}

fn err_of(q: &[i8], w: &[f32], n: usize, k: usize, scales: &[f32], h: &Hessian) -> f64 {
    output_error(w, &dequantize(q, n, k, scales), h)
}

/// f64 reference of the AdaRound loss (reconstruction over all S columns + regulariser).
#[allow(clippy::too_many_arguments)]
fn loss_f64(
    v: &[f64],
    base: &[f32],
    w: &[f32],
    x: &[f32],
    n: usize,
    k: usize,
    s: usize,
    scales: &[f32],
    qmax: i32,
    reg: Reg,
) -> f64 {
    let mut rec = 0.0;
    let mut regl = 0.0;
    let mut dw = vec![0f64; n * k];
    for r in 0..n {
        for i in 0..k {
            let sig = 1.0 / (1.0 + (-v[r * k + i]).exp());
            let h = (sig * 1.2 - 0.1).clamp(0.0, 1.0);
            let xq = (base[r * k + i] as f64 + h).clamp(-qmax as f64, qmax as f64);
            dw[r * k + i] = scales[r] as f64 * xq - w[r * k + i] as f64;
            let u = (2.0 * h - 1.0).abs();
            regl += reg.lambda as f64 * (1.0 - u.powf(reg.beta as f64));
        }
    }
    for r in 0..n {
        for c in 0..s {
            let y: f64 = (0..k).map(|i| dw[r * k + i] * x[i * s + c] as f64).sum();
            rec += y * y;
        }
    }
    rec / s as f64 + regl
}

#[test]
fn adaround_gradient_matches_finite_differences() {
    let (n, k, s, qmax) = (6, 20, 40, 7);
    let (mut w, x) = layer(n, k, s, 4, 11);
    let scales = minmax_scales(&w, n, k, qmax);
    // One weight far beyond the range: its clamp blocks the reconstruction gradient.
    w[3] = scales[0] * 9.4;
    let mut ada = AdaState::new(&w, n, k, &scales, qmax);
    // Put every h strictly inside (0, 1), away from the kinks.
    let mut rng = SplitMix64::new(3);
    for e in ada.el.iter_mut() {
        let h = 0.1 + 0.8 * rng.uniform() as f32;
        let p = (h + 0.1) / 1.2;
        e.v = (p / (1.0 - p)).ln();
    }
    let reg = Reg {
        on: true,
        lambda: 0.01,
        beta: 3.0,
    };
    let base: Vec<f32> = ada.el.iter().map(|e| e.base).collect();
    for grad in [AdaRoundGrad::Gram, AdaRoundGrad::MiniBatch] {
        let opts = AdaRoundOpts {
            grad,
            batch: s, // the whole data: exact
            ..AdaRoundOpts::default()
        };
        let obj = Objective::new(&x, k, s, None, &opts);
        ada.forward();
        let mut rng = SplitMix64::new(0);
        ada.rec_grad(&obj, &mut rng);
        let mut g = vec![0f32; n * k];
        ada.grad_v(reg, &mut g);
        let v0: Vec<f64> = ada.el.iter().map(|e| e.v as f64).collect();
        let mut fd = vec![0f64; n * k];
        let eps = 1e-4;
        for idx in 0..n * k {
            let mut vp = v0.clone();
            vp[idx] += eps;
            let lp = loss_f64(&vp, &base, &w, &x, n, k, s, &scales, qmax, reg);
            vp[idx] -= 2.0 * eps;
            let lm = loss_f64(&vp, &base, &w, &x, n, k, s, &scales, qmax, reg);
            fd[idx] = (lp - lm) / (2.0 * eps);
        }
        let num: f64 = g
            .iter()
            .zip(&fd)
            .map(|(&a, &b)| (a as f64 - b).powi(2))
            .sum();
        let den: f64 = fd.iter().map(|b| b * b).sum();
        let rel = (num / den).sqrt();
        let maxabs = fd.iter().fold(0f64, |m, v| m.max(v.abs()));
        let worst = g
            .iter()
            .zip(&fd)
            .filter(|(_, b)| b.abs() > 1e-2 * maxabs)
            .map(|(&a, &b)| ((a as f64 - b) / b).abs())
            .fold(0f64, f64::max);
        eprintln!("{grad:?}: gradient rel. error {rel:.2e} (norm), worst element {worst:.2e}");
        assert!(rel < 1e-3, "{grad:?}: relative error {rel}");
        assert!(worst < 1e-2, "{grad:?}: worst element {worst}");
        assert_eq!(
            g[3],
            (ada.el[3].dh * reg.value_grad(ada.el[3].h).1),
            "clamped weight"
        );
    }
}

#[test]
fn gptq_and_adaround_beat_rtn_at_4_bits() {
    let (n, k, s, qmax) = (16, 64, 512, 7);
    let (w, x) = layer(n, k, s, 6, 5);
    let scales = minmax_scales(&w, n, k, qmax);
    let h = Hessian::from_gram(gram(&x, k, s), k, s);
    let e_rtn = err_of(&rtn(&w, n, k, &scales, qmax), &w, n, k, &scales, &h);
    let e_gptq = err_of(
        &gptq(&w, n, k, &h, &scales, qmax, 0.01, 16),
        &w,
        n,
        k,
        &scales,
        &h,
    );
    let opts = AdaRoundOpts {
        iters: 3000,
        lr: 1e-2,
        ..AdaRoundOpts::default()
    };
    let e_ada = err_of(
        &adaround_with(&w, n, k, &x, s, None, &scales, qmax, &opts),
        &w,
        n,
        k,
        &scales,
        &h,
    );
    eprintln!(
        "4-bit output error: RTN {e_rtn:.4e}, GPTQ {e_gptq:.4e} ({:.3}× RTN), AdaRound {e_ada:.4e} ({:.3}× RTN)",
        e_gptq / e_rtn,
        e_ada / e_rtn
    );
    assert!(e_gptq < 0.7 * e_rtn, "GPTQ {e_gptq} vs RTN {e_rtn}");
    assert!(e_ada < 0.7 * e_rtn, "AdaRound {e_ada} vs RTN {e_rtn}");
}

#[test]
fn reconstruct_is_never_worse_than_rtn() {
    let (n, k, s, qmax) = (8, 32, 128, 7);
    let (w, x) = layer(n, k, s, 3, 9);
    let scales = minmax_scales(&w, n, k, qmax);
    let h = Hessian::from_gram(gram(&x, k, s), k, s);
    let rtn_err = err_of(&rtn(&w, n, k, &scales, qmax), &w, n, k, &scales, &h);
    let methods = [
        Method::Rtn,
        Method::gptq_default(),
        Method::Gptq {
            damp: 0.0,
            block: 1,
        },
        Method::AdaRound(AdaRoundOpts {
            iters: 200,
            lr: 1e-2,
            ..AdaRoundOpts::default()
        }),
    ];
    for m in &methods {
        let r = reconstruct(m, &w, n, k, &x, s, &h, &scales, qmax);
        assert!(r.error <= rtn_err, "{m:?}: {} > {rtn_err}", r.error);
        assert_eq!(r.error, err_of(&r.q, &w, n, k, &scales, &h));
    }
    // A deliberately bad candidate (RTN pushed one step up everywhere) falls back.
    let q_rtn = rtn(&w, n, k, &scales, qmax);
    let bad: Vec<i8> = q_rtn.iter().map(|&v| (v + 1).min(qmax as i8)).collect();
    let r = never_worse_than_rtn(Some(bad), &w, n, k, &h, &scales, qmax);
    assert!(r.fell_back);
    assert_eq!(r.q, q_rtn);
    assert_eq!(r.error, rtn_err);
    // 2 bits, where rounding choices matter most, across seeds.
    for seed in 0..4 {
        let (w, x) = layer(n, k, s, 3, 100 + seed);
        let scales = minmax_scales(&w, n, k, 1);
        let h = Hessian::from_gram(gram(&x, k, s), k, s);
        let rtn_err = err_of(&rtn(&w, n, k, &scales, 1), &w, n, k, &scales, &h);
        for m in &methods {
            let r = reconstruct(m, &w, n, k, &x, s, &h, &scales, 1);
            assert!(r.error <= rtn_err);
        }
    }
}

#[test]
fn gptq_with_identity_hessian_is_rtn() {
    for (n, k, qmax, block) in [(7, 33, 7, 8), (16, 130, 127, 128), (3, 5, 1, 2)] {
        let mut rng = SplitMix64::new(n as u64 * 31 + k as u64);
        let w: Vec<f32> = (0..n * k).map(|_| rng.normal() as f32).collect();
        let scales = minmax_scales(&w, n, k, qmax);
        let mut h = vec![0f64; k * k];
        for i in 0..k {
            h[i * k + i] = 1.0;
        }
        let h = Hessian::from_gram(h, k, 1);
        assert_eq!(
            gptq(&w, n, k, &h, &scales, qmax, 0.01, block),
            rtn(&w, n, k, &scales, qmax)
        );
    }
}

/// GPTQ as it was before blocks: the push form through the upper Cholesky factor of
/// H⁻¹ (`linalg`, f64), one K×K H, one thread. The reference of the tests below.
#[allow(clippy::too_many_arguments)]
fn gptq_reference(
    w: &[f32],
    n: usize,
    k: usize,
    x_gram: &[f64],
    scales: &[f32],
    qmax: i32,
    damp: f64,
    block: usize,
) -> Vec<i8> {
    let mut wk: Vec<f64> = w.iter().map(|&v| v as f64).collect();
    let mut h = x_gram.to_vec();
    let mut diag_sum = 0.0;
    for i in 0..k {
        if h[i * k + i] == 0.0 {
            h[i * k + i] = 1.0;
            for r in 0..n {
                wk[r * k + i] = 0.0;
            }
        }
        diag_sum += h[i * k + i];
    }
    let mean_diag = diag_sum / k as f64;
    let mut u = None;
    let mut lambda = damp.max(0.0) * mean_diag;
    for _ in 0..5 {
        let mut hd = h.clone();
        for i in 0..k {
            hd[i * k + i] += lambda;
        }
        if let Ok(f) = linalg::upper_cholesky_of_inverse(&hd, k) {
            u = Some(f);
            break;
        }
        lambda = if lambda > 0.0 {
            lambda * 10.0
        } else {
            1e-6 * mean_diag.max(f64::MIN_POSITIVE)
        };
    }
    let Some(u) = u else {
        return rtn(w, n, k, scales, qmax);
    };
    let mut q = vec![0i8; n * k];
    for r in 0..n {
        let s = scales[r];
        let wrow = &mut wk[r * k..(r + 1) * k];
        let mut i1 = 0;
        while i1 < k {
            let i2 = (i1 + block).min(k);
            let mut err = vec![0f64; i2 - i1];
            for i in i1..i2 {
                let qi = round_value(wrow[i] as f32, s, qmax);
                q[r * k + i] = qi;
                let e = (wrow[i] - qi as f64 * s as f64) / u[i * k + i];
                err[i - i1] = e;
                for j in i + 1..i2 {
                    wrow[j] -= e * u[i * k + j];
                }
            }
            for (b, &e) in err.iter().enumerate() {
                for j in i2..k {
                    wrow[j] -= e * u[(i1 + b) * k + j];
                }
            }
            i1 = i2;
        }
    }
    q
}

/// The layers of the GPTQ tests above and a few larger ones: (n, k, s, rank, seed,
/// qmax, lazy block).
const GPTQ_CASES: [(usize, usize, usize, usize, u64, i32, usize); 9] = [
    (16, 64, 512, 6, 5, 7, 16),
    (8, 32, 128, 3, 9, 7, 128),
    (8, 32, 128, 3, 9, 7, 1),
    (8, 32, 128, 3, 100, 1, 128),
    (8, 32, 128, 3, 103, 1, 128),
    (4, 10, 50, 3, 2, 7, 4),
    (64, 300, 1000, 8, 21, 7, 128),
    (32, 576, 2000, 12, 22, 127, 128),
    (24, 1152, 1500, 16, 23, 7, 128),
];

#[test]
fn gptq_with_one_block_equals_the_reference_gptq() {
    let (mut same, mut total) = (0usize, 0usize);
    for (n, k, s, rank, seed, qmax, block) in GPTQ_CASES {
        let (w, x) = layer(n, k, s, rank, seed);
        let scales = minmax_scales(&w, n, k, qmax);
        let g = gram(&x, k, s);
        let reference = gptq_reference(&w, n, k, &g, &scales, qmax, 0.01, block);
        let h = Hessian::from_gram(g, k, s);
        let q = gptq(&w, n, k, &h, &scales, qmax, 0.01, block);
        same += q.iter().zip(&reference).filter(|(a, b)| a == b).count();
        total += q.len();
        let (e, e_ref) = (
            err_of(&q, &w, n, k, &scales, &h),
            err_of(&reference, &w, n, k, &scales, &h),
        );
        assert!(
            (e - e_ref).abs() <= 1e-9 * e_ref,
            "{n}×{k}: error {e} vs reference {e_ref}"
        );
    }
    eprintln!("one-block GPTQ vs the reference: {same} of {total} integers equal");
    assert_eq!(same, total);
}

#[test]
fn blocked_gptq_beats_rtn_in_its_own_error() {
    for (n, k, s, rank, seed, qmax, block) in GPTQ_CASES {
        let (w, x) = layer(n, k, s, rank, seed);
        let scales = minmax_scales(&w, n, k, qmax);
        for b in [8, 33, 64, 256] {
            let mut h = Hessian::new(k, &HessianLayout::blocked(b, 1));
            h.accumulate(&x, s);
            let q = gptq(&w, n, k, &h, &scales, qmax, 0.01, block);
            let (e, e_rtn) = (
                err_of(&q, &w, n, k, &scales, &h),
                err_of(&rtn(&w, n, k, &scales, qmax), &w, n, k, &scales, &h),
            );
            assert!(e <= e_rtn, "{n}×{k}, blocks of {b}: {e} > RTN {e_rtn}");
            let r = never_worse_than_rtn(Some(q), &w, n, k, &h, &scales, qmax);
            assert!(!r.fell_back && r.error == e && r.rtn_error == e_rtn);
        }
    }
}

#[test]
fn blocked_f32_hessian_gives_the_gptq_of_the_block_diagonal_matrix() {
    let (n, k, s, qmax) = (48, 576, 2000, 7);
    let (w, x) = layer(n, k, s, 10, 31);
    let scales = minmax_scales(&w, n, k, qmax);
    let layout = HessianLayout::blocked(128, 9);
    let mut h = Hessian::new(k, &layout);
    h.accumulate(&x, s);
    // The same approximation from the f64 Gram, off-block entries zeroed.
    let mut g = gram(&x, k, s);
    let bounds = layout.bounds(k);
    let block_of = |i: usize| bounds.iter().rposition(|&b| b <= i).unwrap();
    for i in 0..k {
        for j in 0..k {
            if block_of(i) != block_of(j) {
                g[i * k + j] = 0.0;
            }
        }
    }
    let h64 = Hessian::from_gram(g, k, s);
    let q = gptq(&w, n, k, &h, &scales, qmax, 0.01, 128);
    let q64 = gptq(&w, n, k, &h64, &scales, qmax, 0.01, 128);
    let same = q.iter().zip(&q64).filter(|(a, b)| a == b).count();
    let (e, e64) = (
        err_of(&q, &w, n, k, &scales, &h64),
        err_of(&q64, &w, n, k, &scales, &h64),
    );
    eprintln!(
        "f32 blocks vs f64 block-diagonal H: {same} of {} integers equal, error {e:.6e} vs {e64:.6e}",
        q.len()
    );
    assert!(same as f64 >= 0.999 * q.len() as f64);
    assert!((e - e64).abs() <= 1e-3 * e64);
    // Both errors of the f32 H agree with the f64 one.
    let e32 = err_of(&q, &w, n, k, &scales, &h);
    assert!((e32 - e).abs() <= 1e-5 * e, "{e32} vs {e}");
}

#[test]
fn gptq_and_output_error_do_not_depend_on_threads() {
    let (n, k, s, qmax) = (37, 400, 900, 7);
    let (w, x) = layer(n, k, s, 8, 41);
    let scales = minmax_scales(&w, n, k, qmax);
    for layout in [HessianLayout::exact(), HessianLayout::blocked(150, 1)] {
        let mut h = Hessian::new(k, &layout);
        h.accumulate(&x, s);
        let one = gptq_with(&w, n, k, &h, &scales, qmax, 0.01, 128, Some(1));
        let dq = dequantize(&one, n, k, &scales);
        let e1 = output_errors(&w, &[&dq], &h, Some(1));
        for t in [2, 3] {
            assert_eq!(
                gptq_with(&w, n, k, &h, &scales, qmax, 0.01, 128, Some(t)),
                one
            );
            assert_eq!(output_errors(&w, &[&dq], &h, Some(t)), e1);
        }
    }
}

#[test]
fn output_error_equals_the_naive_quadratic_form() {
    let (n, k, s) = (5, 300, 400);
    let (w, x) = layer(n, k, s, 4, 43);
    let scales = minmax_scales(&w, n, k, 7);
    let dq = dequantize(&rtn(&w, n, k, &scales, 7), n, k, &scales);
    let g = gram(&x, k, s);
    let naive: f64 = (0..n)
        .map(|r| {
            let d: Vec<f64> = (0..k)
                .map(|i| (w[r * k + i] - dq[r * k + i]) as f64)
                .collect();
            (0..k)
                .map(|i| d[i] * (0..k).map(|j| g[i * k + j] * d[j]).sum::<f64>())
                .sum::<f64>()
        })
        .sum();
    let e = output_error(&w, &dq, &Hessian::from_gram(g, k, s));
    assert!((e - naive).abs() <= 1e-10 * naive, "{e} vs {naive}");
}

/// Peak resident memory of this process (VmHWM, bytes).
fn peak_rss() -> usize {
    let st = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    st.lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(0)
        * 1024
}

/// GPTQ at Stable Diffusion's largest K: N×K = 1280×11,520 and 1280×23,040, inputs
/// streamed as 8 batches of 256 columns (as `layer_inputs` gives them) into a
/// block-diagonal [`Hessian`] with blocks of ≤ 2048 and ≤ 4096. Wall time (both cores
/// when free) and CPU time; each result is also scored by the exact output error
/// `||ΔW X||²` on the columns themselves. `cargo test --release -p tfmqc-passes --lib
/// bench_gptq_sd_scale -- --ignored --nocapture` (peak memory ~1.3 GB).
#[test]
#[ignore]
fn bench_gptq_sd_scale() {
    let cpu = crate::numerics::quant::tests::process_cpu;
    for (n, k) in [(1280usize, 11_520usize), (1280, 23_040)] {
        let mut rng = SplitMix64::new(k as u64);
        let w: Vec<f32> = (0..n * k)
            .map(|_| (rng.normal() / (k as f64).sqrt()) as f32)
            .collect();
        // Conv-like inputs: channels mixed from 16 latent signals, noise, offsets;
        // kept as Xᵀ [S, K] per batch for the exact error.
        let (rank, s, batches) = (16, 256, 8);
        let mix: Vec<f32> = (0..k * rank).map(|_| rng.normal() as f32).collect();
        let off: Vec<f32> = (0..k).map(|_| (rng.normal() * 0.5) as f32).collect();
        let xs: Vec<Vec<f32>> = (0..batches)
            .map(|_| {
                let z: Vec<f32> = (0..rank * s).map(|_| rng.normal() as f32).collect();
                let mut x = vec![0f32; k * s];
                for (i, row) in x.chunks_mut(s).enumerate() {
                    for (c, v) in row.iter_mut().enumerate() {
                        let mut a = 0f32;
                        for r in 0..rank {
                            a += mix[i * rank + r] * z[r * s + c];
                        }
                        *v = (a * 0.25 + off[i]).max(0.0) + 0.3 * rng.normal() as f32;
                    }
                }
                x
            })
            .collect();
        let exact_error = |q: &[i8], scales: &[f32]| -> f64 {
            let dw: Vec<f32> = w
                .iter()
                .zip(dequantize(q, n, k, scales))
                .map(|(a, b)| a - b)
                .collect();
            let mut total = 0f64;
            for x in &xs {
                let mut xt = vec![0f32; s * k];
                for (i, row) in x.chunks(s).enumerate() {
                    for (c, &v) in row.iter().enumerate() {
                        xt[c * k + i] = v;
                    }
                }
                let mut y = vec![0f32; n * s];
                dense::par_nt_update(
                    &mut y,
                    s,
                    &dw,
                    k,
                    &xt,
                    k,
                    (n, s, k),
                    dense::Acc::Add,
                    None,
                    2,
                );
                total += y.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>();
            }
            total
        };
        let scales = minmax_scales(&w, n, k, 7);
        let e_rtn = exact_error(&rtn(&w, n, k, &scales, 7), &scales);
        for block in [2048, 4096] {
            let layout = HessianLayout::blocked(block, 9);
            let mut h = Hessian::new(k, &layout);
            let (t, c) = (std::time::Instant::now(), cpu());
            for x in &xs {
                h.accumulate(x, s);
            }
            let (t_acc, c_acc) = (t.elapsed().as_secs_f64(), cpu() - c);
            let (t, c) = (std::time::Instant::now(), cpu());
            let q = gptq(&w, n, k, &h, &scales, 7, 0.01, 128);
            let (t_gptq, c_gptq) = (t.elapsed().as_secs_f64(), cpu() - c);
            let (t, c) = (std::time::Instant::now(), cpu());
            let r = never_worse_than_rtn(Some(q), &w, n, k, &h, &scales, 7);
            let (t_err, c_err) = (t.elapsed().as_secs_f64(), cpu() - c);
            let bounds = layout.bounds(k);
            eprintln!(
                "N×K = {n}×{k}, B = {block}: {} blocks of ≤ {}, Hessian {:.0} MB (f32), GPTQ work buffers {:.0} MB",
                bounds.len() - 1,
                bounds.windows(2).map(|b| b[1] - b[0]).max().unwrap(),
                h.bytes() as f64 / 1e6,
                layout.work_bytes(n, k) as f64 / 1e6
            );
            eprintln!(
                "  accumulate {} columns: {t_acc:.1} s wall, {c_acc:.1} s CPU; gptq: {t_gptq:.1} s wall, {c_gptq:.1} s CPU; output errors (RTN + GPTQ): {t_err:.1} s wall, {c_err:.1} s CPU",
                batches * s
            );
            eprintln!(
                "  4-bit output error relative to RTN: {:.3} block-diagonal, {:.3} exact; peak RSS so far {:.2} GB",
                r.error / r.rtn_error,
                exact_error(&r.q, &scales) / e_rtn,
                peak_rss() as f64 / 1e9
            );
        }
    }
}

#[test]
fn gptq_dead_inputs_get_zero() {
    let (n, k, s, qmax) = (4, 10, 50, 7);
    let (w, mut x) = layer(n, k, s, 3, 2);
    for c in 0..s {
        x[2 * s + c] = 0.0;
    }
    let scales = minmax_scales(&w, n, k, qmax);
    let h = Hessian::from_gram(gram(&x, k, s), k, s);
    let q = gptq(&w, n, k, &h, &scales, qmax, 0.01, 4);
    for r in 0..n {
        assert_eq!(q[r * k + 2], 0);
    }
}

/// `gram` as it was: the full square by `matmul_nn`, added, then mirrored.
fn gram_reference(x: &[f32], k: usize, s: usize) -> Vec<f64> {
    const CHUNK: usize = 256;
    let mut h = vec![0f64; k * k];
    let mut part = vec![0f32; k * k];
    let mut c0 = 0;
    while c0 < s {
        let c1 = (c0 + CHUNK).min(s);
        let w = c1 - c0;
        let (mut xc, mut xct) = (vec![0f32; k * w], vec![0f32; k * w]);
        for (i, (dst, src)) in xc.chunks_mut(w).zip(x.chunks(s)).enumerate() {
            dst.copy_from_slice(&src[c0..c1]);
            for (j, &v) in dst.iter().enumerate() {
                xct[j * k + i] = v;
            }
        }
        matmul_nn(&xc, &xct, &mut part, k, w, k, 1);
        for (hv, &pv) in h.iter_mut().zip(part.iter()) {
            *hv += pv as f64;
        }
        c0 = c1;
    }
    for i in 0..k {
        for j in 0..i {
            h[j * k + i] = h[i * k + j];
        }
    }
    h
}

#[test]
fn gram_is_the_reference_gram_bit_for_bit() {
    for (k, s) in [
        (1, 1),
        (13, 300),
        (37, 17),
        (200, 300),
        (301, 600),
        (64, 513),
    ] {
        let (_, x) = layer(1, k, s, 3, k as u64);
        assert_eq!(gram(&x, k, s), gram_reference(&x, k, s), "{k}×{s}");
    }
}

#[test]
fn gram_matches_naive() {
    let (k, s) = (13, 300);
    let (_, x) = layer(1, k, s, 2, 4);
    let h = gram(&x, k, s);
    for i in 0..k {
        for j in 0..k {
            let r: f64 = (0..s)
                .map(|c| x[i * s + c] as f64 * x[j * s + c] as f64)
                .sum();
            assert!(
                (h[i * k + j] - r).abs() <= 1e-5 * r.abs().max(1.0),
                "{i} {j}"
            );
        }
    }
}

#[test]
fn matmul_kernels_match_naive() {
    let mut rng = SplitMix64::new(8);
    for (m, p, q) in [
        (1, 1, 1),
        (5, 7, 9),
        (9, 17, 600),
        (4, 8, 8),
        (8, 3, 32),
        (13, 40, 47),
    ] {
        let a: Vec<f32> = (0..m * p).map(|_| rng.normal() as f32).collect();
        let b: Vec<f32> = (0..p * q).map(|_| rng.normal() as f32).collect();
        let mut c1 = vec![0f32; m * q];
        matmul_nn(&a, &b, &mut c1, m, p, q, 2);
        for i in 0..m {
            for j in 0..q {
                let r: f32 = (0..p).map(|t| a[i * p + t] * b[t * q + j]).sum();
                assert!((c1[i * q + j] - r).abs() < 1e-4 * (1.0 + r.abs()));
            }
        }
    }
}

#[test]
fn cholesky_and_solves_on_known_matrix() {
    use linalg::*;
    // A = L Lᵀ with L = [[2,0,0],[6,1,0],[-8,5,3]] (the classic example).
    let a = [4.0, 12.0, -16.0, 12.0, 37.0, -43.0, -16.0, -43.0, 98.0];
    let l = cholesky(&a, 3).unwrap();
    let l_ref = [2.0, 0.0, 0.0, 6.0, 1.0, 0.0, -8.0, 5.0, 3.0];
    for (x, y) in l.iter().zip(l_ref) {
        assert!((x - y).abs() < 1e-12);
    }
    // A x = b with x = (1, −2, 3).
    let xs = [1.0, -2.0, 3.0];
    let b: Vec<f64> = (0..3)
        .map(|i| (0..3).map(|j| a[i * 3 + j] * xs[j]).sum())
        .collect();
    let x = cholesky_solve(&l, 3, &b);
    for (u, v) in x.iter().zip(xs) {
        assert!((u - v).abs() < 1e-10);
    }
    // L y = b and Lᵀ x = y separately.
    let y = solve_lower(&l, 3, &b);
    let ly: Vec<f64> = (0..3)
        .map(|i| (0..3).map(|j| l[i * 3 + j] * y[j]).sum())
        .collect();
    for (u, v) in ly.iter().zip(&b) {
        assert!((u - v).abs() < 1e-10);
    }
    // A⁻¹ (known exactly: inverse of this matrix).
    let inv = cholesky_inverse(&l, 3);
    let inv_ref = [
        1777.0 / 36.0,
        -122.0 / 9.0,
        19.0 / 9.0,
        -122.0 / 9.0,
        34.0 / 9.0,
        -5.0 / 9.0,
        19.0 / 9.0,
        -5.0 / 9.0,
        1.0 / 9.0,
    ];
    for (u, v) in inv.iter().zip(inv_ref) {
        assert!((u - v).abs() < 1e-9, "{u} vs {v}");
    }
    // Upper Cholesky of A⁻¹: Uᵀ U = A⁻¹, U upper with positive diagonal, and it
    // equals cholesky(A⁻¹)ᵀ.
    let u = upper_cholesky_of_inverse(&a, 3).unwrap();
    let l2 = cholesky(&inv_ref, 3).unwrap();
    for i in 0..3 {
        for j in 0..3 {
            assert!((u[i * 3 + j] - l2[j * 3 + i]).abs() < 1e-9);
            let utu: f64 = (0..3).map(|t| u[t * 3 + i] * u[t * 3 + j]).sum();
            assert!((utu - inv_ref[i * 3 + j]).abs() < 1e-9);
        }
    }
    // Not positive definite.
    assert!(cholesky(&[1.0, 2.0, 2.0, 1.0], 2).is_err());
    // Larger random SPD: inverse times A is the identity; invert_lower is exact.
    let n = 40;
    let mut rng = SplitMix64::new(1);
    let g: Vec<f64> = (0..n * n).map(|_| rng.normal()).collect();
    let mut spd = vec![0f64; n * n];
    for i in 0..n {
        for j in 0..n {
            spd[i * n + j] = (0..n).map(|t| g[i * n + t] * g[j * n + t]).sum::<f64>()
                + if i == j { 1.0 } else { 0.0 };
        }
    }
    let l = cholesky(&spd, n).unwrap();
    let inv = cholesky_inverse(&l, n);
    let u = upper_cholesky_of_inverse(&spd, n).unwrap();
    for i in 0..n {
        for j in 0..n {
            let p: f64 = (0..n).map(|t| inv[i * n + t] * spd[t * n + j]).sum();
            assert!((p - if i == j { 1.0 } else { 0.0 }).abs() < 1e-8);
            let utu: f64 = (0..n).map(|t| u[t * n + i] * u[t * n + j]).sum();
            assert!((utu - inv[i * n + j]).abs() < 1e-8 * (1.0 + inv[i * n + j].abs()));
            if j < i {
                assert_eq!(u[i * n + j], 0.0);
            }
        }
    }
}

/// CPU time of this thread (s), from /proc (10 ms resolution).
fn thread_cpu() -> f64 {
    let st = std::fs::read_to_string("/proc/thread-self/stat").unwrap_or_default();
    let f: Vec<&str> = st
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    let t = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (t(11) + t(12)) / 100.0
}

#[test]
#[ignore]
fn bench_kernels() {
    let mut rng = SplitMix64::new(1);
    for (m, p, q) in [(64, 576, 576), (256, 1152, 1152), (256, 256, 1152)] {
        let a: Vec<f32> = (0..m * p).map(|_| rng.normal() as f32).collect();
        let b: Vec<f32> = (0..p * q).map(|_| rng.normal() as f32).collect();
        let mut c = vec![0f32; m * q];
        let reps = (4e9 / (m * p * q) as f64).ceil() as usize;
        let t = thread_cpu();
        for _ in 0..reps {
            kernels::nn(&a, &b, &mut c, m, p, q);
        }
        let dt = thread_cpu() - t;
        eprintln!(
            "nn {m}x{p}x{q}: {:.2} GFMA/s (cpu)",
            (m * p * q * reps) as f64 / dt / 1e9
        );
    }
}

#[test]
#[ignore]
fn bench_adaround_step() {
    let (n, k, s) = (256, 1152, 2048);
    let (w, x) = layer(n, k, s, 8, 1);
    let scales = minmax_scales(&w, n, k, 7);
    for grad in [AdaRoundGrad::Gram, AdaRoundGrad::MiniBatch] {
        let opts = AdaRoundOpts {
            grad,
            ..AdaRoundOpts::default()
        };
        let obj = Objective::new(&x, k, s, None, &opts);
        let mut ada = AdaState::new(&w, n, k, &scales, 7);
        ada.threads = 1;
        let mut rng = SplitMix64::new(0);
        let reg = Reg {
            on: true,
            lambda: 0.01,
            beta: 7.3,
        };
        let reps = 20;
        let (mut tf, mut tg, mut ta) = (0.0, 0.0, 0.0);
        for it in 0..reps {
            let t0 = thread_cpu();
            ada.forward();
            let t1 = thread_cpu();
            ada.rec_grad(&obj, &mut rng);
            let t2 = thread_cpu();
            ada.adam_step(reg, 1e-3, it + 1);
            let t3 = thread_cpu();
            tf += t1 - t0;
            tg += t2 - t1;
            ta += t3 - t2;
        }
        let r = 1e3 / reps as f64;
        eprintln!(
            "{grad:?} 1 thread: forward {:.1} ms, rec grad {:.1} ms, adam {:.1} ms",
            tf * r,
            tg * r,
            ta * r
        );
    }
}

/// `X X̃ᵀ` of two inputs at the same positions, against the plain triple loop (several
/// chunks of columns).
#[test]
fn cross_gram_is_x_times_quantized_x_transposed() {
    let (k, s) = (7, 600);
    let (_, x) = layer(1, k, s, 3, 11);
    let (_, xq) = layer(1, k, s, 3, 12);
    let mut c = vec![0f64; k * k];
    add_cross_gram(&x, &xq, k, s, &mut c);
    for i in 0..k {
        for j in 0..k {
            let want: f64 = (0..s)
                .map(|t| x[i * s + t] as f64 * xq[j * s + t] as f64)
                .sum();
            assert!(
                (c[i * k + j] - want).abs() <= 1e-4 * want.abs().max(1.0),
                "C[{i},{j}] = {}, want {want}",
                c[i * k + j]
            );
        }
    }
}

/// The aligned target minimises ‖W X − W' X̃‖² (+ a small ridge toward W): with X̃ = X it
/// is W; with X̃ = A X (a drift of the inputs, no noise) it is W A⁻¹, which gives the float
/// output back from the drifted inputs exactly, and GPTQ rounding it against X̃ X̃ᵀ beats
/// rounding W itself against X̃ X̃ᵀ on the float-output error.
#[test]
fn aligned_target_undoes_a_drift_of_the_inputs() {
    let (n, k, s) = (6, 5, 400);
    let (w, x) = layer(n, k, s, 5, 21);
    let h = gram(&x, k, s);
    let mut c = vec![0f64; k * k];
    add_cross_gram(&x, &x, k, s, &mut c);
    let same = aligned_target(&w, n, k, &h, &c, 1e-9).unwrap();
    for (a, b) in w.iter().zip(&same) {
        assert!((a - b).abs() < 1e-5, "{a} vs {b}");
    }
    // X̃ = A X, A = I + a small off-diagonal mix and per-channel gains.
    let mut a = vec![0f64; k * k];
    let mut rng = SplitMix64::new(5);
    for i in 0..k {
        for j in 0..k {
            a[i * k + j] = if i == j {
                1.0 + 0.2 * rng.normal()
            } else {
                0.1 * rng.normal()
            };
        }
    }
    let mut xq = vec![0f32; k * s];
    for i in 0..k {
        for t in 0..s {
            xq[i * s + t] = (0..k)
                .map(|j| a[i * k + j] * x[j * s + t] as f64)
                .sum::<f64>() as f32;
        }
    }
    let hq = gram(&xq, k, s);
    let mut c = vec![0f64; k * k];
    add_cross_gram(&x, &xq, k, s, &mut c);
    let wt = aligned_target(&w, n, k, &hq, &c, 1e-9).unwrap();
    // ‖W X − W' X̃‖ relative to ‖W X‖.
    let out = |wm: &[f32], xm: &[f32]| -> Vec<f64> {
        let mut y = vec![0f64; n * s];
        for r in 0..n {
            for t in 0..s {
                y[r * s + t] = (0..k)
                    .map(|i| wm[r * k + i] as f64 * xm[i * s + t] as f64)
                    .sum();
            }
        }
        y
    };
    let (want, got, drifted) = (out(&w, &x), out(&wt, &xq), out(&w, &xq));
    let err = |y: &[f64]| -> f64 { y.iter().zip(&want).map(|(a, b)| (a - b).powi(2)).sum() };
    let norm: f64 = want.iter().map(|v| v * v).sum();
    assert!(err(&got) < 1e-8 * norm, "{} of {norm}", err(&got));
    assert!(err(&drifted) > 1e-3 * norm);
    // Rounded: the aligned target's GPTQ against H̃ beats W's on the float-output error.
    let qmax = 7;
    let scales = minmax_scales(&wt, n, k, qmax);
    let hq = Hessian::from_gram(hq, k, s);
    let q_aligned = dequantize(
        &gptq(&wt, n, k, &hq, &scales, qmax, 0.01, 128),
        n,
        k,
        &scales,
    );
    let q_plain = dequantize(
        &gptq(&w, n, k, &hq, &scales, qmax, 0.01, 128),
        n,
        k,
        &scales,
    );
    assert!(
        err(&out(&q_aligned, &xq)) < err(&out(&q_plain, &xq)),
        "{} vs {}",
        err(&out(&q_aligned, &xq)),
        err(&out(&q_plain, &xq))
    );
}
