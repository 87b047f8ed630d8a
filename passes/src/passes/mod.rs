//! The pass manager. A pass is a small named unit over the IR; a pipeline is a list of
//! them, given as text like LLVM's `opt -passes=a,b,c`. Passes state which passes must
//! have run before them (the analyses they read); the manager checks that and can dump
//! the IR after every pass.

pub mod calibrate;
pub mod canonicalize;
pub mod detect_tib;
pub mod fold_tib;
pub mod quantize;
pub mod reparameterize;

use std::time::{Duration, Instant};

use crate::analysis::tib::TibAnalysis;
use crate::error::{Error, Result};
use crate::ir::Model;
use crate::options::Options;
use crate::passes::calibrate::Calibration;
use crate::passes::quantize::QuantPlan;

/// What passes share: the model, the options, and the analyses computed so far.
pub struct PassContext<'a> {
    pub model: Model,
    pub options: &'a Options,
    /// Set by `detect-tib`.
    pub tib: Option<TibAnalysis>,
    /// Set by `fold-tib`: the value holding each sample's position in S.
    pub step_index: Option<String>,
    /// Set by `fold-tib` under `--tib quant|auto` (TIAR and the table choices).
    pub tiar: Option<crate::passes::fold_tib::tiar::TiarReport>,
    /// Set by `calibrate`.
    pub calibration: Option<Calibration>,
    /// Set by `reparameterize` when TCR ran.
    pub tcr: Option<crate::passes::reparameterize::TcrReport>,
    /// Set by `reparameterize` when TCR ran: the float model it rewrote (the same
    /// function as the input; its activations are the ones quantize quantizes, which the
    /// report measures). Cheap: it shares its tensors' bytes with the pipeline's model.
    pub balanced_float: Option<Model>,
    /// Set by `quantize`.
    pub quant: Option<QuantPlan>,
    /// Names of the passes that have run, in order.
    pub done: Vec<&'static str>,
    /// One line per notable finding, shown to the user after the pass.
    pub notes: Vec<String>,
    /// Progress of long work ("calibrate: batch 3/4"); the CLI shows it on a terminal.
    pub progress: &'a dyn Fn(&str),
}

impl<'a> PassContext<'a> {
    pub fn new(model: Model, options: &'a Options) -> PassContext<'a> {
        PassContext {
            model,
            options,
            tib: None,
            step_index: None,
            tiar: None,
            calibration: None,
            tcr: None,
            balanced_float: None,
            quant: None,
            done: vec![],
            notes: vec![],
            progress: &|_| {},
        }
    }

    pub fn note(&mut self, line: impl Into<String>) {
        self.notes.push(line.into());
    }
}

pub trait Pass {
    /// The name used in `--passes`.
    fn name(&self) -> &'static str;
    /// One line for `--print-passes`.
    fn summary(&self) -> &'static str;
    /// Passes that must have run before this one.
    fn requires(&self) -> &'static [&'static str] {
        &[]
    }
    fn run(&self, cx: &mut PassContext) -> Result<()>;
}

/// Every pass tfmqc knows, in the order of the default pipeline.
pub fn registry() -> Vec<Box<dyn Pass>> {
    vec![
        Box::new(crate::passes::canonicalize::Canonicalize),
        Box::new(crate::passes::detect_tib::DetectTib),
        Box::new(crate::passes::fold_tib::FoldTib),
        Box::new(crate::passes::calibrate::Calibrate),
        Box::new(crate::passes::reparameterize::Reparameterize),
        Box::new(crate::passes::quantize::Quantize),
    ]
}

/// The passes run when `--passes` is not given.
pub fn default_pipeline() -> Vec<&'static str> {
    registry().iter().map(|p| p.name()).collect()
}

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

/// `name  summary` lines for `--print-passes`.
pub fn describe_passes() -> String {
    registry()
        .iter()
        .map(|p| {
            let req = if p.requires().is_empty() {
                String::new()
            } else {
                format!(" (after {})", p.requires().join(", "))
            };
            format!("{:<14} {}{req}\n", p.name(), p.summary())
        })
        .collect()
}

/// Called after each pass with its name, the context and the time it took.
pub type AfterPass<'h> = dyn FnMut(&str, &PassContext, Duration) -> Result<()> + 'h;

/// Runs `passes` in order, checking each one's requirements first.
pub fn run_pipeline(
    cx: &mut PassContext,
    passes: &[Box<dyn Pass>],
    after: &mut AfterPass,
) -> Result<()> {
    for pass in passes {
        for req in pass.requires() {
            if !cx.done.contains(req) {
                return Err(Error::pass(
                    pass.name(),
                    format!(
                        "needs '{req}' to run before it (e.g. --passes {req},{})",
                        pass.name()
                    ),
                ));
            }
        }
        let start = Instant::now();
        cx.notes.clear();
        pass.run(cx)?;
        cx.done.push(pass.name());
        after(pass.name(), cx, start.elapsed())?;
    }
    Ok(())
}
