//! The command line over the fuzz corpora (issue #20): every committed seed of
//! fuzz/seeds and every input a fuzz target once crashed on (fuzz/regressions/TARGET)
//! goes through the command that reads that kind of file. Whatever the bytes, tfmqc
//! succeeds or refuses with exit 1 and one line naming the file; never a panic message,
//! a backtrace, an abort or an internal error (exit 2).

mod common;
use common::*;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Zero bytes of `w.data` beside every model (fuzz/fuzz_targets/common.rs): the
/// skeleton seeds point their large initializers at its start.
const W_DATA_BYTES: usize = 1 << 22;

fn files(dir: &str) -> Vec<PathBuf> {
    let dir = repo().join("fuzz").join(dir);
    let mut v: Vec<PathBuf> = match std::fs::read_dir(&dir) {
        Ok(rd) => rd.filter_map(|e| Some(e.ok()?.path())).collect(),
        Err(_) => vec![],
    };
    v.sort();
    v
}

/// A folder like the fuzz targets' own: `w.data` (zeros) and `out.data`, a symbolic
/// link to a file outside it.
fn model_folder() -> tempfile::TempDir {
    let root = tmpdir();
    std::fs::create_dir(root.path().join("model")).unwrap();
    let dir = root.path().join("model");
    std::fs::write(dir.join("w.data"), vec![0u8; W_DATA_BYTES]).unwrap();
    std::fs::write(root.path().join("outside.bin"), [7u8; 64]).unwrap();
    std::os::unix::fs::symlink(root.path().join("outside.bin"), dir.join("out.data")).unwrap();
    root
}

fn run(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tfmqc"))
        .args(args)
        // A panic would print its backtrace: the test must see none.
        .env("RUST_BACKTRACE", "1")
        .output()
        .expect("tfmqc runs")
}

/// Exit 0, or exit 1 with exactly one error line that names `file`; no panic text.
fn assert_clean(args: &[&str], file: &Path, res: &Output) {
    let stderr = String::from_utf8_lossy(&res.stderr);
    let what = format!("tfmqc {} ({})", args.join(" "), file.display());
    for bad in [
        "panicked",
        "stack backtrace",
        "RUST_BACKTRACE",
        "internal error",
    ] {
        assert!(
            !stderr.contains(bad),
            "{what}: '{bad}' in stderr:\n{stderr}"
        );
    }
    match res.status.code() {
        Some(0) => {}
        Some(1) => {
            let errors: Vec<&str> = stderr
                .lines()
                .filter(|l| l.starts_with("tfmqc: error: "))
                .collect();
            assert_eq!(errors.len(), 1, "{what}: one error line:\n{stderr}");
            assert_eq!(
                stderr.lines().last(),
                Some(errors[0]),
                "{what}: the error comes last:\n{stderr}"
            );
        }
        other => panic!("{what}: exit {other:?}, expected 0 or 1:\n{stderr}"),
    }
}

/// `tfmqc inspect` (import, typing, time-step block, printer) and `tfmqc sample`
/// (Denoiser::load with the int8 lowering, one step) on every ONNX input.
#[test]
fn onnx_inputs_give_a_result_or_one_error_line() {
    let mut inputs = files("seeds/onnx");
    inputs.extend(files("regressions/onnx_import"));
    inputs.extend(files("regressions/denoiser_load"));
    assert!(inputs.len() >= 10, "the seeds are committed: {inputs:?}");
    let root = model_folder();
    let dir = root.path().join("model");
    for input in &inputs {
        let model = dir.join("model.onnx");
        std::fs::copy(input, &model).unwrap();
        let m = model.to_str().unwrap();
        let png = root.path().join("s.png");
        let png = png.to_str().unwrap();
        for args in [
            vec!["inspect", m],
            vec!["sample", m, "-o", png, "--steps", "1"],
        ] {
            let res = run(&args);
            assert_clean(&args, input, &res);
            if res.status.code() == Some(1) {
                let err = String::from_utf8_lossy(&res.stderr);
                assert!(
                    err.contains("model.onnx"),
                    "{input:?}: names the file:\n{err}"
                );
            }
        }
    }
}

/// The onnx_external inputs: a 4-byte model length, the model, the bytes of `w.data`.
#[test]
fn external_data_inputs_give_a_result_or_one_error_line() {
    let mut inputs = files("seeds/onnx_external");
    inputs.extend(files("regressions/onnx_external"));
    assert!(inputs.len() >= 6, "the seeds are committed: {inputs:?}");
    for input in &inputs {
        let root = model_folder();
        let dir = root.path().join("model");
        let bytes = std::fs::read(input).unwrap();
        let (head, rest) = bytes.split_at(4.min(bytes.len()));
        let split = u32::from_le_bytes(head.try_into().unwrap_or([0; 4])) as usize;
        let (model, data) = rest.split_at(split.min(rest.len()));
        std::fs::write(dir.join("model.onnx"), model).unwrap();
        std::fs::write(dir.join("w.data"), data).unwrap();
        let m = dir.join("model.onnx");
        let args = ["inspect", m.to_str().unwrap()];
        assert_clean(&args, input, &run(&args));
    }
}

/// Runs `tfmqc sample MODEL --steps 1 FLAG INPUT` for every committed seed and past crash
/// of a target (the model a tiny one under fuzz/seeds/onnx): a result or one error line.
fn sample_with_each(seeds: &str, regressions: &str, model: &str, flag: &str) {
    let mut inputs = files(seeds);
    inputs.extend(files(regressions));
    assert!(inputs.len() >= 5, "the seeds are committed: {inputs:?}");
    let model = repo().join("fuzz/seeds/onnx").join(model);
    let dir = tmpdir();
    let png = dir.path().join("s.png");
    for input in &inputs {
        let args = [
            "sample",
            model.to_str().unwrap(),
            "-o",
            png.to_str().unwrap(),
            "--steps",
            "1",
            flag,
            input.to_str().unwrap(),
        ];
        assert_clean(&args, input, &run(&args));
    }
}

/// Calibration files go through `sample --cond` of a conditional model (the reader
/// `--calib` uses too).
#[test]
fn calibration_inputs_give_a_result_or_one_error_line() {
    sample_with_each(
        "seeds/calib",
        "regressions/calib_tensors",
        "tiny_conditional.onnx",
        "--cond",
    );
}

#[test]
fn scheduler_inputs_give_a_result_or_one_error_line() {
    sample_with_each(
        "seeds/scheduler",
        "regressions/scheduler_config",
        "tiny_denoiser.onnx",
        "--scheduler",
    );
}
