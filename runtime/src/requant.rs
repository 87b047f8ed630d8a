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

use crate::int8_ops::{activation_qdq, float_attr, int_attr};
use crate::kernels::int8::{Dequant, Output};
use crate::lower::{Index, Rewrite};

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

/// Runs `f` with this module's fusion and [`crate::prescale`]'s off on this thread: a
/// lowering inside it leaves output pairs and channel factors to tract — the unfused
/// reference the exactness tests compare with (a per-thread switch, so tests running in
/// parallel do not see it).
pub fn unfused<R>(f: impl FnOnce() -> R) -> R {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            UNFUSED.set(self.0);
        }
    }
    let _restore = Restore(UNFUSED.replace(true));
    f()
}

/// Whether [`unfused`] is in effect on this thread.
pub(crate) fn forced_off() -> bool {
    UNFUSED.get()
}

/// The one node reading `value` (when exactly one input of one node reads it, and it is
/// no graph output), with its index in the graph.
fn only_reader<'g>(ix: &Index<'g>, value: &str) -> Option<(usize, &'g pb::NodeProto)> {
    if !ix.read_once(value) {
        return None;
    }
    ix.graph
        .node
        .iter()
        .enumerate()
        .find(|(_, n)| n.input.iter().any(|i| i == value))
}

/// If `r` (a lowered Conv or Gemm) has an output pair — its output read only by a
/// QuantizeLinear (constant per-tensor scale, u8 zero point), read only by a
/// DequantizeLinear with the same scale and zero point — makes `r` write the pair's
/// output with the pair's scale and zero point as `o_scale` / `o_zero_point`, and returns
/// the graph index of the DequantizeLinear: the rewrite replaces that node, and the
/// Conv and QuantizeLinear it leaves unread are dropped by the lowering's liveness.
pub(crate) fn fuse_output_pair(ix: &Index, r: &mut Rewrite) -> Option<usize> {
    let lowered = [crate::int8_ops::QCONV, crate::int8_gemm::QGEMM];
    if !enabled() || !lowered.contains(&r.node.op_type.as_str()) {
        return None;
    }
    let out = r.node.output.first()?.clone();
    let (_, q) = only_reader(ix, &out).filter(|(_, q)| q.op_type == "QuantizeLinear")?;
    let (at, dq) =
        only_reader(ix, q.output.first()?).filter(|(_, d)| d.op_type == "DequantizeLinear")?;
    // The same constant scale and u8 zero point on both, read as activation pairs are.
    let (x, scale, zp) = activation_qdq(ix, dq.output.first()?)?;
    if x != out || !(scale.is_finite() && scale > 0.0) {
        return None;
    }
    r.node.output = vec![dq.output[0].clone()];
    r.node.attribute.push(float_attr(O_SCALE, scale));
    r.node.attribute.push(int_attr(O_ZERO_POINT, zp as i64));
    Some(at)
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
