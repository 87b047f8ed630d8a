//! Requantization fused into the epilogue of the int8 convolutions and GEMMs.
//!
//! A quantized Conv / Gemm whose output is quantized again (`tfmqc --output-qdq`: the
//! pattern onnxruntime fuses into QLinearConv)
//!
//! ```text
//! y = DequantizeLinear(QuantizeLinear(Conv(..), s, z), s, z)
//! ```
//!
//! is lowered to one `TfmqcQConv` / `TfmqcQGemm` that writes `y` itself: its kernel's store
//! rounds each dequantized accumulator to its u8 code (round half to even, saturate, as
//! QuantizeLinear) and writes `(q - z) · s` (as DequantizeLinear). tract otherwise runs
//! the pair as two element-wise passes over the output after the kernel. The result is
//! bit-identical to the unfused lowered node followed by ONNX QuantizeLinear and
//! DequantizeLinear (`tests/requant.rs`).

use tract_onnx::pb;

use crate::kernels::int8::{Dequant, Output};

/// The attributes of a lowered node with a fused output pair: its scale and zero point.
pub const O_SCALE: &str = "o_scale";
pub const O_ZERO_POINT: &str = "o_zero_point";

/// Whether the fusion is on: `TFMQC_FUSE_REQUANT=0` turns it off (read once per process;
/// how the unfused rows of BENCHMARKS.md are run), as does [`unfused`] on its thread.
pub fn enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    !UNFUSED.get() && *ON.get_or_init(|| std::env::var("TFMQC_FUSE_REQUANT").as_deref() != Ok("0"))
}

thread_local! {
    static UNFUSED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f` with this module's fusion and [`super::prescale`]'s off on this thread: a
/// lowering inside it leaves output pairs and channel factors to tract — the unfused
/// reference the exactness tests compare with (a per-thread switch, so tests running in
/// parallel do not see it).
pub fn unfused<R>(f: impl FnOnce() -> R) -> R {
    crate::scoped::with_local(&UNFUSED, true, f)
}

/// Whether [`unfused`] is in effect on this thread.
pub(crate) fn forced_off() -> bool {
    UNFUSED.get()
}

/// The fused output pair of a lowered node, from its attributes.
pub fn output_pair(node: &pb::NodeProto) -> Option<(f32, u8)> {
    let scale = node.attribute.iter().find(|a| a.name == O_SCALE)?.f;
    let zp = node.attribute.iter().find(|a| a.name == O_ZERO_POINT)?.i;
    Some((scale, zp as u8))
}

/// The kernel output of a lowered node writing f32 `out`: dequantized, or, with a fused
/// output pair `(scale, zero point)`, requantized and dequantized back.
pub(crate) fn output<'a>(
    pair: Option<(f32, u8)>,
    out: &'a mut [f32],
    dequant: Dequant<'a>,
) -> Output<'a> {
    match pair {
        None => Output::F32 { out, dequant },
        Some((scale, zero_point)) => Output::Requant {
            out,
            dequant,
            scale,
            zero_point,
        },
    }
}
