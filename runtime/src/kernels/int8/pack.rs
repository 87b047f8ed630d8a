//! Weight packing (done once, at model load).

use super::{pair, QuantInt, MR, NR};

/// Memory layout of a weight matrix handed to [`PackedWeights::pack_general`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightLayout {
    /// `W[N, K]`, row-major (output channel outer), e.g. a Gemm `transB=1` or a 1×1 conv.
    NK,
    /// `W[K, N]`, row-major (reduction outer), e.g. the `B` input of ONNX `MatMul`.
    KN,
}

/// Weights of a GEMM `out[M, N] = A[M, K] · W[N, K]ᵀ`, zero point removed and packed in
/// panels of `NR` output channels as pairs of reduction neighbours: `[N/NR][K/2][NR]`.
#[derive(Clone, Debug)]
pub struct PackedWeights {
    n: usize,
    k: usize,
    kpairs: usize,
    data: PairStore,
}

/// Packed weight pairs as kept in memory. Centered weights of symmetric i8 tensors (zero
/// point 0, every model this runtime quantizes) fit in i8 and stay i8 — a quarter of
/// f32, which is the memory half of the point of int8 — and are widened to the kernel's
/// i16 pairs one panel at a time by [`PairStore::block`]. Centering u8 weights or
/// non-zero zero points gives values in `[-255, 255]`, which need i16; those keep the
/// widened layout so results stay exact.
#[derive(Clone, Debug)]
enum PairStore {
    /// Pair `i` is bytes `2i` (low) and `2i + 1` (high).
    I8(Vec<i8>),
    /// Pairs already widened (see [`pair`]).
    I16(Vec<i32>),
}

impl PairStore {
    /// Stores centered pair values `(lo, hi)`, as i8 when all of them fit.
    fn new(pairs: Vec<(i32, i32)>) -> Self {
        let fits = |v: i32| i8::try_from(v).is_ok();
        if pairs.iter().all(|&(l, h)| fits(l) && fits(h)) {
            PairStore::I8(
                pairs
                    .iter()
                    .flat_map(|&(l, h)| [l as i8, h as i8])
                    .collect(),
            )
        } else {
            PairStore::I16(pairs.iter().map(|&(l, h)| pair(l, h)).collect())
        }
    }

    fn resident_bytes(&self) -> usize {
        match self {
            PairStore::I8(v) => v.len(),
            PairStore::I16(v) => v.len() * std::mem::size_of::<i32>(),
        }
    }

    /// Pairs `start .. start + len` as the kernel's i16 pairs: borrowed when stored
    /// widened, else widened into `scratch` (resized as needed).
    #[inline(always)]
    fn block<'s>(&'s self, start: usize, len: usize, scratch: &'s mut Vec<i32>) -> &'s [i32] {
        match self {
            PairStore::I16(v) => &v[start..start + len],
            PairStore::I8(v) => {
                scratch.resize(len, 0);
                let src = &v[2 * start..2 * (start + len)];
                for (d, p) in scratch.iter_mut().zip(src.chunks_exact(2)) {
                    *d = pair(p[0] as i32, p[1] as i32);
                }
                scratch
            }
        }
    }
}

fn zp_at<T: QuantInt>(zero_points: &[T], ch: usize, channels: usize) -> i32 {
    match zero_points.len() {
        0 => 0,
        1 => zero_points[0].to_i32(),
        l if l == channels => zero_points[ch].to_i32(),
        l => panic!("int8: {l} weight zero points for {channels} output channels"),
    }
}

impl PackedWeights {
    /// Packs symmetric i8 weights `W[N, K]` (row-major, zero point 0).
    pub fn pack(w: &[i8], n: usize, k: usize) -> Self {
        Self::pack_general(w, WeightLayout::NK, n, k, &[])
    }

    /// Packs symmetric i8 weights stored as `W[K, N]` (ONNX `MatMul` B operand).
    pub fn pack_kn(w: &[i8], k: usize, n: usize) -> Self {
        Self::pack_general(w, WeightLayout::KN, n, k, &[])
    }

    /// Packs i8 or u8 weights with a zero point per tensor (`zero_points.len() == 1`), per
    /// output channel (`== n`) or none (empty slice: 0).
    pub fn pack_general<T: QuantInt>(
        w: &[T],
        layout: WeightLayout,
        n: usize,
        k: usize,
        zero_points: &[T],
    ) -> Self {
        assert_eq!(w.len(), n * k, "int8: weight length is not n * k");
        let kpairs = k.div_ceil(2);
        let panels = n.div_ceil(NR);
        let mut data = vec![(0, 0); panels * kpairs * NR];
        let at = |j: usize, kk: usize| -> i32 {
            if kk >= k {
                return 0;
            }
            let v = match layout {
                WeightLayout::NK => w[j * k + kk],
                WeightLayout::KN => w[kk * n + j],
            };
            v.to_i32() - zp_at(zero_points, j, n)
        };
        for j in 0..n {
            let (np, c) = (j / NR, j % NR);
            let panel = &mut data[np * kpairs * NR..][..kpairs * NR];
            for kp in 0..kpairs {
                panel[kp * NR + c] = (at(j, 2 * kp), at(j, 2 * kp + 1));
            }
        }
        let data = PairStore::new(data);
        PackedWeights { n, k, kpairs, data }
    }

    /// Quantizes an f32 matrix `Y[K, N]` to u8 with `scale` and `zero_point` (ONNX
    /// `QuantizeLinear`) and packs it centered, as the vector side of a GEMM: the second
    /// operand of a product of two activations (attention's `Q·Kᵀ`, `P·V`), packed on
    /// every call. `Y[kk, j]` is `y[kk * k_stride + j * n_stride]`, so a transposed
    /// operand needs no copy. Centered values span `[-255, 255]`: kept as i16 pairs.
    #[allow(clippy::too_many_arguments)]
    pub fn quantize_f32(
        y: &[f32],
        k: usize,
        n: usize,
        k_stride: usize,
        n_stride: usize,
        scale: f32,
        zero_point: u8,
    ) -> Self {
        if k > 0 && n > 0 {
            assert!(
                (k - 1) * k_stride + (n - 1) * n_stride < y.len(),
                "int8: operand too short for its shape"
            );
        }
        let kpairs = k.div_ceil(2);
        let panels = n.div_ceil(NR);
        let zp = zero_point as i32;
        let q = |kk: usize, j: usize| -> i32 {
            if kk >= k || j >= n {
                return 0;
            }
            super::sink::quantize(y[kk * k_stride + j * n_stride], scale, zp, 0, 255) - zp
        };
        let mut data = vec![0i32; panels * kpairs * NR];
        for (np, panel) in data.chunks_exact_mut(kpairs * NR).enumerate() {
            for (kp, row) in panel.chunks_exact_mut(NR).enumerate() {
                for (c, d) in row.iter_mut().enumerate() {
                    let j = np * NR + c;
                    *d = pair(q(2 * kp, j), q(2 * kp + 1, j));
                }
            }
        }
        PackedWeights {
            n,
            k,
            kpairs,
            data: PairStore::I16(data),
        }
    }

    /// Output channels.
    pub fn n(&self) -> usize {
        self.n
    }

    /// Reduction length.
    pub fn k(&self) -> usize {
        self.k
    }

    pub(crate) fn kpairs(&self) -> usize {
        self.kpairs
    }

    /// Bytes the packed weights occupy in memory (i8 values, or i16 when centering needs
    /// them; panels padded to `NR`).
    pub fn resident_bytes(&self) -> usize {
        self.data.resident_bytes()
    }

    /// Reduction pairs `kp0 .. kp0 + kl` of panel `np` as i16 pairs: `kl * NR` values,
    /// widened into `scratch` when stored as i8.
    pub(crate) fn panel_block<'s>(
        &'s self,
        np: usize,
        kp0: usize,
        kl: usize,
        scratch: &'s mut Vec<i32>,
    ) -> &'s [i32] {
        self.data
            .block((np * self.kpairs + kp0) * NR, kl * NR, scratch)
    }
}

/// Static parameters of a 2-D convolution (ONNX `Conv` attributes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvGeometry {
    /// `[kh, kw]`.
    pub kernel: [usize; 2],
    /// `[stride_h, stride_w]`, each ≥ 1.
    pub strides: [usize; 2],
    /// `[top, left, bottom, right]` (ONNX order `[h_begin, w_begin, h_end, w_end]`).
    pub pads: [usize; 4],
    /// `[dilation_h, dilation_w]`, each ≥ 1.
    pub dilations: [usize; 2],
    /// Groups (`in_channels` and `out_channels` are multiples of it).
    pub groups: usize,
}

impl ConvGeometry {
    /// A `kh × kw` kernel with stride 1, no padding, no dilation, one group.
    pub fn new(kh: usize, kw: usize) -> Self {
        ConvGeometry {
            kernel: [kh, kw],
            strides: [1, 1],
            pads: [0; 4],
            dilations: [1, 1],
            groups: 1,
        }
    }

    /// Output `(height, width)` for an input of `h × w`, `None` if the kernel does not fit.
    pub fn output_hw(&self, h: usize, w: usize) -> Option<(usize, usize)> {
        let dim = |size: usize, pad: usize, k: usize, d: usize, s: usize| {
            let span = d * (k - 1) + 1;
            (size + pad).checked_sub(span).map(|x| x / s + 1)
        };
        let [kh, kw] = self.kernel;
        let [sh, sw] = self.strides;
        let [dh, dw] = self.dilations;
        let ho = dim(h, self.pads[0] + self.pads[2], kh, dh, sh)?;
        let wo = dim(w, self.pads[1] + self.pads[3], kw, dw, sw)?;
        Some((ho, wo))
    }

    fn validate(&self) {
        assert!(
            self.kernel[0] >= 1 && self.kernel[1] >= 1,
            "int8 conv: empty kernel"
        );
        assert!(
            self.strides[0] >= 1 && self.strides[1] >= 1,
            "int8 conv: stride 0"
        );
        assert!(
            self.dilations[0] >= 1 && self.dilations[1] >= 1,
            "int8 conv: dilation 0"
        );
        assert!(self.groups >= 1, "int8 conv: 0 groups");
    }
}

/// Conv weights `W[O, C/groups, kh, kw]`, zero point removed, as pairs of input channels
/// (stored as in [`PackedWeights`]), packed per group in panels of `MR` output channels:
/// `[groups][O/groups/MR][kh*kw][C/groups/2][MR]` (taps outer, channel pairs inner).
#[derive(Clone, Debug)]
pub struct PackedConvWeights {
    geom: ConvGeometry,
    out_channels: usize,
    in_per_group: usize,
    cpairs: usize,
    opanels: usize,
    data: PairStore,
}

impl PackedConvWeights {
    /// Packs symmetric i8 weights `W[O, C/groups, kh, kw]` (zero point 0).
    pub fn pack(w: &[i8], out_channels: usize, in_per_group: usize, geom: ConvGeometry) -> Self {
        Self::pack_general(w, out_channels, in_per_group, geom, &[])
    }

    /// Packs i8 or u8 weights with a zero point per tensor, per output channel or none.
    pub fn pack_general<T: QuantInt>(
        w: &[T],
        out_channels: usize,
        in_per_group: usize,
        geom: ConvGeometry,
        zero_points: &[T],
    ) -> Self {
        geom.validate();
        let g = geom.groups;
        assert!(
            out_channels.is_multiple_of(g),
            "int8 conv: out channels not a multiple of groups"
        );
        let [kh, kw] = geom.kernel;
        let taps = kh * kw;
        assert_eq!(
            w.len(),
            out_channels * in_per_group * taps,
            "int8 conv: weight length"
        );
        let og = out_channels / g;
        let cpairs = in_per_group.div_ceil(2);
        let opanels = og.div_ceil(MR);
        let steps = taps * cpairs;
        let mut data = vec![(0, 0); g * opanels * steps * MR];
        let at = |o: usize, c: usize, t: usize| -> i32 {
            if c >= in_per_group {
                return 0;
            }
            w[(o * in_per_group + c) * taps + t].to_i32() - zp_at(zero_points, o, out_channels)
        };
        for gi in 0..g {
            for ol in 0..og {
                let o = gi * og + ol;
                let (op, r) = (ol / MR, ol % MR);
                let panel = &mut data[(gi * opanels + op) * steps * MR..][..steps * MR];
                for t in 0..taps {
                    for cp in 0..cpairs {
                        let s = t * cpairs + cp;
                        panel[s * MR + r] = (at(o, 2 * cp, t), at(o, 2 * cp + 1, t));
                    }
                }
            }
        }
        let data = PairStore::new(data);
        PackedConvWeights {
            geom,
            out_channels,
            in_per_group,
            cpairs,
            opanels,
            data,
        }
    }

    /// The convolution parameters.
    pub fn geometry(&self) -> &ConvGeometry {
        &self.geom
    }

    /// Output channels `O`.
    pub fn out_channels(&self) -> usize {
        self.out_channels
    }

    /// Input channels per group `C/groups`.
    pub fn in_channels_per_group(&self) -> usize {
        self.in_per_group
    }

    pub(crate) fn cpairs(&self) -> usize {
        self.cpairs
    }

    /// Bytes the packed weights occupy in memory (i8 values, or i16 when centering needs
    /// them; panels padded to `MR`).
    pub fn resident_bytes(&self) -> usize {
        self.data.resident_bytes()
    }

    pub(crate) fn opanels(&self) -> usize {
        self.opanels
    }

    /// The panels of group `g` as i16 pairs, panel `op` at `op * kh*kw*cpairs*MR`,
    /// widened into `scratch` when stored as i8.
    pub(crate) fn group_panels<'s>(&'s self, g: usize, scratch: &'s mut Vec<i32>) -> &'s [i32] {
        let len = self.opanels * self.geom.kernel[0] * self.geom.kernel[1] * self.cpairs * MR;
        self.data.block(g * len, len, scratch)
    }
}
