//! The runtime's own tract ops: each is built by tract's ONNX parser from a node that
//! [`crate::lower`] wrote (`TfmqcQConv`, `TfmqcQGemm`, …) and runs on [`crate::kernels`].
//! Nothing here imports the lowering: the lowering writes the nodes these ops read.
//!
//! This module holds what the op builders share: reading a lowered node's attributes,
//! its weight bytes and its per-step activation scales.
pub mod attention;
pub mod conv;
pub mod conv_f32;
pub mod gemm;
pub mod group_norm;
pub mod matmul;
pub mod prescale;
pub mod requant;
pub mod residual;

use std::sync::Arc;

use tract_onnx::pb;
use tract_onnx::tract_hir::internal::*;

use crate::tensor_data::{tensor_bytes, TensorBytes};

/// Attribute `name` of one of our int8 nodes (an error naming the node if it lacks it).
pub(crate) fn attr<'a>(node: &'a pb::NodeProto, name: &str) -> TractResult<&'a pb::AttributeProto> {
    node.attribute
        .iter()
        .find(|a| a.name == name)
        .ok_or_else(|| format_err!("{} '{}' lacks '{name}'", node.op_type, node.name))
}

/// The `a_scales` attribute of a lowered node with per-step activation scales (it then
/// reads the group index as its last input).
pub(crate) fn step_scales(node: &pb::NodeProto) -> TractResult<Option<Arc<Vec<f32>>>> {
    let Ok(a) = attr(node, "a_scales") else {
        return Ok(None);
    };
    ensure!(
        !a.floats.is_empty() && a.floats.iter().all(|&s| s > 0.0),
        "{} '{}': per-step scales must be positive",
        node.op_type,
        node.name
    );
    // (A fused residual is read after the group index: `residual`.)
    let residual = attr(node, residual::RESIDUAL).is_ok_and(|a| a.i == 1) as usize;
    ensure!(
        node.input.len() == 2 + residual,
        "{} '{}': per-step scales need the group index as the second input",
        node.op_type,
        node.name
    );
    Ok(Some(Arc::new(a.floats.clone())))
}

/// The bytes of the `weight` tensor attribute `w` of one of our int8 nodes: its
/// `raw_data`, or its external data (mapped from the file beside the model, relative to
/// the folder tract was given).
pub(crate) fn weight_bytes<'a>(
    ctx: &tract_onnx::model::ParsingContext,
    node: &pb::NodeProto,
    w: &'a pb::TensorProto,
) -> TractResult<TensorBytes<'a>> {
    tensor_bytes(w, ctx.model_dir.map(std::path::Path::new), None)
        .map_err(|e| format_err!("{} '{}': {e}", node.op_type, node.name))
}

/// The values of an int8 op's `weight` tensor attribute: INT8 as the bytes are (no
/// copy), INT4 unpacked to i8 for the packing, which then keeps them resident at 4 bits
/// again ([`WeightI8::int4`]).
pub(crate) struct WeightI8<'a> {
    bytes: TensorBytes<'a>,
    unpacked: Option<Vec<i8>>,
}

impl WeightI8<'_> {
    pub fn values(&self) -> &[i8] {
        match &self.unpacked {
            Some(v) => v,
            None => crate::tensor_data::as_i8(&self.bytes),
        }
    }

    /// Whether the file stored the weight at 4 bits.
    pub fn int4(&self) -> bool {
        self.unpacked.is_some()
    }
}

/// Whether `w` is a weight the int8 ops take: INT8, or INT4 (ONNX data type 22).
pub(crate) fn is_int8_or_int4(w: &pb::TensorProto) -> bool {
    w.data_type == pb::tensor_proto::DataType::Int8 as i32 || w.data_type == crate::int4::INT4
}

/// [`weight_bytes`] as i8 values, INT4 unpacked.
pub(crate) fn weight_i8<'a>(
    ctx: &tract_onnx::model::ParsingContext,
    node: &pb::NodeProto,
    w: &'a pb::TensorProto,
) -> TractResult<WeightI8<'a>> {
    let bytes = weight_bytes(ctx, node, w)?;
    let unpacked = (w.data_type == crate::int4::INT4).then(|| {
        let count = w.dims.iter().map(|&d| d.max(0) as usize).product();
        crate::int4::unpack_i4(&bytes, count)
    });
    Ok(WeightI8 { bytes, unpacked })
}

/// The scale of group `group` (a scalar integer tensor, the node's last input) among
/// `scales`: a group outside the table means a time step outside S, which is an error.
pub(crate) fn step_scale(scales: &[f32], group: &TValue, op: &str) -> TractResult<f32> {
    // tract may carry this integer arithmetic as TDim (its symbolic integers).
    let d = group.datum_type();
    ensure!(
        d.is_integer() || d == DatumType::TDim,
        "{op}: the step-group index is {d:?}, not an integer"
    );
    let g = group.cast_to_scalar::<i64>()?;
    select_step_scale(scales, g).map_err(|e| format_err!("{op}: {e}"))
}

/// The per-step scale a lowered node quantizes its input with at step group `group`
/// (what the QDQ graph's `Gather(scales, group)` gives); a group outside the table means
/// a time step outside S: an error, never a silent clamp.
pub fn select_step_scale(scales: &[f32], group: i64) -> TractResult<f32> {
    ensure!(
        (0..scales.len() as i64).contains(&group),
        "step group {group} outside the {} groups of the per-step scales: the time step is not in the model's set S",
        scales.len()
    );
    Ok(scales[group as usize])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_step_group_outside_the_table_is_an_error_not_a_clamp() {
        let scales = [0.5f32, 0.25, 0.125];
        assert_eq!(select_step_scale(&scales, 0).unwrap(), 0.5);
        assert_eq!(select_step_scale(&scales, 2).unwrap(), 0.125);
        for g in [3, 7, -1] {
            let e = select_step_scale(&scales, g).unwrap_err().to_string();
            assert!(e.contains("not in the model's set S"), "{e}");
        }
    }
}
