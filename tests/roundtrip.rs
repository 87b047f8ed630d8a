//! `tfmqc MODEL -o OUT --passes none` writes a file that onnx.checker accepts and that
//! onnxruntime and tract run with outputs identical, bit for bit, to the original's.

mod common;
use common::*;

#[test]
fn round_trip_is_bit_exact_in_tract_and_onnxruntime() {
    let dir = tmpdir();
    let py = python();
    let mut written = vec![];
    for name in all_models() {
        let src = model_path(&name);
        let dst = dir.path().join(format!("{name}.rt.onnx"));
        tfmqc_ok(&[
            src.to_str().unwrap(),
            "-o",
            dst.to_str().unwrap(),
            "--passes",
            "none",
        ]);
        let inputs = example_inputs(&name);
        assert_bit_exact(
            &format!("{name} in tract"),
            &tract_run(&src, &inputs),
            &tract_run(&dst, &inputs),
        );
        if let Some(py) = &py {
            let a = ort_run(py, &src, &inputs, dir.path());
            let b = ort_run(py, &dst, &inputs, dir.path());
            assert_bit_exact(&format!("{name} in onnxruntime"), &a, &b);
        }
        written.push(dst);
    }
    if let Some(py) = &py {
        let mut args = vec!["check"];
        args.extend(written.iter().map(|p| p.to_str().unwrap()));
        ort(py, &args);
    }
}

#[test]
fn round_trip_keeps_metadata_opsets_and_records_the_tool() {
    let dir = tmpdir();
    let src = model_path("ddpm_digits");
    let dst = dir.path().join("rt.onnx");
    tfmqc_ok(&[
        src.to_str().unwrap(),
        "-o",
        dst.to_str().unwrap(),
        "--passes",
        "none",
    ]);
    let a = tfmqc_passes::onnx::load(&src).unwrap();
    let b = tfmqc_passes::onnx::load(&dst).unwrap();
    assert_eq!(a.opsets, b.opsets);
    assert_eq!(a.ir_version, b.ir_version);
    for (k, v) in &a.metadata {
        assert_eq!(b.metadata_value(k), Some(v.as_str()), "metadata {k}");
    }
    assert_eq!(b.metadata_value("tfmqc.passes"), Some("none"));
    assert_eq!(a.graph.initializers, b.graph.initializers);
    assert_eq!(a.graph.node_count(), b.graph.node_count());
}

#[test]
fn external_data_is_read_and_written_back_as_external_data() {
    let dir = tmpdir();
    // Make an external-data model from a shipped one.
    let mut m = tfmqc_passes::onnx::load(&model_path("ddim_unet")).unwrap();
    m.external_data = true;
    let ext = dir.path().join("ext.onnx");
    tfmqc_passes::onnx::save(&m, &ext).unwrap();
    assert!(dir.path().join("ext.onnx.data").exists());
    let inline_size = std::fs::metadata(model_path("ddim_unet")).unwrap().len();
    assert!(
        std::fs::metadata(&ext).unwrap().len() < inline_size / 10,
        "tensors left the .onnx file"
    );

    let out = dir.path().join("out.onnx");
    tfmqc_ok(&[
        ext.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--passes",
        "none",
    ]);
    assert!(
        dir.path().join("out.onnx.data").exists(),
        "written back as external data"
    );
    let inputs = example_inputs("ddim_unet");
    let reference = tract_run(&model_path("ddim_unet"), &inputs);
    assert_bit_exact(
        "external data in tract",
        &reference,
        &tract_run(&out, &inputs),
    );
    if let Some(py) = python() {
        assert_bit_exact(
            "external data in onnxruntime",
            &ort_run(&py, &model_path("ddim_unet"), &inputs, dir.path()),
            &ort_run(&py, &out, &inputs, dir.path()),
        );
        ort(&py, &["check", out.to_str().unwrap()]);
    }
}

/// The compiler writes its output into a staging folder beside the output path and renames
/// it into place only when everything after the write (the evaluation) has succeeded: an
/// uncommitted stage leaves nothing behind, a committed one is the model with its data file.
#[test]
fn a_staged_output_appears_only_when_committed() {
    let dir = tmpdir();
    let model = tfmqc_passes::onnx::load(&model_path("sd_tiny")).unwrap();
    let out = dir.path().join("tiny.q.onnx");
    let listing = || {
        let mut names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
            .collect();
        names.sort();
        names
    };
    {
        let staged = tfmqc_passes::onnx::stage(&model, &out).unwrap();
        assert!(staged.path().exists() && staged.path() != out);
        // What is evaluated is the staged file, its data file beside it.
        let loaded = tfmqc_passes::onnx::load(staged.path()).unwrap();
        assert_eq!(
            loaded.graph.initializers.len(),
            model.graph.initializers.len()
        );
        assert_eq!(
            listing().len(),
            1,
            "only the staging folder: {:?}",
            listing()
        );
    }
    assert!(listing().is_empty(), "dropped uncommitted: {:?}", listing());

    let staged = tfmqc_passes::onnx::stage(&model, &out).unwrap();
    let bytes = staged.bytes();
    staged.commit().unwrap();
    assert_eq!(listing(), ["tiny.q.onnx", "tiny.q.onnx.data"]);
    let on_disk = std::fs::metadata(&out).unwrap().len()
        + std::fs::metadata(dir.path().join("tiny.q.onnx.data"))
            .unwrap()
            .len();
    assert_eq!(bytes, on_disk);
    let back = tfmqc_passes::onnx::load(&out).unwrap();
    for (name, t) in &model.graph.initializers {
        assert!(back.graph.initializers[name].data == t.data, "{name}");
    }
}
