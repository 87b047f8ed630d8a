//! Every fuzz target in one libFuzzer binary: `TFMQC_FUZZ_TARGET=NAME tfmqc-fuzz
//! [libFuzzer options] CORPUS...` (scripts/fuzz.sh sets it). One binary instead of one
//! per target: each links all of tract, one link instead of five.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;

mod calib_tensors;
mod common;
mod denoiser_load;
mod onnx_external;
mod onnx_import;
mod scheduler_config;

/// A target: its name and what it runs on each input.
type Target = (&'static str, fn(&[u8]));

/// The targets by name, as scripts/fuzz.sh lists them.
const TARGETS: &[Target] = &[
    ("onnx_import", onnx_import::run),
    ("onnx_external", onnx_external::run),
    ("denoiser_load", denoiser_load::run),
    ("calib_tensors", calib_tensors::run),
    ("scheduler_config", scheduler_config::run),
];

fn target() -> fn(&[u8]) {
    static TARGET: OnceLock<fn(&[u8])> = OnceLock::new();
    *TARGET.get_or_init(|| {
        let name = std::env::var("TFMQC_FUZZ_TARGET").unwrap_or_default();
        match TARGETS.iter().find(|(n, _)| *n == name) {
            Some((_, run)) => *run,
            None => {
                let names: Vec<&str> = TARGETS.iter().map(|(n, _)| *n).collect();
                eprintln!(
                    "tfmqc-fuzz: set TFMQC_FUZZ_TARGET to one of {}",
                    names.join(", ")
                );
                std::process::exit(2)
            }
        }
    })
}

fuzz_target!(|data: &[u8]| target()(data));
