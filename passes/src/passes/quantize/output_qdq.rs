//! `--output-qdq`: which quantized Convs get a Q/DQ pair on their output (each pair's
//! cost in output SQNR measured on the calibration records under `auto`).

use super::*;

/// Puts a QuantizeLinear/DequantizeLinear pair on the output `y` of a quantized Conv and
/// makes every reader of `y` read the dequantized value, so that the Conv's only reader
/// is the QuantizeLinear (what onnxruntime's QDQ Conv fusion asks). When `y` is already
/// quantized as the input of another quantized layer, that pair is shared (same scale).
pub(super) fn add_output_qdq(g: &mut Graph, y: &str, params: (f32, u8)) -> Result<()> {
    let users = g.consumers(y);
    let existing = users.iter().find_map(|&(ix, slot)| {
        let n = g.node(ix);
        if slot != 0 || !n.is_onnx_op("QuantizeLinear") {
            return None;
        }
        let q = n.outputs[0].clone();
        g.consumers(&q).into_iter().find_map(|(c, _)| {
            let d = g.node(c);
            d.is_onnx_op("DequantizeLinear")
                .then(|| (ix, d.outputs[0].clone()))
        })
    });
    let (skip, dq) = match existing {
        Some((q, dq)) => (Some(q), dq),
        None => (None, insert_qdq(g, y, &[params.0], params.1, None)?),
    };
    for (ix, slot) in users {
        if Some(ix) != skip {
            g.set_input(ix, slot, &dq);
        }
    }
    Ok(())
}

/// Longest the per-layer measurements of `--output-qdq auto` may take (seconds,
/// estimated from the first measurement in work seconds, which the machine's load does not
/// change: [`crate::analysis::budget::WorkClock`]); beyond, no output pairs are added.
pub(super) const OUTPUT_QDQ_MAX_SECONDS: f64 = 300.0;
/// Calibration records `--output-qdq auto` measures on (evenly spread over the steps).
pub(super) const OUTPUT_QDQ_RECORDS: usize = 16;

/// `--output-qdq`: Q/DQ pairs on the outputs of quantized Convs (see [`OutputQdq`]).
#[allow(clippy::too_many_arguments)]
pub(super) fn output_qdq(
    model: &mut Model,
    options: &Options,
    cal: &Calibration,
    quantized: &[crate::analysis::targets::Target],
    steps: &[i64],
    plan: &mut QuantPlan,
    progress: &dyn Fn(&str),
) -> Result<()> {
    if options.output_qdq == OutputQdq::None {
        return Ok(());
    }
    // Packed INT4 weights: onnxruntime's QLinearConv fusion takes 8-bit weights only
    // (BENCHMARKS.md, "Packed INT4 weights"), so under `auto` no pair would be fused and
    // every one would only round (ddim_unet W4A8: 38 pairs; without them 12.80 → 12.85 dB
    // mean output SQNR on 16 held-out images).
    if options.output_qdq == OutputQdq::Auto
        && options.weight_bits <= 4
        && options.int4_storage == crate::options::Int4Storage::Packed
    {
        plan.output_qdq_note = Some(format!(
            "no output Q/DQ: onnxruntime fuses no Conv with INT4 weights (--int4-storage int8 or --output-qdq all add them); {} int32 biases",
            plan.int32_biases
        ));
        return Ok(());
    }
    let per_step = |value: &String| {
        plan.activations
            .iter()
            .any(|a| &a.value == value && a.groups.len() > 1)
    };
    let mut candidates = vec![];
    for (node, y) in conv_outputs(&model.graph, quantized) {
        // `auto`: a Conv whose input takes per-step scales reads a `Mul(·, s[g])`, not a
        // DequantizeLinear: onnxruntime cannot fuse it (nor does its bias become int32),
        // so a pair on its output would only add rounding (ddim_unet W4A8: 44 pairs
        // chosen, 12 of them on such Convs; ddpm_digits W8A8: all 6). `all` keeps them.
        let input_per_step = quantized
            .iter()
            .find(|t| t.node == node)
            .is_some_and(|t| t.activations.iter().any(per_step));
        if input_per_step && options.output_qdq == OutputQdq::Auto {
            continue;
        }
        // The range: the pair already on y when y is a quantized input, else calibration's.
        let params = match plan.activations.iter().find(|a| a.value == y) {
            // Its readers quantize it per step: a constant pair would quantize it twice.
            Some(a) if a.groups.len() > 1 => continue,
            Some(a) => a.groups[0],
            None => match cal.per_step.contains_key(&y) {
                true => {
                    let r = group_range(cal, &y, steps, false)?;
                    act_params_u8(r.min, r.max)
                }
                false => continue,
            },
        };
        candidates.push((node, y, params));
    }
    if candidates.is_empty() {
        return Ok(());
    }
    let apply = |m: &mut Model, chosen: &[usize]| -> Result<()> {
        for &k in chosen {
            let (_, y, p) = &candidates[k];
            add_output_qdq(&mut m.graph, y, *p)?;
        }
        Ok(())
    };
    let all: Vec<usize> = (0..candidates.len()).collect();
    let (chosen, costs) = match options.output_qdq {
        OutputQdq::All => (all, vec![None; candidates.len()]),
        _ => match choose_output_qdq(model, cal, candidates.len(), &apply, options, progress)? {
            Ok((chosen, costs)) => (chosen, costs.into_iter().map(Some).collect()),
            Err(note) => {
                plan.output_qdq_note = Some(note);
                return Ok(());
            }
        },
    };
    apply(model, &chosen)?;
    plan.output_qdq = candidates
        .iter()
        .enumerate()
        .map(|(k, (node, y, _))| OutputQdqChoice {
            node: node.clone(),
            value: y.clone(),
            cost_db: costs[k],
            chosen: chosen.contains(&k),
        })
        .collect();
    if plan.output_qdq_note.is_none() {
        plan.output_qdq_note = Some(format!(
            "output Q/DQ on {} of {} quantized Convs ({}; onnxruntime runs those on its int8 kernel); {} int32 biases",
            chosen.len(),
            candidates.len(),
            match options.output_qdq {
                OutputQdq::All => "--output-qdq all".to_string(),
                _ => format!("within {} dB", options.output_qdq_budget_db),
            },
            plan.int32_biases
        ));
    }
    Ok(())
}

/// The Convs `--output-qdq auto` chose and each one's measured cost, or why it chose none.
pub(super) type Chosen = std::result::Result<(Vec<usize>, Vec<f64>), String>;

/// `--output-qdq auto`: measures what each output pair alone costs in mean output SQNR on
/// (up to [`OUTPUT_QDQ_RECORDS`]) calibration records, takes them cheapest first while
/// the costs add up to the budget, then measures the chosen set together on every
/// calibration record and drops the most costly until it fits. `Err(note)` when measuring would take too long.
pub(super) fn choose_output_qdq(
    model: &Model,
    cal: &Calibration,
    n: usize,
    apply: &dyn Fn(&mut Model, &[usize]) -> Result<()>,
    options: &Options,
    progress: &dyn Fn(&str),
) -> Result<Chosen> {
    let total = cal.records.len().min(cal.record_outputs.len());
    if total == 0 {
        return Ok(Err(
            "no output Q/DQ: calibration kept no records to measure their cost on".into(),
        ));
    }
    let k = total.min(OUTPUT_QDQ_RECORDS);
    let pick: Vec<usize> = (0..k).map(|i| i * total / k).collect();
    let all: Vec<usize> = (0..total).collect();
    // Mean output SQNR over the steps of the records `on`, with the pairs `chosen`.
    let measure_on = |on: &[usize], chosen: &[usize]| -> Result<f64> {
        let mut m = model.clone();
        apply(&mut m, chosen)?;
        let records: Vec<_> = on.iter().map(|&i| cal.records[i].clone()).collect();
        let steps: Vec<i64> = on.iter().map(|&i| cal.record_steps[i]).collect();
        let reference: Vec<Tensor> = on.iter().map(|&i| cal.record_outputs[i].clone()).collect();
        let per_step =
            crate::analysis::evaluate::output_sqnr_against(&m, &records, &steps, &reference)?;
        Ok(per_step.iter().map(|s| s.sqnr_db).sum::<f64>() / per_step.len().max(1) as f64)
    };
    let measure = |chosen: &[usize]| measure_on(&pick, chosen);
    // From calibration's call time first: at SD scale even one measurement (a plan of the
    // whole model and 16 calls) is minutes, and the per-Conv loop hours.
    let calls = (k * (n + 2) + 2 * total) as f64;
    if cal.call_work_seconds * calls > OUTPUT_QDQ_MAX_SECONDS {
        return Ok(Err(format!(
            "no output Q/DQ: measuring the cost of each of {n} Convs would take over {} ({} calls of {:.1} s); --output-qdq all adds them all, at a cost in output SQNR",
            crate::analysis::budget::human_duration(cal.call_work_seconds * calls),
            calls as u64,
            cal.call_work_seconds
        )));
    }
    // Work seconds, not wall-clock ones: see WorkClock.
    let clock = crate::analysis::budget::WorkClock::start();
    let base = measure(&[])?;
    let estimate = clock.seconds() * (n + 2 + 2 * total / k) as f64;
    if estimate > OUTPUT_QDQ_MAX_SECONDS {
        return Ok(Err(format!(
            "no output Q/DQ: measuring the cost of each of {n} Convs would take about {} (over {OUTPUT_QDQ_MAX_SECONDS} s); --output-qdq all adds them all, at a cost in output SQNR",
            crate::analysis::budget::human_duration(estimate)
        )));
    }
    let mut costs = vec![0f64; n];
    for (i, c) in costs.iter_mut().enumerate() {
        progress(&format!("quantize: output Q/DQ cost, Conv {}/{n}", i + 1));
        *c = (base - measure(&[i])?).max(0.0);
    }
    let budget = options.output_qdq_budget_db;
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| costs[a].total_cmp(&costs[b]));
    let mut chosen = vec![];
    let mut sum = 0.0;
    for &i in &order {
        if sum + costs[i] > budget {
            break;
        }
        sum += costs[i];
        chosen.push(i);
    }
    // Costs do not add exactly and a few records are a rough sample: measure the set on
    // every record, drop the most costly quarter until it fits.
    let base_all = if chosen.is_empty() {
        base
    } else {
        measure_on(&all, &[])?
    };
    while !chosen.is_empty() {
        progress(&format!(
            "quantize: output Q/DQ on {} Convs, checking the cost",
            chosen.len()
        ));
        let cost = base_all - measure_on(&all, &chosen)?;
        if cost <= budget {
            break;
        }
        let keep = chosen.len() - chosen.len().div_ceil(4);
        chosen.truncate(keep);
    }
    chosen.sort_unstable();
    Ok(Ok((chosen, costs)))
}
