//! The bytes of ONNX initializers for the runtime's own readers (the int8 lowering and
//! the int8 op builders), wherever the file keeps them: `raw_data`, the typed fields, or
//! ONNX external data (`data_location = EXTERNAL`, the form of every model over 2 GiB).
//!
//! External data is read through a memory map of the data file beside the model, never
//! copied into a buffer: an int8 weight goes from the mapped file straight into its
//! packed form, and the mapping (and with it the pages it touched) is dropped as soon as
//! the weight is packed, so loading an SD-class model does not hold its data file
//! resident beside the packed weights.

use std::collections::HashMap;
use std::ops::Deref;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use tract_onnx::pb;

/// ONNX `TensorProto.DataType` INT4 (opset 21: two signed 4-bit values a byte, low
/// nibble first; [`crate::int4`] packs and unpacks them).
pub const INT4: i32 = 22;
/// ONNX `TensorProto.DataType` UINT4.
pub const UINT4: i32 = 21;

/// Whether `t` is a 4-bit tensor (INT4 or UINT4).
pub fn is_4bit(t: &pb::TensorProto) -> bool {
    t.data_type == INT4 || t.data_type == UINT4
}

/// Bytes of one tensor element of ONNX data type `data_type`, when it has a fixed size.
pub(crate) fn element_size(data_type: i32) -> Option<usize> {
    use pb::tensor_proto::DataType as D;
    Some(match D::try_from(data_type).ok()? {
        D::Uint8 | D::Int8 | D::Bool => 1,
        D::Uint16 | D::Int16 | D::Float16 | D::Bfloat16 => 2,
        D::Float | D::Int32 | D::Uint32 => 4,
        D::Int64 | D::Uint64 | D::Double => 8,
        _ => return None,
    })
}

fn is_external(t: &pb::TensorProto) -> bool {
    t.data_location == Some(pb::tensor_proto::DataLocation::External as i32)
}

fn external_entry<'a>(t: &'a pb::TensorProto, key: &str) -> Option<&'a str> {
    t.external_data
        .iter()
        .find(|e| e.key == key)
        .map(|e| e.value.as_str())
}

/// Memory maps of external-data files, one per file, kept while a model is lowered
/// (the lowering reads many small tensors: scales, zero points, biases).
#[derive(Default)]
pub(crate) struct DataFiles {
    maps: HashMap<PathBuf, Arc<memmap2::Mmap>>,
}

impl DataFiles {
    fn map(&mut self, path: &Path) -> std::io::Result<Arc<memmap2::Mmap>> {
        if let Some(m) = self.maps.get(path) {
            return Ok(m.clone());
        }
        let m = map_file(path)?;
        self.maps.insert(path.to_path_buf(), m.clone());
        Ok(m)
    }
}

fn map_file(path: &Path) -> std::io::Result<Arc<memmap2::Mmap>> {
    let file = std::fs::File::open(path)?;
    // SAFETY: mapped read-only. A model's data file is replaced by rename (tfmqc's
    // writes are atomic), not rewritten in place while a runtime reads it; truncating it
    // under a running process would fault, as it would for tract's own loader.
    Ok(Arc::new(unsafe { memmap2::Mmap::map(&file)? }))
}

/// The bytes of a tensor: borrowed from the proto, a view of a mapped data file, or
/// converted from a typed field.
pub(crate) enum TensorBytes<'a> {
    Borrowed(&'a [u8]),
    Mapped {
        map: Arc<memmap2::Mmap>,
        offset: usize,
        len: usize,
    },
    Owned(Vec<u8>),
}

impl Deref for TensorBytes<'_> {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            TensorBytes::Borrowed(b) => b,
            TensorBytes::Mapped { map, offset, len } => &map[*offset..*offset + *len],
            TensorBytes::Owned(v) => v,
        }
    }
}

/// Where external data of a model in `model_dir` named `location` lives. The rules are
/// tract's own (which loads the float initializers of the same model): a relative path
/// that stays inside the model's folder once symbolic links are resolved.
pub(crate) fn data_path(
    model_dir: Option<&Path>,
    location: &str,
    tensor: &str,
) -> Result<PathBuf, String> {
    let rel = Path::new(location);
    if rel
        .components()
        .any(|c| !matches!(c, Component::Normal(_) | Component::CurDir))
    {
        return Err(format!(
            "tensor '{tensor}': external data location '{location}' must be a relative path inside the model's folder"
        ));
    }
    let dir = model_dir.ok_or_else(|| {
        format!("tensor '{tensor}' is external data ('{location}'), but the model was given without its folder")
    })?;
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    let canonical = |p: &Path| {
        p.canonicalize()
            .map_err(|e| format!("{}: {e} (external data of tensor '{tensor}')", p.display()))
    };
    let dir = canonical(dir)?;
    let path = canonical(&dir.join(rel))?;
    if !path.starts_with(&dir) {
        return Err(format!(
            "tensor '{tensor}': external data {} resolves outside the model's folder {}",
            path.display(),
            dir.display()
        ));
    }
    Ok(path)
}

/// The bytes of `t` (exactly dims × element size of them). External data is mapped
/// through `maps` (kept by the caller), or, with `maps = None`, through a mapping of its
/// own that lives as long as the returned bytes. Errors name the tensor and the file.
pub(crate) fn tensor_bytes<'a>(
    t: &'a pb::TensorProto,
    model_dir: Option<&Path>,
    maps: Option<&mut DataFiles>,
) -> Result<TensorBytes<'a>, String> {
    // 4-bit types (ONNX INT4 / UINT4) pack two values a byte: the bytes are the packed
    // ones, [`crate::int4`] reads them.
    let four_bit = is_4bit(t);
    let elem = match four_bit {
        true => Some(1),
        false => element_size(t.data_type),
    }
    .ok_or_else(|| format!("tensor '{}': unsupported data type {}", t.name, t.data_type))?;
    let count = t.dims.iter().try_fold(1usize, |n, &d| {
        usize::try_from(d).ok().and_then(|d| n.checked_mul(d))
    });
    let want = count
        .map(|n| if four_bit { n.div_ceil(2) } else { n })
        .and_then(|n| n.checked_mul(elem))
        .ok_or_else(|| format!("tensor '{}': bad dims {:?}", t.name, t.dims))?;
    let bytes = if !t.raw_data.is_empty() {
        TensorBytes::Borrowed(&t.raw_data)
    } else if is_external(t) {
        let location = external_entry(t, "location")
            .ok_or_else(|| format!("tensor '{}' is external but names no location", t.name))?;
        let path = data_path(model_dir, location, &t.name)?;
        let number = |key: &str| -> Result<Option<usize>, String> {
            external_entry(t, key)
                .map(|v| {
                    v.parse::<usize>().map_err(|_| {
                        format!(
                            "tensor '{}': external data {key} '{v}' is not a number",
                            t.name
                        )
                    })
                })
                .transpose()
        };
        let offset = number("offset")?.unwrap_or(0);
        let len = number("length")?.unwrap_or(want);
        let map = match maps {
            Some(m) => m.map(&path),
            None => map_file(&path),
        }
        .map_err(|e| {
            format!(
                "{}: {e} (external data of tensor '{}')",
                path.display(),
                t.name
            )
        })?;
        if offset.checked_add(len).is_none_or(|end| end > map.len()) {
            return Err(format!(
                "tensor '{}': {len} bytes at offset {offset} lie beyond the end of {} ({} bytes)",
                t.name,
                path.display(),
                map.len()
            ));
        }
        TensorBytes::Mapped { map, offset, len }
    } else {
        use pb::tensor_proto::DataType as D;
        let typed: Vec<u8> = match D::try_from(t.data_type) {
            // The typed form of 4-bit data holds one packed byte an int32.
            _ if four_bit => t.int32_data.iter().map(|&v| v as u8).collect(),
            Ok(D::Float) => t.float_data.iter().flat_map(|v| v.to_le_bytes()).collect(),
            Ok(D::Int8 | D::Uint8 | D::Bool) => t.int32_data.iter().map(|&v| v as u8).collect(),
            Ok(D::Int32) => t.int32_data.iter().flat_map(|v| v.to_le_bytes()).collect(),
            Ok(D::Int64) => t.int64_data.iter().flat_map(|v| v.to_le_bytes()).collect(),
            Ok(D::Double) => t.double_data.iter().flat_map(|v| v.to_le_bytes()).collect(),
            _ => vec![],
        };
        TensorBytes::Owned(typed)
    };
    if bytes.len() != want {
        return Err(format!(
            "tensor '{}': {} bytes of data for dims {:?} ({want} expected)",
            t.name,
            bytes.len(),
            t.dims
        ));
    }
    Ok(bytes)
}

/// `t` as f32 values (`None` unless it is a float tensor).
pub(crate) fn tensor_f32(
    t: &pb::TensorProto,
    model_dir: Option<&Path>,
    maps: &mut DataFiles,
) -> Result<Option<Vec<f32>>, String> {
    if t.data_type != pb::tensor_proto::DataType::Float as i32 {
        return Ok(None);
    }
    let b = tensor_bytes(t, model_dir, Some(maps))?;
    Ok(Some(
        b.chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
    ))
}

/// Bytes of an 8-bit tensor as `i8` (the same bits), without a copy.
pub(crate) fn as_i8(bytes: &[u8]) -> &[i8] {
    // SAFETY: u8 and i8 have the same size and alignment and every bit pattern is valid.
    unsafe { std::slice::from_raw_parts(bytes.as_ptr() as *const i8, bytes.len()) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(k: &str, v: &str) -> pb::StringStringEntryProto {
        pb::StringStringEntryProto {
            key: k.into(),
            value: v.into(),
        }
    }

    fn external(
        name: &str,
        dims: &[i64],
        location: &str,
        offset: usize,
        len: usize,
    ) -> pb::TensorProto {
        pb::TensorProto {
            name: name.into(),
            data_type: pb::tensor_proto::DataType::Int8 as i32,
            dims: dims.to_vec(),
            data_location: Some(pb::tensor_proto::DataLocation::External as i32),
            external_data: vec![
                entry("location", location),
                entry("offset", &offset.to_string()),
                entry("length", &len.to_string()),
            ],
            ..Default::default()
        }
    }

    #[test]
    fn external_data_is_read_from_the_file_beside_the_model() {
        let dir = std::env::temp_dir().join(format!("tfmqc-tensor-data-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("m.onnx.data"), (0..=255u8).collect::<Vec<_>>()).unwrap();
        let t = external("w", &[2, 3], "m.onnx.data", 10, 6);
        let mut maps = DataFiles::default();
        let b = tensor_bytes(&t, Some(&dir), Some(&mut maps)).unwrap();
        assert_eq!(&b[..], &[10, 11, 12, 13, 14, 15]);
        // Without a shared map: a mapping of its own.
        assert_eq!(&tensor_bytes(&t, Some(&dir), None).unwrap()[..], &b[..]);
        assert_eq!(as_i8(&[255u8, 1])[..], [-1i8, 1]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn bad_external_data_is_an_error_naming_the_tensor() {
        let dir = std::env::temp_dir().join(format!("tfmqc-tensor-bad-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("m.data"), [0u8; 8]).unwrap();
        let read = |t: &pb::TensorProto| tensor_bytes(t, Some(&dir), None).err().unwrap();
        let e = read(&external("w1", &[4], "missing.data", 0, 4));
        assert!(e.contains("missing.data") && e.contains("'w1'"), "{e}");
        let e = read(&external("w2", &[8], "m.data", 4, 8));
        assert!(e.contains("'w2'") && e.contains("beyond the end"), "{e}");
        let e = read(&external("w3", &[4], "../m.data", 0, 4));
        assert!(
            e.contains("'w3'") && e.contains("inside the model's folder"),
            "{e}"
        );
        let e = read(&external("w4", &[3], "m.data", 0, 4));
        assert!(e.contains("'w4'") && e.contains("3 expected"), "{e}");
        let e = tensor_bytes(&external("w5", &[4], "m.data", 0, 4), None, None)
            .err()
            .unwrap();
        assert!(
            e.contains("'w5'") && e.contains("without its folder"),
            "{e}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
