//! Loading a denoiser: the ONNX file read (external data through a memory map), its
//! inputs found (the sample, the time step, the conditioning), the metadata tfmqc wrote
//! read back (time-step set, scheduler, schedule), and the graph planned on tract with
//! the int8 lowering. Calling and sampling are in `denoiser.rs`.

use std::borrow::Cow;
use std::path::Path;

use tract_onnx::pb;
use tract_onnx::prelude::DatumType;

use super::{Denoiser, InputSpec};
use crate::engine::{read_proto, Engine, Optimize};
use crate::error::{Error, Result};
use crate::meta;
use crate::scheduler::SchedulerConfig;

fn invalid(path: &str, msg: impl std::fmt::Display) -> Error {
    if path.is_empty() {
        Error::InvalidModel(msg.to_string())
    } else {
        Error::InvalidModel(format!("{path}: {msg}"))
    }
}

fn dtype_of(elem: i32) -> Option<DatumType> {
    use pb::tensor_proto::DataType as D;
    Some(match D::try_from(elem).ok()? {
        D::Float => DatumType::F32,
        D::Double => DatumType::F64,
        D::Float16 => DatumType::F16,
        D::Int8 => DatumType::I8,
        D::Int16 => DatumType::I16,
        D::Int32 => DatumType::I32,
        D::Int64 => DatumType::I64,
        D::Uint8 => DatumType::U8,
        D::Uint16 => DatumType::U16,
        D::Uint32 => DatumType::U32,
        D::Uint64 => DatumType::U64,
        D::Bool => DatumType::Bool,
        _ => return None,
    })
}

fn input_spec(v: &pb::ValueInfoProto) -> InputSpec {
    use pb::tensor_shape_proto::dimension::Value;
    let tensor = match v.r#type.as_ref().and_then(|t| t.value.as_ref()) {
        Some(pb::type_proto::Value::TensorType(t)) => Some(t),
        _ => None,
    };
    InputSpec {
        name: v.name.clone(),
        dtype: tensor.and_then(|t| dtype_of(t.elem_type)),
        shape: tensor.and_then(|t| t.shape.as_ref()).map(|s| {
            s.dim
                .iter()
                .map(|d| match d.value {
                    Some(Value::DimValue(n)) if n > 0 => Some(n as usize),
                    _ => None,
                })
                .collect()
        }),
    }
}

/// The graph-input index of the time step.
fn find_timestep(inputs: &[InputSpec], named: Option<&str>, path: &str) -> Result<usize> {
    if let Some(name) = named {
        return inputs.iter().position(|i| i.name == name).ok_or_else(|| {
            invalid(
                path,
                format!(
                    "metadata names '{name}' as the time-step input, the model has no such input"
                ),
            )
        });
    }
    let by_name = |i: &InputSpec| {
        matches!(
            i.name.to_ascii_lowercase().as_str(),
            "t" | "timestep" | "timesteps" | "time_step" | "time_steps" | "time"
        )
    };
    if let Some(k) = inputs.iter().position(by_name) {
        return Ok(k);
    }
    let by_shape =
        |i: &InputSpec| i.dtype.is_some_and(|d| !d.is_float()) || i.rank().is_some_and(|r| r <= 1);
    let found: Vec<usize> = (0..inputs.len())
        .filter(|&k| by_shape(&inputs[k]))
        .collect();
    match found.as_slice() {
        [k] => Ok(*k),
        _ => Err(invalid(
            path,
            format!(
                "cannot tell which input is the time step among {:?} (compile the model with tfmqc, which records it)",
                inputs.iter().map(|i| &i.name).collect::<Vec<_>>()
            ),
        )),
    }
}

impl Denoiser {
    /// Loads a denoiser (an original or tfmqc-compiled ONNX file) and plans it for speed.
    ///
    /// External data (the `.data` file beside a model over 2 GiB) is read through a memory
    /// map: int8 weights are packed straight from it, and the decoded model is handed to
    /// tract without a copy.
    pub fn load(path: &Path) -> Result<Denoiser> {
        let proto = read_proto(path)?;
        let dir = path.parent().map(|d| d.to_string_lossy().to_string());
        Denoiser::build(
            Cow::Owned(proto),
            dir.as_deref(),
            &path.display().to_string(),
        )
    }

    /// Builds from a decoded model; `model_dir` is where external data is looked up,
    /// `name` prefixes error messages (a file name, or ""). What tract keeps of the
    /// model (float initializers, unless they are external data) is copied from the
    /// borrowed proto; [`Denoiser::load`] moves it instead.
    pub fn from_proto(
        proto: &pb::ModelProto,
        model_dir: Option<&str>,
        name: &str,
    ) -> Result<Denoiser> {
        Denoiser::build(Cow::Borrowed(proto), model_dir, name)
    }

    fn build(
        source: Cow<'_, pb::ModelProto>,
        model_dir: Option<&str>,
        name: &str,
    ) -> Result<Denoiser> {
        let proto: &pb::ModelProto = &source;
        let meta = |key: &str| -> Option<String> {
            proto
                .metadata_props
                .iter()
                .find(|p| p.key == key)
                .map(|p| p.value.clone())
        };
        let graph = proto
            .graph
            .as_ref()
            .ok_or_else(|| invalid(name, "the model has no graph"))?;
        let init: std::collections::HashSet<&str> =
            graph.initializer.iter().map(|t| t.name.as_str()).collect();
        let inputs: Vec<InputSpec> = graph
            .input
            .iter()
            .filter(|i| !init.contains(i.name.as_str()))
            .map(input_spec)
            .collect();
        let timestep = find_timestep(&inputs, meta(meta::TIMESTEP_INPUT).as_deref(), name)?;
        let samples: Vec<usize> = (0..inputs.len())
            .filter(|&k| {
                k != timestep
                    && inputs[k].dtype.is_none_or(|d| d.is_float())
                    && inputs[k].rank() == Some(4)
            })
            .collect();
        let sample = match samples.as_slice() {
            [k] => *k,
            [] => {
                return Err(invalid(
                    name,
                    "no float input of rank 4 to take the noisy sample",
                ))
            }
            many => {
                // Several images in: the one with the conventional name, else the first.
                let conventional = ["sample", "x", "x_t", "latent", "latents", "noisy_sample"];
                many.iter()
                    .copied()
                    .find(|&k| conventional.contains(&inputs[k].name.to_ascii_lowercase().as_str()))
                    .unwrap_or(many[0])
            }
        };
        let scheduler = SchedulerConfig::from_metadata(&meta, name)
            .map_err(|e| Error::InvalidModel(e.to_string()))?;
        let schedule = scheduler.schedule();
        let t_count = schedule.train_timesteps() as i64;
        let timesteps = match meta(meta::TIMESTEPS) {
            None => None,
            Some(v) => {
                let mut set = v
                    .split(',')
                    .map(|s| s.trim())
                    .filter(|s| !s.is_empty())
                    .map(|s| {
                        s.parse::<i64>().map_err(|_| {
                            invalid(
                                name,
                                format!("metadata {} has '{s}', not a time step", meta::TIMESTEPS),
                            )
                        })
                    })
                    .collect::<Result<Vec<i64>>>()?;
                set.sort_unstable();
                set.dedup();
                if set.is_empty() {
                    return Err(invalid(
                        name,
                        format!("metadata {} is empty", meta::TIMESTEPS),
                    ));
                }
                if set[0] < 0 || set[set.len() - 1] >= t_count {
                    return Err(invalid(
                        name,
                        format!(
                            "the time-step set {}..{} does not fit the {t_count} training steps",
                            set[0],
                            set[set.len() - 1]
                        ),
                    ));
                }
                Some(set)
            }
        };
        let chw = inputs[sample].shape.as_ref().and_then(|s| match s[1..] {
            [Some(c), Some(h), Some(w)] => Some([c, h, w]),
            _ => None,
        });
        let sample_shape = chw.or_else(|| {
            let v: Vec<usize> = meta(meta::SAMPLE_SHAPE)?
                .split(',')
                .map(|s| s.trim().parse().ok())
                .collect::<Option<_>>()?;
            <[usize; 3]>::try_from(v).ok()
        });
        // Sampling allocates batch × C × H × W values from this: a size no latent has is
        // refused now, not met as an aborting allocation later.
        if let Some(chw) = sample_shape {
            let n = chw.iter().try_fold(1usize, |n, &d| n.checked_mul(d));
            if n.is_none_or(|n| n as u64 > crate::limits::MAX_CONSTANT_ELEMENTS) {
                return Err(invalid(
                    name,
                    format!(
                        "the sample input '{}' is {chw:?}: more than the {} values a sample may have",
                        inputs[sample].name,
                        crate::limits::MAX_CONSTANT_ELEMENTS
                    ),
                ));
            }
        }
        // Quantized convolutions run on the int8 kernels (a float model has none to lower).
        let engine = match source {
            Cow::Owned(p) => Engine::from_owned_proto_int8(p, model_dir, None, Optimize::PerShape),
            Cow::Borrowed(p) => Engine::from_proto_int8(p, model_dir, None, Optimize::PerShape),
        };
        let (engine, int8_ops) = engine.map_err(|e| {
            if name.is_empty() {
                e
            } else {
                Error::InvalidModel(format!("{name}: {e}"))
            }
        })?;
        Ok(Denoiser {
            engine,
            int8_ops,
            inputs,
            sample,
            timestep,
            timesteps,
            scheduler,
            schedule,
            sample_shape,
        })
    }
}
