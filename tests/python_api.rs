//! `pip install .` in a fresh virtual environment (under target/), then the `tfmqc`
//! command it installs compiles a model, and the `tfmqc` module runs it, in both calling
//! forms, matching onnxruntime on the same file (tests/python/).
//!
//! pip takes maturin and numpy from the wheelhouse scripts/test.sh downloads once
//! ($TFMQC_WHEELHOUSE, else target/wheelhouse), so this runs offline, and maturin builds
//! into this build's target folder, where the dependencies compiled for the tests are.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use common::*;

fn target_dir() -> PathBuf {
    Path::new(env!("CARGO_BIN_EXE_tfmqc"))
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>/tfmqc")
        .to_path_buf()
}

fn run_ok(what: &str, cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot start: {e}"));
    assert!(
        out.status.success(),
        "{what} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

#[test]
fn pip_install_gives_a_command_and_a_module_that_match_onnxruntime() {
    let Some(ort_python) = python() else { return };
    let target = target_dir();
    let wheelhouse = std::env::var_os("TFMQC_WHEELHOUSE")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("target/wheelhouse"));
    if !wheelhouse.join(".complete").exists() {
        if std::env::var_os("TFMQC_REQUIRE_INTEROP").is_some() {
            panic!(
                "{} is missing: scripts/test.sh makes it",
                wheelhouse.display()
            );
        }
        eprintln!("SKIPPING pip install: run the tests through scripts/test.sh");
        return;
    }
    let work = target.join("python-api");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).unwrap();
    let venv = work.join("venv");
    run_ok(
        "python3 -m venv",
        Command::new("python3").args(["-m", "venv"]).arg(&venv),
    );

    let start = Instant::now();
    run_ok(
        "pip install .",
        Command::new(venv.join("bin/pip"))
            .args([
                "install",
                "--disable-pip-version-check",
                "--no-index",
                "--find-links",
            ])
            .arg(&wheelhouse)
            .arg(repo())
            .env("CARGO_TARGET_DIR", &target),
    );
    eprintln!("pip install . took {:.1} s", start.elapsed().as_secs_f64());

    // The command from the wheel compiles a model (kept small, as tests/common does).
    let q = work.join("ddpm_digits.q.onnx");
    run_ok(
        "tfmqc (installed)",
        Command::new(venv.join("bin/tfmqc"))
            .arg(model_path("ddpm_digits"))
            .arg("-o")
            .arg(&q)
            .args([
                "--timesteps",
                "ddim:10",
                "--calib-samples",
                "2",
                "--calib-steps",
                "10",
            ]),
    );
    assert!(q.exists());
    let version = run_ok(
        "tfmqc --version",
        Command::new(venv.join("bin/tfmqc")).arg("--version"),
    );
    assert!(version.contains(env!("CARGO_PKG_VERSION")), "{version}");

    let summary = run_ok(
        "use_module.py",
        Command::new(venv.join("bin/python"))
            .arg(repo().join("tests/python/use_module.py"))
            .arg(repo())
            .arg(&q)
            .arg(&work),
    );
    eprintln!("module: {summary}");

    let sqnr = run_ok(
        "ort_compare.py",
        Command::new(&ort_python)
            .arg(repo().join("tests/python/ort_compare.py"))
            .arg(&q)
            .arg(work.join("digits_cond.q.onnx"))
            .arg(work.join("calls.npz")),
    );
    eprintln!("SQNR against onnxruntime (dB): {sqnr}");
    let db: serde_json::Value = serde_json::from_str(sqnr.trim()).expect("JSON");
    for form in [
        "uncond_positional",
        "uncond_keyword",
        "cond_positional",
        "cond_keyword",
    ] {
        let v = db[form].as_f64().expect(form);
        assert!(v > 25.0, "{form}: tfmqc.Denoiser vs onnxruntime {v:.1} dB");
    }
}
