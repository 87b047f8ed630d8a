//! What `tfmqc bench` measures and prints, as types: the line an engine's process
//! prints (the worker's, or scripts/bench_ort.py's), one run per engine, the ratios
//! against tract-float, and the `--json` object (the schema `tfmqc bench --help`
//! describes), plus the human tables on stderr.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::ENGINES;

/// Time of one op kind per profiled step.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct OpTime {
    pub op: String,
    /// Nodes of this kind in the model.
    pub nodes: usize,
    pub ms: f64,
}

/// Initializer bytes of a file by kind: float (f16/f32/f64/bf16), int8 (8 bits and
/// less), other.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq)]
pub struct WeightBytes {
    pub float: usize,
    pub int8: usize,
    pub other: usize,
    /// The same bytes by what the tensors are (as `tfmqc --report`'s `bytes_by_kind`):
    /// integer weights, float tensors, time-step tables, per-step scale tables, other.
    pub by_kind: crate::report::BytesByKind,
}

impl WeightBytes {
    /// The weights proper (float and int8; `other` is index and shape tensors).
    pub fn total(&self) -> usize {
        self.float + self.int8
    }
}

/// Bytes the runtime's int8 nodes hold (packed, with scales and biases) and the same
/// weights in f32.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq)]
pub struct Int8Weights {
    pub resident: usize,
    pub f32: usize,
}

/// The timing and memory numbers every engine's process prints (scripts/bench_ort.py's
/// whole line).
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct Timing {
    /// Untimed calls before the timed ones.
    pub warmup: usize,
    /// Timed calls.
    pub runs: usize,
    /// Their median.
    pub step_ms: f64,
    pub step_ms_min: f64,
    pub loop_runs: usize,
    /// Median of the sampling loops; null when none ran.
    pub loop_ms: Option<f64>,
    /// VmHWM of the engine's own process.
    pub peak_rss_mb: Option<f64>,
    /// VmRSS before loading (the binary or interpreter).
    pub base_rss_mb: Option<f64>,
    /// Anonymous RSS the loaded model holds (after loading, free heap released, minus
    /// before).
    pub load_rss_mb: Option<f64>,
    pub load_s: f64,
}

/// What one engine measured on one file.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct Measured {
    pub batch: usize,
    pub t: i64,
    /// Steps of the sampling loop.
    pub steps: usize,
    #[serde(flatten)]
    pub timing: Timing,
    /// Nodes on the runtime's int8 ops; null for onnxruntime.
    pub int8_ops: Option<usize>,
    pub int8_weights: Option<Int8Weights>,
    /// Bytes the runtime holds after loading, by kind of tensor; null for onnxruntime.
    #[serde(default)]
    pub resident_by_kind: Option<ResidentByKind>,
    /// Time per op kind (tract runs under `--profile` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub profile: Option<Vec<OpTime>>,
}

impl Measured {
    /// An onnxruntime engine's result: the batch, t and steps are those of the tract
    /// run whose inputs it repeated; it runs no int8 op of ours.
    pub fn of_ort(timing: Timing, plan: &Plan) -> Measured {
        Measured {
            batch: plan.batch,
            t: plan.t,
            steps: plan.steps,
            timing,
            int8_ops: None,
            int8_weights: None,
            resident_by_kind: None,
            profile: None,
        }
    }
}

/// Bytes the runtime's planned model holds by kind of tensor
/// ([`tfmqc_runtime::engine::ResidentBytes`]): the int8 nodes' packed weights (with
/// scales, biases and per-step scale tables), the time-step tables, the per-step scale
/// tables left as constants, every other constant (biases, shapes, weights of ops tract
/// did not pack into its float kernels).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq)]
pub struct ResidentByKind {
    pub int8_weights: usize,
    pub tables: usize,
    pub scale_tables: usize,
    pub other: usize,
}

impl From<tfmqc_runtime::engine::ResidentBytes> for ResidentByKind {
    fn from(r: tfmqc_runtime::engine::ResidentBytes) -> ResidentByKind {
        ResidentByKind {
            int8_weights: r.int8_weights,
            tables: r.tables,
            scale_tables: r.scale_tables,
            other: r.other,
        }
    }
}

/// The inputs of a tract run, which the onnxruntime engines repeat on the same files.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct PlanInputs {
    pub sample_input: String,
    pub x_shape: [usize; 4],
    pub timestep_input: String,
    /// numpy's name of the time step's dtype.
    pub t_dtype: String,
    pub t_shape: Vec<usize>,
    pub trajectory: Vec<i64>,
    /// ᾱ at each step of the trajectory.
    pub alphas_cumprod: Vec<f64>,
}

/// [`PlanInputs`] with the batch, t and step count of the run that made them.
#[derive(Serialize, Clone, Debug)]
pub struct Plan {
    #[serde(flatten)]
    pub inputs: PlanInputs,
    pub batch: usize,
    pub t: i64,
    pub steps: usize,
}

/// The line a tract worker prints.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct WorkerOutput {
    #[serde(flatten)]
    pub measured: Measured,
    pub plan: PlanInputs,
}

/// One engine on one file at one thread count.
#[derive(Serialize, Clone, Debug)]
pub struct Run {
    pub engine: String,
    pub model: String,
    pub file: PathBuf,
    pub threads: usize,
    #[serde(flatten)]
    pub measured: Measured,
    pub weight_bytes: WeightBytes,
}

/// A run against tract-float of the same model and thread count.
#[derive(Serialize, Clone, Debug, PartialEq)]
pub struct Ratio {
    pub engine: String,
    pub model: String,
    pub threads: usize,
    /// Float time / engine time.
    pub step_speedup: Option<f64>,
    pub loop_speedup: Option<f64>,
    /// Engine / float.
    pub peak_rss_ratio: Option<f64>,
    pub load_rss_ratio: Option<f64>,
    pub weight_bytes_ratio: Option<f64>,
}

/// An engine run that failed.
#[derive(Serialize, Clone, Debug)]
pub struct Failed {
    pub engine: String,
    pub model: String,
    pub file: PathBuf,
    pub threads: usize,
    pub reason: String,
}

/// An engine not run, and why.
#[derive(Serialize, Clone, Debug)]
pub struct Skipped {
    pub engine: String,
    pub reason: String,
}

/// The machine the numbers are from.
#[derive(Serialize, Clone, Debug)]
pub struct Machine {
    pub cpu: String,
    pub arch: &'static str,
    pub avx2: bool,
    /// The int8 kernels the runtime runs here (TFMQC_INT8_BACKEND may cap them).
    pub int8_backend: &'static str,
    pub cores: usize,
}

/// The `--json` object.
#[derive(Serialize, Debug)]
pub struct BenchReport<'a> {
    pub machine: Machine,
    pub steps: usize,
    /// --runs, null when adaptive.
    pub runs_per_step: Option<usize>,
    pub budget_s: f64,
    pub runs: &'a [Run],
    pub ratios: Vec<Ratio>,
    pub skipped: &'a [Skipped],
    pub failed: &'a [Failed],
}

pub fn machine() -> Machine {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string());
    #[cfg(target_arch = "x86_64")]
    let avx2 = std::arch::is_x86_feature_detected!("avx2");
    #[cfg(not(target_arch = "x86_64"))]
    let avx2 = false;
    Machine {
        cpu,
        arch: std::env::consts::ARCH,
        avx2,
        int8_backend: tfmqc_runtime::kernels::int8::Backend::detect().name(),
        cores: std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
    }
}

fn ratio(num: Option<f64>, den: Option<f64>) -> Option<f64> {
    match (num, den) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    }
}

/// Each run against tract-float of the same model and thread count.
pub fn ratios(runs: &[Run]) -> Vec<Ratio> {
    let mut out = vec![];
    for r in runs.iter().filter(|r| r.engine != ENGINES[0]) {
        let Some(f) = runs
            .iter()
            .find(|f| f.engine == ENGINES[0] && f.model == r.model && f.threads == r.threads)
        else {
            continue;
        };
        let (rm, fm) = (&r.measured.timing, &f.measured.timing);
        out.push(Ratio {
            engine: r.engine.clone(),
            model: r.model.clone(),
            threads: r.threads,
            step_speedup: ratio(Some(fm.step_ms), Some(rm.step_ms)),
            loop_speedup: ratio(fm.loop_ms, rm.loop_ms),
            peak_rss_ratio: ratio(rm.peak_rss_mb, fm.peak_rss_mb),
            load_rss_ratio: ratio(rm.load_rss_mb, fm.load_rss_mb),
            weight_bytes_ratio: ratio(
                Some(r.weight_bytes.total() as f64),
                Some(f.weight_bytes.total() as f64),
            ),
        });
    }
    out
}

/// Per tract run, its `top` op kinds by time per step.
pub fn profile_table(runs: &[Run], top: usize) -> String {
    let mut s = String::new();
    for r in runs {
        let Some(ops) = &r.measured.profile else {
            continue;
        };
        let total: f64 = ops.iter().map(|o| o.ms).sum();
        s += &format!(
            "\nprofile: {} on {}, {} thread(s): {total:.2} ms in nodes per step\n",
            r.engine, r.model, r.threads
        );
        for o in ops.iter().take(top) {
            s += &format!(
                "  {:>8.3} ms {:>5.1}% {:>4} × {}\n",
                o.ms,
                100.0 * o.ms / total.max(1e-12),
                o.nodes,
                o.op
            );
        }
    }
    s
}

/// The human table: one line per run, ratios against tract-float of the same model and
/// thread count (speed-ups: float time / time; memory: engine / float).
pub fn table(runs: &[Run]) -> String {
    let ratios = ratios(runs);
    let num = |v: Option<f64>, prec: usize| match v {
        Some(x) => format!("{x:.prec$}"),
        None => "-".into(),
    };
    let mut s = format!(
        "{:<22} {:<12} {:>3} {:>9} {:>6} {:>9} {:>6} {:>8} {:>6} {:>8} {:>6} {:>10} {:>6}\n",
        "model",
        "engine",
        "thr",
        "step ms",
        "×",
        "loop ms",
        "×",
        "peak MB",
        "ratio",
        "load MB",
        "ratio",
        "weights MB",
        "ratio"
    );
    for r in runs {
        let q = ratios
            .iter()
            .find(|q| q.engine == r.engine && q.model == r.model && q.threads == r.threads);
        let get = |k: fn(&Ratio) -> Option<f64>| -> Option<f64> {
            match q {
                Some(q) => k(q),
                None if r.engine == ENGINES[0] => Some(1.0),
                None => None,
            }
        };
        let m = &r.measured.timing;
        let weights_mb = r.weight_bytes.total() as f64 / 1048576.0;
        s += &format!(
            "{:<22} {:<12} {:>3} {:>9} {:>6} {:>9} {:>6} {:>8} {:>6} {:>8} {:>6} {:>10} {:>6}\n",
            r.model,
            r.engine,
            r.threads,
            num(Some(m.step_ms), 2),
            num(get(|q| q.step_speedup), 2),
            num(m.loop_ms, 1),
            num(get(|q| q.loop_speedup), 2),
            num(m.peak_rss_mb, 1),
            num(get(|q| q.peak_rss_ratio), 2),
            num(m.load_rss_mb, 1),
            num(get(|q| q.load_rss_ratio), 2),
            format!("{weights_mb:.2}"),
            num(get(|q| q.weight_bytes_ratio), 2),
        );
    }
    s += "× = tract-float time / time (higher is faster); ratio = memory / tract-float's (lower is smaller)\n";
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(engine: &str, step_ms: f64, loop_ms: Option<f64>, float_bytes: usize) -> Run {
        Run {
            engine: engine.into(),
            model: "m".into(),
            file: "m.onnx".into(),
            threads: 1,
            measured: Measured {
                batch: 1,
                t: 500,
                steps: 10,
                timing: Timing {
                    warmup: 3,
                    runs: 5,
                    step_ms,
                    step_ms_min: step_ms,
                    loop_runs: loop_ms.is_some() as usize,
                    loop_ms,
                    peak_rss_mb: Some(100.0),
                    base_rss_mb: None,
                    load_rss_mb: None,
                    load_s: 0.1,
                },
                int8_ops: None,
                int8_weights: None,
                resident_by_kind: None,
                profile: None,
            },
            weight_bytes: WeightBytes {
                float: float_bytes,
                int8: 0,
                other: 8,
                by_kind: Default::default(),
            },
        }
    }

    #[test]
    fn ratios_are_against_tract_float_and_null_where_a_side_is_missing() {
        let runs = [
            run("tract-float", 4.0, Some(40.0), 400),
            run("tfmqc-int8", 2.0, None, 100),
        ];
        let r = ratios(&runs);
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].engine, "tfmqc-int8");
        assert_eq!(r[0].step_speedup, Some(2.0));
        assert_eq!(r[0].loop_speedup, None);
        assert_eq!(r[0].peak_rss_ratio, Some(1.0));
        assert_eq!(r[0].load_rss_ratio, None);
        assert_eq!(r[0].weight_bytes_ratio, Some(0.25));
        let v = serde_json::to_value(&r[0]).unwrap();
        assert!(v["loop_speedup"].is_null());
        // A run's JSON is flat: the measured numbers beside engine, model and file; no
        // profile unless one was taken.
        let v = serde_json::to_value(&runs[1]).unwrap();
        assert_eq!(v["step_ms"], 2.0);
        assert_eq!(v["weight_bytes"]["float"], 100);
        assert!(v["int8_ops"].is_null() && v.get("profile").is_none());
        let t = table(&runs);
        assert!(t.contains("tfmqc-int8") && t.contains("2.00"), "{t}");
    }
}
