//! The command line's public behaviour: --print-passes, --dump-dir (written by the pass
//! manager: the input, the IR and each analysis after every pass), --print-after-all,
//! inspect --json, --help.

mod common;
use common::*;

#[test]
fn print_passes_lists_every_pass_with_a_summary() {
    let out = tfmqc_ok(&["--print-passes"]);
    let err = String::from_utf8_lossy(&out.stderr);
    for name in [
        "canonicalize",
        "detect-tib",
        "fold-tib",
        "split-concat",
        "calibrate",
        "reparameterize",
        "quantize",
    ] {
        assert!(
            err.lines()
                .any(|l| l.starts_with(name) && l.len() > name.len() + 10),
            "{name} in {err}"
        );
    }
    assert!(err.contains("fold-tib") && err.contains("(after detect-tib)"));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "canonicalize,detect-tib,fold-tib,split-concat,calibrate,reparameterize,quantize"
    );
}

#[test]
fn dump_dir_holds_the_ir_after_each_pass() {
    let dir = tmpdir();
    let dumps = dir.path().join("dumps");
    let out = dir.path().join("o.onnx");
    quantize_small(
        "ddpm_digits",
        &out,
        "5",
        &["--dump-dir", dumps.to_str().unwrap()],
    );
    let mut files: Vec<String> = std::fs::read_dir(&dumps)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    files.sort();
    assert_eq!(
        files,
        [
            "00-input.txt",
            "01-canonicalize.txt",
            "02-detect-tib.tib.txt",
            "02-detect-tib.txt",
            "03-fold-tib.step-index.txt",
            "03-fold-tib.txt",
            "04-split-concat.txt",
            "05-calibrate.calibration.txt",
            "05-calibrate.txt",
            "06-reparameterize.txt",
            "07-quantize.quant-plan.txt",
            "07-quantize.txt",
            "08-named.txt",
            "08-names.txt"
        ]
    );
    // The manager writes each analysis as the pass that computed it left it.
    let tib = std::fs::read_to_string(dumps.join("02-detect-tib.tib.txt")).unwrap();
    assert!(tib.contains("time-step input: timestep"), "{tib}");
    let plan = std::fs::read_to_string(dumps.join("07-quantize.quant-plan.txt")).unwrap();
    assert!(plan.contains("\"weight_bits\": 8"), "{plan}");
    let input = std::fs::read_to_string(dumps.join("00-input.txt")).unwrap();
    assert!(!input.contains("tib/table"));
    let quantized = std::fs::read_to_string(dumps.join("07-quantize.txt")).unwrap();
    assert!(quantized.contains("= QuantizeLinear("), "{quantized}");
    let folded = std::fs::read_to_string(dumps.join("03-fold-tib.txt")).unwrap();
    assert!(folded.contains("= Gather(@tib/table/"), "{folded}");
    assert!(!std::fs::read_to_string(dumps.join("01-canonicalize.txt"))
        .unwrap()
        .contains("tib/table"));
    // The file's short names, each beside the name the passes used.
    let names = std::fs::read_to_string(dumps.join("08-names.txt")).unwrap();
    assert!(
        names
            .lines()
            .any(|l| l.starts_with('t') && l.contains("← tib/table/")),
        "{names}"
    );
    let named = std::fs::read_to_string(dumps.join("08-named.txt")).unwrap();
    assert!(
        !named.contains("tib/table") && !named.contains("_quantized"),
        "{named}"
    );
}

#[test]
fn print_after_all_shows_the_ir_on_stderr() {
    let dir = tmpdir();
    let out = dir.path().join("o.onnx");
    let res = tfmqc_ok(&[
        model_path("ddim_unet").to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--passes",
        "canonicalize",
        "--print-after-all",
    ]);
    let err = String::from_utf8_lossy(&res.stderr);
    assert!(err.contains("--- IR after canonicalize ---"), "{err}");
    assert!(err.contains("= Conv(x, @"), "{err}");
}

#[test]
fn inspect_json_is_one_object_with_the_facts() {
    let out = tfmqc_ok(&[
        "inspect",
        "--json",
        model_path("guided_unet").to_str().unwrap(),
    ]);
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("one JSON object on stdout");
    assert_eq!(v["inputs"][1]["name"], "timesteps");
    assert_eq!(v["inputs"][1]["dtype"], "f32");
    assert_eq!(v["tib"]["timestep_input"], "timesteps");
    assert_eq!(v["tib"]["frontier"].as_array().unwrap().len(), 1);
    assert!(v["parameters"].as_u64().unwrap() > 1_000_000);
    assert_eq!(v["op_counts"]["Sin"], 1);
    assert!(v["graph"].as_array().unwrap().len() == v["node_count"].as_u64().unwrap() as usize);
}

#[test]
fn inspect_json_reports_why_no_block_was_found() {
    let out = tfmqc_ok(&[
        "inspect",
        "--json",
        model_path("digits_features").to_str().unwrap(),
    ]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v["tib"].is_null());
    assert!(v["tib_error"].as_str().unwrap().contains("no Sin/Cos"));
}

#[test]
fn help_names_the_commands_and_options() {
    let out = tfmqc_ok(&["--help"]);
    let text = String::from_utf8_lossy(&out.stdout);
    for word in [
        "inspect",
        "--passes",
        "--timesteps",
        "--print-passes",
        "--timestep-input",
    ] {
        assert!(text.contains(word), "{word} in --help:\n{text}");
    }
}

#[test]
fn same_input_gives_identical_bytes() {
    let dir = tmpdir();
    let a = dir.path().join("a.onnx");
    let b = dir.path().join("b.onnx");
    for out in [&a, &b] {
        tfmqc_ok(&[
            model_path("unet2d_cond").to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
            "--calib-samples",
            "2",
            "--calib-steps",
            "5",
        ]);
    }
    assert!(
        std::fs::read(&a).unwrap() == std::fs::read(&b).unwrap(),
        "output is not deterministic"
    );
}
