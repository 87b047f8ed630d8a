//! The model calls calibration runs, and those the quality report evaluates on: seeded
//! trajectories of the deployment sampler (the runtime's own, [`sampler::run`], so the
//! calls are exactly what `Denoiser::sample` feeds the model), with classifier-free
//! guidance when asked; or the recorded calls of a `--calib` file.
//!
//! A `--calib` file (.safetensors or numpy .npz) holds tensors keyed by
//!
//! - `<input>`: conditioning for generated trajectories (rows cycled over the samples);
//!   or, when the sample and the time step are there too, recorded calls stacked along
//!   axis 0 (split into the model's batch, calls of equal t together);
//! - `NNNNN/<input>`: one recorded call per record number (what `--dump-calib` writes);
//! - `uncond/<input>`: the unconditional conditioning of `--guidance-scale`.
//!
//! Anything else is refused with the file and the key named.

use std::collections::{BTreeMap, HashMap};

use tfmqc_runtime::sampler::{self, Sampler, SamplerState};
use tfmqc_runtime::{NoiseRng, SchedulerConfig};

use crate::error::{Error, Result};
use crate::ir::{DType, Dim, Model, Tensor, ValueInfo};
use crate::options::Options;

/// Images kept per evaluation record when the batch is free (and unguided): evaluation
/// cost stays small whatever the calibration batch.
pub const RECORD_SAMPLES: usize = 2;

/// The float input holding the noisy sample: same spatial size as the first output.
pub fn find_sample_input(model: &Model, t: &str) -> Result<ValueInfo> {
    let g = &model.graph;
    let out = g.outputs.first().and_then(|o| o.shape.clone());
    let candidates: Vec<&ValueInfo> = g
        .inputs
        .iter()
        .filter(|i| {
            i.name != t
                && i.dtype.is_some_and(|d| d.is_float())
                && i.shape.as_ref().is_some_and(|s| s.len() >= 3)
        })
        .collect();
    let fits = |i: &&&ValueInfo| match (&i.shape, &out) {
        (Some(s), Some(o)) => s.len() == o.len() && s[2..] == o[2..],
        _ => false,
    };
    candidates
        .iter()
        .find(fits)
        .or(candidates.first())
        .map(|i| (*i).clone())
        .ok_or_else(|| {
            Error::pass(
                "calibrate",
                "no float input of rank ≥ 3 to hold the noisy sample",
            )
        })
}

/// The model's fixed batch (dim 0 of the sample input), if any.
fn fixed_batch(info: &ValueInfo) -> Option<usize> {
    match info.shape.as_deref() {
        Some([Dim::Known(b), ..]) => Some(*b as usize),
        _ => None,
    }
}

fn concrete(info: &ValueInfo, batch: usize) -> Result<Vec<usize>> {
    info.shape
        .as_ref()
        .ok_or_else(|| {
            Error::pass(
                "calibrate",
                format!("input '{}' has no known shape", info.name),
            )
        })?
        .iter()
        .enumerate()
        .map(|(i, d)| match d {
            Dim::Known(v) => Ok(*v as usize),
            _ if i == 0 => Ok(batch),
            _ => Err(Error::pass(
                "calibrate",
                format!(
                    "input '{}' has a free dimension {i}: give --calib data",
                    info.name
                ),
            )),
        })
        .collect()
}

/// The time step as the model takes it: its dtype, scalar or one per sample.
pub fn timestep_tensor(info: &ValueInfo, batch: usize, t: i64) -> Result<Tensor> {
    let shape = match info.shape.as_deref() {
        Some([]) => vec![],
        Some([Dim::Known(k)]) => vec![*k as usize],
        _ => vec![batch],
    };
    let n = shape.iter().product();
    Ok(match info.dtype {
        Some(DType::I64) => Tensor::from_vec(shape, &vec![t; n]),
        Some(DType::I32) => Tensor::from_vec(shape, &vec![t as i32; n]),
        Some(DType::F32) => Tensor::from_vec(shape, &vec![t as f32; n]),
        other => {
            return Err(Error::pass(
                "calibrate",
                format!("time step of type {other:?} is not supported"),
            ))
        }
    })
}

/// A seeded stand-in for a conditioning input: N(0,1) floats, or integers in the range
/// of the table they index (class labels), else zeros. Public for `tfmqc eval`, which
/// needs the same stand-ins to sample conditional models.
pub fn stand_in(
    model: &Model,
    info: &ValueInfo,
    batch: usize,
    rng: &mut NoiseRng,
) -> Result<Tensor> {
    let shape = concrete(info, batch)?;
    let n: usize = shape.iter().product();
    Ok(match info.dtype {
        Some(DType::F32) => Tensor::from_vec(shape, &rng.normal_vec(n)),
        Some(DType::I64) | Some(DType::I32) => {
            let g = &model.graph;
            let rows = g
                .consumers(&info.name)
                .into_iter()
                .find(|&(ix, slot)| g.node(ix).is_onnx_op("Gather") && slot == 1)
                .and_then(|(ix, _)| g.initializers.get(&g.node(ix).inputs[0]))
                .map(|t| t.shape[0] as u64)
                .unwrap_or(1);
            let v: Vec<i64> = (0..n).map(|_| rng.below(rows) as i64).collect();
            if info.dtype == Some(DType::I32) {
                Tensor::from_vec(shape, &v.iter().map(|&x| x as i32).collect::<Vec<_>>())
            } else {
                Tensor::from_vec(shape, &v)
            }
        }
        other => {
            return Err(Error::pass(
                "calibrate",
                format!("no stand-in for input '{}' of type {other:?}", info.name),
            ))
        }
    })
}

/// Zeros shaped like a model input (the default unconditional conditioning).
fn zeros(info: &ValueInfo, batch: usize) -> Result<Tensor> {
    let shape = concrete(info, batch)?;
    let dt = info.dtype.unwrap_or(DType::F32);
    Tensor::from_raw(
        dt,
        shape.clone(),
        vec![0; dt.storage_bytes(shape.iter().product())],
    )
}

/// Rows `idx` of `t` along axis 0 (a scalar as it is).
fn take_rows(t: &Tensor, idx: &[usize]) -> Result<Tensor> {
    let Some(&rows) = t.shape.first() else {
        return Ok(t.clone());
    };
    let row = t.data.len() / rows.max(1);
    let mut data = Vec::with_capacity(idx.len() * row);
    for &i in idx {
        data.extend_from_slice(&t.data[i * row..(i + 1) * row]);
    }
    let mut shape = t.shape.clone();
    shape[0] = idx.len();
    Tensor::from_raw(t.dtype, shape, data)
}

/// `[a; b]` along axis 0.
fn concat_rows(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let mut data = a.data.to_vec();
    data.extend_from_slice(&b.data);
    let mut shape = a.shape.clone();
    shape[0] += b.shape[0];
    Tensor::from_raw(a.dtype, shape, data)
}

/// `t` as the type of the model input `info` wants, when the values carry over: floats to
/// the float type, integers to the integer type, and (for the time step) between the two
/// when the values are whole numbers. Numpy writes f64 and i64 by default.
fn convert(t: Tensor, info: &ValueInfo, timestep: bool) -> std::result::Result<Tensor, String> {
    let Some(want) = info.dtype else {
        return Ok(t);
    };
    if want == t.dtype {
        return Ok(t);
    }
    let int = |d: DType| {
        matches!(
            d,
            DType::I64
                | DType::I32
                | DType::I16
                | DType::I8
                | DType::U8
                | DType::U16
                | DType::U32
                | DType::U64
        )
    };
    let carries = (want.is_float() && t.dtype.is_float())
        || (int(want) && int(t.dtype))
        || (timestep && (int(want) || want.is_float()) && (int(t.dtype) || t.dtype.is_float()));
    let refused = || format!("is {} but the model input is {want}", t.dtype);
    if !carries {
        return Err(refused());
    }
    let v = t.to_f64_lossy().map_err(|e| e.to_string())?;
    if int(want) && v.iter().any(|x| x.fract() != 0.0) {
        return Err(format!("{} (and not whole numbers)", refused()));
    }
    let shape = t.shape.clone();
    Ok(match want {
        DType::F32 => Tensor::from_vec(shape, &v.iter().map(|&x| x as f32).collect::<Vec<_>>()),
        DType::F64 => Tensor::from_vec(shape, &v),
        DType::I64 => Tensor::from_vec(shape, &v.iter().map(|&x| x as i64).collect::<Vec<_>>()),
        DType::I32 => Tensor::from_vec(shape, &v.iter().map(|&x| x as i32).collect::<Vec<_>>()),
        _ => return Err(refused()),
    })
}

/// A user-given tensor for the model input `info`: converted to its type, its shape
/// checked (dim 0 free when `free_rows`: rows are cycled or split), finite.
fn conform(
    key: &str,
    t: Tensor,
    info: &ValueInfo,
    file: &str,
    free_rows: bool,
    timestep: bool,
) -> Result<Tensor> {
    let bad = |why: String| Error::invalid(format!("{file}: tensor '{key}': {why}"));
    let t = convert(t, info, timestep).map_err(bad)?;
    if let Some(shape) = &info.shape {
        let ok = shape.len() == t.shape.len()
            && shape.iter().zip(&t.shape).enumerate().all(|(i, (d, &v))| {
                (i == 0 && free_rows) || !matches!(d, Dim::Known(k) if *k as usize != v)
            })
            && (!free_rows || t.shape.first().is_some_and(|&r| r > 0));
        if !ok {
            return Err(bad(format!(
                "has shape {:?}, the model input is {}{}",
                t.shape,
                info.type_string(),
                if free_rows {
                    " (any number of rows)"
                } else {
                    ""
                }
            )));
        }
    }
    if t.dtype.is_float() && t.to_f64_lossy()?.iter().any(|v| !v.is_finite()) {
        return Err(bad("holds NaN or Inf".into()));
    }
    Ok(t)
}

/// The time steps a time-step tensor holds (integer or float, whole numbers).
fn steps_of(t: &Tensor) -> Result<Vec<i64>> {
    Ok(t.to_f64_lossy()?.iter().map(|v| v.round() as i64).collect())
}

/// What a `--calib` file gives, sorted by role (see the module notes).
#[derive(Default)]
pub struct Given {
    pub file: String,
    /// `NNNNN/<input>`: record → input → tensor.
    pub records: BTreeMap<String, BTreeMap<String, Tensor>>,
    /// `<input>` keys.
    pub plain: BTreeMap<String, Tensor>,
    /// `uncond/<input>` keys.
    pub uncond: BTreeMap<String, Tensor>,
}

impl Given {
    /// Reads and sorts `options.calib` (nothing when it is not given).
    pub fn read(model: &Model, options: &Options) -> Result<Given> {
        let Some(path) = &options.calib else {
            return Ok(Given::default());
        };
        let file = path.display().to_string();
        let tensors = crate::ir::tensor_file::read_tensors(path)?;
        let inputs: Vec<&str> = model.graph.inputs.iter().map(|i| i.name.as_str()).collect();
        let known = |name: &str| inputs.contains(&name);
        let list = inputs.join(", ");
        let mut given = Given {
            file: file.clone(),
            ..Default::default()
        };
        for (key, t) in tensors {
            match key.split_once('/') {
                None if known(&key) => {
                    given.plain.insert(key, t);
                }
                Some((rec, name))
                    if !rec.is_empty() && rec.bytes().all(|c| c.is_ascii_digit()) && known(name) =>
                {
                    given
                        .records
                        .entry(rec.to_string())
                        .or_default()
                        .insert(name.to_string(), t);
                }
                Some(("uncond", name)) if known(name) => {
                    given.uncond.insert(name.to_string(), t);
                }
                _ => {
                    return Err(Error::invalid(format!(
                        "{file}: key '{key}' is not an input of the model ({list}), a recorded call 'NNNNN/<input>' nor unconditional conditioning 'uncond/<input>'"
                    )))
                }
            }
        }
        if !given.records.is_empty() && !given.plain.is_empty() {
            return Err(Error::invalid(format!(
                "{file}: holds recorded calls (NNNNN/<input>) and plain input keys ({}): give one form",
                given.plain.keys().cloned().collect::<Vec<_>>().join(", ")
            )));
        }
        Ok(given)
    }
}

/// One model call.
pub struct Call {
    /// Which trajectory batch (generated), or the position among recorded calls.
    pub batch: usize,
    /// The step within its trajectory.
    pub step: usize,
    pub t: i64,
    pub inputs: HashMap<String, Tensor>,
    /// Rows of the inputs an evaluation record keeps (all when `None`).
    keep: Option<Vec<usize>>,
}

impl Call {
    /// The rows of the call (dim 0 of its largest-batch input).
    fn rows(&self) -> Option<usize> {
        self.inputs
            .values()
            .filter_map(|t| t.shape.first())
            .max()
            .copied()
    }

    /// The inputs of this call cut to at most [`RECORD_SAMPLES`] images when the
    /// model's batch is free.
    pub fn record(&self) -> Result<BTreeMap<String, Tensor>> {
        self.inputs
            .iter()
            .map(|(k, t)| Ok((k.clone(), self.cut(t)?)))
            .collect()
    }

    /// `t` (an input or an output of this call) cut to the rows its record keeps.
    pub fn cut(&self, t: &Tensor) -> Result<Tensor> {
        match &self.keep {
            Some(idx) if t.shape.first().copied() == self.rows() => take_rows(t, idx),
            _ => Ok(t.clone()),
        }
    }

    /// (rows kept, rows) when the record keeps a prefix of the call's rows (what layer
    /// inputs are sampled from), else every row.
    pub fn kept_prefix(&self) -> (usize, usize) {
        let rows = self.rows().unwrap_or(1);
        match &self.keep {
            Some(idx) if idx.iter().enumerate().all(|(i, &r)| i == r) => (idx.len(), rows),
            _ => (rows, rows),
        }
    }
}

/// Recorded calls of a `--calib` file: its `NNNNN/<input>` records, or its stacked
/// `<input>` tensors split into the model's batch; `None` when the file has neither (it
/// gives conditioning only, or there is no file). Every call's t must be in `set`.
pub fn recorded_calls(
    model: &Model,
    given: &Given,
    t_name: &str,
    set: &[i64],
) -> Result<Option<Vec<Call>>> {
    let g = &model.graph;
    let file = &given.file;
    let sample = find_sample_input(model, t_name)?;
    let t_info = g
        .inputs
        .iter()
        .find(|i| i.name == t_name)
        .ok_or_else(|| Error::invalid(format!("the model has no input '{t_name}'")))?;
    let check_t = |what: &str, t: i64| -> Result<()> {
        if set.binary_search(&t).is_err() {
            return Err(Error::invalid(format!(
                "{file}: {what} has t = {t}, outside the time-step set S ({} steps, {}..{})",
                set.len(),
                set[0],
                set[set.len() - 1]
            )));
        }
        Ok(())
    };
    if !given.records.is_empty() {
        let mut calls = vec![];
        for (k, (rec, inputs)) in given.records.iter().enumerate() {
            let mut conformed = HashMap::new();
            for info in &g.inputs {
                let t = inputs.get(&info.name).ok_or_else(|| {
                    Error::invalid(format!("{file}: record {rec} lacks input '{}'", info.name))
                })?;
                let key = format!("{rec}/{}", info.name);
                let t = conform(&key, t.clone(), info, file, false, info.name == t_name)?;
                conformed.insert(info.name.clone(), t);
            }
            let step = steps_of(&conformed[t_name])?.first().copied().unwrap_or(0);
            check_t(&format!("record {rec}"), step)?;
            calls.push(Call {
                batch: k,
                step: 0,
                t: step,
                inputs: conformed,
                keep: None,
            });
        }
        return Ok(Some(calls));
    }
    let has_x = given.plain.contains_key(&sample.name);
    let has_t = given.plain.contains_key(t_name);
    match (has_x, has_t) {
        (false, false) => return Ok(None),
        (true, false) | (false, true) => {
            let (have, lack) = if has_x {
                (&sample.name, t_name)
            } else {
                (&t_name.to_string(), sample.name.as_str())
            };
            return Err(Error::invalid(format!(
                "{file}: '{have}' without '{lack}': recorded calls stacked along axis 0 need both (or give only conditioning inputs, or NNNNN/<input> records)"
            )));
        }
        (true, true) => {}
    }
    // Stacked records: R rows of the sample; t has R values, or one per call of a fixed
    // batch B (R = B·calls).
    let x = conform(
        &sample.name,
        given.plain[&sample.name].clone(),
        &sample,
        file,
        true,
        false,
    )?;
    let rows = x.shape[0];
    let t_all = conform(
        t_name,
        given.plain[t_name].clone(),
        t_info,
        file,
        true,
        true,
    )
    .or_else(|_| {
        // A scalar time-step input: the file holds one per call, [R] or [R/B].
        let flat = ValueInfo {
            shape: Some(vec![Dim::Symbol("R".into())]),
            ..t_info.clone()
        };
        conform(t_name, given.plain[t_name].clone(), &flat, file, true, true)
    })?;
    let t_all = steps_of(&t_all)?;
    let fixed = fixed_batch(&sample);
    let per_row: Vec<i64> = if t_all.len() == rows {
        t_all
    } else if let Some(b) = fixed.filter(|&b| t_all.len() * b == rows) {
        t_all
            .iter()
            .flat_map(|&t| std::iter::repeat_n(t, b))
            .collect()
    } else {
        return Err(Error::invalid(format!(
            "{file}: tensor '{t_name}' has {} values for {rows} rows of '{}' (one per row{})",
            t_all.len(),
            sample.name,
            fixed
                .map(|b| format!(", or one per call of {b} rows"))
                .unwrap_or_default()
        )));
    };
    let mut others = BTreeMap::new();
    for info in g
        .inputs
        .iter()
        .filter(|i| i.name != t_name && i.name != sample.name)
    {
        let t = given.plain.get(&info.name).ok_or_else(|| {
            Error::invalid(format!(
                "{file}: recorded calls stacked by input name lack '{}'",
                info.name
            ))
        })?;
        let t = conform(&info.name, t.clone(), info, file, true, false)?;
        if t.shape.first() != Some(&rows) {
            return Err(Error::invalid(format!(
                "{file}: tensor '{}' has {:?} rows, '{}' has {rows}: stacked records need one row each",
                info.name,
                t.shape.first(),
                sample.name
            )));
        }
        others.insert(info.name.clone(), t);
    }
    // Calls: rows of equal t together (in order of first appearance), cut to the batch;
    // a fixed batch's last call is filled by cycling its own rows.
    let batch = fixed.unwrap_or(8);
    let mut order: Vec<i64> = vec![];
    for &t in &per_row {
        if !order.contains(&t) {
            order.push(t);
        }
    }
    let mut calls = vec![];
    for t in order {
        check_t(&format!("a stacked record of '{t_name}'"), t)?;
        let idx: Vec<usize> = (0..rows).filter(|&r| per_row[r] == t).collect();
        for chunk in idx.chunks(batch) {
            let call_rows: Vec<usize> = match fixed {
                Some(b) => (0..b).map(|i| chunk[i % chunk.len()]).collect(),
                None => chunk.to_vec(),
            };
            let n = call_rows.len();
            let mut inputs = HashMap::new();
            inputs.insert(sample.name.clone(), take_rows(&x, &call_rows)?);
            inputs.insert(t_name.to_string(), timestep_tensor(t_info, n, t)?);
            for (name, v) in &others {
                inputs.insert(name.clone(), take_rows(v, &call_rows)?);
            }
            calls.push(Call {
                batch: calls.len(),
                step: 0,
                t,
                inputs,
                keep: None,
            });
        }
    }
    Ok(Some(calls))
}

/// One trajectory batch about to run.
struct Batch {
    state: SamplerState,
    /// The sampler's noise (the initial sample's, then DDPM's).
    rng: NoiseRng,
    x: Vec<f32>,
    /// The conditioning inputs of every call.
    fixed: HashMap<String, Tensor>,
}

/// How generated trajectories look: the sampler, the batch, the conditioning.
pub struct Plan {
    pub sample: ValueInfo,
    t_info: ValueInfo,
    pub config: SchedulerConfig,
    pub sampler: Sampler,
    pub guidance: Option<f32>,
    /// Step count of trajectory batch b: `step_counts[b % len]`.
    pub step_counts: Vec<usize>,
    /// Images per model call (the model's batch, or half of it under guidance).
    pub images: usize,
    fixed: bool,
    /// Per conditioning input: the given rows (cycled), or `None`: seeded stand-ins.
    cond: Vec<(ValueInfo, Option<Tensor>)>,
    /// Under guidance, per conditioning input: the unconditional rows (given or zeros).
    uncond: Vec<Tensor>,
    /// Inputs fed with seeded stand-ins.
    pub stand_ins: Vec<String>,
    /// Lines for the user (what the unconditional half is, ...).
    pub notes: Vec<String>,
    per_sample: usize,
    /// Rows an evaluation record keeps when the batch is free and unguided
    /// ([`RECORD_SAMPLES`] unless the plan is evaluation's own, which keeps every row).
    record_rows: usize,
}

impl Plan {
    /// The plan for `samples` trajectories at most `batch` images a call.
    pub fn new(
        model: &Model,
        options: &Options,
        t_name: &str,
        given: &Given,
        set: &[i64],
        batch: usize,
    ) -> Result<Plan> {
        let g = &model.graph;
        let file = &given.file;
        let sample = find_sample_input(model, t_name)?;
        let t_info = g
            .inputs
            .iter()
            .find(|i| i.name == t_name)
            .cloned()
            .ok_or_else(|| Error::invalid(format!("the model has no input '{t_name}'")))?;
        let config = options.scheduler(model)?;
        let step_counts = options.calibration_step_counts(model, set)?;
        let guidance = options.guidance_scale;
        let fixed = fixed_batch(&sample);
        let images = match (fixed, guidance) {
            (Some(b), None) => b,
            (Some(b), Some(_)) if b % 2 == 0 => b / 2,
            (Some(b), Some(_)) => {
                return Err(Error::invalid(format!(
                    "--guidance-scale runs the unconditional and the conditional halves in one call; the model's batch is fixed to {b}, which does not split in two"
                )))
            }
            (None, _) => batch.max(1),
        };
        let cond_inputs: Vec<&ValueInfo> = g
            .inputs
            .iter()
            .filter(|i| i.name != t_name && i.name != sample.name)
            .collect();
        if guidance.is_some() && cond_inputs.is_empty() {
            return Err(Error::invalid(
                "--guidance-scale: the model takes no conditioning input to drop",
            ));
        }
        let mut notes = vec![];
        let mut stand_ins = vec![];
        let mut cond = vec![];
        let mut uncond = vec![];
        for info in cond_inputs {
            let given_t = match given.plain.get(&info.name) {
                Some(t) => Some(conform(&info.name, t.clone(), info, file, true, false)?),
                None => {
                    stand_ins.push(info.name.clone());
                    None
                }
            };
            if guidance.is_some() {
                let u = match given.uncond.get(&info.name) {
                    Some(t) => {
                        let key = format!("uncond/{}", info.name);
                        notes.push(format!(
                            "guidance: the unconditional '{}' comes from {file} ({key}, {} row(s))",
                            info.name,
                            t.shape.first().copied().unwrap_or(1)
                        ));
                        conform(&key, t.clone(), info, file, true, false)?
                    }
                    None => {
                        notes.push(format!(
                            "guidance: the unconditional '{}' is zeros (no uncond/{} in {})",
                            info.name,
                            info.name,
                            if file.is_empty() {
                                "a --calib file"
                            } else {
                                file
                            }
                        ));
                        zeros(info, 1)?
                    }
                };
                uncond.push(u);
            }
            cond.push((info.clone(), given_t));
        }
        if guidance.is_none() && !given.uncond.is_empty() {
            notes.push(format!(
                "{file}: uncond/ tensors are not used without --guidance-scale"
            ));
        }
        let per_sample = concrete(&sample, 1)?[1..].iter().product();
        Ok(Plan {
            sample,
            t_info,
            config,
            sampler: options.sampler,
            guidance,
            step_counts,
            images,
            fixed: fixed.is_some(),
            cond,
            uncond,
            stand_ins,
            notes,
            per_sample,
            record_rows: RECORD_SAMPLES,
        })
    }

    /// Rows of one model call: the images, twice under guidance.
    fn rows(&self) -> usize {
        if self.guidance.is_some() {
            2 * self.images
        } else {
            self.images
        }
    }

    /// Rows evaluation records keep: the first images when the batch is free (with
    /// guidance every row: layer inputs are sampled from a prefix of the rows).
    fn keep(&self) -> Option<Vec<usize>> {
        (!self.fixed && self.images > self.record_rows && self.guidance.is_none())
            .then(|| (0..self.record_rows).collect())
    }

    /// Trajectory batch `b`: its sampler state, noise stream, initial sample and the
    /// conditioning inputs of its calls.
    fn start_batch(&self, model: &Model, b: usize, seed: u64) -> Result<Batch> {
        let n = self.images;
        let steps = self.step_counts[b % self.step_counts.len()];
        let state = SamplerState::new(self.sampler, &self.config, steps)?;
        let mut rng = NoiseRng::new(sampler::batch_seed(seed, b));
        // Stand-ins from their own stream: the sampler's (DDPM's noise) stays that of
        // `Denoiser::sample`.
        let mut cond_rng = NoiseRng::new(sampler::batch_seed(seed ^ 0x5eed_c0de, b));
        let idx: Vec<usize> = (0..n).map(|r| b * n + r).collect();
        let mut fixed: HashMap<String, Tensor> = HashMap::new();
        for (k, (info, given)) in self.cond.iter().enumerate() {
            let c = match given {
                Some(t) => {
                    let have = t.shape[0];
                    take_rows(t, &idx.iter().map(|i| i % have).collect::<Vec<_>>())?
                }
                None => stand_in(model, info, n, &mut cond_rng)?,
            };
            let c = match self.guidance {
                None => c,
                Some(_) => {
                    let u = &self.uncond[k];
                    let have = u.shape.first().copied().unwrap_or(1).max(1);
                    let u = take_rows(u, &idx.iter().map(|i| i % have).collect::<Vec<_>>())?;
                    concat_rows(&u, &c)?
                }
            };
            fixed.insert(info.name.clone(), c);
        }
        let x = state.initial_sample(&mut rng, n * self.per_sample);
        Ok(Batch {
            state,
            rng,
            x,
            fixed,
        })
    }

    /// The call at step `k` (time step `t`) of batch `b` on the sampler's model input.
    fn call(
        &self,
        b: usize,
        k: usize,
        t: i64,
        input: Vec<f32>,
        fixed: &HashMap<String, Tensor>,
    ) -> Result<Call> {
        let rows = self.rows();
        let input = match self.guidance {
            None => input,
            Some(_) => [input.as_slice(), input.as_slice()].concat(),
        };
        let mut inputs = fixed.clone();
        inputs.insert(
            self.sample.name.clone(),
            Tensor::from_vec(concrete(&self.sample, rows)?, &input),
        );
        inputs.insert(
            self.t_info.name.clone(),
            timestep_tensor(&self.t_info, rows, t)?,
        );
        Ok(Call {
            batch: b,
            step: k,
            t,
            inputs,
            keep: self.keep(),
        })
    }

    /// The first call of batch 0 (to time one call before planning the rest).
    pub fn first_call(&self, model: &Model, seed: u64) -> Result<Call> {
        let b = self.start_batch(model, 0, seed)?;
        self.call(
            0,
            0,
            b.state.timesteps()[0],
            b.state.model_input(&b.x),
            &b.fixed,
        )
    }

    /// Runs `batches` trajectory batches from `seed`; `call` runs the model on one call
    /// and returns its first output (the prediction; extra channels after the sample's,
    /// e.g. a learned variance, are dropped). With a `budget_s`, a batch after the first
    /// starts only when the calls so far say it ends within the budget (the first call's
    /// time, on which the plan was fitted, can be far from the average on a loaded
    /// machine); returns the number of batches run.
    pub fn run(
        &self,
        model: &Model,
        batches: usize,
        seed: u64,
        budget_s: Option<f64>,
        progress: &dyn Fn(&str),
        call: &mut dyn FnMut(&Call) -> Result<Tensor>,
    ) -> Result<usize> {
        let n = self.images;
        let per_sample = self.per_sample;
        let rows = self.rows();
        let total_calls: usize = (0..batches)
            .map(|b| self.step_counts[b % self.step_counts.len()])
            .sum();
        let clock = std::time::Instant::now();
        let mut done = 0usize;
        for b in 0..batches {
            let calls_of_batch = self.step_counts[b % self.step_counts.len()];
            if let (Some(budget), true) = (budget_s, b > 0 && done > 0) {
                let elapsed = clock.elapsed().as_secs_f64();
                let per_call = elapsed / done as f64;
                if elapsed + per_call * calls_of_batch as f64 > budget {
                    return Ok(b);
                }
            }
            let Batch {
                mut state,
                mut rng,
                mut x,
                fixed,
            } = self.start_batch(model, b, seed)?;
            let total = state.timesteps().len();
            sampler::run(&mut state, &mut x, per_sample, &mut rng, |k, t, input| {
                let eta = match done {
                    0 => String::new(),
                    d => format!(
                        ", about {} left",
                        crate::analysis::budget::human_duration(
                            clock.elapsed().as_secs_f64() / d as f64 * (total_calls - d) as f64
                        )
                    ),
                };
                progress(&format!(
                    "calibrate: {} trajectory batch {}/{batches}, step {}/{total} (t = {t}){eta}",
                    self.sampler,
                    b + 1,
                    k + 1
                ));
                let c = self.call(b, k, t, input, &fixed)?;
                let out = call(&c)?;
                done += 1;
                let pred = out.to_f32_vec()?;
                let out_per_sample = pred.len() / rows;
                if out_per_sample < per_sample || !out_per_sample.is_multiple_of(per_sample) {
                    return Err(Error::pass(
                        "calibrate",
                        format!(
                            "the first output ({:?}) does not hold a prediction for the sample",
                            out.shape
                        ),
                    ));
                }
                let eps: Vec<f32> = (0..rows)
                    .flat_map(|s| {
                        pred[s * out_per_sample..s * out_per_sample + per_sample]
                            .iter()
                            .copied()
                    })
                    .collect();
                Ok(match self.guidance {
                    None => eps,
                    Some(g) => {
                        let (u, c) = eps.split_at(n * per_sample);
                        sampler::guide(u, c, g)
                    }
                })
            })?;
        }
        Ok(batches)
    }
}

/// Model calls along fresh trajectories of the deployment sampler, for quality reports:
/// trajectories for every calibration step count, from seeds apart from calibration's
/// (so the report is not measured on the data that set the scales), with the float
/// model's prediction on each. `samples` images per step count (`--eval-samples`; a
/// model with a fixed batch runs as many trajectory batches as they need); `None`: one
/// trajectory batch per step count of at most [`RECORD_SAMPLES`] images (the model's
/// batch when it is fixed). Only step counts whose calls add up to `max_calls` (smallest
/// first); `None` when not even one trajectory fits.
pub fn evaluation_records(
    model: &Model,
    options: &Options,
    t_name: &str,
    samples: Option<usize>,
    max_calls: usize,
    progress: &dyn Fn(&str),
) -> Result<Option<EvaluationRecords>> {
    const EVAL_SEED: u64 = 0xe7a1_5eed;
    let set = crate::options::timestep_set(model, options)?;
    let given = Given::read(model, options)?;
    let mut plan = Plan::new(
        model,
        options,
        t_name,
        &given,
        &set,
        samples.unwrap_or(RECORD_SAMPLES),
    )?;
    // Trajectory batches per step count: a fixed batch smaller than `samples` repeats.
    let repeats = match samples {
        Some(n) => n.div_ceil(plan.images).max(1),
        None => 1,
    };
    if samples.is_some() {
        plan.record_rows = usize::MAX;
    }
    let mut counts = plan.step_counts.clone();
    counts.sort_unstable();
    let mut total = 0;
    counts.retain(|&n| {
        total += n * repeats;
        total <= max_calls
    });
    if counts.is_empty() {
        return Ok(None);
    }
    counts.reverse();
    plan.step_counts = counts;
    let runner = crate::ir::exec::Runner::new(model, None, tfmqc_runtime::engine::Optimize::Full)?;
    let (mut records, mut steps, mut outputs, mut first_image) = (vec![], vec![], vec![], vec![]);
    let per_record = match (samples, plan.fixed) {
        (None, false) => plan.images.min(RECORD_SAMPLES),
        _ => plan.images,
    };
    let batches = plan.step_counts.len();
    plan.run(
        model,
        batches * repeats,
        options.seed ^ EVAL_SEED,
        None,
        progress,
        &mut |call| {
            let prediction = runner.run(&call.inputs)?.swap_remove(0);
            records.push(call.record()?);
            steps.push(call.t);
            outputs.push(call.cut(&prediction)?);
            first_image.push(call.batch / batches * per_record);
            Ok(prediction)
        },
    )?;
    let images = per_record * repeats;
    let what = format!(
        "{} held-out {} trajector{} of {} image(s) at {} steps{}",
        plan.step_counts.len(),
        plan.sampler,
        if plan.step_counts.len() == 1 {
            "y"
        } else {
            "ies"
        },
        images,
        plan.step_counts
            .iter()
            .map(|n| n.to_string())
            .collect::<Vec<_>>()
            .join(", "),
        plan.guidance
            .map(|g| format!(", guidance {g}"))
            .unwrap_or_default()
    );
    Ok(Some(EvaluationRecords {
        records,
        steps,
        outputs,
        what,
        first_image,
        per_record,
        images,
    }))
}

/// Model calls for quality reports (see [`evaluation_records`]).
pub struct EvaluationRecords {
    pub records: Vec<BTreeMap<String, Tensor>>,
    /// The time step of each record.
    pub steps: Vec<i64>,
    /// The float model's first output on each record.
    pub outputs: Vec<Tensor>,
    /// What they are, in words.
    pub what: String,
    /// The index of the first image of each record among its step count's images: row r
    /// of a record (and of its output) is image `first_image + r % per_record` (under
    /// guidance the unconditional rows come first, each image's twice).
    pub first_image: Vec<usize>,
    /// Images per record.
    pub per_record: usize,
    /// Images per step count.
    pub images: usize,
}
