//! The command line over the fuzz corpora (issue #20): every committed seed of
//! fuzz/seeds and every input a fuzz target once crashed on (fuzz/regressions/TARGET)
//! goes through the command that reads that kind of file. Whatever the bytes, tfmqc
//! succeeds or refuses with exit 1 and one line naming the file; never a panic message,
//! a backtrace, an abort or an internal error (exit 2).

mod common;
use common::*;
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use tfmqc_runtime::limits::{check_protobuf_size, decoded_size_bound};
use tract_onnx::prelude::Framework;

/// The system allocator, counting what a thread asks for while [`allocated_by`] runs on
/// it: the decoding bound is checked against what prost really allocates.
struct Counting;

thread_local! {
    static ALLOCATED: Cell<Option<u64>> = const { Cell::new(None) };
}

fn count(bytes: usize) {
    let _ = ALLOCATED.try_with(|a| {
        if let Some(n) = a.get() {
            a.set(Some(n + bytes as u64));
        }
    });
}

// Safety: every call is System's; counting touches a const-initialized thread local only.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count(layout.size());
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count(layout.size());
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, p: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count(new_size.saturating_sub(layout.size()));
        unsafe { System.realloc(p, layout, new_size) }
    }
    unsafe fn dealloc(&self, p: *mut u8, layout: Layout) {
        unsafe { System.dealloc(p, layout) }
    }
}

#[global_allocator]
static COUNTING: Counting = Counting;

/// Bytes `f` allocates on this thread (reallocations count what they add).
fn allocated_by<T>(f: impl FnOnce() -> T) -> (T, u64) {
    ALLOCATED.with(|a| a.set(Some(0)));
    let r = f();
    (r, ALLOCATED.with(|a| a.replace(None)).unwrap_or(0))
}

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

/// Decoding `bytes` as tract does (its copy of the bytes, then prost): what it allocates.
fn decode_allocation(bytes: &[u8]) -> (bool, u64) {
    // Made outside: the framework's operator table is not decoding's.
    let onnx = tract_onnx::onnx();
    let (r, n) = allocated_by(|| onnx.proto_model_for_read(&mut &bytes[..]));
    (r.is_ok(), n)
}

/// A ModelProto (ir_version 8) whose graph holds `n` empty NodeProtos: 2 bytes each.
fn empty_nodes(n: usize) -> Vec<u8> {
    let nodes: Vec<u8> = std::iter::repeat_n([0x0a, 0x00], n).flatten().collect();
    [vec![0x08, 0x08], len_field(0x3a, &nodes)].concat() // ir_version = 8, graph (7)
}

/// The bound the importer and the runtime check before decoding (limits.rs) is above what
/// prost allocates, on every seed and past finding that decodes and on real models; and
/// real models are far from refused.
#[test]
fn protobuf_decoding_allocates_no_more_than_the_bound() {
    let mut inputs = files("seeds/onnx");
    inputs.extend(files("regressions/onnx_import"));
    inputs.extend(files("regressions/denoiser_load"));
    for m in ["ddpm_digits", "digits_cond", "conv3x3_64"] {
        inputs.push(model_path(m));
    }
    let mut decoded = 0;
    for input in &inputs {
        let bytes = std::fs::read(input).unwrap();
        let (ok, actual) = decode_allocation(&bytes);
        let Ok(bound) = decoded_size_bound(&bytes) else {
            assert!(!ok, "{input:?}: prost decodes what the bound refuses");
            continue;
        };
        if !ok {
            continue;
        }
        decoded += 1;
        // tract's own copy of the bytes (read_to_end: up to twice their size) is not
        // decoding's.
        let copy = 2 * bytes.len() as u64 + 64;
        assert!(
            actual <= bound + copy,
            "{input:?}: decoding allocated {actual} bytes, the bound says {bound}"
        );
        eprintln!(
            "{}: {} bytes, decoding allocated {actual}, bound {bound}",
            input.display(),
            bytes.len()
        );
        assert!(check_protobuf_size(&bytes).is_ok(), "{input:?}");
    }
    assert!(decoded >= 8, "only {decoded} inputs decoded");
}

/// The amplification the check is for: 2 bytes on the wire, ~200 in memory. Measured at a
/// size that decodes quickly, refused (before decoding) at one that would take gigabytes.
#[test]
fn many_empty_messages_are_refused_before_decoding() {
    let small = empty_nodes(100_000);
    let (ok, actual) = decode_allocation(&small);
    assert!(ok);
    let bound = decoded_size_bound(&small).unwrap();
    assert!(
        actual > 50 * small.len() as u64 && bound >= actual,
        "{} bytes decode to {actual} (bound {bound})",
        small.len()
    );
    assert!(check_protobuf_size(&small).is_ok(), "within the slack");

    let big = empty_nodes(8 << 20); // 16 MiB on disk, ~3.5 GB decoded
    let e = check_protobuf_size(&big).unwrap_err();
    assert!(e.contains("could take up to"), "{e}");
    let dir = tmpdir();
    let m = dir.path().join("amplified.onnx");
    std::fs::write(&m, &big).unwrap();
    for args in [
        vec!["inspect", m.to_str().unwrap()],
        vec!["sample", m.to_str().unwrap(), "-o", "/dev/null"],
    ] {
        let res = run(&args);
        assert_clean(&args, &m, &res);
        let err = String::from_utf8_lossy(&res.stderr);
        assert!(
            res.status.code() == Some(1)
                && err.contains("amplified.onnx")
                && err.contains("could take up to"),
            "{args:?}: {err}"
        );
    }
}

/// Malformed wire data and nesting past prost's limit are refused by the bound's own
/// pass too (never a bound computed from a misread).
#[test]
fn the_bound_refuses_malformed_protobuf() {
    assert!(
        decoded_size_bound(&[0x3a, 0x10, 0x0a]).is_err(),
        "length past the end"
    );
    assert!(decoded_size_bound(&[0x0f]).is_err(), "wire type 7");
    assert!(
        decoded_size_bound(&[0x08; 11]).is_err(),
        "unterminated varint"
    );
    // A model whose graph's node's attribute holds a graph whose node ..., `levels` deep.
    let nested = |levels: usize| {
        let mut graph: Vec<u8> = vec![];
        for _ in 0..levels {
            let attribute = len_field(0x32, &graph); // AttributeProto.g (6)
            let node = len_field(0x2a, &attribute); // NodeProto.attribute (5)
            graph = len_field(0x0a, &node); // GraphProto.node (1)
        }
        [vec![0x08, 0x08], len_field(0x3a, &graph)].concat() // ir_version, graph (7)
    };
    // 3 messages a level: 90 deep decodes, 120 is past prost's limit of 100 for both.
    assert!(decoded_size_bound(&nested(30)).is_ok());
    assert!(decode_allocation(&nested(30)).0);
    let e = decoded_size_bound(&nested(40)).unwrap_err();
    assert!(e.contains("nested more than 100 deep"), "{e}");
    assert!(!decode_allocation(&nested(40)).0);
}

/// A length-delimited field: its key byte, the payload's length, the payload.
fn len_field(key: u8, payload: &[u8]) -> Vec<u8> {
    let mut v = vec![key];
    let mut len = payload.len() as u64;
    while len >= 0x80 {
        v.push(len as u8 | 0x80);
        len >>= 7;
    }
    v.push(len as u8);
    v.extend_from_slice(payload);
    v
}

/// The crates a workspace resolves, as "name vX.Y.Z features" lines (`cargo tree`).
fn resolved(manifest: &Path, workspace: bool) -> std::collections::BTreeSet<String> {
    // Not `--offline`: on a fresh machine the fuzz workspace's own crates (libFuzzer's)
    // are not in cargo's cache until scripts/fuzz.sh first builds, which CI runs after
    // the tests; `--locked` still pins every version to the lock files.
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or("cargo".into()));
    cmd.args(["tree", "--locked", "--manifest-path"])
        .arg(manifest)
        .args([
            "-e",
            "features,normal,build",
            "--prefix",
            "none",
            "--no-dedupe",
        ])
        .args(["-f", "{p} {f}"]);
    if workspace {
        cmd.arg("--workspace");
    }
    let out = cmd.output().expect("cargo runs");
    assert!(
        out.status.success(),
        "cargo tree: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.contains(" feature \"") && !l.starts_with("tfmqc"))
        .map(|l| l.trim_end_matches(" (*)").to_string())
        .collect()
}

/// The fuzz workspace resolves every crate it shares with the main one at the same
/// version and features, so that scripts/fuzz.sh reuses the test build's tract instead of
/// compiling it again (minutes: CI's fuzz step must stay under 2). Only what it adds
/// (libFuzzer) and what it instruments on purpose (miniz_oxide 0.8) differ.
#[test]
fn the_fuzz_workspace_resolves_shared_crates_as_the_tests_do() {
    let main = resolved(&repo().join("Cargo.toml"), true);
    let fuzz = resolved(&repo().join("fuzz/Cargo.toml"), false);
    let differ: Vec<&String> = fuzz
        .difference(&main)
        .filter(|l| {
            !["arbitrary ", "libfuzzer-sys ", "miniz_oxide v0.8."]
                .iter()
                .any(|p| l.starts_with(p))
        })
        .collect();
    assert!(
        differ.is_empty(),
        "fuzz/ resolves these unlike the main workspace (align them in fuzz/Cargo.toml): {differ:?}"
    );
}
