//! Plans per concrete input shape for float engines (opt-in: `TFMQC_PLAN_PER_SHAPE=1`,
//! set here before any engine is built; read once per process): tract in float on both
//! symbolic-batch models and on their quantized files (QDQ run in float), batch 1, 2 and
//! the CFG-doubled 4. Not bit for bit: with a number for the batch, tract picks other
//! float matmul / conv kernels (another summation order) than with a symbol; the outputs
//! agree to float rounding (measured: see the test's stderr). That is one reason float
//! engines make no plans per shape by default.

mod common;
use common::*;

mod shape_plans_common;
use shape_plans_common::*;

use tfmqc_runtime::{Engine, Optimize};

#[test]
fn float_plans_per_batch_match_the_generic_plan_to_float_rounding() {
    std::env::set_var("TFMQC_PLAN_PER_SHAPE", "1");
    for model in DYNBATCH_MODELS {
        let q = quantized(model);
        for file in [model_path(model), q] {
            let engine = Engine::load(&file, None, Optimize::PerShape).unwrap();
            assert_plans_close_to_generic(
                model,
                &file.display().to_string(),
                &engine,
                &[1, 2, 4],
                1e-5,
            );
        }
    }
}
