//! The runtime's `Denoiser::load` on arbitrary bytes written as a model file: protobuf
//! decoding, the model's metadata (time-step set, recorded scheduler), the int8 lowering
//! (in place, as `load` does it) and tract's loading and optimization, with external
//! data in a folder holding `w.data`.

use std::path::PathBuf;
use std::sync::OnceLock;

use tfmqc_runtime::Denoiser;

use crate::common;

pub fn run(data: &[u8]) {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    let dir = DIR.get_or_init(common::model_folder);
    let path = dir.join("fuzz.onnx");
    if std::fs::write(&path, data).is_err() {
        return;
    }
    let _ = Denoiser::load(&path);
}
