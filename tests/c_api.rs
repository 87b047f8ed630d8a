//! The C API: runtime/include/tfmqc.h compiles as C and C++, declares what the library
//! exports, and runtime/examples/denoise.c, built with the system C compiler against
//! libtfmqc.so (the runtime's example `tfmqc`), gives the Rust API's bits.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use tfmqc_runtime::{Denoiser, Sampler, Tensor};

/// The profile folder of this build (target/release when testing with --release).
fn profile_dir() -> PathBuf {
    Path::new(env!("CARGO_BIN_EXE_tfmqc"))
        .parent()
        .expect("the binary's folder")
        .to_path_buf()
}

/// libtfmqc.so, built by `cargo test` (it builds examples) or here: the same cargo
/// command over the whole workspace, so the dependencies' features (and artifacts) are
/// those of the test build, a no-op when it is fresh.
fn library() -> PathBuf {
    let lib = profile_dir().join("examples/libtfmqc.so");
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(repo())
        .args(["build", "--workspace", "--example", "tfmqc"])
        .env("CARGO_TARGET_DIR", profile_dir().parent().unwrap());
    if profile_dir().file_name().is_some_and(|n| n == "release") {
        cmd.arg("--release");
    }
    let out = cmd.output().expect("cargo runs");
    assert!(
        out.status.success(),
        "building libtfmqc.so failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(lib.exists(), "{} was not built", lib.display());
    lib
}

fn cc(args: &[&str]) {
    let out = Command::new("cc")
        .args(args)
        .output()
        .expect("the system C compiler (cc) runs");
    assert!(
        out.status.success(),
        "cc {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn header() -> PathBuf {
    repo().join("runtime/include/tfmqc.h")
}

/// FNV-1a (64 bits) over the floats' bit patterns, little end first (as denoise.c).
fn checksum(t: &Tensor) -> String {
    let mut h: u64 = 0xcbf29ce484222325;
    for v in t.to_plain_array_view::<f32>().unwrap().iter() {
        for b in v.to_bits().to_le_bytes() {
            h ^= b as u64;
            h = h.wrapping_mul(0x100000001b3);
        }
    }
    format!("{h:016x}")
}

#[test]
fn the_header_compiles_as_c_and_cpp_without_warnings() {
    let h = header();
    let h = h.to_str().unwrap();
    for std in ["-std=c99", "-std=c11"] {
        cc(&[
            std,
            "-Wall",
            "-Wextra",
            "-Werror",
            "-pedantic",
            "-fsyntax-only",
            "-x",
            "c",
            h,
        ]);
    }
    cc(&[
        "-std=c++11",
        "-Wall",
        "-Wextra",
        "-Werror",
        "-pedantic",
        "-fsyntax-only",
        "-x",
        "c++",
        h,
    ]);
}

#[test]
fn every_function_the_header_declares_is_exported_by_the_library() {
    let text = std::fs::read_to_string(header()).unwrap();
    // Every `tfmqc_name(` in the header: the functions it declares.
    let mut declared: Vec<String> = text
        .match_indices("tfmqc_")
        .filter_map(|(at, _)| {
            let name: String = text[at..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            text[at + name.len()..].starts_with('(').then_some(name)
        })
        .collect();
    declared.sort();
    declared.dedup();
    assert!(
        declared.len() >= 12,
        "functions found in the header: {declared:?}"
    );
    let out = Command::new("nm")
        .args(["-D", "--defined-only"])
        .arg(library())
        .output()
        .expect("nm runs");
    let symbols = String::from_utf8_lossy(&out.stdout);
    let exported: Vec<&str> = symbols
        .lines()
        .filter_map(|l| l.split_whitespace().last())
        .collect();
    for f in &declared {
        assert!(
            exported.contains(&f.as_str()),
            "{f} is declared in tfmqc.h but libtfmqc.so does not export it"
        );
    }
}

#[test]
fn the_c_example_denoises_and_samples_with_the_rust_apis_bits() {
    let dir = tmpdir();
    let q = dir.path().join("ddpm_digits.q.onnx");
    quantize_small("ddpm_digits", &q, "10", &[]);
    let lib = library();
    let exe = dir.path().join("denoise");
    let lib_dir = lib.parent().unwrap().to_str().unwrap().to_string();
    cc(&[
        "-std=c99",
        "-Wall",
        "-Wextra",
        "-Werror",
        repo().join("runtime/examples/denoise.c").to_str().unwrap(),
        "-I",
        repo().join("runtime/include").to_str().unwrap(),
        "-L",
        &lib_dir,
        "-ltfmqc",
        &format!("-Wl,-rpath,{lib_dir}"),
        "-o",
        exe.to_str().unwrap(),
    ]);
    // S = ddim:10: DDIM at 10 steps visits exactly S.
    let out = Command::new(&exe)
        .arg(&q)
        .arg("10")
        .output()
        .expect("the example runs");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "denoise.c failed:\n{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The same calls through the Rust API.
    let model = Denoiser::load(&q).unwrap();
    let [c, h, w] = model.sample_shape().unwrap();
    let n = 2 * c * h * w;
    let x: Vec<f32> = (0..n)
        .map(|i| ((i * 7919) % 2001) as f32 / 1000.0 - 1.0)
        .collect();
    let x = Tensor::from_shape(&[2, c, h, w], &x).unwrap();
    let ts = model.timesteps().unwrap();
    let t = ts[ts.len() - 1];
    let eps = model.denoise(&x, t, &[]).unwrap();
    let image = model.sample(0, 10, &[], 1, Sampler::Ddim).unwrap();

    let expect_denoise = format!("denoise t={t} checksum {}", checksum(&eps));
    let expect_sample = format!("sample ddim 10 steps seed 0 checksum {}", checksum(&image));
    assert!(
        stdout.contains(&expect_denoise),
        "expected '{expect_denoise}' in:\n{stdout}"
    );
    assert!(
        stdout.contains(&expect_sample),
        "expected '{expect_sample}' in:\n{stdout}"
    );
    assert!(
        stdout.contains("refused: time step"),
        "a t outside S is refused with the runtime's message:\n{stdout}"
    );
}
