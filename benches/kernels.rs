//! The int8 kernels alone at Stable Diffusion 1.5 sizes (latent 32, batch 2), every x86
//! backend this CPU runs side by side in one run: milliseconds per call, multiply-adds
//! per second, and each backend's time against the fastest one's, at 1 and 2 threads.
//!
//!     cargo bench --bench kernels
//!
//! Convolutions store u8 (requantized, as between two quantized layers), GEMMs f32.
//! Integer results are bit-identical across backends (tests in runtime/src/kernels/int8).

use std::time::Instant;

use tfmqc_runtime::kernels::int8::{
    conv2d, gemm, Backend, ConvGeometry, Dequant, Output, PackedConvWeights, PackedWeights,
    Packing, WeightLayout,
};
use tfmqc_runtime::with_threads;

/// Calls timed per case (the median is printed), after one untimed call.
const RUNS: usize = 7;

fn main() {
    // Every backend of this CPU but the portable one (far slower, and not what runs).
    let backends: Vec<Backend> = Backend::ALL
        .into_iter()
        .filter(|&b| b != Backend::Portable && b.is_available())
        .collect();
    println!(
        "int8 kernels at SD-1.5 sizes; backends here: {}",
        backends
            .iter()
            .map(|b| b.name())
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "{:<34} {:>3} {:<11} {:>9} {:>8} {:>8}",
        "case", "thr", "backend", "ms", "GMAC/s", "×fastest"
    );
    for case in cases() {
        for threads in [1, 2] {
            let times: Vec<f64> = backends
                .iter()
                .map(|&b| with_threads(threads, || case.time(b)))
                .collect();
            let best = times.iter().copied().fold(f64::INFINITY, f64::min);
            for (b, ms) in backends.iter().zip(&times) {
                println!(
                    "{:<34} {:>3} {:<11} {:>9.3} {:>8.1} {:>8.2}",
                    case.name,
                    threads,
                    b.name(),
                    ms,
                    case.macs as f64 / ms / 1e6,
                    ms / best
                );
            }
        }
    }
}

enum Kind {
    /// `[n, c, h, w]`, output channels, kernel size, stride.
    Conv([usize; 4], usize, usize, usize),
    /// `m, k, n`.
    Gemm(usize, usize, usize),
}

struct Case {
    name: String,
    kind: Kind,
    macs: usize,
}

fn cases() -> Vec<Case> {
    let conv = |c: usize, o: usize, hw: usize, k: usize, s: usize| {
        let ho = hw.div_ceil(s);
        Case {
            name: format!("conv {c}→{o} {k}×{k}/{s} at {hw}×{hw} ×2"),
            kind: Kind::Conv([2, c, hw, hw], o, k, s),
            macs: 2 * o * c * k * k * ho * ho,
        }
    };
    let gemm = |m: usize, k: usize, n: usize| Case {
        name: format!("gemm {m}×{k}·{k}×{n}"),
        kind: Kind::Gemm(m, k, n),
        macs: m * k * n,
    };
    vec![
        conv(320, 320, 32, 3, 1),
        conv(320, 320, 32, 3, 2),
        conv(640, 640, 16, 3, 1),
        conv(1280, 1280, 8, 3, 1),
        conv(2560, 1280, 4, 3, 1),
        conv(640, 320, 32, 1, 1),
        gemm(2048, 320, 320),
        gemm(512, 640, 5120),
        gemm(128, 1280, 1280),
    ]
}

impl Case {
    /// Median ms of [`RUNS`] calls on `backend` (weights packed for it once).
    fn time(&self, backend: Backend) -> f64 {
        let packing = Packing::for_backend(backend);
        let bytes = |n: usize, seed: u32| -> Vec<u8> {
            (0..n as u32)
                .map(|i| (i.wrapping_mul(2_654_435_761).wrapping_add(seed) >> 24) as u8)
                .collect()
        };
        match self.kind {
            Kind::Conv(shape, o, k, s) => {
                let [n, c, h, w] = shape;
                let geom = ConvGeometry {
                    strides: [s, s],
                    pads: [k / 2; 4],
                    ..ConvGeometry::new(k, k)
                };
                // Symmetric weights within ±127, as the quantizer writes them.
                let wts: Vec<i8> = bytes(o * c * k * k, 7)
                    .into_iter()
                    .map(|b| (b as i8).max(-127))
                    .collect();
                let packed = PackedConvWeights::pack_with(packing, &wts, o, c, geom, &[] as &[i8]);
                let x = bytes(n * c * h * w, 3);
                let (ho, wo) = geom.output_hw(h, w).unwrap();
                let mut out = vec![0u8; n * o * ho * wo];
                let scale = vec![0.01f32; o];
                median_ms(|| {
                    conv2d(
                        backend,
                        &x,
                        shape,
                        128u8,
                        &packed,
                        Output::U8 {
                            out: &mut out,
                            dequant: Dequant {
                                a_scale: 0.02,
                                w_scale: &scale,
                                bias: None,
                            },
                            scale: 0.5,
                            zero_point: 128,
                        },
                    );
                })
            }
            Kind::Gemm(m, k, n) => {
                let wts: Vec<i8> = bytes(n * k, 5)
                    .into_iter()
                    .map(|b| (b as i8).max(-127))
                    .collect();
                let packed =
                    PackedWeights::pack_with(packing, &wts, WeightLayout::NK, n, k, &[] as &[i8]);
                let a = bytes(m * k, 1);
                let mut out = vec![0f32; m * n];
                let scale = vec![0.01f32; n];
                median_ms(|| {
                    gemm(
                        backend,
                        &a,
                        m,
                        k,
                        128u8,
                        &packed,
                        Output::F32 {
                            out: &mut out,
                            dequant: Dequant {
                                a_scale: 0.02,
                                w_scale: &scale,
                                bias: None,
                            },
                        },
                    );
                })
            }
        }
    }
}

/// Median ms of [`RUNS`] calls of `call`, after one untimed call.
fn median_ms(mut call: impl FnMut()) -> f64 {
    call();
    let mut times: Vec<f64> = (0..RUNS)
        .map(|_| {
            let start = Instant::now();
            call();
            start.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}
