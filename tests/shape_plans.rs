//! Plans per concrete input shape (runtime/src/shape_plans.rs): a model exported with a
//! symbolic batch runs, for each batch the calls bring, a plan made for that batch, and
//! gives the same bits as the plan for the symbolic shapes. This binary keeps the default
//! policy (int8 engines only); tests/shape_plans_float.rs turns it on for float engines.

mod common;
use common::*;

mod shape_plans_common;
use shape_plans_common::*;

use tfmqc_runtime::{Engine, Optimize};

/// The int8 runtime on both symbolic-batch models: batch 1, 2 and the CFG-doubled 4
/// (unconditional rows first), each on its own plan, bit for bit the generic plan's.
#[test]
fn int8_plans_per_batch_match_the_generic_plan_bit_for_bit() {
    for model in DYNBATCH_MODELS {
        let q = quantized(model);
        let (engine, lowered) = Engine::load_int8(&q, Optimize::PerShape).unwrap();
        assert!(lowered > 0, "{model}: nothing on the int8 kernels");
        assert_plans_match_generic(model, &format!("{model} int8"), &engine, &[1, 2, 4]);
    }
}

/// Calls from two threads at once, each with its own batch, each made its own plan and
/// gets the generic plan's bits.
#[test]
fn int8_plans_are_made_and_used_from_several_threads() {
    let model = "unet2d_attn_dynbatch";
    let q = quantized(model);
    let (engine, _) = Engine::load_int8(&q, Optimize::PerShape).unwrap();
    std::thread::scope(|s| {
        for batch in [1, 3] {
            let engine = &engine;
            s.spawn(move || {
                for _ in 0..2 {
                    let x = batch_inputs(model, engine, batch, false);
                    let got = engine.run(x.clone()).unwrap();
                    assert_same_bits(
                        &format!("batch {batch}"),
                        &engine.run_generic(x).unwrap(),
                        &got,
                    );
                }
            });
        }
    });
    let mut made: Vec<i64> = engine.shape_plans().iter().map(|p| p.values[0].1).collect();
    made.sort();
    assert_eq!(made, [1, 3]);
}

/// At most four plans are kept, the least recently used one goes first.
#[test]
fn the_plan_cache_keeps_the_four_most_recently_used_batches() {
    let model = "unet2d_attn_dynbatch";
    let q = quantized(model);
    let (engine, _) = Engine::load_int8(&q, Optimize::PerShape).unwrap();
    let batches =
        |e: &Engine| -> Vec<i64> { e.shape_plans().iter().map(|p| p.values[0].1).collect() };
    for batch in [1, 2, 3, 4, 5] {
        engine
            .run(batch_inputs(model, &engine, batch, false))
            .unwrap();
    }
    assert_eq!(batches(&engine), [5, 4, 3, 2]);
    engine.run(batch_inputs(model, &engine, 3, false)).unwrap();
    assert_eq!(batches(&engine), [3, 5, 4, 2]);
    let plan = &engine.shape_plans()[0];
    assert_eq!(plan.values, [("N".to_string(), 3)]);
    assert_eq!(plan.failure, None);
}

/// The runtime's sampler with classifier-free guidance runs the model at twice the
/// batch: that batch gets its plan.
#[test]
fn a_guided_sampling_loop_runs_on_the_plan_for_the_doubled_batch() {
    let model = "unet2d_cond_dynbatch";
    let q = quantized(model);
    let denoiser = tfmqc_runtime::Denoiser::load(&q).unwrap();
    let cond = example_inputs(model)["encoder_hidden_states"].clone();
    let cond = tfmqc_passes::exec::to_tract(&cond).unwrap();
    let uncond = tfmqc_runtime::Tensor::zero::<f32>(cond.shape()).unwrap();
    let (cond, uncond) = (
        [("encoder_hidden_states", cond)],
        [("encoder_hidden_states", uncond)],
    );
    let guidance = tfmqc_runtime::Guidance {
        scale: 7.5,
        uncond: &uncond,
    };
    let images = denoiser
        .sample_with(
            3,
            10,
            &cond,
            2,
            tfmqc_runtime::Sampler::Ddim,
            Some(guidance),
            &mut |_, _| {},
        )
        .unwrap();
    assert!(images
        .to_plain_array_view::<f32>()
        .unwrap()
        .iter()
        .all(|v| v.is_finite()));
    let plans = denoiser.engine().shape_plans();
    assert_eq!(plans.len(), 1, "{plans:?}");
    assert_eq!(plans[0].values, [("N".to_string(), 4)]);
    assert_eq!(plans[0].failure, None);
}

/// A float model keeps its one plan by default (each plan would pack its float weights
/// again): no plans per batch, same results.
#[test]
fn float_engines_make_no_plans_per_batch_by_default() {
    let model = "unet2d_attn_dynbatch";
    let engine = Engine::load(&model_path(model), None, Optimize::PerShape).unwrap();
    let x = batch_inputs(model, &engine, 2, false);
    let got = engine.run(x.clone()).unwrap();
    assert_same_bits(model, &engine.run_generic(x).unwrap(), &got);
    assert!(engine.shape_plans().is_empty());
}

/// Inputs whose shapes do not give the batch (a wrong rank, two batches) fail as before,
/// with the generic plan's error, and make no plan.
#[test]
fn inputs_that_do_not_give_the_batch_fail_as_before_and_make_no_plan() {
    let model = "unet2d_attn_dynbatch";
    let q = quantized(model);
    let (engine, _) = Engine::load_int8(&q, Optimize::PerShape).unwrap();
    let mut flat = batch_inputs(model, &engine, 2, false);
    let shape = flat[0].shape().to_vec();
    flat[0] = flat[0]
        .slice(0, 0, 1)
        .unwrap()
        .into_shape(&shape[1..])
        .unwrap();
    let mut clash = batch_inputs(model, &engine, 2, false);
    clash[1] = batch_inputs(model, &engine, 3, false)[1].clone();
    for (what, x) in [("rank 3 sample", flat), ("batches 2 and 3", clash)] {
        let generic = engine.run_generic(x.clone()).unwrap_err().to_string();
        let err = engine.run(x).unwrap_err().to_string();
        assert_eq!(err, generic, "{what}");
    }
    assert!(engine.shape_plans().is_empty());
}
