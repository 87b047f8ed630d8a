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
pub const ENGINES: [&str; 4] = ["tract-float", "tfmqc-int8", "ort-float", "ort-int8"];
const ORT_SCRIPT: &str = include_str!("../scripts/bench_ort.py");
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
/// TFMQC_PYTHON or target/pyenv imports it; skipped with a note otherwise).
///
/// `--json` prints one object on stdout: `runs`, one per engine, model and thread count,
/// with `engine`, `model`, `file`, `threads`, `batch`, `t`, `steps`, `step_ms` (median of
/// --runs Denoiser::denoise calls after warm-up), `step_ms_min`, `loop_ms` (median of
/// --loop-runs DDIM loops of --steps steps through Denoiser::sample), `peak_rss_mb`
/// (VmHWM of the engine's own process), `base_rss_mb` (VmRSS before loading: the
/// binary or interpreter), `load_rss_mb` (anonymous RSS the loaded model holds: RssAnon
/// after loading, free heap released, minus before), `load_s`, `weight_bytes` (initializers of the file: `float`,
/// `int8`, `other`) and `int8_ops`; `ratios`, one per non-reference run, against
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
    /// Timed denoiser calls per run (the median is reported), after 3 untimed ones.
    #[arg(long, default_value_t = 21, value_name = "N")]
    runs: usize,
    /// Steps of the timed sampling loop.
    #[arg(long, default_value_t = 20, value_name = "N")]
    steps: usize,
    /// The sampler of the timed loop: ddim, ddpm, euler or dpm++ (the runtime's, under
    /// each model's scheduler configuration).
    #[arg(long, default_value = "ddim", value_parser = ["ddim", "ddpm", "euler", "dpm++"])]
    sampler: String,
    /// Timed sampling loops per run (the median is reported); 0 skips the loop.
    #[arg(long, default_value_t = 3, value_name = "N")]
    loop_runs: usize,
    /// Engines to run, comma-separated (default: all; onnxruntime ones when installed).
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
    /// --runs profiled steps).
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
    #[arg(long)]
    runs: usize,
    #[arg(long)]
    steps: usize,
    #[arg(long, default_value = "ddim")]
    sampler: String,
    #[arg(long)]
    loop_runs: usize,
    /// Time every node over --runs more steps and add `profile` to the result.
    #[arg(long)]
    profile: bool,
}

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
    if args.threads == 0 || args.runs == 0 || args.steps == 0 {
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

    const WARMUP: usize = 3;
    for _ in 0..WARMUP {
        model.denoise(&x, t, &cond).map_err(runtime_error)?;
    }
    let mut steps = Vec::with_capacity(args.runs);
    for _ in 0..args.runs {
        let s = Instant::now();
        model.denoise(&x, t, &cond).map_err(runtime_error)?;
        steps.push(s.elapsed());
    }
    let step_min = steps.iter().min().copied().unwrap_or_default();
    let mut loops = Vec::with_capacity(args.loop_runs);
    for _ in 0..args.loop_runs {
        let s = Instant::now();
        model
            .sample(SEED, args.steps, &cond, batch, sampler)
            .map_err(runtime_error)?;
        loops.push(s.elapsed());
    }
    // Read before profiling: the profiled steps must not raise the peak.
    let peak_rss_mb = status_mb("VmHWM");
    let profile = if args.profile {
        Some(profile_ops(&model, &x, t, &cond, args.runs)?)
    } else {
        None
    };
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
        "step_ms": median(steps),
        "step_ms_min": step_min.as_secs_f64() * 1e3,
        "loop_ms": (!loops.is_empty()).then(|| median(loops)),
        "peak_rss_mb": peak_rss_mb,
        "base_rss_mb": base,
        "load_rss_mb": anon.zip(loaded).map(|(b, l)| l - b),
        "load_s": load_s,
        "int8_ops": model.int8_ops(),
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

/// The python that runs the onnxruntime engines, or why there is none.
fn ort_python() -> Result<PathBuf, String> {
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
    let out = Command::new(&python)
        .args(["-c", "import onnxruntime, numpy, safetensors"])
        .output();
    match out {
        Ok(o) if o.status.success() => Ok(python),
        Ok(o) => Err(format!(
            "{} cannot import onnxruntime, numpy and safetensors ({}); set TFMQC_PYTHON to a python that can (scripts/test.sh makes target/pyenv)",
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

/// Runs a child and parses the JSON object it prints last on stdout. A child that
/// fails passes its exit code and last stderr line on.
fn run_child(mut cmd: Command, what: &str) -> Result<Value, Failure> {
    let out = cmd.output().map_err(|e| Failure {
        code: 2,
        message: format!("{what}: cannot start: {e}"),
    })?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        let msg = stderr
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("no message")
            .trim_start_matches("tfmqc: error: ")
            .to_string();
        return Err(Failure {
            code: match out.status.code() {
                Some(1) => 1,
                _ => 2,
            },
            message: format!("{what}: {msg}"),
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
        message: format!("{what}: unreadable result ({e}): {stdout}{stderr}"),
    })
}

/// The float and quantized files of one MODEL.
struct Pair {
    name: String,
    float: PathBuf,
    quant: PathBuf,
    inputs: Option<PathBuf>,
    float_weights: Value,
    quant_weights: Value,
}

fn load_model(path: &Path) -> Result<tfmqc_passes::Model, Failure> {
    if !path.exists() {
        return Err(user_error(format!("{}: no such file", path.display())));
    }
    Ok(tfmqc_passes::onnx::load(path)?)
}

fn prepare(args: &BenchArgs, k: usize, work: &Path, need_quant: bool) -> Result<Pair, Failure> {
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
    let quant = match args.quantized.get(k) {
        Some(q) => q.clone(),
        None if !need_quant => float.clone(),
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
            let exe = std::env::current_exe()
                .map_err(|e| user_error(format!("finding the tfmqc binary: {e}")))?;
            let mut cmd = Command::new(exe);
            cmd.arg(&float)
                .arg("-o")
                .arg(&q)
                .args(["--calib-samples", &args.calib_samples.to_string()]);
            if let Some(t) = &args.timesteps {
                cmd.args(["--timesteps", t]);
            }
            run_quantize(cmd, &float)?;
            q
        }
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
    })
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
    let int8_backend = match tfmqc_runtime::kernels::int8::Backend::detect() {
        tfmqc_runtime::kernels::int8::Backend::Avx512Vnni => "avx512vnni",
        tfmqc_runtime::kernels::int8::Backend::Avx2 => "avx2",
        _ => "portable",
    };
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
    if args.runs == 0 || args.steps == 0 {
        return Err(user_error("--runs and --steps must be at least 1"));
    }
    if args.quantized.len() > args.models.len() {
        return Err(user_error(format!(
            "{} --quantized files for {} models: give at most one per MODEL, in order",
            args.quantized.len(),
            args.models.len()
        )));
    }
    let requested: Vec<String> = match &args.engines {
        None => ENGINES.iter().map(|s| s.to_string()).collect(),
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
    let python = if wants_ort {
        match ort_python() {
            Ok(p) => Some(p),
            Err(why) if args.engines.is_some() => {
                return Err(user_error(format!("--engines asks for onnxruntime: {why}")))
            }
            Err(why) => {
                eprintln!("tfmqc bench: onnxruntime engines skipped: {why}");
                for e in ["ort-float", "ort-int8"] {
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
    let work = WorkDir::new()?;
    let pairs = (0..args.models.len())
        .map(|k| prepare(args, k, &work.0, need_quant))
        .collect::<Result<Vec<_>, _>>()?;
    let exe = std::env::current_exe()
        .map_err(|e| user_error(format!("finding the tfmqc binary: {e}")))?;

    let mut runs: Vec<Value> = vec![];
    for pair in &pairs {
        for &n in &threads {
            // The plan (batch, t, trajectory) of the first tract run: onnxruntime
            // repeats it on the same files.
            let mut plan: Option<Value> = None;
            for &engine in &engines {
                let file = if engine.ends_with("-int8") {
                    &pair.quant
                } else {
                    &pair.float
                };
                let what = format!("{engine} on {} ({n} thread(s))", file.display());
                eprintln!("tfmqc bench: {what}");
                let mut result = if engine.starts_with("ort-") {
                    let Some(plan) = &plan else {
                        return Err(user_error(
                            "the onnxruntime engines need a tract engine in --engines (it fixes the inputs they repeat)",
                        ));
                    };
                    let mut cfg = plan.clone();
                    cfg["model"] = json!(file);
                    cfg["threads"] = json!(n);
                    cfg["runs"] = json!(args.runs);
                    cfg["warmup"] = json!(3);
                    cfg["loop_runs"] = json!(args.loop_runs);
                    cfg["seed"] = json!(SEED);
                    cfg["inputs"] = json!(pair.inputs);
                    let mut cmd = Command::new(python.as_ref().expect("checked above"));
                    cmd.args(["-c", ORT_SCRIPT, &cfg.to_string()]);
                    let mut r = run_child(cmd, &what)?;
                    for key in ["batch", "t", "steps"] {
                        r[key] = plan[key].clone();
                    }
                    r["int8_ops"] = Value::Null;
                    r
                } else {
                    let mut cmd = Command::new(&exe);
                    cmd.arg("bench-worker")
                        .args(["--engine", engine])
                        .arg("--model")
                        .arg(file)
                        .args(["--threads", &n.to_string()])
                        .args(["--runs", &args.runs.to_string()])
                        .args(["--steps", &args.steps.to_string()])
                        .args(["--sampler", &args.sampler])
                        .args(["--loop-runs", &args.loop_runs.to_string()]);
                    if let Some(i) = &pair.inputs {
                        cmd.arg("--inputs").arg(i);
                    }
                    if args.profile.is_some() {
                        cmd.arg("--profile");
                    }
                    let mut r = run_child(cmd, &what)?;
                    if args.profile.is_none() {
                        r.as_object_mut().map(|o| o.remove("profile"));
                    }
                    let mut p = r["plan"].take();
                    for key in ["batch", "t", "steps"] {
                        p[key] = r[key].clone();
                    }
                    // The quantized file's plan: its t is in S, which the float model
                    // accepts too.
                    if plan.is_none() || engine.ends_with("-int8") {
                        plan = Some(p);
                    }
                    r.as_object_mut().expect("an object").remove("plan");
                    r
                };
                let weights = if engine.ends_with("-int8") {
                    &pair.quant_weights
                } else {
                    &pair.float_weights
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
            "runs": runs,
            "ratios": ratios,
            "skipped": skipped,
        });
        println!("{}", serde_json::to_string_pretty(&obj).expect("json"));
    }
    Ok(())
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
