//! Snapshot tests of the IR text: `inspect` of every model; what canonicalize, fold-tib
//! (one model per family) and quantize change in real models, as a summary line and the
//! rewritten region (`print::rewrite_text`), and small hand-built graphs before and
//! after each pass. Snapshots live in snapshots/ and are read like code: a change in them
//! is a change in what the compiler does.

mod common;
use common::*;

use tfmqc_passes::ir::print;
use tfmqc_passes::ir::{attr, DType, Dim, Graph, Model, Tensor, ValueInfo};

fn snapshot(name: &str, text: &str) {
    insta::with_settings!({snapshot_path => "../snapshots", prepend_module_to_snapshot => false}, {
        insta::assert_snapshot!(name, text);
    });
}

/// A snapshot of compiled numbers — calibrated scales, TIAR's losses, an output file's
/// bytes — kept once per family of float kernels: tract sums in another order with
/// AVX-512 than with AVX2 + FMA, so the calibrated ranges differ in their last bits and a
/// measured choice near its threshold can flip (on an AVX2-only AMD EPYC, one int8 time-step
/// table of ddpm_digits became f16 and the file 1.5 kB smaller). Each family's snapshot
/// is read like the others; a CPU of no known family compares nothing and says so.
fn snapshot_per_float_kernels(name: &str, text: &str) {
    match float_kernel_family() {
        Some(family) => snapshot(&format!("{name}@{family}"), text),
        None => eprintln!("{name}: no snapshot for this CPU's float kernels; not compared"),
    }
}

/// The float kernels tract picks on this CPU, as the snapshots name them.
fn float_kernel_family() -> Option<&'static str> {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            return Some("x86-avx512");
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            return Some("x86-avx2");
        }
    }
    None
}

#[test]
fn inspect_every_model() {
    for name in all_models() {
        let out = tfmqc_ok(&["inspect", model_path(&name).to_str().unwrap()]);
        snapshot(
            &format!("inspect_{name}"),
            &String::from_utf8_lossy(&out.stdout),
        );
    }
}

/// A small graph with everything canonicalize handles: a Constant node, a shape
/// computation on a fixed-size input, a constant-only subgraph, a dead branch and an
/// unused initializer.
pub fn synthetic() -> Model {
    let mut g = Graph::new("synthetic");
    g.inputs.push(ValueInfo::new(
        "x",
        DType::F32,
        vec![Dim::Known(1), Dim::Known(4)],
    ));
    g.outputs.push(ValueInfo {
        name: "y".into(),
        ..Default::default()
    });
    g.initializers
        .insert("w".into(), Tensor::from_vec(vec![4], &[1f32, 2., 3., 4.]));
    g.initializers
        .insert("unused".into(), Tensor::from_vec(vec![2], &[0f32, 0.]));
    let c = Tensor::from_vec(vec![], &[0.5f32]);
    let value = tract_onnx::pb::AttributeProto {
        name: "value".into(),
        r#type: tract_onnx::pb::attribute_proto::AttributeType::Tensor as i32,
        t: Some(tfmqc_passes::onnx::tensor_to_onnx("", &c)),
        ..Default::default()
    };
    let n = node;
    g.add_node(n("half", "Constant", &[], "half").with_attr(value))
        .unwrap();
    g.add_node(n("scale", "Mul", &["w", "half"], "w_half"))
        .unwrap(); // constant-only
    g.add_node(n("shape", "Shape", &["x"], "x_shape")).unwrap(); // fixed shape: folds
    g.add_node(n("reshape", "Reshape", &["w_half", "x_shape"], "w_row"))
        .unwrap();
    g.add_node(n("mul", "Mul", &["x", "w_row"], "xw")).unwrap();
    g.add_node(n("dead", "Neg", &["xw"], "never_read")).unwrap();
    g.add_node(n("sum", "ReduceSum", &["xw"], "y").with_attr(attr::int("keepdims", 0)))
        .unwrap();
    Model {
        ir_version: 8,
        opsets: vec![(String::new(), 17)],
        graph: g,
        ..Default::default()
    }
}

#[test]
fn canonicalize_synthetic_graph() {
    let mut m = synthetic();
    let before = print::model_text(&m);
    let stats = tfmqc_passes::canonicalize::canonicalize(&mut m).unwrap();
    snapshot(
        "canonicalize_synthetic",
        &format!(
            "{before}\n--- after canonicalize: {stats:?}\n{}",
            print::model_text(&m)
        ),
    );
}

/// A model as loaded, with the types of its values inferred (as the reader sees them).
fn typed(path: &std::path::Path) -> Model {
    let mut m = tfmqc_passes::onnx::load(path).unwrap();
    tfmqc_passes::canonicalize::infer_types(&mut m).unwrap();
    m
}

#[test]
fn canonicalize_trained_ddpm() {
    let before = typed(&model_path("ddpm_digits"));
    let mut m = before.clone();
    tfmqc_passes::canonicalize::canonicalize(&mut m).unwrap();
    snapshot(
        "canonicalize_ddpm_digits",
        &print::rewrite_text(&before, &m),
    );
}

/// What split-concat (below 8-bit activations) changes in the trained model after
/// canonicalize: each up block's skip Conv reading `Concat(upsampled, skip)` becomes one
/// Conv per part, its slice of the weight's input channels (the bias on the first), summed
/// by an Add into the old output name.
#[test]
fn split_concat_trained_ddpm() {
    let mut before = typed(&model_path("ddpm_digits"));
    tfmqc_passes::canonicalize::canonicalize(&mut before).unwrap();
    let mut m = before.clone();
    let split = tfmqc_passes::split_concat::split_concat_convs(&mut m.graph, &[]).unwrap();
    assert!(!split.is_empty(), "ddpm_digits has Convs reading a Concat");
    tfmqc_passes::canonicalize::infer_types(&mut m).unwrap();
    snapshot(
        "split_concat_ddpm_digits",
        &format!(
            "split: {}\n{}",
            split.join(", "),
            print::rewrite_text(&before, &m)
        ),
    );
}

/// What detect-tib + fold-tib (S = ddim:50) change, one model per family.
#[test]
fn fold_tib_each_family() {
    let dir = tmpdir();
    for name in [
        "ddpm_digits",
        "unet2d_attn_dynbatch",
        "unet2d_cond",
        "guided_unet",
        "ddim_unet",
    ] {
        let out = dir.path().join(format!("{name}.folded.onnx"));
        tfmqc_ok(&[
            model_path(name).to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
            "--passes",
            "detect-tib,fold-tib",
            "--timesteps",
            "ddim:50",
        ]);
        snapshot(
            &format!("fold_tib_{name}"),
            &print::rewrite_text(&typed(&model_path(name)), &typed(&out)),
        );
    }
}

/// What quantize (W8A8, the default options but S = ddim:10, 2 calibration
/// trajectories of 10 steps, TCR off) changes in the trained model after the passes
/// before it: weights behind DequantizeLinear, activations behind
/// QuantizeLinear/DequantizeLinear — constant scales, or per-step ones (FSC,
/// `--step-groups auto`): a scale table gathered at the step group `index · G / |S|`
/// around a unit-scale pair.
#[test]
fn quantize_trained_ddpm() {
    use tfmqc_passes::pipeline::{default_pipeline, parse_pipeline, run_pipeline, PassContext};
    let options = tfmqc_passes::Options {
        timesteps: Some("ddim:10".into()),
        calib_samples: 2,
        calib_steps: Some(10),
        calib_adaptive: false,
        tcr: tfmqc_passes::options::Tcr::Off,
        ..Default::default()
    };
    let model = tfmqc_passes::onnx::load(&model_path("ddpm_digits")).unwrap();
    let mut cx = PassContext::new(model, &options);
    let passes = parse_pipeline(&default_pipeline().join(",")).unwrap();
    // Both as the passes name them: the file's short names (the pipeline's last step)
    // would renumber what quantize left alone too.
    let (mut before, mut after) = (None, None);
    run_pipeline(&mut cx, &passes, &mut |name, cx, _| {
        match name {
            "quantize" => after = Some(cx.model.clone()),
            _ => before = Some(cx.model.clone()),
        }
        Ok(())
    })
    .unwrap();
    let mut before = before.expect("passes before quantize");
    let mut after = after.expect("quantize ran");
    tfmqc_passes::canonicalize::infer_types(&mut before).unwrap();
    tfmqc_passes::canonicalize::infer_types(&mut after).unwrap();
    snapshot_per_float_kernels(
        "quantize_ddpm_digits",
        &print::rewrite_text(&before, &after),
    );
}

/// The bytes of one whole output file (every pass of the default pipeline, TCR on, on
/// the smallest trained model), as its length and FNV-1a hash: a refactoring that must
/// not change what tfmqc writes (issue #18) is checked by this line staying put. The bytes
/// depend on float summation order: one line per family of float kernels
/// ([`snapshot_per_float_kernels`]).
#[test]
fn output_bytes_of_ddpm_digits() {
    let dir = tmpdir();
    let out = dir.path().join("q.onnx");
    quantize_small("ddpm_digits", &out, "5", &["--tcr", "on"]);
    let bytes = std::fs::read(&out).unwrap();
    let fnv1a = bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3)
    });
    snapshot_per_float_kernels(
        "output_bytes_ddpm_digits",
        &format!("{} bytes, FNV-1a 64 {fnv1a:016x}\n", bytes.len()),
    );
}

/// The runtime's load-time lowering of the patterns it fuses, on a hand-built QDQ graph:
/// diffusers' attention (`MatMul` Q·Kᵀ, `Mul` by a constant, `Softmax`, Q/DQ of P,
/// `MatMul` P·V), guided-diffusion's (`Einsum` forms with P on the right of a transposed
/// output, no score scale), a group norm + SiLU (`Reshape`, `InstanceNormalization`,
/// `Reshape` by `Shape(x)`, γ, β, `x·Sigmoid(x)`) and one without SiLU (constant shape
/// back). Every node tract is handed, with its attributes.
#[test]
fn lower_fused_patterns() {
    let mut g = Graph::new("fused");
    let dims = |d: &[i64]| d.iter().map(|&v| Dim::Known(v)).collect::<Vec<_>>();
    for (name, shape) in [
        ("q", &[2, 4, 6, 8][..]),
        ("k", &[2, 4, 8, 5]),
        ("v", &[2, 4, 5, 8]),
        ("eq", &[3, 8, 6]),
        ("ek", &[3, 8, 5]),
        ("ev", &[3, 7, 5]),
        ("x", &[2, 8, 3, 3]),
    ] {
        g.inputs.push(ValueInfo::new(name, DType::F32, dims(shape)));
    }
    let scalar = |v: f32| Tensor::scalar(v);
    for (name, t) in [
        ("sq", scalar(0.02)),
        ("zq", Tensor::scalar(128u8)),
        ("sk", scalar(0.03)),
        ("zk", Tensor::scalar(120u8)),
        ("sv", scalar(0.05)),
        ("zv", Tensor::scalar(130u8)),
        ("sp", scalar(1.0 / 255.0)),
        ("zp", Tensor::scalar(0u8)),
        ("c", scalar(0.125)),
        ("gs", Tensor::from_vec(vec![4], &[1.0f32; 4])),
        ("gb", Tensor::from_vec(vec![4], &[0.0f32; 4])),
        ("split", Tensor::from_vec(vec![3], &[0i64, 4, -1])),
        ("back", Tensor::from_vec(vec![4], &[0i64, 8, 3, 3])),
        ("gamma", Tensor::from_vec(vec![8, 1, 1], &[1.5f32; 8])),
        ("beta", Tensor::from_vec(vec![8, 1, 1], &[0.25f32; 8])),
    ] {
        g.initializers.insert(name.into(), t);
    }
    for out in ["o", "eo", "y", "y2"] {
        g.outputs.push(ValueInfo {
            name: out.into(),
            ..Default::default()
        });
    }
    let qdq = |v: &str, s: &str, z: &str| {
        [
            node(
                &format!("q_{v}"),
                "QuantizeLinear",
                &[v, s, z],
                &format!("{v}_q"),
            ),
            node(
                &format!("dq_{v}"),
                "DequantizeLinear",
                &[&format!("{v}_q"), s, z],
                &format!("{v}_d"),
            ),
        ]
    };
    let mut nodes = vec![];
    for (v, s, z) in [
        ("q", "sq", "zq"),
        ("k", "sk", "zk"),
        ("v", "sv", "zv"),
        ("eq", "sq", "zq"),
        ("ek", "sk", "zk"),
        ("ev", "sv", "zv"),
        ("p", "sp", "zp"),
        ("ep", "sp", "zp"),
    ] {
        nodes.extend(qdq(v, s, z));
    }
    nodes.extend([
        node("qk", "MatMul", &["q_d", "k_d"], "s"),
        node("scale", "Mul", &["s", "c"], "sc"),
        node("softmax", "Softmax", &["sc"], "p").with_attr(attr::int("axis", -1)),
        node("pv", "MatMul", &["p_d", "v_d"], "o"),
        node("eqk", "Einsum", &["eq_d", "ek_d"], "es")
            .with_attr(attr::string("equation", "bct,bcs->bts")),
        node("esoftmax", "Softmax", &["es"], "ep").with_attr(attr::int("axis", -1)),
        node("epv", "Einsum", &["ev_d", "ep_d"], "eo")
            .with_attr(attr::string("equation", "bcs,bts->bct")),
        node("r1", "Reshape", &["x", "split"], "xr"),
        node("in", "InstanceNormalization", &["xr", "gs", "gb"], "xn")
            .with_attr(attr::float("epsilon", 1e-5)),
        node("shape", "Shape", &["x"], "xs"),
        node("r2", "Reshape", &["xn", "xs"], "xb"),
        node("gamma", "Mul", &["xb", "gamma"], "xg"),
        node("beta", "Add", &["xg", "beta"], "xa"),
        node("sig", "Sigmoid", &["xa"], "xsig"),
        node("silu", "Mul", &["xa", "xsig"], "y"),
        node("r1b", "Reshape", &["y", "split"], "yr"),
        node("inb", "InstanceNormalization", &["yr", "gs", "gb"], "yn"),
        node("r2b", "Reshape", &["yn", "back"], "yb"),
        node("gammab", "Mul", &["gamma", "yb"], "yg"),
        node("betab", "Add", &["yg", "beta"], "y2"),
    ]);
    for nd in nodes {
        g.add_node(nd).unwrap();
    }
    let dir = tmpdir();
    let path = dir.path().join("fused.onnx");
    save_graph(g, &path);
    let mut proto = tfmqc_runtime::engine::read_proto(&path).unwrap();
    let count = tfmqc_runtime::lower::lower_int8(&mut proto, None, &[]).unwrap();
    let graph = proto.graph.as_ref().unwrap();
    let mut text = format!("{count} nodes on the int8 kernels\n");
    for n in &graph.node {
        text += &format!("{} {} {:?} -> {:?}\n", n.op_type, n.name, n.input, n.output);
        for a in &n.attribute {
            let value = match a.r#type {
                1 => format!("{}", a.f),
                2 => format!("{}", a.i),
                3 => String::from_utf8_lossy(&a.s).to_string(),
                6 => format!("{:?}", a.floats),
                7 => format!("{:?}", a.ints),
                _ => format!("type {}", a.r#type),
            };
            text += &format!("    {} = {value}\n", a.name);
        }
    }
    text += &format!(
        "initializers: {:?}\n",
        graph
            .initializer
            .iter()
            .map(|t| &t.name)
            .collect::<Vec<_>>()
    );
    snapshot("lower_fused_patterns", &text);
    // The lowered graph loads and runs in tract, with the shapes of the original.
    let (engine, _) =
        tfmqc_runtime::Engine::load_int8(&path, tfmqc_runtime::Optimize::Full).unwrap();
    let inputs: Tensors = g_inputs(&path);
    let out = tract_run_engine(&engine, &inputs);
    let float = tract_run(&path, &inputs);
    for name in ["o", "eo", "y", "y2"] {
        assert_eq!(out[name].shape, float[name].shape, "{name}");
        let one = |t: &Tensors| Tensors::from([(name.to_string(), t[name].clone())]);
        let db = sqnr_db(&one(&float), &one(&out));
        assert!(db > 40.0, "{name}: fused vs graph {db:.1} dB");
    }
}

/// Deterministic inputs for every graph input of a saved model.
fn g_inputs(path: &std::path::Path) -> Tensors {
    let proto = tfmqc_runtime::engine::read_proto(path).unwrap();
    let g = proto.graph.unwrap();
    g.input
        .iter()
        .map(|i| {
            let shape: Vec<usize> = match &i.r#type.as_ref().unwrap().value {
                Some(tfmqc_runtime::pb::type_proto::Value::TensorType(t)) => t
                    .shape
                    .as_ref()
                    .unwrap()
                    .dim
                    .iter()
                    .map(|d| match d.value {
                        Some(
                            tfmqc_runtime::pb::tensor_shape_proto::dimension::Value::DimValue(v),
                        ) => v as usize,
                        _ => 1,
                    })
                    .collect(),
                _ => unreachable!(),
            };
            let len: usize = shape.iter().product();
            let vals: Vec<f32> = (0..len)
                .map(|j| ((j as f32) * 0.71 + i.name.len() as f32).sin() * 2.0)
                .collect();
            (i.name.clone(), Tensor::from_vec(shape, &vals))
        })
        .collect()
}

/// A small denoiser with every part the passes handle: a sinusoidal time-step embedding
/// through a Gemm and SiLU (the TIB), added to the features of a middle Conv between
/// the input and output Convs (which stay float), and the input added back to the
/// prediction (so that it stays near x and the sampler's trajectories stay bounded, as a
/// trained denoiser's do). x: f32[1,2,4,4], t: i64[1].
fn synthetic_denoiser() -> Model {
    let mut g = Graph::new("synthetic_denoiser");
    g.inputs.push(ValueInfo::new(
        "x",
        DType::F32,
        vec![Dim::Known(1), Dim::Known(2), Dim::Known(4), Dim::Known(4)],
    ));
    g.inputs
        .push(ValueInfo::new("t", DType::I64, vec![Dim::Known(1)]));
    g.outputs.push(ValueInfo::new(
        "y",
        DType::F32,
        vec![Dim::Known(1), Dim::Known(2), Dim::Known(4), Dim::Known(4)],
    ));
    // Fixed, varied weights (no generator: the snapshot shows them).
    let w = |n: usize, k: f32| -> Vec<f32> { (0..n).map(|i| (i as f32 * k).sin() * 0.5).collect() };
    let mut init = |name: &str, shape: Vec<usize>, v: Vec<f32>| {
        g.initializers
            .insert(name.into(), Tensor::from_vec(shape, &v));
    };
    init("freqs", vec![1, 4], vec![1.0, 0.1, 0.01, 0.001]);
    init("emb.w", vec![8, 2], w(16, 0.7));
    init("emb.b", vec![2], vec![0.1, -0.1]);
    init("conv_in.w", vec![2, 2, 3, 3], w(36, 0.37));
    init("conv_mid.w", vec![2, 2, 3, 3], w(36, 0.53));
    init("conv_mid.b", vec![2], vec![0.05, -0.02]);
    init(
        "conv_out.w",
        vec![2, 2, 3, 3],
        w(36, 0.29).iter().map(|v| v * 0.1).collect(),
    );
    g.initializers
        .insert("axes".into(), Tensor::from_vec(vec![1], &[1i64]));
    g.initializers.insert(
        "emb_shape".into(),
        Tensor::from_vec(vec![4], &[1i64, 2, 1, 1]),
    );
    let n = node;
    let conv = |name: &str, ins: &[&str], out: &str| {
        n(name, "Conv", ins, out)
            .with_attr(attr::ints("kernel_shape", [3, 3]))
            .with_attr(attr::ints("pads", [1, 1, 1, 1]))
    };
    for nd in [
        n("t_f", "Cast", &["t"], "t_f").with_attr(attr::int("to", 1)),
        n("t_col", "Unsqueeze", &["t_f", "axes"], "t_col"),
        n("arg", "Mul", &["t_col", "freqs"], "arg"),
        n("sin", "Sin", &["arg"], "sin"),
        n("cos", "Cos", &["arg"], "cos"),
        n("sinusoid", "Concat", &["sin", "cos"], "sinusoid").with_attr(attr::int("axis", 1)),
        n("emb", "Gemm", &["sinusoid", "emb.w", "emb.b"], "emb"),
        n("emb_sig", "Sigmoid", &["emb"], "emb_sig"),
        n("emb_silu", "Mul", &["emb", "emb_sig"], "emb_silu"),
        n("emb_4d", "Reshape", &["emb_silu", "emb_shape"], "emb_4d"),
        conv("conv_in", &["x", "conv_in.w"], "h0"),
        conv("conv_mid", &["h0", "conv_mid.w", "conv_mid.b"], "h1"),
        n("add_emb", "Add", &["h1", "emb_4d"], "h2"),
        n("relu", "Relu", &["h2"], "h3"),
        conv("conv_out", &["h3", "conv_out.w"], "h4"),
        n("residual", "Add", &["h4", "x"], "y"),
    ] {
        g.add_node(nd).unwrap();
    }
    Model {
        ir_version: 8,
        opsets: vec![(String::new(), 17)],
        graph: g,
        ..Default::default()
    }
}

/// Runs `pipeline` on the synthetic denoiser and writes, per pass, what it changed
/// (`print::rewrite_text`) and the text of each analysis it computed (as `--dump-dir`
/// writes them): every pass's before and after on one small graph.
fn passes_on_synthetic(pipeline: &str, options: &tfmqc_passes::Options) -> String {
    use tfmqc_passes::pipeline::{parse_pipeline, run_pipeline, Dumps, PassContext};
    let dir = tmpdir();
    let first = synthetic_denoiser();
    let mut cx = PassContext::new(first.clone(), options);
    cx.dumps = Dumps {
        print_after_all: false,
        dir: Some(dir.path().to_path_buf()),
    };
    let mut prev = first;
    tfmqc_passes::canonicalize::infer_types(&mut prev).unwrap();
    let mut text = format!("{}\n", print::model_text(&prev));
    let mut rewrites = vec![];
    run_pipeline(
        &mut cx,
        &parse_pipeline(pipeline).unwrap(),
        &mut |name, cx, _| {
            let mut now = cx.model.clone();
            tfmqc_passes::canonicalize::infer_types(&mut now).unwrap();
            rewrites.push(format!("=== {name}\n{}", print::rewrite_text(&prev, &now)));
            prev = now;
            Ok(())
        },
    )
    .unwrap();
    // The manager writes each pass's analyses after this callback: read them once all
    // ran, and put each under its pass.
    let mut files: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|f| f.matches('.').count() == 2)
        .collect();
    files.sort();
    for (i, rewrite) in rewrites.iter().enumerate() {
        text += rewrite;
        for f in files
            .iter()
            .filter(|f| f.starts_with(&format!("{:02}-", i + 1)))
        {
            // Wall-clock times are the machine's, not the compiler's: not compared.
            let body: String = std::fs::read_to_string(dir.path().join(f))
                .unwrap()
                .lines()
                .map(|l| match l.split_once("seconds\": ") {
                    Some((key, _)) => format!("{key}seconds\": (time)\n"),
                    None => format!("{l}\n"),
                })
                .collect();
            text += &format!("--- {f}\n{body}");
        }
    }
    text
}

/// The options the synthetic denoiser is compiled with: S = ddim:10, two calibration
/// trajectories of 10 steps, TCR on, every output Q/DQ pair (what `auto` would choose
/// depends on the time it takes).
fn synthetic_options() -> tfmqc_passes::Options {
    tfmqc_passes::Options {
        timesteps: Some("ddim:10".into()),
        calib_samples: 2,
        calib_steps: Some(10),
        calib_adaptive: false,
        tcr: tfmqc_passes::options::Tcr::On,
        output_qdq: tfmqc_passes::options::OutputQdq::All,
        ..Default::default()
    }
}

/// Every pass of the default pipeline (TCR on, every output Q/DQ pair, S = ddim:10) on
/// the synthetic denoiser, each followed by the analyses it computed: canonicalize
/// (nothing to do), detect-tib (the TIB analysis), fold-tib (the sinusoid and Gemm become
/// a table gathered at the step index), calibrate (its ranges), reparameterize (the
/// inputs of conv_mid and conv_out balanced through a Mul; recalibrated), quantize (their
/// weights, inputs with per-step scales, and outputs behind Q/DQ; conv_in stays float).
#[test]
fn every_pass_on_a_synthetic_denoiser() {
    let options = synthetic_options();
    let pipeline = tfmqc_passes::pipeline::default_pipeline().join(",");
    snapshot(
        "passes_synthetic_denoiser",
        &passes_on_synthetic(&pipeline, &options),
    );
}

/// fold-tib under `--tib quant` (TIAR, W4, 20 steps) on the synthetic denoiser: the
/// TIB's Gemm gets a DequantizeLinear weight and a Q/DQ input; no table.
#[test]
fn tiar_on_a_synthetic_denoiser() {
    let options = tfmqc_passes::Options {
        timesteps: Some("ddim:10".into()),
        tib: tfmqc_passes::options::TibMode::Quant,
        weight_bits: 4,
        tiar_iters: Some(20),
        ..Default::default()
    };
    snapshot_per_float_kernels(
        "tiar_synthetic_denoiser",
        &passes_on_synthetic("detect-tib,fold-tib", &options),
    );
}

/// The numbers behind the synthetic snapshot: after every pass of the default pipeline
/// (the options of [`every_pass_on_a_synthetic_denoiser`]) the graph still computes the
/// float model at a time step of S (t = 300), each pass within its stated tolerance
/// (max |Δ| over max |y|): the analyses and canonicalize change nothing (1e-6 from the
/// model before them);
/// fold-tib's tables are stored at `--table-precision auto` (here f16: 1e-3, the
/// embedding is added to features of magnitude ~10); TCR moves range between
/// activations and weights only (1e-5 over the folded model); quantize (W8A8, per-step
/// scales, every output pair) stays above 30 dB SQNR.
#[test]
fn every_pass_on_the_synthetic_denoiser_keeps_its_function() {
    use tfmqc_passes::exec::Runner;
    use tfmqc_passes::pipeline::{default_pipeline, parse_pipeline, run_pipeline, PassContext};
    let options = synthetic_options();
    let x: Vec<f32> = (0..32).map(|i| ((i as f32) * 0.41).cos()).collect();
    let inputs: Tensors = [
        ("x".to_string(), Tensor::from_vec(vec![1, 2, 4, 4], &x)),
        ("t".to_string(), Tensor::from_vec(vec![1], &[300i64])),
    ]
    .into_iter()
    .collect();
    let run = |m: &Model| -> Tensors {
        let out = Runner::new(m, None, tfmqc_runtime::Optimize::Full)
            .unwrap()
            .run(&inputs.clone().into_iter().collect())
            .unwrap();
        m.graph
            .outputs
            .iter()
            .map(|o| o.name.clone())
            .zip(out)
            .collect()
    };
    let float = run(&synthetic_denoiser());
    let mut cx = PassContext::new(synthetic_denoiser(), &options);
    let mut folded = None;
    let mut quantized = None;
    let mut seen = vec![];
    run_pipeline(
        &mut cx,
        &parse_pipeline(&default_pipeline().join(",")).unwrap(),
        &mut |name, cx, _| {
            let y = run(&cx.model);
            let (err, db) = (relative_error(&float, &y), sqnr_db(&float, &y));
            match name {
                "canonicalize" | "detect-tib" => assert!(err <= 1e-6, "{name}: {err}"),
                "calibrate" | "split-concat" => {
                    let err = relative_error(folded.as_ref().expect("fold-tib ran"), &y);
                    assert!(err <= 1e-6, "{name}: {err}")
                }
                "fold-tib" => {
                    assert!(err <= 1e-3, "{name}: {err}");
                    folded = Some(y);
                }
                "reparameterize" => {
                    let err = relative_error(folded.as_ref().expect("fold-tib ran"), &y);
                    assert!(err <= 1e-5, "{name}: {err}")
                }
                "quantize" => {
                    assert!(db >= 30.0, "{name}: {db} dB");
                    quantized = Some((cx.model.clone(), y.clone()));
                }
                other => panic!("a pass this test does not know: {other}"),
            }
            seen.push(format!("{name}: {err:.2e} ({db:.1} dB)"));
            Ok(())
        },
    )
    .unwrap();
    eprintln!("{}", seen.join("\n"));
    assert_eq!(seen.len(), 7);
    // The pipeline's last step renames what the passes created: the same function to
    // the bit, the same bytes of each kind by structure as by the passes' names.
    let (before, y) = quantized.expect("quantize ran");
    assert_eq!(run(&cx.model), y);
    let by_names = bytes_by_kind_from_pass_names(&before);
    assert_eq!(bytes_by_kind(&before), by_names);
    assert_eq!(bytes_by_kind(&cx.model), by_names);
    assert!(
        by_names.iter().all(|&b| b > 0),
        "every kind present: {by_names:?}"
    );
    // The file: short generated names, no value_info.
    let dir = tmpdir();
    let path = dir.path().join("q.onnx");
    tfmqc_passes::onnx::save(&cx.model, &path).unwrap();
    let proto = tfmqc_runtime::engine::read_proto(&path).unwrap();
    let g = proto.graph.as_ref().unwrap();
    assert!(g.value_info.is_empty());
    assert!(
        !before.graph.value_info.is_empty(),
        "the IR had types to drop"
    );
    let own = tfmqc_passes::ir::names::all_names(&synthetic_denoiser());
    let names = g
        .node
        .iter()
        .flat_map(|n| n.input.iter().chain(&n.output).chain([&n.name]))
        .chain(g.initializer.iter().map(|t| &t.name));
    for name in names.filter(|n| !own.contains(*n)) {
        assert!(name.len() <= 6, "a long generated name: {name}");
    }
}

/// Initializer bytes by kind (tables, scale tables, integer weights, float, other), the
/// kinds from the graph's structure.
fn bytes_by_kind(m: &Model) -> [usize; 5] {
    use tfmqc_runtime::classify::ConstKind;
    let kinds = tfmqc_passes::ir::names::const_kinds(m);
    let mut out = [0; 5];
    for (name, t) in &m.graph.initializers {
        let slot = match kinds.get(name) {
            Some(ConstKind::Table) => 0,
            Some(ConstKind::ScaleTable) => 1,
            Some(ConstKind::WeightInt) => 2,
            Some(ConstKind::Float) => 3,
            _ => 4,
        };
        out[slot] += t.byte_len();
    }
    out
}

/// [`bytes_by_kind`] as the report told kinds apart before the file got short names: by
/// the names the passes give (`tib/table/…`, `fsc/…`, `…_scales`, `…_quantized`,
/// `…_scale`).
fn bytes_by_kind_from_pass_names(m: &Model) -> [usize; 5] {
    let mut out = [0; 5];
    for (name, t) in &m.graph.initializers {
        let slot = if name.starts_with("tib/table/") {
            0
        } else if name.starts_with("fsc/") || name.ends_with("_scales") {
            1
        } else if matches!(t.dtype, DType::I8 | DType::U8 | DType::I4 | DType::U4)
            && t.numel() > 1
            && name.ends_with("_quantized")
        {
            2
        } else if t.dtype == DType::F32 && t.numel() > 1 && !name.ends_with("_scale") {
            3
        } else {
            4
        };
        out[slot] += t.byte_len();
    }
    out
}

/// What raising the opset to 21 (packed INT4 weights) rewrites: a reduction's `axes`
/// attribute becomes an input, an equal Split gets `num_outputs`, RoiAlign keeps its
/// opset-10 coordinates and GridSample its mode under the new spelling; ops whose meaning
/// did not change stay as they are.
#[test]
fn opset_upgrade_to_21() {
    let mut g = Graph::new("opset");
    g.inputs.push(ValueInfo::new(
        "x",
        DType::F32,
        vec![Dim::Known(1), Dim::Known(4), Dim::Known(2), Dim::Known(2)],
    ));
    for o in ["mean", "a", "b", "roi", "grid", "y"] {
        g.outputs.push(ValueInfo {
            name: o.into(),
            ..Default::default()
        });
    }
    g.initializers.insert(
        "rois".into(),
        Tensor::from_vec(vec![1, 4], &[0f32, 0., 1., 1.]),
    );
    g.initializers
        .insert("batch".into(), Tensor::from_vec(vec![1], &[0i64]));
    g.initializers.insert(
        "coords".into(),
        Tensor::from_vec(vec![1, 1, 1, 2], &[0f32, 0.]),
    );
    let n = node;
    g.add_node(
        n("reduce", "ReduceMean", &["x"], "mean")
            .with_attr(attr::ints("axes", vec![2, 3]))
            .with_attr(attr::int("keepdims", 1)),
    )
    .unwrap();
    let mut split = n("split", "Split", &["x"], "a").with_attr(attr::int("axis", 1));
    split.outputs.push("b".into());
    g.add_node(split).unwrap();
    g.add_node(n("roi_align", "RoiAlign", &["x", "rois", "batch"], "roi"))
        .unwrap();
    g.add_node(n("sample", "GridSample", &["x", "coords"], "grid"))
        .unwrap();
    g.add_node(n("relu", "Relu", &["x"], "y")).unwrap();
    let before = Model {
        ir_version: 8,
        opsets: vec![(String::new(), 13)],
        graph: g,
        ..Default::default()
    };
    let mut after = before.clone();
    let notes = tfmqc_passes::ir::opset::upgrade(&mut after, 21).unwrap();
    snapshot(
        "opset_upgrade_to_21",
        &format!(
            "{}\n--- opset {} → {}, IR {} → {}\n{}",
            notes.join("\n"),
            before.onnx_opset(),
            after.onnx_opset(),
            before.ir_version,
            after.ir_version,
            print::model_text(&after)
        ),
    );
}

#[test]
fn opset_upgrade_refuses_group_normalization_and_leaves_the_model() {
    let mut g = Graph::new("gn");
    g.inputs.push(ValueInfo::new(
        "x",
        DType::F32,
        vec![Dim::Known(1), Dim::Known(4)],
    ));
    g.outputs.push(ValueInfo {
        name: "y".into(),
        ..Default::default()
    });
    g.add_node(
        node("gn", "GroupNormalization", &["x", "s", "b"], "y")
            .with_attr(attr::int("num_groups", 2)),
    )
    .unwrap();
    let mut m = Model {
        ir_version: 8,
        opsets: vec![(String::new(), 18)],
        graph: g,
        ..Default::default()
    };
    let e = tfmqc_passes::ir::opset::upgrade(&mut m, 21)
        .unwrap_err()
        .to_string();
    assert!(e.contains("GroupNormalization"), "{e}");
    assert_eq!(m.onnx_opset(), 18);
}
