//! The `tfmqc` command line (DESIGN.md §9), as a library: the `tfmqc` binary
//! (src/bin/tfmqc.rs) and the Python module (python/) both run [`run`].

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, Once};
use std::time::Instant;

use clap::{Args, Parser, Subcommand};
use tfmqc_passes::ir::print;
use tfmqc_passes::numerics::table_quant::TablePrecision;
use tfmqc_passes::options::{
    meta, ActRange, Baseline, Daq, Int4Storage, OutputQdq, Reconstruct, Tcr, TibMode,
};
use tfmqc_passes::pipeline::{self, PassContext};
use tfmqc_passes::{onnx, Error, Options};

mod bench;
mod eval;
mod report;
mod sample;

/// tfmqc: quantize diffusion-model denoisers (ONNX) with TFMQ-DM, keeping the
/// time-step path exact.
///
/// With no subcommand, runs the pipeline: `tfmqc model.onnx -o model.q.onnx`.
#[derive(Parser, Debug)]
#[command(
    name = "tfmqc",
    version,
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the pipeline on MODEL and write OUT (the default command).
    Quantize(Box<RunArgs>),
    /// Print a summary of MODEL: inputs, outputs, ops, parameters, the time-step block
    /// that was found, and the graph one node per line.
    Inspect(InspectArgs),
    /// Sample with the runtime's sampler (DDIM, DDPM, Euler, DPM-Solver++ under the
    /// model's scheduler configuration) and save the samples as a PNG grid.
    Sample(sample::SampleArgs),
    Bench(bench::BenchArgs),
    /// One engine of `tfmqc bench`, in a process of its own (internal).
    #[command(hide = true)]
    BenchWorker(bench::WorkerArgs),
    /// Quality of quantized models against FLOAT, side by side: temporal-feature error
    /// per time step, per-step output SQNR, sample PSNR through the runtime's sampler, a
    /// Fréchet distance, plots, JSON (docs/eval-json.md).
    Eval(Box<eval::EvalArgs>),
}

#[derive(Args, Debug)]
struct RunArgs {
    /// The ONNX model to compile.
    #[arg(value_name = "MODEL", required_unless_present = "print_passes")]
    model: Option<PathBuf>,
    /// Where to write the result (written only on success).
    #[arg(
        short,
        long,
        value_name = "OUT",
        required_unless_present = "print_passes"
    )]
    output: Option<PathBuf>,
    /// Run exactly these passes, in order, e.g. `canonicalize,detect-tib,fold-tib`;
    /// `none` = import and export only. Default: the whole pipeline.
    #[arg(long, value_name = "LIST")]
    passes: Option<String>,
    /// List the passes, one line each, and exit.
    #[arg(long)]
    print_passes: bool,
    /// Print the IR to stderr after every pass.
    #[arg(long)]
    print_after_all: bool,
    /// Write the IR after every pass to DIR/NN-PASS.txt.
    #[arg(long, value_name = "DIR")]
    dump_dir: Option<PathBuf>,
    #[command(flatten)]
    tib: TibArgs,
    #[command(flatten)]
    quant: QuantArgs,
}

#[derive(Args, Debug)]
struct TibArgs {
    /// The finite time-step set S: `1000` (0..999), `ddim:50` (t = k·T/50) or `0,20,40`.
    /// Default: the set recorded in the model's metadata, else every time step DDIM,
    /// DDPM, Euler and DPM-Solver++ visit at --sampling-steps under the scheduler.
    #[arg(long, value_name = "SPEC")]
    timesteps: Option<String>,
    /// Use this graph input as the time step instead of detecting it.
    #[arg(long, value_name = "NAME")]
    timestep_input: Option<String>,
}

#[derive(Args, Debug)]
struct QuantArgs {
    /// Weight bits: 8, 6 or 4 (symmetric levels ±(2^(b−1) − 1); 8 and 6 stored as int8,
    /// 4 as packed ONNX INT4 under --int4-storage packed).
    #[arg(long, default_value_t = 8, value_name = "4|6|8")]
    weight_bits: u32,
    /// The file form of 4-bit weights: `packed`, ONNX INT4 (two a byte) behind opset-21
    /// DequantizeLinear, the model's opset raised to 21 (Reduce* axes and Split rewritten
    /// to their opset-18 form; onnxruntime ≥ 1.18 and tfmqc's runtime read it); `int8`,
    /// the same levels in int8 initializers at the model's opset, twice the bytes, for
    /// readers without INT4 (tract alone refuses it).
    #[arg(long, value_enum, default_value = "packed", value_name = "packed|int8")]
    int4_storage: Int4Storage,
    /// Keep every name of the input model in the written file (its nodes, values and
    /// initializers). By default a quantized file keeps only the graph inputs and outputs
    /// and the time-step block's frontier values (which `tfmqc eval` reads); the rest get
    /// short names (up to 0.04× of the float file on the models in models/), listed with
    /// their old names in --dump-dir's NN-names.txt. Without `quantize` in --passes every
    /// name is kept.
    #[arg(long)]
    keep_names: bool,
    /// Activation bits: 8, 6 or 4 (levels 0..2^b − 1 in uint8 Q/DQ, behind a Clip to
    /// that grid below 8 bits), or 32 for weight-only quantization.
    #[arg(long, default_value_t = 8, value_name = "4|6|8|32")]
    act_bits: u32,
    /// TCAQ-DM's timestep-channel joint reparameterization (the `reparameterize`
    /// pass): per input channel of each quantized Conv/Gemm/MatMul, activations divided
    /// and weights multiplied by r = a^α / w^(1−α), a the channel's range over all
    /// calibrated time steps; the float function is unchanged. Calibration runs twice.
    /// `auto` (the default) quantizes with and without and keeps TCR where it raises the
    /// mean output SQNR on the calibration records by at least 0.1 dB (said in the
    /// summary); it stays off, unmeasured, where that would take over 5 minutes.
    #[arg(long, value_enum, value_name = "on|off|auto")]
    tcr: Option<Tcr>,
    /// α of TCR's balance: 0 only equalizes the weights' channel ranges, 1 moves each
    /// activation channel's range entirely into the weights. `auto`: the α of 0.4, 0.5,
    /// … 0.8 whose balanced model, quantized, has the best mean output SQNR on the
    /// calibration records (a rewrite, calibration and trial quantization each). Default:
    /// 0.5, or auto under --tcaq on|auto.
    #[arg(long, value_name = "A|auto")]
    tcr_alpha: Option<String>,
    /// TCAQ-DM as a whole: TCR, DAQ and PAR together. `on`: --tcr on --tcr-alpha auto
    /// --daq on --par 1; `auto`: --tcr auto --tcr-alpha auto --daq auto --par 1 (each kept only where the built-in
    /// evaluation measures a gain, said in the summary); `off`: none. Without it: --tcr
    /// auto, --daq off, --par 0. --tcr, --daq and --par override it one by one.
    #[arg(long, value_enum, value_name = "on|off|auto")]
    tcaq: Option<Tcr>,
    /// TCAQ-DM's dynamically adaptive quantizer of post-softmax activations: per softmax
    /// output, the uniform quantizer or a logarithmic one, log2 or log√2 (p̂ = s·2^(−q/k),
    /// q = clip(round(−k·log2(p/s)), 0, 2^b − 1), k = 1 or 2; standard ONNX ops),
    /// whichever fits the calibration records' values best (mean SQNR over the steps);
    /// the choice per layer is in the summary. `auto` keeps the choices only where they
    /// raise the held-out output SQNR by 0.1 dB. A log-quantized P runs unfused in the
    /// runtime (tract's ops), not in its int8 attention.
    #[arg(long, value_enum, value_name = "on|off|auto")]
    daq: Option<Daq>,
    /// Q-Diffusion's shortcut splitting (TFMQ-DM keeps it) below 8-bit activations: a
    /// Conv reading a channel Concat (a UNet up block's skip connection) becomes one Conv
    /// per concatenated input, summed, so that each part takes its own activation and
    /// weight scales (the same float function; the `split-concat` pass). Default: on.
    #[arg(long, value_name = "on|off", value_parser = ["on", "off"])]
    split_concat: Option<String>,
    /// Rounds of TCAQ-DM's progressively aligned reconstruction: calibration again along
    /// the quantized model's own trajectories (same sampler and seeds, the quantized model
    /// on the int8 runtime driving the sampler, the float model observed at the inputs it
    /// visits, the quantized model's QDQ graph too at the positions whose layer inputs are
    /// sampled), then quantization with GPTQ rounding each layer against the quantized
    /// model's own inputs of it (TCR stays the first round's). Each round's held-out
    /// output SQNR is in the summary and --report; the best round is kept (0 = without
    /// PAR).
    #[arg(long, value_name = "ROUNDS")]
    par: Option<usize>,
    /// Finite Set Calibration granularity: activation scales per group of consecutive
    /// time steps. auto = per activation, the grouping whose measured gain is worth it
    /// (one set where per-step scales gain nothing); N = N groups for every activation;
    /// 1 = constant scales (fused by onnxruntime's int8 kernels).
    #[arg(long, default_value = "auto", value_name = "auto|N")]
    step_groups: String,
    /// Recorded inputs (.safetensors or numpy .npz): conditioning keyed by input name
    /// (rows cycled over the trajectories); or recorded model calls, stacked along axis 0
    /// by input name (sample, time step and conditioning; split into the model's batch)
    /// or keyed `NNNNN/<input>` (the --dump-calib format); `uncond/<input>`: the
    /// unconditional conditioning of --guidance-scale. Without it, tfmqc generates
    /// trajectories and uses seeded stand-ins for conditioning (with a warning).
    #[arg(long, value_name = "FILE")]
    calib: Option<PathBuf>,
    /// The deployment's diffusers scheduler_config.json (from the model folder): betas,
    /// prediction type (epsilon, v_prediction, sample), clipping and thresholding,
    /// timestep spacing and offset. Missing keys take diffusers' defaults; unknown keys
    /// are ignored. Default: the model's metadata, else diffusers' DDIMScheduler defaults.
    /// Recorded in OUT, where the runtime reads it back.
    #[arg(long, value_name = "FILE")]
    scheduler: Option<PathBuf>,
    /// The deployment's sampler, which calibration runs: ddim, ddpm, euler or dpm++
    /// (DPM-Solver++, 2M by default), as diffusers' schedulers of those names.
    #[arg(long, default_value = "ddim", value_parser = ["ddim", "ddpm", "euler", "dpm++"])]
    sampler: String,
    /// Step counts the deployment samples with: S covers every time step the samplers
    /// visit at them, and calibration runs them (`all`: S = all T training steps).
    /// Default: 20,25,30,50.
    #[arg(long, value_name = "LIST")]
    sampling_steps: Option<String>,
    /// Classifier-free guidance scale G during calibration: each call runs the
    /// unconditional and conditional halves (a batch of 2 per sample) and the sampler
    /// steps with ε̂ = ε_u + G·(ε_c − ε_u). The unconditional input is `uncond/<input>`
    /// of --calib, else zeros (said on stderr).
    #[arg(long, value_name = "G")]
    guidance_scale: Option<f32>,
    /// Trajectories to generate for calibration [default: 32, fewer when the calls do not
    /// fit --calib-budget].
    #[arg(long, value_name = "N")]
    calib_samples: Option<usize>,
    /// One step count for every calibration trajectory [default: the trajectories cycle
    /// through --sampling-steps, largest first; fewer steps when even one trajectory does
    /// not fit --calib-budget]. Must visit time steps of S only.
    #[arg(long, value_name = "N")]
    calib_steps: Option<usize>,
    /// Trajectories run together in one model call (models with a free batch size only;
    /// lower it to lower calibration's memory).
    #[arg(long, default_value_t = 8, value_name = "N")]
    calib_batch: usize,
    /// Seconds of model calls calibration may spend when --calib-samples and
    /// --calib-steps are not given: the first call is timed and the trajectories are cut
    /// to fit (batches first, then steps; said on stderr). Small models never reach it; an
    /// SD-1.5 UNet at latent 64×64 does.
    #[arg(long, default_value_t = 1200.0, value_name = "SECONDS")]
    calib_budget: f64,
    /// Threads of the model calls (calibration, evaluation) and of the weight numerics;
    /// default: every core. The output is the same for any count.
    #[arg(long, value_name = "N")]
    threads: Option<usize>,
    /// Memory a phase may plan to use (e.g. 8G, 512M); default: what the machine has
    /// available. A phase whose estimate exceeds it stops before allocating, naming the
    /// estimate and the option that lowers it.
    #[arg(long, value_name = "SIZE")]
    max_memory: Option<String>,
    /// Seed of the calibration noise (same seed, same output bytes).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Held-out images per sampling step count that the report's per-step output SQNR is
    /// measured on (the report also gives each half of them, whose disagreement is the
    /// held-out set's own noise) [default: 2; with a fixed batch, one call's batch]. Each
    /// image costs a float and an int8 run per step of every step count (125 with the
    /// default step counts): the evaluation's work grows as N (8 on the small models in
    /// models/: 24-134 s of a 1.5-13 min compile on a loaded 2-vCPU VM). The output file
    /// does not depend on it.
    #[arg(long, value_name = "N")]
    eval_samples: Option<usize>,
    /// Leave nodes whose name contains PATTERN in float (repeatable). The input and
    /// output convs stay float by default.
    #[arg(long, value_name = "PATTERN")]
    keep_float: Vec<String>,
    /// `minmax`: plain min-max PTQ of the same layers, for comparisons (no TIB folding,
    /// one set of global min/max scales, round-to-nearest weights).
    #[arg(long, value_name = "KIND", value_enum)]
    baseline: Option<Baseline>,
    /// Activation ranges: `ema` (per-step EMA of min/max, as the reference) or `mse`
    /// (then shrunk to the clip minimising the quantization MSE on calibration data, as
    /// TFMQ-DM's activation quantizers are). Default: `ema` at 8 bits, `mse` below
    /// (+0.4 … +1.1 dB mean step SQNR at W4A4 and W6A6 on the trained models,
    /// BENCHMARKS.md).
    #[arg(long, value_enum)]
    act_range: Option<ActRange>,
    /// Weight rounding: `gptq` (Hessian-based, against each layer's calibration inputs;
    /// never worse than round-to-nearest on them), `adaround` (layer-wise AdaRound,
    /// slower), or `none` (round to nearest).
    #[arg(long, value_enum, default_value_t = Reconstruct::Gptq)]
    reconstruct: Reconstruct,
    /// QuantizeLinear/DequantizeLinear pairs on the outputs of quantized Convs, which
    /// onnxruntime needs to run a Conv on its int8 kernel (QLinearConv) and which cost
    /// one more 8-bit rounding each: `auto` adds them on the Convs whose input scale is
    /// constant and whose weights are not packed INT4 (onnxruntime cannot fuse one that
    /// reads per-step scales, nor its QLinearConv take 4-bit weights), cheapest first
    /// by the output SQNR each costs on the calibration records, while the total stays
    /// within --output-qdq-budget (skipped, with a note, when measuring would take too long);
    /// `all` on every quantized Conv; `none` on none. Biases of quantized Conv and Gemm
    /// become int32 with the product scale either way (onnxruntime's fusion needs that
    /// too; the values stay within half a step of the float bias).
    #[arg(long, value_enum, default_value_t = OutputQdq::Auto)]
    output_qdq: OutputQdq,
    /// dB of mean output SQNR (on the calibration records) that `--output-qdq auto` may
    /// spend.
    #[arg(long, default_value_t = 0.1, value_name = "DB")]
    output_qdq_budget: f64,
    /// AdaRound steps per layer.
    #[arg(long, default_value_t = 2000, value_name = "N")]
    adaround_iters: usize,
    /// The time-step block: `lut` (tables over S for every temporal feature), `quant`
    /// (computed, its linear layers quantized, rounding reconstructed by TIAR against the
    /// temporal features over all of S), or `auto` (every feature a table when the tables
    /// fit --lut-budget, without running TIAR; else TIAR, and tables for the features
    /// with the largest error per byte while they fit).
    #[arg(long, value_enum, default_value_t = TibMode::Auto)]
    tib: TibMode,
    /// Bytes the time-step block may take with `--tib auto`: its tables, and the
    /// quantized TIB's layers when some features are computed (default: 10 % of the
    /// quantized model's bytes with its weights at a byte each whatever --weight-bits,
    /// so that W4 keeps the tables W8 has; at least 16 KiB).
    #[arg(long, value_name = "BYTES")]
    lut_budget: Option<u64>,
    /// How the temporal-feature tables are stored: `auto` (per table, the fewest bytes
    /// whose measured error stays within relative MSE 1e-4 and row cosine 0.9999: int8
    /// with a scale per t, else f16, else f32), or `f32` (exact), `f16`, `int8`.
    #[arg(long, value_enum, default_value_t = TablePrecision::Auto)]
    table_precision: TablePrecision,
    /// TIAR's Adam steps (`--tib quant|auto`; default: 200 at 8-bit weights, where
    /// round-to-nearest is nearly as good, else 2000).
    #[arg(long, value_name = "N")]
    tiar_iters: Option<usize>,
    /// Beta schedule, over --scheduler or the metadata (default: theirs, else linear).
    #[arg(long, value_name = "linear|scaled-linear|cosine")]
    schedule: Option<String>,
    /// Training time steps T, over --scheduler or the metadata (default: theirs, else 1000).
    #[arg(long, value_name = "T")]
    train_timesteps: Option<usize>,
    /// First β, over --scheduler or the metadata.
    #[arg(long, value_name = "B0")]
    beta_start: Option<f64>,
    /// Last β, over --scheduler or the metadata.
    #[arg(long, value_name = "B1")]
    beta_end: Option<f64>,
    /// Write the quantization report (JSON) here.
    #[arg(long, value_name = "FILE.json")]
    report: Option<PathBuf>,
    /// Write the calibration records (model inputs, one batch per step) here.
    #[arg(long, value_name = "FILE.safetensors")]
    dump_calib: Option<PathBuf>,
    /// Write the evaluation records (the model inputs along the held-out trajectories of
    /// the deployment sampler that the quality summary is measured on) here, in the
    /// --dump-calib format.
    #[arg(long, value_name = "FILE.safetensors")]
    dump_eval: Option<PathBuf>,
}

#[derive(Args, Debug)]
struct InspectArgs {
    /// The ONNX model to describe.
    model: PathBuf,
    /// Print one JSON object on stdout instead of text.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    tib: TibArgs,
}

/// A failure with its exit code: 1 for bad input, 2 for tfmqc's own faults.
#[derive(Debug)]
pub struct Failure {
    pub code: u8,
    pub message: String,
}

impl From<Error> for Failure {
    fn from(e: Error) -> Failure {
        Failure {
            code: if e.is_user_error() { 1 } else { 2 },
            message: e.to_string(),
        }
    }
}

fn user_error(message: impl Into<String>) -> Failure {
    Failure {
        code: 1,
        message: message.into(),
    }
}

fn options(tib: &TibArgs, q: Option<&QuantArgs>) -> Result<Options, Failure> {
    let mut o = Options {
        timesteps: tib.timesteps.clone(),
        timestep_input: tib.timestep_input.clone(),
        ..Default::default()
    };
    if let Some(q) = q {
        o.weight_bits = q.weight_bits;
        o.int4_storage = q.int4_storage;
        o.keep_names = q.keep_names;
        o.act_bits = q.act_bits;
        o.tcr = q.tcr.or(q.tcaq).unwrap_or(Tcr::Auto);
        o.daq = q.daq.unwrap_or(match q.tcaq {
            None | Some(Tcr::Off) => Daq::Off,
            Some(Tcr::On) => Daq::On,
            Some(Tcr::Auto) => Daq::Auto,
        });
        o.split_concat = q.split_concat.as_deref() != Some("off");
        o.par_rounds = q.par.unwrap_or(match q.tcaq {
            None | Some(Tcr::Off) => 0,
            Some(Tcr::On | Tcr::Auto) => 1,
        });
        o.tcr_alpha = match (&q.tcr_alpha, q.tcaq) {
            (Some(a), _) => a
                .parse()
                .map_err(|e: tfmqc_passes::Error| user_error(e.to_string()))?,
            (None, Some(Tcr::On | Tcr::Auto)) => tfmqc_passes::options::TcrAlpha::Auto,
            (None, _) => {
                tfmqc_passes::options::TcrAlpha::Fixed(tfmqc_passes::reparameterize::DEFAULT_ALPHA)
            }
        };
        o.step_groups = q
            .step_groups
            .parse()
            .map_err(|e: tfmqc_passes::Error| user_error(e.to_string()))?;
        o.calib = q.calib.clone();
        o.scheduler = q.scheduler.clone();
        o.sampler = q.sampler.parse().map_err(user_error)?;
        o.sampling_steps = q
            .sampling_steps
            .as_deref()
            .map(str::parse)
            .transpose()
            .map_err(user_error)?;
        o.guidance_scale = q.guidance_scale;
        o.calib_adaptive = q.calib_samples.is_none() && q.calib_steps.is_none();
        o.calib_samples = q.calib_samples.unwrap_or(o.calib_samples);
        o.calib_steps = q.calib_steps;
        o.calib_budget_s = q.calib_budget;
        o.calib_batch = q.calib_batch;
        o.threads = q.threads.unwrap_or(0);
        o.seed = q.seed;
        o.eval_samples = q.eval_samples;
        o.keep_float = q.keep_float.clone();
        o.baseline_minmax = q.baseline == Some(Baseline::MinMax);
        o.act_range_mse = match q.act_range {
            Some(r) => r == ActRange::Mse,
            None => q.act_bits < 8,
        };
        o.reconstruct = q.reconstruct;
        o.adaround_iters = q.adaround_iters;
        o.output_qdq = q.output_qdq;
        if !(q.output_qdq_budget.is_finite() && q.output_qdq_budget >= 0.0) {
            return Err(user_error(
                "--output-qdq-budget must be a number of dB, at least 0",
            ));
        }
        o.output_qdq_budget_db = q.output_qdq_budget;
        o.tib = q.tib;
        o.lut_budget = q.lut_budget;
        o.table_precision = q.table_precision;
        o.tiar_iters = q.tiar_iters;
        o.schedule = q.schedule.clone();
        o.train_timesteps = q.train_timesteps;
        o.beta_start = q.beta_start;
        o.beta_end = q.beta_end;
    }
    Ok(o)
}

/// Whether the pipeline runs calibration (then its sampling settings are checked first).
fn names_calibrate(passes: &[Box<dyn pipeline::Pass>]) -> bool {
    passes.iter().any(|p| p.name() == "calibrate")
}

fn load(path: &Path) -> Result<tfmqc_passes::Model, Failure> {
    Ok(onnx::load(path)?)
}

fn run_pipeline(args: &RunArgs) -> Result<(), Failure> {
    if args.print_passes {
        eprint!("{}", pipeline::describe_passes());
        println!("{}", pipeline::default_pipeline().join(","));
        return Ok(());
    }
    let (Some(model_path), Some(out)) = (&args.model, &args.output) else {
        return Err(user_error("give a MODEL and -o OUT (see --help)"));
    };
    let passes = match (&args.passes, &args.quant.baseline) {
        (Some(spec), _) => pipeline::parse_pipeline(spec)?,
        // The baseline quantizes the same layers without the TIB treatment.
        (None, Some(_)) => pipeline::parse_pipeline(pipeline::BASELINE_PIPELINE)?,
        (None, None) => pipeline::parse_pipeline(&pipeline::default_pipeline().join(","))?,
    };
    if let Some(dir) = &args.dump_dir {
        std::fs::create_dir_all(dir).map_err(|e| user_error(format!("{}: {e}", dir.display())))?;
    }
    let start = Instant::now();
    let model = load(model_path)?;
    eprintln!(
        "tfmqc: loaded {} ({} nodes, {} initializers) in {:.2} s",
        model_path.display(),
        model.graph.node_count(),
        model.graph.initializers.len(),
        start.elapsed().as_secs_f64()
    );
    let mut opts = options(&args.tib, Some(&args.quant))?;
    if let Some(m) = &args.quant.max_memory {
        opts.max_memory = Some(
            tfmqc_passes::budget::parse_size(m)
                .map_err(|e| user_error(format!("--max-memory: {e}")))?,
        );
    }
    opts.validate()?;
    // A bad scheduler file or step count fails now, before any pass runs.
    if names_calibrate(&passes) {
        let set = tfmqc_passes::options::timestep_set(&model, &opts)?;
        if opts.calib.is_none() {
            opts.calibration_step_counts(&model, &set)?;
        }
    }
    let original = model.clone();
    // Progress on a terminal only: logs get the one line per pass.
    let tty = {
        use std::io::IsTerminal;
        std::io::stderr().is_terminal()
    };
    let show = |msg: &str| {
        if tty {
            eprint!("\r\x1b[2K{msg}");
        }
    };
    let mut cx = PassContext::new(model, &opts);
    cx.progress = &show;
    cx.dumps = pipeline::Dumps {
        print_after_all: args.print_after_all,
        dir: args.dump_dir.clone(),
    };
    let total = passes.len();
    let mut step = 0;
    let mut phases: Vec<(String, f64)> = vec![("load".into(), start.elapsed().as_secs_f64())];
    // Peak resident memory of each phase (the machine's limit is what SD-scale runs meet).
    let peaks = std::cell::RefCell::new(vec![(
        "load".to_string(),
        tfmqc_passes::budget::peak_rss().unwrap_or(0),
    )]);
    let end_phase = |name: &str| {
        peaks.borrow_mut().push((
            name.to_string(),
            tfmqc_passes::budget::peak_rss().unwrap_or(0),
        ));
        tfmqc_passes::budget::return_free_memory();
        tfmqc_passes::budget::reset_peak_rss();
    };
    tfmqc_passes::budget::reset_peak_rss();
    let mut after =
        |name: &str, cx: &PassContext, took: std::time::Duration| -> tfmqc_passes::Result<()> {
            step += 1;
            phases.push((name.to_string(), took.as_secs_f64()));
            end_phase(name);
            let clear = if tty { "\r\x1b[2K" } else { "" };
            eprintln!(
                "{clear}[{step}/{total}] {name}: {:.2} s",
                took.as_secs_f64()
            );
            for n in &cx.notes {
                eprintln!("    {n}");
            }
            Ok(())
        };
    let threads = args.quant.threads.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    });
    if threads == 0 {
        return Err(user_error("--threads must be at least 1"));
    }
    tfmqc_runtime::with_threads(threads, || {
        pipeline::run_pipeline(&mut cx, &passes, &mut after)
    })?;
    let names: Vec<&str> = passes.iter().map(|p| p.name()).collect();
    cx.model
        .set_metadata(meta::VERSION, env!("CARGO_PKG_VERSION"));
    cx.model.set_metadata(
        meta::PASSES,
        if names.is_empty() {
            "none".to_string()
        } else {
            names.join(",")
        },
    );
    if cx.quant.is_some() {
        cx.model
            .set_metadata(meta::OPTIONS, report::options_json(&opts).to_string());
        cx.model.set_metadata(meta::SEED, opts.seed.to_string());
        let scheduler = opts.scheduler(&cx.model)?;
        cx.model
            .set_metadata(meta::SCHEDULE, scheduler.to_json().to_string());
        cx.model.set_metadata(meta::SAMPLER, opts.sampler.name());
        if let Some(cal) = &cx.calibration {
            if !cal.trajectories.is_empty() {
                let counts = opts.calibration_step_counts(
                    &cx.model,
                    &tfmqc_passes::options::timestep_set(&cx.model, &opts)?,
                )?;
                cx.model.set_metadata(
                    meta::SAMPLING_STEPS,
                    counts
                        .iter()
                        .map(|n| n.to_string())
                        .collect::<Vec<_>>()
                        .join(","),
                );
            }
        }
    }
    if let (Some(path), Some(cal)) = (&args.quant.dump_calib, &cx.calibration) {
        report::dump_calibration(path, cal)?;
        eprintln!(
            "tfmqc: wrote {} calibration records to {}",
            cal.records.len(),
            path.display()
        );
    }
    // Written first, into a staging folder: the evaluation runs the file as it ships, and
    // the output path is only touched once everything has succeeded.
    let t = Instant::now();
    let staged = onnx::stage(&cx.model, out)?;
    let bytes_out = staged.bytes();
    phases.push(("write".into(), t.elapsed().as_secs_f64()));
    end_phase("write");
    let quality = match (&cx.quant, &cx.calibration) {
        (Some(plan), Some(cal)) => {
            let t = Instant::now();
            // The compiled weights in memory give way to the staged file's, mapped and
            // read on demand: on SD-1.5 at latent 64 the float model's run for the
            // activation SQNR no longer stacks on 0.9 GB of int8 weights (9.1 GB peak).
            cx.model = onnx::load(staged.path())?;
            tfmqc_passes::budget::return_free_memory();
            let t_name = cx
                .tib
                .as_ref()
                .map(|t| t.timestep_input.clone())
                .unwrap_or_else(|| cal.timestep_input.clone());
            let q = tfmqc_runtime::with_threads(threads, || {
                let act_float = cx.balanced_float.as_ref().unwrap_or(&original);
                report::measure(
                    &original, act_float, &cx.model, plan, cal, &opts, &t_name, &show,
                )
            })?;
            if let Some(path) = &args.quant.dump_eval {
                report::dump_records(path, &q.eval_records)?;
                eprintln!(
                    "tfmqc: wrote {} evaluation records to {}",
                    q.eval_records.len(),
                    path.display()
                );
            }
            phases.push(("evaluate".into(), t.elapsed().as_secs_f64()));
            end_phase("evaluate");
            Some(q)
        }
        _ => None,
    };
    staged.commit()?;
    let peaks = peaks.into_inner();
    let bytes_in = onnx::stored_bytes(&original, model_path);
    if let Some(q) = &quality {
        let rep = report::Report::new(&opts, &cx, q, bytes_in, bytes_out, &phases, &peaks);
        eprint!("{}", rep.summary());
        if let Some(path) = &args.quant.report {
            onnx::write_atomic(
                path,
                serde_json::to_string_pretty(&rep).expect("json").as_bytes(),
            )?;
        }
    }
    eprintln!(
        "tfmqc: wrote {} ({bytes_out} bytes, {:.2}× the input) in {:.2} s total",
        out.display(),
        bytes_out as f64 / bytes_in.max(1) as f64,
        start.elapsed().as_secs_f64()
    );
    Ok(())
}

fn inspect(args: &InspectArgs) -> Result<(), Failure> {
    let mut model = load(&args.model)?;
    // Shapes for the listing; a model tract cannot type is still listed, untyped.
    let typing = tfmqc_passes::canonicalize::infer_types(&mut model).err();
    let g = &model.graph;
    let tib = tfmqc_passes::detect_tib::detect(&model, args.tib.timestep_input.as_deref());
    if args.json {
        let (params, bytes) = g.parameter_stats();
        let value = |v: &tfmqc_passes::ir::ValueInfo| {
            serde_json::json!({
                "name": v.name,
                "dtype": v.dtype.map(|d| d.short()),
                "shape": v.shape.as_ref().map(|s| s.iter().map(|d| d.to_string()).collect::<Vec<_>>()),
            })
        };
        let obj = serde_json::json!({
            "file": args.model.display().to_string(),
            "ir_version": model.ir_version,
            "opsets": model.opsets.iter().map(|(d, v)| (if d.is_empty() { "ai.onnx".to_string() } else { d.clone() }, *v)).collect::<std::collections::BTreeMap<_, _>>(),
            "producer": format!("{} {}", model.producer_name, model.producer_version).trim().to_string(),
            "inputs": g.inputs.iter().map(value).collect::<Vec<_>>(),
            "outputs": g.outputs.iter().map(value).collect::<Vec<_>>(),
            "node_count": g.node_count(),
            "op_counts": g.op_counts(),
            "parameters": params,
            "parameter_bytes": bytes,
            "initializers": g.initializers.len(),
            "metadata": model.metadata.iter().cloned().collect::<std::collections::BTreeMap<_, _>>(),
            "tib": tib.as_ref().ok(),
            "tib_error": tib.as_ref().err().map(|e| e.to_string()),
            "typing_error": typing.as_ref().map(|e| e.to_string()),
            "graph": print::graph_text(g).lines().collect::<Vec<_>>(),
        });
        println!("{}", serde_json::to_string_pretty(&obj).expect("json"));
        return Ok(());
    }
    print!("{}", print::model_summary(&model));
    if let Some(e) = &typing {
        println!("types: not inferred ({e})");
    }
    match &tib {
        Ok(t) => print!("{}", t.text()),
        Err(e) => println!("time-step block: not found: {e}"),
    }
    println!("graph:");
    for line in print::graph_text(g).lines() {
        println!("  {line}");
    }
    Ok(())
}

/// The program that runs this command line again (`tfmqc bench` starts one process per
/// engine): the running executable, unless [`set_self_exe`] named another.
pub fn self_exe() -> std::io::Result<PathBuf> {
    match SELF_EXE.get() {
        Some(p) => Ok(p.clone()),
        None => std::env::current_exe(),
    }
}

static SELF_EXE: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();

/// Names the program [`self_exe`] returns, for hosts whose executable is not `tfmqc`
/// (the Python module gives its `tfmqc` script). The first call wins.
pub fn set_self_exe(path: PathBuf) {
    let _ = SELF_EXE.set(path);
}

/// Runs the command line on `args` (the program name first), as the binary does, minus
/// printing the failure and exiting: `--help` and `--version` print and succeed; a usage
/// error comes back as a failure with code 1 and clap's message.
pub fn run<I, T>(args: I) -> Result<(), Failure>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let cli = match Cli::try_parse_from(args) {
        Ok(c) => c,
        Err(e) => match e.kind() {
            clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion => {
                let _ = e.print();
                return Ok(());
            }
            _ => {
                return Err(Failure {
                    code: 1,
                    message: e.to_string().trim_end().to_string(),
                })
            }
        },
    };
    dispatch(&cli)
}

fn dispatch(cli: &Cli) -> Result<(), Failure> {
    catch_internal(|| match &cli.command {
        Some(Command::Quantize(a)) => run_pipeline(a),
        Some(Command::Inspect(a)) => inspect(a),
        Some(Command::Sample(a)) => sample::run(a),
        Some(Command::Bench(a)) => bench::run(a),
        Some(Command::BenchWorker(a)) => bench::worker(a),
        Some(Command::Eval(a)) => eval::run(a),
        None => run_pipeline(&cli.run),
    })
}

/// Runs a command; a panic in it (a bug) becomes the exit-2 failure, its message on the
/// failure's one line instead of a panic message and backtrace on stderr.
fn catch_internal(command: impl FnOnce() -> Result<(), Failure>) -> Result<(), Failure> {
    install_panic_capture();
    CAPTURING.fetch_add(1, Ordering::SeqCst);
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(command));
    CAPTURING.fetch_sub(1, Ordering::SeqCst);
    result.unwrap_or_else(|_| {
        let note = PANIC_NOTE
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .map(|n| format!(" ({n})"))
            .unwrap_or_default();
        Err(Failure {
            code: 2,
            message: format!(
                "internal error{note}: a bug in tfmqc; please report it with the model"
            ),
        })
    })
}

/// Commands running ([`dispatch`]): while any is, a panic is recorded in [`PANIC_NOTE`]
/// instead of printed, on every thread (rayon's workers panic on behalf of the command).
static CAPTURING: AtomicUsize = AtomicUsize::new(0);
/// Where the first panic of a command happened and its message, on one line: the exit-2
/// error carries it, so stderr holds one error line and never a panic message or a
/// backtrace (DESIGN.md §9: exit 2 is an internal error with a message, not a crash).
static PANIC_NOTE: Mutex<Option<String>> = Mutex::new(None);

fn install_panic_capture() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // Panics outside a command (the Python module's host, other code) keep the hook
        // that was there.
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if CAPTURING.load(Ordering::SeqCst) == 0 {
                return previous(info);
            }
            let payload = info.payload();
            let message = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            let at = info
                .location()
                .map(|l| format!("{}:{}", l.file(), l.line()))
                .unwrap_or_default();
            let one_line = message.split_whitespace().collect::<Vec<_>>().join(" ");
            let mut note = PANIC_NOTE.lock().unwrap_or_else(|e| e.into_inner());
            note.get_or_insert(format!("at {at}: {one_line}"));
        }));
    });
}

/// The `tfmqc` binary.
pub fn main() -> ExitCode {
    ExitCode::from(main_with(std::env::args_os()))
}

/// What the binary does with `args` (the program name first): clap's messages and the
/// failure printed to stderr; the exit code returned.
pub fn main_with<I, T>(args: I) -> u8
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let cli = match Cli::try_parse_from(args) {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return match e.kind() {
                clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion => 0,
                _ => 1,
            };
        }
    };
    match dispatch(&cli) {
        Ok(()) => 0,
        Err(f) => {
            eprintln!("tfmqc: error: {}", f.message);
            f.code
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_in_a_command_is_an_internal_error_on_one_line() {
        let f = catch_internal(|| panic!("index out of bounds:\nthe len is 3")).unwrap_err();
        assert_eq!(f.code, 2);
        assert!(
            f.message.starts_with("internal error (at src/main.rs:")
                && f.message.contains(": index out of bounds: the len is 3)")
                && !f.message.contains('\n'),
            "{}",
            f.message
        );
        assert!(catch_internal(|| Ok(())).is_ok());
    }

    #[test]
    fn the_options_metadata_records_every_option_by_its_command_line_name() {
        let cli = Cli::try_parse_from([
            "tfmqc",
            "m.onnx",
            "-o",
            "q.onnx",
            "--reconstruct",
            "adaround",
            "--adaround-iters",
            "7",
            "--tib",
            "quant",
            "--tiar-iters",
            "9",
            "--tcaq",
            "off",
            "--output-qdq",
            "none",
        ])
        .unwrap();
        let o = options(&cli.run.tib, Some(&cli.run.quant)).unwrap();
        let v = report::options_json(&o);
        assert_eq!(v["reconstruct"], "adaround");
        assert_eq!(v["adaround_iters"], 7);
        assert_eq!(v["tib"], "quant");
        assert_eq!(v["tiar_iters"], 9);
        assert_eq!(v["tcr"], "off");
        assert_eq!(v["daq"], "off");
        assert_eq!(v["par"], 0);
        assert_eq!(v["output_qdq"], "none");
        assert_eq!(v["table_precision"], "auto");
        assert_eq!(v["step_groups"], "auto");
        assert_eq!(v["sampler"], "ddim");
        assert_eq!(v["act_range"], "ema");
        assert!(v["baseline"].is_null() && v["sampling_steps"].is_null());
        // Limits of the compiling machine leave the output bytes alone: not recorded.
        assert!(v.get("threads").is_none() && v.get("max_memory").is_none());
        let bad = Cli::try_parse_from(["tfmqc", "m.onnx", "--reconstruct", "ada-round"]);
        assert!(bad.is_err());
    }
}
