//! Conv2d (NCHW) as an implicit GEMM over phase-split, zero-padded, widened input planes.

use super::micro::{self, KernelArgs, KernelFn};
use super::par::{self, Shared};
use super::sink::{quantize, Channel, Sink};
use super::{pair, Backend, Isa, Output, PackedConvWeights, QuantInt, MR, NR};

/// Output tiles (of `NR` positions) processed per pass over the weight panels.
const TILE_CHUNK: usize = 16;

/// u8 Conv2d with i32 output `[N, O, Ho, Wo]` on the fastest backend of this CPU.
/// `shape` is the input's `[N, C, H, W]`; padded positions read `input_zero_point`
/// (they contribute 0).
pub fn conv2d_u8i8(
    input: &[u8],
    shape: [usize; 4],
    input_zero_point: u8,
    w: &PackedConvWeights,
    out: &mut [i32],
) {
    conv2d(
        Backend::Auto,
        input,
        shape,
        input_zero_point,
        w,
        Output::I32(out),
    );
}

/// General Conv2d: u8 or i8 input `[N, C, H, W]` with a zero point, any [`Output`]
/// (`[N, O, Ho, Wo]`; channel = `O`), on the chosen backend. Output size from
/// [`super::ConvGeometry::output_hw`]. Splits its work over tract's current executor.
pub fn conv2d<A: QuantInt>(
    backend: Backend,
    input: &[A],
    shape: [usize; 4],
    input_zero_point: A,
    w: &PackedConvWeights,
    out: Output,
) {
    let zp = input_zero_point.to_i32();
    conv_run(backend, input, shape, move |v: A| v.to_i32() - zp, w, out)
}

/// Conv2d of an f32 input `[N, C, H, W]` quantized on the fly to u8 with `scale` and
/// `zero_point` (ONNX `QuantizeLinear`: round half to even, saturate): bit-identical to
/// [`super::quantize_u8`] followed by [`conv2d`], without the u8 copy of the input.
pub fn conv2d_quantize(
    backend: Backend,
    input: &[f32],
    shape: [usize; 4],
    scale: f32,
    zero_point: u8,
    w: &PackedConvWeights,
    out: Output,
) {
    let zp = zero_point as i32;
    conv_run(
        backend,
        input,
        shape,
        move |v: f32| quantize(v, scale, zp, 0, 255) - zp,
        w,
        out,
    )
}

fn conv_run<A: Copy + Sync, C: Fn(A) -> i32 + Copy + Sync>(
    backend: Backend,
    input: &[A],
    shape: [usize; 4],
    center: C,
    w: &PackedConvWeights,
    out: Output,
) {
    let [nb, c, h, wd] = shape;
    let geom = *w.geometry();
    let g = geom.groups;
    let cg = w.in_channels_per_group();
    assert_eq!(
        c,
        cg * g,
        "int8 conv: input channels != groups * weight channels"
    );
    assert_eq!(
        input.len(),
        nb * c * h * wd,
        "int8 conv: input length does not match shape"
    );
    let (ho, wo) = geom
        .output_hw(h, wd)
        .expect("int8 conv: kernel larger than padded input");
    let oc = w.out_channels();
    assert_eq!(out.len(), nb * oc * ho * wo, "int8 conv: output length");
    let sink = Sink::new(out, oc);
    if out_is_empty(nb, oc, ho, wo) {
        return;
    }
    let isa = backend.isa();
    let kernel: KernelFn = micro::kernel_for(isa);
    let plan = Plan::new(w, shape, kernel);
    let mut buf = vec![0i32; plan.phases * plan.cpairs * plan.plane];
    let mut wide = Vec::new();
    for b in 0..nb {
        for gi in 0..g {
            // Weights resident as i8 are widened once per call and group (a small fraction
            // of the work: each weight pair is used at every output position).
            let panels = w.group_panels(gi, &mut wide);
            // Widen this (image, group) into the phase planes, channel pairs in parallel.
            {
                let planes = Shared::new(&mut buf);
                par::for_each(plan.cpairs, |cp| match isa {
                    #[cfg(target_arch = "x86_64")]
                    // SAFETY: Avx2 (or better) only when detected; each cp writes its own planes.
                    Isa::Avx2 | Isa::Avx512Vnni => unsafe {
                        widen_avx2(&plan, input, center, b, gi, cp, &planes)
                    },
                    // SAFETY: each cp writes its own planes.
                    _ => unsafe { widen(&plan, input, center, b, gi, cp, &planes) },
                });
            }
            // Implicit GEMM: tile rows = output channels, columns = positions on pitch wq;
            // units = (chunk of tiles, panel of output channels), disjoint outputs.
            let opanels = w.opanels();
            let units = plan.ntiles.div_ceil(TILE_CHUNK) * opanels;
            par::for_each(units, |u| {
                let (tc, op) = (u / opanels, u % opanels);
                let ops = Operands {
                    planes: &buf,
                    weights: &panels[op * plan.panel_len..][..plan.panel_len],
                };
                match isa {
                    #[cfg(target_arch = "x86_64")]
                    // SAFETY: Avx2 (or better) only when detected; units store to disjoint outputs.
                    Isa::Avx2 | Isa::Avx512Vnni => unsafe {
                        unit_avx2(&plan, &ops, b, gi, tc, op, &sink)
                    },
                    // SAFETY: units store to disjoint outputs.
                    _ => unsafe { unit(&plan, &ops, b, gi, tc, op, &sink) },
                }
            });
        }
    }
}

/// What one unit reads: the widened input planes and its weight panel (i16 pairs).
struct Operands<'a> {
    planes: &'a [i32],
    weights: &'a [i32],
}

/// Shapes and offsets of one convolution call.
struct Plan<'w> {
    w: &'w PackedConvWeights,
    kernel: KernelFn,
    c: usize,
    h: usize,
    wd: usize,
    ho: usize,
    wo: usize,
    cg: usize,
    og: usize,
    oc: usize,
    /// Phases `sh × sw`; phase planes have pitch `wq` and `hq` rows.
    phases: usize,
    hq: usize,
    wq: usize,
    plane: usize,
    cpairs: usize,
    npos: usize,
    ntiles: usize,
    /// Offset of each kernel tap in the phase planes.
    taps: Vec<usize>,
    /// i16 pairs in one weight panel (`kh*kw*cpairs*MR`).
    panel_len: usize,
}

impl<'w> Plan<'w> {
    fn new(w: &'w PackedConvWeights, shape: [usize; 4], kernel: KernelFn) -> Self {
        let [_, c, h, wd] = shape;
        let geom = *w.geometry();
        let (ho, wo) = geom.output_hw(h, wd).expect("checked by conv_run");
        let [kh, kw] = geom.kernel;
        let [sh, sw] = geom.strides;
        let [dh, dw] = geom.dilations;
        let [pt, pl, pb, pr] = geom.pads;
        let (hp, wp) = (h + pt + pb, wd + pl + pr);
        // Phase (py, px) holds padded[y * sh + py][x * sw + px] at [y][x], pitch wq.
        let (hq, wq) = (hp.div_ceil(sh), wp.div_ceil(sw));
        let npos = (ho - 1) * wq + wo;
        let ntiles = npos.div_ceil(NR);
        let cpairs = w.cpairs();
        let mut inner = Vec::with_capacity(kh * kw);
        for ki in 0..kh {
            for kj in 0..kw {
                let (ey, ex) = (ki * dh, kj * dw);
                inner.push(((ey % sh) * sw + ex % sw, (ey / sh) * wq + ex / sw));
            }
        }
        let max_inner = inner.iter().map(|&(_, o)| o).max().unwrap_or(0);
        let plane = (hq * wq).max(ntiles * NR + max_inner);
        let taps = inner
            .iter()
            .map(|&(ph, o)| ph * cpairs * plane + o)
            .collect();
        let oc = w.out_channels();
        Plan {
            w,
            kernel,
            c,
            h,
            wd,
            ho,
            wo,
            cg: w.in_channels_per_group(),
            og: oc / geom.groups,
            oc,
            phases: sh * sw,
            hq,
            wq,
            plane,
            cpairs,
            npos,
            ntiles,
            panel_len: inner.len() * cpairs * MR,
            taps,
        }
    }
}

/// [`widen`] compiled for AVX2 (the conversion loops vectorize with it).
///
/// # Safety
/// The CPU must support AVX2; as [`widen`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[allow(clippy::too_many_arguments)]
unsafe fn widen_avx2<A: Copy, C: Fn(A) -> i32 + Copy>(
    p: &Plan,
    input: &[A],
    center: C,
    b: usize,
    gi: usize,
    cp: usize,
    planes: &Shared<i32>,
) {
    widen(p, input, center, b, gi, cp, planes)
}

/// Writes channel pair `cp` of group `gi` of image `b` into its phase planes: i16 pairs
/// (see [`pair`]) of centered values, zeros in the padding.
///
/// # Safety
/// No other thread may write the planes of the same `cp` at the same time.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn widen<A: Copy, C: Fn(A) -> i32 + Copy>(
    p: &Plan,
    input: &[A],
    center: C,
    b: usize,
    gi: usize,
    cp: usize,
    planes: &Shared<i32>,
) {
    let geom = p.w.geometry();
    let [sh, sw] = geom.strides;
    let [pt, pl, _, _] = geom.pads;
    let (h, wd, wq) = (p.h, p.wd, p.wq);
    let ch0 = gi * p.cg + 2 * cp;
    let src0 = &input[(b * p.c + ch0) * h * wd..][..h * wd];
    let src1 = (2 * cp + 1 < p.cg).then(|| &input[(b * p.c + ch0 + 1) * h * wd..][..h * wd]);
    for py in 0..sh {
        for px in 0..sw {
            let base = ((py * sw + px) * p.cpairs + cp) * p.plane;
            let dst = planes.range(base, p.hq * wq);
            let xs = pl.saturating_sub(px).div_ceil(sw).min(wq);
            let xe = (pl + wd).saturating_sub(px).div_ceil(sw).min(wq);
            for (yy, row) in dst.chunks_exact_mut(wq).enumerate() {
                let ypad = yy * sh + py;
                if ypad < pt || ypad - pt >= h || xs >= xe {
                    row.fill(0);
                    continue;
                }
                let y = ypad - pt;
                row[..xs].fill(0);
                row[xe..].fill(0);
                let x0 = xs * sw + px - pl;
                let r0 = &src0[y * wd..][..wd];
                let mid = &mut row[xs..xe];
                match (src1, sw) {
                    (Some(s1), 1) => {
                        let r1 = &s1[y * wd..][..wd];
                        for ((d, &v0), &v1) in mid.iter_mut().zip(&r0[x0..]).zip(&r1[x0..]) {
                            *d = pair(center(v0), center(v1));
                        }
                    }
                    (None, 1) => {
                        for (d, &v0) in mid.iter_mut().zip(&r0[x0..]) {
                            *d = pair(center(v0), 0);
                        }
                    }
                    (s1, _) => {
                        for (i, d) in mid.iter_mut().enumerate() {
                            let x = x0 + i * sw;
                            let v1 = s1.map_or(0, |s| center(s[y * wd + x]));
                            *d = pair(center(r0[x]), v1);
                        }
                    }
                }
            }
        }
    }
}

/// [`unit`] compiled for AVX2 (the store epilogue vectorizes with it).
///
/// # Safety
/// The CPU must support AVX2; as [`unit`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn unit_avx2(
    p: &Plan,
    ops: &Operands,
    b: usize,
    gi: usize,
    tc: usize,
    op: usize,
    sink: &Sink,
) {
    unit(p, ops, b, gi, tc, op, sink)
}

/// Output channels of panel `op` of group `gi` at the positions of tile chunk `tc`.
///
/// # Safety
/// No other thread may store the same (image, channels, positions) at the same time.
#[inline(always)]
unsafe fn unit(p: &Plan, ops: &Operands, b: usize, gi: usize, tc: usize, op: usize, sink: &Sink) {
    let mut tile = [0i32; MR * NR];
    let (a, buf) = (ops.weights, ops.planes);
    let rows = (p.og - op * MR).min(MR);
    let t0 = tc * TILE_CHUNK;
    for t in t0..(t0 + TILE_CHUNK).min(p.ntiles) {
        let p0 = t * NR;
        let args = KernelArgs {
            a,
            a_row: 1,
            a_step: MR,
            b: &buf[p0.min(buf.len())..],
            b_cp: p.plane,
            taps: &p.taps,
            cpairs: p.cpairs,
        };
        (p.kernel)(&args, &mut tile);
        let cols = (p.npos - p0).min(NR);
        for r in 0..rows {
            let o = gi * p.og + op * MR + r;
            let obase = (b * p.oc + o) * p.ho * p.wo;
            let acc = &tile[r * NR..r * NR + cols];
            let mut ci = 0;
            while ci < cols {
                let pos = p0 + ci;
                let (y, x) = (pos / p.wq, pos % p.wq);
                let run = (cols - ci).min(p.wq - x);
                if x < p.wo {
                    let n = run.min(p.wo - x);
                    sink.store(obase + y * p.wo + x, &acc[ci..ci + n], Channel::Fixed(o));
                }
                ci += run;
            }
        }
    }
}

fn out_is_empty(nb: usize, oc: usize, ho: usize, wo: usize) -> bool {
    nb == 0 || oc == 0 || ho == 0 || wo == 0
}
