//! The lowering side of [`crate::ops::requant`]: a quantized Conv / Gemm whose output is
//! read only by a QuantizeLinear → DequantizeLinear pair with one constant scale and zero
//! point becomes one lowered node writing the pair's output (`o_scale`, `o_zero_point`).

use tract_onnx::pb;

use super::qdq::activation_qdq;
use super::{Index, Rewrite};
use crate::attr;
use crate::ops::conv::QCONV;
use crate::ops::gemm::QGEMM;
use crate::ops::requant::{enabled, O_SCALE, O_ZERO_POINT};

/// The one node reading `value` (when exactly one input of one node reads it, and it is
/// no graph output), with its index in the graph.
pub(crate) fn only_reader<'g>(ix: &Index<'g>, value: &str) -> Option<(usize, &'g pb::NodeProto)> {
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
    let lowered = [QCONV, QGEMM];
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
    r.node.attribute.push(attr::float(O_SCALE, scale));
    r.node.attribute.push(attr::int(O_ZERO_POINT, zp as i64));
    Some(at)
}
