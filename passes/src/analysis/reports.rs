//! What `fold-tib` under `--tib quant|auto` (TIAR) and `reparameterize` (TCR) did: the
//! report's `tib` and `tcr` sections.

use serde::Serialize;

/// One TIB linear layer after TIAR.
#[derive(Clone, Debug, Serialize)]
pub struct TiarLayer {
    pub node: String,
    pub weight: String,
    pub out_features: usize,
    pub in_features: usize,
    /// uint8 (scale, zero point) of its input; `None` with `--act-bits 32`.
    pub act: Option<(f32, u8)>,
    /// Roundings TIAR changed from round-to-nearest.
    pub flipped: usize,
    /// Quantized in the output (false: only tables read it).
    pub in_output: bool,
}

/// One frontier value: the table or the quantized TIB, and what each costs.
#[derive(Clone, Debug, Serialize)]
pub struct FrontierChoice {
    pub value: String,
    /// `table` or `quantized`.
    pub choice: String,
    /// Bytes of its table `[|S|, ...]` (f32).
    pub table_bytes: u64,
    /// Temporal-feature error of the quantized TIB, round-to-nearest and after TIAR:
    /// cosine similarity per t in S (order of `TiarReport::timesteps`), its minimum, and
    /// the relative MSE Σ||ê − e||² / Σ||e||² over S.
    pub cosine_rtn: Vec<f64>,
    pub cosine_tiar: Vec<f64>,
    pub cosine_min_rtn: f64,
    pub cosine_min_tiar: f64,
    pub rel_mse_rtn: f64,
    pub rel_mse_tiar: f64,
}

/// What `--tib quant|auto` did (report JSON `tib`).
#[derive(Clone, Debug, Serialize)]
pub struct TiarReport {
    pub mode: String,
    pub timesteps: Vec<i64>,
    pub weight_bits: u32,
    pub act_bits: u32,
    pub iters: usize,
    /// TIAR's loss (mean over t of the summed squared frontier error) with
    /// round-to-nearest weights and with TIAR's rounding (the one kept is the lower).
    pub loss_rtn: f64,
    pub loss_tiar: f64,
    /// True when TIAR did not beat round-to-nearest and RTN was kept.
    pub kept_rtn: bool,
    pub seconds: f64,
    /// The table budget (`--lut-budget`, else 10 % of `quantized_model_bytes` with the
    /// weights at a byte each whatever `--weight-bits`, at least 16 KiB).
    pub lut_budget_bytes: u64,
    /// Estimated bytes of the quantized model without TIB tables: quantized weights as
    /// stored (one byte a value, half a byte packed INT4), every other initializer as it is.
    pub quantized_model_bytes: u64,
    pub table_bytes: u64,
    /// Bytes of the quantized TIB's layers as stored (integer weights, scales, zero
    /// points; all of them, an upper bound when some projection's feature is a table):
    /// charged to the budget before any table, since a computed feature needs them.
    pub tib_weight_bytes: u64,
    pub layers: Vec<TiarLayer>,
    pub frontier: Vec<FrontierChoice>,
    /// Set when the TIB could not be quantized and was tabled instead.
    pub fallback: Option<String>,
}

/// One balanced activation.
#[derive(Clone, Debug, Serialize)]
pub struct Balanced {
    /// The activation (before the rewrite).
    pub value: String,
    /// The layers reading it, whose weights took the factors.
    pub layers: Vec<String>,
    pub channels: usize,
    /// Where 1/r went: `affine <node>` (folded into the producer) or `mul` (a new Mul).
    pub folded_into: String,
    /// max_c a_c / mean_c a_c before and after: how unequal the channels are.
    pub spread_before: f32,
    pub spread_after: f32,
    /// Smallest and largest factor.
    pub r_min: f32,
    pub r_max: f32,
}

/// What TCR did (the `--report`'s `tcr`).
#[derive(Clone, Debug, Default, Serialize)]
pub struct TcrReport {
    pub alpha: f32,
    pub balanced: Vec<Balanced>,
    /// Records (model calls) the channel ranges were taken on, and their distinct steps.
    pub records: usize,
    pub steps: usize,
    /// Whether the balanced model went on to quantize (`--tcr auto` may undo it).
    pub applied: bool,
    /// `--tcr auto`: mean output SQNR (dB) on the calibration records without and with
    /// TCR, each model quantized as the options say (output Q/DQ aside).
    pub auto_db: Option<(f64, f64)>,
    /// `--tcr-alpha auto`: each α tried and its mean output SQNR (dB) on the calibration
    /// records, measured as `auto_db`; `alpha` is the best.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub alpha_trials: Vec<(f32, f64)>,
}

impl TcrReport {
    /// One line for the summary.
    pub fn summary(&self) -> String {
        let auto = match self.auto_db {
            Some((off, on)) => format!(
                "; auto: {:+.2} dB mean output SQNR on the calibration records ({off:.2} → {on:.2} dB)",
                on - off
            ),
            None => String::new(),
        };
        let alpha = match self.alpha_trials.as_slice() {
            [] => self.alpha.to_string(),
            t => format!(
                "{}, the best by --tcr-alpha auto of {}",
                self.alpha,
                t.iter()
                    .map(|(a, db)| format!("{a}: {db:.2} dB"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        };
        format!(
            "TCR: {} (α = {alpha}, {} activations balanced{auto})",
            if self.applied { "on" } else { "off" },
            self.balanced.len()
        )
    }
}
