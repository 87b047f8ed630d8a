//! Named tensors on disk (safetensors, and numpy's .npz for reading): example inputs,
//! recorded calibration inputs, outputs exchanged with the interop tests.

use std::collections::BTreeMap;
use std::path::Path;

use safetensors::tensor::{Dtype, TensorView};

use crate::error::{Error, Result};
use crate::ir::{DType, Tensor};

fn to_st(d: DType) -> Option<Dtype> {
    Some(match d {
        DType::F32 => Dtype::F32,
        DType::F16 => Dtype::F16,
        DType::BF16 => Dtype::BF16,
        DType::F64 => Dtype::F64,
        DType::I64 => Dtype::I64,
        DType::I32 => Dtype::I32,
        DType::I16 => Dtype::I16,
        DType::I8 => Dtype::I8,
        DType::U8 => Dtype::U8,
        DType::U16 => Dtype::U16,
        DType::U32 => Dtype::U32,
        DType::U64 => Dtype::U64,
        DType::Bool => Dtype::BOOL,
        _ => return None,
    })
}

fn from_st(d: Dtype) -> Option<DType> {
    Some(match d {
        Dtype::F32 => DType::F32,
        Dtype::F16 => DType::F16,
        Dtype::BF16 => DType::BF16,
        Dtype::F64 => DType::F64,
        Dtype::I64 => DType::I64,
        Dtype::I32 => DType::I32,
        Dtype::I16 => DType::I16,
        Dtype::I8 => DType::I8,
        Dtype::U8 => DType::U8,
        Dtype::U16 => DType::U16,
        Dtype::U32 => DType::U32,
        Dtype::U64 => DType::U64,
        Dtype::BOOL => DType::Bool,
        _ => return None,
    })
}

/// Reads every tensor of a safetensors or an .npz file (told apart by their first
/// bytes), keyed by name.
pub fn read_tensors(path: &Path) -> Result<BTreeMap<String, Tensor>> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    tensors_from_bytes(path, &bytes)
}

/// [`read_tensors`] on bytes already read; `path` names the file in errors.
pub fn tensors_from_bytes(path: &Path, bytes: &[u8]) -> Result<BTreeMap<String, Tensor>> {
    if crate::ir::npz::is_zip(bytes) {
        return crate::ir::npz::read_npz(path, bytes);
    }
    safetensors_from_bytes(path, bytes)
}

/// Reads every tensor of a safetensors file, keyed by name.
pub fn read_safetensors(path: &Path) -> Result<BTreeMap<String, Tensor>> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    safetensors_from_bytes(path, &bytes)
}

fn safetensors_from_bytes(path: &Path, bytes: &[u8]) -> Result<BTreeMap<String, Tensor>> {
    let st = safetensors::SafeTensors::deserialize(bytes).map_err(|e| {
        Error::invalid(format!(
            "{}: not a safetensors or .npz file ({e})",
            path.display()
        ))
    })?;
    let mut out = BTreeMap::new();
    for (name, view) in st.tensors() {
        let dtype = from_st(view.dtype()).ok_or_else(|| {
            Error::invalid(format!(
                "{}: tensor '{name}' has unsupported type {:?}",
                path.display(),
                view.dtype()
            ))
        })?;
        out.insert(
            name.clone(),
            Tensor::from_raw(dtype, view.shape().to_vec(), view.data().to_vec())?,
        );
    }
    Ok(out)
}

/// Writes named tensors as safetensors (atomically).
pub fn write_safetensors(path: &Path, tensors: &BTreeMap<String, Tensor>) -> Result<()> {
    let mut views = vec![];
    for (name, t) in tensors {
        let dt = to_st(t.dtype).ok_or_else(|| {
            Error::invalid(format!(
                "tensor '{name}': {} cannot be written to safetensors",
                t.dtype
            ))
        })?;
        let view = TensorView::new(dt, t.shape.clone(), &t.data)
            .map_err(|e| Error::invalid(format!("tensor '{name}': {e}")))?;
        views.push((name.clone(), view));
    }
    let bytes = safetensors::serialize(views, None)
        .map_err(|e| Error::invalid(format!("{}: {e}", path.display())))?;
    crate::ir::onnx::write_atomic(path, &bytes)
}
