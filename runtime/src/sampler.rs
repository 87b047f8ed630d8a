//! The sampler: diffusers' DDIM, DDPM, Euler and DPM-Solver++ schedulers over a
//! [`SchedulerConfig`], with the time steps diffusers computes for a step count. One
//! implementation serves calibration (in the compiler), `Denoiser::sample` and the CLI:
//! [`run`] drives any model call through it, so what calibration records is what
//! deployment feeds the model, step for step.
//!
//! Each scheduler follows its diffusers class (0.42) in what it computes; the arithmetic
//! is f64 per element on f32 samples (diffusers: f32 tensors), so values agree with
//! diffusers to about 1e-5 relative, and the time steps exactly. The model always sees
//! the DDPM-scale noisy sample x_t = √ᾱ·x₀ + √(1−ᾱ)·ε: Euler keeps its state at the
//! σ scale (x_t/√ᾱ) and divides by √(σ²+1) before each call, as diffusers'
//! `scale_model_input` does.

use crate::error::{Error, Result};
use crate::schedule::NoiseRng;
use crate::scheduler::{
    FinalSigmas, PredictionType, SchedulerConfig, SolverType, TimestepSpacing, VarianceType,
};

/// A sampling algorithm (a diffusers scheduler class).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Sampler {
    /// `DDIMScheduler`, η = 0 (deterministic given the initial noise).
    Ddim,
    /// `DDPMScheduler`: ancestral sampling with the posterior variance.
    Ddpm,
    /// `EulerDiscreteScheduler` (no churn).
    Euler,
    /// `DPMSolverMultistepScheduler` with `algorithm_type` dpmsolver++ (2M by default).
    DpmSolverPP,
}

impl Sampler {
    pub const ALL: [Sampler; 4] = [
        Sampler::Ddim,
        Sampler::Ddpm,
        Sampler::Euler,
        Sampler::DpmSolverPP,
    ];

    /// The name `from_str` reads back: `ddim`, `ddpm`, `euler`, `dpm++`.
    pub fn name(self) -> &'static str {
        match self {
            Sampler::Ddim => "ddim",
            Sampler::Ddpm => "ddpm",
            Sampler::Euler => "euler",
            Sampler::DpmSolverPP => "dpm++",
        }
    }

    /// The diffusers class it follows.
    pub fn diffusers_class(self) -> &'static str {
        match self {
            Sampler::Ddim => "DDIMScheduler",
            Sampler::Ddpm => "DDPMScheduler",
            Sampler::Euler => "EulerDiscreteScheduler",
            Sampler::DpmSolverPP => "DPMSolverMultistepScheduler",
        }
    }

    /// The class default of `timestep_spacing`.
    fn default_spacing(self) -> TimestepSpacing {
        match self {
            Sampler::Ddim | Sampler::Ddpm => TimestepSpacing::Leading,
            Sampler::Euler | Sampler::DpmSolverPP => TimestepSpacing::Linspace,
        }
    }
}

impl std::fmt::Display for Sampler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Sampler {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "ddim" => Ok(Sampler::Ddim),
            "ddpm" => Ok(Sampler::Ddpm),
            "euler" => Ok(Sampler::Euler),
            "dpm++" | "dpmsolver++" | "dpm-solver++" | "dpmpp" => Ok(Sampler::DpmSolverPP),
            other => Err(format!(
                "unknown sampler '{other}' (ddim, ddpm, euler, dpm++ = DPM-Solver++ 2M)"
            )),
        }
    }
}

/// Round half to even, as numpy's `round`.
fn np_round(v: f64) -> f64 {
    v.round_ties_even()
}

/// numpy's `linspace(start, stop, num)`.
fn np_linspace(start: f64, stop: f64, num: usize) -> Vec<f64> {
    if num == 1 {
        return vec![start];
    }
    let step = (stop - start) / (num - 1) as f64;
    let mut v: Vec<f64> = (0..num).map(|i| i as f64 * step + start).collect();
    v[num - 1] = stop;
    v
}

/// numpy's `arange(start, stop, step)` for floats: `start + i·delta`, where delta is the
/// second value minus the first (numpy's fill), ⌈(stop − start)/step⌉ values.
fn np_arange(start: f64, stop: f64, step: f64) -> Vec<f64> {
    let len = ((stop - start) / step).ceil().max(0.0) as usize;
    let delta = (start + step) - start;
    (0..len).map(|i| start + i as f64 * delta).collect()
}

fn bad(msg: impl Into<String>) -> Error {
    Error::BadInput(msg.into())
}

/// The time steps `sampler` visits in `steps` steps under `config`, first to last, as
/// diffusers' `set_timesteps(steps)` computes them. Euler with `linspace` spacing visits
/// fractional time steps at most step counts: those are refused (a model folded over a
/// finite set of integer steps cannot take them).
pub fn timesteps(sampler: Sampler, config: &SchedulerConfig, steps: usize) -> Result<Vec<i64>> {
    let t_train = config.num_train_timesteps;
    let tf = t_train as f64;
    if steps == 0 {
        return Err(bad("the number of sampling steps must be at least 1"));
    }
    if steps > t_train {
        return Err(bad(format!(
            "{steps} sampling steps: more than the {t_train} training time steps"
        )));
    }
    let spacing = config.timestep_spacing.unwrap_or(sampler.default_spacing());
    let offset = config.steps_offset as f64;
    let values: Vec<f64> = match sampler {
        Sampler::Ddim | Sampler::Ddpm | Sampler::Euler => match spacing {
            TimestepSpacing::Linspace => {
                let mut v = np_linspace(0.0, tf - 1.0, steps);
                if sampler != Sampler::Euler {
                    v.iter_mut().for_each(|x| *x = np_round(*x));
                }
                v.reverse();
                v
            }
            TimestepSpacing::Leading => {
                let ratio = (t_train / steps) as f64;
                (0..steps)
                    .rev()
                    .map(|i| np_round(i as f64 * ratio) + offset)
                    .collect()
            }
            TimestepSpacing::Trailing => np_arange(tf, 0.0, -(tf / steps as f64))
                .into_iter()
                .map(|x| np_round(x) - 1.0)
                .collect(),
        },
        Sampler::DpmSolverPP => {
            let last = dpm_last_timestep(config) as f64;
            match spacing {
                TimestepSpacing::Linspace => np_linspace(0.0, last - 1.0, steps + 1)
                    .into_iter()
                    .map(np_round)
                    .rev()
                    .take(steps)
                    .collect(),
                TimestepSpacing::Leading => {
                    let ratio = ((last as usize) / (steps + 1)) as f64;
                    (1..=steps)
                        .rev()
                        .map(|i| np_round(i as f64 * ratio) + offset)
                        .collect()
                }
                TimestepSpacing::Trailing => np_arange(last, 0.0, -(tf / steps as f64))
                    .into_iter()
                    .map(|x| np_round(x) - 1.0)
                    .collect(),
            }
        }
    };
    if let Some(v) = values.iter().find(|v| (*v - v.round()).abs() > 1e-9) {
        return Err(bad(format!(
            "{} with timestep_spacing '{}' at {steps} steps visits the fractional time step {v:.4}: a model folded over integer time steps cannot take it (use timestep_spacing 'leading' or 'trailing', or a step count where linspace gives whole steps)",
            sampler.diffusers_class(),
            spacing.name()
        )));
    }
    let out: Vec<i64> = values.iter().map(|v| v.round() as i64).collect();
    if let Some(t) = out.iter().find(|&&t| t < 0 || t >= t_train as i64) {
        return Err(bad(format!(
            "{} at {steps} steps (timestep_spacing '{}', steps_offset {}) visits t = {t}, outside the {t_train} training steps",
            sampler.diffusers_class(),
            spacing.name(),
            config.steps_offset
        )));
    }
    Ok(out)
}

/// DPM-Solver's last time step after `lambda_min_clipped` (T when it is −∞).
fn dpm_last_timestep(config: &SchedulerConfig) -> usize {
    if !config.lambda_min_clipped.is_finite() {
        return config.num_train_timesteps;
    }
    let ac = config.schedule().alphas_cumprod;
    // λ_t = log √ᾱ − log √(1−ᾱ), decreasing in t; searchsorted on the flipped (ascending)
    // array counts the values below the bound.
    let clipped = ac
        .iter()
        .filter(|&&a| 0.5 * (a.ln() - (1.0 - a).ln()) < config.lambda_min_clipped)
        .count();
    config.num_train_timesteps - clipped
}

/// A sampler running over one trajectory: the time steps, and the state a multistep
/// scheduler keeps between steps.
#[derive(Clone, Debug)]
pub struct SamplerState {
    sampler: Sampler,
    config: SchedulerConfig,
    alphas_cumprod: Vec<f64>,
    timesteps: Vec<i64>,
    /// Euler and DPM-Solver++: σ per step, plus the final one.
    sigmas: Vec<f64>,
    /// The step about to run.
    index: usize,
    /// DPM-Solver++: the last x̂₀ predictions, newest last.
    history: Vec<Vec<f32>>,
    lower_order_nums: usize,
}

impl SamplerState {
    /// `steps` steps of `sampler` under `config`; refuses settings a sampler cannot run
    /// (DDPM with a learned variance).
    pub fn new(sampler: Sampler, config: &SchedulerConfig, steps: usize) -> Result<SamplerState> {
        let timesteps = timesteps(sampler, config, steps)?;
        if sampler == Sampler::Ddpm
            && matches!(
                config.variance_type,
                Some(VarianceType::Learned | VarianceType::LearnedRange)
            )
        {
            return Err(bad(format!(
                "the scheduler's variance_type '{}' needs the model's variance output; tfmqc's DDPM runs fixed_small or fixed_large",
                config.variance_type.unwrap().name()
            )));
        }
        if sampler == Sampler::Ddpm && config.variance_type == Some(VarianceType::FixedLargeLog) {
            return Err(bad(
                "the scheduler's variance_type 'fixed_large_log' is not a variance diffusers' DDPM samples with",
            ));
        }
        let alphas_cumprod = config.schedule().alphas_cumprod;
        let sigma_of = |t: i64| {
            let a = alphas_cumprod[t as usize];
            ((1.0 - a) / a).sqrt()
        };
        let sigmas = match sampler {
            Sampler::Euler | Sampler::DpmSolverPP => {
                let mut s: Vec<f64> = timesteps.iter().map(|&t| sigma_of(t)).collect();
                s.push(match config.final_sigmas_type {
                    FinalSigmas::Zero => 0.0,
                    FinalSigmas::SigmaMin => sigma_of(0),
                });
                s
            }
            _ => vec![],
        };
        Ok(SamplerState {
            sampler,
            config: config.clone(),
            alphas_cumprod,
            timesteps,
            sigmas,
            index: 0,
            history: vec![],
            lower_order_nums: 0,
        })
    }

    pub fn sampler(&self) -> Sampler {
        self.sampler
    }

    pub fn config(&self) -> &SchedulerConfig {
        &self.config
    }

    /// The time steps of the trajectory, first to last.
    pub fn timesteps(&self) -> &[i64] {
        &self.timesteps
    }

    /// The index of the step about to run (= the number of steps done).
    pub fn step_index(&self) -> usize {
        self.index
    }

    pub fn done(&self) -> bool {
        self.index >= self.timesteps.len()
    }

    /// The scale of the initial noise (diffusers' `init_noise_sigma`).
    pub fn init_noise_sigma(&self) -> f64 {
        match self.sampler {
            Sampler::Euler => {
                let max = self.sigmas.iter().copied().fold(0.0, f64::max);
                let spacing = self
                    .config
                    .timestep_spacing
                    .unwrap_or(self.sampler.default_spacing());
                if spacing == TimestepSpacing::Leading {
                    (max * max + 1.0).sqrt()
                } else {
                    max
                }
            }
            _ => 1.0,
        }
    }

    /// The initial sample: `n` values of seeded N(0, 1) noise times `init_noise_sigma`.
    pub fn initial_sample(&self, rng: &mut NoiseRng, n: usize) -> Vec<f32> {
        let mut x = rng.normal_vec(n);
        let s = self.init_noise_sigma();
        if s != 1.0 {
            x.iter_mut().for_each(|v| *v = (*v as f64 * s) as f32);
        }
        x
    }

    /// What the model is called with at the current step (diffusers'
    /// `scale_model_input`): x itself, or Euler's x / √(σ² + 1).
    pub fn model_input(&self, x: &[f32]) -> Vec<f32> {
        match self.sampler {
            Sampler::Euler => {
                let sigma = self.sigmas[self.index];
                let d = (sigma * sigma + 1.0).sqrt();
                x.iter().map(|&v| (v as f64 / d) as f32).collect()
            }
            _ => x.to_vec(),
        }
    }

    /// One step: `x` (the samples, `per_sample` values each) moves to the next time step
    /// given the model's prediction `out` (same layout). DDPM draws its noise from `rng`.
    pub fn step(
        &mut self,
        out: &[f32],
        x: &mut [f32],
        per_sample: usize,
        rng: &mut NoiseRng,
    ) -> Result<()> {
        let t = self.timesteps.get(self.index).copied().unwrap_or(0);
        let noise = if self.sampler == Sampler::Ddpm && t > 0 {
            Some(rng.normal_vec(x.len()))
        } else {
            None
        };
        self.step_with_noise(out, x, per_sample, noise.as_deref())
    }

    /// [`SamplerState::step`] with DDPM's noise given (`None`: no noise; DDPM adds none
    /// at t = 0 either way).
    pub fn step_with_noise(
        &mut self,
        out: &[f32],
        x: &mut [f32],
        per_sample: usize,
        noise: Option<&[f32]>,
    ) -> Result<()> {
        if self.done() {
            return Err(bad(format!(
                "the sampler has run all its {} steps",
                self.timesteps.len()
            )));
        }
        if out.len() != x.len() || per_sample == 0 || !x.len().is_multiple_of(per_sample) {
            return Err(bad(format!(
                "a prediction of {} values for a sample of {} values ({per_sample} per sample)",
                out.len(),
                x.len()
            )));
        }
        match self.sampler {
            Sampler::Ddim => self.ddim(out, x, per_sample),
            Sampler::Ddpm => self.ddpm(out, x, per_sample, noise),
            Sampler::Euler => self.euler(out, x),
            Sampler::DpmSolverPP => self.dpm(out, x, per_sample),
        }
        self.index += 1;
        Ok(())
    }

    fn alpha(&self, t: i64) -> f64 {
        self.alphas_cumprod[t as usize]
    }

    /// x̂₀ of every value, clipped or dynamically thresholded as configured.
    fn x0_eps(
        &self,
        out: &[f32],
        x: &[f32],
        a_t: f64,
        per_sample: usize,
        clip: bool,
    ) -> (Vec<f64>, Vec<f64>) {
        let p = self.config.prediction_type;
        let (mut x0, eps): (Vec<f64>, Vec<f64>) = x
            .iter()
            .zip(out)
            .map(|(&xi, &o)| p.x0_eps(xi as f64, o as f64, a_t))
            .unzip();
        if self.config.thresholding {
            threshold(
                &mut x0,
                per_sample,
                self.config.dynamic_thresholding_ratio,
                self.config.sample_max_value,
            );
        } else if clip && self.config.clip_sample {
            let r = self.config.clip_sample_range;
            x0.iter_mut().for_each(|v| *v = v.clamp(-r, r));
        }
        (x0, eps)
    }

    fn ddim(&self, out: &[f32], x: &mut [f32], per_sample: usize) {
        let t = self.timesteps[self.index];
        let prev = t - (self.config.num_train_timesteps / self.timesteps.len()) as i64;
        let a_t = self.alpha(t);
        let a_prev = if prev >= 0 {
            self.alpha(prev)
        } else if self.config.set_alpha_to_one {
            1.0
        } else {
            self.alpha(0)
        };
        // η = 0 and use_clipped_model_output false (the pipelines' defaults): ε̂ is the
        // unclipped one.
        let (x0, eps) = self.x0_eps(out, x, a_t, per_sample, true);
        let (sp, s1p) = (a_prev.sqrt(), (1.0 - a_prev).sqrt());
        for ((xi, x0), e) in x.iter_mut().zip(x0).zip(eps) {
            *xi = (sp * x0 + s1p * e) as f32;
        }
    }

    fn ddpm(&self, out: &[f32], x: &mut [f32], per_sample: usize, noise: Option<&[f32]>) {
        let t = self.timesteps[self.index];
        let a_t = self.alpha(t);
        let a_prev = match self.timesteps.get(self.index + 1) {
            Some(&p) => self.alpha(p),
            None => 1.0,
        };
        let (b_t, b_prev) = (1.0 - a_t, 1.0 - a_prev);
        let alpha = a_t / a_prev;
        let beta = 1.0 - alpha;
        let (x0, _) = self.x0_eps(out, x, a_t, per_sample, true);
        let c0 = a_prev.sqrt() * beta / b_t;
        let ct = alpha.sqrt() * b_prev / b_t;
        let var = match self.config.variance_type {
            Some(VarianceType::FixedLarge) => beta,
            _ => (b_prev / b_t * beta).max(1e-20),
        };
        let sd = var.sqrt();
        // diffusers adds noise at every t > 0 (also at the last step when steps_offset
        // makes it t = 1).
        let noise = noise.filter(|_| t > 0);
        for (k, (xi, x0)) in x.iter_mut().zip(x0).enumerate() {
            let mean = c0 * x0 + ct * *xi as f64;
            let z = noise.map(|n| n[k] as f64).unwrap_or(0.0);
            *xi = (mean + sd * z) as f32;
        }
    }

    fn euler(&self, out: &[f32], x: &mut [f32]) {
        let sigma = self.sigmas[self.index];
        let next = self.sigmas[self.index + 1];
        let p = self.config.prediction_type;
        for (xi, &o) in x.iter_mut().zip(out) {
            let (s, o) = (*xi as f64, o as f64);
            let x0 = match p {
                PredictionType::Epsilon => s - sigma * o,
                PredictionType::VPrediction => {
                    o * (-sigma / (sigma * sigma + 1.0).sqrt()) + s / (sigma * sigma + 1.0)
                }
                PredictionType::Sample => o,
            };
            let derivative = (s - x0) / sigma;
            *xi = (s + derivative * (next - sigma)) as f32;
        }
    }

    fn dpm(&mut self, out: &[f32], x: &mut [f32], per_sample: usize) {
        let i = self.index;
        let n = self.timesteps.len();
        let c = &self.config;
        // α_t, σ_t of the VP process at noise level σ (the σ of the VE form).
        let alpha_sigma = |s: f64| {
            let a = 1.0 / (s * s + 1.0).sqrt();
            (a, s * a)
        };
        let lambda = |s: f64| {
            let (a, sg) = alpha_sigma(s);
            a.ln() - sg.ln()
        };
        // x̂₀ from the model output (convert_model_output, dpmsolver++).
        let (a_s0, s_s0) = alpha_sigma(self.sigmas[i]);
        let p = c.prediction_type;
        let mut x0: Vec<f64> = x
            .iter()
            .zip(out)
            .map(|(&xi, &o)| {
                let (xi, o) = (xi as f64, o as f64);
                match p {
                    PredictionType::Epsilon => (xi - s_s0 * o) / a_s0,
                    PredictionType::VPrediction => a_s0 * xi - s_s0 * o,
                    PredictionType::Sample => o,
                }
            })
            .collect();
        if c.thresholding {
            threshold(
                &mut x0,
                per_sample,
                c.dynamic_thresholding_ratio,
                c.sample_max_value,
            );
        }
        let x0: Vec<f32> = x0.into_iter().map(|v| v as f32).collect();
        self.history.push(x0);
        if self.history.len() > c.solver_order {
            self.history.remove(0);
        }
        let lower_order_final = i == n - 1
            && (c.euler_at_final
                || (c.lower_order_final && n < 15)
                || c.final_sigmas_type == FinalSigmas::Zero);
        let lower_order_second = i + 2 == n && c.lower_order_final && n < 15;
        let order = if c.solver_order == 1 || self.lower_order_nums < 1 || lower_order_final {
            1
        } else if c.solver_order == 2 || self.lower_order_nums < 2 || lower_order_second {
            2
        } else {
            3
        };
        let (a_t, s_t) = alpha_sigma(self.sigmas[i + 1]);
        let lam_t = lambda(self.sigmas[i + 1]);
        let lam_s0 = lambda(self.sigmas[i]);
        let h = lam_t - lam_s0;
        let ratio = s_t / s_s0;
        let em1 = (-h).exp() - 1.0;
        let hist = &self.history;
        let m0 = &hist[hist.len() - 1];
        match order {
            1 => {
                for (k, xi) in x.iter_mut().enumerate() {
                    *xi = (ratio * *xi as f64 - a_t * em1 * m0[k] as f64) as f32;
                }
            }
            2 => {
                let m1 = &hist[hist.len() - 2];
                let lam_s1 = lambda(self.sigmas[i - 1]);
                let r0 = (lam_s0 - lam_s1) / h;
                for (k, xi) in x.iter_mut().enumerate() {
                    let d0 = m0[k] as f64;
                    let d1 = (1.0 / r0) * (m0[k] as f64 - m1[k] as f64);
                    let v = match c.solver_type {
                        SolverType::Midpoint => {
                            ratio * *xi as f64 - a_t * em1 * d0 - 0.5 * (a_t * em1) * d1
                        }
                        SolverType::Heun => {
                            ratio * *xi as f64 - a_t * em1 * d0 + a_t * (em1 / h + 1.0) * d1
                        }
                    };
                    *xi = v as f32;
                }
            }
            _ => {
                let (m1, m2) = (&hist[hist.len() - 2], &hist[hist.len() - 3]);
                let lam_s1 = lambda(self.sigmas[i - 1]);
                let lam_s2 = lambda(self.sigmas[i - 2]);
                let (h0, h1) = (lam_s0 - lam_s1, lam_s1 - lam_s2);
                let (r0, r1) = (h0 / h, h1 / h);
                for (k, xi) in x.iter_mut().enumerate() {
                    let (a0, a1, a2) = (m0[k] as f64, m1[k] as f64, m2[k] as f64);
                    let d1_0 = (1.0 / r0) * (a0 - a1);
                    let d1_1 = (1.0 / r1) * (a1 - a2);
                    let d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1);
                    let d2 = (1.0 / (r0 + r1)) * (d1_0 - d1_1);
                    let v = ratio * *xi as f64 - a_t * em1 * a0 + a_t * (em1 / h + 1.0) * d1
                        - a_t * ((em1 + h) / (h * h) - 0.5) * d2;
                    *xi = v as f32;
                }
            }
        }
        if self.lower_order_nums < c.solver_order {
            self.lower_order_nums += 1;
        }
    }
}

/// Dynamic thresholding (Imagen; diffusers' `_threshold_sample`): per sample, s = the
/// `ratio` quantile of |x̂₀| (linear interpolation, as torch.quantile), clamped to
/// [1, max]; x̂₀ is clamped to [−s, s] and divided by s.
fn threshold(x0: &mut [f64], per_sample: usize, ratio: f64, max: f64) {
    for row in x0.chunks_mut(per_sample) {
        let mut abs: Vec<f64> = row.iter().map(|v| v.abs()).collect();
        abs.sort_by(f64::total_cmp);
        let pos = ratio * (abs.len() - 1) as f64;
        let lo = pos.floor() as usize;
        let hi = (lo + 1).min(abs.len() - 1);
        let q = abs[lo] + (abs[hi] - abs[lo]) * (pos - lo as f64);
        // A NaN in the prediction makes the quantile NaN: the row becomes NaN, as in
        // diffusers (torch's quantile and clamp propagate it); f64::clamp would panic on
        // NaN bounds.
        if q.is_nan() {
            row.iter_mut().for_each(|v| *v = f64::NAN);
            continue;
        }
        let s = q.clamp(1.0, max.max(1.0));
        row.iter_mut().for_each(|v| *v = v.clamp(-s, s) / s);
    }
}

/// Classifier-free guidance as the pipelines combine it: ε̂ = ε_u + G·(ε_c − ε_u), in f32.
pub fn guide(uncond: &[f32], cond: &[f32], scale: f32) -> Vec<f32> {
    uncond
        .iter()
        .zip(cond)
        .map(|(&u, &c)| u + scale * (c - u))
        .collect()
}

/// The seed of calibration trajectory batch `batch` under the calibration seed `seed`
/// (batch 0 of seed s starts from `Denoiser::sample`'s noise for seed `batch_seed(s, 0)`).
pub fn batch_seed(seed: u64, batch: usize) -> u64 {
    seed.wrapping_mul(1_000_003).wrapping_add(batch as u64)
}

/// Runs a whole trajectory: `call(k, t, input)` is the model at step `k` (time step `t`)
/// on the scaled input, returning its prediction for `x` (guidance already combined).
/// `x` starts as the initial sample and ends as the result. The error type is the
/// caller's (the compiler runs its own models through this).
pub fn run<F, E>(
    state: &mut SamplerState,
    x: &mut [f32],
    per_sample: usize,
    rng: &mut NoiseRng,
    mut call: F,
) -> std::result::Result<(), E>
where
    F: FnMut(usize, i64, Vec<f32>) -> std::result::Result<Vec<f32>, E>,
    E: From<Error>,
{
    while !state.done() {
        let k = state.step_index();
        let t = state.timesteps()[k];
        let out = call(k, t, state.model_input(x))?;
        state.step(&out, x, per_sample, rng)?;
    }
    Ok(())
}

/// The union of the time steps `samplers` visit at each of `step_counts` under
/// `config`, ascending. Combinations that cannot run (Euler's fractional linspace
/// steps) are left out and returned as messages.
pub fn covered_timesteps(
    config: &SchedulerConfig,
    samplers: &[Sampler],
    step_counts: &[usize],
) -> (Vec<i64>, Vec<String>) {
    let mut set = std::collections::BTreeSet::new();
    let mut skipped = vec![];
    for &s in samplers {
        for &n in step_counts {
            match timesteps(s, config, n) {
                Ok(ts) => set.extend(ts),
                Err(e) => skipped.push(format!("{s} at {n} steps: {e}")),
            }
        }
    }
    (set.into_iter().collect(), skipped)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sd15() -> SchedulerConfig {
        SchedulerConfig::from_json(
            r#"{"num_train_timesteps":1000,"beta_start":0.00085,"beta_end":0.012,"beta_schedule":"scaled_linear","clip_sample":false,"set_alpha_to_one":false,"steps_offset":1,"prediction_type":"epsilon","timestep_spacing":"leading"}"#,
            "sd",
        )
        .unwrap()
    }

    #[test]
    fn sd15_timesteps_are_those_the_issue_quotes() {
        let c = sd15();
        let ddim = timesteps(Sampler::Ddim, &c, 50).unwrap();
        assert_eq!(&ddim[..3], &[981, 961, 941]);
        assert_eq!(*ddim.last().unwrap(), 1);
        let dpm = timesteps(Sampler::DpmSolverPP, &c, 20).unwrap();
        assert_eq!(&dpm[..2], &[941, 894]);
        let mut trailing = c.clone();
        trailing.timestep_spacing = Some(TimestepSpacing::Trailing);
        assert_eq!(
            timesteps(Sampler::Euler, &trailing, 4).unwrap(),
            [999, 749, 499, 249]
        );
    }

    #[test]
    fn euler_linspace_fractional_steps_are_refused() {
        let c = SchedulerConfig::default();
        let e = timesteps(Sampler::Euler, &c, 20).unwrap_err().to_string();
        assert!(e.contains("fractional") && e.contains("linspace"), "{e}");
        // 999 = 9·111: ten steps land on whole numbers.
        assert_eq!(timesteps(Sampler::Euler, &c, 10).unwrap()[..2], [999, 888]);
        assert!(timesteps(Sampler::Ddim, &c, 0).is_err());
        assert!(timesteps(Sampler::Ddim, &c, 1001).is_err());
    }

    #[test]
    fn ddim_with_true_noise_recovers_the_clean_sample() {
        let c = SchedulerConfig::default();
        let mut s = SamplerState::new(Sampler::Ddim, &c, 1).unwrap();
        let t = s.timesteps()[0];
        let a = c.schedule().alphas_cumprod[t as usize];
        let (x0, eps) = ([0.5f32, -0.25], [1.0f32, -2.0]);
        let mut x: Vec<f32> = x0
            .iter()
            .zip(&eps)
            .map(|(&x, &e)| (a.sqrt() * x as f64 + (1.0 - a).sqrt() * e as f64) as f32)
            .collect();
        s.step(&eps, &mut x, 1, &mut NoiseRng::new(0)).unwrap();
        assert!(
            (x[0] - 0.5).abs() < 1e-4 && (x[1] + 0.25).abs() < 1e-4,
            "{x:?}"
        );
        assert!(s.done());
        assert!(s.step(&eps, &mut x, 1, &mut NoiseRng::new(0)).is_err());
    }

    #[test]
    fn ddim_clips_x0_unless_told_not_to() {
        let mut c = SchedulerConfig::default();
        let run = |c: &SchedulerConfig| {
            let mut s = SamplerState::new(Sampler::Ddim, c, 2).unwrap();
            let mut x = vec![30.0f32];
            s.step(&[0.0], &mut x, 1, &mut NoiseRng::new(0)).unwrap();
            x[0]
        };
        let clipped = run(&c);
        c.clip_sample = false;
        let free = run(&c);
        assert!(clipped.abs() <= 1.01 && free > 10.0, "{clipped} {free}");
    }

    #[test]
    fn dynamic_thresholding_divides_by_the_quantile() {
        let mut v = vec![4.0, -2.0, 0.5, 1.0];
        threshold(&mut v, 4, 1.0, 3.0);
        // s = max |x| = 4 clamped to 3: clamp to ±3, divide by 3.
        assert_eq!(v, vec![1.0, -2.0 / 3.0, 0.5 / 3.0, 1.0 / 3.0]);
        let mut v = vec![0.2, -0.5];
        threshold(&mut v, 2, 0.995, 2.0);
        assert_eq!(v, vec![0.2, -0.5], "s clamps to 1 below");
    }

    #[test]
    fn sampler_names_read_back() {
        for s in Sampler::ALL {
            assert_eq!(s.name().parse::<Sampler>().unwrap(), s);
        }
        assert!("heun".parse::<Sampler>().unwrap_err().contains("dpm++"));
    }

    #[test]
    fn guidance_combines_as_pipelines_do() {
        assert_eq!(guide(&[1.0, 0.0], &[2.0, -1.0], 3.0), vec![4.0, -3.0]);
        assert_eq!(guide(&[1.0], &[2.0], 1.0), vec![2.0]);
    }

    /// Found by fuzzing (fuzz/regressions/scheduler_config): a NaN in a row of the
    /// prediction panicked in `clamp` under `thresholding`.
    #[test]
    fn thresholding_a_nan_prediction_gives_nan_not_a_panic() {
        let mut x0 = vec![0.5, f64::NAN, 2.0, -3.0, 0.25, -0.5];
        threshold(&mut x0, 3, 0.995, 1.5);
        assert!(x0[..3].iter().all(|v| v.is_nan()), "{x0:?}");
        // The other row: its 99.5 % quantile of |x| (2.975) capped at 1.5 divides it.
        assert_eq!(&x0[3..], &[-1.0, 0.25 / 1.5, -0.5 / 1.5]);
    }
}
