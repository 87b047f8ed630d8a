//! The model: a graph plus everything else an ONNX file carries, kept so that export
//! writes it back (opsets, metadata, functions, producer).

use tract_onnx::pb;

use super::graph::Graph;

#[derive(Clone, Debug, Default)]
pub struct Model {
    pub ir_version: i64,
    /// (domain, version), file order; `""` is the default `ai.onnx` domain.
    pub opsets: Vec<(String, i64)>,
    pub producer_name: String,
    pub producer_version: String,
    pub domain: String,
    pub model_version: i64,
    pub doc_string: String,
    /// `metadata_props`, file order.
    pub metadata: Vec<(String, String)>,
    pub graph: Graph,
    /// Model-local functions and training info are carried through untouched.
    pub functions: Vec<pb::FunctionProto>,
    pub training_info: Vec<pb::TrainingInfoProto>,
    /// Whether the file stored its tensors as external data (written back the same way).
    pub external_data: bool,
}

impl Model {
    /// Version of the default (`ai.onnx`) opset.
    pub fn onnx_opset(&self) -> i64 {
        self.opsets
            .iter()
            .find(|(d, _)| d.is_empty() || d == "ai.onnx")
            .map(|(_, v)| *v)
            .unwrap_or(0)
    }

    pub fn metadata_value(&self, key: &str) -> Option<&str> {
        self.metadata
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// Sets (or replaces) a metadata entry, keeping the position of an existing key.
    pub fn set_metadata(&mut self, key: &str, value: impl Into<String>) {
        let value = value.into();
        match self.metadata.iter_mut().find(|(k, _)| k == key) {
            Some(entry) => entry.1 = value,
            None => self.metadata.push((key.to_string(), value)),
        }
    }
}
