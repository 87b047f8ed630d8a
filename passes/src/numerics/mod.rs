//! Numerics on plain arrays, apart from graph surgery: quantizers and range search,
//! weight-rounding reconstruction (RTN, GPTQ, AdaRound), low-precision tables, the TIB as
//! a small network for TIAR, and the thread budget they share.

pub mod act_scale;
pub mod lp_search;
pub mod quant;
pub mod reconstruct;
pub mod table_quant;
pub mod threads;
pub mod tib_net;
