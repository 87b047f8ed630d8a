//! The runtime's int8 lowering: quantized convolutions of a tfmqc output run on the
//! project's int8 kernels inside tract and compute what the QDQ graph computes.

mod common;
use common::*;

#[test]
fn int8_lowering_matches_the_qdq_graph() {
    let dir = tmpdir();
    let q = dir.path().join("q.onnx");
    tfmqc_ok(&[
        model_path("ddpm_digits").to_str().unwrap(),
        "-o",
        q.to_str().unwrap(),
        "--calib-samples",
        "4",
        "--calib-steps",
        "10",
    ]);
    let x = example_inputs("ddpm_digits");
    let float_path = tfmqc_runtime::Engine::load(&q, None, tfmqc_runtime::Optimize::Full).unwrap();
    let (int8, lowered) =
        tfmqc_runtime::Engine::load_int8(&q, tfmqc_runtime::Optimize::Full).unwrap();
    assert!(lowered >= 20, "only {lowered} convolutions lowered");
    let a = tract_run_engine(&float_path, &x);
    let b = tract_run_engine(&int8, &x);
    let db = sqnr_db(&a, &b);
    eprintln!("{lowered} convs on int8 kernels; int8 vs QDQ-in-float: {db:.1} dB");
    // Exact integer products vs float products of the same dequantized values: only
    // float summation order differs (and the rare activation that lands on a rounding
    // tie after it).
    assert!(db > 60.0, "{db:.1} dB");
    let time = |e: &tfmqc_runtime::Engine| {
        let _ = tract_run_engine(e, &x);
        let t = std::time::Instant::now();
        for _ in 0..20 {
            let _ = tract_run_engine(e, &x);
        }
        t.elapsed().as_secs_f64() / 20.0 * 1e3
    };
    eprintln!(
        "step: QDQ in float {:.2} ms, int8 kernels {:.2} ms",
        time(&float_path),
        time(&int8)
    );
}

/// MatMul with int8 weights (unet2d_attn's projections) and the convolutions (guided_unet)
/// run on the int8 kernels and compute what the QDQ graph does,
/// on 1 and 2 threads alike.
#[test]
fn int8_gemm_lowering_matches_the_qdq_graph() {
    let dir = tmpdir();
    for (model, min_lowered) in [("unet2d_attn", 23 + 16), ("guided_unet", 33)] {
        let q = dir.path().join(format!("{model}.q.onnx"));
        tfmqc_ok(&[
            model_path(model).to_str().unwrap(),
            "-o",
            q.to_str().unwrap(),
            "--calib-samples",
            "2",
            "--calib-steps",
            "10",
        ]);
        // S = all training steps: the example inputs' time steps are in it.
        let x = example_inputs(model);
        let qdq = tfmqc_runtime::Engine::load(&q, None, tfmqc_runtime::Optimize::Full).unwrap();
        let (int8, lowered) =
            tfmqc_runtime::Engine::load_int8(&q, tfmqc_runtime::Optimize::Full).unwrap();
        assert!(
            lowered >= min_lowered,
            "{model}: only {lowered} nodes lowered"
        );
        let (resident, as_f32) = int8.int8_weight_bytes();
        // Issue #6's memory bar: weights resident as i8 (panel padding and f32 scales
        // included) take at most 0.3x of the float weights.
        assert!(
            resident > 0 && resident * 10 <= as_f32 * 3,
            "{model}: int8 weights resident {resident} B vs {as_f32} B as f32"
        );
        let a = tract_run_engine(&qdq, &x);
        let b = tract_run_engine(&int8, &x);
        let b2 = tfmqc_runtime::with_threads(2, || tract_run_engine(&int8, &x));
        assert_bit_exact("int8 on 1 vs 2 threads", &b, &b2);
        let db = sqnr_db(&a, &b);
        eprintln!("{model}: {lowered} nodes on int8 kernels; vs QDQ-in-float {db:.1} dB");
        // As for convolutions: exact integer products, only float summation order and
        // rare rounding ties differ from the QDQ graph.
        assert!(db > 40.0, "{model}: {db:.1} dB");
    }
}
