//! The embedding API: load a (quantized, folded) denoiser, call it, sample with it.
//!
//! ```no_run
//! use tfmqc_runtime::{Denoiser, Sampler};
//! let model = Denoiser::load("model.q.onnx".as_ref())?;
//! let images = model.sample(0, 25, &[], 4, Sampler::DpmSolverPP)?; // [4, C, H, W]
//! # Ok::<(), tfmqc_runtime::Error>(())
//! ```
//!
//! The time step of every call must belong to the model's time-step set S (metadata
//! `tfmqc.timesteps`, written by `fold-tib`; without it, every training step 0..T): a
//! folded model holds tables for those steps only, so any other `t` is refused before
//! anything runs. The samplers visit the time steps diffusers computes for a step count
//! under the model's scheduler configuration (metadata `tfmqc.schedule`, a diffusers
//! scheduler_config.json as tfmqc recorded it; else the `diffusion.*` keys; else
//! diffusers' DDIMScheduler defaults); a step count that visits a `t` outside S is
//! refused before the first call.

use tract_onnx::prelude::{DatumType, Tensor};

use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::meta;
use crate::sampler::{self, Sampler, SamplerState};
use crate::schedule::{NoiseRng, Schedule};
use crate::scheduler::SchedulerConfig;

mod load;

/// One graph input: its name, element type and dims (`None`: symbolic or unknown).
#[derive(Clone, Debug)]
pub struct InputSpec {
    pub name: String,
    pub dtype: Option<DatumType>,
    pub shape: Option<Vec<Option<usize>>>,
}

impl InputSpec {
    fn rank(&self) -> Option<usize> {
        self.shape.as_ref().map(|s| s.len())
    }
}

/// A diffusion denoiser ready to run: ε̂ = model(x_t, t, conditioning).
pub struct Denoiser {
    engine: Engine,
    /// Convolutions running on the int8 kernels.
    int8_ops: usize,
    /// Per engine input, in order: which role it plays.
    inputs: Vec<InputSpec>,
    sample: usize,
    timestep: usize,
    timesteps: Option<Vec<i64>>,
    scheduler: SchedulerConfig,
    schedule: Schedule,
    sample_shape: Option<[usize; 3]>,
}

/// Classifier-free guidance for [`Denoiser::sample_with`]: the unconditional
/// conditioning (same inputs as `cond`) and the scale G; ε̂ = ε_u + G·(ε_c − ε_u).
pub struct Guidance<'a> {
    pub scale: f32,
    pub uncond: &'a [(&'a str, Tensor)],
}

impl std::fmt::Debug for Denoiser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Denoiser(sample '{}', time step '{}', conditioning {:?}, |S| = {}, T = {}, {} int8 ops)",
            self.inputs[self.sample].name,
            self.inputs[self.timestep].name,
            self.conditioning_inputs(),
            self.timestep_count(),
            self.schedule.train_timesteps(),
            self.int8_ops
        )
    }
}

/// Rows `start..end` of `t` (axis 0), the last row repeated up to `len` rows.
fn rows(t: &Tensor, start: usize, end: usize, len: usize) -> Result<Tensor> {
    let err = |e: tract_onnx::prelude::TractError| Error::BadInput(format!("{e:#}"));
    let part = t.slice(0, start, end).map_err(err)?;
    if end - start == len {
        return Ok(part);
    }
    let last = t.slice(0, end - 1, end).map_err(err)?;
    let mut all = vec![part];
    all.extend(std::iter::repeat_n(last, len - (end - start)));
    Tensor::stack_tensors(0, &all).map_err(err)
}

fn to_f32(t: &Tensor, what: &str) -> Result<Vec<f32>> {
    let cast = t
        .cast_to::<f32>()
        .map_err(|e| Error::BadInput(format!("{what}: {e:#}")))?;
    let view = cast
        .to_plain_array_view::<f32>()
        .map_err(|e| Error::BadInput(format!("{what}: {e:#}")))?;
    Ok(view.iter().copied().collect())
}

impl Denoiser {
    /// How many nodes run on the int8 kernels (convolutions, Gemms / MatMuls with int8
    /// weights, products of two quantized activations).
    pub fn int8_ops(&self) -> usize {
        self.int8_ops
    }

    /// The time-step set S, ascending; `None`: every training step 0..T.
    pub fn timesteps(&self) -> Option<&[i64]> {
        self.timesteps.as_deref()
    }

    /// |S|.
    pub fn timestep_count(&self) -> usize {
        self.timesteps
            .as_ref()
            .map(|s| s.len())
            .unwrap_or(self.schedule.train_timesteps())
    }

    /// Whether the model accepts the time step `t`.
    pub fn accepts(&self, t: i64) -> bool {
        match &self.timesteps {
            Some(s) => s.binary_search(&t).is_ok(),
            None => t >= 0 && t < self.schedule.train_timesteps() as i64,
        }
    }

    /// The noise schedule (β, ᾱ) of [`Denoiser::scheduler`].
    pub fn schedule(&self) -> &Schedule {
        &self.schedule
    }

    /// The scheduler configuration the samplers run with (see the module notes).
    pub fn scheduler(&self) -> &SchedulerConfig {
        &self.scheduler
    }

    /// Runs with another scheduler configuration (e.g. a diffusers
    /// scheduler_config.json given by the application).
    pub fn set_scheduler(&mut self, config: SchedulerConfig) -> Result<()> {
        if config.num_train_timesteps != self.scheduler.num_train_timesteps {
            if let Some(s) = &self.timesteps {
                if s[s.len() - 1] >= config.num_train_timesteps as i64 {
                    return Err(Error::BadInput(format!(
                        "the scheduler has {} training steps; the model's time-step set goes to {}",
                        config.num_train_timesteps,
                        s[s.len() - 1]
                    )));
                }
            }
        }
        self.schedule = config.schedule();
        self.scheduler = config;
        Ok(())
    }

    /// (C, H, W) of one sample, when the model or its metadata tells.
    pub fn sample_shape(&self) -> Option<[usize; 3]> {
        self.sample_shape
    }

    pub fn sample_input(&self) -> &InputSpec {
        &self.inputs[self.sample]
    }

    pub fn timestep_input(&self) -> &InputSpec {
        &self.inputs[self.timestep]
    }

    /// Every input, in the model's order.
    pub fn inputs(&self) -> &[InputSpec] {
        &self.inputs
    }

    /// The names of the other inputs, which `cond` must give.
    pub fn conditioning_inputs(&self) -> Vec<&str> {
        (0..self.inputs.len())
            .filter(|&k| k != self.sample && k != self.timestep)
            .map(|k| self.inputs[k].name.as_str())
            .collect()
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    fn check_timestep(&self, t: i64) -> Result<()> {
        if self.accepts(t) {
            return Ok(());
        }
        Err(Error::BadInput(match &self.timesteps {
            Some(s) => {
                let regular = s.len() > 2 && s.windows(2).all(|w| w[1] - w[0] == s[1] - s[0]);
                format!(
                    "time step {t} is not in the model's time-step set S ({} steps, {}..{}{}): the model was compiled for those steps only",
                    s.len(),
                    s[0],
                    s[s.len() - 1],
                    if regular { format!(" every {}", s[1] - s[0]) } else { String::new() }
                )
            }
            None => format!(
                "time step {t} is outside the model's {} training steps 0..{}",
                self.schedule.train_timesteps(),
                self.schedule.train_timesteps() - 1
            ),
        }))
    }

    /// The model's batch size when its sample input fixes one.
    fn fixed_batch(&self) -> Option<usize> {
        self.inputs[self.sample]
            .shape
            .as_ref()
            .and_then(|s| s.first().copied().flatten())
    }

    fn timestep_tensor(&self, t: i64, batch: usize) -> Result<Tensor> {
        let spec = &self.inputs[self.timestep];
        let shape: Vec<usize> = match spec.shape.as_deref() {
            Some([]) => vec![],
            Some([Some(1)]) => vec![1],
            Some([_]) | None => vec![batch],
            Some(other) => {
                return Err(Error::InvalidModel(format!(
                    "the time-step input '{}' has rank {}: expected a scalar or [batch]",
                    spec.name,
                    other.len()
                )))
            }
        };
        let n = shape.iter().product::<usize>();
        let tensor = Tensor::from_shape(&shape, &vec![t; n])
            .map_err(|e| Error::BadInput(format!("{e:#}")))?;
        let dt = spec.dtype.unwrap_or(DatumType::I64);
        Ok(tensor
            .cast_to_dt(dt)
            .map_err(|e| Error::BadInput(format!("time step as {dt:?}: {e:#}")))?
            .into_owned())
    }

    /// The noise prediction ε̂(x, t, cond) for a batch `x` of shape [B, C, H, W].
    ///
    /// `t` must be in S (checked before anything runs). `cond` gives every other input by
    /// name; a conditioning tensor with B rows is split with `x` when the model's batch
    /// is fixed to another size. Learned-variance outputs (2·C channels) are cut to ε̂.
    pub fn denoise(&self, x: &Tensor, t: i64, cond: &[(&str, Tensor)]) -> Result<Tensor> {
        self.check_timestep(t)?;
        let names = self.conditioning_inputs();
        for (name, _) in cond {
            if !names.contains(name) {
                return Err(Error::BadInput(format!(
                    "'{name}' is not a conditioning input of the model (those are {names:?})"
                )));
            }
        }
        for name in &names {
            if !cond.iter().any(|(n, _)| n == name) {
                return Err(Error::BadInput(format!(
                    "conditioning input '{name}' was not given"
                )));
            }
        }
        let spec = &self.inputs[self.sample];
        let shape = x.shape().to_vec();
        if shape.len() != 4 {
            return Err(Error::BadInput(format!(
                "the sample must be [batch, C, H, W], got {shape:?}"
            )));
        }
        if let Some(dims) = &spec.shape {
            for (k, (&given, want)) in shape.iter().zip(dims).enumerate().skip(1) {
                if want.is_some_and(|w| w != given) {
                    return Err(Error::BadInput(format!(
                        "sample dim {k} is {given}, the model's input '{}' wants {}",
                        spec.name,
                        want.unwrap()
                    )));
                }
            }
        }
        let batch = shape[0];
        if batch == 0 {
            return Err(Error::BadInput("the sample batch is empty".into()));
        }
        let chunk = self.fixed_batch().unwrap_or(batch);
        let channels = shape[1];
        let per_sample: usize = shape[1..].iter().product();
        let mut eps: Vec<f32> = Vec::with_capacity(batch * per_sample);
        let mut start = 0;
        while start < batch {
            let end = (start + chunk).min(batch);
            let args = self.call_args(x, t, cond, start, end)?;
            let out = self.engine.run(args)?;
            let first = out
                .first()
                .ok_or_else(|| Error::InvalidModel("the model has no output".into()))?;
            let oshape = first.shape();
            let out_per_sample = oshape.iter().skip(1).product::<usize>();
            let learned_variance =
                oshape.len() == 4 && oshape[1] == 2 * channels && oshape[2..] == shape[2..];
            if oshape.first() != Some(&chunk) || !(out_per_sample == per_sample || learned_variance)
            {
                return Err(Error::InvalidModel(format!(
                    "output '{}' has shape {oshape:?}: not a noise prediction for a sample of {:?}",
                    self.engine.output_names()[0],
                    &shape[1..]
                )));
            }
            let values = to_f32(first, "the model's output")?;
            for r in 0..end - start {
                let row = &values[r * out_per_sample..(r + 1) * out_per_sample];
                // Learned variance: ε̂ is the first C channels.
                eps.extend_from_slice(&row[..per_sample]);
            }
            start = end;
        }
        Tensor::from_shape(&shape, &eps).map_err(|e| Error::BadInput(format!("{e:#}")))
    }

    /// The engine's inputs for rows `start..end` of the sample `x` (one call of a model
    /// whose batch may be fixed: the rows are padded to it), in engine order.
    fn call_args(
        &self,
        x: &Tensor,
        t: i64,
        cond: &[(&str, Tensor)],
        start: usize,
        end: usize,
    ) -> Result<Vec<Tensor>> {
        let batch = x.shape()[0];
        let chunk = self.fixed_batch().unwrap_or(batch);
        let dt = self.inputs[self.sample].dtype.unwrap_or(DatumType::F32);
        let mut args: Vec<Tensor> = Vec::with_capacity(self.inputs.len());
        for (k, input) in self.inputs.iter().enumerate() {
            let value = if k == self.sample {
                let part = if chunk == batch {
                    x.clone()
                } else {
                    rows(x, start, end, chunk)?
                };
                part.cast_to_dt(dt)
                    .map_err(|e| Error::BadInput(format!("sample as {dt:?}: {e:#}")))?
                    .into_owned()
            } else if k == self.timestep {
                self.timestep_tensor(t, chunk)?
            } else {
                let given = &cond
                    .iter()
                    .find(|(n, _)| *n == input.name)
                    .ok_or_else(|| {
                        Error::BadInput(format!(
                            "conditioning input '{}' was not given",
                            input.name
                        ))
                    })?
                    .1;
                if chunk != batch && given.rank() > 0 && given.shape()[0] == batch {
                    rows(given, start, end, chunk)?
                } else {
                    given.clone()
                }
            };
            args.push(value);
        }
        Ok(args)
    }

    /// Times every node of one model call on the first rows of `x` (as [`Denoiser::denoise`]
    /// would run them): where a step spends its time ([`Engine::profile`]).
    pub fn profile_step(
        &self,
        x: &Tensor,
        t: i64,
        cond: &[(&str, Tensor)],
    ) -> Result<Vec<crate::NodeTime>> {
        self.check_timestep(t)?;
        let batch = *x
            .shape()
            .first()
            .ok_or_else(|| Error::BadInput("the sample must be [batch, C, H, W]".into()))?;
        let end = self.fixed_batch().unwrap_or(batch).min(batch);
        let args = self.call_args(x, t, cond, 0, end)?;
        self.engine.profile(args)
    }

    /// The time steps `sampler` visits in `steps` steps (diffusers' `set_timesteps`
    /// under [`Denoiser::scheduler`]), first to last; an error when one is outside S.
    pub fn trajectory(&self, sampler: Sampler, steps: usize) -> Result<Vec<i64>> {
        let ts = sampler::timesteps(sampler, &self.scheduler, steps)?;
        if let Some(&t) = ts.iter().find(|&&t| !self.accepts(t)) {
            let fits: Vec<String> = (1..=self.schedule.train_timesteps().min(1000))
                .filter(|&n| {
                    sampler::timesteps(sampler, &self.scheduler, n)
                        .is_ok_and(|v| v.iter().all(|&t| self.accepts(t)))
                })
                .take(12)
                .map(|n| n.to_string())
                .collect();
            let e = self.check_timestep(t).unwrap_err();
            return Err(Error::BadInput(format!(
                "{sampler} at {steps} steps visits t = {t}: {e}; step counts whose time steps {sampler} can run here: {}",
                if fits.is_empty() { "none".to_string() } else { fits.join(", ") }
            )));
        }
        Ok(ts)
    }

    /// Generates `batch` samples: seeded N(0, 1) noise, then `steps` steps of `sampler`
    /// (see [`Denoiser::trajectory`]) under the model's scheduler configuration.
    pub fn sample(
        &self,
        seed: u64,
        steps: usize,
        cond: &[(&str, Tensor)],
        batch: usize,
        sampler: Sampler,
    ) -> Result<Tensor> {
        self.sample_with(seed, steps, cond, batch, sampler, None, &mut |_, _| {})
    }

    /// [`Denoiser::sample`] with classifier-free guidance (the model runs the
    /// unconditional and the conditional halves in one batch of 2·`batch`, as diffusers'
    /// pipelines do: unconditional rows first), and `on_call(t, input)` seeing every model
    /// input sample as the model receives it. Conditioning tensors have `batch` rows, or
    /// fewer (cycled).
    #[allow(clippy::too_many_arguments)]
    pub fn sample_with(
        &self,
        seed: u64,
        steps: usize,
        cond: &[(&str, Tensor)],
        batch: usize,
        sampler: Sampler,
        guidance: Option<Guidance>,
        on_call: &mut dyn FnMut(i64, &Tensor),
    ) -> Result<Tensor> {
        if steps == 0 || batch == 0 {
            return Err(Error::BadInput(format!(
                "steps ({steps}) and batch ({batch}) must be at least 1"
            )));
        }
        let [c, h, w] = self.sample_shape.ok_or_else(|| {
            Error::InvalidModel(format!(
                "the sample input '{}' has no fixed [C, H, W] and the metadata has no {}",
                self.inputs[self.sample].name,
                meta::SAMPLE_SHAPE
            ))
        })?;
        self.trajectory(sampler, steps)?;
        let mut state = SamplerState::new(sampler, &self.scheduler, steps)?;
        let shape = [batch, c, h, w];
        // C × H × W was bounded at load; the batch is the caller's.
        let per_sample = c * h * w;
        if per_sample
            .checked_mul(batch)
            .is_none_or(|n| n as u64 > crate::limits::MAX_CONSTANT_ELEMENTS)
        {
            return Err(Error::BadInput(format!(
                "a batch of {batch} samples of {per_sample} values is more than the {} values a call may have",
                crate::limits::MAX_CONSTANT_ELEMENTS
            )));
        }
        // The model's inputs: `batch` rows, or the guidance pair [uncond; cond].
        let err = |e: tract_onnx::prelude::TractError| Error::BadInput(format!("{e:#}"));
        let call_cond: Vec<(&str, Tensor)> = match &guidance {
            None => cond
                .iter()
                .map(|(n, t)| Ok((*n, cycle_rows(t, batch)?)))
                .collect::<Result<_>>()?,
            Some(g) => {
                let mut v = vec![];
                for (name, t) in cond {
                    let u = g.uncond.iter().find(|(n, _)| n == name).ok_or_else(|| {
                        Error::BadInput(format!("guidance needs the unconditional '{name}' too"))
                    })?;
                    let both = [cycle_rows(&u.1, batch)?, cycle_rows(t, batch)?];
                    v.push((*name, Tensor::stack_tensors(0, &both).map_err(err)?));
                }
                v
            }
        };
        let mut rng = NoiseRng::new(seed);
        let mut x = state.initial_sample(&mut rng, batch * per_sample);
        let scale = guidance.as_ref().map(|g| g.scale);
        sampler::run(&mut state, &mut x, per_sample, &mut rng, |_, t, input| {
            let input = match scale {
                None => input,
                Some(_) => [input.as_slice(), input.as_slice()].concat(),
            };
            let rows = input.len() / per_sample;
            let xt = Tensor::from_shape(&[rows, c, h, w], &input).map_err(err)?;
            on_call(t, &xt);
            let out = to_f32(&self.denoise(&xt, t, &call_cond)?, "the prediction")?;
            Ok(match scale {
                None => out,
                Some(g) => {
                    let (u, c) = out.split_at(out.len() / 2);
                    sampler::guide(u, c, g)
                }
            })
        })?;
        Tensor::from_shape(&shape, &x).map_err(err)
    }
}

/// `n` rows of `t` (axis 0), cycling its rows; a scalar or a tensor of `n` rows as is.
fn cycle_rows(t: &Tensor, n: usize) -> Result<Tensor> {
    let err = |e: tract_onnx::prelude::TractError| Error::BadInput(format!("{e:#}"));
    let have = match t.shape().first() {
        None => return Ok(t.clone()),
        Some(&r) => r,
    };
    if have == n {
        return Ok(t.clone());
    }
    if have == 0 {
        return Err(Error::BadInput("a conditioning tensor has no rows".into()));
    }
    let parts: Vec<Tensor> = (0..n)
        .map(|i| t.slice(0, i % have, i % have + 1))
        .collect::<std::result::Result<_, _>>()
        .map_err(err)?;
    Tensor::stack_tensors(0, &parts).map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    use tract_onnx::pb;

    use crate::engine::read_proto;
    use std::sync::OnceLock;

    fn digits_path() -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/ddpm_digits.onnx")
    }

    /// The trained digits model, loaded once for all the tests.
    fn digits() -> &'static Denoiser {
        static D: OnceLock<Denoiser> = OnceLock::new();
        D.get_or_init(|| Denoiser::load(&digits_path()).expect("loads"))
    }

    #[test]
    fn finds_the_roles_and_the_schedule() {
        let d = digits();
        assert_eq!(d.sample_input().name, "sample");
        assert_eq!(d.timestep_input().name, "timestep");
        assert!(d.conditioning_inputs().is_empty());
        assert_eq!(d.sample_shape(), Some([1, 16, 16]));
        assert_eq!(d.schedule().train_timesteps(), 1000);
        assert_eq!(d.timesteps(), None);
        // DDIM's leading spacing at 10 steps: 900, 800, ..., 0.
        let traj = d.trajectory(Sampler::Ddim, 10).unwrap();
        assert_eq!((traj[0], traj[9]), (900, 0));
        assert_eq!(
            d.scheduler().prediction_type,
            crate::PredictionType::Epsilon
        );
        assert!(d.scheduler().clip_sample);
    }

    #[test]
    fn a_time_step_outside_s_is_refused_before_running() {
        let mut proto = read_proto(&digits_path()).unwrap();
        let set: Vec<String> = (0..50).map(|k| (k * 20).to_string()).collect();
        proto.metadata_props.push(pb::StringStringEntryProto {
            key: meta::TIMESTEPS.into(),
            value: set.join(","),
        });
        let d = Denoiser::from_proto(&proto, None, "").unwrap();
        assert_eq!(d.trajectory(Sampler::Ddim, 25).unwrap().len(), 25);
        // DDIM at 7 steps visits 852, ...: refused before any call, with the counts that fit.
        let e = d.trajectory(Sampler::Ddim, 7).unwrap_err().to_string();
        assert!(
            e.contains("ddim at 7 steps visits t = 852")
                && e.contains("1, 2, 5, 10, 25, 48, 49, 50"),
            "{e}"
        );
        let e = d.sample(0, 7, &[], 1, Sampler::Ddim).unwrap_err();
        assert!(matches!(e, Error::BadInput(_)), "{e:?}");
        let x = Tensor::zero::<f32>(&[1, 1, 16, 16]).unwrap();
        assert!(d.denoise(&x, 20, &[]).is_ok());
        let err = d.denoise(&x, 7, &[]).unwrap_err();
        assert!(matches!(err, Error::BadInput(_)), "{err:?}");
        let msg = err.to_string();
        assert!(
            msg.contains("time step 7") && msg.contains("50 steps") && msg.contains("0..980"),
            "{msg}"
        );
        // Before running: a sample of the wrong shape gives the same time-step error.
        let bad = Tensor::zero::<f32>(&[3]).unwrap();
        assert!(d
            .denoise(&bad, 7, &[])
            .unwrap_err()
            .to_string()
            .contains("time step 7"));
        // Without a set: 0..T.
        let e = digits().denoise(&bad, 1000, &[]).unwrap_err().to_string();
        assert!(e.contains("time step 1000") && e.contains("0..999"), "{e}");
        assert!(digits().denoise(&bad, -1, &[]).is_err());
    }

    #[test]
    fn ddim_samples_are_finite_bounded_and_seeded() {
        let d = digits();
        let a = d.sample(0, 10, &[], 2, Sampler::Ddim).unwrap();
        assert_eq!(a.shape(), &[2, 1, 16, 16]);
        let v = to_f32(&a, "a").unwrap();
        assert!(v.iter().all(|x| x.is_finite() && x.abs() <= 1.5), "{v:?}");
        let b = d.sample(0, 10, &[], 2, Sampler::Ddim).unwrap();
        assert_eq!(v, to_f32(&b, "b").unwrap());
        let c = d.sample(1, 10, &[], 2, Sampler::Ddim).unwrap();
        assert_ne!(v, to_f32(&c, "c").unwrap());
    }

    #[test]
    fn ddpm_samples_are_finite_and_seeded() {
        let d = digits();
        let a = to_f32(&d.sample(3, 10, &[], 2, Sampler::Ddpm).unwrap(), "a").unwrap();
        assert!(a.iter().all(|x| x.is_finite() && x.abs() <= 1.5), "{a:?}");
        let b = to_f32(&d.sample(3, 10, &[], 2, Sampler::Ddpm).unwrap(), "b").unwrap();
        assert_eq!(a, b);
    }

    fn model(name: &str) -> Denoiser {
        let p = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("../models/{name}.onnx"));
        Denoiser::load(&p).unwrap()
    }

    #[test]
    fn learned_variance_is_cut_and_conditioning_passed() {
        // guided-diffusion style: f32 time steps, a class label, 2·C output channels.
        let d = model("guided_unet");
        assert_eq!(d.timestep_input().name, "timesteps");
        assert_eq!(d.conditioning_inputs(), ["y"]);
        let x = Tensor::zero::<f32>(&[3, 3, 16, 16]).unwrap();
        let y = Tensor::from_shape(&[3], &[0i64, 1, 2]).unwrap();
        assert!(d.denoise(&x, 10, &[]).is_err(), "y is required");
        let eps = d.denoise(&x, 10, &[("y", y.clone())]).unwrap();
        assert_eq!(eps.shape(), &[3, 3, 16, 16]);
        let s = d.sample(0, 3, &[("y", y)], 3, Sampler::Ddpm).unwrap();
        assert!(to_f32(&s, "s").unwrap().iter().all(|v| v.is_finite()));
    }

    #[test]
    fn a_fixed_batch_model_runs_in_chunks() {
        // Batch fixed to 2, a scalar f32 time step, text conditioning split with x.
        let d = model("unet2d_cond");
        let x = NoiseRng::new(1).normal_vec(3 * 4 * 16 * 16);
        let x = Tensor::from_shape(&[3, 4, 16, 16], &x).unwrap();
        let c = NoiseRng::new(2).normal_vec(3 * 8 * 32);
        let c = Tensor::from_shape(&[3, 8, 32], &c).unwrap();
        let all = to_f32(
            &d.denoise(&x, 500, &[("encoder_hidden_states", c.clone())])
                .unwrap(),
            "all",
        )
        .unwrap();
        assert_eq!(all.len(), 3 * 4 * 16 * 16);
        // The first two rows alone give the same prediction.
        let x2 = x.slice(0, 0, 2).unwrap();
        let c2 = c.slice(0, 0, 2).unwrap();
        let two = to_f32(
            &d.denoise(&x2, 500, &[("encoder_hidden_states", c2)])
                .unwrap(),
            "two",
        )
        .unwrap();
        assert_eq!(&all[..two.len()], &two[..]);
    }

    #[test]
    fn the_scheduler_is_read_from_metadata_in_both_forms() {
        let old = r#"{"beta_end":0.012,"beta_schedule":"scaled-linear","beta_start":0.00085,"train_timesteps":1000}"#;
        let m = |k: &str| (k == meta::SCHEDULE).then(|| old.to_string());
        let s = SchedulerConfig::from_metadata(&m, "").unwrap();
        assert_eq!(s.beta_schedule, crate::BetaSchedule::ScaledLinear);
        assert_eq!(s.beta_end, 0.012);
        let new = r#"{"num_train_timesteps":1000,"beta_schedule":"scaled_linear","beta_start":0.00085,"beta_end":0.012,"prediction_type":"v_prediction","clip_sample":false,"steps_offset":1}"#;
        let m = |k: &str| (k == meta::SCHEDULE).then(|| new.to_string());
        let s = SchedulerConfig::from_metadata(&m, "").unwrap();
        assert_eq!(s.prediction_type, crate::PredictionType::VPrediction);
        assert_eq!((s.clip_sample, s.steps_offset), (false, 1));
        let none = |_: &str| None;
        assert_eq!(
            SchedulerConfig::from_metadata(&none, "").unwrap(),
            SchedulerConfig::default()
        );
        let keys = |k: &str| match k {
            meta::BETA_SCHEDULE => Some("cosine".to_string()),
            meta::PREDICTION_TYPE => Some("sample".to_string()),
            _ => None,
        };
        let s = SchedulerConfig::from_metadata(&keys, "").unwrap();
        assert_eq!(s.beta_schedule, crate::BetaSchedule::Cosine);
        assert_eq!(s.prediction_type, crate::PredictionType::Sample);
        let bad = |k: &str| (k == meta::PREDICTION_TYPE).then(|| "flow".to_string());
        let e = SchedulerConfig::from_metadata(&bad, "m.onnx")
            .unwrap_err()
            .to_string();
        assert!(e.contains("m.onnx") && e.contains("prediction_type"), "{e}");
    }

    #[test]
    fn guidance_runs_the_pair_and_scale_one_is_the_conditional_model() {
        let d = model("unet2d_cond_dynbatch");
        let c = Tensor::from_shape(&[1, 8, 32], &NoiseRng::new(4).normal_vec(8 * 32)).unwrap();
        let u = Tensor::zero::<f32>(&[1, 8, 32]).unwrap();
        let cond = [("encoder_hidden_states", c)];
        let uncond = [("encoder_hidden_states", u)];
        let plain = d.sample(5, 3, &cond, 2, Sampler::Ddim).unwrap();
        let mut calls = vec![];
        let one = d
            .sample_with(
                5,
                3,
                &cond,
                2,
                Sampler::Ddim,
                Some(Guidance {
                    scale: 1.0,
                    uncond: &uncond,
                }),
                &mut |t, x| calls.push((t, x.shape().to_vec())),
            )
            .unwrap();
        assert_eq!(calls.len(), 3);
        assert_eq!(calls[0], (666, vec![4, 4, 16, 16]));
        let (a, b) = (to_f32(&plain, "a").unwrap(), to_f32(&one, "b").unwrap());
        let worst = a
            .iter()
            .zip(&b)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        assert!(worst < 1e-4, "{worst}");
        let three = d
            .sample_with(
                5,
                3,
                &cond,
                2,
                Sampler::Ddim,
                Some(Guidance {
                    scale: 3.0,
                    uncond: &uncond,
                }),
                &mut |_, _| {},
            )
            .unwrap();
        assert_ne!(to_f32(&three, "c").unwrap(), a);
    }
}
