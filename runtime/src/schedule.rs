//! Noise schedules (β, ᾱ per training step) and the seeded noise every sampler draws
//! from; the samplers themselves are in [`crate::sampler`].

use crate::rng::{SplitMix64, GOLDEN_GAMMA};

/// β schedule families used by diffusion models.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BetaSchedule {
    Linear,
    /// Stable-Diffusion style: linear in √β.
    ScaledLinear,
    /// Nichol & Dhariwal's cosine schedule.
    Cosine,
}

impl std::str::FromStr for BetaSchedule {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "linear" => Ok(BetaSchedule::Linear),
            "scaled-linear" | "scaled_linear" => Ok(BetaSchedule::ScaledLinear),
            "cosine" | "squaredcos_cap_v2" => Ok(BetaSchedule::Cosine),
            other => Err(format!(
                "unknown beta schedule '{other}' (linear, scaled-linear, cosine)"
            )),
        }
    }
}

impl BetaSchedule {
    /// The name `from_str` reads back (`linear`, `scaled-linear`, `cosine`).
    pub fn name(self) -> &'static str {
        match self {
            BetaSchedule::Linear => "linear",
            BetaSchedule::ScaledLinear => "scaled-linear",
            BetaSchedule::Cosine => "cosine",
        }
    }
}

/// ᾱ_t for every training step t, as diffusers computes them: β in f32 (torch's
/// `linspace` in f32, squared in f32 for `scaled_linear`; the cosine β in f64, then
/// rounded), α = 1 − β in f32, their cumulative product accumulated in f64 and rounded to
/// f32 (torch's CPU `cumprod`). The values are held as f64 but are exactly diffusers'
/// f32 ones, so samplers agree with diffusers to the arithmetic of one step.
#[derive(Clone, Debug)]
pub struct Schedule {
    pub kind: BetaSchedule,
    pub beta_start: f64,
    pub beta_end: f64,
    pub alphas_cumprod: Vec<f64>,
}

/// `torch.linspace(start, end, n, dtype=torch.float32)`: the step in f32, each value
/// from the nearer end in one rounding.
fn torch_linspace_f32(start: f64, end: f64, n: usize) -> Vec<f32> {
    let (s, e) = (start as f32, end as f32);
    if n == 1 {
        return vec![s];
    }
    let step = (e - s) / (n - 1) as f32;
    (0..n)
        .map(|i| {
            if i < n / 2 {
                (s as f64 + step as f64 * i as f64) as f32
            } else {
                (e as f64 - step as f64 * (n - 1 - i) as f64) as f32
            }
        })
        .collect()
}

impl Schedule {
    pub fn new(
        kind: BetaSchedule,
        train_timesteps: usize,
        beta_start: f64,
        beta_end: f64,
    ) -> Schedule {
        let t = train_timesteps;
        let betas: Vec<f32> = match kind {
            BetaSchedule::Linear => torch_linspace_f32(beta_start, beta_end, t),
            BetaSchedule::ScaledLinear => torch_linspace_f32(beta_start.sqrt(), beta_end.sqrt(), t)
                .into_iter()
                .map(|b| b * b)
                .collect(),
            BetaSchedule::Cosine => {
                let f = |i: f64| {
                    ((i / t as f64 + 0.008) / 1.008 * std::f64::consts::FRAC_PI_2)
                        .cos()
                        .powi(2)
                };
                (0..t)
                    .map(|i| (1.0 - f(i as f64 + 1.0) / f(i as f64)).min(0.999) as f32)
                    .collect()
            }
        };
        let mut s = Schedule::from_betas_f32(kind, &betas);
        s.beta_start = beta_start;
        s.beta_end = beta_end;
        s
    }

    /// From explicit betas (diffusers' `trained_betas`, read as f32); `kind` is kept
    /// for reports.
    pub fn from_betas(kind: BetaSchedule, betas: &[f64]) -> Schedule {
        let b32: Vec<f32> = betas.iter().map(|&b| b as f32).collect();
        Schedule::from_betas_f32(kind, &b32)
    }

    fn from_betas_f32(kind: BetaSchedule, betas: &[f32]) -> Schedule {
        let mut acc = 1.0f64;
        let alphas_cumprod = betas
            .iter()
            .map(|&b| {
                acc *= (1.0f32 - b) as f64;
                acc as f32 as f64
            })
            .collect();
        Schedule {
            kind,
            beta_start: betas.first().copied().unwrap_or(0.0) as f64,
            beta_end: betas.last().copied().unwrap_or(0.0) as f64,
            alphas_cumprod,
        }
    }

    pub fn train_timesteps(&self) -> usize {
        self.alphas_cumprod.len()
    }
}

/// Deterministic Gaussian noise: [`SplitMix64`] (seeded with `seed ^ GOLDEN_GAMMA`) and
/// Box–Muller pairs, the second value of each pair kept for the next call. The same seed
/// gives the same numbers on every platform and version, which a dependency would not
/// promise.
pub struct NoiseRng {
    rng: SplitMix64,
    spare: Option<f64>,
}

impl NoiseRng {
    pub fn new(seed: u64) -> NoiseRng {
        NoiseRng {
            rng: SplitMix64::new(seed ^ GOLDEN_GAMMA),
            spare: None,
        }
    }

    pub fn next_u64(&mut self) -> u64 {
        self.rng.next_u64()
    }

    /// Uniform in (0, 1).
    pub fn uniform(&mut self) -> f64 {
        self.rng.uniform_open()
    }

    pub fn normal(&mut self) -> f64 {
        if let Some(s) = self.spare.take() {
            return s;
        }
        let (u, v) = (self.uniform(), self.uniform());
        let r = (-2.0 * u.ln()).sqrt();
        let (s, c) = (2.0 * std::f64::consts::PI * v).sin_cos();
        self.spare = Some(r * s);
        r * c
    }

    pub fn normal_vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.normal() as f32).collect()
    }

    /// Uniform integer in 0..n.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linear_schedule_matches_the_ddpm_paper() {
        let s = Schedule::new(BetaSchedule::Linear, 1000, 1e-4, 2e-2);
        assert!((s.alphas_cumprod[0] - (1.0 - 1e-4)).abs() < 1e-7);
        // ᾱ_999 of the DDPM linear schedule is about 4.04e-5.
        assert!(
            (s.alphas_cumprod[999] - 4.04e-5).abs() < 2e-6,
            "{}",
            s.alphas_cumprod[999]
        );
    }

    #[test]
    fn noise_is_deterministic_and_standard() {
        let a = NoiseRng::new(7).normal_vec(20000);
        assert_eq!(a, NoiseRng::new(7).normal_vec(20000));
        let mean = a.iter().map(|&v| v as f64).sum::<f64>() / a.len() as f64;
        let var = a.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / a.len() as f64;
        assert!(
            mean.abs() < 0.03 && (var - 1.0).abs() < 0.05,
            "{mean} {var}"
        );
    }
}
