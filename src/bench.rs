//! `tfmqc bench`: time and memory of the runtime's int8 path against tract float (and
//! onnxruntime float and int8 where installed), as ratios from one run (DESIGN.md §9).
//!
//! Every engine runs in a child process of its own (this binary re-executed with the
//! hidden `bench-worker` subcommand, or python with scripts/bench_ort.py), so the peak RSS
//! of one run (VmHWM) is not raised by another's. Runs go one after the other, never
//! side by side.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use clap::Args;
use serde_json::{json, Value};
use tfmqc_passes::ir::DType;
use tfmqc_runtime::{Denoiser, NoiseRng, Sampler, Tensor};

use crate::{user_error, Failure};

/// The engines, in the order they run; ratios are against the first.
pub const ENGINES: [&str; 5] = [
    "tract-float",
    "tfmqc-int8",
    "ort-float",
    "ort-int8",
    "ort-int8-own",
];
/// The engines run when --engines is not given (ort-int8-own needs a calibration run and
/// onnxruntime's quantizer first: asked for by name).
const DEFAULT_ENGINES: [&str; 4] = ["tract-float", "tfmqc-int8", "ort-float", "ort-int8"];
const ORT_SCRIPT: &str = include_str!("../scripts/bench_ort.py");
/// Its onnxruntime quantize_static helpers make the ort-int8-own file.
const COMPARE_QUANT_SCRIPT: &str = include_str!("../scripts/compare_quant.py");
/// Seed of the noisy samples (every engine gets the same).
const SEED: u64 = 0;

/// Measure per-step and whole-sampling-loop time and peak memory.
///
/// MODEL is a float model. The int8 engines run its quantized form: the file given with
/// --quantized (one per MODEL, in order), else one made with the default pipeline
/// (`tfmqc MODEL -o TMP --timesteps SPEC --calib-samples N`; said on stderr). Conditioning
/// inputs and the batch come from MODEL's `.inputs.safetensors` beside it, if any.
///
/// Engines: tract-float (tract on MODEL), tfmqc-int8 (the runtime on the quantized
/// file), ort-float and ort-int8 (onnxruntime on the same two files, when the python of
/// TFMQC_PYTHON or target/pyenv imports it; skipped with a note otherwise), and, only
/// when --engines names it, ort-int8-own: onnxruntime on the file its own quantizer makes
/// (`onnxruntime.quantization.quantize_static`: QDQ, per-channel int8 weights, uint8
/// activations, MinMax, nothing left in float) from the same calibration records as the
/// quantized file (tfmqc's --dump-calib of the run that makes it; with --quantized, of a
/// calibration-only run with --calib-samples), the int8 file an onnxruntime user makes
/// first (scripts/compare_quant.py's `quantize_own`; onnx and onnxruntime.quantization
/// must import too).
///
/// How long it runs: each engine makes one untimed warm-up call (three when a call takes
/// under a second), then --runs timed calls and --loop-runs timed sampling loops. Left
/// unset, both adapt to the model so that each takes about --budget seconds per engine
/// and thread count: --runs is 21, or as many as fit (at least 3); --loop-runs is 3, or
/// as many as fit, or 0 (said on stderr) when one loop of --steps steps takes longer. On
/// an SD-1.5-size UNet at latent 64 (20-60 s a step in tract float) that is the warm-up
/// and 3 timed calls, no loop. The JSON records what each run did.
///
/// Engine runs that fail (out of memory, a file an engine cannot load) are reported with
/// the reason, the other engines still run, and the exit code is 1. --memory-limit caps
/// each engine's process, so one that would need more fails instead of pushing a shared
/// machine into swap or the kernel's out-of-memory killer.
///
/// `--json` prints one object on stdout: `runs`, one per engine (`tract-float`,
/// `tfmqc-int8`, `ort-float`, `ort-int8`, `ort-int8-own`), model and thread count,
/// with `engine`, `model`, `file`, `threads`, `batch`, `t`, `steps`, `warmup` (untimed
/// calls), `runs` (timed calls), `step_ms` (their median), `step_ms_min`, `loop_runs`,
/// `loop_ms` (median of the DDIM loops of --steps steps through Denoiser::sample; null
/// when none ran), `peak_rss_mb`
/// (VmHWM of the engine's own process), `base_rss_mb` (VmRSS before loading: the
/// binary or interpreter), `load_rss_mb` (anonymous RSS the loaded model holds: RssAnon
/// after loading, free heap released, minus before), `load_s`, `weight_bytes` (initializers of the file: `float`,
/// `int8`, `other`), `int8_ops` and `int8_weights` (`resident`: bytes the runtime's int8
/// nodes hold, packed, with scales and biases; `f32`: the same weights in f32; null for
/// onnxruntime); `runs_per_step` (--runs, null when adaptive), `budget_s`; `failed`,
/// one per engine run that failed (`engine`, `model`, `file`, `threads`, `reason`);
/// `ratios`, one per non-reference run, against
/// tract-float of the same model and thread count: `step_speedup`, `loop_speedup`
/// (float time / engine time), `peak_rss_ratio`, `load_rss_ratio`, `weight_bytes_ratio`
/// (engine / float); `skipped` (engine, reason) and `machine` (`cpu`, `arch`, `avx2`,
/// `int8_backend`: the kernels the runtime runs here, `cores`).
#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Float ONNX models.
    #[arg(value_name = "MODEL", required = true)]
    models: Vec<PathBuf>,
    /// The quantized form of each MODEL, in order (repeat once per MODEL).
    #[arg(long, value_name = "FILE")]
    quantized: Vec<PathBuf>,
    /// Print one JSON object on stdout (the table still goes to stderr).
    #[arg(long)]
    json: bool,
    /// Thread counts, comma-separated; each engine runs once per count.
    #[arg(long, default_value = "1,2", value_name = "LIST")]
    threads: String,
    /// Timed denoiser calls per run (the median is reported) [default: 21, fewer when
    /// they would take over --budget, at least 3].
    #[arg(long, value_name = "N")]
    runs: Option<usize>,
    /// Steps of the timed sampling loop.
    #[arg(long, default_value_t = 20, value_name = "N")]
    steps: usize,
    /// Timed sampling loops per run (the median is reported); 0 skips the loop [default:
    /// 3, fewer when they would take over --budget, 0 when one loop does].
    #[arg(long, value_name = "N")]
    loop_runs: Option<usize>,
    /// Seconds of timed calls (and, apart, of timed loops) each engine may take per
    /// thread count when --runs / --loop-runs are not given.
    #[arg(long, default_value_t = 60.0, value_name = "SECONDS")]
    budget: f64,
    /// Most memory, in MiB, each engine's process may allocate (its heap and anonymous
    /// memory: RLIMIT_DATA; memory-mapped model files are not counted). An engine that
    /// needs more fails with an out-of-memory error. Linux only.
    #[arg(long, value_name = "MIB")]
    memory_limit: Option<u64>,
    /// The sampler of the timed loop: ddim, ddpm, euler or dpm++ (the runtime's, under
    /// each model's scheduler configuration).
    #[arg(long, default_value = "ddim", value_parser = ["ddim", "ddpm", "euler", "dpm++"])]
    sampler: String,
    /// Engines to run, comma-separated: tract-float, tfmqc-int8, ort-float, ort-int8,
    /// ort-int8-own (default: all but ort-int8-own; onnxruntime ones when installed).
    #[arg(long, value_name = "LIST")]
    engines: Option<String>,
    /// Time-step set S of the quantized files made here (default: the pipeline's, every
    /// step the samplers visit at 20, 25, 30 and 50 steps).
    #[arg(long, value_name = "SPEC")]
    timesteps: Option<String>,
    /// Calibration trajectories of the quantized files made here (speed does not
    /// depend on them; use `tfmqc` itself for a file to ship).
    #[arg(long, default_value_t = 8, value_name = "N")]
    calib_samples: usize,
    /// Also time every node of one step (tract engines: the runtime's own plan), and
    /// print the N op kinds that take longest per engine; in the JSON, each tract run
    /// gains `profile`: every op kind with `op`, `nodes` and `ms` (per step, mean over
    /// the profiled steps: as many as were timed, one when a step takes over a second).
    #[arg(long, value_name = "N")]
    profile: Option<usize>,
}

/// One engine on one file in this process: what `tfmqc bench` runs in its children.
#[derive(Args, Debug)]
pub struct WorkerArgs {
    #[arg(long)]
    engine: String,
    #[arg(long)]
    model: PathBuf,
    /// Conditioning inputs (safetensors).
    #[arg(long)]
    inputs: Option<PathBuf>,
    #[arg(long)]
    threads: usize,
    /// Timed calls (default: adaptive, see `tfmqc bench --help`).
    #[arg(long)]
    runs: Option<usize>,
    #[arg(long)]
    steps: usize,
    #[arg(long, default_value = "ddim")]
    sampler: String,
    #[arg(long)]
    loop_runs: Option<usize>,
    #[arg(long, default_value_t = 60.0)]
    budget: f64,
    /// Time every node over more steps (as many as were timed, one when a step takes
    /// over a second) and add `profile` to the result.
    #[arg(long)]
    profile: bool,
}

/// Calls of `per_call` seconds that fit in `budget` seconds, between `min` and `max`.
pub fn fitting(per_call: f64, budget: f64, min: usize, max: usize) -> usize {
    if per_call <= 0.0 {
        return max;
    }
    ((budget / per_call).floor() as usize).clamp(min, max)
}

/// A call slower than this is an SD-class one: one warm-up call, one profiled step.
const SLOW_CALL_S: f64 = 1.0;

/// Time per op kind over `runs` profiled steps: `[{op, nodes, ms}]`, ms per step, the
/// longest first.
fn profile_ops(
    model: &Denoiser,
    x: &Tensor,
    t: i64,
    cond: &[(&str, Tensor)],
    runs: usize,
) -> Result<Value, Failure> {
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
    Ok(Value::Array(
        ops.into_iter()
            .map(|(op, (nodes, ms))| json!({"op": op, "nodes": nodes, "ms": ms}))
            .collect(),
    ))
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
    let out = json!({
        "batch": batch,
        "t": t,
        "steps": trajectory.len(),
        "warmup": warmup,
        "runs": runs,
        "step_ms": step_ms,
        "step_ms_min": step_min.as_secs_f64() * 1e3,
        "loop_runs": loop_runs,
        "loop_ms": (!loops.is_empty()).then(|| median(loops)),
        "peak_rss_mb": peak_rss_mb,
        "base_rss_mb": base,
        "load_rss_mb": anon.zip(loaded).map(|(b, l)| l - b),
        "load_s": load_s,
        "int8_ops": model.int8_ops(),
        "int8_weights": {"resident": resident, "f32": as_f32},
        "profile": profile,
        // For the onnxruntime runs of the same model.
        "plan": {
            "sample_input": spec.name,
            "x_shape": x_shape,
            "timestep_input": ts.name,
            "t_dtype": numpy_dtype(ts.dtype.unwrap_or(tract_onnx::prelude::DatumType::I64)),
            "t_shape": t_shape,
            "trajectory": trajectory,
            "alphas_cumprod": trajectory.iter().map(|&t| ac[t as usize]).collect::<Vec<f64>>(),
        },
    });
    println!("{out}");
    Ok(())
}

/// Parses `--threads 1,2`.
pub fn parse_threads(spec: &str) -> Result<Vec<usize>, Failure> {
    let bad = |s: &str| {
        user_error(format!(
            "--threads {spec}: '{s}' is not a thread count (give counts of at least 1, comma-separated, e.g. 1,2)"
        ))
    };
    let v = spec
        .split(',')
        .map(|s| match s.trim().parse::<usize>() {
            Ok(n) if n >= 1 => Ok(n),
            _ => Err(bad(s)),
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(v)
}

/// Initializer bytes by kind: float (f16/f32/f64), int8 (8 bits and less), other.
fn weight_bytes(model: &tfmqc_passes::Model) -> Value {
    let (mut float, mut int8, mut other) = (0usize, 0usize, 0usize);
    for t in model.graph.initializers.values() {
        let n = t.byte_len();
        match t.dtype {
            DType::F32 | DType::F16 | DType::F64 | DType::BF16 => float += n,
            DType::I8 | DType::U8 | DType::I4 | DType::U4 => int8 += n,
            _ => other += n,
        }
    }
    json!({"float": float, "int8": int8, "other": other})
}

fn qdq_nodes(model: &tfmqc_passes::Model) -> usize {
    let ops = model.graph.op_counts();
    ops.get("QuantizeLinear").copied().unwrap_or(0)
        + ops.get("DequantizeLinear").copied().unwrap_or(0)
}

/// The python that runs the onnxruntime engines (and, with `quantizer`, onnxruntime's
/// quantize_static for ort-int8-own), or why there is none.
fn ort_python(quantizer: bool) -> Result<PathBuf, String> {
    let python = match std::env::var_os("TFMQC_PYTHON") {
        Some(p) => PathBuf::from(p),
        None => {
            // target/pyenv (made by scripts/test.sh): beside this binary's profile folder
            // (target/release/tfmqc), else under the current folder; else python3.
            let exe = std::env::current_exe().map_err(|e| e.to_string())?;
            let beside = exe
                .parent()
                .and_then(Path::parent)
                .map(|d| d.join("pyenv/bin/python"));
            let here = PathBuf::from("target/pyenv/bin/python");
            beside
                .into_iter()
                .chain([here])
                .find(|p| p.exists())
                .unwrap_or_else(|| PathBuf::from("python3"))
        }
    };
    let (check, what) = if quantizer {
        (
            "import onnxruntime, numpy, safetensors, onnx, onnxruntime.quantization",
            "onnxruntime, onnxruntime.quantization, onnx, numpy and safetensors",
        )
    } else {
        (
            "import onnxruntime, numpy, safetensors",
            "onnxruntime, numpy and safetensors",
        )
    };
    let out = Command::new(&python).args(["-c", check]).output();
    match out {
        Ok(o) if o.status.success() => Ok(python),
        Ok(o) => Err(format!(
            "{} cannot import {what} ({}); set TFMQC_PYTHON to a python that can (scripts/test.sh makes target/pyenv)",
            python.display(),
            String::from_utf8_lossy(&o.stderr)
                .lines()
                .last()
                .unwrap_or("")
                .trim()
        )),
        Err(e) => Err(format!(
            "{}: {e}; set TFMQC_PYTHON to a python with onnxruntime (scripts/test.sh makes target/pyenv)",
            python.display()
        )),
    }
}

/// What lines that say a process ran out of memory contain (compared in lower case):
/// Rust's and OpenBLAS's allocation failures, Python's MemoryError, onnxruntime's (C++
/// `bad_alloc` or its own message), a failed mmap, thread stack or library load.
const OOM_MARKERS: [&str; 7] = [
    "memory allocation",
    "memoryerror",
    "failed to allocate",
    "bad_alloc",
    "cannot allocate memory",
    "out of memory",
    "failed to map segment",
];

/// Why a child failed, in one line: out of memory (whichever way it showed: an abort
/// after a failed allocation, an exception, the kernel's OOM killer), a panic, or the
/// error it printed last.
fn child_failure(status: &std::process::ExitStatus, stderr: &str) -> String {
    let lines: Vec<&str> = stderr
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    let last = lines
        .last()
        .map(|l| l.trim_start_matches("tfmqc: error: ").to_string())
        .unwrap_or_else(|| "no message".into());
    let oom = lines.iter().find(|l| {
        let l = l.to_lowercase();
        OOM_MARKERS.iter().any(|m| l.contains(m))
    });
    #[cfg(unix)]
    let signal = std::os::unix::process::ExitStatusExt::signal(status);
    #[cfg(not(unix))]
    let signal: Option<i32> = None;
    if let Some(line) = oom {
        return format!(
            "out of memory: {}",
            line.trim_start_matches("tfmqc: error: ")
        );
    }
    match signal {
        // SIGKILL with nothing said: the kernel's out-of-memory killer (or a user).
        Some(9) => {
            "killed (SIGKILL), most likely by the kernel's out-of-memory killer: the machine ran out of memory (--memory-limit makes this an error of the engine instead)".into()
        }
        Some(n) => format!("killed by signal {n}: {last}"),
        None => {
            // A Rust panic: its message, not the backtrace hint after it.
            if let Some(k) = lines.iter().position(|l| l.contains("panicked at")) {
                let what = lines.get(k + 1).copied().unwrap_or(lines[k]);
                return format!("internal error (panic): {what}");
            }
            last
        }
    }
}

/// Runs a child and parses the JSON object it prints last on stdout. A child that
/// fails gives its exit code (1 unless it failed internally) and why ([`child_failure`]).
fn run_child(mut cmd: Command, what: &str) -> Result<Value, Failure> {
    let out = cmd.output().map_err(|e| Failure {
        code: 2,
        message: format!("{what}: cannot start: {e}"),
    })?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        let why = child_failure(&out.status, &stderr);
        return Err(Failure {
            code: if out.status.code() == Some(2) && !why.starts_with("out of memory") {
                2
            } else {
                1
            },
            message: why,
        });
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .unwrap_or("");
    serde_json::from_str(line).map_err(|e| Failure {
        code: 2,
        message: format!("unreadable result ({e}): {stdout}{stderr}"),
    })
}

/// Caps the heap a child may allocate (RLIMIT_DATA: brk and private writable mappings
/// since Linux 4.7; read-only maps of model files are not counted), so that an engine
/// needing more fails with an allocation error instead of exhausting the machine.
fn limit_memory(cmd: &mut Command, mib: Option<u64>) -> Result<(), Failure> {
    let Some(mib) = mib else { return Ok(()) };
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::process::CommandExt;
        let bytes = mib.saturating_mul(1 << 20) as libc::rlim_t;
        // SAFETY: the closure runs in the child between fork and exec and only calls
        // setrlimit, which is async-signal-safe.
        unsafe {
            cmd.pre_exec(move || {
                let limit = libc::rlimit {
                    rlim_cur: bytes,
                    rlim_max: bytes,
                };
                if libc::setrlimit(libc::RLIMIT_DATA, &limit) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        Ok(())
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = (cmd, mib);
        Err(user_error("--memory-limit works on Linux only"))
    }
}

/// The float and quantized files of one MODEL.
struct Pair {
    name: String,
    float: PathBuf,
    quant: PathBuf,
    inputs: Option<PathBuf>,
    float_weights: Value,
    quant_weights: Value,
    /// The file of onnxruntime's own quantizer (ort-int8-own), when asked for.
    own: Option<PathBuf>,
    own_weights: Value,
}

fn load_model(path: &Path) -> Result<tfmqc_passes::Model, Failure> {
    if !path.exists() {
        return Err(user_error(format!("{}: no such file", path.display())));
    }
    Ok(tfmqc_passes::onnx::load(path)?)
}

fn prepare(
    args: &BenchArgs,
    k: usize,
    work: &Path,
    need_quant: bool,
    need_own: bool,
    python: Option<&Path>,
) -> Result<Pair, Failure> {
    let float = args.models[k].clone();
    let fm = load_model(&float)?;
    if qdq_nodes(&fm) > 0 {
        return Err(user_error(format!(
            "{}: already quantized (it has QuantizeLinear/DequantizeLinear nodes); give the float model as MODEL and this file with --quantized",
            float.display()
        )));
    }
    let name = float
        .file_stem()
        .map(|s| s.to_string_lossy().to_string())
        .unwrap_or_default();
    let inputs = float.with_file_name(format!("{name}.inputs.safetensors"));
    let inputs = inputs.exists().then_some(inputs);
    // Calibration records of the quantized file made here, for ort-int8-own.
    let calib = work.join(format!("{k}-{name}.calib.safetensors"));
    let quant = match args.quantized.get(k) {
        Some(q) => q.clone(),
        None if !need_quant && !need_own => float.clone(),
        None => {
            let q = work.join(format!("{k}-{name}.q.onnx"));
            eprintln!(
                "tfmqc bench: quantizing {} with the default pipeline ({}--calib-samples {}; give --quantized FILE to skip this)",
                float.display(),
                args.timesteps
                    .as_ref()
                    .map(|t| format!("--timesteps {t} "))
                    .unwrap_or_default(),
                args.calib_samples
            );
            let exe = crate::self_exe()
                .map_err(|e| user_error(format!("finding the tfmqc binary: {e}")))?;
            let mut cmd = Command::new(exe);
            cmd.arg(&float)
                .arg("-o")
                .arg(&q)
                .args(["--calib-samples", &args.calib_samples.to_string()]);
            if let Some(t) = &args.timesteps {
                cmd.args(["--timesteps", t]);
            }
            if need_own {
                cmd.arg("--dump-calib").arg(&calib);
            }
            run_quantize(cmd, &float)?;
            q
        }
    };
    let own = if need_own {
        if !calib.exists() {
            // --quantized given: a calibration-only run of the same settings gives records.
            eprintln!(
                "tfmqc bench: calibrating {} for onnxruntime's quantizer (--calib-samples {})",
                float.display(),
                args.calib_samples
            );
            let exe = std::env::current_exe()
                .map_err(|e| user_error(format!("finding the tfmqc binary: {e}")))?;
            let mut cmd = Command::new(exe);
            cmd.arg(&float)
                .arg("-o")
                .arg(work.join(format!("{k}-{name}.calibrated.onnx")))
                .args(["--passes", "canonicalize,detect-tib,fold-tib,calibrate"])
                .args(["--reconstruct", "none"])
                .args(["--calib-samples", &args.calib_samples.to_string()])
                .arg("--dump-calib")
                .arg(&calib);
            if let Some(t) = &args.timesteps {
                cmd.args(["--timesteps", t]);
            }
            run_quantize(cmd, &float)?;
        }
        let python = python.expect("ort-int8-own runs with a python");
        Some(ort_quantize_own(python, &float, &calib, work, k, &name)?)
    } else {
        None
    };
    let own_weights = match &own {
        Some(p) => weight_bytes(&load_model(p)?),
        None => Value::Null,
    };
    let qm = load_model(&quant)?;
    if need_quant && qdq_nodes(&qm) == 0 {
        return Err(user_error(format!(
            "{}: not a quantized model (no QuantizeLinear/DequantizeLinear nodes); give a file written by `tfmqc MODEL -o FILE`",
            quant.display()
        )));
    }
    Ok(Pair {
        name,
        float,
        quant,
        inputs,
        float_weights: weight_bytes(&fm),
        quant_weights: weight_bytes(&qm),
        own,
        own_weights,
    })
}

/// onnxruntime's quantize_static on `float` from the records `calib` (scripts/
/// compare_quant.py's `quantize_own`, run from a copy in `work`); returns the file.
fn ort_quantize_own(
    python: &Path,
    float: &Path,
    calib: &Path,
    work: &Path,
    k: usize,
    name: &str,
) -> Result<PathBuf, Failure> {
    let script = work.join("compare_quant.py");
    if !script.exists() {
        std::fs::write(&script, COMPARE_QUANT_SCRIPT)
            .map_err(|e| user_error(format!("{}: {e}", script.display())))?;
    }
    let out = work.join(format!("{k}-{name}.ort-own.onnx"));
    let own_dir = work.join(format!("{k}-{name}.ort-own"));
    eprintln!(
        "tfmqc bench: quantizing {} with onnxruntime's quantize_static (QDQ, per-channel, MinMax) on the same calibration records",
        float.display()
    );
    let driver = "import sys, json; sys.path.insert(0, sys.argv[1]); import compare_quant as cq; \
                  print(json.dumps(cq.quantize_own(*sys.argv[2:6])))";
    let abs = |p: &Path| std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
    let result = Command::new(python)
        .args(["-c", driver])
        .arg(work)
        .arg(abs(float))
        .arg(abs(calib))
        .arg(abs(&out))
        .arg(abs(&own_dir))
        .output()
        .map_err(|e| user_error(format!("{}: {e}", python.display())))?;
    if !result.status.success() || !out.exists() {
        return Err(user_error(format!(
            "onnxruntime's quantize_static on {} failed: {}",
            float.display(),
            child_failure(&result.status, &String::from_utf8_lossy(&result.stderr))
        )));
    }
    Ok(out)
}

fn run_quantize(mut cmd: Command, float: &Path) -> Result<(), Failure> {
    let out = cmd.output().map_err(|e| Failure {
        code: 2,
        message: format!("quantizing {}: {e}", float.display()),
    })?;
    if !out.status.success() {
        return Err(Failure {
            code: out.status.code().map(|c| c as u8).unwrap_or(2).max(1),
            message: format!(
                "quantizing {} failed:\n{}",
                float.display(),
                String::from_utf8_lossy(&out.stderr)
            ),
        });
    }
    Ok(())
}

/// A folder for the quantized files made here, removed when the bench ends.
struct WorkDir(PathBuf);

impl WorkDir {
    fn new() -> Result<WorkDir, Failure> {
        let dir = std::env::temp_dir().join(format!("tfmqc-bench-{}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|e| user_error(format!("{}: {e}", dir.display())))?;
        Ok(WorkDir(dir))
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn machine() -> Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string());
    #[cfg(target_arch = "x86_64")]
    let avx2 = std::arch::is_x86_feature_detected!("avx2");
    #[cfg(not(target_arch = "x86_64"))]
    let avx2 = false;
    // The int8 kernels the runtime runs here (TFMQC_INT8_BACKEND may cap them).
    let int8_backend = tfmqc_runtime::kernels::int8::Backend::detect().name();
    json!({
        "cpu": cpu,
        "arch": std::env::consts::ARCH,
        "avx2": avx2,
        "int8_backend": int8_backend,
        "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
    })
}

fn ratio(num: &Value, den: &Value) -> Value {
    match (num.as_f64(), den.as_f64()) {
        (Some(a), Some(b)) if b > 0.0 => json!(a / b),
        _ => Value::Null,
    }
}

fn total_weights(w: &Value) -> Value {
    json!(w["float"].as_u64().unwrap_or(0) + w["int8"].as_u64().unwrap_or(0))
}

pub fn run(args: &BenchArgs) -> Result<(), Failure> {
    let threads = parse_threads(&args.threads)?;
    if args.runs == Some(0) || args.steps == 0 {
        return Err(user_error("--runs and --steps must be at least 1"));
    }
    if !args.budget.is_finite() || args.budget <= 0.0 {
        return Err(user_error("--budget must be a positive number of seconds"));
    }
    if args.memory_limit == Some(0) {
        return Err(user_error("--memory-limit must be at least 1 MiB"));
    }
    if args.quantized.len() > args.models.len() {
        return Err(user_error(format!(
            "{} --quantized files for {} models: give at most one per MODEL, in order",
            args.quantized.len(),
            args.models.len()
        )));
    }
    let requested: Vec<String> = match &args.engines {
        None => DEFAULT_ENGINES.iter().map(|s| s.to_string()).collect(),
        Some(list) => list.split(',').map(|s| s.trim().to_string()).collect(),
    };
    for e in &requested {
        if !ENGINES.contains(&e.as_str()) {
            return Err(user_error(format!(
                "--engines: unknown engine '{e}' (the engines are {})",
                ENGINES.join(", ")
            )));
        }
    }
    let mut skipped = vec![];
    let wants_ort = requested.iter().any(|e| e.starts_with("ort-"));
    let wants_own = requested.iter().any(|e| e == "ort-int8-own");
    let python = if wants_ort {
        match ort_python(wants_own) {
            Ok(p) => Some(p),
            Err(why) if args.engines.is_some() => {
                return Err(user_error(format!("--engines asks for onnxruntime: {why}")))
            }
            Err(why) => {
                eprintln!("tfmqc bench: onnxruntime engines skipped: {why}");
                for e in requested.iter().filter(|e| e.starts_with("ort-")) {
                    skipped.push(json!({"engine": e, "reason": why}));
                }
                None
            }
        }
    } else {
        None
    };
    let engines: Vec<&str> = ENGINES
        .iter()
        .copied()
        .filter(|e| requested.iter().any(|r| r == e))
        .filter(|e| !e.starts_with("ort-") || python.is_some())
        .collect();
    let need_quant = engines.iter().any(|e| e.ends_with("-int8"));
    let need_own = engines.contains(&"ort-int8-own");
    let work = WorkDir::new()?;
    let pairs = (0..args.models.len())
        .map(|k| prepare(args, k, &work.0, need_quant, need_own, python.as_deref()))
        .collect::<Result<Vec<_>, _>>()?;
    let exe =
        crate::self_exe().map_err(|e| user_error(format!("finding the tfmqc binary: {e}")))?;

    let mut runs: Vec<Value> = vec![];
    let mut failed: Vec<Value> = vec![];
    for pair in &pairs {
        for &n in &threads {
            // The plan (batch, t, trajectory) of the first tract run: onnxruntime
            // repeats it on the same files.
            let mut plan: Option<Value> = None;
            for &engine in &engines {
                let file = match engine {
                    "ort-int8-own" => pair.own.as_ref().expect("made by prepare"),
                    e if e.ends_with("-int8") => &pair.quant,
                    _ => &pair.float,
                };
                let what = format!("{engine} on {} ({n} thread(s))", file.display());
                eprintln!("tfmqc bench: {what}");
                let result = run_engine(
                    args,
                    engine,
                    pair,
                    file,
                    n,
                    &exe,
                    python.as_deref(),
                    &mut plan,
                );
                let mut result = match result {
                    Ok(r) => r,
                    Err(f) => {
                        // One engine failing (out of memory, a file it cannot load) does
                        // not hide what the others measure.
                        eprintln!("tfmqc bench: {what} failed: {}", f.message);
                        failed.push(json!({
                            "engine": engine,
                            "model": pair.name,
                            "file": file,
                            "threads": n,
                            "reason": f.message,
                        }));
                        continue;
                    }
                };
                let loops = match result["loop_runs"].as_u64() {
                    Some(0) if args.loop_runs.is_none() => format!(
                        "sampling loop skipped ({} steps would take over --budget {} s; --loop-runs 1 times one)",
                        args.steps, args.budget
                    ),
                    Some(n) => format!("{n} sampling loop(s)"),
                    None => "no sampling loop".into(),
                };
                eprintln!(
                    "tfmqc bench:   {} warm-up + {} timed calls, median {:.1} ms; {loops}; peak RSS {:.0} MB",
                    result["warmup"],
                    result["runs"],
                    result["step_ms"].as_f64().unwrap_or(f64::NAN),
                    result["peak_rss_mb"].as_f64().unwrap_or(f64::NAN)
                );
                let weights = match engine {
                    "ort-int8-own" => &pair.own_weights,
                    e if e.ends_with("-int8") => &pair.quant_weights,
                    _ => &pair.float_weights,
                };
                let obj = result.as_object_mut().ok_or_else(|| Failure {
                    code: 2,
                    message: format!("{what}: the result is not an object"),
                })?;
                let mut run = serde_json::Map::new();
                run.insert("engine".into(), json!(engine));
                run.insert("model".into(), json!(pair.name));
                run.insert("file".into(), json!(file));
                run.insert("threads".into(), json!(n));
                run.append(obj);
                run.insert("weight_bytes".into(), weights.clone());
                runs.push(Value::Object(run));
            }
        }
    }
    let ratios = ratios(&runs);
    eprint!("{}", table(&runs));
    if let Some(top) = args.profile {
        eprint!("{}", profile_table(&runs, top));
    }
    if args.json {
        let obj = json!({
            "machine": machine(),
            "steps": args.steps,
            "runs_per_step": args.runs,
            "budget_s": args.budget,
            "runs": runs,
            "ratios": ratios,
            "skipped": skipped,
            "failed": failed,
        });
        println!("{}", serde_json::to_string_pretty(&obj).expect("json"));
    }
    if !failed.is_empty() {
        let list: Vec<String> = failed
            .iter()
            .map(|f| {
                format!(
                    "{} on {} ({} thread(s)): {}",
                    f["engine"].as_str().unwrap_or(""),
                    f["file"].as_str().unwrap_or(""),
                    f["threads"],
                    f["reason"].as_str().unwrap_or("")
                )
            })
            .collect();
        return Err(user_error(format!(
            "{} engine run(s) failed:\n  {}",
            failed.len(),
            list.join("\n  ")
        )));
    }
    Ok(())
}

/// One engine on one file at `threads` threads, in a child process; `plan` is the
/// inputs of the first tract run of this model and thread count (onnxruntime repeats
/// them), set here by tract runs.
#[allow(clippy::too_many_arguments)]
fn run_engine(
    args: &BenchArgs,
    engine: &str,
    pair: &Pair,
    file: &Path,
    threads: usize,
    exe: &Path,
    python: Option<&Path>,
    plan: &mut Option<Value>,
) -> Result<Value, Failure> {
    if engine.starts_with("ort-") {
        let Some(plan) = plan.as_ref() else {
            return Err(user_error(
                "no tract engine ran before it (the onnxruntime engines repeat the inputs of one; give one in --engines)",
            ));
        };
        let mut cfg = plan.clone();
        cfg["model"] = json!(file);
        cfg["threads"] = json!(threads);
        cfg["runs"] = json!(args.runs);
        cfg["loop_runs"] = json!(args.loop_runs);
        cfg["budget_s"] = json!(args.budget);
        cfg["seed"] = json!(SEED);
        cfg["inputs"] = json!(pair.inputs);
        let mut cmd = Command::new(python.expect("onnxruntime engines run with a python"));
        cmd.args(["-c", ORT_SCRIPT, &cfg.to_string()]);
        limit_memory(&mut cmd, args.memory_limit)?;
        let mut r = run_child(cmd, engine)?;
        for key in ["batch", "t", "steps"] {
            r[key] = plan[key].clone();
        }
        r["int8_ops"] = Value::Null;
        r["int8_weights"] = Value::Null;
        return Ok(r);
    }
    let mut cmd = Command::new(exe);
    cmd.arg("bench-worker")
        .args(["--engine", engine])
        .arg("--model")
        .arg(file)
        .args(["--threads", &threads.to_string()])
        .args(["--steps", &args.steps.to_string()])
        .args(["--sampler", &args.sampler])
        .args(["--budget", &args.budget.to_string()]);
    if let Some(r) = args.runs {
        cmd.args(["--runs", &r.to_string()]);
    }
    if let Some(l) = args.loop_runs {
        cmd.args(["--loop-runs", &l.to_string()]);
    }
    if let Some(i) = &pair.inputs {
        cmd.arg("--inputs").arg(i);
    }
    if args.profile.is_some() {
        cmd.arg("--profile");
    }
    limit_memory(&mut cmd, args.memory_limit)?;
    let mut r = run_child(cmd, engine)?;
    if args.profile.is_none() {
        r.as_object_mut().map(|o| o.remove("profile"));
    }
    let mut p = r["plan"].take();
    for key in ["batch", "t", "steps"] {
        p[key] = r[key].clone();
    }
    // The quantized file's plan: its t is in S, which the float model accepts too.
    if plan.is_none() || engine.ends_with("-int8") {
        *plan = Some(p);
    }
    r.as_object_mut().expect("an object").remove("plan");
    Ok(r)
}

/// Each run against tract-float of the same model and thread count.
fn ratios(runs: &[Value]) -> Vec<Value> {
    let mut out = vec![];
    for r in runs {
        if r["engine"] == ENGINES[0] {
            continue;
        }
        let Some(f) = runs.iter().find(|f| {
            f["engine"] == ENGINES[0] && f["model"] == r["model"] && f["threads"] == r["threads"]
        }) else {
            continue;
        };
        out.push(json!({
            "engine": r["engine"],
            "model": r["model"],
            "threads": r["threads"],
            "step_speedup": ratio(&f["step_ms"], &r["step_ms"]),
            "loop_speedup": ratio(&f["loop_ms"], &r["loop_ms"]),
            "peak_rss_ratio": ratio(&r["peak_rss_mb"], &f["peak_rss_mb"]),
            "load_rss_ratio": ratio(&r["load_rss_mb"], &f["load_rss_mb"]),
            "weight_bytes_ratio": ratio(&total_weights(&r["weight_bytes"]), &total_weights(&f["weight_bytes"])),
        }));
    }
    out
}

/// Per tract run, its `top` op kinds by time per step.
fn profile_table(runs: &[Value], top: usize) -> String {
    let mut s = String::new();
    for r in runs {
        let Some(ops) = r["profile"].as_array() else {
            continue;
        };
        let total: f64 = ops.iter().filter_map(|o| o["ms"].as_f64()).sum();
        s += &format!(
            "\nprofile: {} on {}, {} thread(s): {total:.2} ms in nodes per step\n",
            r["engine"].as_str().unwrap_or(""),
            r["model"].as_str().unwrap_or(""),
            r["threads"]
        );
        for o in ops.iter().take(top) {
            let ms = o["ms"].as_f64().unwrap_or(0.0);
            s += &format!(
                "  {:>8.3} ms {:>5.1}% {:>4} × {}\n",
                ms,
                100.0 * ms / total.max(1e-12),
                o["nodes"],
                o["op"].as_str().unwrap_or("")
            );
        }
    }
    s
}

/// The human table: one line per run, ratios against tract-float of the same model and
/// thread count (speed-ups: float time / time; memory: engine / float).
fn table(runs: &[Value]) -> String {
    let ratios = ratios(runs);
    let num = |v: &Value, prec: usize| match v.as_f64() {
        Some(x) => format!("{x:.prec$}"),
        None => "-".into(),
    };
    let mut s = format!(
        "{:<22} {:<12} {:>3} {:>9} {:>6} {:>9} {:>6} {:>8} {:>6} {:>8} {:>6} {:>10} {:>6}\n",
        "model",
        "engine",
        "thr",
        "step ms",
        "×",
        "loop ms",
        "×",
        "peak MB",
        "ratio",
        "load MB",
        "ratio",
        "weights MB",
        "ratio"
    );
    for r in runs {
        let q = ratios.iter().find(|q| {
            q["engine"] == r["engine"] && q["model"] == r["model"] && q["threads"] == r["threads"]
        });
        let get = |k: &str| -> Value {
            match q {
                Some(q) => q[k].clone(),
                None if r["engine"] == ENGINES[0] => json!(1.0),
                None => Value::Null,
            }
        };
        let weights_mb = total_weights(&r["weight_bytes"]).as_f64().unwrap_or(0.0) / 1048576.0;
        s += &format!(
            "{:<22} {:<12} {:>3} {:>9} {:>6} {:>9} {:>6} {:>8} {:>6} {:>8} {:>6} {:>10} {:>6}\n",
            r["model"].as_str().unwrap_or(""),
            r["engine"].as_str().unwrap_or(""),
            r["threads"],
            num(&r["step_ms"], 2),
            num(&get("step_speedup"), 2),
            num(&r["loop_ms"], 1),
            num(&get("loop_speedup"), 2),
            num(&r["peak_rss_mb"], 1),
            num(&get("peak_rss_ratio"), 2),
            num(&r["load_rss_mb"], 1),
            num(&get("load_rss_ratio"), 2),
            format!("{weights_mb:.2}"),
            num(&get("weight_bytes_ratio"), 2),
        );
    }
    s += "× = tract-float time / time (higher is faster); ratio = memory / tract-float's (lower is smaller)\n";
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_fit_the_budget_within_bounds() {
        assert_eq!(fitting(0.01, 60.0, 3, 21), 21);
        assert_eq!(fitting(10.0, 60.0, 3, 21), 6);
        assert_eq!(fitting(45.0, 60.0, 3, 21), 3);
        assert_eq!(fitting(100.0, 60.0, 1, 3), 1);
        assert_eq!(fitting(0.0, 60.0, 1, 3), 3);
    }

    #[cfg(unix)]
    fn status(raw: i32) -> std::process::ExitStatus {
        std::os::unix::process::ExitStatusExt::from_raw(raw)
    }

    #[cfg(unix)]
    #[test]
    fn child_failures_say_out_of_memory_however_it_showed() {
        // Rust's abort after a failed allocation (SIGABRT).
        let why = child_failure(
            &status(6),
            "loading\nmemory allocation of 1073741824 bytes failed\n",
        );
        assert_eq!(
            why,
            "out of memory: memory allocation of 1073741824 bytes failed"
        );
        // Python / onnxruntime, exiting 1 with a traceback.
        let why = child_failure(&status(1 << 8), "Traceback ...\n  File x\nMemoryError\n");
        assert_eq!(why, "out of memory: MemoryError");
        // The kernel's OOM killer says nothing.
        assert!(child_failure(&status(9), "").contains("out-of-memory killer"));
    }

    #[cfg(unix)]
    #[test]
    fn child_failures_give_a_panic_message_or_the_last_error() {
        let why = child_failure(
            &status(101 << 8),
            "thread 'main' panicked at src/x.rs:1:1:\nindex out of bounds\nnote: run with `RUST_BACKTRACE=1`\n",
        );
        assert_eq!(why, "internal error (panic): index out of bounds");
        let why = child_failure(&status(1 << 8), "tfmqc: error: m.onnx: no such file\n");
        assert_eq!(why, "m.onnx: no such file");
        assert_eq!(
            child_failure(&status(11), "boom"),
            "killed by signal 11: boom"
        );
    }
}
