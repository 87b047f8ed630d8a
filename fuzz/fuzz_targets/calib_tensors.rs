//! The calibration readers (`--calib`, `--cond`): safetensors and numpy .npz (a zip of
//! .npy arrays, stored or deflated), told apart by their first bytes as the CLI does.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use tfmqc_passes::tensor_file;

fuzz_target!(|data: &[u8]| {
    let _ = tensor_file::tensors_from_bytes(Path::new("fuzz.calib"), data);
});
