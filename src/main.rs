//! The `tfmqc` command line (DESIGN.md §9).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use clap::{Args, Parser, Subcommand};
use tfmqc_passes::ir::print;
use tfmqc_passes::options::meta;
use tfmqc_passes::pipeline::{self, PassContext};
use tfmqc_passes::{onnx, Error, Options};

/// tfmqc: quantize diffusion-model denoisers (ONNX) with TFMQ-DM, keeping the
/// time-step path exact.
///
/// With no subcommand, runs the pipeline: `tfmqc model.onnx -o model.q.onnx`.
#[derive(Parser, Debug)]
#[command(
    name = "tfmqc",
    version,
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the pipeline on MODEL and write OUT (the default command).
    Quantize(RunArgs),
    /// Print a summary of MODEL: inputs, outputs, ops, parameters, the time-step block
    /// that was found, and the graph one node per line.
    Inspect(InspectArgs),
}

#[derive(Args, Debug)]
struct RunArgs {
    /// The ONNX model to compile.
    #[arg(value_name = "MODEL", required_unless_present = "print_passes")]
    model: Option<PathBuf>,
    /// Where to write the result (written only on success).
    #[arg(
        short,
        long,
        value_name = "OUT",
        required_unless_present = "print_passes"
    )]
    output: Option<PathBuf>,
    /// Run exactly these passes, in order, e.g. `canonicalize,detect-tib,fold-tib`;
    /// `none` = import and export only. Default: the whole pipeline.
    #[arg(long, value_name = "LIST")]
    passes: Option<String>,
    /// List the passes, one line each, and exit.
    #[arg(long)]
    print_passes: bool,
    /// Print the IR to stderr after every pass.
    #[arg(long)]
    print_after_all: bool,
    /// Write the IR after every pass to DIR/NN-PASS.txt.
    #[arg(long, value_name = "DIR")]
    dump_dir: Option<PathBuf>,
    #[command(flatten)]
    tib: TibArgs,
}

#[derive(Args, Debug)]
struct TibArgs {
    /// The finite time-step set S: `1000` (0..999), `ddim:50` (t = k·T/50) or `0,20,40`.
    /// Default: the set recorded in the model's metadata, else all T training steps.
    #[arg(long, value_name = "SPEC")]
    timesteps: Option<String>,
    /// Use this graph input as the time step instead of detecting it.
    #[arg(long, value_name = "NAME")]
    timestep_input: Option<String>,
}

#[derive(Args, Debug)]
struct InspectArgs {
    /// The ONNX model to describe.
    model: PathBuf,
    /// Print one JSON object on stdout instead of text.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    tib: TibArgs,
}

/// A failure with its exit code: 1 for bad input, 2 for tfmqc's own faults.
struct Failure {
    code: u8,
    message: String,
}

impl From<Error> for Failure {
    fn from(e: Error) -> Failure {
        Failure {
            code: if e.is_user_error() { 1 } else { 2 },
            message: e.to_string(),
        }
    }
}

fn user_error(message: impl Into<String>) -> Failure {
    Failure {
        code: 1,
        message: message.into(),
    }
}

fn options(tib: &TibArgs) -> Options {
    Options {
        timesteps: tib.timesteps.clone(),
        timestep_input: tib.timestep_input.clone(),
    }
}

fn load(path: &Path) -> Result<tfmqc_passes::Model, Failure> {
    Ok(onnx::load(path)?)
}

fn run_pipeline(args: &RunArgs) -> Result<(), Failure> {
    if args.print_passes {
        eprint!("{}", pipeline::describe_passes());
        println!("{}", pipeline::default_pipeline().join(","));
        return Ok(());
    }
    let (Some(model_path), Some(out)) = (&args.model, &args.output) else {
        return Err(user_error("give a MODEL and -o OUT (see --help)"));
    };
    let passes = match &args.passes {
        Some(spec) => pipeline::parse_pipeline(spec)?,
        None => pipeline::parse_pipeline(&pipeline::default_pipeline().join(","))?,
    };
    if let Some(dir) = &args.dump_dir {
        std::fs::create_dir_all(dir).map_err(|e| user_error(format!("{}: {e}", dir.display())))?;
    }
    let start = Instant::now();
    let model = load(model_path)?;
    eprintln!(
        "tfmqc: loaded {} ({} nodes, {} initializers) in {:.2} s",
        model_path.display(),
        model.graph.node_count(),
        model.graph.initializers.len(),
        start.elapsed().as_secs_f64()
    );
    let opts = options(&args.tib);
    let mut cx = PassContext::new(model, &opts);
    let total = passes.len();
    let mut step = 0;
    let mut after =
        |name: &str, cx: &PassContext, took: std::time::Duration| -> tfmqc_passes::Result<()> {
            step += 1;
            eprintln!("[{step}/{total}] {name}: {:.2} s", took.as_secs_f64());
            for n in &cx.notes {
                eprintln!("    {n}");
            }
            if args.print_after_all {
                eprintln!("--- IR after {name} ---\n{}", print::model_text(&cx.model));
            }
            if let Some(dir) = &args.dump_dir {
                let path = dir.join(format!("{step:02}-{name}.txt"));
                onnx::write_atomic(&path, print::model_text(&cx.model).as_bytes())?;
            }
            Ok(())
        };
    pipeline::run_pipeline(&mut cx, &passes, &mut after)?;
    let mut model = cx.model;
    let names: Vec<&str> = passes.iter().map(|p| p.name()).collect();
    model.set_metadata(meta::VERSION, env!("CARGO_PKG_VERSION"));
    model.set_metadata(
        meta::PASSES,
        if names.is_empty() {
            "none".to_string()
        } else {
            names.join(",")
        },
    );
    onnx::save(&model, out)?;
    let bytes = std::fs::metadata(out).map(|m| m.len()).unwrap_or(0);
    eprintln!(
        "tfmqc: wrote {} ({bytes} bytes) in {:.2} s total",
        out.display(),
        start.elapsed().as_secs_f64()
    );
    Ok(())
}

fn inspect(args: &InspectArgs) -> Result<(), Failure> {
    let mut model = load(&args.model)?;
    // Shapes for the listing; a model tract cannot type is still listed, untyped.
    let typing = tfmqc_passes::canonicalize::infer_types(&mut model).err();
    let g = &model.graph;
    let tib = tfmqc_passes::detect_tib::detect(&model, args.tib.timestep_input.as_deref());
    if args.json {
        let (params, bytes) = g.parameter_stats();
        let value = |v: &tfmqc_passes::ir::ValueInfo| {
            serde_json::json!({
                "name": v.name,
                "dtype": v.dtype.map(|d| d.short()),
                "shape": v.shape.as_ref().map(|s| s.iter().map(|d| d.to_string()).collect::<Vec<_>>()),
            })
        };
        let obj = serde_json::json!({
            "file": args.model.display().to_string(),
            "ir_version": model.ir_version,
            "opsets": model.opsets.iter().map(|(d, v)| (if d.is_empty() { "ai.onnx".to_string() } else { d.clone() }, *v)).collect::<std::collections::BTreeMap<_, _>>(),
            "producer": format!("{} {}", model.producer_name, model.producer_version).trim().to_string(),
            "inputs": g.inputs.iter().map(value).collect::<Vec<_>>(),
            "outputs": g.outputs.iter().map(value).collect::<Vec<_>>(),
            "node_count": g.node_count(),
            "op_counts": g.op_counts(),
            "parameters": params,
            "parameter_bytes": bytes,
            "initializers": g.initializers.len(),
            "metadata": model.metadata.iter().cloned().collect::<std::collections::BTreeMap<_, _>>(),
            "tib": tib.as_ref().ok(),
            "tib_error": tib.as_ref().err().map(|e| e.to_string()),
            "typing_error": typing.as_ref().map(|e| e.to_string()),
            "graph": print::graph_text(g).lines().collect::<Vec<_>>(),
        });
        println!("{}", serde_json::to_string_pretty(&obj).expect("json"));
        return Ok(());
    }
    print!("{}", print::model_summary(&model));
    if let Some(e) = &typing {
        println!("types: not inferred ({e})");
    }
    match &tib {
        Ok(t) => print!("{}", t.text()),
        Err(e) => println!("time-step block: not found: {e}"),
    }
    println!("graph:");
    for line in print::graph_text(g).lines() {
        println!("  {line}");
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = match e.kind() {
                clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion => 0,
                _ => 1,
            };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    let result = std::panic::catch_unwind(|| match &cli.command {
        Some(Command::Quantize(a)) => run_pipeline(a),
        Some(Command::Inspect(a)) => inspect(a),
        None => run_pipeline(&cli.run),
    });
    match result {
        Ok(Ok(())) => ExitCode::SUCCESS,
        Ok(Err(f)) => {
            eprintln!("tfmqc: error: {}", f.message);
            ExitCode::from(f.code)
        }
        Err(_) => {
            eprintln!("tfmqc: internal error (a bug in tfmqc; please report it with the model)");
            ExitCode::from(2)
        }
    }
}
