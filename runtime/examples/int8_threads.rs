//! Times the int8 kernels (conv, GEMM, product of two activations, fused attention) and
//! the fused group norm at 1 and 2 threads over a range of sizes, to place each kind's
//! work threshold above which a call splits (`kernels::int8::par`). Minimum of several
//! runs: the numbers are meant for a shared machine. The 2-thread runs follow each other,
//! as the ops of a step do, so the worker spins between them.
//!
//! ```text
//! cargo run --release -p tfmqc-runtime --example int8_threads [-- RUNS [FILTER]]
//! ```
//!
//! `TFMQC_MIN_PARALLEL_WORK=0` makes every call split (to see what splitting a small call
//! costs); unset, the runtime's threshold applies.

use std::time::Instant;

use tfmqc_runtime::kernels::int8::{
    attention_quantize, conv2d_quantize, gemm_quantize, matmul_quantize, AttentionOperand,
    AttentionShape, Backend, ConvGeometry, Dequant, Output, PackedConvWeights, PackedWeights,
    ProbQuant, QuantOperand, ScoreScale,
};
use tfmqc_runtime::kernels::norm::{group_norm, GroupNorm};
use tfmqc_runtime::with_threads;

thread_local! {
    static ONLY: std::cell::RefCell<String> = const { std::cell::RefCell::new(String::new()) };
}

fn vals(n: usize, f: f32) -> Vec<f32> {
    (0..n).map(|i| ((i as f32) * f).sin() * 2.0).collect()
}

fn time(runs: usize, threads: usize, f: &mut dyn FnMut()) -> f64 {
    with_threads(threads, || {
        f();
        (0..runs)
            .map(|_| {
                let t = Instant::now();
                f();
                t.elapsed().as_secs_f64() * 1e3
            })
            .fold(f64::INFINITY, f64::min)
    })
}

fn report(what: &str, work: usize, runs: usize, f: &mut dyn FnMut()) {
    if !what.contains(ONLY.with(|o| o.borrow().clone()).as_str()) {
        return;
    }
    let t1 = time(runs, 1, f);
    let t2 = time(runs, 2, f);
    println!(
        "{what:<44} {:>8.3} MMAC  1t {t1:>9.3} ms  2t {t2:>9.3} ms  x{:.2}",
        work as f64 / 1e6,
        t1 / t2
    );
}

fn main() {
    let runs: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(5);
    let only = std::env::args().nth(2).unwrap_or_default();
    ONLY.with(|o| *o.borrow_mut() = only);
    let b = Backend::Auto;
    println!("int8 backend {:?}", Backend::detect());
    // Convolutions: [N, C, H, W], C -> O, 3x3 pad 1.
    for &(n, c, o, h) in &[
        (1usize, 16usize, 16usize, 8usize),
        (1, 32, 32, 8),
        (1, 32, 32, 16),
        (1, 64, 64, 8),
        (1, 32, 32, 28),
        (1, 64, 64, 16),
        (1, 128, 128, 16),
        (1, 64, 64, 32),
        // Batch 2 (classifier-free guidance, or two samples), small planes: too small
        // to split one image, split by image (`Kind::ConvImages`).
        (2, 16, 16, 8),
        (2, 64, 64, 4),
        (2, 32, 32, 8),
        (2, 64, 64, 8),
        (2, 32, 32, 16),
        (2, 128, 128, 32),
        (2, 320, 320, 32),
    ] {
        let geom = ConvGeometry {
            kernel: [3, 3],
            strides: [1, 1],
            pads: [1, 1, 1, 1],
            dilations: [1, 1],
            groups: 1,
        };
        let w: Vec<i8> = (0..o * c * 9).map(|i| (i * 37 % 255) as i8).collect();
        let pw = PackedConvWeights::pack(&w, o, c, geom);
        let x = vals(n * c * h * h, 0.37);
        let ws = vec![0.01f32; o];
        let mut out = vec![0f32; n * o * h * h];
        report(
            &format!("conv3x3 n{n} {c}->{o} @{h}x{h}"),
            n * o * c * 9 * h * h,
            runs,
            &mut || {
                conv2d_quantize(
                    b,
                    &x,
                    [n, c, h, h],
                    0.02,
                    128,
                    &pw,
                    Output::F32 {
                        out: &mut out,
                        dequant: Dequant {
                            a_scale: 0.02,
                            w_scale: &ws,
                            bias: None,
                        },
                    },
                )
            },
        );
    }
    // GEMMs (projections): [M, K] x [K, N].
    for &(m, k, n) in &[
        (64usize, 32usize, 32usize),
        (64, 64, 64),
        (128, 64, 64),
        (256usize, 64usize, 64usize),
        (256, 256, 256),
        (1024, 320, 320),
        (2048, 320, 1280),
    ] {
        let w: Vec<i8> = (0..n * k).map(|i| (i * 37 % 255) as i8).collect();
        let pw = PackedWeights::pack(&w, n, k);
        let x = vals(m * k, 0.37);
        let ws = vec![0.01f32; n];
        let mut out = vec![0f32; m * n];
        report(
            &format!("gemm {m}x{k} . {k}x{n}"),
            m * n * k,
            runs,
            &mut || {
                gemm_quantize(
                    b,
                    &x,
                    m,
                    k,
                    0.02,
                    128,
                    &pw,
                    Output::F32 {
                        out: &mut out,
                        dequant: Dequant {
                            a_scale: 0.02,
                            w_scale: &ws,
                            bias: None,
                        },
                    },
                )
            },
        );
    }
    // Products of two activations (one batch-head of attention).
    for &(m, k, n) in &[
        (256usize, 32usize, 256usize),
        (256, 4, 256),
        (256, 256, 4),
        (1024, 40, 1024),
        (1024, 1024, 40),
        (4096, 40, 4096),
        (4096, 4096, 40),
    ] {
        let x = vals(m * k, 0.37);
        let y = vals(k * n, 0.29);
        let mut out = vec![0f32; m * n];
        let op = |v: &[f32]| QuantOperand {
            values: unsafe { std::slice::from_raw_parts(v.as_ptr(), v.len()) },
            transposed: false,
            scale: 0.02,
            zero_point: 128,
        };
        let (xo, yo) = (op(&x), op(&y));
        report(
            &format!("matmul {m}x{k} . {k}x{n}"),
            m * n * k,
            runs,
            &mut || matmul_quantize(b, xo, yo, m, k, n, &mut out),
        );
    }
    // Fused attention over [B*H] heads: q [M, D], k [N, D], v [N, D].
    // (sd_tiny: 16 × 256 tokens with 2-channel heads, and its 77-token cross-attention.)
    for &(bh, t, nk, d) in &[
        (1usize, 64usize, 64usize, 32usize),
        (4, 64, 64, 16),
        (1, 256, 256, 32),
        (4, 256, 256, 16),
        (16usize, 256usize, 256usize, 2usize),
        (16, 256, 77, 2),
        (16, 64, 77, 4),
        (16, 256, 256, 4),
        (16, 256, 256, 8),
        (16, 256, 256, 16),
        (16, 64, 64, 8),
        // sd_tiny's 8×8 and 4×4 levels (4- and 8-channel heads), unet2d_cond's 16×16 one.
        (16, 64, 64, 4),
        (16, 16, 16, 8),
        (16, 16, 77, 8),
        (8, 256, 256, 8),
        (8, 256, 256, 32),
        (16, 1024, 1024, 40),
        (16, 4096, 4096, 40),
    ] {
        let q = vals(bh * t * d, 0.37);
        let k = vals(bh * nk * d, 0.29);
        let v = vals(bh * nk * d, 0.13);
        let mut out = vec![0f32; bh * t * d];
        let opnd = |v: &[f32], transposed: bool| AttentionOperand {
            values: unsafe { std::slice::from_raw_parts(v.as_ptr(), v.len()) },
            transposed,
            scale: 0.02,
            zero_point: 128,
        };
        let (qo, ko, vo) = (opnd(&q, false), opnd(&k, true), opnd(&v, false));
        if bh * t * nk * d > 4_000_000_000 && runs > 2 {
            continue;
        }
        report(
            &format!("attention {bh}x[{t}x{nk}x{d}]"),
            2 * bh * t * nk * d,
            if t >= 1024 { runs.min(3) } else { runs },
            &mut || {
                attention_quantize(
                    b,
                    qo,
                    ko,
                    vo,
                    ScoreScale::None,
                    ProbQuant {
                        scale: 1.0 / 255.0,
                        zero_point: 0,
                    },
                    AttentionShape {
                        heads: bh,
                        m: t,
                        n: nk,
                        d,
                        dv: d,
                    },
                    &[],
                    &mut out,
                    false,
                )
            },
        );
    }
    // Group norm + SiLU over [N, C, S] in 32 groups (the float op fused before convs).
    for &(n, c, s) in &[
        (1usize, 32usize, 64usize),
        (1, 64, 64),
        (1, 64, 256),
        (1, 128, 256),
        (1, 64, 1024),
        (2, 128, 1024),
        (2, 320, 1024),
    ] {
        let x = vals(n * c * s, 0.37);
        let ones = vec![1f32; c];
        let zeros = vec![0f32; c];
        let p = GroupNorm {
            groups: 32,
            epsilon: 1e-5,
            group_scale: &ones[..32],
            group_bias: &zeros[..32],
            gamma: &ones,
            beta: &zeros,
            silu: true,
        };
        let mut out = vec![0f32; n * c * s];
        report(
            &format!("group_norm n{n} c{c} s{s}"),
            n * c * s,
            runs,
            &mut || group_norm(&x, n, c, s, &p, &mut out),
        );
    }
}
