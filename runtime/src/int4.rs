//! ONNX INT4 (`TensorProto` data type 22, opset 21): two signed 4-bit values a byte,
//! the first in the low nibble, range −8..=7; an odd count leaves the last high nibble
//! zero. The compiler writes weights of ≤ 4 bits in this form (half the bytes of the
//! int8 container); the runtime reads it in two ways: its int8 ops keep the nibbles
//! resident and unpack them per tile ([`crate::kernels::int8`]), and everything tract
//! loads gets an int8 copy first ([`widen_int4_initializers`]), since tract 0.23.9 refuses
//! data type 22 (`tract-onnx`'s `DatumType` conversion has no 4-bit type).
//!
//! One implementation of the packing serves the compiler and the runtime, so a file the
//! one writes is what the other reads.

use tract_onnx::pb;

// The 4-bit data types and their test live with the other storage facts in tensor_data
// (which must size 4-bit tensors without reading them); re-exported here.
pub use crate::tensor_data::{is_4bit, INT4, UINT4};
use crate::tensor_data::{tensor_bytes, DataFiles};

/// Packs signed values in −8..=7 two a byte, low nibble first; `None` if one leaves that
/// range (the caller keeps its int8 form).
pub fn pack_i4(values: &[i8]) -> Option<Vec<u8>> {
    if values.iter().any(|v| !(-8..=7).contains(v)) {
        return None;
    }
    Some(
        values
            .chunks(2)
            .map(|p| {
                let lo = p[0] as u8 & 0x0f;
                let hi = p.get(1).map_or(0, |&v| v as u8 & 0x0f);
                lo | (hi << 4)
            })
            .collect(),
    )
}

/// The signed value of a nibble (its low four bits).
#[inline(always)]
pub fn nibble_i4(n: u8) -> i8 {
    (((n & 0x0f) as i8) << 4) >> 4
}

/// The `count` values of packed INT4 `bytes` (which hold at least `count.div_ceil(2)`).
pub fn unpack_i4(bytes: &[u8], count: usize) -> Vec<i8> {
    let mut out = Vec::with_capacity(count);
    for &b in &bytes[..count.div_ceil(2)] {
        out.push(nibble_i4(b));
        out.push(nibble_i4(b >> 4));
    }
    out.truncate(count);
    out
}

/// The `count` values of packed UINT4 `bytes`.
pub fn unpack_u4(bytes: &[u8], count: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(count);
    for &b in &bytes[..count.div_ceil(2)] {
        out.push(b & 0x0f);
        out.push(b >> 4);
    }
    out.truncate(count);
    out
}

/// Whether any initializer of `proto`'s main graph is 4-bit.
pub fn has_int4_initializers(proto: &pb::ModelProto) -> bool {
    proto
        .graph
        .as_ref()
        .is_some_and(|g| g.initializer.iter().any(is_4bit))
}

/// `t` (INT4 or UINT4) as the same values in an INT8 or UINT8 tensor, inline. The values
/// and so every op reading them are unchanged: `DequantizeLinear` gives the same floats,
/// which is how tract runs what it cannot load at 4 bits.
pub fn widen(
    t: &pb::TensorProto,
    model_dir: Option<&std::path::Path>,
) -> Result<pb::TensorProto, String> {
    let bytes = tensor_bytes(t, model_dir, Some(&mut DataFiles::default()))?;
    let count: usize = t.dims.iter().map(|&d| d.max(0) as usize).product();
    let (data_type, raw_data) = if t.data_type == INT4 {
        let v = unpack_i4(&bytes, count);
        (
            pb::tensor_proto::DataType::Int8 as i32,
            v.into_iter().map(|x| x as u8).collect(),
        )
    } else {
        (
            pb::tensor_proto::DataType::Uint8 as i32,
            unpack_u4(&bytes, count),
        )
    };
    Ok(pb::TensorProto {
        name: t.name.clone(),
        dims: t.dims.clone(),
        data_type,
        raw_data,
        doc_string: t.doc_string.clone(),
        ..Default::default()
    })
}

/// Replaces every 4-bit initializer of `proto`'s main graph by its 8-bit form
/// ([`widen`]); the number replaced. Run on what tract is about to load, after the int8
/// lowering has moved the weights it runs itself (which stay packed) out of the graph.
pub fn widen_int4_initializers(
    proto: &mut pb::ModelProto,
    model_dir: Option<&std::path::Path>,
) -> Result<usize, String> {
    let Some(g) = proto.graph.as_mut() else {
        return Ok(0);
    };
    let mut n = 0;
    for t in g.initializer.iter_mut().filter(|t| is_4bit(t)) {
        *t = widen(t, model_dir)?;
        n += 1;
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packing_round_trips_odd_counts_and_the_range_ends() {
        for values in [
            vec![],
            vec![-8i8],
            vec![7],
            vec![-8, 7, 0],
            vec![1, -1, 3, -3, 5],
            (-8..=7).collect::<Vec<i8>>(),
            (0..101).map(|i| ((i * 7) % 16 - 8) as i8).collect(),
        ] {
            let packed = pack_i4(&values).unwrap();
            assert_eq!(packed.len(), values.len().div_ceil(2));
            assert_eq!(unpack_i4(&packed, values.len()), values);
        }
    }

    #[test]
    fn packing_is_low_nibble_first_with_a_zero_pad() {
        assert_eq!(pack_i4(&[1, -1, 7]).unwrap(), vec![0xf1, 0x07]);
        assert_eq!(pack_i4(&[-8, 7]).unwrap(), vec![0x78]);
        assert_eq!(unpack_u4(&[0xf1, 0x07], 3), vec![1, 15, 7]);
    }

    #[test]
    fn values_outside_int4_are_refused() {
        assert_eq!(pack_i4(&[0, 8]), None);
        assert_eq!(pack_i4(&[-9]), None);
    }

    #[test]
    fn widening_keeps_values_and_dims() {
        let values: Vec<i8> = vec![-8, 7, 0, 3, -2];
        let t = pb::TensorProto {
            name: "w".into(),
            dims: vec![5],
            data_type: INT4,
            raw_data: pack_i4(&values).unwrap(),
            ..Default::default()
        };
        let mut proto = pb::ModelProto {
            graph: Some(pb::GraphProto {
                initializer: vec![t],
                ..Default::default()
            }),
            ..Default::default()
        };
        assert!(has_int4_initializers(&proto));
        assert_eq!(widen_int4_initializers(&mut proto, None).unwrap(), 1);
        let w = &proto.graph.as_ref().unwrap().initializer[0];
        assert_eq!(w.data_type, 3);
        assert_eq!(w.dims, vec![5]);
        assert_eq!(
            w.raw_data,
            values.iter().map(|&v| v as u8).collect::<Vec<_>>()
        );
        assert!(!has_int4_initializers(&proto));
    }
}
