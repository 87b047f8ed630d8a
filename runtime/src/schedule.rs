//! Noise schedules and the DDIM update (η = 0), shared by calibration (in the compiler)
//! and sampling (in applications).

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

/// ᾱ_t for every training step t.
#[derive(Clone, Debug)]
pub struct Schedule {
    pub kind: BetaSchedule,
    pub beta_start: f64,
    pub beta_end: f64,
    pub alphas_cumprod: Vec<f64>,
}

impl Schedule {
    pub fn new(
        kind: BetaSchedule,
        train_timesteps: usize,
        beta_start: f64,
        beta_end: f64,
    ) -> Schedule {
        let t = train_timesteps;
        let betas: Vec<f64> = match kind {
            BetaSchedule::Linear => (0..t)
                .map(|i| beta_start + (beta_end - beta_start) * i as f64 / (t.max(2) - 1) as f64)
                .collect(),
            BetaSchedule::ScaledLinear => {
                let (a, b) = (beta_start.sqrt(), beta_end.sqrt());
                (0..t)
                    .map(|i| (a + (b - a) * i as f64 / (t.max(2) - 1) as f64).powi(2))
                    .collect()
            }
            BetaSchedule::Cosine => {
                let f = |i: f64| {
                    ((i / t as f64 + 0.008) / 1.008 * std::f64::consts::FRAC_PI_2)
                        .cos()
                        .powi(2)
                };
                (0..t)
                    .map(|i| (1.0 - f(i as f64 + 1.0) / f(i as f64)).min(0.999))
                    .collect()
            }
        };
        let mut acc = 1.0;
        let alphas_cumprod = betas
            .iter()
            .map(|b| {
                acc *= 1.0 - b;
                acc
            })
            .collect();
        Schedule {
            kind,
            beta_start,
            beta_end,
            alphas_cumprod,
        }
    }

    pub fn train_timesteps(&self) -> usize {
        self.alphas_cumprod.len()
    }

    /// One DDIM step (η = 0) from `t` to `t_prev` (`None`: to the clean sample), given the
    /// predicted noise `eps`. Updates `x` in place.
    pub fn ddim_step(&self, x: &mut [f32], eps: &[f32], t: usize, t_prev: Option<usize>) {
        let a_t = self.alphas_cumprod[t];
        let a_prev = t_prev.map(|p| self.alphas_cumprod[p]).unwrap_or(1.0);
        let (sa, s1a) = (a_t.sqrt(), (1.0 - a_t).sqrt());
        let (sp, s1p) = (a_prev.sqrt(), (1.0 - a_prev).sqrt());
        for (xi, &e) in x.iter_mut().zip(eps) {
            let e = e as f64;
            let x0 = (*xi as f64 - s1a * e) / sa;
            *xi = (sp * x0 + s1p * e) as f32;
        }
    }
}

/// The time steps a sampler with `steps` steps visits in `set` (ascending): taken evenly,
/// from the largest down to the smallest. Calibration and sampling share it, so the
/// compiler calibrates exactly the steps the runtime will run.
pub fn trajectory(set: &[i64], steps: usize) -> Vec<i64> {
    if set.is_empty() {
        return vec![];
    }
    let n = steps.min(set.len()).max(1);
    let mut traj: Vec<i64> = (0..n)
        .map(|k| {
            set[if n == 1 {
                set.len() - 1
            } else {
                k * (set.len() - 1) / (n - 1)
            }]
        })
        .collect();
    traj.dedup();
    traj.reverse();
    traj
}

/// Deterministic Gaussian noise (SplitMix64 + Box–Muller): the same seed gives the same
/// numbers on every platform and version, which a dependency would not promise.
pub struct NoiseRng {
    state: u64,
    spare: Option<f64>,
}

impl NoiseRng {
    pub fn new(seed: u64) -> NoiseRng {
        NoiseRng {
            state: seed ^ 0x9e37_79b9_7f4a_7c15,
            spare: None,
        }
    }

    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in (0, 1).
    pub fn uniform(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
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
        assert!((s.alphas_cumprod[0] - (1.0 - 1e-4)).abs() < 1e-12);
        // ᾱ_999 of the DDPM linear schedule is about 4.04e-5.
        assert!(
            (s.alphas_cumprod[999] - 4.04e-5).abs() < 2e-6,
            "{}",
            s.alphas_cumprod[999]
        );
    }

    #[test]
    fn ddim_step_with_true_noise_recovers_the_clean_sample() {
        let s = Schedule::new(BetaSchedule::Linear, 1000, 1e-4, 2e-2);
        let x0 = [0.5f32, -0.25];
        let eps = [1.0f32, -2.0];
        let a = s.alphas_cumprod[500];
        let mut x: Vec<f32> = x0
            .iter()
            .zip(&eps)
            .map(|(&x, &e)| (a.sqrt() * x as f64 + (1.0 - a).sqrt() * e as f64) as f32)
            .collect();
        s.ddim_step(&mut x, &eps, 500, None);
        assert!(
            (x[0] - 0.5).abs() < 1e-5 && (x[1] + 0.25).abs() < 1e-5,
            "{x:?}"
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
