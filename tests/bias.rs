//! A linear layer's bias `Add` (`MatMul` then `Add` of a constant `[N]`, how PyTorch
//! exports `nn.Linear`) taken into the lowered `TfmqcQGemm` (runtime/src/lower/bias.rs),
//! checked bit for bit against the lowering without it (the kernel's f32 output, then
//! tract's `Add`), node by node on a real model's transformer blocks and on the whole
//! model.

mod common;
use common::*;

use tfmqc_runtime::lower::bias;

#[test]
fn linear_biases_fused_into_the_int8_gemm_match_the_unfused_lowering_exactly() {
    let full = tfmqc_runtime::Optimize::Full;
    let dir = tmpdir();
    let model = "digits_cond";
    let q = dir.path().join(format!("{model}.q.onnx"));
    quantize_small(model, &q, "10", &[]);
    let proto = tfmqc_runtime::engine::read_proto(&q).unwrap();
    let graph = proto.graph.as_ref().unwrap();
    // The Adds of a bias after a MatMul in the compiled file: what the lowering takes in.
    let bias_adds: Vec<String> = graph
        .node
        .iter()
        .filter(|n| n.op_type == "Add")
        .filter(|add| {
            add.input.iter().any(|i| {
                graph
                    .node
                    .iter()
                    .any(|p| p.op_type == "MatMul" && p.output[0] == *i)
            }) && add.input.iter().any(|i| {
                graph
                    .initializer
                    .iter()
                    .any(|t| t.name == *i && t.dims.len() == 1)
            })
        })
        .map(|add| add.output[0].clone())
        .collect();
    assert!(
        bias_adds.len() >= 8,
        "{model}: {} MatMul + bias Adds in the compiled file",
        bias_adds.len()
    );
    let x = example_inputs_at_ddim10(model);
    let (cuts, data_dir) = lowered_node_cuts(&q, &x);
    let mut fused = 0;
    for cut in cuts {
        // A node with the bias fused writes the Add's output (or, with an output pair or
        // a residual fused after it, a later one: the whole model below covers those).
        if !bias_adds.contains(&cut.out) {
            continue;
        }
        assert_eq!(cut.op, "TfmqcQGemm", "{model} {}", cut.out);
        assert!(
            cut.lowered.attribute.iter().any(|a| a.name == "bias"),
            "{model} {}: no bias attribute",
            cut.out
        );
        fused += 1;
        let lower =
            || tfmqc_runtime::Engine::from_proto_int8(&cut.model, data_dir.as_deref(), None, full);
        let (with, n) = lower().unwrap();
        assert_eq!(n, 1, "{model} {}: one int8 node", cut.out);
        let (without, n) = bias::unfused(lower).unwrap();
        assert_eq!(n, 1, "{model} {}: one int8 node unfused", cut.out);
        assert_bit_exact(
            &format!("{model} {}", cut.out),
            &tract_run_engine(&without, &cut.feed),
            &tract_run_engine(&with, &cut.feed),
        );
    }
    eprintln!(
        "{model}: {fused} of {} linear biases fused, each bit-exact",
        bias_adds.len()
    );
    assert!(fused >= 8, "{model}: only {fused} biases fused");
    // The whole model: every fused bias at once, the same bits.
    let lower = || tfmqc_runtime::Engine::from_proto_int8(&proto, data_dir.as_deref(), None, full);
    let (with, _) = lower().unwrap();
    let (without, _) = bias::unfused(lower).unwrap();
    assert_bit_exact(
        &format!("{model} whole"),
        &tract_run_engine(&without, &x),
        &tract_run_engine(&with, &x),
    );
}
