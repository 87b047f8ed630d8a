//! The ONNX importer on arbitrary bytes (protobuf, initializers in every encoding,
//! external data in a folder holding `w.data`), then the IR printer on what it imported
//! (`tfmqc inspect`, `--print-after-all`) and the exporter. Any panic, overflow or abort
//! is a bug: hostile bytes must give an error.

use std::path::PathBuf;
use std::sync::OnceLock;

use tfmqc_passes::ir::print;
use tfmqc_passes::onnx;

use crate::common;

pub fn run(data: &[u8]) {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    let dir = DIR.get_or_init(common::model_folder);
    if let Ok(model) = onnx::decode(data, Some(dir)) {
        let _ = print::model_summary(&model);
        let _ = print::model_text(&model);
        // What was imported can be written back (the `--passes none` round trip).
        let _ = onnx::encode(&model);
    }
}
