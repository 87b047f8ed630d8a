//! A plan per concrete input shape for models whose inputs have symbolic dims (a batch `N`).
//!
//! tract optimizes a model whose batch is a symbol less well than the same model with a
//! number: it proves two operands' shapes equal only when they are numbers, so element-wise
//! products keep their generic broadcasting kernel instead of the by-scalar / same-shape
//! ones (unet2d_cond_dynbatch: 46 `Mul` nodes at 2.1 ms a step where the fixed-batch export
//! runs them in 0.04 ms). [`ShapePlans`] keeps the decluttered model with its symbols and,
//! the first time a call brings new values for them, binds them
//! (`TypedModel::set_symbols`), declutters and optimizes again and plans that model. The
//! few plans a sampler needs (its batch, the CFG-doubled one) stay in a small cache.
//!
//! Each plan gets clones of the ops and constants: the int8 ops hold their packed weights
//! behind `Arc` and tract's constants are `Arc<Tensor>`, so those are shared, not copied.
//! What a plan does not share are the weights tract packs for its own float kernels (the
//! float convolutions and matrix products left in the model): each plan packs them again,
//! and the kept decluttered model holds them unpacked. That is why [`crate::Engine`] makes
//! plans per shape by default only for models on the int8 kernels, where those weights
//! are a small part (the stem and head convolutions, a few kept layers).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use tract_onnx::prelude::*;

/// Plans for this many sets of symbol values at most; the least recently used one goes.
pub(crate) const CAPACITY: usize = 4;

/// What one set of symbol values gave.
struct Built {
    /// The plan, or why there is none (the generic plan runs instead).
    plan: std::result::Result<Arc<TypedSimplePlan>, String>,
    /// Binding the symbols, decluttering, optimizing and planning.
    time: Duration,
}

type Entry = (Vec<i64>, Arc<OnceLock<Built>>);

pub(crate) struct ShapePlans {
    /// Decluttered, not optimized: optimization decisions depend on the shapes.
    model: TypedModel,
    /// The symbols of the inputs' dims, in the order of the cache's keys.
    symbols: Vec<Symbol>,
    /// Each input's dims as the model declares them.
    inputs: Vec<TVec<TDim>>,
    /// Most recently used first. Entries are built outside the lock (a build takes as
    /// long as loading); callers with the same values wait on the entry, not the cache.
    cache: Mutex<VecDeque<Entry>>,
}

/// One set of symbol values an engine has made a plan for ([`crate::Engine::shape_plans`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShapePlan {
    /// `(symbol, value)` for each symbolic dim of the inputs, e.g. `[("N", 2)]`.
    pub values: Vec<(String, i64)>,
    /// `None` when the plan was made; otherwise why not (calls with these values run the
    /// plan for the symbolic shapes).
    pub failure: Option<String>,
    /// What making it cost, paid once by the first call with these values.
    pub build_time: Duration,
}

impl ShapePlans {
    /// `None` when no input has a symbolic dim.
    pub(crate) fn new(model: TypedModel) -> TractResult<Option<ShapePlans>> {
        let mut symbols = vec![];
        let mut inputs = vec![];
        for outlet in model.input_outlets()? {
            let shape = model.outlet_fact(*outlet)?.shape.to_tvec();
            for sym in shape.iter().flat_map(|d| d.symbols()) {
                if !symbols.contains(&sym) {
                    symbols.push(sym);
                }
            }
            inputs.push(shape);
        }
        if symbols.is_empty() {
            return Ok(None);
        }
        Ok(Some(ShapePlans {
            model,
            symbols,
            inputs,
            cache: Mutex::new(VecDeque::with_capacity(CAPACITY)),
        }))
    }

    /// The symbols' values given by these input shapes; `None` when they do not say (a
    /// rank or a fixed dim that differs, two values for one symbol, a dim that is an
    /// expression of symbols no plain dim gives): the generic plan then runs and says
    /// what is wrong, as it did before there were plans per shape.
    fn values(&self, shapes: &[&[usize]]) -> Option<Vec<i64>> {
        if shapes.len() != self.inputs.len() {
            return None;
        }
        let mut known = SymbolValues::default();
        let mut values: Vec<Option<i64>> = vec![None; self.symbols.len()];
        for (dims, shape) in self.inputs.iter().zip(shapes) {
            if dims.len() != shape.len() {
                return None;
            }
            for (dim, &given) in dims.iter().zip(shape.iter()) {
                if let TDim::Sym(sym) = dim {
                    let slot = self.symbols.iter().position(|s| s == sym)?;
                    match values[slot] {
                        Some(v) if v != given as i64 => return None,
                        Some(_) => {}
                        None => {
                            values[slot] = Some(given as i64);
                            known.set(sym, given as i64);
                        }
                    }
                }
            }
        }
        for (dims, shape) in self.inputs.iter().zip(shapes) {
            for (dim, &given) in dims.iter().zip(shape.iter()) {
                if dim.eval(&known).to_i64().ok() != Some(given as i64) {
                    return None;
                }
            }
        }
        // A zero-sized batch would turn values into constants: leave it to the generic plan.
        values.into_iter().map(|v| v.filter(|&v| v >= 1)).collect()
    }

    /// The plan for inputs of these shapes, made on the first call with their symbol
    /// values; `None` when the generic plan is to run (the shapes do not give the values,
    /// or making the plan failed: said once on stderr and in [`ShapePlans::plans`]).
    pub(crate) fn plan_for(&self, shapes: &[&[usize]]) -> Option<Arc<TypedSimplePlan>> {
        let key = self.values(shapes)?;
        let entry = {
            let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
            match cache.iter().position(|(k, _)| *k == key) {
                Some(i) => {
                    let hit = cache.remove(i).expect("position is in the cache");
                    cache.push_front(hit);
                }
                None => {
                    cache.truncate(CAPACITY - 1);
                    cache.push_front((key.clone(), Arc::new(OnceLock::new())));
                }
            }
            cache[0].1.clone()
        };
        // Outside the cache's lock: other values' plans stay usable while this one builds.
        let built = entry.get_or_init(|| {
            let start = Instant::now();
            let plan = self.build(&key);
            if let Err(why) = &plan {
                eprintln!(
                    "tfmqc: no plan for {}: {why}; running the plan for symbolic shapes",
                    self.describe(&key)
                );
            }
            Built {
                plan,
                time: start.elapsed(),
            }
        });
        built.plan.as_ref().ok().cloned()
    }

    fn build(&self, values: &[i64]) -> std::result::Result<Arc<TypedSimplePlan>, String> {
        let subs: std::collections::HashMap<Symbol, TDim> = self
            .symbols
            .iter()
            .cloned()
            .zip(values.iter().map(|&v| TDim::Val(v)))
            .collect();
        // tract panics on some models instead of failing: a panic here costs the speed-up,
        // not the call.
        let step = |what: &str, e: TractError| format!("{what}: {e:#}");
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.model
                .set_symbols(&subs)
                .map_err(|e| step("binding the symbols", e))?
                .into_optimized()
                .map_err(|e| step("optimizing", e))?
                .into_runnable()
                .map_err(|e| step("planning", e))
        }))
        .map_err(|panic| {
            let what = crate::engine::panic_message(panic.as_ref());
            format!("tract panicked: {what}")
        })?
    }

    fn describe(&self, values: &[i64]) -> String {
        self.named(values)
            .iter()
            .map(|(s, v)| format!("{s}={v}"))
            .collect::<Vec<_>>()
            .join(", ")
    }

    fn named(&self, values: &[i64]) -> Vec<(String, i64)> {
        self.symbols
            .iter()
            .map(|s| s.to_string())
            .zip(values.iter().copied())
            .collect()
    }

    /// The cached plans, most recently used first (ones still being made are left out).
    pub(crate) fn plans(&self) -> Vec<ShapePlan> {
        let cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        cache
            .iter()
            .filter_map(|(key, entry)| {
                let built = entry.get()?;
                Some(ShapePlan {
                    values: self.named(key),
                    failure: built.plan.as_ref().err().cloned(),
                    build_time: built.time,
                })
            })
            .collect()
    }
}
