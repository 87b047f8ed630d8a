//! TCAQ-DM's DAQ and PAR (`--daq`, `--par`, `--tcaq`): PAR's rounds are reproducible
//! with the same seed and reported per round; DAQ's log2 quantizer runs exactly in the
//! runtime against the QDQ graph; the command line reports DAQ's choice per layer.
//! Q-Diffusion's shortcut splitting (`split-concat`, on below 8-bit activations) keeps
//! the float function.

mod common;
use common::*;

use tfmqc_passes::exec::Runner;
use tfmqc_passes::pipeline::tcaq::{fake_quant_log2, replace_quantizer};
use tfmqc_runtime::Optimize;

fn report(path: &std::path::Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

/// Two compiles with `--par 2` and the same seed write the same bytes (activation-scale
/// reconstruction included); the report holds round 0 (before PAR) and both rounds, each
/// measured per step, and the round kept is the best of them.
#[test]
fn par_rounds_are_reproducible_with_the_same_seed() {
    let dir = tmpdir();
    let mut bytes = vec![];
    let mut reports = vec![];
    for k in 0..2 {
        let out = dir.path().join(format!("q{k}.onnx"));
        let rep = dir.path().join(format!("r{k}.json"));
        let run = quantize_small(
            "ddpm_digits",
            &out,
            "10",
            &[
                "--par",
                "2",
                "--weight-bits",
                "4",
                "--report",
                rep.to_str().unwrap(),
            ],
        );
        let stderr = String::from_utf8_lossy(&run.stderr);
        assert!(
            stderr.contains("PAR: mean output SQNR per round"),
            "{stderr}"
        );
        bytes.push(std::fs::read(&out).unwrap());
        reports.push(report(&rep));
    }
    assert!(
        bytes[0] == bytes[1],
        "PAR with the same seed gave different files"
    );
    let t = &reports[0]["tcaq"];
    let rounds = t["par"].as_array().expect("par rounds");
    assert_eq!(rounds.len(), 3, "{t}");
    let means: Vec<f64> = rounds
        .iter()
        .map(|r| r["sqnr_mean_db"].as_f64().unwrap())
        .collect();
    assert!(rounds
        .iter()
        .all(|r| !r["per_step"].as_array().unwrap().is_empty()));
    // The rounds recalibrated on other trajectories: their models differ from round 0's.
    assert!(means[1] != means[0], "{means:?}");
    // Each round rounded the weights against the previous round's quantized layer inputs
    // (sampled next to the float ones at the same positions).
    // Each round also reconstructed the activation scales against their readers' output
    // error on those inputs: never worse than the calibrated scales on the data it fits.
    for r in &rounds[1..] {
        assert!(r["aligned_layers"].as_u64().unwrap() > 0, "{r}");
        let sq = r["act_output_sqnr_db"].as_array().expect("searched");
        let (before, after) = (sq[0].as_f64().unwrap(), sq[1].as_f64().unwrap());
        assert!(before.is_finite() && after >= before, "{r}");
    }
    assert!(rounds[0]["act_output_sqnr_db"].is_null());
    assert_eq!(rounds[0]["aligned_layers"], 0);
    let kept = t["par_kept"].as_u64().unwrap() as usize;
    let best = means.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    assert_eq!(means[kept], best, "{means:?}, kept {kept}");
    // The round is chosen on held-out sets of PAR's own seeds, not on the trajectory the
    // summary then measures (which would choose and measure on the same images).
    let chosen_on = t["evaluated_on"].as_str().unwrap();
    assert!(chosen_on.starts_with("4 sets of"), "{chosen_on}");
    assert_ne!(reports[0]["evaluated_on"].as_str().unwrap(), chosen_on);
    let summary = reports[0]["output_sqnr_mean_db"].as_f64().unwrap();
    assert!(summary.is_finite() && summary > 0.0, "{summary}");
}

/// DAQ's logarithmic quantizers of the trained DDPM's post-softmax activation, in the QDQ
/// file: the runtime (int8 kernels; the log ops run as tract's, the attention unfused)
/// and tract on the plain QDQ graph give bit-identical codes and dequantized values (P
/// and the output agree to float rounding); every code is an integer in [0, 2^b − 1]
/// with p̂ = s·2^(−q/k) (exactly for log2), equal to the reference quantizer's
/// (`fake_quant_log2`) except where −k·log2(p/s) lies within 1e-4 of a rounding
/// boundary (the graph computes log2 as ln / ln 2).
#[test]
fn daq_log2_is_exact_in_the_runtime_against_the_qdq_graph() {
    check_log_quantizer(1);
}

#[test]
fn daq_log_sqrt2_is_exact_in_the_runtime_against_the_qdq_graph() {
    check_log_quantizer(2);
}

fn check_log_quantizer(k: u32) {
    // The quantized model as the passes name it (the written file's short names would
    // hide quantize's Q/DQ of P from `replace_quantizer`, which finds it by name).
    use tfmqc_passes::pipeline::{default_pipeline, parse_pipeline, run_pipeline, PassContext};
    let options = tfmqc_passes::Options {
        timesteps: Some("ddim:10".into()),
        calib_samples: 2,
        calib_steps: Some(10),
        tcr: tfmqc_passes::options::Tcr::Off,
        step_groups: tfmqc_passes::options::StepGroups::Fixed(1),
        ..Default::default()
    };
    let float = tfmqc_passes::onnx::load(&model_path("ddpm_digits")).unwrap();
    let mut cx = PassContext::new(float, &options);
    let passes = parse_pipeline(&default_pipeline().join(",")).unwrap();
    let mut quantized = None;
    run_pipeline(&mut cx, &passes, &mut |name, cx, _| {
        if name == "quantize" {
            quantized = Some(cx.model.clone());
        }
        Ok(())
    })
    .unwrap();
    let mut model = quantized.expect("quantize ran");
    let p = "/mid_attn/Softmax_output_0";
    let (scale, bits) = (0.75f32, 4);
    let dq = replace_quantizer(&mut model.graph, p, scale, bits, k).unwrap();
    let codes = "mid_attn/Softmax_output_0_log2_codes".to_string();
    model.graph.remove_dead();
    let out = model.graph.outputs[0].name.clone();
    let names = vec![out, p.to_string(), codes, dq];
    let mut x = example_inputs("ddpm_digits");
    // Steps of S (ddim:10): the quantized model's tables know no other.
    x.insert(
        "timestep".into(),
        tfmqc_passes::Tensor::from_vec(vec![2], &[100i64, 500]),
    );
    let inputs = x.clone().into_iter().collect();
    let plain = Runner::new(&model, Some(&names), Optimize::Full)
        .unwrap()
        .run(&inputs)
        .unwrap();
    let int8 = Runner::int8(&model, Some(&names), Optimize::Full)
        .unwrap()
        .run(&inputs)
        .unwrap();
    let values = |k: usize| {
        (
            plain[k].to_f32_vec().unwrap(),
            int8[k].to_f32_vec().unwrap(),
        )
    };
    // P itself: the int8 kernels dequantize the score product in their own summation
    // order, so P (and the output) agree to float rounding, not bit for bit.
    // The output too, but for a code that P's rounding moves across a near-tie (below):
    // one level of one probability (log√2 on this input: 6e-3 at most).
    for (i, tol) in [(0, 1e-2), (1, 1e-5)] {
        let (a, b) = values(i);
        let err = a
            .iter()
            .zip(&b)
            .map(|(u, v)| (u - v).abs())
            .fold(0f32, f32::max);
        assert!(err <= tol, "{}: max |Δ| {err:e}", names[i]);
    }
    // The codes and p̂: bit-identical, except (allowed, none seen on this input) a code
    // one apart where P's rounding difference crosses a boundary of −log2(p/s).
    let (probs, _) = values(1);
    for k in [2, 3] {
        let (a, b) = values(k);
        for (i, (u, v)) in a.iter().zip(&b).enumerate() {
            if u.to_bits() != v.to_bits() {
                let e = -(k as f32) * (probs[i] / scale).log2();
                assert!(
                    (e.fract() - 0.5).abs() < 1e-4,
                    "{}[{i}]: {u} vs {v} at p = {}",
                    names[k],
                    probs[i]
                );
            }
        }
    }
    let (probs, codes, deq) = (
        plain[1].to_f32_vec().unwrap(),
        plain[2].to_f32_vec().unwrap(),
        plain[3].to_f32_vec().unwrap(),
    );
    let levels = ((1u32 << bits) - 1) as f32;
    let mut ties = 0;
    let mut seen = std::collections::BTreeSet::new();
    for ((&p, &c), &d) in probs.iter().zip(&codes).zip(&deq) {
        assert!(c.fract() == 0.0 && (0.0..=levels).contains(&c), "code {c}");
        // log2: powers of two, exact; log√2: tract's Pow against Rust's exp2.
        let close = |a: f32, b: f32| {
            if k == 1 {
                a == b
            } else {
                (a - b).abs() <= 1e-6 * b
            }
        };
        let level = scale * (-c / k as f32).exp2();
        assert!(close(d, level), "p̂ {d} of code {c}, want {level}");
        seen.insert(c as i32);
        let e = -(k as f32) * (p / scale).log2();
        if p > 0.0 && (e.fract() - 0.5).abs() < 1e-4 {
            ties += 1;
            continue;
        }
        let want = fake_quant_log2(p, scale, bits, k);
        assert!(close(d, want), "p = {p}: {d}, want {want}");
    }
    assert!(seen.len() >= 4, "codes used: {seen:?}");
    assert!(
        ties * 1000 <= probs.len(),
        "{ties} near-ties of {}",
        probs.len()
    );
}

/// `--daq on` measures every post-softmax activation both ways and says its choice per
/// layer, in the summary and the report; `--tcaq on` turns DAQ and PAR on with TCR.
#[test]
fn daq_reports_its_choice_per_layer_and_tcaq_switches_all_three() {
    let dir = tmpdir();
    let out = dir.path().join("q.onnx");
    let rep = dir.path().join("r.json");
    let run = quantize_small(
        "ddpm_digits",
        &out,
        "10",
        // 4 bits: quantize clips P before its Q/DQ, which DAQ replaces too.
        &[
            "--tcaq",
            "on",
            "--weight-bits",
            "4",
            "--act-bits",
            "4",
            "--report",
            rep.to_str().unwrap(),
        ],
    );
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(stderr.contains("DAQ: "), "{stderr}");
    assert!(
        stderr.contains("/mid_attn/Softmax_output_0: uniform"),
        "{stderr}"
    );
    assert!(stderr.contains("PAR: "), "{stderr}");
    let r = report(&rep);
    assert_eq!(r["options"]["daq"], "on");
    assert_eq!(r["options"]["par"], 1);
    assert_eq!(r["options"]["tcr"], "on");
    let daq = r["tcaq"]["daq"].as_array().unwrap();
    assert_eq!(daq.len(), 1, "{daq:?}");
    let c = &daq[0];
    let db = |k: &str| c[k].as_f64().unwrap();
    assert_eq!(
        c["log2"].as_bool().unwrap(),
        db("log2_db").max(db("log_sqrt2_db")) > db("uniform_db")
    );
    // The output has the log2 ops exactly when DAQ chose log2.
    let m = tfmqc_passes::onnx::load(&out).unwrap();
    let has_log = m
        .graph
        .node_indices()
        .any(|ix| m.graph.node(ix).is_onnx_op("Log"));
    assert_eq!(has_log, c["log2"].as_bool().unwrap());
}

/// `--help` documents the three switches and what `--tcaq` sets.
#[test]
fn help_documents_daq_par_and_tcaq() {
    let out = tfmqc_ok(&["--help"]);
    let text = String::from_utf8_lossy(&out.stdout);
    for word in [
        "--daq <on|off|auto>",
        "--par <ROUNDS>",
        "--tcaq <on|off|auto>",
        "--tcr on --tcr-alpha auto --daq on --par 1",
        "log2",
    ] {
        assert!(text.contains(word), "{word} in --help:\n{text}");
    }
}

/// `split-concat` rewrites each Conv reading a channel Concat into one Conv per part
/// summed by Adds: on every denoiser in models/ the outputs stay within 1e-5 of the
/// float model's (max |Δ| relative to max |y|); ddpm_digits' three up-block skip convs
/// are the ones split, and a `--keep-float` pattern leaves its Conv whole.
#[test]
fn split_concat_keeps_the_float_function() {
    use tfmqc_passes::split_concat::split_concat_convs;
    let run = |model: &tfmqc_passes::Model, inputs: &Tensors| -> Tensors {
        let names: Vec<String> = model.graph.outputs.iter().map(|o| o.name.clone()).collect();
        let out = Runner::new(model, None, Optimize::Full)
            .unwrap()
            .run(&inputs.clone().into_iter().collect())
            .unwrap();
        names.into_iter().zip(out).collect()
    };
    for name in denoisers() {
        // Typed and canonicalized, as the pipeline has it when split-concat runs: the
        // Concat inputs' shapes are known. (Not through `run_pipeline`, whose last step
        // drops the types the compiler inferred from what it writes.)
        let mut model = tfmqc_passes::onnx::load(&model_path(&name)).unwrap();
        tfmqc_passes::canonicalize::infer_types(&mut model).unwrap();
        tfmqc_passes::canonicalize::canonicalize(&mut model).unwrap();
        let x = example_inputs(&name);
        let mut split = model.clone();
        let done = split_concat_convs(&mut split.graph, &[]).unwrap();
        split.graph.validate().unwrap();
        if name == "ddpm_digits" {
            let mut sorted = done.clone();
            sorted.sort();
            assert_eq!(
                sorted,
                ["/up1/skip/Conv", "/up2/skip/Conv", "/up3/skip/Conv"],
                "{name}"
            );
            let mut kept = model.clone();
            let some = split_concat_convs(&mut kept.graph, &["/up1/skip".to_string()]).unwrap();
            assert_eq!(some.len(), 2);
        }
        if done.is_empty() {
            continue;
        }
        let err = relative_error(&run(&model, &x), &run(&split, &x));
        eprintln!(
            "{name}: {} Convs split, relative error {err:.2e}",
            done.len()
        );
        assert!(err <= 1e-5, "{name}: relative error {err:.2e}");
    }
}
