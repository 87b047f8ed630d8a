//! ONNX ⇄ IR. Import reads a `.onnx` file (and its external data file, if any) into a
//! [`Model`]; export writes a model back, through a temporary file renamed into place so
//! that a failure never leaves a half-written output.

use std::collections::HashSet;
use std::io::Write;
use std::path::{Path, PathBuf};

use prost::Message;
use tract_onnx::pb;

use crate::error::{Error, Result};
use crate::ir::bytes::{Bytes, FileMaps, FileSpan};
use crate::ir::{DType, Dim, Graph, Model, Node, Tensor, ValueInfo};

/// Newest default-domain opset tfmqc accepts. Opsets past this may change operator
/// semantics we rely on; refusing them is better than a silently wrong rewrite.
pub const MAX_ONNX_OPSET: i64 = 22;

/// Tensors at least this large go to the external data file when writing external data.
const EXTERNAL_THRESHOLD: usize = 1024;

/// Above this total, protobuf cannot hold the tensors inline (2 GiB limit).
const INLINE_LIMIT: usize = 1_800_000_000;

pub fn load(path: &Path) -> Result<Model> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
    decode(&bytes, Some(&dir)).map_err(|e| match e {
        Error::NotOnnx { reason, .. } => Error::NotOnnx {
            path: path.to_path_buf(),
            reason,
        },
        // An external data file that cannot be read names itself.
        e @ Error::Io { .. } => e,
        other => Error::InFile {
            path: path.to_path_buf(),
            source: Box::new(other),
        },
    })
}

/// Decodes ONNX bytes. `dir` is where external data files are looked up.
pub fn decode(bytes: &[u8], dir: Option<&Path>) -> Result<Model> {
    let not_onnx = |reason: String| Error::NotOnnx {
        path: PathBuf::from("<memory>"),
        reason,
    };
    if bytes.is_empty() {
        return Err(not_onnx("the file is empty".into()));
    }
    // Before decoding: a small file can declare gigabytes of empty messages.
    tfmqc_runtime::limits::check_protobuf_size(bytes).map_err(not_onnx)?;
    let proto = pb::ModelProto::decode(bytes).map_err(|e| {
        not_onnx(format!(
            "protobuf decoding failed: {e}; truncated or not ONNX?"
        ))
    })?;
    if proto.ir_version <= 0 || proto.graph.is_none() {
        return Err(not_onnx(
            "no ir_version or no graph: not an ONNX model".into(),
        ));
    }
    from_proto(proto, dir)
}

pub fn from_proto(proto: pb::ModelProto, dir: Option<&Path>) -> Result<Model> {
    let mut opsets = vec![];
    for o in &proto.opset_import {
        if (o.domain.is_empty() || o.domain == "ai.onnx") && o.version > MAX_ONNX_OPSET {
            return Err(Error::OpsetTooNew {
                domain: "ai.onnx".into(),
                version: o.version,
                max: MAX_ONNX_OPSET,
            });
        }
        opsets.push((o.domain.clone(), o.version));
    }
    let g = proto.graph.expect("checked by decode");
    let mut external = false;
    let mut maps = FileMaps::default();
    let graph = import_graph(g, dir, &mut external, &mut maps)?;
    Ok(Model {
        ir_version: proto.ir_version,
        opsets,
        producer_name: proto.producer_name,
        producer_version: proto.producer_version,
        domain: proto.domain,
        model_version: proto.model_version,
        doc_string: proto.doc_string,
        metadata: proto
            .metadata_props
            .into_iter()
            .map(|e| (e.key, e.value))
            .collect(),
        graph,
        functions: proto.functions,
        training_info: proto.training_info,
        external_data: external,
    })
}

fn import_graph(
    g: pb::GraphProto,
    dir: Option<&Path>,
    external: &mut bool,
    maps: &mut FileMaps,
) -> Result<Graph> {
    let mut graph = Graph::new(g.name);
    graph.doc_string = g.doc_string;
    for t in &g.initializer {
        if t.data_location == Some(pb::tensor_proto::DataLocation::External as i32) {
            *external = true;
        }
        let tensor = tensor_from_proto_mapped(t, dir, maps)?;
        graph.initializers.insert(t.name.clone(), tensor);
    }
    for i in g.input {
        // Old exporters (IR < 4) list initializers as inputs too: those are weights.
        if !graph.initializers.contains_key(&i.name) {
            graph.inputs.push(value_info_from_proto(&i)?);
        }
    }
    for o in g.output {
        graph.outputs.push(value_info_from_proto(&o)?);
    }
    for v in g.value_info {
        let info = value_info_from_proto(&v)?;
        graph.value_info.insert(info.name.clone(), info);
    }
    let mut names = HashSet::new();
    for (i, n) in g.node.into_iter().enumerate() {
        let mut name = if n.name.is_empty() {
            format!("{}_{i}", n.op_type)
        } else {
            n.name
        };
        // Node names should be unique; make them so, since the IR refers to nodes by name.
        if !names.insert(name.clone()) {
            name = format!("{name}__{i}");
            names.insert(name.clone());
        }
        let node = Node {
            name,
            op_type: n.op_type,
            domain: n.domain,
            inputs: n.input,
            outputs: n.output,
            attributes: n.attribute,
            doc_string: n.doc_string,
        };
        graph.add_node(node)?;
    }
    graph.sparse_initializers = g.sparse_initializer;
    graph.quantization_annotation = g.quantization_annotation;
    graph.validate()?;
    Ok(graph)
}

fn value_info_from_proto(v: &pb::ValueInfoProto) -> Result<ValueInfo> {
    let mut info = ValueInfo {
        name: v.name.clone(),
        doc_string: v.doc_string.clone(),
        ..Default::default()
    };
    if let Some(pb::TypeProto {
        value: Some(pb::type_proto::Value::TensorType(t)),
        ..
    }) = &v.r#type
    {
        if t.elem_type != 0 {
            info.dtype =
                Some(
                    DType::from_onnx(t.elem_type).ok_or_else(|| Error::UnsupportedDType {
                        tensor: v.name.clone(),
                        code: t.elem_type,
                    })?,
                );
        }
        if let Some(shape) = &t.shape {
            info.shape = Some(
                shape
                    .dim
                    .iter()
                    .map(|d| match &d.value {
                        Some(pb::tensor_shape_proto::dimension::Value::DimValue(v)) => {
                            Dim::Known(*v)
                        }
                        Some(pb::tensor_shape_proto::dimension::Value::DimParam(p)) => {
                            Dim::Symbol(p.clone())
                        }
                        None => Dim::Unknown,
                    })
                    .collect(),
            );
        }
    }
    Ok(info)
}

/// Reads a `TensorProto`: raw_data, the typed fields, or external data.
pub fn tensor_from_proto(t: &pb::TensorProto, dir: Option<&Path>) -> Result<Tensor> {
    tensor_from_proto_mapped(t, dir, &mut FileMaps::default())
}

/// [`tensor_from_proto`], with external data as views of files mapped once in `maps`.
fn tensor_from_proto_mapped(
    t: &pb::TensorProto,
    dir: Option<&Path>,
    maps: &mut FileMaps,
) -> Result<Tensor> {
    let dtype = DType::from_onnx(t.data_type).ok_or_else(|| Error::UnsupportedDType {
        tensor: t.name.clone(),
        code: t.data_type,
    })?;
    let shape: Vec<usize> = t
        .dims
        .iter()
        .map(|&d| {
            usize::try_from(d)
                .map_err(|_| Error::invalid(format!("tensor '{}': negative dimension {d}", t.name)))
        })
        .collect::<Result<_>>()?;
    let bad =
        |what: String| Error::invalid(format!("tensor '{}' ({dtype}{shape:?}): {what}", t.name));
    // Refused before anything is allocated: a declared shape whose element count
    // overflows cannot be real, whatever data follows.
    let numel = crate::ir::tensor::checked_numel(&shape)
        .ok_or_else(|| bad("its element count overflows".into()))?;
    if dtype == DType::String {
        if t.string_data.len() != numel {
            return Err(bad(format!(
                "{} strings for {numel} elements",
                t.string_data.len()
            )));
        }
        return Ok(Tensor {
            dtype,
            shape,
            data: Bytes::default(),
            strings: t.string_data.clone(),
        });
    }
    let want = dtype
        .checked_storage_bytes(numel)
        .ok_or_else(|| bad("its element count overflows".into()))?;
    let data: Bytes = if t.data_location == Some(pb::tensor_proto::DataLocation::External as i32) {
        map_external(t, dir, want, maps)?
    } else if !t.raw_data.is_empty() {
        t.raw_data.clone().into()
    } else {
        typed_field_bytes(t, dtype).into()
    };
    if data.len() != want {
        return Err(bad(format!(
            "holds {} bytes of data, {want} expected",
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

/// Converts the typed `*_data` fields to the raw little-endian layout.
fn typed_field_bytes(t: &pb::TensorProto, dtype: DType) -> Vec<u8> {
    use DType::*;
    let mut out = vec![];
    match dtype {
        F32 => t
            .float_data
            .iter()
            .for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
        F64 => t
            .double_data
            .iter()
            .for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
        I64 => t
            .int64_data
            .iter()
            .for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
        U32 => t
            .uint64_data
            .iter()
            .for_each(|&v| out.extend_from_slice(&(v as u32).to_le_bytes())),
        U64 => t
            .uint64_data
            .iter()
            .for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
        I32 => t
            .int32_data
            .iter()
            .for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
        // 16-bit types (f16/bf16 as bit patterns) sit in the low half of int32_data.
        I16 | U16 | F16 | BF16 => t
            .int32_data
            .iter()
            .for_each(|&v| out.extend_from_slice(&(v as u16).to_le_bytes())),
        // 8-bit types and packed 4-bit pairs: one byte per int32 element.
        I8 | U8 | Bool | F8E4M3FN | F8E4M3FNUZ | F8E5M2 | F8E5M2FNUZ | I4 | U4 => {
            t.int32_data.iter().for_each(|&v| out.push(v as u8))
        }
        String => {}
    }
    out
}

fn external_entry<'a>(t: &'a pb::TensorProto, key: &str) -> Option<&'a str> {
    t.external_data
        .iter()
        .find(|e| e.key == key)
        .map(|e| e.value.as_str())
}

/// The external data of `t` as a view of its (memory-mapped) file: no copy is made, and
/// pages are read from disk when a pass touches them.
fn map_external(
    t: &pb::TensorProto,
    dir: Option<&Path>,
    want: usize,
    maps: &mut FileMaps,
) -> Result<Bytes> {
    let location = external_entry(t, "location").ok_or_else(|| {
        Error::invalid(format!(
            "tensor '{}' is external but names no location",
            t.name
        ))
    })?;
    // The runtime's rules, so that a model the compiler reads is one the runtime loads:
    // a relative path without `..` that stays inside the model's folder once symbolic
    // links are resolved.
    let path = tfmqc_runtime::engine::external_data_path(dir, location, &t.name)
        .map_err(Error::invalid)?;
    let parse = |k: &str| -> Result<Option<u64>> {
        external_entry(t, k)
            .map(|v| {
                v.parse::<u64>().map_err(|_| {
                    Error::invalid(format!(
                        "tensor '{}': external data {k} '{v}' is not a number",
                        t.name
                    ))
                })
            })
            .transpose()
    };
    let offset = parse("offset")?.unwrap_or(0);
    let length = parse("length")?.unwrap_or(want as u64);
    if length != want as u64 {
        return Err(Error::invalid(format!(
            "tensor '{}': external data length {length} does not match its {want} bytes",
            t.name
        )));
    }
    let map = maps.map(&path).map_err(|e| Error::io(&path, e))?;
    let end = offset.checked_add(length);
    if end.is_none_or(|end| end > map.len() as u64) {
        return Err(Error::invalid(format!(
            "tensor '{}': cannot read {length} bytes at offset {offset} of {} ({} bytes long)",
            t.name,
            path.display(),
            map.len()
        )));
    }
    // external_data_path returned the canonical path.
    let file = path;
    Ok(Bytes::mapped(
        map,
        FileSpan {
            file: std::sync::Arc::new(file),
            offset: offset as usize,
            len: length as usize,
        },
    ))
}

// ----- export ------------------------------------------------------------------------

/// Where tensors go when a model becomes a proto.
enum TensorSink<'a> {
    Inline,
    /// Streamed into a data file being written, referenced from the model as `location`.
    External {
        location: &'a str,
        out: &'a mut dyn Write,
        written: u64,
        error: Option<std::io::Error>,
    },
    /// Views of external-data files stay references to them (for handing a model to
    /// tract without copying its weights); other tensors go inline. All references point
    /// into `dir`, the folder of the first mapped tensor met; a view of a file elsewhere
    /// goes inline.
    Reference {
        dir: Option<PathBuf>,
    },
}

fn external_entries(location: &str, offset: u64, len: usize) -> Vec<pb::StringStringEntryProto> {
    let entry = |k: &str, v: String| pb::StringStringEntryProto {
        key: k.into(),
        value: v,
    };
    vec![
        entry("location", location.to_string()),
        entry("offset", offset.to_string()),
        entry("length", len.to_string()),
    ]
}

fn tensor_to_proto(name: &str, t: &Tensor, sink: &mut TensorSink) -> pb::TensorProto {
    let mut p = pb::TensorProto {
        name: name.to_string(),
        data_type: t.dtype.onnx_code(),
        dims: t.shape.iter().map(|&d| d as i64).collect(),
        ..Default::default()
    };
    if t.dtype == DType::String {
        p.string_data = t.strings.clone();
        return p;
    }
    let external = pb::tensor_proto::DataLocation::External as i32;
    match sink {
        TensorSink::External {
            location,
            out,
            written,
            error,
        } if t.data.len() >= EXTERNAL_THRESHOLD => {
            // Align each tensor to 64 bytes so runtimes can map it directly.
            let pad = (64 - (*written % 64)) % 64;
            if error.is_none() {
                let r = out
                    .write_all(&[0u8; 64][..pad as usize])
                    .and_then(|_| out.write_all(&t.data));
                if let Err(e) = r {
                    *error = Some(e);
                }
            }
            let offset = *written + pad;
            *written = offset + t.data.len() as u64;
            p.data_location = Some(external);
            p.external_data = external_entries(location, offset, t.data.len());
            // The pages were read to be written: they need not stay resident.
            t.data.release_pages();
        }
        TensorSink::Reference { dir } => match t.data.file_span() {
            Some(span)
                if span.file.parent().is_some()
                    && dir.as_deref().is_none_or(|d| Some(d) == span.file.parent()) =>
            {
                let parent = span.file.parent().expect("checked").to_path_buf();
                let location = span
                    .file
                    .file_name()
                    .map(|f| f.to_string_lossy().to_string())
                    .unwrap_or_default();
                *dir = Some(parent);
                p.data_location = Some(external);
                p.external_data = external_entries(&location, span.offset as u64, span.len);
            }
            _ => p.raw_data = t.data.to_vec(),
        },
        _ => p.raw_data = t.data.to_vec(),
    }
    p
}

pub fn tensor_to_onnx(name: &str, t: &Tensor) -> pb::TensorProto {
    tensor_to_proto(name, t, &mut TensorSink::Inline)
}

fn value_info_to_proto(v: &ValueInfo) -> pb::ValueInfoProto {
    use pb::tensor_shape_proto::{dimension::Value as DV, Dimension};
    let shape = v.shape.as_ref().map(|dims| pb::TensorShapeProto {
        dim: dims
            .iter()
            .map(|d| Dimension {
                denotation: String::new(),
                value: match d {
                    Dim::Known(k) => Some(DV::DimValue(*k)),
                    Dim::Symbol(s) => Some(DV::DimParam(s.clone())),
                    Dim::Unknown => None,
                },
            })
            .collect(),
    });
    pb::ValueInfoProto {
        name: v.name.clone(),
        doc_string: v.doc_string.clone(),
        r#type: Some(pb::TypeProto {
            denotation: String::new(),
            value: Some(pb::type_proto::Value::TensorType(pb::type_proto::Tensor {
                elem_type: v.dtype.map(DType::onnx_code).unwrap_or(0),
                shape,
            })),
        }),
    }
}

fn graph_to_proto(g: &Graph, sink: &mut TensorSink) -> Result<pb::GraphProto> {
    let order = g.topo_order()?;
    let outputs: HashSet<&str> = g.outputs.iter().map(|o| o.name.as_str()).collect();
    let mut value_info = vec![];
    let mut node = vec![];
    for ix in order {
        let n = g.node(ix);
        for o in &n.outputs {
            if let Some(v) = g.value_info.get(o) {
                if !outputs.contains(o.as_str()) {
                    value_info.push(value_info_to_proto(v));
                }
            }
        }
        node.push(pb::NodeProto {
            input: n.inputs.clone(),
            output: n.outputs.clone(),
            name: n.name.clone(),
            op_type: n.op_type.clone(),
            domain: n.domain.clone(),
            attribute: n.attributes.clone(),
            doc_string: n.doc_string.clone(),
        });
    }
    Ok(pb::GraphProto {
        node,
        name: g.name.clone(),
        initializer: g
            .initializers
            .iter()
            .map(|(k, t)| tensor_to_proto(k, t, sink))
            .collect(),
        sparse_initializer: g.sparse_initializers.clone(),
        doc_string: g.doc_string.clone(),
        input: g.inputs.iter().map(value_info_to_proto).collect(),
        output: g.outputs.iter().map(value_info_to_proto).collect(),
        value_info,
        quantization_annotation: g.quantization_annotation.clone(),
    })
}

fn model_to_proto(m: &Model, sink: &mut TensorSink) -> Result<pb::ModelProto> {
    Ok(pb::ModelProto {
        ir_version: m.ir_version,
        opset_import: m
            .opsets
            .iter()
            .map(|(d, v)| pb::OperatorSetIdProto {
                domain: d.clone(),
                version: *v,
            })
            .collect(),
        producer_name: m.producer_name.clone(),
        producer_version: m.producer_version.clone(),
        domain: m.domain.clone(),
        model_version: m.model_version,
        doc_string: m.doc_string.clone(),
        graph: Some(graph_to_proto(&m.graph, sink)?),
        metadata_props: m
            .metadata
            .iter()
            .map(|(k, v)| pb::StringStringEntryProto {
                key: k.clone(),
                value: v.clone(),
            })
            .collect(),
        training_info: m.training_info.clone(),
        functions: m.functions.clone(),
    })
}

/// The model as ONNX bytes with every tensor inline (for in-memory execution).
pub fn encode(m: &Model) -> Result<Vec<u8>> {
    Ok(model_to_proto(m, &mut TensorSink::Inline)?.encode_to_vec())
}

/// The model as a protobuf message with every tensor inline.
pub fn to_proto(m: &Model) -> Result<pb::ModelProto> {
    model_to_proto(m, &mut TensorSink::Inline)
}

/// The model as a protobuf message for an engine in this process: tensors that are views
/// of an external-data file stay references to it (no copy of an SD-class model's
/// weights), the others are inline. Returns the folder the references are relative to
/// (`None`: everything is inline), which the engine must be given.
pub fn to_engine_proto(m: &Model) -> Result<(pb::ModelProto, Option<PathBuf>)> {
    let mut sink = TensorSink::Reference { dir: None };
    let proto = model_to_proto(m, &mut sink)?;
    let TensorSink::Reference { dir } = sink else {
        unreachable!("the sink stays a Reference")
    };
    Ok((proto, dir))
}

/// The model as a protobuf message for tract's type analysis only: initializers over
/// `max_const_bytes` become graph inputs of the same type and shape. Analysis needs their
/// shapes, not their values; an SD-class model's 3.4 GB of weights are then never loaded
/// to learn the types of its values (what `tfmqc inspect` and `canonicalize` ask).
pub fn to_analysis_proto(m: &Model, max_const_bytes: usize) -> Result<pb::ModelProto> {
    // Cheap: tensors share their bytes.
    let mut slim = m.clone();
    let big: Vec<String> = slim
        .graph
        .initializers
        .iter()
        .filter(|(_, t)| t.byte_len() > max_const_bytes)
        .map(|(k, _)| k.clone())
        .collect();
    for name in big {
        let t = slim.graph.initializers.remove(&name).expect("listed");
        slim.graph.inputs.push(ValueInfo::new(
            name,
            t.dtype,
            t.shape.iter().map(|&d| Dim::Known(d as i64)).collect(),
        ));
    }
    to_proto(&slim)
}

/// Writes the model to `path` atomically. Tensors go to `<file name>.data` beside it when
/// the source used external data or when they are too large to inline; that file is
/// streamed (never held in memory whole) and renamed into place before the model file.
/// Returns the bytes written (both files).
pub fn save(m: &Model, path: &Path) -> Result<u64> {
    let (_, bytes) = m.graph.parameter_stats();
    let external = m.external_data || bytes > INLINE_LIMIT;
    let file_name = path
        .file_name()
        .ok_or_else(|| Error::invalid(format!("{}: not a file path", path.display())))?
        .to_string_lossy()
        .to_string();
    if !external {
        let buf = encode(m)?;
        write_atomic(path, &buf)?;
        return Ok(buf.len() as u64);
    }
    let location = format!("{file_name}.data");
    let mut data_bytes = 0;
    let data_path = path.with_file_name(&location);
    let mut proto = None;
    // Data first: the model file must never point at a data file that is not there yet.
    write_atomic_with(&data_path, &mut |out| {
        let mut sink = TensorSink::External {
            location: &location,
            out,
            written: 0,
            error: None,
        };
        let p = model_to_proto(m, &mut sink).map_err(std::io::Error::other)?;
        match sink {
            TensorSink::External { error: Some(e), .. } => return Err(e),
            TensorSink::External { written, .. } => data_bytes = written,
            _ => {}
        }
        proto = Some(p);
        Ok(())
    })?;
    let bytes = proto.expect("written").encode_to_vec();
    write_atomic(path, &bytes)?;
    Ok(bytes.len() as u64 + data_bytes)
}

/// A model written into a staging folder beside its output path, not yet in place: the
/// compiler evaluates the file as it will ship (loaded back, its weights mapped from the
/// staged data file instead of held in memory), then [`Staged::commit`] renames it into
/// place, data file first. Dropped uncommitted (an error on the way), the staging folder
/// goes and the output path is untouched.
pub struct Staged {
    dir: PathBuf,
    model: PathBuf,
    target: PathBuf,
    bytes: u64,
    committed: bool,
}

/// Writes `m` as [`save`] would write it to `path`, into a staging folder beside `path`.
pub fn stage(m: &Model, path: &Path) -> Result<Staged> {
    let file_name = path
        .file_name()
        .ok_or_else(|| Error::invalid(format!("{}: not a file path", path.display())))?;
    let parent = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let dir = parent.join(format!(
        ".{}.staging-{}",
        file_name.to_string_lossy(),
        std::process::id()
    ));
    if !parent.is_dir() {
        return Err(Error::io(
            path,
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "the output folder does not exist",
            ),
        ));
    }
    // A folder left by a killed run of the same process id is stale.
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir(&dir).map_err(|e| Error::io(&dir, e))?;
    let mut staged = Staged {
        model: dir.join(file_name),
        dir,
        target: path.to_path_buf(),
        bytes: 0,
        committed: false,
    };
    staged.bytes = save(m, &staged.model)?;
    Ok(staged)
}

impl Staged {
    /// The staged model file (its data file, if any, beside it under its final name).
    pub fn path(&self) -> &Path {
        &self.model
    }

    /// Bytes written (model and data file).
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Moves the staged files to the output path: the data file first, so the model file
    /// never points at a data file that is not there yet.
    pub fn commit(mut self) -> Result<()> {
        let data_name = format!(
            "{}.data",
            self.model.file_name().expect("staged").to_string_lossy()
        );
        let data = self.dir.join(&data_name);
        if data.exists() {
            let to = self.target.with_file_name(&data_name);
            std::fs::rename(&data, &to).map_err(|e| Error::io(&to, e))?;
        }
        std::fs::rename(&self.model, &self.target).map_err(|e| Error::io(&self.target, e))?;
        self.committed = true;
        let _ = std::fs::remove_dir_all(&self.dir);
        Ok(())
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Bytes of a model as stored: its file and the external-data files its tensors are views
/// of (each counted once).
pub fn stored_bytes(m: &Model, path: &Path) -> u64 {
    let mut files: Vec<&Path> = m
        .graph
        .initializers
        .values()
        .filter_map(|t| t.data.file_span().map(|s| s.file.as_path()))
        .collect();
    files.sort();
    files.dedup();
    std::iter::once(path)
        .chain(files)
        .filter_map(|p| std::fs::metadata(p).ok())
        .map(|m| m.len())
        .sum()
}

/// Writes `bytes` to a temporary file beside `path`, then renames it into place.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic_with(path, &mut |out| out.write_all(bytes))
}

/// Streams `write` into a temporary file beside `path`, then renames it into place; on
/// any failure the temporary file is removed and `path` is untouched.
pub fn write_atomic_with(
    path: &Path,
    write: &mut dyn FnMut(&mut dyn Write) -> std::io::Result<()>,
) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    if !dir.is_dir() {
        return Err(Error::io(
            path,
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "the output folder does not exist",
            ),
        ));
    }
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        path.file_name()
            .map(|f| f.to_string_lossy())
            .unwrap_or_default(),
        std::process::id()
    ));
    let result = (|| {
        let f = std::fs::File::create(&tmp)?;
        let mut out = std::io::BufWriter::with_capacity(1 << 20, f);
        write(&mut out)?;
        let f = out.into_inner().map_err(|e| e.into_error())?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::io(path, e));
    }
    Ok(())
}

/// Protobuf bytes of a model message (for tools and tests building raw protos).
pub fn encode_proto(p: &pb::ModelProto) -> Vec<u8> {
    p.encode_to_vec()
}
