//! Fusions into the int8 convolutions' quantizers (runtime/src/ops/requant.rs: an output
//! Q/DQ pair stored by the kernel's epilogue; runtime/src/ops/prescale.rs: TCR's per-channel
//! `Mul` before the input quantizer), checked exact against the unfused lowering on every
//! fused node of real models.

mod common;
use common::*;

use tfmqc_runtime::ops::residual::{self, RESIDUAL};
use tfmqc_runtime::ops::{prescale::A_PRESCALE, requant};

/// ONNX QuantizeLinear (round half to even, saturate to u8) then DequantizeLinear.
fn qdq(v: f32, scale: f32, zp: u8) -> f32 {
    let q = ((v / scale).round_ties_even() + zp as f32).clamp(0.0, 255.0);
    (q - zp as f32) * scale
}

/// Every node of `q` with a fused output pair or folded channel factors, run on what it
/// reads in the model, against the same node lowered with the fusions off
/// ([`requant::unfused`]: the int8 kernel with an f32 output, then tract's Mul /
/// QuantizeLinear / DequantizeLinear):
/// - channel factors only: bit-identical outputs (both quantize `x · r[c]` rounded to f32);
/// - an output pair: bit-identical to ONNX QuantizeLinear → DequantizeLinear of the
///   unfused node's f32 output, computed here (round half to even). tract's own
///   QuantizeLinear in the unfused graph rounds exact ties (`v / s = k + ½`) away from
///   zero, so it may differ from the fused node there only; those values are counted.
///
/// Returns (nodes with an output pair, nodes with channel factors, of which linear
/// layers (`TfmqcQGemm`), ties).
fn assert_fused_nodes_exact(model: &str, q: &std::path::Path) -> (usize, usize, usize, usize) {
    let full = tfmqc_runtime::Optimize::Full;
    // Time steps of the compiled set S (ddim:10: t = 100·k).
    let x = example_inputs_at_ddim10(model);
    let (cuts, dir) = lowered_node_cuts(q, &x);
    let (mut pairs, mut prescaled, mut linear, mut ties) = (0, 0, 0, 0);
    for cut in cuts {
        let pair = requant::output_pair(&cut.lowered);
        let pre = cut.lowered.attribute.iter().any(|a| a.name == A_PRESCALE);
        if pair.is_none() && !pre {
            continue;
        }
        linear += (pre && cut.lowered.op_type == "TfmqcQGemm") as usize;
        let (fused, _) =
            tfmqc_runtime::Engine::from_proto_int8(&cut.model, dir.as_deref(), None, full).unwrap();
        let fused = tract_run_engine(&fused, &cut.feed);
        let g = cut.model.graph.as_ref().unwrap();
        match pair {
            None => {
                prescaled += 1;
                let (plain, _) = requant::unfused(|| {
                    tfmqc_runtime::Engine::from_proto_int8(&cut.model, dir.as_deref(), None, full)
                })
                .unwrap();
                let want = tract_run_engine(&plain, &cut.feed);
                assert_bit_exact(&format!("{model} {}", cut.out), &want, &fused);
            }
            Some((scale, zp)) => {
                pairs += 1;
                prescaled += pre as usize;
                // With a fused residual the node writes the Add's output: the pair's
                // output is the Add's other operand, read here from the node with the
                // residual left to tract (tests/residual.rs checks that Add exact).
                let pair_out = match cut.lowered.attribute.iter().any(|a| a.name == RESIDUAL) {
                    false => cut.out.clone(),
                    true => {
                        let residual = cut.lowered.input.last().unwrap();
                        let add = g.node.iter().find(|n| n.output[0] == cut.out).unwrap();
                        add.input.iter().find(|i| *i != residual).unwrap().clone()
                    }
                };
                let (fused, _) = residual::unfused(|| {
                    tfmqc_runtime::Engine::from_proto_int8(
                        &cut.model,
                        dir.as_deref(),
                        Some(std::slice::from_ref(&pair_out)),
                        full,
                    )
                })
                .unwrap();
                let got = tract_run_engine(&fused, &cut.feed)[&pair_out]
                    .to_f32_vec()
                    .unwrap();
                // The unfused node's f32 output: what the pair's QuantizeLinear reads.
                let conv = g
                    .node
                    .iter()
                    .find(|n| n.op_type == "Conv" || n.op_type == "Gemm")
                    .unwrap();
                let names = vec![conv.output[0].clone(), pair_out.clone()];
                let (plain, _) = requant::unfused(|| {
                    tfmqc_runtime::Engine::from_proto_int8(
                        &cut.model,
                        dir.as_deref(),
                        Some(&names),
                        full,
                    )
                })
                .unwrap();
                let plain = tract_run_engine(&plain, &cut.feed);
                let raw = plain[&names[0]].to_f32_vec().unwrap();
                let tract_qdq = plain[&names[1]].to_f32_vec().unwrap();
                assert_eq!(raw.len(), got.len());
                for (i, (&v, &y)) in raw.iter().zip(&got).enumerate() {
                    let want = qdq(v, scale, zp);
                    assert!(
                        want.to_bits() == y.to_bits(),
                        "{model} {pair_out}[{i}]: fused {y} vs QuantizeLinear/DequantizeLinear of {v}: {want}"
                    );
                    if tract_qdq[i].to_bits() != y.to_bits() {
                        let t = v / scale;
                        assert_eq!(t - t.floor(), 0.5, "{model} {pair_out}[{i}]: not a tie");
                        ties += 1;
                    }
                }
            }
        }
    }
    (pairs, prescaled, linear, ties)
}

/// guided_unet with TCR (per-channel factors before most convolutions' quantizers) and an
/// output pair on every quantized Conv, and with the factors alone; ddpm_digits with the
/// pairs and without TCR. Per-step scales on (the default).
#[test]
fn fused_requantization_and_channel_factors_match_the_unfused_lowering_exactly() {
    let dir = tmpdir();
    for (model, tcr, pairs_on) in [
        ("guided_unet", "on", "all"),
        ("ddpm_digits", "off", "all"),
        // Channel factors alone (no output pair): bit-identical outputs.
        ("guided_unet", "on", "none"),
        // Factors before linear layers too (the transformer blocks' projections and
        // feed-forward: `Mul(x, r[K])` before a Gemm / MatMul).
        ("unet2d_cond", "on", "none"),
    ] {
        let q = dir.path().join(format!("{model}.{pairs_on}.q.onnx"));
        quantize_small(model, &q, "10", &["--output-qdq", pairs_on, "--tcr", tcr]);
        let (pairs, prescaled, linear, ties) = assert_fused_nodes_exact(model, &q);
        eprintln!(
            "{model}: {pairs} nodes with a fused output pair, {prescaled} with folded channel \
             factors ({linear} linear layers), all exact; {ties} exact ties where tract's \
             QuantizeLinear rounds away"
        );
        if model == "unet2d_cond" {
            assert!(
                linear >= 10,
                "{model}: only {linear} linear layers' factors folded"
            );
        }
        if pairs_on == "all" {
            assert!(pairs >= 20, "{model}: only {pairs} output pairs fused");
        }
        if tcr == "on" {
            assert!(
                prescaled >= 20,
                "{model}: only {prescaled} channel factors folded"
            );
        }
    }
}
