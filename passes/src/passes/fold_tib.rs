//! fold-tib: evaluate the TIB for every t in the finite set S and replace it by one
//! constant table `[|S|, ...]` per frontier value, read by `Gather` at the index of t.
//!
//! The index of t is computed in standard ONNX ops, and a t outside S must fail in every
//! runtime rather than read a wrong row:
//!
//! ```text
//! pos   = ArgMax(Cast<f32>(Equal(Unsqueeze(t, -1), S)), axis=-1)   first match, or 0
//! miss  = Not(Equal(Gather(S, pos), t))                            t ∉ S
//! index = pos + Cast<i64>(miss) · |S|                              out of range if t ∉ S
//! emb_i = Gather(table_i, index, axis=0)
//! t'    = Gather(S, index, axis=0)          read by the TIB nodes that stay computed
//! ```
//!
//! The pass (this file) picks the path; the table rewrite is in `tables.rs`, TIAR
//! (`--tib quant|auto`) in `tiar.rs`, which uses the same table rewrite.

mod tables;
pub mod tiar;

pub use tables::{evaluate_tables, fold, fold_tables, fold_with, table_choice, FoldReport};

use crate::error::Result;
use crate::options::{timestep_set, Options, TibMode};
use crate::passes::{Analysis, Pass, PassContext};

pub struct FoldTib;

impl Pass for FoldTib {
    fn name(&self) -> &'static str {
        "fold-tib"
    }
    fn summary(&self) -> &'static str {
        "Replace the TIB by exact lookup tables over the time-step set S (--tib lut), or quantize it with TIAR (--tib quant|auto)"
    }
    fn requires(&self, _options: &Options) -> Vec<Analysis> {
        vec![Analysis::Tib]
    }
    fn run(&self, cx: &mut PassContext) -> Result<()> {
        let tib = cx.tib()?.clone();
        let set = timestep_set(&cx.model, cx.options)?;
        if cx.options.tib != TibMode::Lut {
            // --tib quant|auto: TIAR, then tables only where chosen (tiar.rs).
            return tiar::run(cx, &tib, &set);
        }
        let report = fold_with(&mut cx.model, &tib, &set, cx.options.table_precision)?;
        cx.step_index = report.index_value.clone();
        cx.note(format!(
            "|S| = {} time steps; {} nodes replaced by {} tables, {} bytes ({})",
            set.len(),
            report.removed_nodes,
            report.tables,
            report.table_bytes,
            report.forms_summary()
        ));
        Ok(())
    }
}
