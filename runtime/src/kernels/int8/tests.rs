//! Bit-exactness tests against plain i64 references, on every backend this CPU runs.

use super::sink::quantize;
use super::*;
use crate::rng::SplitMix64;

/// Test data from the crate's generator; `below` by modulo, as the data were drawn when
/// these tests were written.
struct Rng(SplitMix64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0.next_u64()
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn range(&mut self, lo: usize, hi: usize) -> usize {
        lo + self.below(hi - lo + 1)
    }
    fn pick<T: Copy>(&mut self, xs: &[T]) -> T {
        xs[self.below(xs.len())]
    }
    /// A byte, with extremes (0, 1, 127, 128, 255) over-represented.
    fn byte(&mut self) -> u8 {
        match self.below(4) {
            0 => self.pick(&[0, 1, 127, 128, 255]),
            _ => self.next() as u8,
        }
    }
    fn bytes_u8(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.byte()).collect()
    }
    fn bytes_i8(&mut self, n: usize) -> Vec<i8> {
        (0..n).map(|_| self.byte() as i8).collect()
    }
}

/// Every (backend, packing) pair worth running here: pairs on every pair kernel this
/// CPU has; quads and octets on the portable kernels (any CPU) and on every quad kernel
/// (AVX-512 VNNI, aarch64 dot product and i8mm) and octet kernel (i8mm) present. (The
/// AVX2 backend runs quads on the portable kernel, a valid, slower combination.)
fn setups() -> Vec<(Backend, Packing)> {
    let mut v: Vec<(Backend, Packing)> = backends()
        .into_iter()
        .map(|b| (b, Packing::Pairs))
        .collect();
    v.push((Backend::Portable, Packing::Quads));
    for b in [Backend::Avx512Vnni, Backend::Dotprod, Backend::I8mm] {
        if available_here(b) {
            v.push((b, Packing::Quads));
        }
    }
    v.push((Backend::Portable, Packing::Octets));
    if available_here(Backend::I8mm) {
        v.push((Backend::I8mm, Packing::Octets));
    }
    // Tiles: on the tile unit where there is one, else emulated (also when a slower
    // backend is asked for tile-packed weights).
    v.push((Backend::Portable, Packing::Tiles));
    if available_here(Backend::Avx512Vnni) {
        v.push((Backend::Avx512Vnni, Packing::Tiles));
    }
    if available_here(Backend::Amx) {
        v.push((Backend::Amx, Packing::Tiles));
    }
    v
}

/// The backends with a pair kernel of their own (the dot-product backends run pairs on
/// the NEON kernel, so testing them with pairs would repeat `Neon`).
fn backends() -> Vec<Backend> {
    let mut v = vec![Backend::Portable];
    for b in [Backend::Avx2, Backend::Avx512Vnni, Backend::Neon] {
        if available_here(b) {
            v.push(b);
        }
    }
    v
}

/// Whether `b` runs here; says so once per test when a backend of this architecture is
/// missing (the other architecture's are never there).
fn available_here(b: Backend) -> bool {
    let this_arch = match b {
        Backend::Avx2 | Backend::Avx512Vnni | Backend::Amx => cfg!(target_arch = "x86_64"),
        Backend::Neon | Backend::Dotprod | Backend::I8mm => cfg!(target_arch = "aarch64"),
        Backend::Auto | Backend::Portable => true,
    };
    let yes = b.is_available();
    if this_arch && !yes {
        eprintln!("{b:?} not available on this CPU: not tested here");
    }
    yes
}

/// Prints the kernel paths the exactness tests run on this CPU (under qemu the CPU model
/// decides) and, where `TFMQC_EXPECT_INT8_BACKEND` names one (scripts/test-arm64.sh sets
/// it per model), checks that `Auto` picks it: a CPU model whose features went undetected
/// would otherwise pass every test on a slower path.
#[test]
fn kernel_paths_of_this_cpu() {
    let auto = Backend::detect();
    let paths: Vec<String> = setups()
        .iter()
        .map(|(b, p)| format!("{}/{p:?}", b.name()))
        .collect();
    println!(
        "int8 kernel paths on {}: auto = {} ({:?}); tested: {}",
        std::env::consts::ARCH,
        auto.name(),
        Packing::for_backend(Backend::Auto),
        paths.join(", ")
    );
    assert!(auto.is_available());
    if let Ok(want) = std::env::var("TFMQC_EXPECT_INT8_BACKEND") {
        assert_eq!(auto.name(), want, "Backend::Auto on this CPU");
        assert!(
            setups().contains(&(auto, Packing::for_backend(Backend::Auto))),
            "the exactness tests skip the path Auto runs"
        );
    }
}

fn zp_of<T: QuantInt>(zps: &[T], ch: usize) -> i64 {
    match zps.len() {
        0 => 0,
        1 => zps[0].to_i32() as i64,
        _ => zps[ch].to_i32() as i64,
    }
}

/// out[i, j] = Σ (a[i, kk] − azp)(w[j, kk] − wzp[j]) with W as `[n, k]`.
fn gemm_ref<A: QuantInt, W: QuantInt>(
    a: &[A],
    m: usize,
    k: usize,
    azp: A,
    w: &[W],
    n: usize,
    wzp: &[W],
) -> Vec<i64> {
    let mut out = vec![0i64; m * n];
    for i in 0..m {
        for j in 0..n {
            let mut s = 0i64;
            for kk in 0..k {
                s += (a[i * k + kk].to_i32() as i64 - azp.to_i32() as i64)
                    * (w[j * k + kk].to_i32() as i64 - zp_of(wzp, j));
            }
            out[i * n + j] = s;
        }
    }
    out
}

fn as_i32(v: &[i64]) -> Vec<i32> {
    v.iter()
        .map(|&x| i32::try_from(x).expect("reference overflows i32"))
        .collect()
}

#[test]
fn gemm_random_shapes_exact() {
    let mut rng = Rng(SplitMix64::new(1));
    let ms = [1, 2, 5, 6, 7, 12, 13, 31, 64, 97];
    let ks = [1, 2, 3, 7, 16, 31, 32, 33, 100, 255, 513];
    let ns = [1, 3, 8, 15, 16, 17, 24, 40, 65];
    for case in 0..160 {
        let (m, k, n) = (rng.pick(&ms), rng.pick(&ks), rng.pick(&ns));
        let zp: u8 = [0, 128, 255, rng.byte()][case % 4];
        let a = rng.bytes_u8(m * k);
        let w = rng.bytes_i8(n * k);
        let want = as_i32(&gemm_ref(&a, m, k, zp, &w, n, &[] as &[i8]));
        for (be, pk) in setups() {
            let pw = PackedWeights::pack_with(pk, &w, WeightLayout::NK, n, k, &[] as &[i8]);
            let mut out = vec![7i32; m * n];
            gemm(be, &a, m, k, zp, &pw, Output::I32(&mut out));
            assert_eq!(out, want, "{be:?} m={m} k={k} n={n} zp={zp}");
        }
        if case % 8 == 0 {
            let mut out = vec![0i32; m * n];
            gemm_u8i8(&a, m, k, zp, &PackedWeights::pack(&w, n, k), &mut out);
            assert_eq!(out, want);
        }
    }
}

#[test]
fn gemm_blocked_reduction_exact() {
    // K long enough for reduction blocking (several blocks, odd K, partial last block)
    // and M spanning several row chunks.
    let mut rng = Rng(SplitMix64::new(11));
    for (m, k, n) in [(300, 2201, 21), (7, 2050, 16), (131, 4097, 5)] {
        let a = rng.bytes_u8(m * k);
        let w = rng.bytes_i8(n * k);
        let zp = rng.byte();
        let want = as_i32(&gemm_ref(&a, m, k, zp, &w, n, &[] as &[i8]));
        for (be, pk) in setups() {
            let pw = PackedWeights::pack_with(pk, &w, WeightLayout::NK, n, k, &[] as &[i8]);
            let mut out = vec![0i32; m * n];
            gemm(be, &a, m, k, zp, &pw, Output::I32(&mut out));
            assert_eq!(out, want, "{be:?} m={m} k={k} n={n}");
            let ws = [0.5f32];
            let mut of = vec![0f32; m * n];
            let d = Dequant {
                a_scale: 0.25,
                w_scale: &ws,
                bias: None,
            };
            gemm(
                be,
                &a,
                m,
                k,
                zp,
                &pw,
                Output::F32 {
                    out: &mut of,
                    dequant: d,
                },
            );
            assert!(
                of.iter().zip(&want).all(|(&f, &i)| f == i as f32 * 0.125),
                "{be:?} f32"
            );
        }
    }
}

#[test]
fn gemm_saturation_extremes() {
    // Every pair of products at its maximum magnitude: (±255)·(−128) and (±255)·127.
    for (av, zp) in [(255u8, 0u8), (0, 255), (255, 128), (0, 128)] {
        for wv in [-128i8, 127] {
            for (m, k, n) in [(7, 64, 17), (1, 1, 1), (13, 301, 33)] {
                let a = vec![av; m * k];
                let w = vec![wv; n * k];
                let want = as_i32(&gemm_ref(&a, m, k, zp, &w, n, &[] as &[i8]));
                for (be, pk) in setups() {
                    let pw = PackedWeights::pack_with(pk, &w, WeightLayout::NK, n, k, &[] as &[i8]);
                    let mut out = vec![0i32; m * n];
                    gemm(be, &a, m, k, zp, &pw, Output::I32(&mut out));
                    assert_eq!(out, want, "{be:?} a={av} zp={zp} w={wv}");
                }
            }
        }
    }
    // Alternating signs and magnitudes inside each pair.
    let (m, k, n) = (9, 130, 19);
    let a: Vec<u8> = (0..m * k)
        .map(|i| if i % 3 == 0 { 0 } else { 255 })
        .collect();
    let w: Vec<i8> = (0..n * k)
        .map(|i| if i % 5 < 2 { -128 } else { 127 })
        .collect();
    for zp in [0u8, 128, 255] {
        let want = as_i32(&gemm_ref(&a, m, k, zp, &w, n, &[] as &[i8]));
        for (be, pk) in setups() {
            let pw = PackedWeights::pack_with(pk, &w, WeightLayout::NK, n, k, &[] as &[i8]);
            let mut out = vec![0i32; m * n];
            gemm(be, &a, m, k, zp, &pw, Output::I32(&mut out));
            assert_eq!(out, want, "{be:?} zp={zp}");
        }
    }
}

#[test]
fn gemm_long_reduction_exact() {
    // K large enough for |acc| ≫ 2^24, still within the documented i32 bound.
    let (m, k, n) = (3, 40_000, 9);
    let a = vec![0u8; m * k];
    let w = vec![-128i8; n * k];
    let want = as_i32(&gemm_ref(&a, m, k, 255u8, &w, n, &[] as &[i8]));
    assert_eq!(want[0], 255 * 128 * 40_000);
    for (be, pk) in setups() {
        let pw = PackedWeights::pack_with(pk, &w, WeightLayout::NK, n, k, &[] as &[i8]);
        let mut out = vec![0i32; m * n];
        gemm(be, &a, m, k, 255, &pw, Output::I32(&mut out));
        assert_eq!(out, want, "{be:?}");
    }
}

#[test]
fn gemm_kn_layout_and_general_types() {
    let mut rng = Rng(SplitMix64::new(2));
    for _ in 0..30 {
        let (m, k, n) = (rng.range(1, 20), rng.range(1, 70), rng.range(1, 40));
        // KN layout == NK of the transpose.
        let w = rng.bytes_i8(n * k);
        let mut wt = vec![0i8; k * n];
        for j in 0..n {
            for kk in 0..k {
                wt[kk * n + j] = w[j * k + kk];
            }
        }
        let a = rng.bytes_u8(m * k);
        let zp = rng.byte();
        let want = as_i32(&gemm_ref(&a, m, k, zp, &w, n, &[] as &[i8]));
        // i8 activations, u8 weights with per-channel zero points.
        let ai = rng.bytes_i8(m * k);
        let aizp = rng.byte() as i8;
        let wu = rng.bytes_u8(n * k);
        let wzp = rng.bytes_u8(n);
        let want2 = as_i32(&gemm_ref(&ai, m, k, aizp, &wu, n, &wzp));
        // Per-tensor i8 weight zero point.
        let wzp3 = [rng.byte() as i8];
        let want3 = as_i32(&gemm_ref(&a, m, k, zp, &w, n, &wzp3));
        for (be, pk) in setups() {
            let pw3 = PackedWeights::pack_with(pk, &w, WeightLayout::NK, n, k, &wzp3);
            let pw = PackedWeights::pack_with(pk, &wt, WeightLayout::KN, n, k, &[] as &[i8]);
            let pw2 = PackedWeights::pack_with(pk, &wu, WeightLayout::NK, n, k, &wzp);
            let mut out = vec![0i32; m * n];
            gemm(be, &a, m, k, zp, &pw, Output::I32(&mut out));
            assert_eq!(out, want, "{be:?} kn");
            gemm(be, &ai, m, k, aizp, &pw2, Output::I32(&mut out));
            assert_eq!(out, want2, "{be:?} i8 x u8");
            gemm(be, &a, m, k, zp, &pw3, Output::I32(&mut out));
            assert_eq!(out, want3, "{be:?} wzp");
        }
    }
}

#[test]
fn gemm_empty_dims() {
    for (be, pk) in setups() {
        let pw = PackedWeights::pack_with(pk, &[], WeightLayout::NK, 5, 0, &[] as &[i8]);
        let mut out = vec![9i32; 3 * 5];
        gemm(be, &[0u8; 0], 3, 0, 3, &pw, Output::I32(&mut out));
        assert!(out.iter().all(|&x| x == 0));
        gemm(be, &[0u8; 0], 0, 0, 3, &pw, Output::I32(&mut []));
    }
}

fn deq_ref(acc: i64, ch: usize, d: &Dequant) -> f32 {
    let ws = if d.w_scale.len() == 1 {
        d.w_scale[0]
    } else {
        d.w_scale[ch]
    };
    let v = acc as i32 as f32 * (d.a_scale * ws);
    match d.bias {
        Some(b) => v + b[ch],
        None => v,
    }
}

fn q_ref(v: f32, scale: f32, zp: i32, lo: i32, hi: i32) -> i32 {
    ((v / scale).round_ties_even() as i64)
        .saturating_add(zp as i64)
        .clamp(lo as i64, hi as i64) as i32
}

#[test]
fn gemm_dequant_and_requant_outputs() {
    let mut rng = Rng(SplitMix64::new(3));
    for case in 0..40 {
        let (m, k, n) = (rng.range(1, 19), rng.range(1, 90), rng.range(1, 37));
        let a = rng.bytes_u8(m * k);
        let w = rng.bytes_i8(n * k);
        let zp = rng.byte();
        let acc = gemm_ref(&a, m, k, zp, &w, n, &[] as &[i8]);
        let ws: Vec<f32> = (0..if case % 2 == 0 { n } else { 1 })
            .map(|_| (rng.below(1000) as f32 + 1.0) * 1.7e-5)
            .collect();
        let bias: Vec<f32> = (0..n)
            .map(|_| (rng.below(2001) as f32 - 1000.0) * 0.013)
            .collect();
        let d = Dequant {
            a_scale: 0.0213,
            w_scale: &ws,
            bias: if case % 3 == 0 { None } else { Some(&bias) },
        };
        let want_f: Vec<f32> = (0..m * n).map(|i| deq_ref(acc[i], i % n, &d)).collect();
        let (os, ozp) = (0.05f32 + rng.below(100) as f32 * 0.01, rng.byte());
        let want_u: Vec<u8> = want_f
            .iter()
            .map(|&v| q_ref(v, os, ozp as i32, 0, 255) as u8)
            .collect();
        let want_i: Vec<i8> = want_f
            .iter()
            .map(|&v| q_ref(v, os, ozp as i8 as i32, -128, 127) as i8)
            .collect();
        for (be, pk) in setups() {
            let pw = PackedWeights::pack_with(pk, &w, WeightLayout::NK, n, k, &[] as &[i8]);
            let mut of = vec![0f32; m * n];
            gemm(
                be,
                &a,
                m,
                k,
                zp,
                &pw,
                Output::F32 {
                    out: &mut of,
                    dequant: d,
                },
            );
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&of), bits(&want_f), "{be:?} f32");
            let mut ou = vec![0u8; m * n];
            gemm(
                be,
                &a,
                m,
                k,
                zp,
                &pw,
                Output::U8 {
                    out: &mut ou,
                    dequant: d,
                    scale: os,
                    zero_point: ozp,
                },
            );
            assert_eq!(ou, want_u, "{be:?} u8");
            let mut oi = vec![0i8; m * n];
            let out = Output::I8 {
                out: &mut oi,
                dequant: d,
                scale: os,
                zero_point: ozp as i8,
            };
            gemm(be, &a, m, k, zp, &pw, out);
            assert_eq!(oi, want_i, "{be:?} i8");
        }
    }
}

#[test]
fn quantize_matches_round_half_even() {
    let mut rng = Rng(SplitMix64::new(4));
    let mut vals: Vec<f32> = (-2000..=2000).map(|i| i as f32 * 0.25).collect();
    vals.extend(
        (0..20000)
            .map(|_| f32::from_bits(rng.next() as u32))
            .filter(|v| v.is_finite()),
    );
    vals.extend([
        0.5,
        1.5,
        2.5,
        -0.5,
        -1.5,
        254.5,
        255.5,
        -128.5,
        1e30,
        -1e30,
        f32::INFINITY,
    ]);
    for &v in &vals {
        for (scale, zp) in [(1.0f32, 0), (1.0, 128), (0.5, 3), (3.0, 255)] {
            assert_eq!(
                quantize(v, scale, zp, 0, 255),
                q_ref(v, scale, zp, 0, 255),
                "{v} {scale} {zp}"
            );
            let zi = zp - 128;
            assert_eq!(
                quantize(v, scale, zi, -128, 127),
                q_ref(v, scale, zi, -128, 127),
                "{v}"
            );
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn conv_ref<A: QuantInt, W: QuantInt>(
    x: &[A],
    [nb, c, h, wd]: [usize; 4],
    xzp: A,
    w: &[W],
    oc: usize,
    wzp: &[W],
    geom: &ConvGeometry,
) -> (Vec<i64>, usize, usize) {
    let (ho, wo) = geom.output_hw(h, wd).unwrap();
    let g = geom.groups;
    let (cg, og) = (c / g, oc / g);
    let [kh, kw] = geom.kernel;
    let mut out = vec![0i64; nb * oc * ho * wo];
    for b in 0..nb {
        for o in 0..oc {
            let gi = o / og;
            for y in 0..ho {
                for xo in 0..wo {
                    let mut s = 0i64;
                    for ci in 0..cg {
                        for ki in 0..kh {
                            for kj in 0..kw {
                                let iy = (y * geom.strides[0] + ki * geom.dilations[0]) as isize
                                    - geom.pads[0] as isize;
                                let ix = (xo * geom.strides[1] + kj * geom.dilations[1]) as isize
                                    - geom.pads[1] as isize;
                                let xv =
                                    if iy < 0 || ix < 0 || iy >= h as isize || ix >= wd as isize {
                                        xzp.to_i32() as i64
                                    } else {
                                        x[((b * c + gi * cg + ci) * h + iy as usize) * wd
                                            + ix as usize]
                                            .to_i32() as i64
                                    };
                                let wv = w[((o * cg + ci) * kh + ki) * kw + kj].to_i32() as i64;
                                s += (xv - xzp.to_i32() as i64) * (wv - zp_of(wzp, o));
                            }
                        }
                    }
                    out[((b * oc + o) * ho + y) * wo + xo] = s;
                }
            }
        }
    }
    (out, ho, wo)
}

#[test]
fn conv_random_geometries_exact() {
    let mut rng = Rng(SplitMix64::new(5));
    let mut done = 0;
    while done < 250 {
        let g = rng.pick(&[1, 1, 2, 3]);
        let geom = ConvGeometry {
            kernel: [rng.range(1, 3), rng.range(1, 3)],
            strides: [rng.range(1, 3), rng.range(1, 3)],
            pads: [
                rng.range(0, 2),
                rng.range(0, 2),
                rng.range(0, 2),
                rng.range(0, 2),
            ],
            dilations: [rng.range(1, 2), rng.range(1, 2)],
            groups: g,
        };
        let (nb, cg, og) = (rng.range(1, 2), rng.range(1, 5), rng.range(1, 8));
        let (h, wd) = (rng.range(1, 11), rng.range(1, 11));
        if geom.output_hw(h, wd).is_none() {
            continue;
        }
        done += 1;
        let (c, oc) = (cg * g, og * g);
        let shape = [nb, c, h, wd];
        let x = rng.bytes_u8(nb * c * h * wd);
        let w = rng.bytes_i8(oc * cg * geom.kernel[0] * geom.kernel[1]);
        let zp: u8 = [0, 128, 255, rng.byte()][done % 4];
        let (want, ho, wo) = conv_ref(&x, shape, zp, &w, oc, &[] as &[i8], &geom);
        let want = as_i32(&want);
        for (be, pk) in setups() {
            let pw = PackedConvWeights::pack_with(pk, &w, oc, cg, geom, &[] as &[i8]);
            let mut out = vec![-1i32; nb * oc * ho * wo];
            conv2d(be, &x, shape, zp, &pw, Output::I32(&mut out));
            assert_eq!(out, want, "{be:?} {geom:?} shape={shape:?} oc={oc} zp={zp}");
        }
    }
}

#[test]
fn conv_typical_layers_exact() {
    let mut rng = Rng(SplitMix64::new(6));
    let p1 = |k: usize, s: usize| ConvGeometry {
        kernel: [k, k],
        strides: [s, s],
        pads: [k / 2; 4],
        dilations: [1, 1],
        groups: 1,
    };
    // (C, O, H, W, geometry): 3×3 same, 3×3 stride 2 downsample, 1×1, wide odd image,
    // dilated, depthwise.
    let cases = [
        (64, 64, 12, 12, p1(3, 1)),
        (32, 48, 13, 9, p1(3, 2)),
        (40, 24, 7, 11, p1(1, 1)),
        (7, 13, 5, 37, p1(3, 1)),
        // Tiles: 18 channel quads (padded to 32: two K blocks), 40 output channels (a
        // panel of 32 and one of 8), stride 2 with 72 channels.
        (70, 40, 6, 7, p1(3, 1)),
        (72, 20, 9, 9, p1(3, 2)),
        (
            8,
            16,
            15,
            15,
            ConvGeometry {
                dilations: [2, 3],
                pads: [2, 3, 2, 3],
                ..p1(3, 1)
            },
        ),
        (
            12,
            12,
            9,
            9,
            ConvGeometry {
                groups: 12,
                ..p1(3, 1)
            },
        ),
    ];
    for (c, oc, h, wd, geom) in cases {
        let cg = c / geom.groups;
        let shape = [1, c, h, wd];
        let x = rng.bytes_u8(c * h * wd);
        let w = rng.bytes_i8(oc * cg * geom.kernel[0] * geom.kernel[1]);
        for zp in [0u8, 128, 255] {
            let (want, ho, wo) = conv_ref(&x, shape, zp, &w, oc, &[] as &[i8], &geom);
            let want = as_i32(&want);
            for (be, pk) in setups() {
                let pw = PackedConvWeights::pack_with(pk, &w, oc, cg, geom, &[] as &[i8]);
                let mut out = vec![0i32; oc * ho * wo];
                conv2d(be, &x, shape, zp, &pw, Output::I32(&mut out));
                assert_eq!(out, want, "{be:?} {geom:?} c={c} oc={oc} zp={zp}");
            }
        }
    }
}

#[test]
fn conv_saturation_and_outputs() {
    let geom = ConvGeometry {
        pads: [1; 4],
        ..ConvGeometry::new(3, 3)
    };
    let (c, oc, h, wd) = (9, 11, 6, 7);
    let shape = [2, c, h, wd];
    for (xv, zp) in [(255u8, 0u8), (0, 255)] {
        for wv in [-128i8, 127] {
            let x = vec![xv; 2 * c * h * wd];
            let w = vec![wv; oc * c * 9];
            let (want, ho, wo) = conv_ref(&x, shape, zp, &w, oc, &[] as &[i8], &geom);
            let want = as_i32(&want);
            for (be, pk) in setups() {
                let pw = PackedConvWeights::pack_with(pk, &w, oc, c, geom, &[] as &[i8]);
                let mut out = vec![0i32; 2 * oc * ho * wo];
                conv2d(be, &x, shape, zp, &pw, Output::I32(&mut out));
                assert_eq!(out, want, "{be:?} x={xv} zp={zp} w={wv}");
            }
        }
    }
    // i8 input, u8 weights with per-channel zero points, dequantized + requantized.
    let mut rng = Rng(SplitMix64::new(7));
    let x = rng.bytes_i8(2 * c * h * wd);
    let w = rng.bytes_u8(oc * c * 9);
    let wzp = rng.bytes_u8(oc);
    let xzp = -3i8;
    let (acc, ho, wo) = conv_ref(&x, shape, xzp, &w, oc, &wzp, &geom);
    let ws: Vec<f32> = (0..oc).map(|i| 1e-4 * (i + 1) as f32).collect();
    let bias: Vec<f32> = (0..oc).map(|i| i as f32 * 0.37 - 2.0).collect();
    let d = Dequant {
        a_scale: 0.031,
        w_scale: &ws,
        bias: Some(&bias),
    };
    let plane = ho * wo;
    let want_f: Vec<f32> = (0..acc.len())
        .map(|i| deq_ref(acc[i], (i / plane) % oc, &d))
        .collect();
    let want_u: Vec<u8> = want_f
        .iter()
        .map(|&v| q_ref(v, 0.02, 17, 0, 255) as u8)
        .collect();
    let want_i: Vec<i8> = want_f
        .iter()
        .map(|&v| q_ref(v, 0.02, -5, -128, 127) as i8)
        .collect();
    // The u8 code dequantized: (q − zp) · scale.
    let want_r: Vec<f32> = want_u
        .iter()
        .map(|&q| (q as i32 - 17) as f32 * 0.02)
        .collect();
    for (be, pk) in setups() {
        let pw = PackedConvWeights::pack_with(pk, &w, oc, c, geom, &wzp);
        let mut out = vec![0i32; acc.len()];
        conv2d(be, &x, shape, xzp, &pw, Output::I32(&mut out));
        assert_eq!(out, as_i32(&acc), "{be:?}");
        let mut of = vec![0f32; acc.len()];
        conv2d(
            be,
            &x,
            shape,
            xzp,
            &pw,
            Output::F32 {
                out: &mut of,
                dequant: d,
            },
        );
        assert!(
            of.iter()
                .zip(&want_f)
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "{be:?} f32"
        );
        let mut ou = vec![0u8; acc.len()];
        conv2d(
            be,
            &x,
            shape,
            xzp,
            &pw,
            Output::U8 {
                out: &mut ou,
                dequant: d,
                scale: 0.02,
                zero_point: 17,
            },
        );
        assert_eq!(ou, want_u, "{be:?} u8");
        let mut oi = vec![0i8; acc.len()];
        conv2d(
            be,
            &x,
            shape,
            xzp,
            &pw,
            Output::I8 {
                out: &mut oi,
                dequant: d,
                scale: 0.02,
                zero_point: -5,
            },
        );
        assert_eq!(oi, want_i, "{be:?} i8");
        let mut or = vec![f32::NAN; acc.len()];
        conv2d(
            be,
            &x,
            shape,
            xzp,
            &pw,
            Output::Requant {
                out: &mut or,
                dequant: d,
                scale: 0.02,
                zero_point: 17,
            },
        );
        assert!(
            or.iter()
                .zip(&want_r)
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "{be:?} requantized f32"
        );
    }
}

#[test]
fn conv_u8i8_entry_point() {
    let mut rng = Rng(SplitMix64::new(8));
    let geom = ConvGeometry {
        pads: [1; 4],
        ..ConvGeometry::new(3, 3)
    };
    let x = rng.bytes_u8(5 * 8 * 8);
    let w = rng.bytes_i8(6 * 5 * 9);
    let (want, ..) = conv_ref(&x, [1, 5, 8, 8], 100u8, &w, 6, &[] as &[i8], &geom);
    let mut out = vec![0i32; want.len()];
    conv2d_u8i8(
        &x,
        [1, 5, 8, 8],
        100,
        &PackedConvWeights::pack(&w, 6, 5, geom),
        &mut out,
    );
    assert_eq!(out, as_i32(&want));
}

/// f32 activations around a zero point, with exact halves and saturating values.
fn floats(rng: &mut Rng, n: usize, scale: f32) -> Vec<f32> {
    (0..n)
        .map(|_| match rng.below(16) {
            0 => (rng.below(600) as f32 - 300.0 + 0.5) * scale,
            1 => rng.pick(&[1e9, -1e9, 0.0]),
            _ => (rng.next() as u32 as f32 / u32::MAX as f32 - 0.5) * 300.0 * scale,
        })
        .collect()
}

#[test]
fn quantize_u8_matches_quantize_linear() {
    let mut rng = Rng(SplitMix64::new(11));
    for len in [0, 1, 7, 8, 31, 1000] {
        let x = floats(&mut rng, len, 0.05);
        for be in backends() {
            let mut out = vec![0u8; len];
            quantize_u8(be, &x, 0.05, 131, &mut out);
            for (&o, &v) in out.iter().zip(&x) {
                assert_eq!(o as i32, q_ref(v, 0.05, 131, 0, 255), "{be:?} {v}");
            }
        }
    }
}

#[test]
fn conv_quantize_equals_quantize_then_conv() {
    let mut rng = Rng(SplitMix64::new(12));
    let mut done = 0;
    while done < 60 {
        let g = rng.pick(&[1, 2]);
        let geom = ConvGeometry {
            kernel: [rng.range(1, 3), rng.range(1, 3)],
            strides: [rng.range(1, 2), rng.range(1, 2)],
            pads: [
                rng.range(0, 1),
                rng.range(0, 1),
                rng.range(0, 1),
                rng.range(0, 1),
            ],
            dilations: [1, rng.range(1, 2)],
            groups: g,
        };
        let (nb, cg, og) = (rng.range(1, 2), rng.range(1, 5), rng.range(1, 13));
        let (h, wd) = (rng.range(1, 9), rng.range(1, 9));
        let Some((ho, wo)) = geom.output_hw(h, wd) else {
            continue;
        };
        done += 1;
        let (c, oc) = (cg * g, og * g);
        let shape = [nb, c, h, wd];
        let (scale, zp) = (0.02f32, rng.byte());
        let x = floats(&mut rng, nb * c * h * wd, scale);
        let w = rng.bytes_i8(oc * cg * geom.kernel[0] * geom.kernel[1]);
        let ws: Vec<f32> = (0..oc).map(|i| 0.001 * (i + 1) as f32).collect();
        let bias: Vec<f32> = (0..oc).map(|i| i as f32 * 0.1 - 0.3).collect();
        let deq = Dequant {
            a_scale: scale,
            w_scale: &ws,
            bias: Some(&bias),
        };
        for (be, pk) in setups() {
            let pw = PackedConvWeights::pack_with(pk, &w, oc, cg, geom, &[] as &[i8]);
            let mut q = vec![0u8; x.len()];
            quantize_u8(be, &x, scale, zp, &mut q);
            let mut want = vec![0f32; nb * oc * ho * wo];
            conv2d(
                be,
                &q,
                shape,
                zp,
                &pw,
                Output::F32 {
                    out: &mut want,
                    dequant: deq,
                },
            );
            let mut got = vec![0f32; want.len()];
            conv2d_quantize(
                be,
                &x,
                shape,
                scale,
                zp,
                &pw,
                Output::F32 {
                    out: &mut got,
                    dequant: deq,
                },
            );
            let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&got), bits(&want), "{be:?} {geom:?} {shape:?}");
        }
    }
}

#[test]
fn gemm_quantize_equals_quantize_then_gemm() {
    let mut rng = Rng(SplitMix64::new(13));
    for _ in 0..60 {
        let (m, k, n) = (rng.range(1, 40), rng.range(1, 70), rng.range(1, 40));
        let (scale, zp) = (0.03f32, rng.byte());
        let x = floats(&mut rng, m * k, scale);
        let w = rng.bytes_i8(n * k);
        for (be, pk) in setups() {
            let pw = PackedWeights::pack_with(pk, &w, WeightLayout::NK, n, k, &[] as &[i8]);
            let mut q = vec![0u8; x.len()];
            quantize_u8(be, &x, scale, zp, &mut q);
            let mut want = vec![0i32; m * n];
            gemm(be, &q, m, k, zp, &pw, Output::I32(&mut want));
            let mut got = vec![0i32; m * n];
            gemm_quantize(be, &x, m, k, scale, zp, &pw, Output::I32(&mut got));
            assert_eq!(got, want, "{be:?} m={m} k={k} n={n}");
        }
    }
}

/// Results are bit-identical whatever the number of threads of tract's executor, every
/// call split, or the convolution's two images split between the threads.
#[test]
fn thread_count_does_not_change_results() {
    use tract_linalg::multithread::{multithread_tract_scope, Executor};
    let mut rng = Rng(SplitMix64::new(14));
    let geom = ConvGeometry {
        pads: [1; 4],
        ..ConvGeometry::new(3, 3)
    };
    let (c, oc, h, wd) = (20, 30, 13, 17);
    let x = floats(&mut rng, 2 * c * h * wd, 0.02);
    let w = rng.bytes_i8(oc * c * 9);
    let pw = PackedConvWeights::pack(&w, oc, c, geom);
    let ws: Vec<f32> = (0..oc).map(|i| 0.001 * (i + 1) as f32).collect();
    let deq = Dequant {
        a_scale: 0.02,
        w_scale: &ws,
        bias: None,
    };
    // K = 3000 runs in reduction blocks; M = 100 rows in several chunks.
    let (m, k, n) = (100, 3000, 37);
    let a = floats(&mut rng, m * k, 0.03);
    let wg = rng.bytes_i8(n * k);
    let pg = PackedWeights::pack(&wg, n, k);
    let run = || {
        let mut conv = vec![0f32; 2 * oc * h * wd];
        conv2d_quantize(
            Backend::Auto,
            &x,
            [2, c, h, wd],
            0.02,
            100,
            &pw,
            Output::F32 {
                out: &mut conv,
                dequant: deq,
            },
        );
        let mut mm = vec![0i32; m * n];
        gemm_quantize(Backend::Auto, &a, m, k, 0.03, 7, &pg, Output::I32(&mut mm));
        (conv.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), mm)
    };
    let single = multithread_tract_scope(Executor::SingleThread, run);
    for threads in [2, 3] {
        // Every call split (the default thresholds keep these shapes whole).
        let multi = multithread_tract_scope(Executor::multithread(threads), || {
            par::split_everything(run)
        });
        assert!(multi == single, "{threads} threads differ from 1");
        let by_image = multithread_tract_scope(Executor::multithread(threads), || {
            par::split_images_only(run)
        });
        assert!(
            by_image == single,
            "{threads} threads, images split, differ from 1"
        );
    }
}

/// Symmetric i8 weights stay resident as i8 (one byte a value, panels padded), as i8
/// pairs or s8 quads; weights whose centered values leave i8 (u8 with zero point 0, or
/// i8 with a zero point) keep i16 pairs even when quads are asked for, and every storage
/// gives exact results.
#[test]
fn weights_resident_as_i8_when_centered_values_fit() {
    let mut rng = Rng(SplitMix64::new(21));
    let (n, k): (usize, usize) = (19, 37);
    let w = rng.bytes_i8(n * k);
    let padded = |width: usize| n.div_ceil(NR) * NR * k.div_ceil(width) * width;
    let pack = |pk: Packing, w: &[u8], zp: u8| {
        PackedWeights::pack_with(pk, w, WeightLayout::NK, n, k, &[zp])
    };
    for (pk, width) in [
        (Packing::Pairs, 2),
        (Packing::Quads, 4),
        (Packing::Octets, 8),
    ] {
        let p = PackedWeights::pack_with(pk, &w, WeightLayout::NK, n, k, &[] as &[i8]);
        assert_eq!((p.packing(), p.resident_bytes()), (pk, padded(width)));
        // u8 centered on 128 spans i8; on 0 it does not.
        let wu = rng.bytes_u8(n * k);
        let pu = pack(pk, &wu, 128);
        assert_eq!((pu.packing(), pu.resident_bytes()), (pk, padded(width)));
        let pu = pack(pk, &wu, 0);
        assert_eq!(
            (pu.packing(), pu.resident_bytes()),
            (Packing::Pairs, 2 * padded(2))
        );
    }

    // Conv: 3x3, 7 -> 10 channels, zero points that push centered values to ±255.
    let geom = ConvGeometry {
        pads: [1; 4],
        ..ConvGeometry::new(3, 3)
    };
    let (c, oc): (usize, usize) = (7, 10);
    let steps_padded = |width: usize| 9 * c.div_ceil(width) * width * oc.div_ceil(MR) * MR;
    let w = rng.bytes_i8(oc * c * 9);
    for (pk, width) in [
        (Packing::Pairs, 2),
        (Packing::Quads, 4),
        (Packing::Octets, 8),
    ] {
        let p = PackedConvWeights::pack_with(pk, &w, oc, c, geom, &[] as &[i8]);
        assert_eq!((p.packing(), p.resident_bytes()), (pk, steps_padded(width)));
    }
    let wzp: Vec<i8> = (0..oc)
        .map(|o| if o % 2 == 0 { 127 } else { -128 })
        .collect();
    let x = rng.bytes_u8(c * 6 * 6);
    let (want, ..) = conv_ref(&x, [1, c, 6, 6], 3u8, &w, oc, &wzp, &geom);
    for (be, pk) in setups() {
        let pw = PackedConvWeights::pack_with(pk, &w, oc, c, geom, &wzp);
        assert_eq!(
            (pw.packing(), pw.resident_bytes()),
            (Packing::Pairs, 2 * steps_padded(2))
        );
        let mut out = vec![0i32; want.len()];
        conv2d(be, &x, [1, c, 6, 6], 3u8, &pw, Output::I32(&mut out));
        assert_eq!(out, as_i32(&want), "{be:?}");
    }
}

/// The product of two activations, each quantized on the fly, in every storage order:
/// bit-identical to quantizing both (ONNX `QuantizeLinear`), an i64 matrix product of the
/// centered values and one multiply by the product of the scales.
#[test]
fn matmul_of_two_quantized_activations_is_exact() {
    let mut rng = Rng(SplitMix64::new(31));
    for case in 0..80 {
        // Reductions up to 258 terms run as exact f32 loops, longer ones on the GEMM;
        // outputs narrower than 16 as dot products.
        let k = if case % 5 == 4 {
            rng.range(250, 400)
        } else {
            rng.range(1, 70)
        };
        let (m, n) = (rng.range(1, 30), rng.range(1, 40));
        let (xs, ys) = (0.021f32, 0.0037f32);
        let (xz, yz) = (rng.byte(), rng.byte());
        let (x_t, y_t) = (case % 2 == 1, case % 4 >= 2);
        let x = floats(&mut rng, m * k, xs);
        let y = floats(&mut rng, k * n, ys);
        // Reference, from row-major views.
        let xv = |i: usize, kk: usize| x[if x_t { kk * m + i } else { i * k + kk }];
        let yv = |kk: usize, j: usize| y[if y_t { j * k + kk } else { kk * n + j }];
        let mut want = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                let mut s = 0i64;
                for kk in 0..k {
                    let a = q_ref(xv(i, kk), xs, xz as i32, 0, 255) - xz as i32;
                    let b = q_ref(yv(kk, j), ys, yz as i32, 0, 255) - yz as i32;
                    s += a as i64 * b as i64;
                }
                want[i * n + j] = s as i32 as f32 * (xs * ys);
            }
        }
        for be in backends() {
            let mut got = vec![0f32; m * n];
            matmul_quantize(
                be,
                QuantOperand {
                    values: &x,
                    transposed: x_t,
                    scale: xs,
                    zero_point: xz,
                },
                QuantOperand {
                    values: &y,
                    transposed: y_t,
                    scale: ys,
                    zero_point: yz,
                },
                m,
                k,
                n,
                &mut got,
            );
            let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            assert_eq!(
                bits(&got),
                bits(&want),
                "{be:?} m={m} k={k} n={n} x_t={x_t} y_t={y_t}"
            );
        }
    }
}

/// The unfused reference of one attention head on the kernels that run the unfused graph:
/// `Q·Kᵀ` by [`matmul_quantize`], the score scale, [`attention::softmax_rows`], `P·V` by
/// [`matmul_quantize`] of the dequantized codes (which quantize back to the same codes).
#[allow(clippy::too_many_arguments)]
fn attention_ref(
    q: &AttentionOperand,
    k: &AttentionOperand,
    v: &AttentionOperand,
    sc: ScoreScale,
    p: ProbQuant,
    (m, n, d, dv): (usize, usize, usize, usize),
    [qo, ko, vo]: [usize; 3],
) -> Vec<f32> {
    fn op<'a>(o: &AttentionOperand<'a>, off: usize, len: usize) -> QuantOperand<'a> {
        QuantOperand {
            values: &o.values[off..off + len],
            transposed: o.transposed,
            scale: o.scale,
            zero_point: o.zero_point,
        }
    }
    let mut s = vec![0f32; m * n];
    matmul_quantize(
        Backend::Auto,
        op(q, qo, m * d),
        op(k, ko, n * d),
        m,
        d,
        n,
        &mut s,
    );
    let mut codes = vec![0u8; m * n];
    attention::softmax_rows(&mut s, &mut codes, n, sc, p);
    let pd: Vec<f32> = codes
        .iter()
        .map(|&c| (c as i32 - p.zero_point as i32) as f32 * p.scale)
        .collect();
    let mut o = vec![0f32; m * dv];
    matmul_quantize(
        Backend::Auto,
        QuantOperand {
            values: &pd,
            transposed: false,
            scale: p.scale,
            zero_point: p.zero_point,
        },
        op(v, vo, n * dv),
        m,
        n,
        dv,
        &mut o,
    );
    o
}

/// Fused attention computes, bit for bit, what the unfused products compute around the
/// same softmax, for every storage order, score scale, output order and backend, with
/// heads at arbitrary offsets (broadcast batch dims), on 1 and 3 threads.
#[test]
fn fused_attention_equals_the_unfused_products() {
    use tract_linalg::multithread::{multithread_tract_scope, Executor};
    let mut rng = Rng(SplitMix64::new(41));
    for case in 0..40 {
        let heads = rng.range(1, 3);
        let (m, n) = (rng.range(1, 70), rng.range(1, 300));
        let (d, dv) = (rng.range(1, 20), rng.range(1, 20));
        // Every fourth case: short heads and fewer keys than the softmax's lanes (a short
        // conditioning: the narrow-row path).
        let (n, d, dv) = if case % 4 == 3 {
            (n % 31 + 1, d % 8 + 1, dv % 8 + 1)
        } else {
            (n, d, dv)
        };
        let sc = match case % 3 {
            0 => ScoreScale::None,
            1 => ScoreScale::Mul(0.37),
            _ => ScoreScale::Div(2.5),
        };
        let p = ProbQuant {
            scale: rng.pick(&[1.0 / 255.0, 0.0021, 0.004]),
            zero_point: rng.pick(&[0, 0, 3]),
        };
        let (tq, tk, tv, to) = (case % 2 == 1, case % 4 >= 2, case % 8 >= 4, case % 5 == 0);
        // Head 1 of K reuses head 0's values (a broadcast batch dim).
        let offsets: Vec<[usize; 3]> = (0..heads).map(|h| [h * m * d, 0, h * n * dv]).collect();
        let qv = floats(&mut rng, heads * m * d, 0.05);
        let kv = floats(&mut rng, n * d, 0.04);
        let vv = floats(&mut rng, heads * n * dv, 0.03);
        let opnd = |values: &'static [f32], transposed: bool, scale: f32, zero_point: u8| {
            AttentionOperand {
                values,
                transposed,
                scale,
                zero_point,
            }
        };
        let leak = |v: Vec<f32>| -> &'static [f32] { Box::leak(v.into_boxed_slice()) };
        let q = opnd(leak(qv), tq, 0.05, rng.byte());
        let k = opnd(leak(kv), tk, 0.04, rng.byte());
        let v = opnd(leak(vv), tv, 0.03, rng.byte());
        let shape = AttentionShape { heads, m, n, d, dv };
        let mut want = vec![0f32; heads * m * dv];
        for h in 0..heads {
            let o = attention_ref(&q, &k, &v, sc, p, (m, n, d, dv), offsets[h]);
            for i in 0..m {
                for c in 0..dv {
                    let at = if to { c * m + i } else { i * dv + c };
                    want[h * m * dv + at] = o[i * dv + c];
                }
            }
        }
        let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
        // Short heads (D, Dv ≤ SHORT_HEAD) run as loops over the keys unless forced off:
        // both ways give the unfused products' bits.
        let paths = [(false, false), (true, false), (true, true)];
        for (be, (short, narrow)) in backends().into_iter().flat_map(|b| paths.map(|p| (b, p))) {
            for threads in [1, 3] {
                let mut got = vec![0f32; want.len()];
                attention::with_short_heads(short, narrow, || {
                    multithread_tract_scope(Executor::multithread(threads), || {
                        par::split_everything(|| {
                            attention_quantize(be, q, k, v, sc, p, shape, &offsets, &mut got, to)
                        })
                    })
                });
                assert_eq!(
                    bits(&got),
                    bits(&want),
                    "{be:?} short={short} narrow={narrow} {threads} threads {shape:?} q_t={tq} k_t={tk} v_t={tv} out_t={to} {sc:?}"
                );
            }
        }
    }
}

/// The short-head rows (every `D` and `Dv` up to [`attention::SHORT_HEAD`], key counts
/// around the softmax's 32 lanes and 16-lane halves, each score scale, scores spread wide
/// enough that `exp` clamps) give the unfused products' bits on every backend: the
/// AVX-512 rows' intrinsics, the AVX2 and portable loops.
#[test]
fn short_head_rows_equal_the_unfused_products() {
    let mut rng = Rng(SplitMix64::new(43));
    let leak = |v: Vec<f32>| -> &'static [f32] { Box::leak(v.into_boxed_slice()) };
    for (case, n) in [32usize, 33, 47, 48, 49, 63, 64, 77, 96, 130, 256]
        .into_iter()
        .enumerate()
    {
        for d in 1..=attention::SHORT_HEAD {
            let dv = (d + case) % attention::SHORT_HEAD + 1;
            let m = rng.range(1, 20);
            let sc = match (case + d) % 3 {
                0 => ScoreScale::None,
                1 => ScoreScale::Mul(0.37),
                _ => ScoreScale::Div(2.5),
            };
            let p = ProbQuant {
                scale: rng.pick(&[1.0 / 255.0, 0.0021]),
                zero_point: rng.pick(&[0, 3]),
            };
            // Scales up to 0.5: scores far apart (below −87 after the max: `exp` clamps).
            let wide = rng.pick(&[0.05f32, 0.5]);
            let op = |values: &'static [f32], scale: f32, zero_point: u8| AttentionOperand {
                values,
                transposed: false,
                scale,
                zero_point,
            };
            let q = op(leak(floats(&mut rng, m * d, wide)), wide, rng.byte());
            let k = op(leak(floats(&mut rng, n * d, wide)), wide, rng.byte());
            let v = op(leak(floats(&mut rng, n * dv, 0.03)), 0.03, rng.byte());
            let want = attention_ref(&q, &k, &v, sc, p, (m, n, d, dv), [0, 0, 0]);
            let shape = AttentionShape {
                heads: 1,
                m,
                n,
                d,
                dv,
            };
            for be in backends() {
                let mut got = vec![0f32; m * dv];
                attention::with_short_heads(true, true, || {
                    attention_quantize(be, q, k, v, sc, p, shape, &[], &mut got, false)
                });
                let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&got), bits(&want), "{be:?} {shape:?} {sc:?} {p:?}");
            }
        }
    }
}

/// The softmax's `exp` is within 2 ulp of the true value on `[-87, 0]`.
#[test]
fn softmax_exp_is_accurate() {
    let mut worst = 0f64;
    for i in 0..=870_000 {
        let x = -(i as f32) * 1e-4;
        let got = attention::exp_nonpositive(x) as f64;
        let want = (x as f64).exp();
        worst = worst.max((got - want).abs() / want);
    }
    assert!(worst < 2.5e-7, "relative error {worst:e}");
}

/// The fused softmax's codes of P against an f64 softmax: equal, except by one step where
/// the exact value lies within float rounding of a rounding boundary.
#[test]
fn softmax_codes_match_an_exact_softmax() {
    let mut rng = Rng(SplitMix64::new(42));
    let (mut differ, mut total) = (0, 0);
    for _ in 0..200 {
        let n = rng.range(1, 700);
        let spread = rng.pick(&[0.5f32, 4.0, 20.0]);
        let mut s: Vec<f32> = (0..n)
            .map(|_| (rng.next() as u32 as f32 / u32::MAX as f32 - 0.5) * spread)
            .collect();
        let p = ProbQuant {
            scale: rng.pick(&[1.0 / 255.0, 0.0013]),
            zero_point: 0,
        };
        let exact: Vec<f64> = {
            let max = s.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
            let e: Vec<f64> = s.iter().map(|&x| (x as f64 - max).exp()).collect();
            let sum: f64 = e.iter().sum();
            e.iter().map(|x| x / sum / p.scale as f64).collect()
        };
        let mut codes = vec![0u8; n];
        attention::softmax_rows(&mut s, &mut codes, n, ScoreScale::None, p);
        for (&c, &x) in codes.iter().zip(&exact) {
            let want = x.round_ties_even().min(255.0);
            total += 1;
            if c as f64 != want {
                differ += 1;
                assert!(
                    (c as f64 - want).abs() == 1.0
                        && (x - x.floor() - 0.5).abs() < 1e-4 * x.max(1.0),
                    "code {c} vs exact {x}"
                );
            }
        }
    }
    eprintln!("{differ} of {total} codes one step off the exact softmax's");
}

/// The requantizing store of an output Q/DQ pair (`Output::Requant`) writes what the f32
/// store followed by ONNX QuantizeLinear (round half to even, saturate) and
/// DequantizeLinear gives, bit for bit, on every backend and packing — including
/// saturated values (an output scale too small for the range) and exact ties.
#[test]
fn requant_store_is_f32_store_then_quantize_dequantize() {
    let mut rng = Rng(SplitMix64::new(41));
    for case in 0..40 {
        let geom = ConvGeometry {
            kernel: [rng.range(1, 3), rng.range(1, 3)],
            strides: [1, rng.range(1, 2)],
            pads: [1, 1, 0, 1],
            dilations: [1, 1],
            groups: 1,
        };
        let (nb, c, oc) = (rng.range(1, 2), rng.range(1, 9), rng.range(1, 20));
        let (h, wd) = (rng.range(3, 12), rng.range(3, 12));
        let (ho, wo) = geom.output_hw(h, wd).unwrap();
        let shape = [nb, c, h, wd];
        let x = rng.bytes_u8(nb * c * h * wd);
        let w = rng.bytes_i8(oc * c * geom.kernel[0] * geom.kernel[1]);
        let zp = rng.byte();
        let w_scale: Vec<f32> = (0..oc).map(|o| 0.5f32.powi(o as i32 % 7 + 6)).collect();
        let bias: Vec<f32> = (0..oc).map(|o| o as f32 * 0.25 - 1.0).collect();
        // Powers of two: many values land exactly on a rounding tie.
        let (a_scale, out_scale) = (0.5f32.powi(3), [0.5f32.powi(2), 1e-3][case % 2]);
        let out_zp = rng.byte();
        for (be, pk) in setups() {
            let pw = PackedConvWeights::pack_with(pk, &w, oc, c, geom, &[] as &[i8]);
            let dequant = Dequant {
                a_scale,
                w_scale: &w_scale,
                bias: Some(&bias),
            };
            let n = nb * oc * ho * wo;
            let mut f = vec![0f32; n];
            conv2d(
                be,
                &x,
                shape,
                zp,
                &pw,
                Output::F32 {
                    out: &mut f,
                    dequant,
                },
            );
            let mut r = vec![f32::NAN; n];
            let out = Output::Requant {
                out: &mut r,
                dequant,
                scale: out_scale,
                zero_point: out_zp,
            };
            conv2d(be, &x, shape, zp, &pw, out);
            for (i, (&v, &got)) in f.iter().zip(&r).enumerate() {
                let q = ((v / out_scale).round_ties_even() + out_zp as f32).clamp(0.0, 255.0);
                let want = (q - out_zp as f32) * out_scale;
                assert_eq!(
                    got.to_bits(),
                    want.to_bits(),
                    "{be:?} case {case} [{i}]: {v}"
                );
            }
        }
    }
}

/// `Output::Sum` is the plain (or requantized) f32 store followed by one f32 addition
/// per value, bit for bit: an addend of the output's shape and one per (image, channel)
/// plane (`[N or 1, C, 1, 1]`), with and without an output pair, for every backend and
/// packing, with one and two threads' splits (`TFMQC_MIN_PARALLEL_WORK` is not set here:
/// the sizes straddle the conv's threshold instead).
#[test]
fn sum_store_is_f32_store_then_add() {
    let mut rng = Rng(SplitMix64::new(47));
    for case in 0..32 {
        let geom = ConvGeometry {
            kernel: [rng.range(1, 3), rng.range(1, 3)],
            strides: [1, rng.range(1, 2)],
            pads: [1, 1, 1, 0],
            dilations: [1, 1],
            groups: 1,
        };
        let (nb, c, oc) = (rng.range(1, 2), rng.range(1, 9), rng.range(1, 20));
        let (h, wd) = (rng.range(3, 12), rng.range(3, 12));
        let (ho, wo) = geom.output_hw(h, wd).unwrap();
        let shape = [nb, c, h, wd];
        let x = rng.bytes_u8(nb * c * h * wd);
        let w = rng.bytes_i8(oc * c * geom.kernel[0] * geom.kernel[1]);
        let zp = rng.byte();
        let w_scale: Vec<f32> = (0..oc).map(|o| 0.37f32.powi(o as i32 % 5 + 2)).collect();
        let bias: Vec<f32> = (0..oc).map(|o| o as f32 * 0.3 - 1.7).collect();
        let n = nb * oc * ho * wo;
        // Residual values of every magnitude (sums that round), and a NaN and infinities.
        let mut same: Vec<f32> = (0..n)
            .map(|i| (rng.byte() as f32 - 128.0) * 0.5f32.powi((i % 23) as i32 - 4) + 0.1)
            .collect();
        if n > 3 {
            same[0] = f32::INFINITY;
            same[1] = f32::NEG_INFINITY;
            same[2] = f32::NAN;
        }
        // `[N, C, 1, 1]` or `[1, C, 1, 1]` (every other case).
        let per = if case % 2 == 0 { nb * oc } else { oc };
        let planes: Vec<f32> = (0..per).map(|i| i as f32 * 0.173 - 2.0).collect();
        let requant = [None, Some((0.5f32.powi(3), rng.byte()))][case % 3 % 2];
        for (be, pk) in setups() {
            let pw = PackedConvWeights::pack_with(pk, &w, oc, c, geom, &[] as &[i8]);
            let dequant = Dequant {
                a_scale: 0.5f32.powi(3),
                w_scale: &w_scale,
                bias: Some(&bias),
            };
            let mut plain = vec![0f32; n];
            let out = match requant {
                None => Output::F32 {
                    out: &mut plain,
                    dequant,
                },
                Some((scale, zero_point)) => Output::Requant {
                    out: &mut plain,
                    dequant,
                    scale,
                    zero_point,
                },
            };
            conv2d(be, &x, shape, zp, &pw, out);
            for addend in [
                Addend::Same(&same),
                Addend::Planes {
                    values: &planes,
                    plane: ho * wo,
                },
            ] {
                let mut got = vec![f32::NAN; n];
                let out = Output::Sum {
                    out: &mut got,
                    dequant,
                    requant,
                    addend,
                };
                conv2d(be, &x, shape, zp, &pw, out);
                for (i, (&v, &y)) in plain.iter().zip(&got).enumerate() {
                    let a = match addend {
                        Addend::Same(s) => s[i],
                        Addend::Planes { values, plane } => values[(i / plane) % values.len()],
                    };
                    let want = v + a;
                    assert!(
                        want.to_bits() == y.to_bits() || (want.is_nan() && y.is_nan()),
                        "{be:?} {pk:?} case {case} [{i}]: {v} + {a} = {want}, stored {y}"
                    );
                }
            }
        }
    }
}

/// `Output::Sum` refuses an addend that does not tile the output.
#[test]
#[should_panic(expected = "plane addends do not tile")]
fn sum_store_refuses_a_ragged_addend() {
    let geom = ConvGeometry {
        kernel: [1, 1],
        strides: [1, 1],
        pads: [0; 4],
        dilations: [1, 1],
        groups: 1,
    };
    let w = PackedConvWeights::pack(&[1i8; 4], 2, 2, geom);
    let mut out = vec![0f32; 2 * 9];
    let dequant = Dequant {
        a_scale: 1.0,
        w_scale: &[1.0],
        bias: None,
    };
    let out = Output::Sum {
        out: &mut out,
        dequant,
        requant: None,
        addend: Addend::Planes {
            values: &[1.0, 2.0, 3.0],
            plane: 9,
        },
    };
    conv2d(Backend::Portable, &[0u8; 18], [1, 2, 3, 3], 0, &w, out);
}

/// `quantize_channels_u8` is ONNX `Mul` by a per-channel constant then `QuantizeLinear`:
/// the product rounded to f32, then divided and rounded half to even.
#[test]
fn quantize_channels_is_mul_then_quantize_linear() {
    let mut rng = Rng(SplitMix64::new(43));
    for case in 0..30 {
        let (nb, c, plane) = (rng.range(1, 3), rng.range(1, 7), rng.range(0, 70));
        // Every fourth case: factors on the last axis (`plane = 1`, a Gemm input's rows).
        let (nb, c, plane) = if case % 4 == 0 {
            (rng.range(1, 9), rng.range(1, 70), 1)
        } else {
            (nb, c, plane)
        };
        let r: Vec<f32> = (0..c)
            .map(|_| (rng.below(4000) as f32 - 1000.0) / 997.0)
            .collect();
        let x: Vec<f32> = (0..nb * c * plane)
            .map(|i| match i % 5 {
                // Exact ties after the product for r = ±1-ish and a power-of-two scale.
                0 => (rng.below(512) as f32 - 256.0) * 0.5 + 0.25,
                _ => (rng.below(1 << 20) as f32 - 524288.0) / 1024.0,
            })
            .collect();
        let (scale, zp) = ([0.5f32, 0.037, 3.0][case % 3], rng.byte());
        let m: Vec<f32> = x
            .iter()
            .enumerate()
            .map(|(i, &v)| v * r[(i / plane.max(1)) % c])
            .collect();
        let mut want = vec![0u8; m.len()];
        quantize_u8(Backend::Portable, &m, scale, zp, &mut want);
        for (be, _) in setups() {
            let mut got = vec![0u8; x.len()];
            quantize_channels_u8(be, &x, c, plane, &r, scale, zp, &mut got);
            assert_eq!(got, want, "{be:?} case {case}");
        }
    }
}

/// What a loader refuses before packing (the denoiser_load fuzz target found a
/// hand-written `TfmqcQConv` with dilation 0 reaching the packing's assert).
#[test]
fn conv_geometry_check_names_what_cannot_pack() {
    let ok = ConvGeometry::new(3, 3);
    assert_eq!(ok.check(8, 4, 8 * 4 * 9), Ok(()));
    let with = |f: fn(&mut ConvGeometry)| {
        let mut g = ok;
        f(&mut g);
        g.check(8, 4, 8 * 4 * 9).unwrap_err()
    };
    assert_eq!(with(|g| g.dilations = [0, 1]), "dilation 0");
    assert_eq!(with(|g| g.strides = [1, 0]), "stride 0");
    assert_eq!(with(|g| g.kernel = [0, 3]), "empty kernel");
    assert_eq!(with(|g| g.groups = 0), "0 groups");
    assert_eq!(
        with(|g| g.groups = 3),
        "8 output channels are not a multiple of 3 groups"
    );
    assert!(with(|g| g.pads = [usize::MAX, 0, 0, 0]).contains("beyond"));
    assert_eq!(
        ok.check(8, 4, 10).unwrap_err(),
        "10 weights for [8, 4, 3, 3]"
    );
    assert!(ok.check(usize::MAX, 4, 10).is_err());
}

/// Random weights in int4's range −8..=7, the ends over-represented.
fn int4_weights(rng: &mut Rng, n: usize) -> Vec<i8> {
    (0..n)
        .map(|_| match rng.below(4) {
            0 => rng.pick(&[-8i8, 7]),
            _ => (rng.below(16) as i8) - 8,
        })
        .collect()
}

#[test]
fn gemm_with_weights_resident_at_4_bits_is_bit_exact() {
    // Odd K and N (a padded nibble at the end of a panel), several reduction blocks and
    // row chunks, NK and KN layouts, on every kernel this CPU runs.
    let mut rng = Rng(SplitMix64::new(41));
    for (m, k, n) in [
        (1, 1, 1),
        (3, 7, 5),
        (13, 33, 17),
        (64, 255, 40),
        (7, 2050, 16),
        (131, 4097, 5),
    ] {
        let a = rng.bytes_u8(m * k);
        let w = int4_weights(&mut rng, n * k);
        let wt: Vec<i8> = (0..k * n).map(|i| w[(i % n) * k + i / n]).collect();
        let zp = rng.byte();
        let want = as_i32(&gemm_ref(&a, m, k, zp, &w, n, &[] as &[i8]));
        for (be, pk) in setups() {
            let full = PackedWeights::pack_with(pk, &w, WeightLayout::NK, n, k, &[] as &[i8]);
            let nk = full.clone().into_nibbles();
            let kn = PackedWeights::pack_with(pk, &wt, WeightLayout::KN, n, k, &[] as &[i8])
                .into_nibbles();
            assert!(nk.is_nibbles() && kn.is_nibbles(), "{pk:?}");
            assert!(
                nk.resident_bytes() * 2 <= full.resident_bytes() + 1,
                "{pk:?}"
            );
            for pw in [&nk, &kn] {
                let mut out = vec![0i32; m * n];
                gemm(be, &a, m, k, zp, pw, Output::I32(&mut out));
                assert_eq!(out, want, "{be:?} {pk:?} m={m} k={k} n={n}");
            }
        }
    }
}

#[test]
fn conv_with_weights_resident_at_4_bits_is_bit_exact() {
    let mut rng = Rng(SplitMix64::new(43));
    for (g, cg, og, kh, kw, h, wd) in [
        (1, 3, 5, 3, 3, 7, 6),
        (1, 17, 9, 1, 1, 5, 5),
        (2, 5, 3, 3, 1, 6, 4),
        (1, 64, 32, 3, 3, 8, 8),
    ] {
        let geom = ConvGeometry {
            kernel: [kh, kw],
            strides: [1, 1],
            pads: [1, 0, 1, 0],
            dilations: [1, 1],
            groups: g,
        };
        let (c, oc) = (cg * g, og * g);
        let shape = [2, c, h, wd];
        let x = rng.bytes_u8(2 * c * h * wd);
        let w = int4_weights(&mut rng, oc * cg * kh * kw);
        let zp = rng.byte();
        let (want, ho, wo) = conv_ref(&x, shape, zp, &w, oc, &[] as &[i8], &geom);
        let want = as_i32(&want);
        for (be, pk) in setups() {
            let full = PackedConvWeights::pack_with(pk, &w, oc, cg, geom, &[] as &[i8]);
            let pw = full.clone().into_nibbles();
            assert!(pw.is_nibbles(), "{pk:?}");
            assert!(
                pw.resident_bytes() * 2 <= full.resident_bytes() + 1,
                "{pk:?}"
            );
            let mut out = vec![-1i32; 2 * oc * ho * wo];
            conv2d(be, &x, shape, zp, &pw, Output::I32(&mut out));
            assert_eq!(out, want, "{be:?} {pk:?} {geom:?} oc={oc}");
        }
    }
}

#[test]
fn weights_beyond_int4_stay_at_8_bits() {
    let w: Vec<i8> = vec![8, -8, 0, 1];
    for (_, pk) in setups() {
        let p =
            PackedWeights::pack_with(pk, &w, WeightLayout::NK, 2, 2, &[] as &[i8]).into_nibbles();
        assert!(!p.is_nibbles(), "{pk:?}");
    }
}
