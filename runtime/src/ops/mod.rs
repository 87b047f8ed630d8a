//! The runtime's own tract ops: each is built by tract's ONNX parser from a node that
//! [`crate::lower`] wrote (`TfmqcQConv`, `TfmqcQGemm`, …) and runs on [`crate::kernels`].
pub mod attention;
pub mod conv;
pub mod gemm;
pub mod group_norm;
pub mod matmul;
