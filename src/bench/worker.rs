//! `tfmqc bench-worker`: one tract engine in its own process (so that its memory is its
//! own), printing what it measured as one JSON line ([`WorkerOutput`]).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use tfmqc_runtime::{Denoiser, NoiseRng, Sampler, Tensor};

use super::report::{Int8Weights, Measured, OpTime, PlanInputs, Timing, WorkerOutput};
use super::{fitting, WorkerArgs, SEED};
use crate::{user_error, Failure};

/// A call slower than this is an SD-class one: one warm-up call, one profiled step.
const SLOW_CALL_S: f64 = 1.0;

/// Time per op kind over `runs` profiled steps: `[{op, nodes, ms}]`, ms per step, the
/// longest first.
pub(super) fn profile_ops(
    model: &Denoiser,
    x: &Tensor,
    t: i64,
    cond: &[(&str, Tensor)],
    runs: usize,
) -> Result<Vec<OpTime>, Failure> {
    let mut by_op: BTreeMap<String, (usize, f64)> = BTreeMap::new();
    for run in 0..runs {
        for node in model.profile_step(x, t, cond).map_err(runtime_error)? {
            let entry = by_op.entry(node.op).or_default();
            if run == 0 {
                entry.0 += 1;
            }
            entry.1 += node.time.as_secs_f64() * 1e3 / runs as f64;
        }
    }
    let mut ops: Vec<(String, (usize, f64))> = by_op.into_iter().collect();
    ops.sort_by(|a, b| b.1 .1.total_cmp(&a.1 .1));
    Ok(ops
        .into_iter()
        .map(|(op, (nodes, ms))| OpTime { op, nodes, ms })
        .collect())
}

/// A field of /proc/self/status in MiB (`None` off Linux).
fn status_mb(field: &str) -> Option<f64> {
    let text = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = text.lines().find(|l| l.starts_with(field))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// Hands the heap memory freed while loading (the decoded protobuf, tract's
/// intermediate models) back to the system, so that the RSS after loading counts what
/// the loaded model holds, not what the allocator keeps for later. glibc only; elsewhere
/// the RSS after loading includes that memory.
fn release_free_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        extern "C" {
            fn malloc_trim(pad: usize) -> i32;
        }
        // SAFETY: malloc_trim only returns free pages of glibc's heap to the system.
        unsafe {
            malloc_trim(0);
        }
    }
}

fn median(mut v: Vec<Duration>) -> f64 {
    v.sort();
    v[v.len() / 2].as_secs_f64() * 1e3
}

fn runtime_error(e: tfmqc_runtime::Error) -> Failure {
    user_error(e.to_string())
}

/// The numpy name of a time-step dtype (for the onnxruntime helper).
fn numpy_dtype(dt: tract_onnx::prelude::DatumType) -> &'static str {
    use tract_onnx::prelude::DatumType as D;
    match dt {
        D::I32 => "int32",
        D::F32 => "float32",
        D::F64 => "float64",
        _ => "int64",
    }
}

/// Runs one tract engine (tract-float or tfmqc-int8; the difference is only the file:
/// Denoiser::load lowers whatever is quantized) and prints one JSON line on stdout.
pub fn worker(args: &WorkerArgs) -> Result<(), Failure> {
    use tract_linalg::multithread::{set_default_executor, Executor};
    if args.threads == 0 || args.runs == Some(0) || args.steps == 0 {
        return Err(user_error(
            "--threads, --runs and --steps must be at least 1",
        ));
    }
    set_default_executor(if args.threads == 1 {
        Executor::SingleThread
    } else {
        Executor::multithread(args.threads)
    });
    let base = status_mb("VmRSS");
    let anon = status_mb("RssAnon");
    let start = Instant::now();
    let model = Denoiser::load(&args.model).map_err(runtime_error)?;
    let load_s = start.elapsed().as_secs_f64();
    release_free_heap();
    let loaded = status_mb("RssAnon");

    let given = match &args.inputs {
        Some(p) => tfmqc_passes::tensor_file::read_safetensors(p)?,
        None => BTreeMap::new(),
    };
    let mut cond: Vec<(&str, Tensor)> = vec![];
    for name in model.conditioning_inputs() {
        let t = given.get(name).ok_or_else(|| {
            user_error(format!(
                "{}: the model takes the conditioning input '{name}'; put it in {} (MODEL.inputs.safetensors beside the model)",
                args.model.display(),
                args.inputs
                    .as_ref()
                    .map(|p| p.display().to_string())
                    .unwrap_or_else(|| "a file".into())
            ))
        })?;
        cond.push((name, tfmqc_passes::exec::to_tract(t)?));
    }
    let spec = model.sample_input();
    // The batch: fixed by the model, else that of the example inputs, else 1.
    let batch = spec
        .shape
        .as_ref()
        .and_then(|s| s.first().copied().flatten())
        .or_else(|| given.get(&spec.name).and_then(|t| t.shape.first().copied()))
        .unwrap_or(1);
    let [c, h, w] = model.sample_shape().ok_or_else(|| {
        user_error(format!(
            "{}: the sample input '{}' has no fixed [C, H, W]",
            args.model.display(),
            spec.name
        ))
    })?;
    let x_shape = [batch, c, h, w];
    let x = Tensor::from_shape(
        &x_shape,
        &NoiseRng::new(SEED).normal_vec(x_shape.iter().product()),
    )
    .map_err(|e| user_error(format!("{e:#}")))?;
    let sampler: Sampler = args.sampler.parse().map_err(user_error)?;
    let trajectory = model
        .trajectory(sampler, args.steps)
        .map_err(|e| user_error(format!("{}: {e}", args.model.display())))?;
    // A time step from the middle of the trajectory: in S for every file.
    let t = trajectory[trajectory.len() / 2];

    // The first call pays one-time costs (allocations, first touch of the weights); it
    // also tells how slow a call is, which sizes the rest.
    let s = Instant::now();
    model.denoise(&x, t, &cond).map_err(runtime_error)?;
    let first = s.elapsed().as_secs_f64();
    let warmup = if first < SLOW_CALL_S { 3 } else { 1 };
    for _ in 1..warmup {
        model.denoise(&x, t, &cond).map_err(runtime_error)?;
    }
    let runs = args
        .runs
        .unwrap_or_else(|| fitting(first, args.budget, 3, 21));
    let mut steps = Vec::with_capacity(runs);
    for _ in 0..runs {
        let s = Instant::now();
        model.denoise(&x, t, &cond).map_err(runtime_error)?;
        steps.push(s.elapsed());
    }
    let step_min = steps.iter().min().copied().unwrap_or_default();
    let step_ms = median(steps);
    let loop_runs = args.loop_runs.unwrap_or_else(|| {
        let per_loop = step_ms * 1e-3 * trajectory.len() as f64;
        if per_loop > args.budget {
            0
        } else {
            fitting(per_loop, args.budget, 1, 3)
        }
    });
    let mut loops = Vec::with_capacity(loop_runs);
    for _ in 0..loop_runs {
        let s = Instant::now();
        model
            .sample(SEED, args.steps, &cond, batch, sampler)
            .map_err(runtime_error)?;
        loops.push(s.elapsed());
    }
    // Read before profiling: the profiled steps must not raise the peak.
    let peak_rss_mb = status_mb("VmHWM");
    let profile = if args.profile {
        let profiled = if step_ms * 1e-3 < SLOW_CALL_S {
            runs
        } else {
            1
        };
        Some(profile_ops(&model, &x, t, &cond, profiled)?)
    } else {
        None
    };
    let (resident, as_f32) = model.engine().int8_weight_bytes();
    let ac = &model.schedule().alphas_cumprod;
    let ts = model.timestep_input();
    let t_shape: Vec<usize> = match ts.shape.as_deref() {
        Some([]) => vec![],
        Some([Some(1)]) => vec![1],
        _ => vec![batch],
    };
    let out = WorkerOutput {
        measured: Measured {
            batch,
            t,
            steps: trajectory.len(),
            timing: Timing {
                warmup,
                runs,
                step_ms,
                step_ms_min: step_min.as_secs_f64() * 1e3,
                loop_runs,
                loop_ms: (!loops.is_empty()).then(|| median(loops)),
                peak_rss_mb,
                base_rss_mb: base,
                load_rss_mb: anon.zip(loaded).map(|(b, l)| l - b),
                load_s,
            },
            int8_ops: Some(model.int8_ops()),
            int8_weights: Some(Int8Weights {
                resident,
                f32: as_f32,
            }),
            resident_by_kind: Some(model.engine().resident_bytes().into()),
            profile,
        },
        // For the onnxruntime runs of the same model.
        plan: PlanInputs {
            sample_input: spec.name.clone(),
            x_shape,
            timestep_input: ts.name.clone(),
            t_dtype: numpy_dtype(ts.dtype.unwrap_or(tract_onnx::prelude::DatumType::I64)).into(),
            t_shape,
            alphas_cumprod: trajectory.iter().map(|&t| ac[t as usize]).collect(),
            trajectory,
        },
    };
    println!("{}", serde_json::to_string(&out).expect("json"));
    Ok(())
}
