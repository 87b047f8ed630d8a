//! tfmqc-passes: the compiler, by role (docs/LAYOUT.md):
//! - `ir`: the IR, ONNX import/export, tensor files, running IR models on the runtime;
//! - `passes`: the `Pass` trait, the registry and pipelines (the pass manager), one file
//!   per pass;
//! - `analysis`: the results passes hand on (TIB analysis, calibration, targets, …);
//! - `numerics`: quantizers, range search, reconstruction, the TIB network.

pub mod analysis;
pub mod error;
pub mod ir;
pub mod numerics;
pub mod options;
pub mod passes;

// The modules' paths before the role folders (`tfmqc_passes::onnx`, `::quantize`, …), so
// callers in the CLI, the Python module, tests and benches keep theirs.
pub use analysis::{budget, clip_search, evaluate, layer_inputs, targets, tib, trajectory};
pub use ir::{exec, npz, onnx, tensor_file};
pub use numerics::{quant, reconstruct, table_quant, threads, tib_net};
pub use passes as pipeline;
pub use passes::fold_tib::tiar;
pub use passes::{
    calibrate, canonicalize, detect_tib, fold_tib, quantize, reparameterize, split_concat,
};

pub use error::{Error, Result};
pub use ir::{Model, Tensor};
pub use options::Options;
