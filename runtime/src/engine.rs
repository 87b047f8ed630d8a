//! Running ONNX graphs with tract: the one execution path of tfmqc. The compiler uses it
//! to evaluate the time-embedding block and to calibrate; applications use it (through
//! `Denoiser`) to run the quantized model.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use tract_onnx::pb;
use tract_onnx::prelude::*;
use tract_onnx::tract_hir::infer::{Factoid, InferenceModelExt};

use crate::classify::ConstKind;
use crate::error::{Error, Result};
use crate::shape_plans::{ShapePlan, ShapePlans};

/// How much of tract's optimizer to run before executing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Optimize {
    /// Decluttered only: quick to build, for graphs run a few times.
    Declutter,
    /// Full codegen: slower to build, fastest to run.
    Full,
    /// [`Optimize::Full`], and for a model on the int8 kernels whose inputs have symbolic
    /// dims (a batch `N`), a plan per set of concrete values the calls bring
    /// ([`Engine::shape_plans`]): what the runtime's `Denoiser` runs. Not the compiler's
    /// default: a float op left in the model may round differently in a plan made for a
    /// number (tract picks another kernel at batch 1), and the compiler's decisions and
    /// snapshots are made on the generic plan.
    PerShape,
}

/// A loaded, runnable graph.
///
/// A model whose inputs have symbolic dims (a batch `N`) gets, besides the plan for its
/// symbolic shapes made at load, a plan per set of concrete values the calls bring
/// (made on the first such call, a few kept): see [`Engine::shape_plans`].
pub struct Engine {
    /// The plan for the model's declared shapes, symbols and all.
    plan: Arc<TypedSimplePlan>,
    /// Plans for concrete values of the inputs' symbols; `None` for models without
    /// symbolic dims, observing engines and decluttered-only ones (see `per_shape_plans`).
    shape_plans: Option<ShapePlans>,
    int8_weights: (usize, usize),
    resident: ResidentBytes,
    input_names: Vec<String>,
    output_names: Vec<String>,
    /// Values shown to [`Engine::run_observing`]'s observer: the plan's outlet of each,
    /// with the indices (into the names given at build time) it stands for.
    observed: HashMap<OutletId, Vec<usize>>,
    /// Observed values tract found constant: the plan seeds them instead of computing
    /// them, so the observer is shown them at the start of every run.
    observed_consts: Vec<(usize, Arc<Tensor>)>,
    /// Whether the model was lowered to the int8 ops (see [`Engine::threading`]).
    int8: bool,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Engine(inputs {:?}, outputs {:?})",
            self.input_names, self.output_names
        )
    }
}

fn engine_err(context: &str, e: impl std::fmt::Display) -> Error {
    Error::Engine(format!("{context}: {e:#}"))
}

/// Reads an ONNX file (external data resolved beside it).
pub fn read_proto(path: &Path) -> Result<pb::ModelProto> {
    let bytes = std::fs::read(path).map_err(|e| Error::Io {
        path: path.to_path_buf(),
        source: e,
    })?;
    decode_proto(&bytes).map_err(|e| match e {
        Error::InvalidModel(m) => Error::InvalidModel(format!("{}: {m}", path.display())),
        e => e,
    })
}

/// Where the external data `location` of tensor `tensor` of a model in `model_dir` lives,
/// canonical; an error naming the tensor unless it is a relative path without `..`
/// that stays inside the model's folder once symbolic links are resolved (the rule of
/// every reader of external data: the int8 lowering, the compiler's importer).
pub fn external_data_path(
    model_dir: Option<&Path>,
    location: &str,
    tensor: &str,
) -> std::result::Result<std::path::PathBuf, String> {
    crate::tensor_data::data_path(model_dir, location, tensor)
}

pub fn decode_proto(bytes: &[u8]) -> Result<pb::ModelProto> {
    use tract_onnx::tract_core::prelude::Framework;
    crate::limits::check_protobuf_size(bytes)
        .map_err(|e| Error::InvalidModel(format!("not a valid ONNX model: {e}")))?;
    tract_onnx::onnx()
        .proto_model_for_read(&mut &bytes[..])
        .map_err(|e| Error::InvalidModel(format!("not a valid ONNX model: {e:#}")))
}

impl Engine {
    /// Loads a model file. `outputs`: value names to return instead of the graph outputs.
    pub fn load(path: &Path, outputs: Option<&[String]>, optimize: Optimize) -> Result<Engine> {
        let mut proto = read_proto(path)?;
        // Widened here, in the proto we own, so `build` need not copy the model.
        crate::int4::widen_int4_initializers(&mut proto, path.parent())
            .map_err(Error::InvalidModel)?;
        let dir = path.parent().map(|d| d.to_string_lossy().to_string());
        Engine::from_proto(&proto, dir.as_deref(), outputs, optimize)
    }

    /// Builds from a decoded model. `model_dir` is where external data is looked up.
    pub fn from_proto(
        proto: &pb::ModelProto,
        model_dir: Option<&str>,
        outputs: Option<&[String]>,
        optimize: Optimize,
    ) -> Result<Engine> {
        Engine::build(proto, model_dir, outputs, &[], optimize, false)
    }

    /// Like [`Engine::from_proto`], with the intermediate values `observe` shown to an
    /// observer while the plan runs ([`Engine::run_observing`]). They are kept whole
    /// through optimization (tract treats them as outputs while it optimizes, so no
    /// fusion hides them) but are not outputs of the plan: each is freed as soon as its
    /// last consumer has run, as in a plain run. Statistics over every activation of an
    /// SD-class UNet are gathered this way in the memory of one forward pass.
    pub fn from_proto_observing(
        proto: &pb::ModelProto,
        model_dir: Option<&str>,
        observe: &[String],
        optimize: Optimize,
    ) -> Result<Engine> {
        Engine::build(proto, model_dir, None, observe, optimize, false)
    }

    /// Like [`Engine::from_proto`], with quantized convolutions, Gemms and MatMuls (QDQ
    /// activation, int8 weights behind DequantizeLinear) and products of two quantized
    /// activations (attention's MatMul / Einsum) lowered to the project's int8 kernels
    /// ([`crate::lower`]). Returns the engine and how many nodes run in int8.
    ///
    /// The lowered model is built anew from the borrowed one: initializers that stay
    /// (float weights, tables) are copied, unless they are external data (then only
    /// their reference is). [`Engine::from_owned_proto_int8`] copies nothing.
    pub fn from_proto_int8(
        proto: &pb::ModelProto,
        model_dir: Option<&str>,
        outputs: Option<&[String]>,
        optimize: Optimize,
    ) -> Result<(Engine, usize)> {
        let (mut lowered, count) =
            crate::lower::lowered_int8(proto, model_dir.map(Path::new), outputs.unwrap_or(&[]))?;
        crate::int4::widen_int4_initializers(&mut lowered, model_dir.map(Path::new))
            .map_err(Error::InvalidModel)?;
        Ok((
            Engine::build(&lowered, model_dir, outputs, &[], optimize, true)?,
            count,
        ))
    }

    /// [`Engine::from_proto_int8`] of a model the caller gives away: it is lowered in
    /// place, weights move into the int8 nodes, and what only they read is dropped before
    /// tract sees the model.
    pub fn from_owned_proto_int8(
        mut proto: pb::ModelProto,
        model_dir: Option<&str>,
        outputs: Option<&[String]>,
        optimize: Optimize,
    ) -> Result<(Engine, usize)> {
        let count =
            crate::lower::lower_int8(&mut proto, model_dir.map(Path::new), outputs.unwrap_or(&[]))?;
        // In place here, so `build` need not copy the model.
        crate::int4::widen_int4_initializers(&mut proto, model_dir.map(Path::new))
            .map_err(Error::InvalidModel)?;
        Ok((
            Engine::build(&proto, model_dir, outputs, &[], optimize, true)?,
            count,
        ))
    }

    /// Loads a model file with its quantized convolutions, Gemms and MatMuls on the int8
    /// kernels.
    pub fn load_int8(path: &Path, optimize: Optimize) -> Result<(Engine, usize)> {
        let proto = read_proto(path)?;
        let dir = path.parent().map(|d| d.to_string_lossy().to_string());
        Engine::from_owned_proto_int8(proto, dir.as_deref(), None, optimize)
    }

    fn build(
        proto: &pb::ModelProto,
        model_dir: Option<&str>,
        outputs: Option<&[String]>,
        observe: &[String],
        optimize: Optimize,
        int8: bool,
    ) -> Result<Engine> {
        crate::limits::check_constant_sizes(proto, "")?;
        // tract cannot load 4-bit tensors: what it loads gets them widened to 8 bits (the
        // same values; a copy of the model only when it has some). The int8 ops' own
        // weights left the graph in the lowering and stay packed.
        let widened;
        let proto = if crate::int4::has_int4_initializers(proto) {
            let mut p = proto.clone();
            crate::int4::widen_int4_initializers(&mut p, model_dir.map(Path::new))
                .map_err(Error::InvalidModel)?;
            widened = p;
            &widened
        } else {
            proto
        };
        let mut framework = tract_onnx::onnx();
        if int8 {
            framework
                .op_register
                .insert(crate::ops::conv::QCONV, crate::ops::conv::build_qconv);
            framework
                .op_register
                .insert(crate::ops::gemm::QGEMM, crate::ops::gemm::build_qgemm);
            framework.op_register.insert(
                crate::ops::matmul::QMATMUL,
                crate::ops::matmul::build_qmatmul,
            );
            framework.op_register.insert(
                crate::ops::attention::QATTENTION,
                crate::ops::attention::build_qattention,
            );
            framework.op_register.insert(
                crate::ops::group_norm::GROUP_NORM,
                crate::ops::group_norm::build_group_norm,
            );
            framework.op_register.insert(
                crate::ops::conv_f32::CONV_F32,
                crate::ops::conv_f32::build_conv_f32,
            );
        }
        let parsed = framework
            .parse(proto, model_dir)
            .map_err(|e| Error::InvalidModel(format!("tract cannot load the model: {e:#}")))?;
        if !parsed.unresolved_inputs.is_empty() {
            return Err(Error::InvalidModel(format!(
                "values used but never defined: {:?}",
                parsed.unresolved_inputs
            )));
        }
        let mut model = parsed.model;
        let graph = proto.graph.as_ref().expect("parsed model has a graph");
        let initializers: std::collections::HashSet<&str> =
            graph.initializer.iter().map(|t| t.name.as_str()).collect();
        let input_names: Vec<String> = graph
            .input
            .iter()
            .filter(|i| !initializers.contains(i.name.as_str()))
            .map(|i| i.name.clone())
            .collect();
        let output_names: Vec<String> = match outputs {
            Some(names) => names.to_vec(),
            None => graph.output.iter().map(|o| o.name.clone()).collect(),
        };
        if outputs.is_some() || !observe.is_empty() {
            let mut outlets = vec![];
            for name in output_names.iter().chain(observe) {
                let outlet = parsed.outlets_by_name.get(name).ok_or_else(|| {
                    Error::InvalidModel(format!("no value named '{name}' in the model"))
                })?;
                outlets.push(*outlet);
            }
            model
                .select_output_outlets(&outlets)
                .map_err(|e| engine_err("selecting outputs", e))?;
        }
        let typed = model
            .into_typed()
            .map_err(|e| engine_err("typing the model", e))?;
        let mut typed = typed
            .into_decluttered()
            .map_err(|e| engine_err("optimizing the model", e))?;
        let shape_plans = if per_shape_plans(&typed, optimize, observe) {
            ShapePlans::new(typed.clone()).map_err(|e| engine_err("reading the inputs", e))?
        } else {
            None
        };
        if optimize != Optimize::Declutter {
            typed
                .optimize()
                .map_err(|e| engine_err("optimizing the model", e))?;
        }
        // Observed values were outputs while tract optimized (so they survive whole);
        // now they stop being outputs, so the plan frees them like any intermediate.
        let mut observed: HashMap<OutletId, Vec<usize>> = HashMap::new();
        let mut observed_consts = vec![];
        if !observe.is_empty() {
            let all = typed
                .output_outlets()
                .map_err(|e| engine_err("reading outputs", e))?
                .to_vec();
            let n = output_names.len();
            let mut outputs = all[..n].to_vec();
            let mut sunk = std::collections::HashSet::new();
            for (i, outlet) in all[n..].iter().enumerate() {
                let node = typed.node(outlet.node);
                if let Some(k) = node.op_as::<tract_onnx::tract_core::ops::konst::Const>() {
                    observed_consts.push((i, k.val().clone()));
                    continue;
                }
                observed.entry(*outlet).or_default().push(i);
                // A sink keeps the producer planned without keeping the value alive.
                if sunk.insert(*outlet) {
                    let name = format!("tfmqc.observe.{i}");
                    let sink = typed
                        .wire_node(name, crate::observe::ObserveSink, &[*outlet])
                        .map_err(|e| engine_err("observing a value", e))?;
                    outputs.push(sink[0]);
                }
            }
            typed
                .select_output_outlets(&outputs)
                .map_err(|e| engine_err("selecting outputs", e))?;
        }
        let mut int8_weights = (0, 0);
        let mut resident = ResidentBytes::default();
        let kinds = ConstKinds::of(proto);
        for node in typed.nodes() {
            let bytes = if let Some(op) = node.op_as::<crate::ops::conv::QConv>() {
                op.weight_bytes()
            } else if let Some(op) = node.op_as::<crate::ops::gemm::QGemm>() {
                op.weight_bytes()
            } else {
                if let Some(k) = node.op_as::<tract_onnx::tract_core::ops::konst::Const>() {
                    let v = k.val();
                    resident.add_const(
                        kinds.of_const(&node.name),
                        v.len() * v.datum_type().size_of(),
                    );
                }
                continue;
            };
            int8_weights.0 += bytes.0;
            int8_weights.1 += bytes.1;
        }
        resident.int8_weights = int8_weights.0;
        let plan = typed
            .into_runnable()
            .map_err(|e| engine_err("planning the model", e))?;
        Ok(Engine {
            plan,
            shape_plans,
            int8_weights,
            resident,
            input_names,
            output_names,
            observed,
            observed_consts,
            int8,
        })
    }

    /// Runs `f` (one call of a plan) under the caller's thread setting. An int8 engine's
    /// int8 ops split over the executor's threads, and tract's own ops (the float stem and
    /// head convs, element-wise ops) run on the calling thread: on the small models the
    /// rayon dispatch of those ops cost more than a second core saved (ddpm_digits at two
    /// threads: the two float convs' `OptMatMul` 0.06 → 0.19 ms a step), and on large ones
    /// the int8 ops are nearly all of the work.
    fn threading<R>(&self, f: impl FnOnce() -> R) -> R {
        if !self.int8 {
            return f();
        }
        let threads = crate::kernels::int8::par::threads();
        crate::kernels::int8::par::with_int8_threads(threads, || {
            tract_linalg::multithread::multithread_tract_scope(
                tract_linalg::multithread::Executor::SingleThread,
                f,
            )
        })
    }

    /// Weights of the nodes running on the int8 kernels: `(bytes resident in memory,
    /// bytes of the same weights in f32)`, both including scales / bias.
    pub fn int8_weight_bytes(&self) -> (usize, usize) {
        self.int8_weights
    }

    /// Bytes the planned model holds by kind of tensor ([`ResidentBytes`]).
    pub fn resident_bytes(&self) -> ResidentBytes {
        self.resident
    }

    pub fn input_names(&self) -> &[String] {
        &self.input_names
    }

    pub fn output_names(&self) -> &[String] {
        &self.output_names
    }

    /// The error of a call with as many inputs as the model does not take.
    fn check_input_count(&self, inputs: &[Tensor]) -> Result<()> {
        if inputs.len() == self.input_names.len() {
            return Ok(());
        }
        Err(Error::BadInput(format!(
            "{} inputs given, the model takes {} ({:?})",
            inputs.len(),
            self.input_names.len(),
            self.input_names
        )))
    }

    /// Runs with inputs in graph-input order.
    pub fn run(&self, inputs: Vec<Tensor>) -> Result<Vec<Tensor>> {
        self.check_input_count(&inputs)?;
        let plan = self.plan_for(&inputs);
        self.run_plan(&plan, inputs)
    }

    /// Like [`Engine::run`], always on the plan made at load for the model's declared
    /// (symbolic) shapes, never on one made for the inputs' concrete shapes: what a run was
    /// before there were plans per shape, to check that both give the same bits.
    pub fn run_generic(&self, inputs: Vec<Tensor>) -> Result<Vec<Tensor>> {
        self.check_input_count(&inputs)?;
        self.run_plan(&self.plan, inputs)
    }

    /// The plan for inputs of these shapes: one made for them when the model has
    /// symbolic dims (made now if this is the first call with them), else the one
    /// made at load.
    fn plan_for(&self, inputs: &[Tensor]) -> Arc<TypedSimplePlan> {
        self.shape_plans
            .as_ref()
            .and_then(|plans| {
                let shapes: Vec<&[usize]> = inputs.iter().map(|t| t.shape()).collect();
                plans.plan_for(&shapes)
            })
            .unwrap_or_else(|| self.plan.clone())
    }

    /// The sets of symbol values this engine has made plans for, most recently used
    /// first, with what each cost and, where making one failed, why (those calls run the
    /// plan for the symbolic shapes). Empty for models without symbolic dims.
    pub fn shape_plans(&self) -> Vec<ShapePlan> {
        self.shape_plans
            .as_ref()
            .map(ShapePlans::plans)
            .unwrap_or_default()
    }

    fn run_plan(&self, plan: &Arc<TypedSimplePlan>, inputs: Vec<Tensor>) -> Result<Vec<Tensor>> {
        let inputs: TVec<TValue> = inputs.into_iter().map(|t| t.into_tvalue()).collect();
        // tract panics on some invalid data instead of failing (an out-of-range Gather
        // index, which is how a folded model rejects a time step outside its set): the
        // caller gets an error either way.
        let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.threading(|| plan.run(inputs))
        }))
        .map_err(|panic| {
            let what = panic_message(panic.as_ref());
            Error::Execution(format!("tract stopped on invalid data: {what}"))
        })?
        .map_err(|e| Error::Execution(format!("{e:#}")))?;
        Ok(out
            .into_iter()
            .take(self.output_names.len())
            .map(|v| v.into_tensor())
            .collect())
    }

    /// Runs with inputs in graph-input order, calling `observer(k, value)` for each
    /// observed value (`k`: its index in the names given to
    /// [`Engine::from_proto_observing`]) as soon as the plan has computed it. The value is
    /// borrowed: the observer folds what it needs (ranges, sampled columns) and keeps
    /// nothing large. An observer error stops the run and is returned.
    pub fn run_observing(
        &self,
        inputs: Vec<Tensor>,
        observer: &mut dyn FnMut(usize, &Tensor) -> Result<()>,
    ) -> Result<Vec<Tensor>> {
        // The observed outlets are those of the load-time plan: an observing engine makes
        // no plans per shape (`per_shape_plans`).
        debug_assert!(self.observed.is_empty() || self.shape_plans.is_none());
        self.check_input_count(&inputs)?;
        for (k, value) in &self.observed_consts {
            observer(*k, value)?;
        }
        let inputs: TVec<TValue> = inputs.into_iter().map(|t| t.into_tvalue()).collect();
        let mut failure: Option<Error> = None;
        let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let mut state = self.plan.spawn()?;
            state.run_plan_with_eval(inputs, |ctx, op_state, node, input| {
                let out = tract_onnx::tract_core::plan::eval(ctx, op_state, node, input)?;
                for (slot, value) in out.iter().enumerate() {
                    if let Some(ks) = self.observed.get(&OutletId::new(node.id, slot)) {
                        for &k in ks {
                            if let Err(e) = observer(k, value) {
                                let msg = e.to_string();
                                failure = Some(e);
                                return Err(TractError::msg(msg));
                            }
                        }
                    }
                }
                Ok::<_, TractError>(out)
            })
        }))
        .map_err(|panic| {
            let what = panic_message(panic.as_ref());
            Error::Execution(format!("tract stopped on invalid data: {what}"))
        })?;
        if let Some(e) = failure {
            return Err(e);
        }
        let out = run.map_err(|e| Error::Execution(format!("{e:#}")))?;
        // The observation sinks' scalars follow the graph outputs.
        Ok(out
            .into_iter()
            .take(self.output_names.len())
            .map(|v| v.into_tensor())
            .collect())
    }

    /// Runs once with inputs in graph-input order and times every node of the plan:
    /// `(node name, op name, time)` in execution order. Where time goes inside one step,
    /// for `tfmqc bench --profile`.
    /// The plan is the one [`Engine::run`] would take for these inputs (made first if
    /// need be, outside the timing).
    pub fn profile(&self, inputs: Vec<Tensor>) -> Result<Vec<NodeTime>> {
        let plan = self.plan_for(&inputs);
        let inputs: TVec<TValue> = inputs.into_iter().map(|t| t.into_tvalue()).collect();
        let mut times = vec![];
        let mut state = plan
            .spawn()
            .map_err(|e| Error::Execution(format!("{e:#}")))?;
        self.threading(|| {
            state.run_plan_with_eval(inputs, |ctx, op_state, node, input| {
                let start = std::time::Instant::now();
                let out = tract_onnx::tract_core::plan::eval(ctx, op_state, node, input);
                times.push(NodeTime {
                    node: node.name.clone(),
                    op: node.op().name().to_string(),
                    time: start.elapsed(),
                });
                out
            })
        })
        .map_err(|e| Error::Execution(format!("{e:#}")))?;
        Ok(times)
    }

    /// Runs with inputs given by name.
    pub fn run_named(&self, inputs: &HashMap<String, Tensor>) -> Result<Vec<Tensor>> {
        let ordered = self
            .input_names
            .iter()
            .map(|n| {
                inputs
                    .get(n)
                    .cloned()
                    .ok_or_else(|| Error::BadInput(format!("input '{n}' was not given")))
            })
            .collect::<Result<Vec<_>>>()?;
        self.run(ordered)
    }
}

/// What a caught panic said (its `String` or `&str` payload; empty for any other).
pub(crate) fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_default()
}

/// Whether an engine makes plans per concrete input shape (when its inputs have symbolic
/// dims). Only when asked ([`Optimize::PerShape`]); never for observing engines
/// (calibration: their observers are wired into the load-time plan, which is kept
/// simple; and at SD scale they are float models, where a second plan would pack all the
/// weights again). Even when asked, by default only for
/// models on the int8 kernels, whose packed weights every plan shares; a float model's
/// weights tract packs again per plan, and the kept decluttered model holds them too
/// (`crate::shape_plans`). `TFMQC_PLAN_PER_SHAPE=0` turns it off, `=1` on for float
/// models too.
fn per_shape_plans(decluttered: &TypedModel, optimize: Optimize, observe: &[String]) -> bool {
    static KNOB: std::sync::OnceLock<Option<bool>> = std::sync::OnceLock::new();
    let knob = *KNOB.get_or_init(|| match std::env::var("TFMQC_PLAN_PER_SHAPE").as_deref() {
        Ok("0") => Some(false),
        Ok("1") => Some(true),
        _ => None,
    });
    if optimize != Optimize::PerShape || !observe.is_empty() || knob == Some(false) {
        return false;
    }
    knob == Some(true)
        || decluttered.nodes().iter().any(|n| {
            n.op_is::<crate::ops::conv::QConv>()
                || n.op_is::<crate::ops::gemm::QGemm>()
                || n.op_is::<crate::ops::matmul::QMatMul>()
                || n.op_is::<crate::ops::attention::QAttention>()
        })
}

/// Bytes a planned model holds, by kind of tensor: the int8 nodes' packed weights (with
/// their scales, biases and per-step scale tables) and the constants the plan keeps as
/// constants, told apart by the graph's structure ([`crate::classify`]: tables and scale
/// tables are gathered at the time-step index). Weights tract packs into its own float kernels
/// (the float model's convolutions and matrix products) are no constants any more and
/// are not counted: the process's resident memory after loading covers them. What
/// `tfmqc bench --json` reports beside the file's bytes by kind.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ResidentBytes {
    /// Packed weights of the nodes on the int8 kernels, with their scales, biases and
    /// per-step scale tables.
    pub int8_weights: usize,
    /// Temporal-feature tables.
    pub tables: usize,
    /// Per-step activation scale tables and the step-group index.
    pub scale_tables: usize,
    /// Every other constant: biases, shapes, weights of ops tract did not pack.
    pub other: usize,
}

impl ResidentBytes {
    fn add_const(&mut self, kind: ConstKind, bytes: usize) {
        let slot = match kind {
            ConstKind::Table => &mut self.tables,
            ConstKind::ScaleTable => &mut self.scale_tables,
            _ => &mut self.other,
        };
        *slot += bytes;
    }
}

/// The kinds of a model's initializers by structure ([`crate::classify`]), looked up by
/// the names tract gives its constants: an initializer's own name, or for a constant
/// tract derived from one (a slice, a cast), that name with `.suffix`es; a constant
/// folded from a node, the node's name, which takes the kind of the node's constant
/// inputs that are tables or scale tables.
struct ConstKinds(HashMap<String, ConstKind>);

impl ConstKinds {
    fn of(proto: &pb::ModelProto) -> ConstKinds {
        let Some(g) = proto.graph.as_ref() else {
            return ConstKinds(HashMap::new());
        };
        let mut kinds = crate::classify::classify_graph(g, crate::classify::timestep_input(proto));
        for n in &g.node {
            let kind = n
                .input
                .iter()
                .filter_map(|i| kinds.get(i).copied())
                .find(|k| matches!(k, ConstKind::Table | ConstKind::ScaleTable));
            if let (Some(k), false) = (kind, n.name.is_empty()) {
                kinds.entry(n.name.clone()).or_insert(k);
            }
        }
        ConstKinds(kinds)
    }

    fn of_const(&self, name: &str) -> ConstKind {
        let mut key = name;
        loop {
            if let Some(&k) = self.0.get(key) {
                return k;
            }
            match key.rsplit_once('.') {
                Some((head, _)) => key = head,
                None => return ConstKind::Other,
            }
        }
    }
}

/// The time one node of a plan took in [`Engine::profile`].
#[derive(Clone, Debug)]
pub struct NodeTime {
    /// The node's name in tract's plan (ONNX node name, or one tract derived from it).
    pub node: String,
    /// tract's name of the op (`Conv`, `TfmqcQConv`, `EinSum`, ...).
    pub op: String,
    pub time: std::time::Duration,
}

/// What tract's type inference knows about one value.
#[derive(Clone, Debug)]
pub struct ValueFact {
    pub datum_type: Option<DatumType>,
    /// Dims; symbolic ones as expressions (`N`, `2*N`).
    pub shape: Option<Vec<TDim>>,
    /// The value itself when it is a constant tensor tract could compute.
    pub konst: Option<Arc<Tensor>>,
}

/// Runs tract's inference analysis on a model and returns the facts of every named
/// value. Analysis errors are tolerated: what could be inferred is returned.
pub fn value_facts(proto: &pb::ModelProto) -> Result<HashMap<String, ValueFact>> {
    crate::limits::check_constant_sizes(proto, "")?;
    let widened;
    let proto = if crate::int4::has_int4_initializers(proto) {
        let mut p = proto.clone();
        crate::int4::widen_int4_initializers(&mut p, None).map_err(Error::InvalidModel)?;
        widened = p;
        &widened
    } else {
        proto
    };
    let parsed = tract_onnx::onnx()
        .parse(proto, None)
        .map_err(|e| Error::InvalidModel(format!("tract cannot load the model: {e:#}")))?;
    let mut model = parsed.model;
    // Partial facts are still useful: an op tract cannot type leaves its outputs unknown.
    let _ = model.analyse(false);
    let mut out = HashMap::new();
    for (name, outlet) in parsed.outlets_by_name {
        let Ok(fact) = model.outlet_fact(outlet) else {
            continue;
        };
        out.insert(
            name,
            ValueFact {
                datum_type: fact.datum_type.concretize(),
                shape: fact.shape.concretize().map(|s| s.to_vec()),
                konst: fact.value.concretize(),
            },
        );
    }
    Ok(out)
}
