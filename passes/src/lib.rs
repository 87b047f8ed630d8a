//! tfmqc-passes: the IR, ONNX import/export, and the compiler passes (one file each).

pub mod budget;
pub mod calibrate;
pub mod canonicalize;
pub mod clip_search;
pub mod detect_tib;
pub mod error;
pub mod evaluate;
pub mod exec;
pub mod fold_tib;
pub mod ir;
pub mod layer_inputs;
pub mod npz;
pub mod onnx;
pub mod options;
pub mod pipeline;
pub mod quant;
pub mod quantize;
pub mod reconstruct;
pub mod reparameterize;
pub mod table_quant;
pub mod targets;
pub mod tensor_file;
pub mod threads;
pub mod tiar;
pub mod tib;
pub mod tib_net;
pub mod trajectory;

pub use error::{Error, Result};
pub use ir::{Model, Tensor};
pub use options::Options;
