//! The SD-1.5 topology at CI size (models/sd_tiny: cross-attention over 77 tokens, the
//! up-block concats, weights in an ONNX external-data file): its quantized form keeps
//! its weights in a `.data` file beside it, onnx.checker and onnxruntime accept it, and
//! the runtime loads it through that file's memory map, computing what the QDQ graph
//! computes.

mod common;
use common::*;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// sd_tiny quantized once for every test of this file (each reads it only).
fn quantized() -> &'static Path {
    static Q: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    let (_, q) = Q.get_or_init(|| {
        let dir = tmpdir();
        let q = dir.path().join("sd_tiny.q.onnx");
        // Quick: speed and fidelity of the lowering do not depend on the calibration.
        // Every t (the example inputs' t need not be one a sampler visits).
        tfmqc_ok(&[
            model_path("sd_tiny").to_str().unwrap(),
            "-o",
            q.to_str().unwrap(),
            "--calib-samples",
            "1",
            "--calib-steps",
            "2",
            "--reconstruct",
            "none",
            "--timesteps",
            "1000",
            // Tables, whose int8 rows the tests below expect (at S = 1000 the default
            // `--tib auto` computes the features, 16 more int8 linears: tests/int8.rs
            // checks that form's lowering).
            "--tib",
            "lut",
        ]);
        (dir, q)
    });
    q
}

fn data_file(q: &Path) -> PathBuf {
    q.with_file_name(format!("{}.data", q.file_name().unwrap().to_string_lossy()))
}

#[test]
fn quantized_external_data_sits_beside_the_model_and_loads_in_onnx_and_onnxruntime() {
    let q = quantized();
    let data = data_file(q);
    let (model_bytes, data_bytes) = (
        std::fs::metadata(q).unwrap().len(),
        std::fs::metadata(&data)
            .expect("the .data file beside the output")
            .len(),
    );
    // The int8 weights (3.1M parameters) are in the data file, not in the model.
    assert!(
        data_bytes > 2_500_000 && model_bytes < 2_000_000,
        "{model_bytes} B model, {data_bytes} B data"
    );
    let proto = tfmqc_runtime::engine::read_proto(q).unwrap();
    let location = |t: &tfmqc_runtime::pb::TensorProto| {
        t.external_data
            .iter()
            .find(|e| e.key == "location")
            .map(|e| e.value.clone())
    };
    let external: Vec<_> = proto
        .graph
        .as_ref()
        .unwrap()
        .initializer
        .iter()
        .filter_map(location)
        .collect();
    assert!(external.len() > 200, "{} external tensors", external.len());
    assert!(
        external.iter().all(|l| l == "sd_tiny.q.onnx.data"),
        "a relative location beside the model"
    );
    let Some(py) = python() else { return };
    // onnx.checker by path (it resolves the data file beside the model), then a run.
    ort(&py, &["check", q.to_str().unwrap()]);
    let x = example_inputs("sd_tiny");
    let dir = tmpdir();
    let ours = ort_run(&py, q, &x, dir.path());
    let float = ort_run(&py, &model_path("sd_tiny"), &x, dir.path());
    for (k, v) in &ours {
        assert_eq!(v.shape, float[k].shape, "{k}");
        assert!(
            v.to_f64_lossy().unwrap().iter().all(|f| f.is_finite()),
            "{k}"
        );
    }
}

/// What tract is handed after the lowering: no int8 weight as a constant to load (and
/// fold into f32), no Q/DQ nodes or scales left dead, and every lowered weight still a
/// reference to the data file, packed by the op builder from a map of it.
#[test]
fn lowering_leaves_tract_no_weight_to_load_and_moves_references_not_bytes() {
    let q = quantized();
    let mut proto = tfmqc_runtime::engine::read_proto(q).unwrap();
    let before = proto.graph.as_ref().unwrap().clone();
    let count = tfmqc_runtime::lower::lower_int8(&mut proto, q.parent(), &[]).unwrap();
    let g = proto.graph.as_ref().unwrap();
    // 256 weight layers (convs and linear projections) and 32 attentions, each fused into
    // one node (its 2 products of activations, softmax and P's quantizer).
    assert_eq!(count, 256 + 32);
    let int8 = tfmqc_runtime::pb::tensor_proto::DataType::Int8 as i32;
    // (Time-step tables stored as int8 rows stay: tract gathers a row per call.)
    use tfmqc_runtime::classify::{classify_graph, timestep_input, ConstKind};
    let kinds = classify_graph(g, timestep_input(&proto));
    let table = |name: &str| kinds.get(name) == Some(&ConstKind::Table);
    assert!(
        g.initializer
            .iter()
            .all(|t| t.data_type != int8 || table(&t.name)),
        "an int8 weight left for tract to load"
    );
    let ops = |g: &tfmqc_runtime::pb::GraphProto, op: &str| {
        g.node.iter().filter(|n| n.op_type == op).count()
    };
    assert!(ops(&before, "DequantizeLinear") > 500);
    // Every Q/DQ pair fed a lowered node, except the output pairs of `--output-qdq`
    // (QuantizeLinear on a lowered Conv's output, its DequantizeLinear after it).
    let producer = |v: &str| g.node.iter().find(|n| n.output.iter().any(|o| o == v));
    let output_pairs = g
        .node
        .iter()
        .filter(|n| {
            n.op_type == "QuantizeLinear"
                && producer(&n.input[0])
                    .is_some_and(|p| p.op_type == tfmqc_runtime::ops::conv::QCONV)
        })
        .count();
    let dq_of_pairs = g
        .node
        .iter()
        .filter(|n| {
            n.op_type == "DequantizeLinear"
                && producer(&n.input[0]).is_some_and(|p| p.op_type == "QuantizeLinear")
        })
        .count();
    // The int8 time-step tables' DequantizeLinear of a gathered row.
    let table_rows = g
        .node
        .iter()
        .filter(|n| {
            n.op_type == "DequantizeLinear"
                && producer(&n.input[0])
                    .is_some_and(|p| p.op_type == "Gather" && table(&p.input[0]))
        })
        .count();
    assert_eq!(
        (ops(g, "DequantizeLinear"), ops(g, "QuantizeLinear")),
        (dq_of_pairs + table_rows, output_pairs),
        "every Q/DQ pair fed a lowered node or is a lowered Conv's output pair"
    );
    assert!(g.initializer.len() * 2 < before.initializer.len());
    let weights: Vec<&tfmqc_runtime::pb::TensorProto> = g
        .node
        .iter()
        .filter_map(|n| n.attribute.iter().find(|a| a.name == "weight"))
        .map(|a| a.t.as_ref().unwrap())
        .collect();
    assert_eq!(weights.len(), 256);
    // tfmqc writes tensors under 1 KiB inline; the others stay references, read by the
    // op builder from the data file.
    let external = weights
        .iter()
        .filter(|t| t.raw_data.is_empty() && !t.external_data.is_empty())
        .count();
    assert!(external > 200, "{external} of 256 weights are external");
    assert!(weights
        .iter()
        .all(|t| !t.external_data.is_empty() || t.raw_data.len() < 1024));
    // The borrowed form builds the same graph.
    let original = tfmqc_runtime::engine::read_proto(q).unwrap();
    let (copy, n) = tfmqc_runtime::lower::lowered_int8(&original, q.parent(), &[]).unwrap();
    assert_eq!(n, count);
    assert!(copy.graph.as_ref() == Some(g), "the same lowered graph");
}

#[test]
fn denoiser_runs_external_data_weights_on_the_int8_kernels_as_the_qdq_graph_does() {
    let q = quantized();
    let model = tfmqc_runtime::Denoiser::load(q).unwrap();
    assert_eq!(model.int8_ops(), 256 + 32);
    let (resident, as_f32) = model.engine().int8_weight_bytes();
    assert!(
        resident > 0 && resident * 10 <= as_f32 * 3,
        "int8 weights resident {resident} B vs {as_f32} B as f32"
    );
    let x = example_inputs("sd_tiny");
    // Node by node against the QDQ graph (tract, in float) on the values the whole model
    // feeds each: exact integer products vs float products of the same dequantized
    // values (the bar of tests/int8.rs).
    // Fused attention nodes hold a float softmax computed otherwise than tract's, which
    // moves a code of P by one step near a rounding boundary (tests/int8.rs: 60 dB bar).
    let nodes = lowered_nodes_vs_qdq(q, &x);
    let float = [
        tfmqc_runtime::ops::group_norm::GROUP_NORM,
        tfmqc_runtime::ops::conv_f32::CONV_F32,
    ];
    assert_eq!(
        nodes
            .iter()
            .filter(|n| !float.contains(&n.1.as_str()))
            .count(),
        256 + 32
    );
    // Every node > 60 dB; the unfused ones exact (> 100 dB) unless the QDQ reference meets
    // a rounding tie that tract's float evaluation resolves one ulp away (tests/int8.rs
    // allows two such nodes). Per-step scales (FSC, on by default) quantize in the QDQ
    // graph through Div(x, s), which tract computes one ulp off x/s on some elements: a
    // few more nodes meet such a tie (measured: 3 of 288; tests/int8.rs
    // `per_step_scales_in_the_int8_kernels_match_the_qdq_graph_at_each_t` checks element
    // by element that every difference is one of those).
    let attention = tfmqc_runtime::ops::attention::QATTENTION;
    let ties = nodes
        .iter()
        .filter(|(_, op, db)| op != attention && *db <= 100.0)
        .count();
    for (name, _, db) in &nodes {
        assert!(*db > 60.0, "{name}: int8 vs QDQ {db:.1} dB");
    }
    assert!(
        ties <= 4,
        "{ties} nodes below 100 dB: more than rounding ties: {:?}",
        nodes
            .iter()
            .filter(|(_, op, db)| op != attention && *db <= 100.0)
            .collect::<Vec<_>>()
    );
    // The whole model as close to float as the QDQ graph is (within 1 dB, as in
    // tests/int8.rs: chained quantizers amplify rounding differences either way).
    let full = tfmqc_runtime::Optimize::Full;
    let float = tract_run(&model_path("sd_tiny"), &x);
    let qdq = tract_run_engine(&tfmqc_runtime::Engine::load(q, None, full).unwrap(), &x);
    let int8 = tract_run_engine(model.engine(), &x);
    let (dq, di) = (sqnr_db(&float, &qdq), sqnr_db(&float, &int8));
    eprintln!("sd_tiny: vs float, QDQ graph {dq:.1} dB, int8 kernels {di:.1} dB");
    assert!(di > dq - 1.0, "int8 {di:.1} dB vs QDQ {dq:.1} dB");
    let b2 = tfmqc_runtime::with_threads(2, || tract_run_engine(model.engine(), &x));
    assert_bit_exact("int8 on 1 vs 2 threads", &int8, &b2);
}

#[test]
fn a_missing_data_file_is_an_error_naming_it() {
    let q = quantized();
    let dir = tmpdir();
    let alone = dir.path().join("sd_tiny.q.onnx");
    std::fs::copy(q, &alone).unwrap();
    let e = tfmqc_runtime::Denoiser::load(&alone)
        .unwrap_err()
        .to_string();
    assert!(e.contains("sd_tiny.q.onnx.data"), "{e}");
    // A data file cut short: the tensor that does not fit is named.
    std::fs::write(data_file(&alone), vec![0u8; 4096]).unwrap();
    let e = tfmqc_runtime::Denoiser::load(&alone)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("beyond the end") || e.contains("out of bounds"),
        "{e}"
    );
}

/// `tfmqc bench` with each engine's memory capped below what it needs: every engine run
/// is tried, each fails with an out-of-memory line (not an abort or a backtrace), and
/// the exit code is 1.
#[test]
fn bench_reports_engines_out_of_memory_as_errors() {
    let q = quantized();
    let out = tfmqc(&[
        "bench",
        model_path("sd_tiny").to_str().unwrap(),
        "--quantized",
        q.to_str().unwrap(),
        "--engines",
        "tract-float,tfmqc-int8",
        "--threads",
        "1",
        "--runs",
        "1",
        "--loop-runs",
        "0",
        "--memory-limit",
        "20",
        "--json",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("2 engine run(s) failed"), "{err}");
    assert!(
        !err.contains("panicked") && !err.contains("backtrace"),
        "{err}"
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON still printed");
    let failed = v["failed"].as_array().unwrap();
    assert_eq!(failed.len(), 2);
    for f in failed {
        let reason = f["reason"].as_str().unwrap();
        assert!(
            reason.starts_with("out of memory"),
            "{}: {reason}",
            f["engine"]
        );
    }
    assert!(v["runs"].as_array().unwrap().is_empty());
}

#[test]
fn bench_names_the_missing_data_file_of_a_quantized_model() {
    let q = quantized();
    let dir = tmpdir();
    let alone = dir.path().join("sd_tiny.q.onnx");
    std::fs::copy(q, &alone).unwrap();
    let out = tfmqc(&[
        "bench",
        model_path("sd_tiny").to_str().unwrap(),
        "--quantized",
        alone.to_str().unwrap(),
        "--threads",
        "1",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("sd_tiny.q.onnx.data"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}
