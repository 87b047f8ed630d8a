//! `tfmqc bench`: time and memory of the runtime's int8 path against tract float (and
//! onnxruntime float and int8 where installed), as ratios from one run (DESIGN.md §9).
//!
//! Every engine runs in a child process of its own (this binary re-executed with the
//! hidden `bench-worker` subcommand, or python with scripts/bench_ort.py), so the peak RSS
//! of one run (VmHWM) is not raised by another's. Runs go one after the other, never
//! side by side.

mod child;
mod report;
mod worker;

use std::path::{Path, PathBuf};
use std::process::Command;

use clap::Args;
use serde::Serialize;
use tfmqc_passes::ir::DType;

use crate::{user_error, Failure};
use child::{limit_memory, ort_python, ort_quantize_own, run_child, run_quantize};
use report::{
    BenchReport, Failed, Measured, Plan, Run, Skipped, Timing, WeightBytes, WorkerOutput,
};
pub use worker::worker;

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
/// `int8`, `other`, and `by_kind`: `weights_int`, `float`, `tables` (time-step tables),
/// `scale_tables` (per-step activation scales), `other`, as `tfmqc --report`'s
/// `bytes_by_kind`), `int8_ops` and `int8_weights` (`resident`: bytes the runtime's int8
/// nodes hold, packed, with scales and biases; `f32`: the same weights in f32; null for
/// onnxruntime), `resident_by_kind` (bytes the tract plan holds after loading:
/// `int8_weights` (the int8 nodes', with their scales and per-step scale tables),
/// `tables`, `scale_tables` and `other` constants; weights tract packed into its own
/// float kernels are not constants and are in `load_rss_mb` only; null for onnxruntime); `runs_per_step` (--runs, null when adaptive), `budget_s`; `failed`,
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

/// Initializer bytes by kind: float (f16/f32/f64/bf16), int8 (8 bits and less), other.
fn weight_bytes(model: &tfmqc_passes::Model) -> WeightBytes {
    let (mut float, mut int8, mut other) = (0usize, 0usize, 0usize);
    for t in model.graph.initializers.values() {
        let n = t.byte_len();
        match t.dtype {
            DType::F32 | DType::F16 | DType::F64 | DType::BF16 => float += n,
            DType::I8 | DType::U8 | DType::I4 | DType::U4 => int8 += n,
            _ => other += n,
        }
    }
    WeightBytes {
        float,
        int8,
        other,
        by_kind: crate::report::BytesByKind::of(model),
    }
}

fn qdq_nodes(model: &tfmqc_passes::Model) -> usize {
    let ops = model.graph.op_counts();
    ops.get("QuantizeLinear").copied().unwrap_or(0)
        + ops.get("DequantizeLinear").copied().unwrap_or(0)
}

/// The float and quantized files of one MODEL.
struct Pair {
    name: String,
    float: PathBuf,
    quant: PathBuf,
    inputs: Option<PathBuf>,
    float_weights: WeightBytes,
    quant_weights: WeightBytes,
    /// The file of onnxruntime's own quantizer (ort-int8-own), when asked for.
    own: Option<PathBuf>,
    own_weights: Option<WeightBytes>,
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
        Some(p) => Some(weight_bytes(&load_model(p)?)),
        None => None,
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

pub fn run(args: &BenchArgs) -> Result<(), Failure> {
    let threads = check_args(args)?;
    let mut skipped = vec![];
    let (engines, python) = choose_engines(args, &mut skipped)?;
    let need_quant = engines.iter().any(|e| e.ends_with("-int8"));
    let need_own = engines.contains(&"ort-int8-own");
    let work = WorkDir::new()?;
    let pairs = (0..args.models.len())
        .map(|k| prepare(args, k, &work.0, need_quant, need_own, python.as_deref()))
        .collect::<Result<Vec<_>, _>>()?;
    let exe =
        crate::self_exe().map_err(|e| user_error(format!("finding the tfmqc binary: {e}")))?;
    let mut runs: Vec<Run> = vec![];
    let mut failed: Vec<Failed> = vec![];
    for pair in &pairs {
        for &n in &threads {
            let ctx = EngineRun {
                args,
                pair,
                threads: n,
                exe: &exe,
                python: python.as_deref(),
            };
            measure_pair(&ctx, &engines, &mut runs, &mut failed)?;
        }
    }
    report(args, &runs, &skipped, &failed)
}

/// The thread counts, once every option is checked.
fn check_args(args: &BenchArgs) -> Result<Vec<usize>, Failure> {
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
    Ok(threads)
}

/// The engines to run, in [`ENGINES`] order, and the python of the onnxruntime ones;
/// onnxruntime engines left out for want of a python (when --engines did not ask for
/// them by name) go to `skipped`.
fn choose_engines(
    args: &BenchArgs,
    skipped: &mut Vec<Skipped>,
) -> Result<(Vec<&'static str>, Option<PathBuf>), Failure> {
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
                    skipped.push(Skipped {
                        engine: e.clone(),
                        reason: why.clone(),
                    });
                }
                None
            }
        }
    } else {
        None
    };
    let engines = ENGINES
        .iter()
        .copied()
        .filter(|e| requested.iter().any(|r| r == e))
        .filter(|e| !e.starts_with("ort-") || python.is_some())
        .collect();
    Ok((engines, python))
}

/// What every engine run of one model at one thread count shares.
struct EngineRun<'a> {
    args: &'a BenchArgs,
    pair: &'a Pair,
    threads: usize,
    exe: &'a Path,
    python: Option<&'a Path>,
}

/// Runs each engine on its file of `ctx.pair`: a run that fails (out of memory, a file
/// it cannot load) goes to `failed` and does not hide what the others measure.
fn measure_pair(
    ctx: &EngineRun,
    engines: &[&str],
    runs: &mut Vec<Run>,
    failed: &mut Vec<Failed>,
) -> Result<(), Failure> {
    let (pair, n) = (ctx.pair, ctx.threads);
    // The plan (batch, t, trajectory) of the first tract run: onnxruntime repeats it on
    // the same files.
    let mut plan: Option<Plan> = None;
    for &engine in engines {
        let (file, weights) = match engine {
            "ort-int8-own" => (
                pair.own.as_ref().expect("made by prepare"),
                pair.own_weights.expect("made by prepare"),
            ),
            e if e.ends_with("-int8") => (&pair.quant, pair.quant_weights),
            _ => (&pair.float, pair.float_weights),
        };
        let what = format!("{engine} on {} ({n} thread(s))", file.display());
        eprintln!("tfmqc bench: {what}");
        let measured = match run_engine(ctx, engine, file, &mut plan) {
            Ok(m) => m,
            Err(f) => {
                eprintln!("tfmqc bench: {what} failed: {}", f.message);
                failed.push(Failed {
                    engine: engine.into(),
                    model: pair.name.clone(),
                    file: file.clone(),
                    threads: n,
                    reason: f.message,
                });
                continue;
            }
        };
        let timing = &measured.timing;
        let loops = match timing.loop_runs {
            0 if ctx.args.loop_runs.is_none() => format!(
                "sampling loop skipped ({} steps would take over --budget {} s; --loop-runs 1 times one)",
                ctx.args.steps, ctx.args.budget
            ),
            n => format!("{n} sampling loop(s)"),
        };
        eprintln!(
            "tfmqc bench:   {} warm-up + {} timed calls, median {:.1} ms; {loops}; peak RSS {:.0} MB",
            timing.warmup,
            timing.runs,
            timing.step_ms,
            timing.peak_rss_mb.unwrap_or(f64::NAN)
        );
        runs.push(Run {
            engine: engine.into(),
            model: pair.name.clone(),
            file: file.clone(),
            threads: n,
            measured,
            weight_bytes: weights,
        });
    }
    Ok(())
}

/// The tables on stderr, the `--json` object on stdout, and the failed runs as the
/// error.
fn report(
    args: &BenchArgs,
    runs: &[Run],
    skipped: &[Skipped],
    failed: &[Failed],
) -> Result<(), Failure> {
    eprint!("{}", report::table(runs));
    if let Some(top) = args.profile {
        eprint!("{}", report::profile_table(runs, top));
    }
    if args.json {
        let obj = BenchReport {
            machine: report::machine(),
            steps: args.steps,
            runs_per_step: args.runs,
            budget_s: args.budget,
            runs,
            ratios: report::ratios(runs),
            skipped,
            failed,
        };
        println!("{}", serde_json::to_string_pretty(&obj).expect("json"));
    }
    if !failed.is_empty() {
        let list: Vec<String> = failed
            .iter()
            .map(|f| {
                format!(
                    "{} on {} ({} thread(s)): {}",
                    f.engine,
                    f.file.display(),
                    f.threads,
                    f.reason
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

/// The configuration scripts/bench_ort.py reads: the plan of a tract run and how to
/// time it.
#[derive(Serialize)]
struct OrtConfig<'a> {
    #[serde(flatten)]
    plan: &'a Plan,
    model: &'a Path,
    threads: usize,
    runs: Option<usize>,
    loop_runs: Option<usize>,
    budget_s: f64,
    seed: u64,
    inputs: Option<&'a Path>,
}

/// One engine on one file, in a child process; `plan` is the inputs of the first tract
/// run of this model and thread count (onnxruntime repeats them), set here by tract
/// runs.
fn run_engine(
    ctx: &EngineRun,
    engine: &str,
    file: &Path,
    plan: &mut Option<Plan>,
) -> Result<Measured, Failure> {
    let args = ctx.args;
    if engine.starts_with("ort-") {
        let Some(plan) = plan.as_ref() else {
            return Err(user_error(
                "no tract engine ran before it (the onnxruntime engines repeat the inputs of one; give one in --engines)",
            ));
        };
        let cfg = OrtConfig {
            plan,
            model: file,
            threads: ctx.threads,
            runs: args.runs,
            loop_runs: args.loop_runs,
            budget_s: args.budget,
            seed: SEED,
            inputs: ctx.pair.inputs.as_deref(),
        };
        let cfg = serde_json::to_string(&cfg).expect("json");
        let mut cmd = Command::new(ctx.python.expect("onnxruntime engines run with a python"));
        cmd.args(["-c", ORT_SCRIPT, &cfg]);
        limit_memory(&mut cmd, args.memory_limit)?;
        let timing: Timing = run_child(cmd, engine)?;
        return Ok(Measured::of_ort(timing, plan));
    }
    let mut cmd = Command::new(ctx.exe);
    cmd.arg("bench-worker")
        .args(["--engine", engine])
        .arg("--model")
        .arg(file)
        .args(["--threads", &ctx.threads.to_string()])
        .args(["--steps", &args.steps.to_string()])
        .args(["--sampler", &args.sampler])
        .args(["--budget", &args.budget.to_string()]);
    if let Some(r) = args.runs {
        cmd.args(["--runs", &r.to_string()]);
    }
    if let Some(l) = args.loop_runs {
        cmd.args(["--loop-runs", &l.to_string()]);
    }
    if let Some(i) = &ctx.pair.inputs {
        cmd.arg("--inputs").arg(i);
    }
    if args.profile.is_some() {
        cmd.arg("--profile");
    }
    limit_memory(&mut cmd, args.memory_limit)?;
    let WorkerOutput {
        mut measured,
        plan: inputs,
    } = run_child(cmd, engine)?;
    if args.profile.is_none() {
        measured.profile = None;
    }
    // The quantized file's plan: its t is in S, which the float model accepts too.
    if plan.is_none() || engine.ends_with("-int8") {
        *plan = Some(Plan {
            inputs,
            batch: measured.batch,
            t: measured.t,
            steps: measured.steps,
        });
    }
    Ok(measured)
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
}
