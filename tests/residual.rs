//! Residual `Add`s fused into the epilogue of the int8 convolution that produces one of
//! their operands (runtime/src/ops/residual.rs), checked bit for bit against the same
//! lowering without that fusion (tract's `Add` after the kernel's f32 output), node by
//! node on every fused node of real models and on whole models.

mod common;
use common::*;

use tfmqc_runtime::ops::residual::{self, RESIDUAL};

/// Every lowered node of `q` with a fused residual, run on what it reads in the model,
/// against the same cut lowered without the fusion; then the whole model both ways.
/// Returns (fused nodes, of which with an output pair too, of which adding one value
/// per channel plane, of which linear layers).
fn assert_residuals_exact(model: &str, q: &std::path::Path) -> (usize, usize, usize, usize) {
    let full = tfmqc_runtime::Optimize::Full;
    let x = example_inputs_at_ddim10(model);
    let (cuts, dir) = lowered_node_cuts(q, &x);
    let (mut fused, mut paired, mut planes, mut linear) = (0, 0, 0, 0);
    for cut in cuts {
        if !cut.lowered.attribute.iter().any(|a| a.name == RESIDUAL) {
            continue;
        }
        fused += 1;
        linear += (cut.lowered.op_type == tfmqc_runtime::ops::gemm::QGEMM) as usize;
        paired += tfmqc_runtime::ops::requant::output_pair(&cut.lowered).is_some() as usize;
        let lower =
            || tfmqc_runtime::Engine::from_proto_int8(&cut.model, dir.as_deref(), None, full);
        let (with, n) = lower().unwrap();
        assert_eq!(n, 1, "{model} {}: one int8 node", cut.out);
        let (without, _) = residual::unfused(lower).unwrap();
        let got = tract_run_engine(&with, &cut.feed);
        assert_bit_exact(
            &format!("{model} {}", cut.out),
            &tract_run_engine(&without, &cut.feed),
            &got,
        );
        // An addend smaller than the output: one value per channel plane (or a broadcast
        // added after the kernel).
        let size = |t: &tfmqc_passes::ir::Tensor| t.shape.iter().product::<usize>();
        let residual = cut.lowered.input.last().unwrap();
        planes += (size(&cut.feed[residual]) < size(&got[&cut.out])) as usize;
    }
    // The whole model: every fused Add at once, the same bits.
    let proto = tfmqc_runtime::engine::read_proto(q).unwrap();
    let dir = q.parent().map(|d| d.to_string_lossy().to_string());
    let lower = || tfmqc_runtime::Engine::from_proto_int8(&proto, dir.as_deref(), None, full);
    let (with, _) = lower().unwrap();
    let (without, _) = residual::unfused(lower).unwrap();
    assert_bit_exact(
        &format!("{model} whole"),
        &tract_run_engine(&without, &x),
        &tract_run_engine(&with, &x),
    );
    (fused, paired, planes, linear)
}

/// ddpm_digits with the default output pairs (`auto`), guided_unet with a pair on every
/// quantized Conv (`all`, TCR on: the pair, the channel factors and the residual in one
/// node), and digits_cond, whose transformer blocks add residuals after int8 linear
/// layers (`TfmqcQGemm`, fused only with `TFMQC_FUSE_RESIDUAL=all`).
#[test]
fn fused_residual_adds_match_the_unfused_lowering_exactly() {
    // The linear layers' fusion is opt-in (slower at SD scale, `gemm_enabled`); this
    // binary's only test checks it too. Set before anything lowers (read once).
    std::env::set_var("TFMQC_FUSE_RESIDUAL", "all");
    assert!(residual::gemm_enabled());
    // The float stem and head as direct loops (on by default, `conv_f32::enabled`) run
    // in both lowerings compared here, so the whole models below exercise them too.
    assert!(tfmqc_runtime::ops::conv_f32::enabled());
    let dir = tmpdir();
    for (model, pairs_on, at_least) in [
        ("ddpm_digits", "auto", 14),
        ("guided_unet", "all", 18),
        ("digits_cond", "auto", 1),
    ] {
        let q = dir.path().join(format!("{model}.{pairs_on}.q.onnx"));
        quantize_small(model, &q, "10", &["--output-qdq", pairs_on]);
        let (fused, paired, planes, linear) = assert_residuals_exact(model, &q);
        eprintln!(
            "{model} ({pairs_on}): {fused} residual Adds fused ({paired} with an output pair, \
             {planes} one value per channel plane, {linear} after linear layers), all \
             bit-exact, and the whole model"
        );
        assert!(
            fused >= at_least,
            "{model}: only {fused} residual Adds fused"
        );
        if pairs_on == "all" {
            assert!(paired > 0, "{model}: no residual fused with an output pair");
        }
        if model == "digits_cond" {
            assert!(
                linear > 0,
                "{model}: no residual fused after a linear layer"
            );
        }
    }
}
