//! What passes hand on to later passes and the report: the TIB analysis, the calibration
//! runs and their statistics, which nodes are quantized, quality measurements, budgets.

pub mod budget;
pub mod calibration;
pub mod clip_search;
pub mod evaluate;
pub mod layer_inputs;
pub mod quant_plan;
pub mod reports;
pub mod targets;
pub mod tib;
pub mod trajectory;
