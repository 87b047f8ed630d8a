//! The importer on a model with ONNX external data: the input is a 4-byte little-endian
//! model length, the model, then the bytes of its data file `w.data`. Offsets, lengths
//! and locations come from the model, so the fuzzer drives reads past the end,
//! overflowing offsets, paths that climb out of the folder and a symbolic link that
//! leaves it (`out.data`).

use std::path::PathBuf;
use std::sync::OnceLock;

use tfmqc_passes::ir::print;
use tfmqc_passes::onnx;

use crate::common;

pub fn run(data: &[u8]) {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    let dir = DIR.get_or_init(common::model_folder);
    let Some((head, rest)) = data.split_first_chunk::<4>() else {
        return;
    };
    let split = (u32::from_le_bytes(*head) as usize).min(rest.len());
    let (model, weights) = rest.split_at(split);
    // Replaced, not rewritten in place: a file truncated under a live mapping faults.
    let tmp = dir.join("w.data.tmp");
    if std::fs::write(&tmp, weights).is_err() || std::fs::rename(&tmp, dir.join("w.data")).is_err()
    {
        return;
    }
    if let Ok(m) = onnx::decode(model, Some(dir)) {
        let _ = print::model_text(&m);
    }
}
