//! AdaRound: learned up/down rounding by Adam on a soft rounding variable, annealed to
//! hard decisions.

use super::*;

/// How AdaRound evaluates the reconstruction gradient `∂L/∂Ŵ`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AdaRoundGrad {
    /// The exact gradient, by the cheaper route: `Gram` when `2·S > K`, else all S
    /// columns of X each step (`2/S · (ΔW X) Xᵀ`).
    Auto,
    /// Exact full-data gradient from the Gram matrix: `2/S · ΔW H`, cost N·K² a step.
    Gram,
    /// Mini-batch of `batch` columns of X sampled each step (without replacement within a
    /// step): `2/B · (ΔW X_b) X_bᵀ`, cost 2·N·K·B a step.
    MiniBatch,
}

/// AdaRound settings; [`Default`] is the reference's (20k steps, lr 1e-3, λ 0.01, β 20 → 2,
/// 20% warm-up) with the exact gradient.
#[derive(Clone, Debug)]
pub struct AdaRoundOpts {
    /// Adam steps (reference: 20 000).
    pub iters: usize,
    /// Adam learning rate (reference: 1e-3).
    pub lr: f32,
    /// Regulariser weight λ (reference: 0.01), relative to the reconstruction loss
    /// `(1/S)·||ΔW X||²_F` (squared error summed over outputs, averaged over columns).
    /// The reference (BRECQ) sums over all outputs of one image (C·H·W) and averages over
    /// images, i.e. its loss is P times ours for P im2col columns per image; keeping
    /// λ = 0.01 on our scale (a relatively stronger regulariser) measured better than
    /// λ/P on a conv-like layer (4 bits, 2000 steps: 0.18× vs 0.61× RTN's error).
    pub lambda: f32,
    /// β annealed linearly from `.0` to `.1` (reference: 20 → 2) after the warm-up.
    pub beta: (f32, f32),
    /// Fraction of the iterations without regulariser (reference: 0.2).
    pub warmup: f32,
    pub grad: AdaRoundGrad,
    /// Columns per mini-batch (`MiniBatch` only).
    pub batch: usize,
    /// Seed of the mini-batch sampler.
    pub seed: u64,
}

impl Default for AdaRoundOpts {
    fn default() -> Self {
        AdaRoundOpts {
            iters: 20_000,
            lr: 1e-3,
            lambda: 0.01,
            beta: (20.0, 2.0),
            warmup: 0.2,
            grad: AdaRoundGrad::Auto,
            batch: 256,
            seed: 0x5eed,
        }
    }
}

/// Layer-wise AdaRound of `w` [N, K] with inputs `x` [K, S] (row-major) and per-row
/// `scales`: `Ŵ = s·clamp(⌊W/s⌋ + h(V), −qmax, qmax)`, `h(V) = clamp(1.2σ(V) − 0.1, 0, 1)`,
/// loss `(1/S)||ΔW X||²_F + λ Σ (1 − |2h − 1|^β)`, the regulariser off during the
/// `warmup` fraction and β annealed linearly `beta.0 → beta.1` after it; Adam with
/// learning rate `lr`; `V` starts where `h(V)` is the fractional part of `W/s`. The
/// result rounds up where `h ≥ ½`. Gradient choice and batch as in
/// [`AdaRoundOpts::default`].
#[allow(clippy::too_many_arguments)]
pub fn adaround(
    w: &[f32],
    n: usize,
    k: usize,
    x: &[f32],
    s: usize,
    scales: &[f32],
    qmax: i32,
    iters: usize,
    lr: f32,
    lambda: f32,
    beta: (f32, f32),
    warmup: f32,
) -> Vec<i8> {
    let opts = AdaRoundOpts {
        iters,
        lr,
        lambda,
        beta,
        warmup,
        ..AdaRoundOpts::default()
    };
    adaround_with(w, n, k, x, s, None, scales, qmax, &opts)
}

/// [`adaround`] with all settings; `gram` (`X Xᵀ`, K×K) may be passed to save
/// recomputing it when the Gram gradient is chosen.
#[allow(clippy::too_many_arguments)]
pub fn adaround_with(
    w: &[f32],
    n: usize,
    k: usize,
    x: &[f32],
    s: usize,
    gram: Option<&[f64]>,
    scales: &[f32],
    qmax: i32,
    opts: &AdaRoundOpts,
) -> Vec<i8> {
    check_qmax(qmax);
    assert_eq!(w.len(), n * k);
    assert_eq!(x.len(), k * s);
    assert_eq!(scales.len(), n);
    if n == 0 || k == 0 || s == 0 {
        return rtn(w, n, k, scales, qmax);
    }
    let objective = Objective::new(x, k, s, gram, opts);
    let mut ada = AdaState::new(w, n, k, scales, qmax);
    ada.run(&objective, opts);
    ada.hard_round()
}

/// AdaRound from the Gram matrix alone (exact full-data gradient): for when only
/// `H = X Xᵀ` over `s` columns is at hand (e.g. TIAR's time-embedding inputs).
#[allow(clippy::too_many_arguments)]
pub fn adaround_gram(
    w: &[f32],
    n: usize,
    k: usize,
    gram: &[f64],
    s: usize,
    scales: &[f32],
    qmax: i32,
    opts: &AdaRoundOpts,
) -> Vec<i8> {
    check_qmax(qmax);
    assert_eq!(w.len(), n * k);
    assert_eq!(gram.len(), k * k);
    if n == 0 || k == 0 || s == 0 {
        return rtn(w, n, k, scales, qmax);
    }
    let objective = Objective::from_gram(gram, s);
    let mut ada = AdaState::new(w, n, k, scales, qmax);
    ada.run(&objective, opts);
    ada.hard_round()
}

/// Source of `∂L_rec/∂Ŵ`.
pub(super) enum Objective {
    /// `hs = H / S` in f32.
    Gram { hs: Vec<f32> },
    /// `x` [K, S] and `xt` = Xᵀ [S, K]; `batch` columns drawn per step (all of them when
    /// `batch ≥ S`).
    Batch {
        x: Vec<f32>,
        xt: Vec<f32>,
        s: usize,
        batch: usize,
    },
}

impl Objective {
    pub(super) fn new(
        x: &[f32],
        k: usize,
        s: usize,
        gram_in: Option<&[f64]>,
        opts: &AdaRoundOpts,
    ) -> Self {
        let batch = opts.batch.max(1);
        let use_gram = match opts.grad {
            AdaRoundGrad::Gram => true,
            AdaRoundGrad::MiniBatch => false,
            // Always exact: the Gram gradient costs N·K² a step, all S columns 2·N·K·S;
            // mini-batches (2·N·K·B) are cheaper but noisier (measured: clearly worse
            // results for the same number of steps), so only on request.
            AdaRoundGrad::Auto => 2 * s > k,
        };
        if use_gram {
            match gram_in {
                Some(g) => Objective::from_gram(g, s),
                None => Objective::from_gram(&gram(x, k, s), s),
            }
        } else {
            let mut xt = vec![0f32; s * k];
            for (i, row) in x.chunks(s).enumerate() {
                for (j, &v) in row.iter().enumerate() {
                    xt[j * k + i] = v;
                }
            }
            Objective::Batch {
                x: x.to_vec(),
                xt,
                s,
                batch: if opts.grad == AdaRoundGrad::Auto {
                    s
                } else {
                    batch.min(s)
                },
            }
        }
    }

    pub(super) fn from_gram(g: &[f64], s: usize) -> Self {
        let inv = 1.0 / s.max(1) as f64;
        Objective::Gram {
            hs: g.iter().map(|&v| (v * inv) as f32).collect(),
        }
    }
}

/// Per-weight AdaRound state.
#[derive(Clone, Copy, Default)]
pub(super) struct Elem {
    /// The rounding variable V.
    pub(super) v: f32,
    /// Adam moments.
    pub(super) m1: f32,
    pub(super) m2: f32,
    /// ⌊W/s⌋.
    pub(super) base: f32,
    /// h(V) and dh/dV of the last forward pass.
    pub(super) h: f32,
    pub(super) dh: f32,
    /// s where the clamp to ±qmax passes the gradient, else 0.
    pub(super) ds: f32,
}

pub(super) struct AdaState<'a> {
    pub(super) w: &'a [f32],
    pub(super) n: usize,
    pub(super) k: usize,
    pub(super) scales: &'a [f32],
    pub(super) qmax: i32,
    pub(super) el: Vec<Elem>,
    /// ΔW = Ŵ(V) − W of the last forward pass.
    pub(super) d: Vec<f32>,
    /// ∂L_rec/∂Ŵ.
    pub(super) g: Vec<f32>,
    /// Scratch for mini-batches: X_b as [B, K] and [K, B], E = ΔW X_b.
    pub(super) xb: Vec<f32>,
    pub(super) xbt: Vec<f32>,
    pub(super) e: Vec<f32>,
    pub(super) idx: Vec<usize>,
    pub(super) threads: usize,
}

pub(super) const ZETA: f32 = 1.1;
pub(super) const GAMMA: f32 = -0.1;

#[inline]
pub(super) fn sigmoid(v: f32) -> f32 {
    1.0 / (1.0 + (-v).exp())
}

/// Regulariser settings of one step (`on == false` during the warm-up).
#[derive(Clone, Copy)]
pub(super) struct Reg {
    pub(super) on: bool,
    pub(super) lambda: f32,
    pub(super) beta: f32,
}

impl Reg {
    /// `λ (1 − |2h − 1|^β)` and its derivative w.r.t. h.
    #[inline]
    pub(super) fn value_grad(self, h: f32) -> (f32, f32) {
        if !self.on {
            return (0.0, 0.0);
        }
        let u = 2.0 * h - 1.0;
        let a = u.abs();
        if a == 0.0 {
            return (self.lambda, 0.0);
        }
        let p1 = a.powf(self.beta - 1.0);
        let val = self.lambda * (1.0 - p1 * a);
        let grad = -self.lambda * self.beta * p1 * u.signum() * 2.0;
        (val, grad)
    }
}

/// ∂L/∂V of one weight from `g` = ∂L_rec/∂Ŵ (chain rule: Ŵ = s·clamp(base + h), h = h(V)):
/// `(g · s · [inside the clamp] + ∂reg/∂h) · dh/dV`.
#[inline]
pub(super) fn dl_dv(e: &Elem, g: f32, reg: Reg) -> f32 {
    (g * e.ds + reg.value_grad(e.h).1) * e.dh
}

impl<'a> AdaState<'a> {
    pub(super) fn new(w: &'a [f32], n: usize, k: usize, scales: &'a [f32], qmax: i32) -> Self {
        let mut el = vec![Elem::default(); n * k];
        for (r, (erow, wrow)) in el.chunks_mut(k).zip(w.chunks(k)).enumerate() {
            let s = scales[r];
            let ok = s > 0.0 && s.is_finite();
            for (e, &wv) in erow.iter_mut().zip(wrow) {
                let (base, frac) = if ok {
                    let t = wv / s;
                    let b = t.floor();
                    (b, (t - b).clamp(0.0, 1.0))
                } else {
                    (0.0, 0.0)
                };
                e.base = base;
                // h(V) = frac  ⇔  σ(V) = (frac − γ)/(ζ − γ).
                let p = ((frac - GAMMA) / (ZETA - GAMMA)).clamp(1e-6, 1.0 - 1e-6);
                e.v = (p / (1.0 - p)).ln();
            }
        }
        let work = n * k * k.min(512);
        AdaState {
            w,
            n,
            k,
            scales,
            qmax,
            el,
            d: vec![0.0; n * k],
            g: vec![0.0; n * k],
            xb: Vec::new(),
            xbt: Vec::new(),
            e: Vec::new(),
            idx: Vec::new(),
            threads: threads_for(work),
        }
    }

    /// Computes h, dh/dV, the clamp mask and ΔW from V.
    pub(super) fn forward(&mut self) {
        let (k, w, scales, qmax) = (self.k, self.w, self.scales, self.qmax as f32);
        par_rows2(
            &mut self.el,
            k,
            &mut self.d,
            k,
            self.threads,
            |r0, erows, drows| {
                for (ri, (erow, drow)) in erows.chunks_mut(k).zip(drows.chunks_mut(k)).enumerate() {
                    let r = r0 + ri;
                    let s = scales[r];
                    let s = if s > 0.0 && s.is_finite() { s } else { 0.0 };
                    let wrow = &w[r * k..(r + 1) * k];
                    for ((e, dv), &wv) in erow.iter_mut().zip(drow.iter_mut()).zip(wrow) {
                        let sig = sigmoid(e.v);
                        let raw = sig * (ZETA - GAMMA) + GAMMA;
                        let (h, dh) = if raw <= 0.0 {
                            (0.0, 0.0)
                        } else if raw >= 1.0 {
                            (1.0, 0.0)
                        } else {
                            (raw, (ZETA - GAMMA) * sig * (1.0 - sig))
                        };
                        let xq = e.base + h;
                        let (xc, ds) = if xq < -qmax {
                            (-qmax, 0.0)
                        } else if xq > qmax {
                            (qmax, 0.0)
                        } else {
                            (xq, s)
                        };
                        e.h = h;
                        e.dh = dh;
                        e.ds = ds;
                        *dv = s * xc - wv;
                    }
                }
            },
        );
    }

    /// `self.g = ∂L_rec/∂Ŵ` from `self.d`; returns L_rec.
    pub(super) fn rec_grad(&mut self, obj: &Objective, rng: &mut SplitMix64) -> f64 {
        let (n, k) = (self.n, self.k);
        match obj {
            Objective::Gram { hs } => {
                matmul_nn(&self.d, hs, &mut self.g, n, k, k, self.threads);
                // L = tr(D Hs Dᵀ); ∂L/∂Ŵ = 2 D Hs.
                let mut loss = 0f64;
                for (gv, &dv) in self.g.iter_mut().zip(&self.d) {
                    loss += (*gv * dv) as f64;
                    *gv *= 2.0;
                }
                loss
            }
            Objective::Batch { x, xt, s, batch } => {
                let (s, b) = (*s, *batch);
                if self.idx.len() != s {
                    self.idx = (0..s).collect();
                }
                if b < s {
                    // Partial Fisher–Yates: the first b entries are a uniform sample.
                    for i in 0..b {
                        let j = i + rng.below(s - i);
                        self.idx.swap(i, j);
                    }
                }
                let cols = &self.idx[..b];
                // X_b as [B, K] (rows of Xᵀ) and as [K, B].
                self.xb.resize(b * k, 0.0);
                for (dst, &c) in self.xb.chunks_mut(k).zip(cols) {
                    dst.copy_from_slice(&xt[c * k..(c + 1) * k]);
                }
                self.xbt.resize(k * b, 0.0);
                for (dst, src) in self.xbt.chunks_mut(b).zip(x.chunks(s)) {
                    for (d, &c) in dst.iter_mut().zip(cols) {
                        *d = src[c];
                    }
                }
                self.e.resize(n * b, 0.0);
                // E = ΔW X_b (N×B), L = |E|²/B, ∂L/∂Ŵ = 2/B · E X_bᵀ.
                matmul_nn(&self.d, &self.xbt, &mut self.e, n, k, b, self.threads);
                let inv = 1.0 / b as f32;
                let mut loss = 0f64;
                for ev in self.e.iter_mut() {
                    loss += (*ev * *ev) as f64;
                    *ev *= 2.0 * inv;
                }
                matmul_nn(&self.e, &self.xb, &mut self.g, n, b, k, self.threads);
                loss * inv as f64
            }
        }
    }

    /// ∂L/∂V per weight into `out` (also returns the regulariser value).
    #[cfg(test)]
    pub(super) fn grad_v(&self, reg: Reg, out: &mut [f32]) -> f64 {
        let mut rl = 0f64;
        for ((o, e), &g) in out.iter_mut().zip(&self.el).zip(&self.g) {
            rl += reg.value_grad(e.h).0 as f64;
            *o = dl_dv(e, g, reg);
        }
        rl
    }

    /// Adam step on V using `self.g` (bias-corrected, as torch.optim.Adam).
    pub(super) fn adam_step(&mut self, reg: Reg, lr: f32, t: i32) {
        const B1: f32 = 0.9;
        const B2: f32 = 0.999;
        const EPS: f32 = 1e-8;
        let c1 = 1.0 - B1.powi(t);
        let c2 = 1.0 - B2.powi(t);
        let step = lr / c1;
        let c2s = c2.sqrt();
        let g = &self.g;
        let k = self.k;
        par_rows(&mut self.el, k, self.threads, |r0, erows| {
            let grows = &g[r0 * k..r0 * k + erows.len()];
            for (e, &gv) in erows.iter_mut().zip(grows) {
                let gvv = dl_dv(e, gv, reg);
                e.m1 = B1 * e.m1 + (1.0 - B1) * gvv;
                e.m2 = B2 * e.m2 + (1.0 - B2) * gvv * gvv;
                e.v -= step * e.m1 / (e.m2.sqrt() / c2s + EPS);
            }
        });
    }

    pub(super) fn run(&mut self, obj: &Objective, opts: &AdaRoundOpts) {
        let mut rng = SplitMix64::new(opts.seed);
        let iters = opts.iters;
        let warm = (opts.warmup.clamp(0.0, 1.0) as f64 * iters as f64) as usize;
        for it in 0..iters {
            let reg = Reg {
                on: it >= warm,
                lambda: opts.lambda,
                beta: anneal_beta(it, warm, iters, opts.beta),
            };
            self.forward();
            self.rec_grad(obj, &mut rng);
            self.adam_step(reg, opts.lr, (it + 1).min(i32::MAX as usize) as i32);
        }
    }

    pub(super) fn hard_round(&self) -> Vec<i8> {
        let qmax = self.qmax as f32;
        self.el
            .chunks(self.k)
            .zip(self.scales)
            .flat_map(|(erow, &s)| {
                let ok = s > 0.0 && s.is_finite();
                erow.iter().map(move |e| {
                    if !ok {
                        return 0;
                    }
                    // h ≥ ½ ⇔ σ(V) ≥ ½ ⇔ V ≥ 0.
                    let up = if e.v >= 0.0 { 1.0 } else { 0.0 };
                    (e.base + up).clamp(-qmax, qmax) as i8
                })
            })
            .collect()
    }
}

/// AdaRound's rounding variables of one layer, driven by a gradient computed outside
/// (TIAR back-propagates the temporal-feature loss through several layers to each `Ŵ`).
/// Same parameterisation, regulariser, β schedule and Adam as [`adaround_with`].
pub struct SoftRounding<'a> {
    pub(super) st: AdaState<'a>,
    pub(super) step: usize,
}

impl<'a> SoftRounding<'a> {
    /// `w` [N, K] row-major, one scale per row; `V` starts at the fractional part of `W/s`.
    pub fn new(w: &'a [f32], n: usize, k: usize, scales: &'a [f32], qmax: i32) -> Self {
        check_qmax(qmax);
        assert_eq!(w.len(), n * k);
        assert_eq!(scales.len(), n);
        let mut st = AdaState::new(w, n, k, scales, qmax);
        // Tiny layers: threads would cost more than they save.
        st.threads = 1;
        SoftRounding { st, step: 0 }
    }

    /// The soft-rounded weight `Ŵ(V)` [N, K] (recomputes h(V)).
    pub fn weight(&mut self, out: &mut [f32]) {
        self.st.forward();
        for ((o, &d), &w) in out.iter_mut().zip(&self.st.d).zip(self.st.w) {
            *o = w + d;
        }
    }

    /// One Adam step on V from `grad` = ∂L_rec/∂Ŵ at the last [`SoftRounding::weight`],
    /// with the regulariser of step `self.step` of `opts.iters`. Returns the regulariser's
    /// value.
    pub fn step(&mut self, grad: &[f32], opts: &AdaRoundOpts) -> f64 {
        assert_eq!(grad.len(), self.st.g.len());
        let iters = opts.iters.max(1);
        let warm = (opts.warmup.clamp(0.0, 1.0) as f64 * iters as f64) as usize;
        let it = self.step;
        let reg = Reg {
            on: it >= warm,
            lambda: opts.lambda,
            beta: anneal_beta(it, warm, iters, opts.beta),
        };
        self.st.g.copy_from_slice(grad);
        let value: f64 = self
            .st
            .el
            .iter()
            .map(|e| reg.value_grad(e.h).0 as f64)
            .sum();
        self.step += 1;
        self.st
            .adam_step(reg, opts.lr, self.step.min(i32::MAX as usize) as i32);
        value
    }

    /// ∂L/∂V of every weight for `grad` = ∂L_rec/∂Ŵ with the regulariser of the current
    /// step (what [`SoftRounding::step`] feeds Adam); for gradient checks.
    pub fn grad_v(&self, grad: &[f32], opts: &AdaRoundOpts) -> Vec<f32> {
        let iters = opts.iters.max(1);
        let warm = (opts.warmup.clamp(0.0, 1.0) as f64 * iters as f64) as usize;
        let reg = Reg {
            on: self.step >= warm,
            lambda: opts.lambda,
            beta: anneal_beta(self.step, warm, iters, opts.beta),
        };
        self.st
            .el
            .iter()
            .zip(grad)
            .map(|(e, &g)| dl_dv(e, g, reg))
            .collect()
    }

    /// The rounding variables V (for gradient checks).
    pub fn v(&self) -> Vec<f32> {
        self.st.el.iter().map(|e| e.v).collect()
    }

    /// Sets the rounding variables V (for gradient checks).
    pub fn set_v(&mut self, v: &[f32]) {
        for (e, &x) in self.st.el.iter_mut().zip(v) {
            e.v = x;
        }
    }

    /// The hard rounding: up where h(V) ≥ ½.
    pub fn hard_round(&self) -> Vec<i8> {
        self.st.hard_round()
    }
}

/// BRECQ's linear temperature decay: `b0` at the end of the warm-up down to `b1` at the end.
pub(super) fn anneal_beta(it: usize, warm: usize, iters: usize, (b0, b1): (f32, f32)) -> f32 {
    if it < warm || iters <= warm {
        return b0;
    }
    let rel = (it - warm) as f32 / (iters - warm) as f32;
    b1 + (b0 - b1) * (1.0 - rel).max(0.0)
}
