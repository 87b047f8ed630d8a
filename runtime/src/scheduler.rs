//! The deployment sampler's configuration, as diffusers writes it: a
//! `scheduler_config.json` (every diffusers model folder has one) read with diffusers'
//! semantics. A key the file does not have takes the default of the scheduler class that
//! runs (DDIM, DDPM, Euler and DPM-Solver++ differ only in `timestep_spacing`); keys
//! tfmqc does not know (`_class_name`, `skip_prk_steps`, ...) are ignored; a known key
//! with a value tfmqc cannot honour is an error that names the file and the key, never
//! a silent approximation.
//!
//! The same JSON (the resolved keys only) is what tfmqc records in a compiled model's
//! `tfmqc.schedule` metadata, so the runtime samples with the scheduler the model was
//! calibrated for. The older flat form of that metadata (`train_timesteps`,
//! `beta_schedule` = `scaled-linear`/`cosine`, `beta_start`, `beta_end`) is read too.

use serde_json::{Map, Value};

use crate::error::{Error, Result};
use crate::meta;
use crate::schedule::{BetaSchedule, Schedule};

/// What the denoiser predicts (diffusers' `prediction_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PredictionType {
    /// The noise ε.
    Epsilon,
    /// v = √ᾱ·ε − √(1−ᾱ)·x₀ (Salimans & Ho; SD 2.x 768).
    VPrediction,
    /// The clean sample x₀.
    Sample,
}

impl PredictionType {
    pub fn name(self) -> &'static str {
        match self {
            PredictionType::Epsilon => "epsilon",
            PredictionType::VPrediction => "v_prediction",
            PredictionType::Sample => "sample",
        }
    }

    /// (x̂₀, ε̂) from the model output `out` at the noisy sample `x`, where
    /// x = √ᾱ·x₀ + √(1−ᾱ)·ε (DDPM scale).
    pub fn x0_eps(self, x: f64, out: f64, alpha_cumprod: f64) -> (f64, f64) {
        let (a, s) = (alpha_cumprod.sqrt(), (1.0 - alpha_cumprod).sqrt());
        match self {
            PredictionType::Epsilon => ((x - s * out) / a, out),
            PredictionType::VPrediction => (a * x - s * out, a * out + s * x),
            PredictionType::Sample => (out, (x - a * out) / s),
        }
    }
}

/// How the inference time steps are spread over 0..T (diffusers' `timestep_spacing`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TimestepSpacing {
    Leading,
    Trailing,
    Linspace,
}

impl TimestepSpacing {
    pub fn name(self) -> &'static str {
        match self {
            TimestepSpacing::Leading => "leading",
            TimestepSpacing::Trailing => "trailing",
            TimestepSpacing::Linspace => "linspace",
        }
    }
}

/// DDPM's posterior variance (`variance_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VarianceType {
    FixedSmall,
    FixedSmallLog,
    FixedLarge,
    FixedLargeLog,
    Learned,
    LearnedRange,
}

impl VarianceType {
    pub fn name(self) -> &'static str {
        match self {
            VarianceType::FixedSmall => "fixed_small",
            VarianceType::FixedSmallLog => "fixed_small_log",
            VarianceType::FixedLarge => "fixed_large",
            VarianceType::FixedLargeLog => "fixed_large_log",
            VarianceType::Learned => "learned",
            VarianceType::LearnedRange => "learned_range",
        }
    }
}

/// DPM-Solver's last-step noise level (`final_sigmas_type`), also Euler's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinalSigmas {
    Zero,
    SigmaMin,
}

/// DPM-Solver's second-order formula (`solver_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SolverType {
    Midpoint,
    Heun,
}

/// A diffusers scheduler configuration. `None` fields were absent from the file and
/// take the running scheduler class's default.
#[derive(Clone, Debug, PartialEq)]
pub struct SchedulerConfig {
    pub num_train_timesteps: usize,
    pub beta_start: f64,
    pub beta_end: f64,
    pub beta_schedule: BetaSchedule,
    pub trained_betas: Option<Vec<f64>>,
    pub prediction_type: PredictionType,
    pub clip_sample: bool,
    pub clip_sample_range: f64,
    pub thresholding: bool,
    pub dynamic_thresholding_ratio: f64,
    pub sample_max_value: f64,
    pub steps_offset: i64,
    /// `None`: DDIM and DDPM use `leading`, Euler and DPM-Solver++ `linspace`.
    pub timestep_spacing: Option<TimestepSpacing>,
    pub set_alpha_to_one: bool,
    /// DDPM only (`None`: `fixed_small`).
    pub variance_type: Option<VarianceType>,
    /// DPM-Solver++ only.
    pub solver_order: usize,
    pub solver_type: SolverType,
    pub lower_order_final: bool,
    pub euler_at_final: bool,
    /// Euler and DPM-Solver++.
    pub final_sigmas_type: FinalSigmas,
    pub lambda_min_clipped: f64,
}

impl Default for SchedulerConfig {
    /// diffusers' `DDIMScheduler()` defaults (clip_sample true, linear β 1e-4..0.02).
    fn default() -> SchedulerConfig {
        SchedulerConfig {
            num_train_timesteps: 1000,
            beta_start: 1e-4,
            beta_end: 0.02,
            beta_schedule: BetaSchedule::Linear,
            trained_betas: None,
            prediction_type: PredictionType::Epsilon,
            clip_sample: true,
            clip_sample_range: 1.0,
            thresholding: false,
            dynamic_thresholding_ratio: 0.995,
            sample_max_value: 1.0,
            steps_offset: 0,
            timestep_spacing: None,
            set_alpha_to_one: true,
            variance_type: None,
            solver_order: 2,
            solver_type: SolverType::Midpoint,
            lower_order_final: true,
            euler_at_final: false,
            final_sigmas_type: FinalSigmas::Zero,
            lambda_min_clipped: f64::NEG_INFINITY,
        }
    }
}

/// Replaces the bare `NaN`, `Infinity` and `-Infinity` that Python's `json.dumps` writes
/// (diffusers saves `"lambda_min_clipped": -Infinity`) by strings, outside string literals,
/// so a strict JSON parser reads the file.
fn python_json(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let (mut in_string, mut escaped) = (false, false);
    let mut rest = text;
    while let Some(c) = rest.chars().next() {
        if in_string {
            out.push(c);
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_string = false;
            }
            rest = &rest[c.len_utf8()..];
            continue;
        }
        if c == '"' {
            in_string = true;
        }
        let token = ["-Infinity", "Infinity", "NaN"]
            .into_iter()
            .find(|t| rest.starts_with(t));
        if let Some(t) = token {
            out.push('"');
            out.push_str(t);
            out.push('"');
            rest = &rest[t.len()..];
        } else {
            out.push(c);
            rest = &rest[c.len_utf8()..];
        }
    }
    out
}

/// Reads typed values of one JSON object, with errors naming the source and the key.
struct Reader<'a> {
    map: &'a Map<String, Value>,
    source: &'a str,
}

impl Reader<'_> {
    fn err(&self, key: &str, why: impl std::fmt::Display) -> Error {
        Error::BadInput(format!("{}: key '{key}': {why}", self.source))
    }

    /// The value, `None` when absent or null.
    fn get(&self, key: &str) -> Option<&Value> {
        self.map.get(key).filter(|v| !v.is_null())
    }

    fn number(&self, key: &str) -> Result<Option<f64>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Number(n)) => Ok(n.as_f64()),
            Some(Value::String(s)) if s == "-Infinity" => Ok(Some(f64::NEG_INFINITY)),
            Some(Value::String(s)) if s == "Infinity" => Ok(Some(f64::INFINITY)),
            // The old metadata form wrote some numbers as strings.
            Some(Value::String(s)) => s
                .trim()
                .parse::<f64>()
                .map(Some)
                .map_err(|_| self.err(key, format!("'{s}' is not a number"))),
            Some(v) => Err(self.err(key, format!("{v} is not a number"))),
        }
    }

    fn integer(&self, key: &str) -> Result<Option<i64>> {
        match self.number(key)? {
            None => Ok(None),
            Some(v) if v.fract() == 0.0 && v.abs() < 1e15 => Ok(Some(v as i64)),
            Some(v) => Err(self.err(key, format!("{v} is not a whole number"))),
        }
    }

    fn boolean(&self, key: &str) -> Result<Option<bool>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(self.err(key, format!("{v} is not true or false"))),
        }
    }

    /// One of `choices` (first = the canonical name of each value).
    fn choice<T: Copy>(&self, key: &str, choices: &[(&str, T)]) -> Result<Option<T>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => choices
                .iter()
                .find(|(name, _)| name == s)
                .map(|(_, v)| Some(*v))
                .ok_or_else(|| {
                    let mut names: Vec<&str> = choices.iter().map(|(n, _)| *n).collect();
                    names.dedup();
                    self.err(
                        key,
                        format!("unknown value '{s}' (tfmqc knows {})", names.join(", ")),
                    )
                }),
            Some(v) => Err(self.err(key, format!("{v} is not a string"))),
        }
    }

    /// A switch tfmqc implements only in its default (off) position.
    fn must_be_off(&self, key: &str, what: &str) -> Result<()> {
        match self.boolean(key)? {
            Some(true) => Err(self.err(key, format!("true is not supported ({what})"))),
            _ => Ok(()),
        }
    }
}

impl SchedulerConfig {
    /// Parses a scheduler_config.json text; `source` names it in errors (a file path).
    pub fn from_json(text: &str, source: &str) -> Result<SchedulerConfig> {
        let value: Value = serde_json::from_str(&python_json(text))
            .map_err(|e| Error::BadInput(format!("{source}: not a JSON object: {e}")))?;
        let map = value
            .as_object()
            .ok_or_else(|| Error::BadInput(format!("{source}: not a JSON object")))?;
        SchedulerConfig::from_map(map, source)
    }

    /// Reads a diffusers scheduler_config.json file.
    pub fn from_file(path: &std::path::Path) -> Result<SchedulerConfig> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::Io {
            path: path.to_path_buf(),
            source: e,
        })?;
        SchedulerConfig::from_json(&text, &path.display().to_string())
    }

    /// The keys of one JSON object (see the module notes).
    pub fn from_map(map: &Map<String, Value>, source: &str) -> Result<SchedulerConfig> {
        let r = Reader { map, source };
        let mut c = SchedulerConfig::default();
        // The older tfmqc metadata form: `train_timesteps`.
        let t = match r.integer("num_train_timesteps")? {
            Some(t) => Some((t, "num_train_timesteps")),
            None => r
                .integer("train_timesteps")?
                .map(|t| (t, "train_timesteps")),
        };
        if let Some((t, key)) = t {
            if !(1..=10_000_000).contains(&t) {
                return Err(r.err(key, format!("{t} is not a positive number of steps")));
            }
            c.num_train_timesteps = t as usize;
        }
        if let Some(v) = r.number("beta_start")? {
            c.beta_start = v;
        }
        if let Some(v) = r.number("beta_end")? {
            c.beta_end = v;
        }
        if let Some(v) = r.choice(
            "beta_schedule",
            &[
                ("linear", BetaSchedule::Linear),
                ("scaled_linear", BetaSchedule::ScaledLinear),
                ("squaredcos_cap_v2", BetaSchedule::Cosine),
                // The older metadata spellings.
                ("scaled-linear", BetaSchedule::ScaledLinear),
                ("scaledlinear", BetaSchedule::ScaledLinear),
                ("cosine", BetaSchedule::Cosine),
            ],
        )? {
            c.beta_schedule = v;
        }
        if let Some(v) = r.get("trained_betas") {
            let betas = v
                .as_array()
                .and_then(|a| a.iter().map(|x| x.as_f64()).collect::<Option<Vec<f64>>>())
                .ok_or_else(|| r.err("trained_betas", "is not a list of numbers"))?;
            if betas.len() != c.num_train_timesteps {
                return Err(r.err(
                    "trained_betas",
                    format!(
                        "holds {} betas for num_train_timesteps = {}",
                        betas.len(),
                        c.num_train_timesteps
                    ),
                ));
            }
            if let Some(b) = betas.iter().find(|b| !(**b > 0.0 && **b < 1.0)) {
                return Err(r.err("trained_betas", format!("{b} is not inside (0, 1)")));
            }
            c.trained_betas = Some(betas);
        } else if c.beta_schedule != BetaSchedule::Cosine
            && !(c.beta_start > 0.0 && c.beta_end >= c.beta_start && c.beta_end < 1.0)
        {
            return Err(r.err(
                "beta_end",
                format!(
                    "beta_start {} .. beta_end {} is not increasing inside (0, 1)",
                    c.beta_start, c.beta_end
                ),
            ));
        }
        if let Some(v) = r.choice(
            "prediction_type",
            &[
                ("epsilon", PredictionType::Epsilon),
                ("v_prediction", PredictionType::VPrediction),
                ("sample", PredictionType::Sample),
            ],
        )? {
            c.prediction_type = v;
        }
        if let Some(v) = r.boolean("clip_sample")? {
            c.clip_sample = v;
        }
        if let Some(v) = r.number("clip_sample_range")? {
            if v.is_nan() || v <= 0.0 {
                return Err(r.err("clip_sample_range", format!("{v} is not positive")));
            }
            c.clip_sample_range = v;
        }
        if let Some(v) = r.boolean("thresholding")? {
            c.thresholding = v;
        }
        if let Some(v) = r.number("dynamic_thresholding_ratio")? {
            if !(v > 0.0 && v <= 1.0) {
                return Err(r.err(
                    "dynamic_thresholding_ratio",
                    format!("{v} is not in (0, 1]"),
                ));
            }
            c.dynamic_thresholding_ratio = v;
        }
        if let Some(v) = r.number("sample_max_value")? {
            if v.is_nan() || v <= 0.0 {
                return Err(r.err("sample_max_value", format!("{v} is not positive")));
            }
            c.sample_max_value = v;
        }
        if let Some(v) = r.integer("steps_offset")? {
            if v < 0 {
                return Err(r.err("steps_offset", format!("{v} is negative")));
            }
            c.steps_offset = v;
        }
        c.timestep_spacing = r.choice(
            "timestep_spacing",
            &[
                ("leading", TimestepSpacing::Leading),
                ("trailing", TimestepSpacing::Trailing),
                ("linspace", TimestepSpacing::Linspace),
            ],
        )?;
        if let Some(v) = r.boolean("set_alpha_to_one")? {
            c.set_alpha_to_one = v;
        }
        c.variance_type = r.choice(
            "variance_type",
            &[
                ("fixed_small", VarianceType::FixedSmall),
                ("fixed_small_log", VarianceType::FixedSmallLog),
                ("fixed_large", VarianceType::FixedLarge),
                ("fixed_large_log", VarianceType::FixedLargeLog),
                ("learned", VarianceType::Learned),
                ("learned_range", VarianceType::LearnedRange),
            ],
        )?;
        if let Some(v) = r.integer("solver_order")? {
            if !(1..=3).contains(&v) {
                return Err(r.err(
                    "solver_order",
                    format!("{v}: DPM-Solver++ has orders 1, 2, 3"),
                ));
            }
            c.solver_order = v as usize;
        }
        r.choice("algorithm_type", &[("dpmsolver++", ())])?;
        if let Some(v) = r.choice(
            "solver_type",
            &[
                ("midpoint", SolverType::Midpoint),
                ("heun", SolverType::Heun),
                // diffusers maps the UniPC/DEIS names to midpoint.
                ("logrho", SolverType::Midpoint),
                ("bh1", SolverType::Midpoint),
                ("bh2", SolverType::Midpoint),
            ],
        )? {
            c.solver_type = v;
        }
        if let Some(v) = r.boolean("lower_order_final")? {
            c.lower_order_final = v;
        }
        if let Some(v) = r.boolean("euler_at_final")? {
            c.euler_at_final = v;
        }
        if let Some(v) = r.choice(
            "final_sigmas_type",
            &[
                ("zero", FinalSigmas::Zero),
                ("sigma_min", FinalSigmas::SigmaMin),
            ],
        )? {
            c.final_sigmas_type = v;
        }
        if let Some(v) = r.number("lambda_min_clipped")? {
            c.lambda_min_clipped = v;
        }
        r.choice("interpolation_type", &[("linear", ())])?;
        r.choice("timestep_type", &[("discrete", ())])?;
        for key in [
            "use_karras_sigmas",
            "use_exponential_sigmas",
            "use_beta_sigmas",
            "use_lu_lambdas",
        ] {
            r.must_be_off(key, "tfmqc samples at the schedule's own noise levels")?;
        }
        r.must_be_off(
            "use_flow_sigmas",
            "flow-matching models are not DDPM denoisers",
        )?;
        r.must_be_off(
            "use_dynamic_shifting",
            "flow-matching models are not DDPM denoisers",
        )?;
        r.must_be_off(
            "rescale_betas_zero_snr",
            "give the rescaled betas as trained_betas instead",
        )?;
        Ok(c)
    }

    /// The scheduler configuration of a model from its metadata: `tfmqc.schedule`
    /// (diffusers' JSON as tfmqc records it, or the older flat form), else the
    /// `diffusion.*` keys model exporters write, else diffusers' DDIMScheduler defaults.
    /// `model` (a file name, or "") prefixes errors.
    pub fn from_metadata(
        meta: &dyn Fn(&str) -> Option<String>,
        model: &str,
    ) -> Result<SchedulerConfig> {
        let source = |key: &str| {
            if model.is_empty() {
                format!("metadata {key}")
            } else {
                format!("{model}: metadata {key}")
            }
        };
        if let Some(json) = meta(meta::SCHEDULE) {
            return SchedulerConfig::from_json(&json, &source(meta::SCHEDULE));
        }
        let mut map = Map::new();
        for (meta_key, key) in [
            (meta::TRAIN_TIMESTEPS, "num_train_timesteps"),
            (meta::BETA_SCHEDULE, "beta_schedule"),
            (meta::BETA_START, "beta_start"),
            (meta::BETA_END, "beta_end"),
            (meta::PREDICTION_TYPE, "prediction_type"),
        ] {
            if let Some(v) = meta(meta_key) {
                map.insert(key.to_string(), Value::String(v.trim().to_string()));
            }
        }
        SchedulerConfig::from_map(&map, &source("diffusion.*"))
    }

    /// The resolved keys as diffusers names them (absent ones stay absent), plus
    /// `train_timesteps` for readers of the older metadata form.
    pub fn to_json(&self) -> Value {
        let d = SchedulerConfig::default();
        let mut m = Map::new();
        let mut put = |k: &str, v: Value| {
            m.insert(k.to_string(), v);
        };
        put("num_train_timesteps", self.num_train_timesteps.into());
        put("train_timesteps", self.num_train_timesteps.into());
        put("beta_start", self.beta_start.into());
        put("beta_end", self.beta_end.into());
        put(
            "beta_schedule",
            match self.beta_schedule {
                BetaSchedule::Linear => "linear",
                BetaSchedule::ScaledLinear => "scaled_linear",
                BetaSchedule::Cosine => "squaredcos_cap_v2",
            }
            .into(),
        );
        if let Some(b) = &self.trained_betas {
            put("trained_betas", b.clone().into());
        }
        put("prediction_type", self.prediction_type.name().into());
        put("clip_sample", self.clip_sample.into());
        put("clip_sample_range", self.clip_sample_range.into());
        put("thresholding", self.thresholding.into());
        put(
            "dynamic_thresholding_ratio",
            self.dynamic_thresholding_ratio.into(),
        );
        put("sample_max_value", self.sample_max_value.into());
        put("steps_offset", self.steps_offset.into());
        if let Some(s) = self.timestep_spacing {
            put("timestep_spacing", s.name().into());
        }
        put("set_alpha_to_one", self.set_alpha_to_one.into());
        if let Some(v) = self.variance_type {
            put("variance_type", v.name().into());
        }
        if self.solver_order != d.solver_order {
            put("solver_order", self.solver_order.into());
        }
        if self.solver_type != d.solver_type {
            put("solver_type", "heun".into());
        }
        if self.lower_order_final != d.lower_order_final {
            put("lower_order_final", self.lower_order_final.into());
        }
        if self.euler_at_final != d.euler_at_final {
            put("euler_at_final", self.euler_at_final.into());
        }
        if self.final_sigmas_type != d.final_sigmas_type {
            put("final_sigmas_type", "sigma_min".into());
        }
        if self.lambda_min_clipped.is_finite() {
            put("lambda_min_clipped", self.lambda_min_clipped.into());
        }
        Value::Object(m)
    }

    /// β and ᾱ for every training step (in f64; diffusers computes them in f32, which
    /// differs by about 1e-6 relative).
    pub fn schedule(&self) -> Schedule {
        match &self.trained_betas {
            Some(b) => Schedule::from_betas(self.beta_schedule, b),
            None => Schedule::new(
                self.beta_schedule,
                self.num_train_timesteps,
                self.beta_start,
                self.beta_end,
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SD15: &str = r#"{"_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0",
        "num_train_timesteps":1000,"beta_start":0.00085,"beta_end":0.012,
        "beta_schedule":"scaled_linear","clip_sample":false,"set_alpha_to_one":false,
        "skip_prk_steps": true, "steps_offset":1,"prediction_type":"epsilon",
        "timestep_spacing":"leading", "trained_betas": null}"#;

    #[test]
    fn reads_stable_diffusion_15s_config_and_ignores_unknown_keys() {
        let c = SchedulerConfig::from_json(SD15, "sd.json").unwrap();
        assert_eq!(c.beta_schedule, BetaSchedule::ScaledLinear);
        assert_eq!((c.beta_start, c.beta_end), (0.00085, 0.012));
        assert!(!c.clip_sample && !c.set_alpha_to_one);
        assert_eq!(c.steps_offset, 1);
        assert_eq!(c.timestep_spacing, Some(TimestepSpacing::Leading));
        assert_eq!(c.prediction_type, PredictionType::Epsilon);
    }

    #[test]
    fn an_empty_file_gives_ddims_defaults() {
        let c = SchedulerConfig::from_json("{}", "x").unwrap();
        assert_eq!(c, SchedulerConfig::default());
        assert!(c.clip_sample && c.set_alpha_to_one);
        assert_eq!(c.timestep_spacing, None);
    }

    #[test]
    fn unknown_values_of_known_keys_name_the_file_and_the_key() {
        for (json, key, word) in [
            (
                r#"{"beta_schedule": "sigmoid"}"#,
                "beta_schedule",
                "sigmoid",
            ),
            (r#"{"prediction_type": "flow"}"#, "prediction_type", "flow"),
            (
                r#"{"timestep_spacing": "karras"}"#,
                "timestep_spacing",
                "karras",
            ),
            (r#"{"clip_sample": "yes"}"#, "clip_sample", "true or false"),
            (
                r#"{"use_karras_sigmas": true}"#,
                "use_karras_sigmas",
                "not supported",
            ),
            (
                r#"{"algorithm_type": "sde-dpmsolver++"}"#,
                "algorithm_type",
                "sde",
            ),
            (r#"{"steps_offset": 1.5}"#, "steps_offset", "whole"),
            (
                r#"{"trained_betas": [0.1, 0.2]}"#,
                "trained_betas",
                "2 betas",
            ),
            (
                r#"{"beta_start": 0.5, "beta_end": 0.1}"#,
                "beta_end",
                "increasing",
            ),
        ] {
            let e = SchedulerConfig::from_json(json, "my/scheduler_config.json")
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("my/scheduler_config.json")
                    && e.contains(&format!("'{key}'"))
                    && e.contains(word),
                "{json}: {e}"
            );
        }
        let e = SchedulerConfig::from_json("[1]", "f.json").unwrap_err();
        assert!(e.to_string().contains("f.json"), "{e}");
        let e = SchedulerConfig::from_json("{", "f.json").unwrap_err();
        assert!(e.to_string().contains("not a JSON"), "{e}");
    }

    #[test]
    fn python_infinities_are_read() {
        let c = SchedulerConfig::from_json(
            r#"{"lambda_min_clipped": -Infinity, "_x": "NaN -Infinity"}"#,
            "f",
        )
        .unwrap();
        assert_eq!(c.lambda_min_clipped, f64::NEG_INFINITY);
        let c = SchedulerConfig::from_json(r#"{"lambda_min_clipped": -5.1}"#, "f").unwrap();
        assert_eq!(c.lambda_min_clipped, -5.1);
    }

    #[test]
    fn the_json_written_reads_back_the_same() {
        let mut c = SchedulerConfig::from_json(SD15, "sd.json").unwrap();
        c.solver_order = 3;
        c.final_sigmas_type = FinalSigmas::SigmaMin;
        let back = SchedulerConfig::from_json(&c.to_json().to_string(), "meta").unwrap();
        assert_eq!(back, c);
        let d = SchedulerConfig::default();
        let back = SchedulerConfig::from_json(&d.to_json().to_string(), "meta").unwrap();
        assert_eq!(back, d);
        let t = SchedulerConfig {
            trained_betas: Some(vec![0.01; 1000]),
            ..Default::default()
        };
        let back = SchedulerConfig::from_json(&t.to_json().to_string(), "meta").unwrap();
        assert_eq!(back, t);
    }

    #[test]
    fn the_older_metadata_form_is_read() {
        let json = r#"{"beta_end":0.012,"beta_schedule":"scaled-linear","beta_start":0.00085,"train_timesteps":500}"#;
        let c = SchedulerConfig::from_json(json, "m").unwrap();
        assert_eq!(c.num_train_timesteps, 500);
        assert_eq!(c.beta_schedule, BetaSchedule::ScaledLinear);
        assert!(c.clip_sample, "the old form sampled with clipping");
    }

    #[test]
    fn v_prediction_converts_to_epsilon_and_x0() {
        // x = √ᾱ·x₀ + √(1−ᾱ)·ε with ᾱ = 0.36: √ᾱ = 0.6, √(1−ᾱ) = 0.8.
        let (x0, eps, a) = (0.5, -1.25, 0.36);
        let x = 0.6 * x0 + 0.8 * eps;
        let v = 0.6 * eps - 0.8 * x0;
        let (px0, peps) = PredictionType::VPrediction.x0_eps(x, v, a);
        assert!((px0 - x0).abs() < 1e-12 && (peps - eps).abs() < 1e-12);
        let (px0, peps) = PredictionType::Epsilon.x0_eps(x, eps, a);
        assert!((px0 - x0).abs() < 1e-12 && (peps - eps).abs() < 1e-12);
        let (px0, peps) = PredictionType::Sample.x0_eps(x, x0, a);
        assert!((px0 - x0).abs() < 1e-12 && (peps - eps).abs() < 1e-12);
    }
}
