//! Conv2d (NCHW) as an implicit GEMM over phase-split, zero-padded, widened input planes.

use super::micro::{self, KernelArgs, KernelFn};
use super::sink::{Channel, Sink};
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
/// [`super::ConvGeometry::output_hw`].
pub fn conv2d<A: QuantInt>(
    backend: Backend,
    input: &[A],
    shape: [usize; 4],
    input_zero_point: A,
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
    let mut sink = Sink::new(out, oc);
    if out_is_empty(nb, oc, ho, wo) {
        return;
    }
    match backend.isa() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `isa()` returns Avx2 only when the CPU supports AVX2.
        Isa::Avx2 => unsafe { conv_avx2(input, shape, input_zero_point, w, &mut sink) },
        _ => conv_impl(
            micro::kernel_portable,
            input,
            shape,
            input_zero_point,
            w,
            &mut sink,
        ),
    }
}

/// The driver compiled for AVX2 (the epilogue and widening loops vectorize with it).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn conv_avx2<A: QuantInt>(
    input: &[A],
    shape: [usize; 4],
    input_zero_point: A,
    w: &PackedConvWeights,
    sink: &mut Sink,
) {
    conv_impl(
        micro::avx2_kernel(),
        input,
        shape,
        input_zero_point,
        w,
        sink,
    )
}

#[inline(always)]
fn conv_impl<A: QuantInt>(
    kernel: KernelFn,
    input: &[A],
    shape: [usize; 4],
    input_zero_point: A,
    w: &PackedConvWeights,
    sink: &mut Sink,
) {
    let [nb, c, h, wd] = shape;
    let geom = *w.geometry();
    let g = geom.groups;
    let cg = w.in_channels_per_group();
    let (ho, wo) = geom.output_hw(h, wd).expect("checked by conv2d");
    let oc = w.out_channels();
    let og = oc / g;
    let zp = input_zero_point.to_i32();

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
    let taps: Vec<usize> = inner
        .iter()
        .map(|&(ph, o)| ph * cpairs * plane + o)
        .collect();
    let mut buf = vec![0i32; sh * sw * cpairs * plane];
    let mut tile = [0i32; MR * NR];

    for b in 0..nb {
        for gi in 0..g {
            // Widen this (image, group) into the phase planes.
            for cp in 0..cpairs {
                let ch0 = gi * cg + 2 * cp;
                let src0 = &input[(b * c + ch0) * h * wd..][..h * wd];
                let src1 =
                    (2 * cp + 1 < cg).then(|| &input[(b * c + ch0 + 1) * h * wd..][..h * wd]);
                for py in 0..sh {
                    for px in 0..sw {
                        let base = ((py * sw + px) * cpairs + cp) * plane;
                        let dst = &mut buf[base..base + hq * wq];
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
                                    for ((d, &v0), &v1) in
                                        mid.iter_mut().zip(&r0[x0..]).zip(&r1[x0..])
                                    {
                                        *d = pair(v0.to_i32() - zp, v1.to_i32() - zp);
                                    }
                                }
                                (None, 1) => {
                                    for (d, &v0) in mid.iter_mut().zip(&r0[x0..]) {
                                        *d = pair(v0.to_i32() - zp, 0);
                                    }
                                }
                                (s1, _) => {
                                    for (i, d) in mid.iter_mut().enumerate() {
                                        let x = x0 + i * sw;
                                        let v1 = s1.map_or(0, |s| s[y * wd + x].to_i32() - zp);
                                        *d = pair(r0[x].to_i32() - zp, v1);
                                    }
                                }
                            }
                        }
                    }
                }
            }
            // Implicit GEMM: tile rows = output channels, columns = positions on pitch wq.
            for t0 in (0..ntiles).step_by(TILE_CHUNK) {
                for op in 0..w.opanels() {
                    let a = w.panel(gi, op);
                    let rows = (og - op * MR).min(MR);
                    for t in t0..(t0 + TILE_CHUNK).min(ntiles) {
                        let p0 = t * NR;
                        let args = KernelArgs {
                            a,
                            a_row: 1,
                            a_step: MR,
                            b: &buf[p0.min(buf.len())..],
                            b_cp: plane,
                            taps: &taps,
                            cpairs,
                        };
                        kernel(&args, &mut tile);
                        let cols = (npos - p0).min(NR);
                        for r in 0..rows {
                            let o = gi * og + op * MR + r;
                            let obase = (b * oc + o) * ho * wo;
                            let acc = &tile[r * NR..r * NR + cols];
                            let mut ci = 0;
                            while ci < cols {
                                let p = p0 + ci;
                                let (y, x) = (p / wq, p % wq);
                                let run = (cols - ci).min(wq - x);
                                if x < wo {
                                    let n = run.min(wo - x);
                                    sink.store(
                                        obase + y * wo + x,
                                        &acc[ci..ci + n],
                                        Channel::Fixed(o),
                                    );
                                }
                                ci += run;
                            }
                        }
                    }
                }
            }
        }
    }
}

fn out_is_empty(nb: usize, oc: usize, ho: usize, wo: usize) -> bool {
    nb == 0 || oc == 0 || ho == 0 || wo == 0
}
