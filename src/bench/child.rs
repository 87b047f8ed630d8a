//! The processes bench starts: engine runs (whose failures it explains in one line), the
//! quantizing runs of tfmqc, and onnxruntime's own quantizer.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::COMPARE_QUANT_SCRIPT;
use crate::{user_error, Failure};

/// The python that runs the onnxruntime engines (and, with `quantizer`, onnxruntime's
/// quantize_static for ort-int8-own), or why there is none.
pub(super) fn ort_python(quantizer: bool) -> Result<PathBuf, String> {
    let python = match std::env::var_os("TFMQC_PYTHON") {
        Some(p) => PathBuf::from(p),
        None => {
            // target/pyenv (made by scripts/test.sh): beside this binary's profile folder
            // (target/release/tfmqc), else under the current folder; else python3.
            let exe = std::env::current_exe().map_err(|e| e.to_string())?;
            let beside = exe
                .parent()
                .and_then(Path::parent)
                .map(|d| d.join("pyenv/bin/python"));
            let here = PathBuf::from("target/pyenv/bin/python");
            beside
                .into_iter()
                .chain([here])
                .find(|p| p.exists())
                .unwrap_or_else(|| PathBuf::from("python3"))
        }
    };
    let (check, what) = if quantizer {
        (
            "import onnxruntime, numpy, safetensors, onnx, onnxruntime.quantization",
            "onnxruntime, onnxruntime.quantization, onnx, numpy and safetensors",
        )
    } else {
        (
            "import onnxruntime, numpy, safetensors",
            "onnxruntime, numpy and safetensors",
        )
    };
    let out = Command::new(&python).args(["-c", check]).output();
    match out {
        Ok(o) if o.status.success() => Ok(python),
        Ok(o) => Err(format!(
            "{} cannot import {what} ({}); set TFMQC_PYTHON to a python that can (scripts/test.sh makes target/pyenv)",
            python.display(),
            String::from_utf8_lossy(&o.stderr)
                .lines()
                .last()
                .unwrap_or("")
                .trim()
        )),
        Err(e) => Err(format!(
            "{}: {e}; set TFMQC_PYTHON to a python with onnxruntime (scripts/test.sh makes target/pyenv)",
            python.display()
        )),
    }
}

/// What lines that say a process ran out of memory contain (compared in lower case):
/// Rust's and OpenBLAS's allocation failures, Python's MemoryError, onnxruntime's (C++
/// `bad_alloc` or its own message), a failed mmap, thread stack or library load.
const OOM_MARKERS: [&str; 7] = [
    "memory allocation",
    "memoryerror",
    "failed to allocate",
    "bad_alloc",
    "cannot allocate memory",
    "out of memory",
    "failed to map segment",
];

/// Why a child failed, in one line: out of memory (whichever way it showed: an abort
/// after a failed allocation, an exception, the kernel's OOM killer), a panic, or the
/// error it printed last.
fn child_failure(status: &std::process::ExitStatus, stderr: &str) -> String {
    let lines: Vec<&str> = stderr
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    let last = lines
        .last()
        .map(|l| l.trim_start_matches("tfmqc: error: ").to_string())
        .unwrap_or_else(|| "no message".into());
    let oom = lines.iter().find(|l| {
        let l = l.to_lowercase();
        OOM_MARKERS.iter().any(|m| l.contains(m))
    });
    #[cfg(unix)]
    let signal = std::os::unix::process::ExitStatusExt::signal(status);
    #[cfg(not(unix))]
    let signal: Option<i32> = None;
    if let Some(line) = oom {
        return format!(
            "out of memory: {}",
            line.trim_start_matches("tfmqc: error: ")
        );
    }
    match signal {
        // SIGKILL with nothing said: the kernel's out-of-memory killer (or a user).
        Some(9) => {
            "killed (SIGKILL), most likely by the kernel's out-of-memory killer: the machine ran out of memory (--memory-limit makes this an error of the engine instead)".into()
        }
        Some(n) => format!("killed by signal {n}: {last}"),
        None => {
            // A Rust panic: its message, not the backtrace hint after it.
            if let Some(k) = lines.iter().position(|l| l.contains("panicked at")) {
                let what = lines.get(k + 1).copied().unwrap_or(lines[k]);
                return format!("internal error (panic): {what}");
            }
            last
        }
    }
}

/// Runs a child and parses the JSON object it prints last on stdout. A child that
/// fails gives its exit code (1 unless it failed internally) and why ([`child_failure`]).
pub(super) fn run_child<T: serde::de::DeserializeOwned>(
    mut cmd: Command,
    what: &str,
) -> Result<T, Failure> {
    let out = cmd.output().map_err(|e| Failure {
        code: 2,
        message: format!("{what}: cannot start: {e}"),
    })?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        let why = child_failure(&out.status, &stderr);
        return Err(Failure {
            code: if out.status.code() == Some(2) && !why.starts_with("out of memory") {
                2
            } else {
                1
            },
            message: why,
        });
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .unwrap_or("");
    serde_json::from_str(line).map_err(|e| Failure {
        code: 2,
        message: format!("unreadable result ({e}): {stdout}{stderr}"),
    })
}

/// Caps the heap a child may allocate (RLIMIT_DATA: brk and private writable mappings
/// since Linux 4.7; read-only maps of model files are not counted), so that an engine
/// needing more fails with an allocation error instead of exhausting the machine.
pub(super) fn limit_memory(cmd: &mut Command, mib: Option<u64>) -> Result<(), Failure> {
    let Some(mib) = mib else { return Ok(()) };
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::process::CommandExt;
        let bytes = mib.saturating_mul(1 << 20) as libc::rlim_t;
        // SAFETY: the closure runs in the child between fork and exec and only calls
        // setrlimit, which is async-signal-safe.
        unsafe {
            cmd.pre_exec(move || {
                let limit = libc::rlimit {
                    rlim_cur: bytes,
                    rlim_max: bytes,
                };
                if libc::setrlimit(libc::RLIMIT_DATA, &limit) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        Ok(())
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = (cmd, mib);
        Err(user_error("--memory-limit works on Linux only"))
    }
}

/// onnxruntime's quantize_static on `float` from the records `calib` (scripts/
/// compare_quant.py's `quantize_own`, run from a copy in `work`); returns the file.
pub(super) fn ort_quantize_own(
    python: &Path,
    float: &Path,
    calib: &Path,
    work: &Path,
    k: usize,
    name: &str,
) -> Result<PathBuf, Failure> {
    let script = work.join("compare_quant.py");
    if !script.exists() {
        std::fs::write(&script, COMPARE_QUANT_SCRIPT)
            .map_err(|e| user_error(format!("{}: {e}", script.display())))?;
    }
    let out = work.join(format!("{k}-{name}.ort-own.onnx"));
    let own_dir = work.join(format!("{k}-{name}.ort-own"));
    eprintln!(
        "tfmqc bench: quantizing {} with onnxruntime's quantize_static (QDQ, per-channel, MinMax) on the same calibration records",
        float.display()
    );
    let driver = "import sys, json; sys.path.insert(0, sys.argv[1]); import compare_quant as cq; \
                  print(json.dumps(cq.quantize_own(*sys.argv[2:6])))";
    let abs = |p: &Path| std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
    let result = Command::new(python)
        .args(["-c", driver])
        .arg(work)
        .arg(abs(float))
        .arg(abs(calib))
        .arg(abs(&out))
        .arg(abs(&own_dir))
        .output()
        .map_err(|e| user_error(format!("{}: {e}", python.display())))?;
    if !result.status.success() || !out.exists() {
        return Err(user_error(format!(
            "onnxruntime's quantize_static on {} failed: {}",
            float.display(),
            child_failure(&result.status, &String::from_utf8_lossy(&result.stderr))
        )));
    }
    Ok(out)
}

pub(super) fn run_quantize(mut cmd: Command, float: &Path) -> Result<(), Failure> {
    let out = cmd.output().map_err(|e| Failure {
        code: 2,
        message: format!("quantizing {}: {e}", float.display()),
    })?;
    if !out.status.success() {
        return Err(Failure {
            code: out.status.code().map(|c| c as u8).unwrap_or(2).max(1),
            message: format!(
                "quantizing {} failed:\n{}",
                float.display(),
                String::from_utf8_lossy(&out.stderr)
            ),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(unix)]
    fn status(raw: i32) -> std::process::ExitStatus {
        std::os::unix::process::ExitStatusExt::from_raw(raw)
    }

    #[cfg(unix)]
    #[test]
    fn child_failures_say_out_of_memory_however_it_showed() {
        // Rust's abort after a failed allocation (SIGABRT).
        let why = child_failure(
            &status(6),
            "loading\nmemory allocation of 1073741824 bytes failed\n",
        );
        assert_eq!(
            why,
            "out of memory: memory allocation of 1073741824 bytes failed"
        );
        // Python / onnxruntime, exiting 1 with a traceback.
        let why = child_failure(&status(1 << 8), "Traceback ...\n  File x\nMemoryError\n");
        assert_eq!(why, "out of memory: MemoryError");
        // The kernel's OOM killer says nothing.
        assert!(child_failure(&status(9), "").contains("out-of-memory killer"));
    }

    #[cfg(unix)]
    #[test]
    fn child_failures_give_a_panic_message_or_the_last_error() {
        let why = child_failure(
            &status(101 << 8),
            "thread 'main' panicked at src/x.rs:1:1:\nindex out of bounds\nnote: run with `RUST_BACKTRACE=1`\n",
        );
        assert_eq!(why, "internal error (panic): index out of bounds");
        let why = child_failure(&status(1 << 8), "tfmqc: error: m.onnx: no such file\n");
        assert_eq!(why, "m.onnx: no such file");
        assert_eq!(
            child_failure(&status(11), "boom"),
            "killed by signal 11: boom"
        );
    }
}
