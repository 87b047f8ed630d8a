//! Pipeline options and the finite time-step set S.

use tfmqc_runtime::sampler::{self, Sampler};
use tfmqc_runtime::SchedulerConfig;

use crate::error::{Error, Result};
use crate::ir::Model;

/// Metadata keys tfmqc reads and writes: the runtime's table.
pub use tfmqc_runtime::meta;

/// The step counts the deployment samples with when `--sampling-steps` is not given.
pub const DEFAULT_SAMPLING_STEPS: [usize; 4] = [20, 25, 30, 50];

/// `--sampling-steps`: the step counts the deployment uses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SamplingSteps {
    /// These counts: S covers what the samplers visit at them, calibration runs them.
    Counts(Vec<usize>),
    /// `all`: S is every training step (calibration runs the default counts).
    All,
}

impl std::str::FromStr for SamplingSteps {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let s = s.trim();
        if s == "all" {
            return Ok(SamplingSteps::All);
        }
        let counts = s
            .split(',')
            .map(|v| v.trim())
            .filter(|v| !v.is_empty())
            .map(|v| match v.parse::<usize>() {
                Ok(n) if n > 0 => Ok(n),
                _ => Err(format!(
                    "--sampling-steps '{s}': '{v}' is not a step count (give counts of at least 1, comma-separated, e.g. 20,25,30,50, or `all`)"
                )),
            })
            .collect::<std::result::Result<Vec<usize>, String>>()?;
        if counts.is_empty() {
            return Err(format!("--sampling-steps '{s}': no step count"));
        }
        Ok(SamplingSteps::Counts(counts))
    }
}

/// Weight-rounding reconstruction of the quantized layers (`--reconstruct`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Reconstruct {
    /// Round to nearest.
    None,
    /// GPTQ: Hessian-based rounding, one Cholesky per layer.
    Gptq,
    /// Layer-wise AdaRound with closed-form gradients.
    #[value(name = "adaround")]
    AdaRound,
}

/// QuantizeLinear/DequantizeLinear on the outputs of quantized Conv layers
/// (`--output-qdq`): onnxruntime fuses a Conv into its int8 kernel (QLinearConv) only
/// when its output passes through QuantizeLinear, at the cost of one more 8-bit rounding
/// of that output.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OutputQdq {
    /// No output pairs (biases still become int32, which Gemm and MatMul fusion needs).
    None,
    /// Per Conv whose input scale is constant and whose weights are not packed INT4 (what
    /// onnxruntime can fuse), by the output SQNR each pair costs on the calibration
    /// records, cheapest first, while the total stays within `--output-qdq-budget` dB.
    Auto,
    /// Every quantized Conv whose output is not a graph output.
    All,
}

/// TCAQ-DM's timestep-channel joint reparameterization (`--tcr`, the `reparameterize`
/// pass).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Tcr {
    Off,
    On,
    /// Balance, quantize both ways and keep TCR where it gives a higher mean output SQNR
    /// on the calibration records (off, unmeasured, where measuring would be too
    /// costly).
    Auto,
}

/// `--baseline`: a plain PTQ of the same layers, for comparisons. `Options` keeps it as
/// the flag `baseline_minmax` (the one kind there is), which every pass reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Baseline {
    /// Min-max PTQ: no TIB folding, one set of global min/max scales, round-to-nearest
    /// weights.
    #[value(name = "minmax")]
    MinMax,
}

impl Baseline {
    /// The value `Options::baseline_minmax` stands for (`None`: no baseline).
    pub fn from_flag(minmax: bool) -> Option<Baseline> {
        minmax.then_some(Baseline::MinMax)
    }
}

/// `--act-range`: how an activation's range is taken from its calibration statistics.
/// `Options` keeps it as the flag `act_range_mse`, which `quantize` reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ActRange {
    /// The per-step EMA of min/max, as the reference does.
    Ema,
    /// The EMA range shrunk to the clip minimising the quantization MSE on the
    /// calibration records.
    Mse,
}

impl ActRange {
    /// The value `Options::act_range_mse` stands for.
    pub fn from_flag(mse: bool) -> ActRange {
        if mse {
            ActRange::Mse
        } else {
            ActRange::Ema
        }
    }
}

/// The default exponent α of TCR's `r_c = a_c^α / w_c^(1−α)` (`--tcr-alpha`; measured:
/// see BENCHMARKS.md, "TCAQ"). Here with the other defaults, so the options need no pass.
pub const DEFAULT_TCR_ALPHA: f32 = 0.5;

/// TCR's α (`--tcr-alpha`): a given one, or the best of a grid for the model (one α for
/// every activation either way).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum TcrAlpha {
    /// `--tcr-alpha A`: `r = a^A / w^(1−A)` for every activation.
    Fixed(f32),
    /// `--tcr-alpha auto`: the α of [`TCR_ALPHA_GRID`] whose balanced model, quantized
    /// as the options say, has the best mean output SQNR on the calibration records
    /// (one α for the model: chosen per activation by each layer's own quantized output
    /// error, the αs lost 0.8 dB to one α on ddpm_digits W4A4, BENCHMARKS.md).
    Auto,
}

/// The α `--tcr-alpha auto` chooses from.
pub const TCR_ALPHA_GRID: [f32; 5] = [0.4, 0.5, 0.6, 0.7, 0.8];

impl std::fmt::Display for TcrAlpha {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        match self {
            TcrAlpha::Fixed(a) => write!(f, "{a}"),
            TcrAlpha::Auto => write!(f, "auto"),
        }
    }
}

impl std::str::FromStr for TcrAlpha {
    type Err = Error;
    fn from_str(s: &str) -> Result<TcrAlpha> {
        match s {
            "auto" => Ok(TcrAlpha::Auto),
            _ => match s.parse::<f32>() {
                Ok(a) if (0.0..=1.0).contains(&a) => Ok(TcrAlpha::Fixed(a)),
                _ => Err(Error::invalid(format!(
                    "--tcr-alpha {s}: auto, or a number between 0 and 1"
                ))),
            },
        }
    }
}

/// TCAQ-DM's dynamically adaptive quantizer of post-softmax activations (`--daq`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Daq {
    /// Every softmax output keeps quantize's uniform quantizer.
    Off,
    /// Per softmax output, the uniform or the log2 quantizer, whichever fits the
    /// calibration records' values better (mean SQNR over the calibrated steps).
    On,
    /// As `on`, kept only where it raises the mean held-out output SQNR of the whole
    /// model (said in the summary).
    Auto,
}

/// How weights of ≤ 4 bits are stored in the file (`--int4-storage`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Int4Storage {
    /// ONNX INT4 (two values a byte) behind opset-21 `DequantizeLinear`; the model's
    /// opset is raised to 21 (`ir::opset`). onnxruntime ≥ 1.18 and tfmqc's runtime read it.
    Packed,
    /// The 4-bit levels in int8 initializers, at the model's own opset: twice the bytes,
    /// for consumers that cannot read INT4 or opset 21.
    Int8,
}

/// Finite Set Calibration granularity (`--step-groups`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StepGroups {
    /// Per activation, the coarsest grouping of the steps of S (1, 2, 4, … groups of
    /// consecutive steps, up to one per visited step) whose measured gain in quantization
    /// noise over the steps is within `quantize`'s `AUTO_GROUPS_SLACK_DB` of the
    /// finest; one set of scales where per-step ones gain less than its
    /// `AUTO_GROUPS_MIN_GAIN_DB`.
    Auto,
    /// `N` groups of consecutive steps for every activation; 1 = one set of scales
    /// (constant Q/DQ, what onnxruntime fuses into its int8 kernels).
    Fixed(usize),
}

impl StepGroups {
    /// Whether some activation may get scales that depend on the step (the step index of
    /// fold-tib must then stay in the graph).
    pub fn per_step(self) -> bool {
        !matches!(self, StepGroups::Fixed(1))
    }
}

impl std::fmt::Display for StepGroups {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        match self {
            StepGroups::Auto => write!(f, "auto"),
            StepGroups::Fixed(n) => write!(f, "{n}"),
        }
    }
}

impl std::str::FromStr for StepGroups {
    type Err = Error;
    fn from_str(s: &str) -> Result<StepGroups> {
        match s {
            "auto" => Ok(StepGroups::Auto),
            _ => match s.parse::<usize>() {
                Ok(n) if n >= 1 => Ok(StepGroups::Fixed(n)),
                _ => Err(Error::invalid(format!(
                    "--step-groups {s}: auto, or a number of groups (at least 1)"
                ))),
            },
        }
    }
}

/// What becomes of the Temporal Information Block (`--tib`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TibMode {
    /// Exact tables `[|S|, ...]` for every frontier value (fold-tib).
    Lut,
    /// The TIB stays computed; its linear layers are quantized and their rounding
    /// reconstructed by TIAR.
    Quant,
    /// Every frontier value a table when the tables fit `--lut-budget` (TIAR not run:
    /// the graph is [`TibMode::Lut`]'s); else the quantized TIB after TIAR, its layers
    /// charged to the budget, and tables for the features with the largest error per
    /// byte in what is left. The default: at S = 1000 the tables would be 0.11–0.16× of
    /// the float file.
    Auto,
}

/// Options every pass may read. The CLI fills them; `Default` gives the documented
/// defaults. Serialized, they are what a compiled model records of how it was made (its
/// `tfmqc.options` metadata and the report's `options`).
#[derive(Clone, Debug, serde::Serialize)]
pub struct Options {
    /// `--timesteps`: `1000`, `ddim:50` or an explicit list. `None`: metadata, else 1000.
    pub timesteps: Option<String>,
    /// `--timestep-input`: skip detection and use this graph input.
    pub timestep_input: Option<String>,
    /// `--weight-bits`: 8, 6 or 4 (4 is packed as INT4 under [`Int4Storage::Packed`]).
    pub weight_bits: u32,
    /// `--int4-storage`: the file form of 4-bit weights.
    pub int4_storage: Int4Storage,
    /// `--act-bits`: 8, 6 or 4 (held in uint8), or 32 for weight-only quantization.
    pub act_bits: u32,
    /// `--step-groups`: FSC granularity (default: chosen per activation).
    #[serde(serialize_with = "ser::display")]
    pub step_groups: StepGroups,
    /// `--calib`: recorded inputs (.safetensors or .npz) instead of generated ones.
    pub calib: Option<std::path::PathBuf>,
    /// `--scheduler`: the deployment's diffusers scheduler_config.json.
    pub scheduler: Option<std::path::PathBuf>,
    /// `--sampler`: the sampling algorithm calibration runs (the deployment's).
    #[serde(serialize_with = "ser::sampler")]
    pub sampler: Sampler,
    /// `--sampling-steps`; `None`: [`DEFAULT_SAMPLING_STEPS`].
    #[serde(serialize_with = "ser::sampling_steps")]
    pub sampling_steps: Option<SamplingSteps>,
    /// `--guidance-scale`: classifier-free guidance during calibration.
    pub guidance_scale: Option<f32>,
    /// `--calib-samples`: trajectories to generate.
    pub calib_samples: usize,
    /// Trajectories run together (dynamic-batch models only).
    pub calib_batch: usize,
    /// `--calib-steps`: one step count for every generated trajectory; `None`: the
    /// trajectories cycle through the sampling step counts.
    pub calib_steps: Option<usize>,
    /// `--eval-samples`: held-out images per step count the report's output SQNR is
    /// measured on; `None`: [`crate::trajectory::RECORD_SAMPLES`] (one call's batch when
    /// the model's batch is fixed). (Not recorded: the report says it, and the output
    /// file's bytes do not depend on it.)
    #[serde(skip)]
    pub eval_samples: Option<usize>,
    pub seed: u64,
    /// `--keep-float`: node-name substrings left in float.
    pub keep_float: Vec<String>,
    /// `--baseline minmax`: plain min-max PTQ of the same layers, for comparisons.
    #[serde(rename = "baseline", serialize_with = "ser::baseline")]
    pub baseline_minmax: bool,
    /// `--act-range mse`: shrink each activation range to minimise the quantization MSE
    /// on the calibration records (default: the EMA min/max as the reference does).
    #[serde(rename = "act_range", serialize_with = "ser::act_range")]
    pub act_range_mse: bool,
    /// `--reconstruct`: weight rounding against each layer's calibration inputs.
    pub reconstruct: Reconstruct,
    /// `--output-qdq`: which quantized Convs get a Q/DQ pair on their output.
    pub output_qdq: OutputQdq,
    /// `--output-qdq-budget`: mean output SQNR (dB, on the calibration records) that
    /// `--output-qdq auto` may spend.
    pub output_qdq_budget_db: f64,
    /// AdaRound steps per layer.
    pub adaround_iters: usize,
    /// `--tib`: tables, quantized TIB (TIAR), or a choice per frontier value.
    pub tib: TibMode,
    /// `--lut-budget`: bytes the time-step block may take with `--tib auto` (tables, and
    /// the quantized TIB's layers when TIAR runs); `None`: 10 % of the quantized model's
    /// bytes, at least 16 KiB (`fold_tib::tiar::lut_budget`).
    pub lut_budget: Option<u64>,
    /// `--table-precision`: how temporal-feature tables are stored (f32, f16, int8 rows,
    /// or per table by measured error: [`crate::numerics::table_quant`]).
    pub table_precision: crate::numerics::table_quant::TablePrecision,
    /// `--tiar-iters`: Adam steps of TIAR; `None`: [`Options::tiar_steps`] chooses.
    #[serde(serialize_with = "ser::tiar_iters")]
    pub tiar_iters: Option<usize>,
    /// Noise schedule overrides, applied over the scheduler configuration.
    pub schedule: Option<String>,
    pub train_timesteps: Option<usize>,
    pub beta_start: Option<f64>,
    pub beta_end: Option<f64>,
    /// `--max-memory`: bytes a phase may plan to hold; `None`: the memory available.
    /// (Not recorded: like `threads`, a limit of the machine that compiled the model,
    /// which leaves its bytes unchanged.)
    #[serde(skip)]
    pub max_memory: Option<u64>,
    /// `--calib-budget`: seconds of model calls calibration may spend when the user did
    /// not fix `--calib-samples` / `--calib-steps` (then `calib_adaptive`).
    pub calib_budget_s: f64,
    /// Whether calibration may shrink its trajectories to fit `calib_budget_s`.
    pub calib_adaptive: bool,
    /// `--tcr`: TCAQ-DM's timestep-channel joint reparameterization (the
    /// `reparameterize` pass).
    pub tcr: Tcr,
    /// `--tcr-alpha`: α of TCR's balance `r = a^α / w^(1−α)`, or `auto` (the best of
    /// [`TCR_ALPHA_GRID`] for the model).
    #[serde(serialize_with = "ser::tcr_alpha")]
    pub tcr_alpha: TcrAlpha,
    /// `--daq`: TCAQ-DM's adaptive quantizer of post-softmax activations.
    pub daq: Daq,
    /// `--par`: rounds of TCAQ-DM's progressively aligned reconstruction (0: none).
    #[serde(rename = "par")]
    pub par_rounds: usize,
    /// `--split-concat`: Q-Diffusion's shortcut splitting below 8-bit activations (the
    /// `split-concat` pass). Recorded only when off (the default is on), so that files and
    /// reports of compiles that do not split stay as they were.
    #[serde(skip_serializing_if = "is_true")]
    pub split_concat: bool,
    /// `--keep-names`: the written file keeps every name of the input model (its nodes,
    /// values and initializers); by default a quantized file keeps only its graph inputs
    /// and outputs and the TIB frontier values ([`crate::pipeline::addressed_names`]).
    /// Recorded only when on.
    #[serde(skip_serializing_if = "is_false")]
    pub keep_names: bool,
    /// `--threads`: threads of the weight numerics (range search, GPTQ); 0 = every core.
    /// (Model calls take theirs from the caller's `tfmqc_runtime::with_threads`.)
    #[serde(skip)]
    pub threads: usize,
}

/// How the option values that are not plain data are recorded: by the names the
/// command line gives them.
mod ser {
    use serde::Serializer;

    use super::{ActRange, Baseline, Sampler, SamplingSteps};

    pub fn display<T: std::fmt::Display, S: Serializer>(v: &T, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(v)
    }

    /// A number as before `auto` existed (files record it), else `"auto"`.
    pub fn tcr_alpha<S: Serializer>(v: &super::TcrAlpha, s: S) -> Result<S::Ok, S::Error> {
        match v {
            super::TcrAlpha::Fixed(a) => s.serialize_f32(*a),
            super::TcrAlpha::Auto => s.serialize_str("auto"),
        }
    }

    pub fn sampler<S: Serializer>(v: &Sampler, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(v.name())
    }

    /// `null` (the default counts), `"all"`, or the counts.
    pub fn sampling_steps<S: Serializer>(
        v: &Option<SamplingSteps>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        match v {
            None => s.serialize_none(),
            Some(SamplingSteps::All) => s.serialize_str("all"),
            Some(SamplingSteps::Counts(c)) => s.collect_seq(c),
        }
    }

    /// The number given, else `"auto"`.
    pub fn tiar_iters<S: Serializer>(v: &Option<usize>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(n) => s.serialize_u64(*n as u64),
            None => s.serialize_str("auto"),
        }
    }

    /// `"minmax"` or `null`, as `--baseline` takes it.
    pub fn baseline<S: Serializer>(v: &bool, s: S) -> Result<S::Ok, S::Error> {
        serde::Serialize::serialize(&Baseline::from_flag(*v), s)
    }

    /// `"mse"` or `"ema"`, as `--act-range` takes it.
    pub fn act_range<S: Serializer>(v: &bool, s: S) -> Result<S::Ok, S::Error> {
        serde::Serialize::serialize(&ActRange::from_flag(*v), s)
    }
}

impl Default for Options {
    fn default() -> Options {
        Options {
            timesteps: None,
            timestep_input: None,
            weight_bits: 8,
            int4_storage: Int4Storage::Packed,
            act_bits: 8,
            step_groups: StepGroups::Auto,
            calib: None,
            scheduler: None,
            sampler: Sampler::Ddim,
            sampling_steps: None,
            guidance_scale: None,
            calib_samples: 32,
            calib_batch: 8,
            calib_steps: None,
            eval_samples: None,
            seed: 0,
            keep_float: vec![],
            baseline_minmax: false,
            act_range_mse: false,
            reconstruct: Reconstruct::Gptq,
            output_qdq: OutputQdq::Auto,
            output_qdq_budget_db: 0.1,
            adaround_iters: 2000,
            tib: TibMode::Auto,
            lut_budget: None,
            table_precision: crate::numerics::table_quant::TablePrecision::Auto,
            tiar_iters: None,
            schedule: None,
            train_timesteps: None,
            beta_start: None,
            beta_end: None,
            max_memory: None,
            calib_budget_s: 1200.0,
            calib_adaptive: false,
            tcr: Tcr::Auto,
            tcr_alpha: TcrAlpha::Fixed(DEFAULT_TCR_ALPHA),
            daq: Daq::Off,
            par_rounds: 0,
            split_concat: true,
            keep_names: false,
            threads: 0,
        }
    }
}

/// TIAR's Adam steps at 8-bit weights (`--tiar-iters` not given). Measured at S = 1000
/// (fold-tib alone, `--tib quant`, BENCHMARKS.md "`--tib auto` by default"): on the 8-bit
/// grid round-to-nearest is already within 1e-4 of TIAR's worst temporal-feature cosine,
/// and TIAR's 200 steps reach what 2000 do (ddpm_digits 0.99982 against 0.99980,
/// ddim_unet 0.99987 against 0.99989) at a tenth of the time.
pub const TIAR_STEPS_8BIT: usize = 200;
/// TIAR's Adam steps below 8 bits: at 4 bits the loss still falls from 1000 to 2000 steps
/// (ddpm_digits worst cosine 0.99765 → 0.99892, round-to-nearest 0.98991).
pub const TIAR_STEPS_LOW_BIT: usize = 2000;

impl Options {
    /// TIAR's Adam steps: `--tiar-iters`, else by the weights' bits
    /// ([`TIAR_STEPS_8BIT`], [`TIAR_STEPS_LOW_BIT`]).
    pub fn tiar_steps(&self) -> usize {
        self.tiar_iters.unwrap_or(match self.weight_bits >= 8 {
            true => TIAR_STEPS_8BIT,
            false => TIAR_STEPS_LOW_BIT,
        })
    }

    /// Checks combinations no pass can run with.
    pub fn validate(&self) -> Result<()> {
        if !matches!(self.weight_bits, 4 | 6 | 8) {
            return Err(Error::invalid(format!(
                "--weight-bits {}: 4, 6 or 8",
                self.weight_bits
            )));
        }
        if !matches!(self.act_bits, 4 | 6 | 8 | 32) {
            return Err(Error::invalid(format!(
                "--act-bits {}: 4, 6 or 8, or 32 for weight-only (16-bit activations are not supported yet)",
                self.act_bits
            )));
        }
        if let TcrAlpha::Fixed(a) = self.tcr_alpha {
            if !(0.0..=1.0).contains(&a) {
                return Err(Error::invalid(format!("--tcr-alpha {a}: between 0 and 1")));
            }
        }
        if self.step_groups == StepGroups::Fixed(0) {
            return Err(Error::invalid("--step-groups must be at least 1"));
        }
        if self.calib_budget_s.is_nan() || self.calib_budget_s <= 0.0 {
            return Err(Error::invalid(
                "--calib-budget must be a positive number of seconds",
            ));
        }
        if self.calib_batch == 0 {
            return Err(Error::invalid("--calib-batch must be at least 1"));
        }
        if self.calib_samples == 0 || self.calib_steps == Some(0) {
            return Err(Error::invalid(
                "--calib-samples and --calib-steps must be at least 1",
            ));
        }
        if self.eval_samples == Some(0) {
            return Err(Error::invalid("--eval-samples must be at least 1"));
        }
        if let Some(g) = self.guidance_scale {
            if !g.is_finite() {
                return Err(Error::invalid(format!(
                    "--guidance-scale {g}: not a number"
                )));
            }
        }
        Ok(())
    }

    /// The deployment's scheduler configuration: `--scheduler FILE` (diffusers'
    /// semantics: its missing keys take diffusers' defaults), else the model's metadata
    /// (`tfmqc.schedule` of an earlier tfmqc run, else the `diffusion.*` keys), else
    /// diffusers' DDIMScheduler defaults; `--schedule`, `--train-timesteps`,
    /// `--beta-start`, `--beta-end` override it.
    pub fn scheduler(&self, model: &Model) -> Result<SchedulerConfig> {
        let mut c = match &self.scheduler {
            Some(path) => SchedulerConfig::from_file(path).map_err(runtime_user_error)?,
            None => SchedulerConfig::from_metadata(
                &|k| model.metadata_value(k).map(String::from),
                "the model",
            )
            .map_err(runtime_user_error)?,
        };
        if let Some(kind) = &self.schedule {
            c.beta_schedule = kind.parse().map_err(Error::invalid)?;
            c.trained_betas = None;
        }
        if let Some(t) = self.train_timesteps {
            if t == 0 {
                return Err(Error::invalid("--train-timesteps must be at least 1"));
            }
            c.num_train_timesteps = t;
            c.trained_betas = None;
        }
        if let Some(b) = self.beta_start {
            c.beta_start = b;
            c.trained_betas = None;
        }
        if let Some(b) = self.beta_end {
            c.beta_end = b;
            c.trained_betas = None;
        }
        if c.trained_betas.is_none()
            && c.beta_schedule != tfmqc_runtime::BetaSchedule::Cosine
            && !(c.beta_start > 0.0 && c.beta_end > c.beta_start && c.beta_end < 1.0)
        {
            return Err(Error::invalid(format!(
                "beta schedule {}..{} is not increasing inside (0, 1)",
                c.beta_start, c.beta_end
            )));
        }
        Ok(c)
    }

    /// The noise schedule (β, ᾱ) of [`Options::scheduler`].
    pub fn schedule(&self, model: &Model) -> Result<tfmqc_runtime::Schedule> {
        Ok(self.scheduler(model)?.schedule())
    }

    /// The step counts calibration runs: `--calib-steps`, else `--sampling-steps`, else
    /// the defaults, largest first. Each must visit time steps of S only under the
    /// configured sampler: an explicit count that does not is an error; default counts
    /// that do not are left out (an error when none is left).
    pub fn calibration_step_counts(&self, model: &Model, set: &[i64]) -> Result<Vec<usize>> {
        let config = self.scheduler(model)?;
        let (mut counts, explicit) = match (self.calib_steps, &self.sampling_steps) {
            (Some(n), _) => (vec![n], "--calib-steps"),
            (None, Some(SamplingSteps::Counts(c))) => (c.clone(), "--sampling-steps"),
            _ => (DEFAULT_SAMPLING_STEPS.to_vec(), ""),
        };
        counts.sort_unstable_by(|a, b| b.cmp(a));
        counts.dedup();
        let fits = |n: usize| -> Result<std::result::Result<(), String>> {
            let ts = sampler::timesteps(self.sampler, &config, n).map_err(runtime_user_error)?;
            Ok(match ts.iter().find(|t| set.binary_search(t).is_err()) {
                None => Ok(()),
                Some(t) => Err(format!(
                    "{} at {n} steps visits t = {t}, outside the time-step set S ({} steps, {}..{})",
                    self.sampler,
                    set.len(),
                    set[0],
                    set[set.len() - 1]
                )),
            })
        };
        let mut kept = vec![];
        for n in counts {
            match fits(n)? {
                Ok(()) => kept.push(n),
                Err(why) if !explicit.is_empty() => {
                    return Err(Error::invalid(format!(
                        "{explicit} {n}: {why}; give --timesteps covering it, or step counts S covers: {}",
                        self.counts_covered(&config, set)
                    )))
                }
                Err(_) => {}
            }
        }
        if kept.is_empty() {
            return Err(Error::invalid(format!(
                "none of the default sampling step counts ({}) visits only time steps of S ({} steps, {}..{}) with {}; give --sampling-steps among: {}",
                DEFAULT_SAMPLING_STEPS.map(|n| n.to_string()).join(","),
                set.len(),
                set[0],
                set[set.len() - 1],
                self.sampler,
                self.counts_covered(&config, set)
            )));
        }
        Ok(kept)
    }

    /// The calibration step counts of at most `max_steps` steps (for a calibration
    /// budget): those of [`Options::calibration_step_counts`] that are, else the largest
    /// count up to `max_steps` whose time steps lie in S, else the smallest count.
    pub fn step_counts_within(
        &self,
        model: &Model,
        set: &[i64],
        max_steps: usize,
    ) -> Result<Vec<usize>> {
        let counts = self.calibration_step_counts(model, set)?;
        let within: Vec<usize> = counts.iter().copied().filter(|&n| n <= max_steps).collect();
        if !within.is_empty() {
            return Ok(within);
        }
        let config = self.scheduler(model)?;
        let fits = (1..=max_steps).rev().find(|&n| {
            sampler::timesteps(self.sampler, &config, n)
                .is_ok_and(|ts| ts.iter().all(|t| set.binary_search(t).is_ok()))
        });
        Ok(vec![fits.unwrap_or_else(|| {
            *counts.last().expect("at least one count")
        })])
    }

    /// The step counts (up to 12) whose time steps lie in `set` under the sampler.
    fn counts_covered(&self, config: &SchedulerConfig, set: &[i64]) -> String {
        let v: Vec<String> = (1..=config.num_train_timesteps.min(1000))
            .filter(|&n| {
                sampler::timesteps(self.sampler, config, n)
                    .is_ok_and(|ts| ts.iter().all(|t| set.binary_search(t).is_ok()))
            })
            .take(12)
            .map(|n| n.to_string())
            .collect();
        if v.is_empty() {
            "none".into()
        } else {
            v.join(", ")
        }
    }
}

/// A runtime error about user input (a scheduler file, a step count) as a user error.
fn runtime_user_error(e: tfmqc_runtime::Error) -> Error {
    Error::invalid(e.to_string())
}

/// The number of training time steps T: the model's metadata, else 1000.
pub fn train_timesteps(model: &Model) -> Result<usize> {
    match model.metadata_value(meta::TRAIN_TIMESTEPS) {
        Some(v) => v
            .trim()
            .parse::<usize>()
            .ok()
            .filter(|&t| t > 0)
            .ok_or_else(|| {
                Error::invalid(format!(
                    "metadata {} = '{v}' is not a positive integer",
                    meta::TRAIN_TIMESTEPS
                ))
            }),
        None => Ok(1000),
    }
}

/// Parses a time-step set: `N` (0..N-1), `ddim:N` (k·T/N for k < N) or `a,b,c`.
/// The result is sorted, without duplicates, and inside 0..T.
pub fn parse_timesteps(spec: &str, train_timesteps: usize) -> Result<Vec<i64>> {
    let t = train_timesteps as i64;
    let spec = spec.trim();
    let bad = |why: String| Error::invalid(format!("--timesteps '{spec}': {why}"));
    let mut set: Vec<i64> = if let Some(n) = spec.strip_prefix("ddim:") {
        let n: i64 = n
            .trim()
            .parse()
            .map_err(|_| bad("ddim:N needs a whole number N".into()))?;
        if n <= 0 || n > t {
            return Err(bad(format!("ddim:N needs 1 ≤ N ≤ T = {t}")));
        }
        (0..n).map(|k| k * t / n).collect()
    } else if spec.contains(',') {
        spec.split(',')
            .filter(|s| !s.trim().is_empty())
            .map(|s| {
                s.trim()
                    .parse::<i64>()
                    .map_err(|_| bad(format!("'{}' is not a whole number", s.trim())))
            })
            .collect::<Result<_>>()?
    } else {
        let n: i64 = spec
            .parse()
            .map_err(|_| bad("expected N (0..N-1), ddim:N, or a comma-separated list".into()))?;
        if n > t {
            return Err(bad(format!(
                "0..{} goes past the model's T = {t} training steps",
                n - 1
            )));
        }
        (0..n).collect()
    };
    if set.is_empty() {
        return Err(bad("the time-step set is empty".into()));
    }
    if let Some(&v) = set.iter().find(|&&v| v < 0 || v >= t) {
        return Err(bad(format!(
            "time step {v} is outside the model's range 0..{}",
            t - 1
        )));
    }
    set.sort_unstable();
    set.dedup();
    Ok(set)
}

/// S for a model: `--timesteps`, else the set recorded by an earlier tfmqc run, else
/// every time step DDIM, DDPM, Euler and DPM-Solver++ visit at the sampling step counts
/// under the deployment's scheduler (`--sampling-steps all`: all T training steps).
pub fn timestep_set(model: &Model, options: &Options) -> Result<Vec<i64>> {
    let config = options.scheduler(model)?;
    let t = config.num_train_timesteps;
    if let Some(spec) = &options.timesteps {
        return parse_timesteps(spec, t);
    }
    if let Some(recorded) = model.metadata_value(meta::TIMESTEPS) {
        return parse_timesteps(recorded, t);
    }
    let counts = match &options.sampling_steps {
        Some(SamplingSteps::All) => return parse_timesteps(&t.to_string(), t),
        Some(SamplingSteps::Counts(c)) => c.clone(),
        None => DEFAULT_SAMPLING_STEPS.to_vec(),
    };
    // The calibration sampler's errors (a step count over T, ...) are the user's.
    for &n in &counts {
        sampler::timesteps(options.sampler, &config, n).map_err(runtime_user_error)?;
    }
    let (set, _) = sampler::covered_timesteps(&config, &Sampler::ALL, &counts);
    Ok(set)
}

/// serde's `skip_serializing_if` for fields recorded only when off.
fn is_true(b: &bool) -> bool {
    *b
}

/// serde's `skip_serializing_if` for fields recorded only when on.
fn is_false(b: &bool) -> bool {
    !*b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ddim_subset_is_k_times_t_over_n() {
        let s = parse_timesteps("ddim:50", 1000).unwrap();
        assert_eq!(s.len(), 50);
        assert_eq!(&s[..3], &[0, 20, 40]);
        assert_eq!(*s.last().unwrap(), 980);
    }

    #[test]
    fn count_means_all_steps_below_it() {
        assert_eq!(parse_timesteps("4", 1000).unwrap(), vec![0, 1, 2, 3]);
    }

    #[test]
    fn explicit_list_is_sorted_and_deduplicated() {
        assert_eq!(
            parse_timesteps("40, 0,20,20", 1000).unwrap(),
            vec![0, 20, 40]
        );
    }

    #[test]
    fn values_outside_the_schedule_are_rejected() {
        let e = parse_timesteps("0,1000", 1000).unwrap_err().to_string();
        assert!(e.contains("outside the model's range 0..999"), "{e}");
        assert!(parse_timesteps("2000", 1000).is_err());
        assert!(parse_timesteps("-1,3", 1000).is_err());
    }

    #[test]
    fn empty_and_malformed_sets_are_rejected() {
        assert!(parse_timesteps(",", 1000)
            .unwrap_err()
            .to_string()
            .contains("empty"));
        assert!(parse_timesteps("0", 1000)
            .unwrap_err()
            .to_string()
            .contains("empty"));
        assert!(parse_timesteps("ddim:x", 1000).is_err());
        assert!(parse_timesteps("abc", 1000).is_err());
    }
}
