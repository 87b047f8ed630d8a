//! fold-tib's rewrite: the TIB evaluated for every t in S and replaced by tables (what
//! `--tib lut` does everywhere and TIAR does where it chooses tables).
//!
//! The index of t is computed in standard ONNX ops, and a t outside S must fail in every
//! runtime rather than read a wrong row:
//!
//! ```text
//! pos   = ArgMax(Cast<f32>(Equal(Unsqueeze(t, -1), S)), axis=-1)   first match, or 0
//! miss  = Not(Equal(Gather(S, pos), t))                            t ∉ S
//! index = pos + Cast<i64>(miss) · |S|                              out of range if t ∉ S
//! emb_i = Gather(table_i, index, axis=0)
//! t'    = Gather(S, index, axis=0)          read by the TIB nodes that stay computed
//! ```

use std::collections::HashMap;

use tfmqc_runtime::engine::Optimize;

use crate::analysis::tib::TibAnalysis;
use crate::error::{Error, Result};
use crate::ir::exec::Runner;
use crate::ir::{attr, DType, Dim, Model, Node, Tensor, ValueInfo};
use crate::numerics::table_quant::{self, TableChoice, TableForm, TablePrecision};
use crate::options::meta;

#[derive(Debug, Clone, PartialEq)]
pub struct FoldReport {
    /// The value holding each sample's position in S (out of range if t ∉ S); `None`
    /// when nothing reads it (no tables, one step group).
    pub index_value: Option<String>,
    pub removed_nodes: usize,
    pub tables: usize,
    pub table_bytes: usize,
    /// Which frontier values became tables.
    pub tabled: Vec<bool>,
    /// Each table's frontier value, its stored form and its measured error.
    pub table_forms: Vec<(String, TableChoice)>,
}

impl FoldReport {
    /// `N f32, M int8, …; worst relative MSE …, lowest row cosine …`.
    pub fn forms_summary(&self) -> String {
        let count = |f: TableForm| self.table_forms.iter().filter(|(_, c)| c.form == f).count();
        let worst = self
            .table_forms
            .iter()
            .map(|(_, c)| c.rel_mse)
            .fold(0f64, f64::max);
        let cos = self
            .table_forms
            .iter()
            .map(|(_, c)| c.min_cosine)
            .fold(1f64, f64::min);
        format!(
            "{} f32, {} f16, {} int8 per-row; worst relative MSE {worst:.1e}, lowest row cosine {cos:.6}",
            count(TableForm::F32),
            count(TableForm::F16),
            count(TableForm::Int8)
        )
    }
}

/// The index value's dtype and static shape.
fn index_info(model: &Model, tib: &TibAnalysis) -> Result<ValueInfo> {
    let mut info = model.graph.info(&tib.index_value).unwrap_or_default();
    if info.dtype.is_none() || info.shape.is_none() {
        let facts = crate::ir::exec::value_facts(model)?;
        if let Some(f) = facts.get(&tib.index_value) {
            info.dtype = info
                .dtype
                .or(f.datum_type.and_then(crate::ir::exec::dtype_from_tract));
            info.shape = info.shape.or(f
                .shape
                .as_ref()
                .map(|s| s.iter().map(crate::ir::exec::dim_from_tract).collect()));
        }
    }
    info.name = tib.index_value.clone();
    if info.dtype.is_none() {
        return Err(Error::pass(
            "fold-tib",
            format!("type of the index value '{}' is unknown", tib.index_value),
        ));
    }
    Ok(info)
}

/// A tensor of time steps in the index value's dtype.
fn steps_tensor(dtype: DType, shape: Vec<usize>, steps: &[i64]) -> Result<Tensor> {
    Ok(match dtype {
        DType::I64 => Tensor::from_vec(shape, steps),
        DType::I32 => Tensor::from_vec(shape, &steps.iter().map(|&s| s as i32).collect::<Vec<_>>()),
        DType::F32 => Tensor::from_vec(shape, &steps.iter().map(|&s| s as f32).collect::<Vec<_>>()),
        DType::F64 => Tensor::from_vec(shape, &steps.iter().map(|&s| s as f64).collect::<Vec<_>>()),
        other => {
            return Err(Error::pass(
                "fold-tib",
                format!("time steps of type {other} are not supported"),
            ))
        }
    })
}

/// Evaluates the frontier values for every t in `set`: one table `[|S|, ...]` each.
pub fn evaluate_tables(model: &Model, tib: &TibAnalysis, set: &[i64]) -> Result<Vec<Tensor>> {
    let info = index_info(model, tib)?;
    let dtype = info.dtype.expect("checked");
    let rank = info.shape.as_ref().map(|s| s.len()).unwrap_or(1);
    if rank > 1 {
        return Err(Error::pass(
            "fold-tib",
            format!("index value '{}' has rank {rank}", tib.index_value),
        ));
    }
    let fixed_len = match info.shape.as_deref() {
        Some([Dim::Known(l)]) => Some(*l as usize),
        _ => None,
    };
    // The TIB cut out as its own model: index value in, frontier out.
    let mut sub = model.clone();
    let g = &mut sub.graph;
    if let Some((ix, _)) = g.producer(&tib.index_value) {
        g.remove_node(ix);
    }
    let sub_shape = match (rank, fixed_len) {
        (0, _) => vec![],
        (_, Some(l)) => vec![Dim::Known(l as i64)],
        _ => vec![Dim::Symbol("tib_steps".into())],
    };
    g.inputs = vec![ValueInfo::new(&tib.index_value, dtype, sub_shape)];
    g.outputs = tib
        .frontier
        .iter()
        .map(|f| ValueInfo {
            name: f.name.clone(),
            ..Default::default()
        })
        .collect();
    g.value_info.clear();
    g.remove_dead();
    g.validate()
        .map_err(|e| Error::pass("fold-tib", format!("the TIB does not stand alone: {e}")))?;
    let runner = Runner::new(&sub, None, Optimize::Declutter)?;
    let run = |t: Tensor| -> Result<Vec<Tensor>> {
        runner.run(&HashMap::from([(tib.index_value.clone(), t)]))
    };

    // All of S in one batch when the batch is free, else one step at a time.
    if rank == 1 && fixed_len.is_none() {
        let out = run(steps_tensor(dtype, vec![set.len()], set)?)?;
        if out.iter().all(|o| o.shape.first() == Some(&set.len())) {
            return Ok(out);
        }
    }
    let mut rows: Vec<Vec<Tensor>> = vec![vec![]; tib.frontier.len()];
    for &s in set {
        let (shape, values) = match rank {
            0 => (vec![], vec![s]),
            _ => {
                let l = fixed_len.unwrap_or(1);
                (vec![l], vec![s; l])
            }
        };
        let out = run(steps_tensor(dtype, shape, &values)?)?;
        for (k, o) in out.into_iter().enumerate() {
            let row = if rank == 0 {
                o
            } else {
                first_row(&o).ok_or_else(|| {
                    Error::pass(
                        "fold-tib",
                        format!(
                            "frontier value '{}' ({:?}) has no per-sample leading axis",
                            tib.frontier[k].name, o.shape
                        ),
                    )
                })?
            };
            rows[k].push(row);
        }
    }
    rows.into_iter().map(|r| stack(&r)).collect()
}

fn first_row(t: &Tensor) -> Option<Tensor> {
    let (&n, rest) = t.shape.split_first()?;
    if n == 0 {
        return None;
    }
    let bytes = t.data.len() / n;
    Tensor::from_raw(t.dtype, rest.to_vec(), t.data[..bytes].to_vec()).ok()
}

fn stack(rows: &[Tensor]) -> Result<Tensor> {
    let first = &rows[0];
    let mut data = Vec::with_capacity(first.data.len() * rows.len());
    for r in rows {
        if r.shape != first.shape || r.dtype != first.dtype {
            return Err(Error::pass(
                "fold-tib",
                "a temporal feature changes shape with t".to_string(),
            ));
        }
        data.extend_from_slice(&r.data);
    }
    let mut shape = vec![rows.len()];
    shape.extend_from_slice(&first.shape);
    Tensor::from_raw(first.dtype, shape, data)
}

/// Rewrites the graph: index computation, one exact (f32) table per frontier value read
/// by Gather, TIB removed.
pub fn fold(model: &mut Model, tib: &TibAnalysis, set: &[i64]) -> Result<FoldReport> {
    fold_with(model, tib, set, TablePrecision::Fixed(TableForm::F32))
}

/// [`fold`] with the tables stored at `precision` ([`crate::numerics::table_quant`]).
pub fn fold_with(
    model: &mut Model,
    tib: &TibAnalysis,
    set: &[i64],
    precision: TablePrecision,
) -> Result<FoldReport> {
    let tables = evaluate_tables(model, tib, set)?;
    let all = vec![true; tib.frontier.len()];
    fold_tables(model, tib, set, tables, &all, false, precision)
}

/// The form `table` gets at `precision` (exact for a table that is not f32).
pub fn table_choice(table: &Tensor, precision: TablePrecision) -> Result<TableChoice> {
    if table.dtype != DType::F32 || table.shape.is_empty() {
        return Ok(TableChoice {
            form: TableForm::F32,
            bytes: table.byte_len() as u64,
            rel_mse: 0.0,
            min_cosine: 1.0,
        });
    }
    Ok(table_quant::choose(
        &table.to_vec::<f32>()?,
        table.shape[0],
        precision,
    ))
}

/// [`fold`] of the frontier values with `tabled[i]` set, from `tables` (one per frontier
/// value, as [`evaluate_tables`] gives them; the others' are not read). The TIB nodes the
/// other frontier values still need stay in the graph. The index computation is built
/// when a table reads it or `keep_index` is set (step-group tables read it later).
pub fn fold_tables(
    model: &mut Model,
    tib: &TibAnalysis,
    set: &[i64],
    tables: Vec<Tensor>,
    tabled: &[bool],
    keep_index: bool,
    precision: TablePrecision,
) -> Result<FoldReport> {
    assert_eq!(tabled.len(), tib.frontier.len());
    let info = index_info(model, tib)?;
    let dtype = info.dtype.expect("checked");
    let opset = model.onnx_opset();
    let g = &mut model.graph;

    let by_name: HashMap<String, _> = g
        .node_indices()
        .map(|ix| (g.node(ix).name.clone(), ix))
        .collect();
    // Fold nodes the computed (untabled) frontier values still read stay.
    let fold_set: std::collections::HashSet<&str> =
        tib.fold_nodes.iter().map(String::as_str).collect();
    let mut keep: std::collections::HashSet<String> = Default::default();
    let mut stack: Vec<String> = tib
        .frontier
        .iter()
        .zip(tabled)
        .filter(|(_, &t)| !t)
        .map(|(f, _)| f.name.clone())
        .collect();
    while let Some(v) = stack.pop() {
        if let Some((ix, _)) = g.producer(&v) {
            let n = g.node(ix);
            if fold_set.contains(n.name.as_str()) && keep.insert(n.name.clone()) {
                stack.extend(n.inputs.iter().filter(|i| !i.is_empty()).cloned());
            }
        }
    }
    // A frontier value that a computed one is made from stays computed: a table would
    // cost bytes for a value the graph computes anyway.
    let tabled: Vec<bool> = tib
        .frontier
        .iter()
        .zip(tabled)
        .map(|(f, &t)| {
            t && !g
                .producer(&f.name)
                .is_some_and(|(ix, _)| keep.contains(&g.node(ix).name))
        })
        .collect();
    for name in &tib.fold_nodes {
        if keep.contains(name) {
            continue;
        }
        if let Some(&ix) = by_name.get(name) {
            g.remove_node(ix);
        }
    }
    let any_table = tabled.iter().any(|&t| t);
    // A computed frontier value (`keep` non-empty) needs the index too: it reads t
    // through S (below), so that a t outside S fails as a table read does.
    if !any_table && !keep_index && keep.is_empty() {
        g.remove_dead();
        g.validate()?;
        set_metadata(model, tib, set);
        return Ok(FoldReport {
            index_value: None,
            removed_nodes: tib.fold_nodes.len() - keep.len(),
            tables: 0,
            table_bytes: 0,
            tabled,
            table_forms: vec![],
        });
    }

    let t = tib.index_value.clone();
    // The TIB nodes that stay (computed frontier values) and read t itself, before the
    // index computation below adds its own readers.
    let computed_roots: Vec<_> = g
        .consumers(&t)
        .into_iter()
        .filter(|&(ix, _)| keep.contains(&g.node(ix).name))
        .collect();
    let steps = g.add_initializer("tib/timesteps", steps_tensor(dtype, vec![set.len()], set)?);
    let unsq = if opset >= 13 {
        let axes = g.add_initializer("tib/axes_last", Tensor::from_vec(vec![1], &[-1i64]));
        g.add_op("Unsqueeze", vec![t.clone(), axes], "tib/t_column", vec![])?
    } else {
        g.add_op(
            "Unsqueeze",
            vec![t.clone()],
            "tib/t_column",
            vec![attr::ints("axes", [-1])],
        )?
    };
    let eq = g.add_op("Equal", vec![unsq, steps.clone()], "tib/matches", vec![])?;
    let eqf = g.add_op(
        "Cast",
        vec![eq],
        "tib/matches_f32",
        vec![attr::int("to", DType::F32.onnx_code() as i64)],
    )?;
    let pos = g.add_op(
        "ArgMax",
        vec![eqf],
        "tib/position",
        vec![attr::int("axis", -1), attr::int("keepdims", 0)],
    )?;
    let found = g.add_op(
        "Gather",
        vec![steps.clone(), pos.clone()],
        "tib/found_step",
        vec![attr::int("axis", 0)],
    )?;
    let hit = g.add_op("Equal", vec![found, t], "tib/in_set", vec![])?;
    let miss = g.add_op("Not", vec![hit], "tib/not_in_set", vec![])?;
    let missi = g.add_op(
        "Cast",
        vec![miss],
        "tib/not_in_set_i64",
        vec![attr::int("to", DType::I64.onnx_code() as i64)],
    )?;
    let len = g.add_initializer("tib/set_size", Tensor::scalar(set.len() as i64));
    let offset = g.add_op("Mul", vec![missi, len], "tib/out_of_range_offset", vec![])?;
    let index = g.add_op("Add", vec![pos, offset], "tib/index", vec![])?;
    // The computed TIB reads t as S[index]: t itself for t ∈ S, and for t ∉ S a Gather
    // out of range, which onnxruntime and tract refuse — without it a `--tib quant|auto`
    // graph whose values are all computed (and no step-group table reading the index)
    // would run at any t, outside the set its rounding and ranges were fitted on.
    if !computed_roots.is_empty() {
        let checked = g.add_op(
            "Gather",
            vec![steps, index.clone()],
            "tib/step_in_set",
            vec![attr::int("axis", 0)],
        )?;
        for (ix, slot) in computed_roots {
            g.set_input(ix, slot, &checked);
        }
    }

    let mut table_bytes = 0;
    let mut n_tables = 0;
    let mut table_forms = vec![];
    for ((f, table), _) in tib
        .frontier
        .iter()
        .zip(tables)
        .zip(&tabled)
        .filter(|(_, &t)| t)
    {
        let choice = table_choice(&table, precision)?;
        table_bytes += choice.bytes as usize;
        n_tables += 1;
        let base = format!("tib/table/{}", f.name.trim_start_matches('/'));
        add_table(g, &base, &table, &choice, &index, &f.name)?;
        table_forms.push((f.name.clone(), choice));
    }
    // Nothing reads the index yet when no table does: keep it alive for the step-group
    // tables quantize adds later.
    let protect = match !any_table && keep_index {
        true => vec![index.clone()],
        false => vec![],
    };
    g.remove_dead_keeping(&protect);
    g.validate()?;
    set_metadata(model, tib, set);
    Ok(FoldReport {
        index_value: Some(index),
        removed_nodes: tib.fold_nodes.len() - keep.len(),
        tables: n_tables,
        table_bytes,
        tabled,
        table_forms,
    })
}

/// Writes `table` in the form `choice` says, read at `index` into `out`:
///
/// ```text
/// f32:  out = Gather(table, index)
/// f16:  out = Cast<f32>(Gather(table_f16, index))
/// int8: out = DequantizeLinear(Gather(table_q, index), 1, 0) · Gather(row_scales, index)
///             · col_scales
/// ```
///
/// (row_scales `[|S|, 1, …]` broadcasts over the gathered rows, col_scales has a row's
/// shape). Standard ops with constant Q/DQ scales: onnxruntime and tract load it.
fn add_table(
    g: &mut crate::ir::Graph,
    base: &str,
    table: &Tensor,
    choice: &TableChoice,
    index: &str,
    out: &str,
) -> Result<()> {
    let gather = |g: &mut crate::ir::Graph, data: String, output: Option<&str>| -> Result<String> {
        let name = g.fresh_node_name(&format!("{data}/Gather"));
        let output = match output {
            Some(o) => o.to_string(),
            None => g.fresh_name(&format!("{data}/rows")),
        };
        let node = Node::new(
            name,
            "Gather",
            vec![data, index.to_string()],
            vec![output.clone()],
        )
        .with_attr(attr::int("axis", 0));
        g.add_node(node)?;
        Ok(output)
    };
    let finish = |g: &mut crate::ir::Graph, op: &str, inputs: Vec<String>, attrs| -> Result<()> {
        let mut node = Node::new(
            g.fresh_node_name(&format!("{base}/{op}")),
            op,
            inputs,
            vec![out.to_string()],
        );
        node.attributes = attrs;
        g.add_node(node).map(|_| ())
    };
    match choice.form {
        TableForm::F32 => {
            let t = g.add_initializer(base, table.clone());
            gather(g, t, Some(out))?;
        }
        TableForm::F16 => {
            let values = table.to_vec::<f32>()?;
            let t = g.add_initializer(
                &format!("{base}/f16"),
                Tensor::from_raw(
                    DType::F16,
                    table.shape.clone(),
                    table_quant::f16_bytes(&values),
                )?,
            );
            let rows = gather(g, t, None)?;
            finish(
                g,
                "Cast",
                vec![rows],
                vec![attr::int("to", DType::F32.onnx_code() as i64)],
            )?;
        }
        TableForm::Int8 => {
            let values = table.to_vec::<f32>()?;
            let rows = table.shape[0];
            let t = table_quant::int8_rows(&values, rows);
            let qt = g.add_initializer(
                &format!("{base}/int8"),
                Tensor::from_vec(table.shape.clone(), &t.q),
            );
            // [|S|, 1, …]: one scale per gathered row, broadcast over its elements.
            let mut scale_shape = vec![1usize; table.shape.len()];
            scale_shape[0] = rows;
            let s = g.add_initializer(
                &format!("{base}/row_scales"),
                Tensor::from_vec(scale_shape, &t.row_scales),
            );
            // The row's own shape: broadcasts over a batch of rows and over one row alike.
            let c = g.add_initializer(
                &format!("{base}/col_scales"),
                Tensor::from_vec(table.shape[1..].to_vec(), &t.col_scales),
            );
            let unit = g.add_initializer(&format!("{base}/unit_scale"), Tensor::scalar(1f32));
            let zero = g.add_initializer(
                &format!("{base}/zero_point"),
                Tensor::from_vec(vec![], &[0i8]),
            );
            let qrows = gather(g, qt, None)?;
            let levels = g.add_op(
                "DequantizeLinear",
                vec![qrows, unit, zero],
                &format!("{base}/levels"),
                vec![],
            )?;
            let srows = gather(g, s, None)?;
            let scaled = g.add_op(
                "Mul",
                vec![levels, srows],
                &format!("{base}/row_scaled"),
                vec![],
            )?;
            finish(g, "Mul", vec![scaled, c], vec![])?;
        }
    }
    Ok(())
}

fn set_metadata(model: &mut Model, tib: &TibAnalysis, set: &[i64]) {
    let joined: Vec<String> = set.iter().map(|s| s.to_string()).collect();
    model.set_metadata(meta::TIMESTEPS, joined.join(","));
    model.set_metadata(meta::TIMESTEP_INPUT, tib.timestep_input.clone());
    let frontier: Vec<&str> = tib.frontier.iter().map(|f| f.name.as_str()).collect();
    model.set_metadata(meta::TIB_FRONTIER, frontier.join(","));
}
