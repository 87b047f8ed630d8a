//! The compiler's bridge to the runtime crate: IR tensors ⇄ tract tensors, and running
//! (parts of) an IR model. Everything the compiler executes goes through here, so there
//! is one execution path shared with the runtime.

use std::collections::HashMap;

use tfmqc_runtime::engine::{Engine, Optimize};
use tfmqc_runtime::Tensor as TractTensor;
use tract_onnx::prelude::{DatumType, TDim};

use crate::error::{Error, Result};
use crate::ir::{DType, Dim, Model, Tensor};

pub fn dtype_to_tract(d: DType) -> Option<DatumType> {
    Some(match d {
        DType::F32 => DatumType::F32,
        DType::F64 => DatumType::F64,
        DType::F16 => DatumType::F16,
        DType::I64 => DatumType::I64,
        DType::I32 => DatumType::I32,
        DType::I16 => DatumType::I16,
        DType::I8 => DatumType::I8,
        DType::U8 => DatumType::U8,
        DType::U16 => DatumType::U16,
        DType::U32 => DatumType::U32,
        DType::U64 => DatumType::U64,
        DType::Bool => DatumType::Bool,
        _ => return None,
    })
}

/// tract's type for an ONNX value; tract computes shapes as `TDim`, ONNX has int64.
pub fn dtype_from_tract(d: DatumType) -> Option<DType> {
    Some(match d {
        DatumType::F32 => DType::F32,
        DatumType::F64 => DType::F64,
        DatumType::F16 => DType::F16,
        DatumType::I64 | DatumType::TDim => DType::I64,
        DatumType::I32 => DType::I32,
        DatumType::I16 => DType::I16,
        DatumType::I8 | DatumType::QI8(_) => DType::I8,
        DatumType::U8 | DatumType::QU8(_) => DType::U8,
        DatumType::U16 => DType::U16,
        DatumType::U32 => DType::U32,
        DatumType::U64 => DType::U64,
        DatumType::Bool => DType::Bool,
        DatumType::String => DType::String,
        _ => return None,
    })
}

pub fn dim_from_tract(d: &TDim) -> Dim {
    match d.to_i64() {
        Ok(v) => Dim::Known(v),
        Err(_) => Dim::Symbol(d.to_string()),
    }
}

pub fn to_tract(t: &Tensor) -> Result<TractTensor> {
    let dt = dtype_to_tract(t.dtype)
        .ok_or_else(|| Error::invalid(format!("{} tensors cannot be executed", t.dtype)))?;
    // SAFETY: `t.data` holds exactly numel × size_of(dt) little-endian bytes (checked
    // when the IR tensor was made), which is tract's in-memory layout on our targets.
    unsafe { TractTensor::from_raw_dt(dt, &t.shape, &t.data) }
        .map_err(|e| Error::Engine(format!("making a tensor: {e}")))
}

pub fn from_tract(t: &TractTensor) -> Result<Tensor> {
    if t.datum_type() == DatumType::TDim {
        let cast = t
            .cast_to::<i64>()
            .map_err(|e| Error::Engine(format!("symbolic value: {e}")))?;
        return from_tract(&cast);
    }
    let dtype = dtype_from_tract(t.datum_type())
        .ok_or_else(|| Error::Engine(format!("unsupported tract type {:?}", t.datum_type())))?;
    if dtype == DType::String {
        return Err(Error::Engine("string tensors are not converted".into()));
    }
    Tensor::from_raw(dtype, t.shape().to_vec(), t.as_bytes().to_vec())
}

/// Initializers above this size are shapes only for type analysis ([`value_facts`]).
pub const ANALYSIS_CONST_BYTES: usize = 1 << 20;

/// tract's facts (type, shape, constant value) of every value of `model`. Large weights
/// are given to the analysis as typed inputs, not values (see
/// [`crate::ir::onnx::to_analysis_proto`]): nothing derived from them is constant here.
pub fn value_facts(model: &Model) -> Result<HashMap<String, tfmqc_runtime::ValueFact>> {
    let proto = crate::ir::onnx::to_analysis_proto(model, ANALYSIS_CONST_BYTES)?;
    // A model asking for a constant beyond the limit is the user's (exit 1); what tract
    // cannot analyse after that is ours.
    tfmqc_runtime::limits::check_constant_sizes(&proto, "")?;
    tfmqc_runtime::engine::value_facts(&proto).map_err(|e| Error::Engine(e.to_string()))
}

/// A compiled IR model (or a cut of it) ready to run many times.
pub struct Runner {
    engine: Engine,
}

impl Runner {
    /// Compiles `model`; `outputs` selects intermediate values to return instead of the
    /// graph outputs. Weights that are views of an external-data file are handed to tract
    /// by reference (it reads them from the file), not copied into the proto first.
    pub fn new(model: &Model, outputs: Option<&[String]>, optimize: Optimize) -> Result<Runner> {
        let (proto, dir) = crate::ir::onnx::to_engine_proto(model)?;
        let dir = dir.map(|d| d.to_string_lossy().to_string());
        let engine = Engine::from_proto(&proto, dir.as_deref(), outputs, optimize)
            .map_err(|e| Error::Engine(e.to_string()))?;
        Ok(Runner { engine })
    }

    /// Compiles `model` to return its graph outputs and show the values `observe` to the
    /// observer of [`Runner::run_observed`] while it runs (streaming statistics: no
    /// intermediate value outlives its last consumer).
    pub fn observing(model: &Model, observe: &[String], optimize: Optimize) -> Result<Runner> {
        let (proto, dir) = crate::ir::onnx::to_engine_proto(model)?;
        let dir = dir.map(|d| d.to_string_lossy().to_string());
        let engine = Engine::from_proto_observing(&proto, dir.as_deref(), observe, optimize)
            .map_err(|e| Error::Engine(e.to_string()))?;
        Ok(Runner { engine })
    }

    /// Compiles a quantized `model` as the runtime ships it: quantized convolutions,
    /// Gemms and MatMuls on the int8 kernels with their weights resident as int8 (tract
    /// would otherwise keep every weight dequantized to f32: 4x the bytes).
    pub fn int8(model: &Model, outputs: Option<&[String]>, optimize: Optimize) -> Result<Runner> {
        let (proto, dir) = crate::ir::onnx::to_engine_proto(model)?;
        let dir = dir.map(|d| d.to_string_lossy().to_string());
        let (engine, _) = Engine::from_owned_proto_int8(proto, dir.as_deref(), outputs, optimize)
            .map_err(|e| Error::Engine(e.to_string()))?;
        Ok(Runner { engine })
    }

    pub fn input_names(&self) -> &[String] {
        self.engine.input_names()
    }

    pub fn run(&self, inputs: &HashMap<String, Tensor>) -> Result<Vec<Tensor>> {
        let ordered = self.ordered(inputs)?;
        let out = self
            .engine
            .run(ordered)
            .map_err(|e| Error::Engine(e.to_string()))?;
        out.iter().map(from_tract).collect()
    }

    /// Runs and calls `observer(k, value)` for the `k`-th observed value as soon as it is
    /// computed (see [`Runner::observing`]); returns the graph outputs.
    pub fn run_observed(
        &self,
        inputs: &HashMap<String, Tensor>,
        observer: &mut dyn FnMut(usize, &TractTensor) -> Result<()>,
    ) -> Result<Vec<Tensor>> {
        let ordered = self.ordered(inputs)?;
        // The runtime's error type carries the observer's failure through tract.
        let mut failure: Option<Error> = None;
        let out = self.engine.run_observing(ordered, &mut |k, v| {
            observer(k, v).map_err(|e| {
                let msg = e.to_string();
                failure = Some(e);
                tfmqc_runtime::Error::Execution(msg)
            })
        });
        if let Some(e) = failure {
            return Err(e);
        }
        let out = out.map_err(|e| Error::Engine(e.to_string()))?;
        out.iter().map(from_tract).collect()
    }

    fn ordered(&self, inputs: &HashMap<String, Tensor>) -> Result<Vec<TractTensor>> {
        self.engine
            .input_names()
            .iter()
            .map(|n| {
                inputs
                    .get(n)
                    .ok_or_else(|| Error::invalid(format!("input '{n}' was not given")))
                    .and_then(to_tract)
            })
            .collect()
    }
}

/// The values of an f32 tensor of tract's, or an error naming `what`.
pub fn f32_values<'t>(t: &'t TractTensor, what: &str) -> Result<&'t [f32]> {
    t.try_as_plain_ram()
        .and_then(|v| v.as_slice::<f32>())
        .map_err(|_| Error::Engine(format!("'{what}' is {:?}, not f32", t.datum_type())))
}
