//! Temporal-feature tables at low precision (the journal version of TFMQ-DM caches the
//! *quantized* temporal features): a folded TIB table `[|S|, ...]` is stored as
//!
//! - `f32`: exact;
//! - `f16`: half the bytes, ~1e-7 relative MSE;
//! - `int8`: a quarter of the bytes plus one f32 scale per row (per t) and one per
//!   column, symmetric: `x[t, j] ≈ q[t, j] · s[t] · c[j]` ([`Int8Table`]).
//!
//! With `--table-precision auto` each frontier value gets the fewest bytes whose measured
//! error — relative MSE over the table and the lowest cosine of a row (the temporal-
//! feature error `tfmqc eval` reports) — stays within [`TABLE_MAX_REL_MSE`] and
//! [`TABLE_MIN_COSINE`]. Plain numerics on arrays; the graph form is fold-tib's.

use serde::Serialize;
use tract_onnx::prelude::f16;

/// `--table-precision auto`: the largest relative MSE (Σ(x − x̂)² / Σx² over the table)
/// a low-precision table may have (−40 dB, below the 8-bit activation noise it is added
/// to: ~−38 dB at best).
pub const TABLE_MAX_REL_MSE: f64 = 1e-4;
/// `--table-precision auto`: the lowest cosine similarity any row may keep.
pub const TABLE_MIN_COSINE: f64 = 0.9999;

/// How a temporal-feature table is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TableForm {
    F32,
    F16,
    Int8,
}

impl TableForm {
    pub fn name(self) -> &'static str {
        match self {
            TableForm::F32 => "f32",
            TableForm::F16 => "f16",
            TableForm::Int8 => "int8",
        }
    }
}

/// `--table-precision`: one form for every table, or the choice per frontier value.
/// Parsed by clap and recorded by serde under the names the command line gives it
/// (`auto`, `f32`, `f16`, `int8`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TablePrecision {
    Auto,
    Fixed(TableForm),
}

impl TablePrecision {
    /// The command line's name of the value.
    pub fn name(self) -> &'static str {
        match self {
            TablePrecision::Auto => "auto",
            TablePrecision::Fixed(f) => f.name(),
        }
    }
}

// By hand: a derive takes unit variants only, and `Fixed` carries its form.
impl clap::ValueEnum for TablePrecision {
    fn value_variants<'a>() -> &'a [Self] {
        &[
            TablePrecision::Auto,
            TablePrecision::Fixed(TableForm::F32),
            TablePrecision::Fixed(TableForm::F16),
            TablePrecision::Fixed(TableForm::Int8),
        ]
    }
    fn to_possible_value(&self) -> Option<clap::builder::PossibleValue> {
        Some(clap::builder::PossibleValue::new(self.name()))
    }
}

impl Serialize for TablePrecision {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

impl std::str::FromStr for TablePrecision {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        Ok(match s {
            "auto" => TablePrecision::Auto,
            "f32" => TablePrecision::Fixed(TableForm::F32),
            "f16" => TablePrecision::Fixed(TableForm::F16),
            "int8" => TablePrecision::Fixed(TableForm::Int8),
            _ => return Err(format!("--table-precision {s}: auto, f32, f16 or int8")),
        })
    }
}

/// One table's form, its bytes in the file, and its measured error against the exact
/// table.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TableChoice {
    pub form: TableForm,
    pub bytes: u64,
    pub rel_mse: f64,
    pub min_cosine: f64,
}

/// A table as int8 with a scale per row (per t) and one per column (per feature):
/// `x[t, j] ≈ q[t, j] · s[t] · c[j]`, `c[j] = max_t |x[t, j]|` (a temporal feature's
/// channels differ in magnitude far more than its rows do), `s[t]` the row's largest
/// normalised magnitude / 127.
#[derive(Clone, Debug, PartialEq)]
pub struct Int8Table {
    pub q: Vec<i8>,
    pub row_scales: Vec<f32>,
    pub col_scales: Vec<f32>,
}

/// Symmetric int8 with row and column scales ([`Int8Table`]): with the columns' own
/// scales or all ones (rows alone), whichever is within the `auto` bars, then the lower
/// relative MSE — normalising the columns coarsens a row whose largest normalised value
/// is a small absolute one. A zero column or row gets scale 1.
pub fn int8_rows(values: &[f32], rows: usize) -> Int8Table {
    let width = values.len() / rows.max(1);
    let mut col_scales = vec![0f32; width];
    for row in values.chunks(width.max(1)) {
        for (c, &v) in col_scales.iter_mut().zip(row) {
            *c = c.max(v.abs());
        }
    }
    for c in &mut col_scales {
        if *c == 0.0 {
            *c = 1.0;
        }
    }
    let by_columns = int8_with_columns(values, col_scales);
    let by_rows = int8_with_columns(values, vec![1.0; width]);
    // Within the auto bars first, then the lower relative MSE.
    let score = |t: &Int8Table| {
        let (rel, cos) = table_error(values, &dequantize_int8_rows(t), rows);
        (!(rel <= TABLE_MAX_REL_MSE && cos >= TABLE_MIN_COSINE), rel)
    };
    // (outside the bars, relative MSE): lexicographic, false (within) first.
    if score(&by_rows).partial_cmp(&score(&by_columns)) != Some(std::cmp::Ordering::Greater) {
        by_rows
    } else {
        by_columns
    }
}

fn int8_with_columns(values: &[f32], col_scales: Vec<f32>) -> Int8Table {
    let width = col_scales.len();
    let rows = values.len() / width.max(1);
    let mut q = Vec::with_capacity(values.len());
    let mut row_scales = Vec::with_capacity(rows);
    for row in values.chunks(width.max(1)) {
        let max = row
            .iter()
            .zip(&col_scales)
            .fold(0f32, |m, (v, c)| m.max((v / c).abs()));
        let s = if max > 0.0 { max / 127.0 } else { 1.0 };
        row_scales.push(s);
        q.extend(
            row.iter()
                .zip(&col_scales)
                .map(|(&v, &c)| (v / c / s).round_ties_even().clamp(-127.0, 127.0) as i8),
        );
    }
    Int8Table {
        q,
        row_scales,
        col_scales,
    }
}

/// What the graph computes from an [`Int8Table`], in its order: DequantizeLinear with
/// unit scale, times the gathered row scale, times the column scales.
pub fn dequantize_int8_rows(t: &Int8Table) -> Vec<f32> {
    let width = t.col_scales.len().max(1);
    t.q.chunks(width)
        .zip(&t.row_scales)
        .flat_map(|(row, &s)| {
            row.iter()
                .zip(&t.col_scales)
                .map(move |(&v, &c)| v as f32 * s * c)
        })
        .collect()
}

/// The table in f16 (round to nearest even) and back, as Cast computes it.
pub fn f16_round_trip(values: &[f32]) -> Vec<f32> {
    values.iter().map(|&v| f16::from_f32(v).to_f32()).collect()
}

/// f16 bits (little-endian bytes) of the table.
pub fn f16_bytes(values: &[f32]) -> Vec<u8> {
    values
        .iter()
        .flat_map(|&v| f16::from_f32(v).to_bits().to_le_bytes())
        .collect()
}

/// Relative MSE over the table and the lowest cosine similarity of a row.
pub fn table_error(exact: &[f32], approx: &[f32], rows: usize) -> (f64, f64) {
    let width = exact.len() / rows.max(1);
    let (mut signal, mut noise) = (0f64, 0f64);
    let mut min_cos = 1f64;
    for (a, b) in exact.chunks(width.max(1)).zip(approx.chunks(width.max(1))) {
        let (mut ab, mut aa, mut bb) = (0f64, 0f64, 0f64);
        for (&x, &y) in a.iter().zip(b) {
            let (x, y) = (x as f64, y as f64);
            ab += x * y;
            aa += x * x;
            bb += y * y;
            noise += (x - y).powi(2);
        }
        signal += aa;
        // A zero row stays zero in every form: cosine 1.
        let cos = if aa == 0.0 && bb == 0.0 {
            1.0
        } else {
            ab / (aa.sqrt() * bb.sqrt()).max(f64::MIN_POSITIVE)
        };
        min_cos = min_cos.min(cos);
    }
    let rel = if signal == 0.0 {
        if noise == 0.0 {
            0.0
        } else {
            f64::INFINITY
        }
    } else {
        noise / signal
    };
    (rel, min_cos)
}

/// The measured error and bytes of storing the table `values` (`rows` rows) as `form`.
pub fn measure(values: &[f32], rows: usize, form: TableForm) -> TableChoice {
    let n = values.len() as u64;
    let (approx, bytes) = match form {
        TableForm::F32 => {
            return TableChoice {
                form,
                bytes: 4 * n,
                rel_mse: 0.0,
                min_cosine: 1.0,
            }
        }
        TableForm::F16 => (f16_round_trip(values), 2 * n),
        TableForm::Int8 => {
            let t = int8_rows(values, rows);
            let width = t.col_scales.len() as u64;
            (dequantize_int8_rows(&t), n + 4 * rows as u64 + 4 * width)
        }
    };
    let (rel_mse, min_cosine) = table_error(values, &approx, rows);
    TableChoice {
        form,
        bytes,
        rel_mse,
        min_cosine,
    }
}

/// The form of one table: `Fixed` as asked; `Auto` the fewest bytes within
/// [`TABLE_MAX_REL_MSE`] and [`TABLE_MIN_COSINE`] (f32, exact, when neither
/// low-precision form is).
pub fn choose(values: &[f32], rows: usize, precision: TablePrecision) -> TableChoice {
    match precision {
        TablePrecision::Fixed(form) => measure(values, rows, form),
        TablePrecision::Auto => {
            let mut candidates: Vec<TableChoice> = [TableForm::Int8, TableForm::F16]
                .into_iter()
                .map(|f| measure(values, rows, f))
                .filter(|c| c.rel_mse <= TABLE_MAX_REL_MSE && c.min_cosine >= TABLE_MIN_COSINE)
                .collect();
            candidates.sort_by_key(|c| c.bytes);
            candidates
                .into_iter()
                .next()
                .filter(|c| c.bytes < 4 * values.len() as u64)
                .unwrap_or_else(|| measure(values, rows, TableForm::F32))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sinusoidal-embedding-like table: rows of very different magnitudes (per-row
    /// scales are for that), one zero row.
    fn table(rows: usize, width: usize) -> Vec<f32> {
        (0..rows)
            .flat_map(|r| {
                (0..width).map(move |c| {
                    if r == 3 {
                        0.0
                    } else {
                        (1.0 + r as f32) * ((r * 7 + c * 13) as f32 * 0.37).sin()
                    }
                })
            })
            .collect()
    }

    #[test]
    fn int8_rows_round_trip_within_half_a_step_of_each_element() {
        let v = table(10, 64);
        let t = int8_rows(&v, 10);
        let back = dequantize_int8_rows(&t);
        for (r, (a, b)) in v.chunks(64).zip(back.chunks(64)).enumerate() {
            for (j, (&x, &y)) in a.iter().zip(b).enumerate() {
                let step = t.row_scales[r] * t.col_scales[j];
                assert!((x - y).abs() <= step / 2.0 * 1.0001, "row {r}: {x} vs {y}");
            }
        }
        assert!(back[3 * 64..4 * 64].iter().all(|&x| x == 0.0));
    }

    #[test]
    fn measured_errors_are_what_the_stored_table_gives() {
        let v = table(10, 64);
        let c = measure(&v, 10, TableForm::Int8);
        let (rel, cos) = table_error(&v, &dequantize_int8_rows(&int8_rows(&v, 10)), 10);
        assert_eq!((c.rel_mse, c.min_cosine), (rel, cos));
        assert_eq!(c.bytes, 640 + 40 + 256);
        let h = measure(&v, 10, TableForm::F16);
        assert!(h.rel_mse < 1e-6 && h.rel_mse > 0.0, "{}", h.rel_mse);
        assert_eq!(h.bytes, 1280);
        assert_eq!(measure(&v, 10, TableForm::F32).rel_mse, 0.0);
    }

    #[test]
    fn auto_takes_the_fewest_bytes_within_the_error_bar() {
        let v = table(10, 64);
        let c = choose(&v, 10, TablePrecision::Auto);
        assert_eq!(c.form, TableForm::Int8);
        assert!(c.rel_mse <= TABLE_MAX_REL_MSE && c.min_cosine >= TABLE_MIN_COSINE);
        // ±1 with one 10 per row, on the diagonal (so column scales do not help): int8's
        // step of 10/127 costs ~2e-4 relative MSE, over the bar; f16 holds it exactly.
        let spiky: Vec<f32> = (0..64)
            .flat_map(|r| {
                (0..64).map(move |j| match j == r {
                    true => 10.0,
                    false => ((r * 7 + j * 13) as f32 * 0.37).sin().signum(),
                })
            })
            .collect();
        let int8 = measure(&spiky, 64, TableForm::Int8);
        assert!(int8.rel_mse > TABLE_MAX_REL_MSE, "{int8:?}");
        assert_eq!(
            choose(&spiky, 64, TablePrecision::Auto).form,
            TableForm::F16
        );
        // The same beyond f16's range (65504): exact f32.
        let huge: Vec<f32> = spiky.iter().map(|x| x * 1e5).collect();
        assert_eq!(choose(&huge, 64, TablePrecision::Auto).form, TableForm::F32);
    }
}
