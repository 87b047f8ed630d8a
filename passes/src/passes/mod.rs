//! The pass manager. A pass is a small named unit over the IR; a pipeline is a list of
//! them, given as text like LLVM's `opt -passes=a,b,c`. The manager owns the contracts
//! between passes: each pass declares the analyses it reads ([`Pass::requires`]) and
//! those its rewrite makes stale ([`Pass::invalidates`]); the manager checks the first
//! before the pass runs, clears the second after it, validates the graph after every
//! pass, names the pass in every error, and writes the dumps (`--print-after-all`,
//! `--dump-dir`). Passes read analyses through typed accessors ([`PassContext::tib`],
//! [`PassContext::calibration`], …) that fail with the same "needs X before it" error.

pub mod calibrate;
pub mod canonicalize;
pub mod detect_tib;
pub mod fold_tib;
pub mod quantize;
pub mod reparameterize;
pub mod split_concat;
pub mod tcaq;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::analysis::calibration::Calibration;
use crate::analysis::quant_plan::QuantPlan;
use crate::analysis::reports::{TcrReport, TiarReport};
use crate::analysis::tib::TibAnalysis;
use crate::error::{Error, Result};
use crate::ir::{names, onnx, print, Model};
use crate::options::{Options, StepGroups};

/// The results one pass hands on to later ones, each made by one pass.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Analysis {
    /// The time-step input and the TIB (`detect-tib`).
    Tib,
    /// The value holding each sample's position in S (`fold-tib`).
    StepIndex,
    /// The activation ranges and evaluation records (`calibrate`).
    Calibration,
}

impl Analysis {
    /// The pass that computes it.
    pub fn producer(self) -> &'static str {
        match self {
            Analysis::Tib => "detect-tib",
            Analysis::StepIndex => "fold-tib",
            Analysis::Calibration => "calibrate",
        }
    }
}

/// What passes share: the model, the options, and the analyses computed so far.
pub struct PassContext<'a> {
    pub model: Model,
    pub options: &'a Options,
    /// Set by `detect-tib`.
    pub tib: Option<TibAnalysis>,
    /// Set by `fold-tib`: the value holding each sample's position in S.
    pub step_index: Option<String>,
    /// Set by `fold-tib` under `--tib quant|auto` (TIAR and the table choices).
    pub tiar: Option<TiarReport>,
    /// Set by `calibrate`.
    pub calibration: Option<Calibration>,
    /// Set by `reparameterize` when TCR ran.
    pub tcr: Option<TcrReport>,
    /// Set by `reparameterize` when TCR ran: the float model it rewrote (the same
    /// function as the input; its activations are the ones quantize quantizes, which the
    /// report measures). Cheap: it shares its tensors' bytes with the pipeline's model.
    pub balanced_float: Option<Model>,
    /// Set by `quantize`.
    pub quant: Option<QuantPlan>,
    /// PAR: the quantized model whose predictions drive calibration's trajectories
    /// (`calibrate` observes `model` at the inputs it visits).
    pub par_driver: Option<Model>,
    /// Set after `quantize` when DAQ or PAR ran ([`tcaq::finish`]).
    pub tcaq: Option<tcaq::TcaqReport>,
    /// Names of the passes that have run, in order.
    pub done: Vec<&'static str>,
    /// Every name the input model held: what [`run_pipeline`]'s renaming keeps under
    /// `--keep-names` or when `quantize` did not run.
    pub input_names: std::collections::HashSet<String>,
    /// What it keeps of them otherwise ([`addressed_names`]).
    pub addressed_names: std::collections::HashSet<String>,
    /// The values the input model gave types to (`value_info`): the only types the
    /// written file keeps.
    pub input_typed: std::collections::HashSet<String>,
    /// One line per notable finding, shown to the user after the pass.
    pub notes: Vec<String>,
    /// Progress of long work ("calibrate: batch 3/4"); the CLI shows it on a terminal.
    pub progress: &'a dyn Fn(&str),
    /// Where the manager writes the IR and analyses after each pass.
    pub dumps: Dumps,
    /// The pass running now (named by the accessors' errors).
    current: &'static str,
}

/// `--print-after-all` and `--dump-dir`: the IR after every pass, and the text of each
/// analysis a pass computed, on stderr and as `NN-pass.txt` / `NN-pass.ANALYSIS.txt`
/// files (`00-input.txt` is the IR before the first pass).
#[derive(Clone, Debug, Default)]
pub struct Dumps {
    pub print_after_all: bool,
    pub dir: Option<PathBuf>,
}

impl<'a> PassContext<'a> {
    pub fn new(model: Model, options: &'a Options) -> PassContext<'a> {
        PassContext {
            input_names: names::all_names(&model),
            addressed_names: addressed_names(&model, options),
            input_typed: model.graph.value_info.keys().cloned().collect(),
            model,
            options,
            tib: None,
            step_index: None,
            tiar: None,
            calibration: None,
            tcr: None,
            balanced_float: None,
            quant: None,
            par_driver: None,
            tcaq: None,
            done: vec![],
            notes: vec![],
            progress: &|_| {},
            dumps: Dumps::default(),
            current: "",
        }
    }

    pub fn note(&mut self, line: impl Into<String>) {
        self.notes.push(line.into());
    }

    /// The TIB analysis, or the error that `detect-tib` must run first.
    pub fn tib(&self) -> Result<&TibAnalysis> {
        self.tib.as_ref().ok_or_else(|| self.needs(Analysis::Tib))
    }

    /// The calibration, or the error that `calibrate` must run first.
    pub fn calibration(&self) -> Result<&Calibration> {
        self.calibration
            .as_ref()
            .ok_or_else(|| self.needs(Analysis::Calibration))
    }

    /// The step index value, or the error that `fold-tib` must run first.
    pub fn step_index(&self) -> Result<&str> {
        self.step_index
            .as_deref()
            .ok_or_else(|| self.needs(Analysis::StepIndex))
    }

    /// The error for a missing analysis, naming the running pass (for a pass that reads
    /// the field itself, to borrow the rest of the context meanwhile).
    pub fn needs(&self, what: Analysis) -> Error {
        needs(self.current, what)
    }

    fn has(&self, what: Analysis) -> bool {
        match what {
            Analysis::Tib => self.tib.is_some(),
            Analysis::StepIndex => self.step_index.is_some(),
            Analysis::Calibration => self.calibration.is_some(),
        }
    }

    fn clear(&mut self, what: Analysis) {
        match what {
            Analysis::Tib => self.tib = None,
            Analysis::StepIndex => self.step_index = None,
            Analysis::Calibration => self.calibration = None,
        }
    }

    /// The text of each analysis computed so far, by file name suffix (for the dumps).
    fn analysis_texts(&self) -> Vec<(&'static str, String)> {
        let json = |v: &dyn erased::Json| v.pretty();
        let mut out = vec![];
        if let Some(t) = &self.tib {
            out.push(("tib", t.text()));
        }
        if let Some(v) = &self.step_index {
            out.push(("step-index", format!("{v}\n")));
        }
        if let Some(r) = &self.tiar {
            out.push(("tiar", json(r)));
        }
        if let Some(c) = &self.calibration {
            out.push(("calibration", calibration_text(c)));
        }
        if let Some(r) = &self.tcr {
            out.push(("tcr", json(r)));
        }
        if let Some(p) = &self.quant {
            out.push(("quant-plan", json(p)));
        }
        if let Some(r) = &self.tcaq {
            out.push(("tcaq", json(r)));
        }
        out
    }
}

/// Serialize as pretty JSON through a trait object (the dumps hold several report types).
mod erased {
    pub trait Json {
        fn pretty(&self) -> String;
    }
    impl<T: serde::Serialize> Json for T {
        fn pretty(&self) -> String {
            let mut s = serde_json::to_string_pretty(self).unwrap_or_else(|e| format!("{e}"));
            s.push('\n');
            s
        }
    }
}

/// One line per observed value: its global range and how many steps have their own.
fn calibration_text(c: &Calibration) -> String {
    let mut s = format!(
        "{} batches, {} evaluation records, {} values\n",
        c.batches,
        c.records.len(),
        c.global.len()
    );
    for (v, r) in &c.global {
        let steps = c.per_step.get(v).map(|m| m.len()).unwrap_or(0);
        s.push_str(&format!("{v}: [{}, {}] over {steps} steps\n", r.min, r.max));
    }
    s
}

fn needs(pass: &str, what: Analysis) -> Error {
    let req = what.producer();
    Error::pass(
        pass,
        match what {
            // Only quantize reads it, and only for per-step scales asked for by number.
            Analysis::StepIndex => {
                format!("--step-groups > 1 needs the step index of {req} (run {req} before {pass})")
            }
            _ => format!("needs '{req}' to run before it (e.g. --passes {req},{pass})"),
        },
    )
}

/// Checks the whole pipeline's requirements before anything runs, so a pipeline that
/// cannot work fails at once rather than after the passes before the one that needs it.
fn check_order(cx: &PassContext, passes: &[Box<dyn Pass>]) -> Result<()> {
    let all = [Analysis::Tib, Analysis::StepIndex, Analysis::Calibration];
    let mut available: Vec<Analysis> = all.into_iter().filter(|&a| cx.has(a)).collect();
    for pass in passes {
        for req in pass.requires(cx.options) {
            if !available.contains(&req) {
                return Err(needs(pass.name(), req));
            }
        }
        available.retain(|a| !pass.invalidates().contains(a));
        available.extend(all.into_iter().filter(|a| a.producer() == pass.name()));
    }
    Ok(())
}

pub trait Pass {
    /// The name used in `--passes`.
    fn name(&self) -> &'static str;
    /// One line for `--print-passes`.
    fn summary(&self) -> &'static str;
    /// The analyses this pass reads under these options (the manager checks them before
    /// it runs).
    fn requires(&self, _options: &Options) -> Vec<Analysis> {
        vec![]
    }
    /// The analyses its rewrite makes stale (the manager clears them after it).
    fn invalidates(&self) -> &'static [Analysis] {
        &[]
    }
    fn run(&self, cx: &mut PassContext) -> Result<()>;
}

/// Every pass tfmqc knows, in the order of the default pipeline.
pub fn registry() -> Vec<Box<dyn Pass>> {
    vec![
        Box::new(canonicalize::Canonicalize),
        Box::new(detect_tib::DetectTib),
        Box::new(fold_tib::FoldTib),
        Box::new(split_concat::SplitConcat),
        Box::new(calibrate::Calibrate),
        Box::new(reparameterize::Reparameterize),
        Box::new(quantize::Quantize),
    ]
}

/// The passes run when `--passes` is not given.
pub fn default_pipeline() -> Vec<&'static str> {
    registry().iter().map(|p| p.name()).collect()
}

/// The passes of `--baseline`: the same layers quantized without the TIB treatment.
pub const BASELINE_PIPELINE: &str = "canonicalize,detect-tib,calibrate,quantize";

/// Parses `a,b,c` (or `none`) into passes, rejecting unknown names.
pub fn parse_pipeline(spec: &str) -> Result<Vec<Box<dyn Pass>>> {
    let spec = spec.trim();
    if spec == "none" || spec.is_empty() {
        return Ok(vec![]);
    }
    let mut out = vec![];
    for name in spec.split(',').map(str::trim) {
        let pass = registry()
            .into_iter()
            .find(|p| p.name() == name)
            .ok_or_else(|| {
                Error::invalid(format!(
                    "unknown pass '{name}'; known passes: {} (see --print-passes)",
                    default_pipeline().join(", ")
                ))
            })?;
        out.push(pass);
    }
    Ok(out)
}

/// `name  summary` lines for `--print-passes` (requirements under the default options).
pub fn describe_passes() -> String {
    let options = Options::default();
    registry()
        .iter()
        .map(|p| {
            let reqs: Vec<&str> = p.requires(&options).iter().map(|a| a.producer()).collect();
            let req = if reqs.is_empty() {
                String::new()
            } else {
                format!(" (after {})", reqs.join(", "))
            };
            format!("{:<14} {}{req}\n", p.name(), p.summary())
        })
        .collect()
}

/// Whether quantize reads fold-tib's step index: per-step scales asked for by number
/// (`--step-groups N`, N > 1) cannot do without it. Under `auto` the scales are per step
/// only where the index exists, so it is read when there and not required.
pub(crate) fn quantize_needs_step_index(options: &Options) -> bool {
    matches!(options.step_groups, StepGroups::Fixed(n) if n > 1) && !options.baseline_minmax
}

/// Calibrates `cx.model` again, for a pass whose rewrite changed the activations the
/// calibration measured (reparameterize under `--tcr`). Through the manager, so that no
/// pass file imports another's.
pub(crate) fn recalibrate(cx: &mut PassContext) -> Result<()> {
    calibrate::Calibrate.run(cx)
}

/// A copy of `model` quantized as `options` say with `cal`, for a pass's trial run
/// (reparameterize's `--tcr auto` measures the model with and without its rewrite).
pub(crate) fn quantized_copy(
    model: &Model,
    options: &Options,
    cal: &Calibration,
    step_index: Option<&str>,
    progress: &dyn Fn(&str),
) -> Result<Model> {
    let mut m = model.clone();
    quantize::quantize(&mut m, options, cal, step_index, progress)?;
    Ok(m)
}

/// Called after each pass with its name, the context and the time it took.
pub type AfterPass<'h> = dyn FnMut(&str, &PassContext, Duration) -> Result<()> + 'h;

/// Runs `passes` in order: checks each one's requirements, runs it, names it in its
/// error, clears what it invalidated, validates the graph, calls `after`, writes dumps.
pub fn run_pipeline(
    cx: &mut PassContext,
    passes: &[Box<dyn Pass>],
    after: &mut AfterPass,
) -> Result<()> {
    check_order(cx, passes)?;
    if let Some(dir) = &cx.dumps.dir {
        onnx::write_atomic(
            &dir.join("00-input.txt"),
            print::model_text(&cx.model).as_bytes(),
        )?;
    }
    // DAQ and PAR (after quantize) start again from the model calibrate read, and DAQ
    // measures the float model quantize read.
    let tcaq = tcaq::wanted(cx);
    let mut float_at_calibrate: Option<(usize, Model)> = None;
    let mut pre_quant: Option<Model> = None;
    for (i, pass) in passes.iter().enumerate() {
        let name = pass.name();
        if tcaq && name == "calibrate" && float_at_calibrate.is_none() {
            float_at_calibrate = Some((i, cx.model.clone()));
        }
        if tcaq && name == "quantize" {
            pre_quant = Some(cx.model.clone());
        }
        // Checked for the whole pipeline above; a pass may still not produce what it
        // names (fold-tib leaves no step index when it folds no table).
        for req in pass.requires(cx.options) {
            if !cx.has(req) {
                return Err(needs(name, req));
            }
        }
        // The analyses' texts before, so the dumps hold only what the pass computed.
        let before = if cx.dumps.print_after_all || cx.dumps.dir.is_some() {
            cx.analysis_texts()
        } else {
            vec![]
        };
        let start = Instant::now();
        cx.notes.clear();
        cx.current = name;
        let mut ran = pass.run(cx);
        if let (true, Ok(()), Some((from, float)), Some(pre)) =
            (name == "quantize", &ran, &float_at_calibrate, &pre_quant)
        {
            ran = tcaq::finish(cx, float, pre, &passes[*from..=i]);
        }
        cx.current = "";
        ran.map_err(|e| in_pass(name, e))?;
        for &a in pass.invalidates() {
            cx.clear(a);
        }
        cx.model
            .graph
            .validate()
            .map_err(|e| Error::pass(name, format!("left an invalid graph: {e}")))?;
        cx.done.push(name);
        after(name, cx, start.elapsed())?;
        dump(cx, i + 1, name, &before)?;
    }
    rename(cx, passes.len() + 1)
}

/// The names of the input model that a quantized file keeps by default: what a user or
/// tool addresses the file by, the graph inputs and outputs and the values on the
/// frontier of the time-step block as detected on the input model (`tfmqc eval` detects
/// it on the float model the same way and reads those values from the quantized file by
/// name). Everything else of the model's own (the exporter's
/// `/down_blocks.0/resnets.0/norm1/GroupNorm_output_0`, its node and initializer names:
/// up to 0.04× of the float file on the models in models/) gets a short name; the dumps'
/// names map gives the old ones back. `--keep-names` keeps them all, and so does a run
/// without `quantize` (`--passes none` is a round trip; `detect-tib,fold-tib` shows
/// what those passes did to the model as it was named).
pub fn addressed_names(model: &Model, options: &Options) -> std::collections::HashSet<String> {
    let g = &model.graph;
    let mut keep: std::collections::HashSet<String> = g
        .inputs
        .iter()
        .chain(&g.outputs)
        .map(|v| v.name.clone())
        .collect();
    // A model without a time-step block has no frontier (detect-tib says why, later).
    if let Ok(tib) = detect_tib::detect(model, options.timestep_input.as_deref()) {
        keep.extend(tib.frontier.iter().map(|f| f.name.clone()));
    }
    keep
}

/// What the passes created gets its short name in the file ([`names::shorten`]); the
/// analyses that name such a value follow. The types canonicalize inferred go
/// (`value_info`: onnxruntime, tract and the runtime infer them again; on a small model
/// they were 4 % of the file); those the input model carried stay (onnxruntime may
/// optimize a model differently without them: guided_unet's round trip is then not bit
/// for bit). The dumps get the map (`NN-names.txt`) and the IR as written
/// (`NN-named.txt`).
fn rename(cx: &mut PassContext, step: usize) -> Result<()> {
    let typed = &cx.input_typed;
    cx.model.graph.value_info.retain(|k, _| typed.contains(k));
    let keep = if cx.options.keep_names || !cx.done.contains(&"quantize") {
        &cx.input_names
    } else {
        &cx.addressed_names
    };
    let map = names::shorten(&mut cx.model, keep)?;
    if let Some(v) = cx.step_index.as_mut() {
        if let Some(short) = map.values.get(v.as_str()) {
            *v = short.clone();
        }
    }
    if map.is_empty() || (!cx.dumps.print_after_all && cx.dumps.dir.is_none()) {
        return Ok(());
    }
    let text = names::map_text(&map);
    let ir = print::model_text(&cx.model);
    if cx.dumps.print_after_all {
        eprintln!("--- names ---\n{text}\n--- IR as written ---\n{ir}");
    }
    if let Some(dir) = &cx.dumps.dir {
        onnx::write_atomic(&dir.join(format!("{step:02}-names.txt")), text.as_bytes())?;
        onnx::write_atomic(&dir.join(format!("{step:02}-named.txt")), ir.as_bytes())?;
    }
    Ok(())
}

/// The pass's name on its error (once: errors a pass raises itself already carry it).
fn in_pass(name: &str, e: Error) -> Error {
    match e {
        e @ Error::Pass { .. } => e,
        // Our failures stay ours (exit code 2), with the pass named.
        Error::Engine(m) => Error::Engine(format!("pass '{name}': {m}")),
        e if !e.is_user_error() => e,
        e => Error::pass(name, e.to_string()),
    }
}

/// The IR after the pass, and each analysis that is new or changed since before it.
fn dump(cx: &PassContext, step: usize, name: &str, before: &[(&str, String)]) -> Result<()> {
    if !cx.dumps.print_after_all && cx.dumps.dir.is_none() {
        return Ok(());
    }
    let ir = print::model_text(&cx.model);
    let changed: Vec<(&str, String)> = cx
        .analysis_texts()
        .into_iter()
        .filter(|(k, text)| !before.iter().any(|(b, t)| b == k && t == text))
        .collect();
    if cx.dumps.print_after_all {
        eprintln!("--- IR after {name} ---\n{ir}");
        for (k, text) in &changed {
            eprintln!("--- {k} after {name} ---\n{text}");
        }
    }
    if let Some(dir) = &cx.dumps.dir {
        onnx::write_atomic(&dir.join(format!("{step:02}-{name}.txt")), ir.as_bytes())?;
        for (k, text) in &changed {
            onnx::write_atomic(
                &dir.join(format!("{step:02}-{name}.{k}.txt")),
                text.as_bytes(),
            )?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::{Graph, Node};

    /// A pass made of its name, declarations and body, for testing the manager alone.
    struct Fake {
        name: &'static str,
        requires: Vec<Analysis>,
        invalidates: &'static [Analysis],
        body: fn(&mut PassContext) -> Result<()>,
    }

    impl Pass for Fake {
        fn name(&self) -> &'static str {
            self.name
        }
        fn summary(&self) -> &'static str {
            "test"
        }
        fn requires(&self, _options: &Options) -> Vec<Analysis> {
            self.requires.clone()
        }
        fn invalidates(&self) -> &'static [Analysis] {
            self.invalidates
        }
        fn run(&self, cx: &mut PassContext) -> Result<()> {
            (self.body)(cx)
        }
    }

    fn fake(name: &'static str, body: fn(&mut PassContext) -> Result<()>) -> Fake {
        Fake {
            name,
            requires: vec![],
            invalidates: &[],
            body,
        }
    }

    fn run(cx: &mut PassContext, passes: Vec<Fake>) -> Result<()> {
        let passes: Vec<Box<dyn Pass>> = passes
            .into_iter()
            .map(|p| Box::new(p) as Box<dyn Pass>)
            .collect();
        run_pipeline(cx, &passes, &mut |_, _, _| Ok(()))
    }

    fn model() -> Model {
        Model {
            graph: Graph::new("empty"),
            ..Default::default()
        }
    }

    #[test]
    fn a_missing_requirement_fails_before_any_pass_runs() {
        let options = Options::default();
        let mut cx = PassContext::new(model(), &options);
        let first = fake("first", |_| {
            panic!("must not run: the pipeline cannot work")
        });
        let mut reader = fake("reader", |_| Ok(()));
        reader.requires = vec![Analysis::Tib];
        let e = run(&mut cx, vec![first, reader]).unwrap_err().to_string();
        assert_eq!(
            e,
            "pass 'reader': needs 'detect-tib' to run before it (e.g. --passes detect-tib,reader)"
        );
    }

    #[test]
    fn accessors_name_the_running_pass() {
        let options = Options::default();
        let mut cx = PassContext::new(model(), &options);
        let e = run(
            &mut cx,
            vec![fake("peek", |cx| cx.calibration().map(|_| ()))],
        )
        .unwrap_err()
        .to_string();
        assert!(e.starts_with("pass 'peek': needs 'calibrate'"), "{e}");
    }

    #[test]
    fn invalidated_analyses_are_cleared_and_no_longer_satisfy() {
        let options = Options::default();
        let mut cx = PassContext::new(model(), &options);
        cx.calibration = Some(Calibration::default());
        let mut wipe = fake("wipe", |_| Ok(()));
        wipe.invalidates = &[Analysis::Calibration];
        let mut reader = fake("reader", |_| panic!("must not run"));
        reader.requires = vec![Analysis::Calibration];
        let e = run(&mut cx, vec![wipe, reader]).unwrap_err().to_string();
        assert!(e.starts_with("pass 'reader': needs 'calibrate'"), "{e}");
        let mut wipe = fake("wipe", |_| Ok(()));
        wipe.invalidates = &[Analysis::Calibration];
        run(&mut cx, vec![wipe]).unwrap();
        assert!(cx.calibration.is_none());
        assert_eq!(cx.done, ["wipe"]);
    }

    #[test]
    fn errors_carry_the_pass_name_once_and_keep_their_kind() {
        let options = Options::default();
        let mut cx = PassContext::new(model(), &options);
        let e = run(&mut cx, vec![fake("p", |_| Err(Error::invalid("bad")))]).unwrap_err();
        assert_eq!(e.to_string(), "pass 'p': bad");
        let e = run(&mut cx, vec![fake("p", |_| Err(Error::pass("p", "own")))]).unwrap_err();
        assert_eq!(e.to_string(), "pass 'p': own");
        let e = run(
            &mut cx,
            vec![fake("p", |_| Err(Error::Engine("boom".into())))],
        )
        .unwrap_err();
        assert!(!e.is_user_error());
        assert_eq!(e.to_string(), "execution failed: pass 'p': boom");
    }

    #[test]
    fn a_pass_that_breaks_the_graph_is_named() {
        let options = Options::default();
        let mut cx = PassContext::new(model(), &options);
        let e = run(
            &mut cx,
            vec![fake("breaker", |cx| {
                let n = Node::new("n", "Relu", vec!["nowhere".into()], vec!["y".into()]);
                cx.model.graph.add_node(n).map(|_| ())
            })],
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.starts_with("pass 'breaker': left an invalid graph: "),
            "{e}"
        );
        assert!(e.contains("nowhere"), "{e}");
    }

    #[test]
    fn quantize_declares_the_step_index_for_numbered_step_groups() {
        let q = quantize::Quantize;
        let mut options = Options::default();
        assert_eq!(q.requires(&options), [Analysis::Calibration]);
        options.step_groups = StepGroups::Fixed(4);
        assert_eq!(
            q.requires(&options),
            [Analysis::Calibration, Analysis::StepIndex]
        );
        options.baseline_minmax = true;
        assert_eq!(q.requires(&options), [Analysis::Calibration]);
    }
}
