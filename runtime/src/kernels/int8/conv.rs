//! Conv2d (NCHW) as an implicit GEMM over phase-split, zero-padded, widened input planes.

use super::amx::{self, Tiles};
use super::micro::{self, KernelArgs, KernelFn, WideKernelFn, WIDE_NR};
use super::pack::{quad_u8, Packing};
use super::par::{self, Shared};
use super::sink::{quantize, Channel, Sink};
#[cfg(target_arch = "x86_64")]
use super::Isa;
use super::{pair, Backend, Output, PackedConvWeights, QuantInt, MR, NR};

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
    let center = move |v: A| v.to_i32() - zp;
    conv_run(backend, input, shape, center, zp + A::TO_U8, w, out)
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
        zp,
        w,
        out,
    )
}

/// `center(v)` is the input value minus its zero point (what pairs hold); `center(v) +
/// zero_u8` is the value as u8, `0..=255` (what quads hold).
fn conv_run<A: Copy + Sync, C: Fn(A) -> i32 + Copy + Sync>(
    backend: Backend,
    input: &[A],
    shape: [usize; 4],
    center: C,
    zero_u8: i32,
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
    // Weights (s8) are the broadcast side, the input planes (u8) the vector side.
    let micro::Kernel {
        run: kernel,
        u8_offset,
    } = micro::kernel_for(isa, w.packing(), false);
    let wide = micro::wide_conv_kernel_for(isa, w.packing()).filter(|_| u8_offset == 0);
    let plan = Plan::new(w, shape, (kernel, wide), zero_u8, u8_offset, isa);
    let buf_len = plan.phases * plan.csteps * plan.plane * plan.words;
    // Multiply-adds of one (image, group).
    let work = plan.og * plan.cg * plan.taps.len() * plan.npos;
    let kind = if plan.tiles {
        par::Kind::ConvTiles
    } else {
        par::Kind::Conv
    };
    let split = par::worth_splitting(kind, work);
    // Whole images to each thread when the images divide evenly among the threads (a
    // batch of two, classifier-free guidance's halves, at 2 threads): one fork-join a
    // call instead of two an image, no thread waiting for the other's half of a plane, each
    // thread's planes its own. At batch 2, 2 threads (runtime/examples/int8_threads.rs,
    // AVX-512 VNNI): 1.38–1.88× the 1-thread speed from 4×4 to 16×16 planes where the
    // split within an image gave 1.0–1.6×, and 1.87–2.03× at 320 channels on 32×32
    // (SD-1.5's first level) where it gave 1.53–1.60×. Values are the same either way.
    let by_image = nb > 1
        && nb % par::threads().max(1) == 0
        && par::worth_splitting(par::Kind::ConvImages, work * g * nb);
    let split = split && !by_image;
    // Tiles per chunk: at most TILE_CHUNK, the chunks of equal size (18 tiles run as 9 + 9,
    // not 16 + 2, which would leave one thread of two idle), and at least two chunks when
    // the call splits (the halves are then whole chunks). A tile's values do not depend on
    // its chunk.
    let mut chunks = plan.ntiles.div_ceil(TILE_CHUNK);
    if split {
        chunks = chunks.max(2).min(plan.ntiles);
    }
    let chunk = plan.ntiles.div_ceil(chunks.max(1)).max(1);
    let chunks = plan.ntiles.div_ceil(chunk);
    let image = |b: usize, buf: &mut Vec<i32>, wide: &mut Vec<i32>| {
        for gi in 0..g {
            // Weights resident as i8 pairs are widened once per call and group (each
            // weight is used at every output position); quads are read as they are.
            let panels = w.group_panels(gi, wide);
            // Widen this (image, group) into the phase planes, channel steps in parallel.
            {
                let planes = Shared::new(&mut buf[..]);
                // Channel steps past the input's (tile padding) keep the zero point.
                par::for_each(plan.csteps_in, split, |cs| match isa {
                    #[cfg(target_arch = "x86_64")]
                    // SAFETY: Avx2 (or better) only when detected; each cs writes its own
                    // planes.
                    Isa::Avx2 | Isa::Avx512Vnni | Isa::Amx => unsafe {
                        widen_avx2(&plan, input, center, b, gi, cs, &planes)
                    },
                    // SAFETY: each cs writes its own planes.
                    _ => unsafe { widen(&plan, input, center, b, gi, cs, &planes) },
                });
            }
            // Implicit GEMM: tile rows = output channels, columns = positions on pitch wq;
            // units = (chunk of tiles, panel of output channels), disjoint outputs.
            let opanels = w.opanels();
            let units = chunks * opanels;
            par::for_each(units, split, |u| {
                let (tc, op) = (u / opanels, u % opanels);
                let ops = Operands {
                    planes: &buf[..],
                    weights: &panels[op * plan.panel_len..][..plan.panel_len],
                };
                let tc = (tc, chunk);
                match (plan.tiles, isa) {
                    #[cfg(target_arch = "x86_64")]
                    // SAFETY: Avx2 (or better) only when detected; units store to disjoint outputs.
                    (true, Isa::Avx2 | Isa::Avx512Vnni | Isa::Amx) => unsafe {
                        unit_tiles_avx2(&plan, &ops, b, gi, tc, op, &sink)
                    },
                    // SAFETY: units store to disjoint outputs.
                    (true, _) => unsafe { unit_tiles(&plan, &ops, b, gi, tc, op, &sink) },
                    #[cfg(target_arch = "x86_64")]
                    // SAFETY: as above.
                    (false, Isa::Avx2 | Isa::Avx512Vnni | Isa::Amx) => unsafe {
                        unit_avx2(&plan, &ops, b, gi, tc, op, &sink)
                    },
                    // SAFETY: units store to disjoint outputs.
                    (false, _) => unsafe { unit(&plan, &ops, b, gi, tc, op, &sink) },
                }
            });
        }
    };
    if by_image {
        // Each image its own planes; the calls inside a part run on its thread.
        par::for_each(nb, true, |b| {
            image(b, &mut vec![plan.pad; buf_len], &mut Vec::new());
        });
    } else {
        let (mut buf, mut wide) = (vec![plan.pad; buf_len], Vec::new());
        for b in 0..nb {
            image(b, &mut buf, &mut wide);
        }
    }
}

/// What one unit reads: the widened input planes and its weight panel (as the kernel
/// reads them).
struct Operands<'a> {
    planes: &'a [i32],
    weights: &'a [i32],
}

/// Shapes and offsets of one convolution call.
struct Plan<'w> {
    w: &'w PackedConvWeights,
    kernel: KernelFn,
    /// The wide kernel, when the ISA has one: tiles of [`WIDE_NR`] columns.
    wide: Option<WideKernelFn>,
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
    /// Channels per kernel step (2: pairs, 4: quads, 8: octets), words a position of a
    /// plane holds (2 for octets, else 1) and steps per tap.
    width: usize,
    words: usize,
    csteps: usize,
    /// The input's zero point as u8 (quads' padding).
    zero_u8: i32,
    /// The quads' correction factor of each channel's weight sum: the zero point, less
    /// the offset the kernel subtracted from every input byte.
    correction: i32,
    /// What padded positions hold: 0 (centered pairs) or the zero point (raw quads).
    pad: i32,
    npos: usize,
    ntiles: usize,
    /// Offset of each kernel tap in the phase planes, in words.
    taps: Vec<usize>,
    /// Words in one weight panel (`kh*kw*csteps*rows*words`).
    panel_len: usize,
    /// Output channels a panel holds (`MR`, or 16 / 32 for tiles).
    rows: usize,
    /// Positions a tile computes (`NR`, or 32 for tiles).
    cols: usize,
    /// Channel steps of the input (`csteps` less the tiles' padding).
    csteps_in: usize,
    /// Tile-packed weights ([`Packing::Tiles`]): blocks run on [`Tiles`], on the tile unit
    /// when `unit`.
    tiles: bool,
    unit: bool,
}

impl<'w> Plan<'w> {
    fn new(
        w: &'w PackedConvWeights,
        shape: [usize; 4],
        (kernel, wide): (KernelFn, Option<WideKernelFn>),
        zero_u8: i32,
        u8_offset: i32,
        isa: super::Isa,
    ) -> Self {
        let [_, c, h, wd] = shape;
        let tiles = w.packing() == Packing::Tiles;
        let wide = wide.filter(|_| !tiles);
        let cols = match (tiles, wide) {
            (true, _) => 2 * amx::TILE,
            (false, Some(_)) => WIDE_NR,
            (false, None) => NR,
        };
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
        let ntiles = npos.div_ceil(cols);
        let csteps = w.csteps();
        let mut inner = Vec::with_capacity(kh * kw);
        for ki in 0..kh {
            for kj in 0..kw {
                let (ey, ex) = (ki * dh, kj * dw);
                inner.push(((ey % sh) * sw + ex % sw, (ey / sh) * wq + ex / sw));
            }
        }
        let max_inner = inner.iter().map(|&(_, o)| o).max().unwrap_or(0);
        let plane = (hq * wq).max(ntiles * cols + max_inner);
        let words = w.packing().words();
        let taps = inner
            .iter()
            .map(|&(ph, o)| (ph * csteps * plane + o) * words)
            .collect();
        let oc = w.out_channels();
        let rows = w.panel_rows();
        Plan {
            w,
            kernel,
            wide,
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
            width: w.packing().width(),
            words,
            csteps,
            zero_u8,
            // The tiles take raw u8, whatever the kernel of the packing would subtract.
            correction: if tiles { zero_u8 } else { zero_u8 - u8_offset },
            pad: match w.packing() {
                Packing::Pairs => 0,
                Packing::Quads | Packing::Octets | Packing::Tiles => quad_u8([zero_u8; 4]),
            },
            npos,
            ntiles,
            panel_len: inner.len() * csteps * rows * words,
            taps,
            rows,
            cols,
            csteps_in: w.in_channels_per_group().div_ceil(w.packing().width()),
            tiles,
            unit: isa == super::Isa::Amx,
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
    cs: usize,
    planes: &Shared<i32>,
) {
    widen(p, input, center, b, gi, cs, planes)
}

/// Writes channel step `cs` of group `gi` of image `b` into its phase planes: i16 pairs
/// (see [`pair`]) of centered values with zeros in the padding, or u8 quads (see
/// [`quad_u8`]; octets: two quads a position) of raw values with the zero point in the
/// padding and in channels past the last (their weights are 0).
///
/// # Safety
/// No other thread may write the planes of the same `cs` at the same time.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn widen<A: Copy, C: Fn(A) -> i32 + Copy>(
    p: &Plan,
    input: &[A],
    center: C,
    b: usize,
    gi: usize,
    cs: usize,
    planes: &Shared<i32>,
) {
    let geom = p.w.geometry();
    let [sh, sw] = geom.strides;
    let [pt, pl, _, _] = geom.pads;
    let (h, wd, wq) = (p.h, p.wd, p.wq);
    let ch0 = gi * p.cg + p.width * cs;
    let channel = |j: usize| -> Option<&[A]> {
        (j < p.width && p.width * cs + j < p.cg)
            .then(|| &input[(b * p.c + ch0 + j) * h * wd..][..h * wd])
    };
    let src: [Option<&[A]>; 8] = std::array::from_fn(channel);
    let zu = p.zero_u8;
    let raw = |v: A| center(v) + zu;
    for py in 0..sh {
        for px in 0..sw {
            let words = p.words;
            let base = ((py * sw + px) * p.csteps + cs) * p.plane * words;
            let dst = planes.range(base, p.hq * wq * words);
            let xs = pl.saturating_sub(px).div_ceil(sw).min(wq);
            let xe = (pl + wd).saturating_sub(px).div_ceil(sw).min(wq);
            for (yy, row) in dst.chunks_exact_mut(wq * words).enumerate() {
                let ypad = yy * sh + py;
                if ypad < pt || ypad - pt >= h || xs >= xe {
                    row.fill(p.pad);
                    continue;
                }
                let y = ypad - pt;
                row[..xs * words].fill(p.pad);
                row[xe * words..].fill(p.pad);
                let x0 = xs * sw + px - pl;
                let r = src.map(|c| c.map(|c| &c[y * wd..][..wd]));
                let mid = &mut row[xs * words..xe * words];
                if words == 2 {
                    // Octets: channels 0–3 then 4–7 of each position.
                    for (i, d) in mid.chunks_exact_mut(2).enumerate() {
                        let x = x0 + i * sw;
                        let v = |j: usize| r[j].map_or(zu, |s| raw(s[x]));
                        d[0] = quad_u8([v(0), v(1), v(2), v(3)]);
                        d[1] = quad_u8([v(4), v(5), v(6), v(7)]);
                    }
                    continue;
                }
                match (p.width, r, sw) {
                    // The common cases as plain zips (they vectorize).
                    (2, [Some(r0), Some(r1), ..], 1) => {
                        for ((d, &v0), &v1) in mid.iter_mut().zip(&r0[x0..]).zip(&r1[x0..]) {
                            *d = pair(center(v0), center(v1));
                        }
                    }
                    (4, [Some(r0), Some(r1), Some(r2), Some(r3), ..], 1) => {
                        let it = r0[x0..].iter().zip(&r1[x0..]).zip(&r2[x0..]).zip(&r3[x0..]);
                        for (d, (((&v0, &v1), &v2), &v3)) in mid.iter_mut().zip(it) {
                            *d = quad_u8([raw(v0), raw(v1), raw(v2), raw(v3)]);
                        }
                    }
                    (width, r, _) => {
                        for (i, d) in mid.iter_mut().enumerate() {
                            let x = x0 + i * sw;
                            *d = if width == 2 {
                                let v = |j: usize| r[j].map_or(0, |s| center(s[x]));
                                pair(v(0), v(1))
                            } else {
                                let v = |j: usize| r[j].map_or(zu, |s| raw(s[x]));
                                quad_u8([v(0), v(1), v(2), v(3)])
                            };
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
    tc: (usize, usize),
    op: usize,
    sink: &Sink,
) {
    unit(p, ops, b, gi, tc, op, sink)
}

/// Output channels of panel `op` of group `gi` at the positions of tile chunk `tc.0` (of
/// `tc.1` tiles).
///
/// # Safety
/// No other thread may store the same (image, channels, positions) at the same time.
#[inline(always)]
unsafe fn unit(
    p: &Plan,
    ops: &Operands,
    b: usize,
    gi: usize,
    (tc, chunk): (usize, usize),
    op: usize,
    sink: &Sink,
) {
    let (a, buf) = (ops.weights, ops.planes);
    let rows = (p.og - op * MR).min(MR);
    let t0 = tc * chunk;
    let args = |p0: usize| KernelArgs {
        a,
        a_row: p.words,
        a_step: MR * p.words,
        b: &buf[(p0 * p.words).min(buf.len())..],
        b_cp: p.plane * p.words,
        taps: &p.taps,
        csteps: p.csteps,
        words: p.words,
    };
    let o0 = gi * p.og + op * MR;
    match p.wide {
        Some(kernel) => {
            let mut tile = [0i32; MR * WIDE_NR];
            for t in t0..(t0 + chunk).min(p.ntiles) {
                let p0 = t * WIDE_NR;
                kernel(&args(p0), &mut tile);
                store_tile(p, &mut tile, WIDE_NR, rows, (b, o0), p0, sink);
            }
        }
        None => {
            let mut tile = [0i32; MR * NR];
            for t in t0..(t0 + chunk).min(p.ntiles) {
                let p0 = t * NR;
                (p.kernel)(&args(p0), &mut tile);
                store_tile(p, &mut tile, NR, rows, (b, o0), p0, sink);
            }
        }
    }
}

/// [`unit_tiles`] compiled for AVX2 (the store epilogue vectorizes with it).
///
/// # Safety
/// The CPU must support AVX2; as [`unit`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn unit_tiles_avx2(
    p: &Plan,
    ops: &Operands,
    b: usize,
    gi: usize,
    tc: (usize, usize),
    op: usize,
    sink: &Sink,
) {
    unit_tiles(p, ops, b, gi, tc, op, sink)
}

/// [`unit`] for tile-packed weights: blocks of `rows` output channels × 32 positions, one
/// K step per (tap, block of `kq` channel quads).
///
/// # Safety
/// As [`unit`].
#[inline(always)]
unsafe fn unit_tiles(
    p: &Plan,
    ops: &Operands,
    b: usize,
    gi: usize,
    (tc, chunk): (usize, usize),
    op: usize,
    sink: &Sink,
) {
    let kq = p.csteps.min(amx::MAX_KQ);
    let blocks = p.csteps / kq;
    let mut tiles = Tiles::begin(p.unit, true, kq);
    let mut acc = [0i32; 4 * amx::TILE * amx::TILE];
    let rows = (p.og - op * p.rows).min(p.rows);
    let blk = amx::Block {
        a: ops.weights,
        a_stride: kq,
        a_tile: amx::TILE * kq,
        b: ops.planes,
        b_stride: p.plane,
        b_tile: amx::TILE,
        kq,
        mt: p.rows / amx::TILE,
        nt: 2,
    };
    let t0 = tc * chunk;
    for t in t0..(t0 + chunk).min(p.ntiles) {
        let p0 = t * p.cols;
        tiles.zero();
        for (ti, &tap) in p.taps.iter().enumerate() {
            for cb in 0..blocks {
                let a_off = (ti * blocks + cb) * p.rows * kq;
                tiles.step(&blk, a_off, tap + cb * kq * p.plane + p0);
            }
        }
        tiles.store(&mut acc);
        store_tile(
            p,
            &mut acc,
            amx::ACC_ROW,
            rows,
            (b, gi * p.og + op * p.rows),
            p0,
            sink,
        );
    }
}

/// Stores the first `rows` rows of a tile of accumulators (`pitch` words a row, output
/// channels `o0 ..` of image `b`, positions `p0 ..` on the plane pitch): the quads'
/// zero-point correction, then the runs that fall inside the output.
///
/// # Safety
/// No other thread may store the same (image, channels, positions) at the same time.
#[inline(always)]
unsafe fn store_tile(
    p: &Plan,
    tile: &mut [i32],
    pitch: usize,
    rows: usize,
    (b, o0): (usize, usize),
    p0: usize,
    sink: &Sink,
) {
    let cols = (p.npos - p0).min(p.cols);
    for r in 0..rows {
        let o = o0 + r;
        let obase = (b * p.oc + o) * p.ho * p.wo;
        let acc = &mut tile[r * pitch..r * pitch + cols];
        if p.width >= 4 {
            // Quads summed raw u8 inputs less the kernel's offset o: Σ (x − z)·w =
            // Σ (x − o)·w − (z − o)·Σ w (exact in wrapping i32, as the result fits).
            let correction = p.correction.wrapping_mul(p.w.sums()[o]);
            for v in acc.iter_mut() {
                *v = v.wrapping_sub(correction);
            }
        }
        let acc = &*acc;
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

fn out_is_empty(nb: usize, oc: usize, ho: usize, wo: usize) -> bool {
    nb == 0 || oc == 0 || ho == 0 || wo == 0
}
