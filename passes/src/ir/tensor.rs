//! Dense tensors as the IR keeps them: an ONNX data type, a shape and the raw
//! little-endian bytes. Keeping raw bytes (instead of typed vectors) is what makes the
//! ONNX round trip bit-exact for every data type, f16/bf16 and packed int4 included.

use std::fmt;

use crate::error::{Error, Result};
use crate::ir::bytes::Bytes;

/// ONNX `TensorProto.DataType`, restricted to what tfmqc can carry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DType {
    F32,
    U8,
    I8,
    U16,
    I16,
    I32,
    I64,
    String,
    Bool,
    F16,
    F64,
    U32,
    U64,
    BF16,
    F8E4M3FN,
    F8E4M3FNUZ,
    F8E5M2,
    F8E5M2FNUZ,
    U4,
    I4,
}

impl DType {
    pub fn from_onnx(code: i32) -> Option<DType> {
        use DType::*;
        Some(match code {
            1 => F32,
            2 => U8,
            3 => I8,
            4 => U16,
            5 => I16,
            6 => I32,
            7 => I64,
            8 => String,
            9 => Bool,
            10 => F16,
            11 => F64,
            12 => U32,
            13 => U64,
            16 => BF16,
            17 => F8E4M3FN,
            18 => F8E4M3FNUZ,
            19 => F8E5M2,
            20 => F8E5M2FNUZ,
            21 => U4,
            22 => I4,
            _ => return None,
        })
    }

    pub fn onnx_code(self) -> i32 {
        use DType::*;
        match self {
            F32 => 1,
            U8 => 2,
            I8 => 3,
            U16 => 4,
            I16 => 5,
            I32 => 6,
            I64 => 7,
            String => 8,
            Bool => 9,
            F16 => 10,
            F64 => 11,
            U32 => 12,
            U64 => 13,
            BF16 => 16,
            F8E4M3FN => 17,
            F8E4M3FNUZ => 18,
            F8E5M2 => 19,
            F8E5M2FNUZ => 20,
            U4 => 21,
            I4 => 22,
        }
    }

    /// Size of one element in bits (strings have no fixed size: 0).
    pub fn bits(self) -> usize {
        use DType::*;
        match self {
            U4 | I4 => 4,
            U8 | I8 | Bool | F8E4M3FN | F8E4M3FNUZ | F8E5M2 | F8E5M2FNUZ => 8,
            U16 | I16 | F16 | BF16 => 16,
            F32 | I32 | U32 => 32,
            F64 | I64 | U64 => 64,
            String => 0,
        }
    }

    /// Bytes needed to store `numel` elements (4-bit types pack two per byte).
    pub fn storage_bytes(self, numel: usize) -> usize {
        (numel * self.bits()).div_ceil(8)
    }

    /// [`DType::storage_bytes`], `None` where the byte count does not fit a `usize` (a
    /// declared shape no file or memory could hold).
    pub fn checked_storage_bytes(self, numel: usize) -> Option<usize> {
        numel.checked_mul(self.bits()).map(|b| b.div_ceil(8))
    }

    pub fn is_float(self) -> bool {
        use DType::*;
        matches!(
            self,
            F32 | F16 | BF16 | F64 | F8E4M3FN | F8E4M3FNUZ | F8E5M2 | F8E5M2FNUZ
        )
    }

    /// Short name used by the IR printer (`f32`, `i64`, ...).
    pub fn short(self) -> &'static str {
        use DType::*;
        match self {
            F32 => "f32",
            U8 => "u8",
            I8 => "i8",
            U16 => "u16",
            I16 => "i16",
            I32 => "i32",
            I64 => "i64",
            String => "str",
            Bool => "bool",
            F16 => "f16",
            F64 => "f64",
            U32 => "u32",
            U64 => "u64",
            BF16 => "bf16",
            F8E4M3FN => "f8e4m3fn",
            F8E4M3FNUZ => "f8e4m3fnuz",
            F8E5M2 => "f8e5m2",
            F8E5M2FNUZ => "f8e5m2fnuz",
            U4 => "u4",
            I4 => "i4",
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.short())
    }
}

/// A dense tensor. `data` holds the ONNX `raw_data` layout: little-endian, row-major,
/// 4-bit types packed low nibble first; it is shared, not copied, when the tensor is
/// cloned, and may be a view of an external-data file ([`Bytes`]). String tensors use
/// `strings` instead.
#[derive(Clone, PartialEq)]
pub struct Tensor {
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub data: Bytes,
    pub strings: Vec<Vec<u8>>,
}

impl fmt::Debug for Tensor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Tensor({}{:?}, {} bytes)",
            self.dtype,
            self.shape,
            self.data.len()
        )
    }
}

/// Element types that can be read from / written to raw tensor bytes.
pub trait Element: Copy {
    const DTYPE: DType;
    fn from_le(bytes: &[u8]) -> Self;
    fn write_le(self, out: &mut Vec<u8>);
}

macro_rules! element {
    ($t:ty, $dt:expr) => {
        impl Element for $t {
            const DTYPE: DType = $dt;
            fn from_le(bytes: &[u8]) -> Self {
                <$t>::from_le_bytes(bytes.try_into().expect("element size"))
            }
            fn write_le(self, out: &mut Vec<u8>) {
                out.extend_from_slice(&self.to_le_bytes())
            }
        }
    };
}
element!(f32, DType::F32);
element!(f64, DType::F64);
element!(i64, DType::I64);
element!(i32, DType::I32);
element!(i16, DType::I16);
element!(i8, DType::I8);
element!(u8, DType::U8);
element!(u16, DType::U16);
element!(u32, DType::U32);
element!(u64, DType::U64);

impl Tensor {
    pub fn numel(&self) -> usize {
        // Every constructor checked the product (`checked_numel`); an empty tensor's
        // other dimensions may still be anything, so its product is never formed.
        if self.shape.contains(&0) {
            0
        } else {
            self.shape.iter().product()
        }
    }

    /// Bytes the tensor occupies in memory/on disk.
    pub fn byte_len(&self) -> usize {
        if self.dtype == DType::String {
            self.strings.iter().map(|s| s.len()).sum()
        } else {
            self.data.len()
        }
    }

    pub fn from_raw(dtype: DType, shape: Vec<usize>, data: impl Into<Bytes>) -> Result<Tensor> {
        let data = data.into();
        let want = checked_numel(&shape)
            .and_then(|n| dtype.checked_storage_bytes(n))
            .ok_or_else(|| {
                Error::invalid(format!(
                    "tensor {dtype}{shape:?}: its size overflows (shape cannot be real)"
                ))
            })?;
        if data.len() != want {
            return Err(Error::invalid(format!(
                "tensor {dtype}{shape:?} needs {want} bytes, got {}",
                data.len()
            )));
        }
        Ok(Tensor {
            dtype,
            shape,
            data,
            strings: vec![],
        })
    }

    pub fn from_vec<T: Element>(shape: Vec<usize>, values: &[T]) -> Tensor {
        assert_eq!(
            shape.iter().product::<usize>(),
            values.len(),
            "shape/data mismatch"
        );
        let mut data = Vec::with_capacity(values.len() * T::DTYPE.bits() / 8);
        for v in values {
            v.write_le(&mut data);
        }
        Tensor {
            dtype: T::DTYPE,
            shape,
            data: data.into(),
            strings: vec![],
        }
    }

    pub fn scalar<T: Element>(v: T) -> Tensor {
        Tensor::from_vec(vec![], &[v])
    }

    /// The elements as `T`, which must be exactly the tensor's type.
    pub fn to_vec<T: Element>(&self) -> Result<Vec<T>> {
        if self.dtype != T::DTYPE {
            return Err(Error::invalid(format!(
                "tensor is {} but {} was asked for",
                self.dtype,
                T::DTYPE
            )));
        }
        let w = T::DTYPE.bits() / 8;
        Ok(self.data.chunks_exact(w).map(T::from_le).collect())
    }

    /// Elements converted to f64, for printing and analysis (ints, floats, bools).
    pub fn to_f64_lossy(&self) -> Result<Vec<f64>> {
        use DType::*;
        let d = &self.data;
        Ok(match self.dtype {
            F32 => self.to_vec::<f32>()?.into_iter().map(f64::from).collect(),
            F64 => self.to_vec::<f64>()?,
            I64 => self
                .to_vec::<i64>()?
                .into_iter()
                .map(|v| v as f64)
                .collect(),
            I32 => self.to_vec::<i32>()?.into_iter().map(f64::from).collect(),
            I16 => self.to_vec::<i16>()?.into_iter().map(f64::from).collect(),
            I8 => self.to_vec::<i8>()?.into_iter().map(f64::from).collect(),
            U8 | Bool => d.iter().map(|&b| f64::from(b)).collect(),
            U16 => self.to_vec::<u16>()?.into_iter().map(f64::from).collect(),
            U32 => self.to_vec::<u32>()?.into_iter().map(f64::from).collect(),
            U64 => self
                .to_vec::<u64>()?
                .into_iter()
                .map(|v| v as f64)
                .collect(),
            F16 => d
                .chunks_exact(2)
                .map(|c| f64::from(half::f16::from_le_bytes([c[0], c[1]]).to_f32()))
                .collect(),
            BF16 => d
                .chunks_exact(2)
                .map(|c| f64::from(half::bf16::from_le_bytes([c[0], c[1]]).to_f32()))
                .collect(),
            I4 | U4 => {
                let mut out = Vec::with_capacity(self.numel());
                for i in 0..self.numel() {
                    let nib = (d[i / 2] >> ((i % 2) * 4)) & 0xf;
                    let v = if self.dtype == I4 && nib >= 8 {
                        nib as i32 - 16
                    } else {
                        nib as i32
                    };
                    out.push(f64::from(v));
                }
                out
            }
            other => {
                return Err(Error::invalid(format!(
                    "cannot read {other} tensors as numbers"
                )))
            }
        })
    }

    /// Integer view for index/shape tensors (i64, i32 and smaller ints).
    pub fn to_i64_vec(&self) -> Result<Vec<i64>> {
        match self.dtype {
            DType::I64 => self.to_vec::<i64>(),
            DType::I32 => Ok(self.to_vec::<i32>()?.into_iter().map(i64::from).collect()),
            d if !d.is_float() && d != DType::String => {
                Ok(self.to_f64_lossy()?.into_iter().map(|v| v as i64).collect())
            }
            d => Err(Error::invalid(format!(
                "expected an integer tensor, found {d}"
            ))),
        }
    }

    /// f32 view of any float (or int) tensor.
    pub fn to_f32_vec(&self) -> Result<Vec<f32>> {
        match self.dtype {
            DType::F32 => self.to_vec::<f32>(),
            _ => Ok(self.to_f64_lossy()?.into_iter().map(|v| v as f32).collect()),
        }
    }
}

/// Elements of a tensor of `shape`; `None` when the product overflows a `usize`. A
/// zero dimension makes it 0 whatever the others declare (ONNX allows empty tensors).
pub fn checked_numel(shape: &[usize]) -> Option<usize> {
    if shape.contains(&0) {
        return Some(0);
    }
    shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn half_precision_tensors_read_as_numbers() {
        let read = |dtype, bits: &[u16]| {
            let bytes: Vec<u8> = bits.iter().flat_map(|b| b.to_le_bytes()).collect();
            Tensor::from_raw(dtype, vec![bits.len()], bytes)
                .unwrap()
                .to_f64_lossy()
                .unwrap()
        };
        let h = read(DType::F16, &[0x3c00, 0xc000, 0x0001, 0x7e00, 0x7c00]);
        assert_eq!(h[..3], [1.0, -2.0, 2f64.powi(-24)]);
        assert!(h[3].is_nan());
        assert_eq!(h[4], f64::INFINITY);
        let b = read(DType::BF16, &[0x3f80, 0xc000, 0x7f80]);
        assert_eq!(b, [1.0, -2.0, f64::INFINITY]);
    }

    #[test]
    fn storage_bytes_pack_four_bit_types() {
        assert_eq!(DType::I4.storage_bytes(3), 2);
        assert_eq!(DType::F16.storage_bytes(3), 6);
    }

    #[test]
    fn from_raw_rejects_wrong_length() {
        assert!(Tensor::from_raw(DType::F32, vec![2], vec![0; 7]).is_err());
    }

    #[test]
    fn from_raw_rejects_a_shape_whose_size_overflows() {
        // The wrapped product is 0, which the empty data would have matched.
        let e = Tensor::from_raw(DType::F32, vec![1 << 32, 1 << 32], vec![]).unwrap_err();
        assert!(e.to_string().contains("overflows"), "{e}");
        let e = Tensor::from_raw(DType::F64, vec![1 << 62], vec![]).unwrap_err();
        assert!(e.to_string().contains("overflows"), "{e}");
        // A zero dimension makes any other one fine: an empty tensor.
        let t = Tensor::from_raw(DType::F32, vec![0, usize::MAX], vec![]).unwrap();
        assert_eq!(t.numel(), 0);
    }

    #[test]
    fn int4_reads_signed_nibbles() {
        let t = Tensor::from_raw(DType::I4, vec![3], vec![0xf1, 0x07]).unwrap();
        assert_eq!(t.to_f64_lossy().unwrap(), vec![1.0, -1.0, 7.0]);
    }
}
