//! Inputs at any batch for the symbolic-batch models, and the check that an engine's plans
//! per batch give the generic plan's bits (tests/shape_plans*.rs).
#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::{Mutex, OnceLock};

use super::common::{example_inputs_at_ddim10, quantize_small, tmpdir};
use tfmqc_runtime::{Engine, Tensor};

/// `model` compiled once per test binary (`quantize_small`, S = ddim:10): the tests of a
/// binary share it.
pub fn quantized(model: &str) -> PathBuf {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    static MADE: Mutex<Vec<String>> = Mutex::new(vec![]);
    let q = DIR
        .get_or_init(tmpdir)
        .path()
        .join(format!("{model}.q.onnx"));
    let mut made = MADE.lock().unwrap_or_else(|e| e.into_inner());
    if !made.iter().any(|m| m == model) {
        quantize_small(model, &q, "10", &[]);
        made.push(model.to_string());
    }
    q
}

/// The models in models/ exported with a symbolic batch `N`.
pub const DYNBATCH_MODELS: [&str; 2] = ["unet2d_cond_dynbatch", "unet2d_attn_dynbatch"];

/// `model`'s example inputs (time steps in a `ddim:10` set) at `batch` rows, in `engine`'s
/// input order: the example's two rows cycled, the sample moved by 0.25 per cycle so no
/// two rows are equal. `cfg`: classifier-free guidance's doubled batch, the first half
/// unconditional (conditioning zero), the second the same rows conditioned.
pub fn batch_inputs(model: &str, engine: &Engine, batch: usize, cfg: bool) -> Vec<Tensor> {
    let example = example_inputs_at_ddim10(model);
    let half = if cfg { batch / 2 } else { batch };
    engine
        .input_names()
        .iter()
        .map(|name| {
            let t = tfmqc_passes::exec::to_tract(&example[name]).unwrap();
            let rows: Vec<Tensor> = (0..batch)
                .map(|i| {
                    let k = i % half;
                    let mut row = t.slice(0, k % 2, k % 2 + 1).unwrap();
                    if name == "sample" {
                        let step = 0.25 * (k / 2) as f32;
                        row.to_plain_array_view_mut::<f32>()
                            .unwrap()
                            .iter_mut()
                            .for_each(|v| *v += step);
                    }
                    if cfg && name == "encoder_hidden_states" && i < half {
                        row = Tensor::zero::<f32>(row.shape()).unwrap();
                    }
                    row
                })
                .collect();
            Tensor::stack_tensors(0, &rows).unwrap()
        })
        .collect()
}

pub fn assert_same_bits(what: &str, expected: &[Tensor], got: &[Tensor]) {
    assert_eq!(expected.len(), got.len(), "{what}: output count");
    for (i, (a, b)) in expected.iter().zip(got).enumerate() {
        assert_eq!(a.shape(), b.shape(), "{what}: output {i} shape");
        assert_eq!(a.datum_type(), b.datum_type(), "{what}: output {i} type");
        assert!(
            a.as_bytes() == b.as_bytes(),
            "{what}: output {i} differs from the generic plan's"
        );
    }
}

/// Runs `engine` at each batch (the last one as a CFG-doubled batch when even and above
/// 2) on its plan for that batch and on the generic plan: the same bits; one plan made
/// per batch, none failed.
pub fn assert_plans_match_generic(model: &str, label: &str, engine: &Engine, batches: &[usize]) {
    assert_plans_close_to_generic(model, label, engine, batches, 0.0)
}

/// The largest difference of two f32 outputs, relative to the largest magnitude of the
/// expected one.
pub fn max_relative_error(expected: &[Tensor], got: &[Tensor]) -> f32 {
    let mut worst = 0f32;
    for (a, b) in expected.iter().zip(got) {
        let a = a.to_plain_array_view::<f32>().unwrap();
        let b = b.to_plain_array_view::<f32>().unwrap();
        let scale = a
            .iter()
            .fold(0f32, |m, v| m.max(v.abs()))
            .max(f32::MIN_POSITIVE);
        let diff = a
            .iter()
            .zip(b.iter())
            .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        worst = worst.max(diff / scale);
    }
    worst
}

/// [`assert_plans_match_generic`] within `tolerance` (0: the same bits).
pub fn assert_plans_close_to_generic(
    model: &str,
    label: &str,
    engine: &Engine,
    batches: &[usize],
    tolerance: f32,
) {
    for &batch in batches {
        let cfg = batch > 2 && batch % 2 == 0;
        let x = batch_inputs(model, engine, batch, cfg);
        let got = engine.run(x.clone()).unwrap();
        assert_eq!(got[0].shape()[0], batch);
        let what = format!("{label} batch {batch}{}", if cfg { " (CFG)" } else { "" });
        let generic = engine.run_generic(x).unwrap();
        if tolerance == 0.0 {
            assert_same_bits(&what, &generic, &got);
        } else {
            let err = max_relative_error(&generic, &got);
            eprintln!("{what}: largest difference {err:.2e} of the largest output");
            assert!(err <= tolerance, "{what}: {err:.2e} > {tolerance:.0e}");
        }
    }
    let plans = engine.shape_plans();
    let mut made: Vec<i64> = plans.iter().map(|p| p.values[0].1).collect();
    made.sort();
    let want: Vec<i64> = batches.iter().map(|&b| b as i64).collect();
    assert_eq!(made, want, "{label}: {plans:?}");
    for p in &plans {
        assert_eq!(p.failure, None, "{model}: {p:?}");
        eprintln!(
            "{model}: plan for {:?} made in {:?}",
            p.values, p.build_time
        );
    }
}
