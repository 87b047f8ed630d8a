//! The calibration readers (`--calib`, `--cond`): safetensors and numpy .npz (a zip of
//! .npy arrays, stored or deflated), told apart by their first bytes as the CLI does.

use std::path::Path;

use tfmqc_passes::tensor_file;

pub fn run(data: &[u8]) {
    let _ = tensor_file::tensors_from_bytes(Path::new("fuzz.calib"), data);
}
