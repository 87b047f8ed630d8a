//! Weight packing (done once, at model load).

use super::{amx, pair, Backend, Isa, QuantInt, MR, NR};

/// Memory layout of a weight matrix handed to [`PackedWeights::pack_general`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightLayout {
    /// `W[N, K]`, row-major (output channel outer), e.g. a Gemm `transB=1` or a 1×1 conv.
    NK,
    /// `W[K, N]`, row-major (reduction outer), e.g. the `B` input of ONNX `MatMul`.
    KN,
}

/// How packed weights group reduction neighbours, which decides the kernels that read
/// them (one step of a micro-kernel consumes one group per lane).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Packing {
    /// Pairs as i16 (`vpmaddwd`, `vpdpwssd`): activations are centered (value − zero
    /// point) while they are widened to i16 pairs too. Any weights.
    Pairs,
    /// Quads as s8 (`vpdpbusd`: u8 × s8, four products a lane, twice the work of a pair
    /// instruction; aarch64 `sdot`, `usdot`): activations stay raw u8, and `zero point ×
    /// Σ weights` of the output channel is subtracted from the sum afterwards. Needs
    /// weights whose centered values fit in i8; others fall back to pairs.
    Quads,
    /// Octets as s8, eight reduction neighbours a lane in two words (aarch64 i8mm
    /// `usmmla`: a 2×8 u8 block times a 2×8 s8 block into a 2×2 i32 tile, 32 products an
    /// instruction). Two neighbouring lanes are one 16-byte operand of the instruction,
    /// so the same panels serve it whichever side they are on. Activations and the
    /// zero-point correction as for quads; weights that leave i8 fall back to pairs.
    Octets,
    /// Quads laid out for AMX tiles (see `amx`): reduction steps padded to a multiple of
    /// 16 quads (64 bytes, a tile row) where there are more than 16. GEMM weights keep
    /// the quads' panels (a panel block is a column tile as it is); convolution weights
    /// are grouped in panels of 16 or 32 output channels, `[tap][channel block][rows][kq]`,
    /// each (tap, block) one or two row tiles. Activations and the zero-point correction
    /// as for quads; weights that leave i8 fall back to pairs.
    Tiles,
}

impl Packing {
    /// The packing `backend` runs fastest on this CPU: octets where i8mm's matrix
    /// multiply runs, quads where a four-byte dot product does (AVX-512 VNNI, aarch64
    /// dot product), pairs elsewhere.
    pub fn for_backend(backend: Backend) -> Packing {
        match backend.isa() {
            Isa::Amx => Packing::Tiles,
            Isa::I8mm => Packing::Octets,
            Isa::Avx512Vnni | Isa::Dotprod => Packing::Quads,
            Isa::Portable | Isa::Avx2 | Isa::Neon => Packing::Pairs,
        }
    }

    /// Reduction values per step.
    pub(crate) fn width(self) -> usize {
        match self {
            Packing::Pairs => 2,
            Packing::Quads | Packing::Tiles => 4,
            Packing::Octets => 8,
        }
    }

    /// i32 words a lane of one step occupies (two for octets).
    pub(crate) fn words(self) -> usize {
        match self {
            Packing::Pairs | Packing::Quads | Packing::Tiles => 1,
            Packing::Octets => 2,
        }
    }
}

/// Packed weights as kept in memory, one i32 per (step, lane) as the kernels read it.
/// Centered weights of symmetric i8 tensors (zero point 0, every model this runtime
/// quantizes) fit in i8 and stay one byte a weight — a quarter of f32, which is the memory
/// half of the point of int8: as s8 quads, read by the kernel as they are, or as i8 pairs,
/// widened to the kernel's i16 pairs one block at a time by [`Store::block`]. Centering
/// u8 weights or non-zero zero points gives values in `[-255, 255]`, which need i16
/// pairs; those keep the widened layout so results stay exact.
#[derive(Clone, Debug)]
enum Store {
    /// Pair `i` is bytes `2i` (low) and `2i + 1` (high).
    I8Pairs(Vec<i8>),
    /// Pairs already widened (see [`pair`]).
    I16Pairs(Vec<i32>),
    /// s8 values four a word (quads: a word a lane; octets: two), reduction order in
    /// little-endian byte order.
    Quads(Vec<i32>),
    /// [`Store::I8Pairs`] at 4 bits (weights read from an ONNX INT4 file): pair `i` is
    /// byte `i`, first value in the low nibble. Widened per block like i8 pairs.
    I4Pairs(Vec<u8>),
    /// [`Store::Quads`] at 4 bits: word `i` is bytes `2i`, `2i + 1`, values in nibble
    /// order (low first). Unpacked per block into the s8 words the kernels read.
    I4Quads(Vec<u8>),
}

/// Signed value of the low nibble of `b`.
const fn nib(b: u8) -> i32 {
    (((b & 0x0f) as i8) << 4 >> 4) as i32
}

/// Byte `b` of [`Store::I4Pairs`] as the i16 pair the kernels read (big-endian targets;
/// little-endian ones unpack straight into the words' bytes).
static I4_PAIR: [i32; 256] = {
    let mut t = [0i32; 256];
    let mut b = 0;
    while b < 256 {
        let (lo, hi) = (nib(b as u8), nib((b as u8) >> 4));
        t[b] = ((lo as u16 as u32) | ((hi as u16 as u32) << 16)) as i32;
        b += 1;
    }
    t
};

/// Byte `b` of [`Store::I4Quads`] as two s8 bytes (low nibble's value in the low byte;
/// big-endian targets).
static I4_BYTES: [u16; 256] = {
    let mut t = [0u16; 256];
    let mut b = 0;
    while b < 256 {
        let (lo, hi) = (nib(b as u8), nib((b as u8) >> 4));
        t[b] = (lo as i8 as u8 as u16) | ((hi as i8 as u8 as u16) << 8);
        b += 1;
    }
    t
};

/// Whether every value fits in i8.
fn fits_i8(values: &[i32]) -> bool {
    values.iter().all(|&v| i8::try_from(v).is_ok())
}

/// Four s8 values as one i32 lane (`vpdpbusd`'s signed operand).
#[inline(always)]
pub(crate) fn quad_s8(v: [i32; 4]) -> i32 {
    i32::from_le_bytes(v.map(|x| x as i8 as u8))
}

/// Four u8 values (0..=255) as one i32 lane (`vpdpbusd`'s unsigned operand).
#[inline(always)]
pub(crate) fn quad_u8(v: [i32; 4]) -> i32 {
    i32::from_le_bytes(v.map(|x| x as u8))
}

impl Store {
    /// Lays out centered weights: `at(unit, step, lane, j)` is value `j` (of `width`) of
    /// the group at `(step, lane)` of panel `unit`, `units × steps × lanes` groups.
    fn new(
        packing: Packing,
        units: usize,
        steps: usize,
        lanes: usize,
        at: impl Fn(usize, usize, usize, usize) -> i32,
    ) -> Store {
        let width = packing.width();
        let mut values = Vec::with_capacity(units * steps * lanes * width);
        for u in 0..units {
            for s in 0..steps {
                for l in 0..lanes {
                    values.extend((0..width).map(|j| at(u, s, l, j)));
                }
            }
        }
        match packing {
            Packing::Quads | Packing::Octets | Packing::Tiles => {
                debug_assert!(fits_i8(&values), "quads need centered weights in i8");
                Store::Quads(
                    values
                        .chunks_exact(4)
                        .map(|q| quad_s8([q[0], q[1], q[2], q[3]]))
                        .collect(),
                )
            }
            Packing::Pairs if fits_i8(&values) => {
                Store::I8Pairs(values.iter().map(|&v| v as i8).collect())
            }
            Packing::Pairs => {
                Store::I16Pairs(values.chunks_exact(2).map(|p| pair(p[0], p[1])).collect())
            }
        }
    }

    fn resident_bytes(&self) -> usize {
        match self {
            Store::I8Pairs(v) => v.len(),
            Store::I4Pairs(v) | Store::I4Quads(v) => v.len(),
            Store::I16Pairs(v) | Store::Quads(v) => v.len() * std::mem::size_of::<i32>(),
        }
    }

    /// The same groups at 4 bits, when every value fits −8..=7 (else `self`): what
    /// weights read from an INT4 file keep resident. The kernels see identical words
    /// ([`Store::block`] unpacks them), so results are bit-exact with the 8-bit store.
    fn into_nibbles(self) -> Store {
        let pack = |values: &[i8]| crate::int4::pack_i4(values);
        match self {
            Store::I8Pairs(v) => match pack(&v) {
                Some(b) => Store::I4Pairs(b),
                None => Store::I8Pairs(v),
            },
            Store::Quads(v) => {
                let bytes: Vec<i8> = v
                    .iter()
                    .flat_map(|w| w.to_le_bytes())
                    .map(|b| b as i8)
                    .collect();
                match pack(&bytes) {
                    Some(b) => Store::I4Quads(b),
                    None => Store::Quads(v),
                }
            }
            other => other,
        }
    }

    fn is_nibbles(&self) -> bool {
        matches!(self, Store::I4Pairs(_) | Store::I4Quads(_))
    }

    /// Groups `start .. start + len` as the kernel reads them: borrowed when stored so,
    /// else (i8 pairs, 4-bit stores) widened into `scratch` (resized as needed).
    #[inline(always)]
    fn block<'s>(&'s self, start: usize, len: usize, scratch: &'s mut Vec<i32>) -> &'s [i32] {
        match self {
            Store::I16Pairs(v) | Store::Quads(v) => &v[start..start + len],
            Store::I8Pairs(v) => {
                scratch.resize(len, 0);
                let src = &v[2 * start..2 * (start + len)];
                for (d, p) in scratch.iter_mut().zip(src.chunks_exact(2)) {
                    *d = pair(p[0] as i32, p[1] as i32);
                }
                scratch
            }
            Store::I4Pairs(v) => {
                scratch.resize(len, 0);
                let src = &v[start..start + len];
                if cfg!(target_endian = "little") {
                    // A pair word is its two i16 halves in memory, low first: unpacked
                    // as a strided store LLVM vectorizes.
                    // SAFETY: `len` i32 words are `2 * len` i16s, same memory, aligned.
                    let dst = unsafe {
                        std::slice::from_raw_parts_mut(scratch.as_mut_ptr() as *mut i16, 2 * len)
                    };
                    for (d, &b) in dst.chunks_exact_mut(2).zip(src) {
                        d[0] = (((b << 4) as i8) >> 4) as i16;
                        d[1] = ((b as i8) >> 4) as i16;
                    }
                } else {
                    for (d, &b) in scratch.iter_mut().zip(src) {
                        *d = I4_PAIR[b as usize];
                    }
                }
                scratch
            }
            Store::I4Quads(v) => {
                scratch.resize(len, 0);
                let src = &v[2 * start..2 * (start + len)];
                if cfg!(target_endian = "little") {
                    // A quad word is its four s8 bytes in memory, in order.
                    // SAFETY: `len` i32 words are `4 * len` bytes, same memory.
                    let dst = unsafe {
                        std::slice::from_raw_parts_mut(scratch.as_mut_ptr() as *mut i8, 4 * len)
                    };
                    for (d, &b) in dst.chunks_exact_mut(2).zip(src) {
                        d[0] = ((b << 4) as i8) >> 4;
                        d[1] = (b as i8) >> 4;
                    }
                } else {
                    for (d, b) in scratch.iter_mut().zip(src.chunks_exact(2)) {
                        let (lo, hi) = (I4_BYTES[b[0] as usize], I4_BYTES[b[1] as usize]);
                        *d = ((lo as u32) | ((hi as u32) << 16)) as i32;
                    }
                }
                scratch
            }
        }
    }
}

/// Reduction steps as packed: tiles pad more than 16 quads to a multiple of 16 (each K
/// step of a tile block takes `min(steps, 16)` quads; the padding holds zero weights).
pub(crate) fn tile_steps(packing: Packing, steps: usize) -> usize {
    match packing {
        Packing::Tiles if steps > amx::MAX_KQ => steps.next_multiple_of(amx::MAX_KQ),
        _ => steps,
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

/// `packing`, unless it is quads and some centered weight leaves i8 (then pairs).
fn usable(packing: Packing, centered: impl Iterator<Item = i32>) -> Packing {
    let mut centered = centered;
    match packing {
        Packing::Quads | Packing::Octets | Packing::Tiles
            if centered.all(|v| i8::try_from(v).is_ok()) =>
        {
            packing
        }
        _ => Packing::Pairs,
    }
}

/// Weights of a GEMM `out[M, N] = A[M, K] · W[N, K]ᵀ`, zero point removed and packed in
/// panels of `NR` output channels as groups of reduction neighbours (see [`Packing`]):
/// `[N/NR][K/width][NR]`.
#[derive(Clone, Debug)]
pub struct PackedWeights {
    n: usize,
    k: usize,
    packing: Packing,
    steps: usize,
    data: Store,
    /// Σ_k of the centered weights of each output channel (quads' zero-point correction).
    sums: Vec<i32>,
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
    /// output channel (`== n`) or none (empty slice: 0), for the kernels of
    /// `Backend::Auto` ([`Packing::for_backend`]).
    pub fn pack_general<T: QuantInt>(
        w: &[T],
        layout: WeightLayout,
        n: usize,
        k: usize,
        zero_points: &[T],
    ) -> Self {
        Self::pack_with(
            Packing::for_backend(Backend::Auto),
            w,
            layout,
            n,
            k,
            zero_points,
        )
    }

    /// Like [`PackedWeights::pack_general`] with the packing chosen (quads fall back to
    /// pairs when the centered weights leave i8).
    pub fn pack_with<T: QuantInt>(
        packing: Packing,
        w: &[T],
        layout: WeightLayout,
        n: usize,
        k: usize,
        zero_points: &[T],
    ) -> Self {
        assert_eq!(w.len(), n * k, "int8: weight length is not n * k");
        let at = |j: usize, kk: usize| -> i32 {
            if j >= n || kk >= k {
                return 0;
            }
            let v = match layout {
                WeightLayout::NK => w[j * k + kk],
                WeightLayout::KN => w[kk * n + j],
            };
            v.to_i32() - zp_at(zero_points, j, n)
        };
        let packing = usable(
            packing,
            (0..n)
                .flat_map(|j| (0..k).map(move |kk| (j, kk)))
                .map(|(j, kk)| at(j, kk)),
        );
        let width = packing.width();
        let steps = tile_steps(packing, k.div_ceil(width));
        let data = Store::new(packing, n.div_ceil(NR), steps, NR, |np, s, c, i| {
            at(np * NR + c, s * width + i)
        });
        let sums = (0..n).map(|j| (0..k).map(|kk| at(j, kk)).sum()).collect();
        PackedWeights {
            n,
            k,
            packing,
            steps,
            data,
            sums,
        }
    }

    /// Quantizes an f32 matrix `Y[K, N]` to u8 with `scale` and `zero_point` (ONNX
    /// `QuantizeLinear`) and packs it centered, as the vector side of a GEMM: the second
    /// operand of a product of two activations (attention's `Q·Kᵀ`, `P·V`), packed on
    /// every call. `Y[kk, j]` is `y[kk * k_stride + j * n_stride]`, so a transposed
    /// operand needs no copy. Centered values span `[-255, 255]`: i16 pairs.
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
        let steps = k.div_ceil(2);
        let panels = n.div_ceil(NR);
        let zp = zero_point as i32;
        let q = |kk: usize, j: usize| -> i32 {
            if kk >= k || j >= n {
                return 0;
            }
            super::sink::quantize(y[kk * k_stride + j * n_stride], scale, zp, 0, 255) - zp
        };
        let mut data = vec![0i32; panels * steps * NR];
        for (np, panel) in data.chunks_exact_mut(steps * NR).enumerate() {
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
            packing: Packing::Pairs,
            steps,
            data: Store::I16Pairs(data),
            sums: vec![],
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

    /// How the weights are packed (which kernels read them).
    pub fn packing(&self) -> Packing {
        self.packing
    }

    /// Kernel steps along the reduction (`K / width`, rounded up).
    pub(crate) fn steps(&self) -> usize {
        self.steps
    }

    /// Σ_k of the centered weights of each output channel.
    pub(crate) fn sums(&self) -> &[i32] {
        &self.sums
    }

    /// Bytes the packed weights occupy in memory (i8 values, or i16 when centering needs
    /// them, or 4-bit ones after [`PackedWeights::into_nibbles`]; panels padded to `NR`,
    /// the reduction to the packing's width).
    pub fn resident_bytes(&self) -> usize {
        self.data.resident_bytes()
    }

    /// The same weights kept resident at 4 bits, two a byte, when every centered value
    /// fits −8..=7 (weights from an ONNX INT4 file); unchanged otherwise. The kernels
    /// unpack a block of panels at a time into the words they read now, so results are
    /// bit-exact with the 8-bit form.
    pub fn into_nibbles(mut self) -> Self {
        self.data = self.data.into_nibbles();
        self
    }

    /// Whether the weights are resident at 4 bits ([`PackedWeights::into_nibbles`]).
    pub fn is_nibbles(&self) -> bool {
        self.data.is_nibbles()
    }

    /// Steps `s0 .. s0 + sl` of panel `np` as the kernel reads them: `sl * NR` lanes
    /// (of [`Packing::words`] words each), widened into `scratch` when stored as i8 pairs or 4-bit.
    pub(crate) fn panel_block<'s>(
        &'s self,
        np: usize,
        s0: usize,
        sl: usize,
        scratch: &'s mut Vec<i32>,
    ) -> &'s [i32] {
        let lane = NR * self.packing.words();
        self.data
            .block((np * self.steps + s0) * lane, sl * lane, scratch)
    }

    /// Steps `s0 .. s0 + sl` of panel `np` and, when `panels` is 2, of panel `np + 1`
    /// (`steps()` quad rows of `NR` lanes later in the span): the column tiles of one tile
    /// block. Widened into `scratch` like [`PackedWeights::panel_block`].
    pub(crate) fn panel_span<'s>(
        &'s self,
        np: usize,
        s0: usize,
        sl: usize,
        panels: usize,
        scratch: &'s mut Vec<i32>,
    ) -> &'s [i32] {
        debug_assert!((1..=2).contains(&panels));
        let lane = NR * self.packing.words();
        let len = ((panels - 1) * self.steps + sl) * lane;
        self.data.block((np * self.steps + s0) * lane, len, scratch)
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

    /// Why this geometry cannot pack `weight_len` weights of `out_channels` output
    /// channels with `in_per_group` input channels per group, if it cannot: what a
    /// loader checks before [`PackedConvWeights::pack`], whose asserts are the same.
    pub fn check(
        &self,
        out_channels: usize,
        in_per_group: usize,
        weight_len: usize,
    ) -> Result<(), String> {
        // Bounds far above any real conv keep the window arithmetic from overflowing.
        const LIMIT: usize = 1 << 16;
        let [kh, kw] = self.kernel;
        let within = |v: &[usize]| v.iter().all(|&x| x <= LIMIT);
        if kh < 1 || kw < 1 {
            Err("empty kernel".into())
        } else if self.strides.contains(&0) {
            Err("stride 0".into())
        } else if self.dilations.contains(&0) {
            Err("dilation 0".into())
        } else if self.groups < 1 {
            Err("0 groups".into())
        } else if !(within(&self.kernel)
            && within(&self.strides)
            && within(&self.dilations)
            && within(&self.pads))
        {
            Err(format!(
                "kernel {:?}, strides {:?}, dilations {:?} or pads {:?} beyond {LIMIT}",
                self.kernel, self.strides, self.dilations, self.pads
            ))
        } else if !out_channels.is_multiple_of(self.groups) {
            Err(format!(
                "{out_channels} output channels are not a multiple of {} groups",
                self.groups
            ))
        } else if out_channels
            .checked_mul(in_per_group)
            .and_then(|n| n.checked_mul(kh * kw))
            != Some(weight_len)
        {
            Err(format!(
                "{weight_len} weights for [{out_channels}, {in_per_group}, {kh}, {kw}]"
            ))
        } else {
            Ok(())
        }
    }
}

/// Output channels of a tile-packed conv panel: two row tiles where a group has more than
/// 16 (four accumulator tiles a block), else one.
pub(crate) fn conv_tile_rows(out_per_group: usize) -> usize {
    if out_per_group > amx::TILE {
        2 * amx::TILE
    } else {
        amx::TILE
    }
}

/// Conv weights `W[O, C/groups, kh, kw]`, zero point removed, as groups of input channels
/// (see [`Packing`], stored as in [`PackedWeights`]), packed per group in panels of `MR`
/// output channels: `[groups][O/groups/MR][kh*kw][C/groups/width][MR]` (taps outer,
/// channel groups inner).
#[derive(Clone, Debug)]
pub struct PackedConvWeights {
    geom: ConvGeometry,
    out_channels: usize,
    in_per_group: usize,
    packing: Packing,
    csteps: usize,
    opanels: usize,
    data: Store,
    /// Σ of the centered weights of each output channel (quads' zero-point correction).
    sums: Vec<i32>,
}

impl PackedConvWeights {
    /// Packs symmetric i8 weights `W[O, C/groups, kh, kw]` (zero point 0).
    pub fn pack(w: &[i8], out_channels: usize, in_per_group: usize, geom: ConvGeometry) -> Self {
        Self::pack_general(w, out_channels, in_per_group, geom, &[])
    }

    /// Packs i8 or u8 weights with a zero point per tensor, per output channel or none,
    /// for the kernels of `Backend::Auto` ([`Packing::for_backend`]).
    pub fn pack_general<T: QuantInt>(
        w: &[T],
        out_channels: usize,
        in_per_group: usize,
        geom: ConvGeometry,
        zero_points: &[T],
    ) -> Self {
        let packing = Packing::for_backend(Backend::Auto);
        Self::pack_with(packing, w, out_channels, in_per_group, geom, zero_points)
    }

    /// Like [`PackedConvWeights::pack_general`] with the packing chosen (quads fall back
    /// to pairs when the centered weights leave i8).
    pub fn pack_with<T: QuantInt>(
        packing: Packing,
        w: &[T],
        out_channels: usize,
        in_per_group: usize,
        geom: ConvGeometry,
        zero_points: &[T],
    ) -> Self {
        if let Err(e) = geom.check(out_channels, in_per_group, w.len()) {
            panic!("int8 conv: {e}");
        }
        let g = geom.groups;
        let [kh, kw] = geom.kernel;
        let taps = kh * kw;
        let og = out_channels / g;
        let at = |o: usize, c: usize, t: usize| -> i32 {
            if c >= in_per_group {
                return 0;
            }
            w[(o * in_per_group + c) * taps + t].to_i32() - zp_at(zero_points, o, out_channels)
        };
        let all = (0..out_channels)
            .flat_map(|o| (0..in_per_group * taps).map(move |i| (o, i)))
            .map(|(o, i)| at(o, i / taps, i % taps));
        let packing = usable(packing, all);
        let width = packing.width();
        let csteps = tile_steps(packing, in_per_group.div_ceil(width));
        let rows = match packing {
            Packing::Tiles => conv_tile_rows(og),
            _ => MR,
        };
        let opanels = og.div_ceil(rows);
        let data = if packing == Packing::Tiles {
            // Unit u = (group, panel of `rows` output channels); step = (tap, block of kq
            // channel quads); lane = (row, quad of the block).
            let kq = csteps.min(amx::MAX_KQ);
            let blocks = csteps / kq;
            Store::new(
                packing,
                g * opanels,
                taps * blocks,
                rows * kq,
                |u, s, l, j| {
                    let (gi, op) = (u / opanels, u % opanels);
                    let (ol, q) = (op * rows + l / kq, (s % blocks) * kq + l % kq);
                    if ol >= og {
                        return 0;
                    }
                    at(gi * og + ol, q * width + j, s / blocks)
                },
            )
        } else {
            // Unit u = (group, panel of MR output channels); step = (tap, channel step).
            Store::new(packing, g * opanels, taps * csteps, MR, |u, s, r, j| {
                let (gi, op) = (u / opanels, u % opanels);
                let ol = op * MR + r;
                if ol >= og {
                    return 0;
                }
                at(gi * og + ol, (s % csteps) * width + j, s / csteps)
            })
        };
        let sums = (0..out_channels)
            .map(|o| {
                (0..in_per_group)
                    .flat_map(|c| (0..taps).map(move |t| (c, t)))
                    .map(|(c, t)| at(o, c, t))
                    .sum()
            })
            .collect();
        PackedConvWeights {
            geom,
            out_channels,
            in_per_group,
            packing,
            csteps,
            opanels,
            data,
            sums,
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

    /// How the weights are packed (which kernels read them).
    pub fn packing(&self) -> Packing {
        self.packing
    }

    /// Channel steps per tap (`C/groups / width`, rounded up).
    pub(crate) fn csteps(&self) -> usize {
        self.csteps
    }

    /// Σ of the centered weights of each output channel.
    pub(crate) fn sums(&self) -> &[i32] {
        &self.sums
    }

    /// Bytes the packed weights occupy in memory (i8 values, or i16 when centering needs
    /// them, or 4-bit ones after [`PackedConvWeights::into_nibbles`]; panels padded to
    /// `MR`, channels to the packing's width).
    pub fn resident_bytes(&self) -> usize {
        self.data.resident_bytes()
    }

    /// [`PackedWeights::into_nibbles`] for conv weights: unpacked per call and group.
    pub fn into_nibbles(mut self) -> Self {
        self.data = self.data.into_nibbles();
        self
    }

    /// Whether the weights are resident at 4 bits.
    pub fn is_nibbles(&self) -> bool {
        self.data.is_nibbles()
    }

    pub(crate) fn opanels(&self) -> usize {
        self.opanels
    }

    /// Output channels a panel holds: `MR`, or 16 / 32 for tiles (see [`conv_tile_rows`]).
    pub(crate) fn panel_rows(&self) -> usize {
        match self.packing {
            Packing::Tiles => conv_tile_rows(self.out_channels / self.geom.groups),
            _ => MR,
        }
    }

    /// The panels of group `g` as the kernel reads them, panel `op` at
    /// `op * kh*kw*csteps*MR` lanes (of [`Packing::words`] words each), widened into
    /// `scratch` when stored as i8 pairs or 4-bit.
    pub(crate) fn group_panels<'s>(&'s self, g: usize, scratch: &'s mut Vec<i32>) -> &'s [i32] {
        let len = self.opanels
            * self.geom.kernel[0]
            * self.geom.kernel[1]
            * self.csteps
            * self.panel_rows()
            * self.packing.words();
        self.data.block(g * len, len, scratch)
    }
}
