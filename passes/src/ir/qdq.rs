//! The quantize/dequantize pattern the passes insert on an activation (`quantize`, and
//! TIAR for the TIB's layers): one IR construction shared by both, so neither pass file
//! imports the other.

use crate::error::Result;
use crate::ir::{attr, DType, Graph, Tensor};

/// Inserts the quantize/dequantize of `value` with zero point `zp` and one scale, or a
/// scale per group picked by the scalar `group` (the form `quantize`'s module documentation
/// shows);
/// returns the dequantized value's name.
pub fn insert_qdq(
    g: &mut Graph,
    value: &str,
    scales: &[f32],
    zp: u8,
    group: Option<&str>,
) -> Result<String> {
    let base = value.trim_start_matches('/');
    let z = g.add_initializer(
        &format!("{base}_zero_point"),
        Tensor::from_raw(DType::U8, vec![], vec![zp])?,
    );
    let (Some(group), true) = (group, scales.len() > 1) else {
        let s = g.add_initializer(&format!("{base}_scale"), Tensor::scalar(scales[0]));
        let q = g.add_op(
            "QuantizeLinear",
            vec![value.to_string(), s.clone(), z.clone()],
            &format!("{base}_quantized"),
            vec![],
        )?;
        return g.add_op(
            "DequantizeLinear",
            vec![q, s, z],
            &format!("{base}_dequantized"),
            vec![],
        );
    };
    let st = g.add_initializer(
        &format!("{base}_scales"),
        Tensor::from_vec(vec![scales.len()], scales),
    );
    let s = g.add_op(
        "Gather",
        vec![st, group.to_string()],
        &format!("{base}_scale"),
        vec![attr::int("axis", 0)],
    )?;
    let unit = "fsc/unit_scale".to_string();
    g.initializers
        .entry(unit.clone())
        .or_insert_with(|| Tensor::scalar(1f32));
    let scaled = g.add_op(
        "Div",
        vec![value.to_string(), s.clone()],
        &format!("{base}_scaled"),
        vec![],
    )?;
    let q = g.add_op(
        "QuantizeLinear",
        vec![scaled, unit.clone(), z.clone()],
        &format!("{base}_quantized"),
        vec![],
    )?;
    let dq = g.add_op(
        "DequantizeLinear",
        vec![q, unit, z],
        &format!("{base}_levels"),
        vec![],
    )?;
    g.add_op("Mul", vec![dq, s], &format!("{base}_dequantized"), vec![])
}
