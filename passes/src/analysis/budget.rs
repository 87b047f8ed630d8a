//! Memory and time budgets of the long phases.
//!
//! Rust cannot recover from a failed allocation: the process aborts. On an SD-class UNet
//! a phase's buffers are gigabytes, so each phase that allocates much first estimates
//! what it needs ([`MemoryNeed`]) and compares it with what the machine has (or what
//! `--max-memory` allows): past it, the phase stops with a user error that names the
//! phase, the estimate and the option that lowers it, instead of dying half-way.
//!
//! Time: calibration's cost is one model call times the number of calls; with no
//! explicit `--calib-samples` / `--calib-steps` the pass measures its first call and
//! fits the trajectories to `--calib-budget` ([`fit_calibration`]).

use std::fmt;

use crate::error::{Error, Result};
use crate::ir::{Dim, Model};

/// One part of a phase's memory estimate.
#[derive(Clone, Debug)]
pub struct Part {
    pub what: &'static str,
    pub bytes: u64,
}

/// What a phase expects to hold at its peak, part by part.
#[derive(Clone, Debug)]
pub struct MemoryNeed {
    pub phase: &'static str,
    pub parts: Vec<Part>,
    /// The option(s) that lower the need, for the error message.
    pub lower_with: &'static str,
}

impl MemoryNeed {
    pub fn total(&self) -> u64 {
        self.parts.iter().map(|p| p.bytes).sum()
    }
}

impl fmt::Display for MemoryNeed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "about {}", gb(self.total()))?;
        let parts: Vec<String> = self
            .parts
            .iter()
            .filter(|p| p.bytes > 0)
            .map(|p| format!("{} {}", p.what, gb(p.bytes)))
            .collect();
        if !parts.is_empty() {
            write!(f, " ({})", parts.join(" + "))?;
        }
        Ok(())
    }
}

/// `1.23 GB`.
pub fn gb(bytes: u64) -> String {
    format!("{:.2} GB", bytes as f64 / 1e9)
}

/// Memory this process may still take: `MemAvailable` of /proc/meminfo (Linux); `None`
/// where the system does not say.
pub fn available_memory() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// The peak resident memory of this process since the last [`reset_peak_rss`] (or its
/// start): `VmHWM` of /proc/self/status; `None` where the system does not say.
pub fn peak_rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// The resident memory of this process now: `VmRSS` of /proc/self/status.
pub fn current_rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// With `TFMQC_TRACE_MEMORY` set, prints the resident memory now and the peak since the
/// phase began at `label` (stderr): where inside a phase its peak is reached, which the
/// per-phase peaks of the report cannot tell.
pub fn trace_memory(label: &str) {
    if std::env::var_os("TFMQC_TRACE_MEMORY").is_some() {
        eprintln!(
            "tfmqc memory: {label}: resident {}, peak {}",
            gb(current_rss().unwrap_or(0)),
            gb(peak_rss().unwrap_or(0))
        );
    }
}

/// Starts a new peak for [`peak_rss`] at the current resident size (Linux: writing 5 to
/// /proc/self/clear_refs), so that each phase's peak can be told apart.
pub fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// Gives the memory the allocator holds free back to the OS. glibc keeps freed blocks
/// below its mmap threshold in its arenas: after a phase that ran a UNet (tract's
/// activations, packed weights) gigabytes stay resident though nothing uses them, and the
/// next phase's peak stacks on top (measured on SD-1.5 at latent 32: 1.7 GB held after the
/// evaluation's float runs).
pub fn return_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks glibc's own arenas; it takes no pointer of ours.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Parses `--max-memory`: bytes, or with a unit (`8G`, `512M`, `1.5GB`, `800MiB`).
pub fn parse_size(spec: &str) -> Result<u64> {
    let s = spec.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let value: f64 = num
        .parse()
        .map_err(|_| Error::invalid(format!("'{spec}' is not a size (e.g. 8G, 512M, 1e9)")))?;
    let scale = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" => 1e3,
        "kib" => 1024.0,
        "m" | "mb" => 1e6,
        "mib" => 1024.0 * 1024.0,
        "g" | "gb" => 1e9,
        "gib" => 1024.0 * 1024.0 * 1024.0,
        "t" | "tb" => 1e12,
        other => {
            return Err(Error::invalid(format!(
                "'{spec}': unknown size unit '{other}' (use K, M, G, T, or KiB, MiB, GiB)"
            )))
        }
    };
    if !(value.is_finite() && value >= 0.0) {
        return Err(Error::invalid(format!("'{spec}' is not a size")));
    }
    Ok((value * scale) as u64)
}

/// Refuses `need` when it does not fit `limit` (the `--max-memory` value, else the memory
/// available now). With no limit known, lets the phase run.
pub fn check_memory(need: &MemoryNeed, limit: Option<u64>) -> Result<()> {
    let (limit, source) = match limit {
        Some(l) => (l, "allowed by --max-memory"),
        None => match available_memory() {
            Some(a) => (a, "available"),
            None => return Ok(()),
        },
    };
    if need.total() <= limit {
        return Ok(());
    }
    Err(Error::OutOfMemory {
        phase: need.phase,
        need: need.to_string(),
        available: format!("{} {source}", gb(limit)),
        lower_with: need.lower_with,
    })
}

/// Bytes of the float weights (and other initializers) a model hands to an engine.
pub fn initializer_bytes(model: &Model) -> u64 {
    model.graph.parameter_stats().1 as u64
}

/// An estimate of the activations alive at the peak of one model call: the largest
/// intermediate value, times four (an attention score matrix, its softmax, and the
/// tensors around them), plus the graph inputs. Values with symbolic batch dims count
/// `batch` for them.
pub fn activation_peak_bytes(model: &Model, batch: usize) -> u64 {
    let g = &model.graph;
    let bytes = |shape: &[Dim], bits: usize| -> u64 {
        let n: u64 = shape
            .iter()
            .map(|d| match d {
                Dim::Known(k) => (*k).max(0) as u64,
                _ => batch as u64,
            })
            .product();
        n * bits as u64 / 8
    };
    let largest = g
        .value_info
        .values()
        .filter_map(|v| Some(bytes(v.shape.as_ref()?, v.dtype?.bits().max(8))))
        .max()
        .unwrap_or(0);
    let inputs: u64 = g
        .inputs
        .iter()
        .filter_map(|v| Some(bytes(v.shape.as_ref()?, v.dtype?.bits().max(8))))
        .sum();
    4 * largest + inputs
}

/// How many generated trajectories and steps calibration runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CalibrationPlan {
    /// Batches of trajectories (each `batch` samples).
    pub batches: usize,
    pub steps: usize,
}

/// Fits calibration into `budget_s` seconds given one call's time: keeps the steps (each
/// step of S gets its own ranges) as long as one trajectory batch fits, dropping batches
/// first; then keeps as many evenly spread steps as fit (at least 2: the first and the
/// last). Returns the plan unchanged when it fits.
pub fn fit_calibration(wanted: CalibrationPlan, call_s: f64, budget_s: f64) -> CalibrationPlan {
    let calls = |p: CalibrationPlan| (p.batches * p.steps) as f64;
    if call_s <= 0.0 || calls(wanted) * call_s <= budget_s {
        return wanted;
    }
    let affordable = (budget_s / call_s).floor().max(0.0) as usize;
    if affordable >= wanted.steps {
        return CalibrationPlan {
            batches: (affordable / wanted.steps).clamp(1, wanted.batches),
            steps: wanted.steps,
        };
    }
    CalibrationPlan {
        batches: 1,
        steps: affordable.clamp(2.min(wanted.steps), wanted.steps),
    }
}

/// CPU seconds this process has run (user + system, every thread), where the platform
/// says.
pub fn cpu_seconds() -> Option<f64> {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::uninit();
    // SAFETY: getrusage writes the struct it is given and nothing else.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_SELF, usage.as_mut_ptr()) };
    if rc != 0 {
        return None;
    }
    // SAFETY: rc == 0: the call filled it.
    let u = unsafe { usage.assume_init() };
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
    Some(secs(u.ru_utime) + secs(u.ru_stime))
}

/// A clock of the work done rather than of the time passed, for the decisions that
/// skip costly trials (`--tcr auto`, `--output-qdq auto`, the held-out evaluation's
/// size): the process's CPU seconds since [`WorkClock::start`] over the threads it may
/// use ([`crate::numerics::threads::available`]), i.e. about the wall-clock seconds on this
/// machine with nothing else running. Wall-clock time grew 3–5× on a shared build
/// machine, so the same command wrote different files depending on the load (a trial
/// skipped "over 300 s"); CPU time barely moves with other processes' load. Where the
/// platform gives no CPU time, wall-clock seconds.
pub struct WorkClock {
    wall: std::time::Instant,
    cpu: Option<f64>,
}

impl WorkClock {
    pub fn start() -> WorkClock {
        WorkClock {
            wall: std::time::Instant::now(),
            cpu: cpu_seconds(),
        }
    }

    /// Work seconds since the start (see [`WorkClock`]).
    pub fn seconds(&self) -> f64 {
        match (self.cpu, cpu_seconds()) {
            (Some(start), Some(now)) => {
                (now - start).max(0.0) / crate::numerics::threads::available().max(1) as f64
            }
            _ => self.wall.elapsed().as_secs_f64(),
        }
    }
}

/// `12 min`, `45 s`, `1.5 h`: a duration for progress lines.
pub fn human_duration(seconds: f64) -> String {
    if seconds < 90.0 {
        format!("{seconds:.0} s")
    } else if seconds < 5400.0 {
        format!("{:.0} min", seconds / 60.0)
    } else {
        format!("{:.1} h", seconds / 3600.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_work_clock_counts_this_process_work() {
        // A fixed amount of work, not a time: whatever the machine's load (which is the
        // point of the clock), it adds CPU seconds. Nothing here compares with a clock.
        let clock = WorkClock::start();
        let before = cpu_seconds();
        let mut x = 0u64;
        for i in 0..300_000_000u64 {
            x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(i));
        }
        let worked = clock.seconds();
        assert!(worked.is_finite() && worked > 0.0, "{worked} ({x})");
        if let (Some(a), Some(b)) = (before, cpu_seconds()) {
            assert!(b > a, "CPU seconds did not advance: {a} -> {b}");
        }
    }

    #[test]
    fn sizes_parse_with_units() {
        assert_eq!(parse_size("8G").unwrap(), 8_000_000_000);
        assert_eq!(parse_size("512MiB").unwrap(), 512 << 20);
        assert_eq!(parse_size("1.5gb").unwrap(), 1_500_000_000);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert!(parse_size("lots").is_err());
        assert!(parse_size("3 parsecs").is_err());
    }

    #[test]
    fn a_need_over_the_limit_names_phase_estimate_and_option() {
        let need = MemoryNeed {
            phase: "calibrate",
            parts: vec![
                Part {
                    what: "float model in tract",
                    bytes: 3_400_000_000,
                },
                Part {
                    what: "activations",
                    bytes: 1_100_000_000,
                },
            ],
            lower_with: "--calib-batch 1",
        };
        assert!(check_memory(&need, Some(5_000_000_000)).is_ok());
        let e = check_memory(&need, Some(2_000_000_000))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("calibrate")
                && e.contains("4.50 GB")
                && e.contains("float model in tract 3.40 GB")
                && e.contains("2.00 GB allowed by --max-memory")
                && e.contains("--calib-batch 1"),
            "{e}"
        );
    }

    #[test]
    fn calibration_fits_the_budget_dropping_batches_then_steps() {
        let want = CalibrationPlan {
            batches: 4,
            steps: 50,
        };
        // Fits: unchanged.
        assert_eq!(fit_calibration(want, 0.01, 100.0), want);
        // Two batches' worth of calls.
        assert_eq!(
            fit_calibration(want, 1.0, 120.0),
            CalibrationPlan {
                batches: 2,
                steps: 50
            }
        );
        // Less than one trajectory: one batch, fewer steps.
        assert_eq!(
            fit_calibration(want, 60.0, 1200.0),
            CalibrationPlan {
                batches: 1,
                steps: 20
            }
        );
        // Never fewer than two steps.
        assert_eq!(fit_calibration(want, 1000.0, 10.0).steps, 2);
    }
}
