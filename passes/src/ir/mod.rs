//! The intermediate representation: an ONNX model as a petgraph graph.

pub mod attr;
pub mod bytes;
pub mod exec;
pub mod graph;
pub mod model;
pub mod names;
pub mod npz;
pub mod onnx;
pub mod opset;
pub mod print;
pub mod qdq;
pub mod tensor;
pub mod tensor_file;

pub use bytes::{Bytes, FileSpan};
pub use graph::{Dim, Edge, Graph, Node, ValueInfo};
pub use model::Model;
pub use tensor::{DType, Element, Tensor};
