//! The lowering side of [`crate::ops::residual`]: an `Add` reading a lowered
//! convolution's output (its only reader) and another tensor is replaced by the
//! convolution, which takes the other operand as its last input and writes the sum.

use std::collections::HashMap;

use super::{Index, Rewrite};
use crate::attr;
use crate::ops::conv::QCONV;
use crate::ops::gemm::QGEMM;
use crate::ops::residual::{enabled, RESIDUAL};

/// For each rewrite in `replaced` (graph index → rewrite) that is a `TfmqcQConv` or a
/// `TfmqcQGemm` whose output is read only by a two-input `Add` of the default domain
/// that no other rewrite replaces (and that is not in `keep`): the rewrite takes the
/// `Add`'s other operand as its last input, writes the `Add`'s output and replaces the
/// `Add` instead (the node it replaced before is left unread, and the lowering's
/// liveness drops it).
///
/// The `Add` comes after both operands' producers in the graph, so the fused node, put
/// in its place, does too; and the convolution does not read the other operand's
/// producer's result through anything else: its output had one reader, the `Add`, so
/// nothing between the two depends on it and no cycle appears.
pub(crate) fn fuse_residual_adds(
    ix: &Index,
    replaced: &mut HashMap<usize, usize>,
    rewrites: &mut [Rewrite],
    keep: &[String],
) {
    if !enabled() {
        return;
    }
    let adds: HashMap<&str, usize> = ix
        .graph
        .node
        .iter()
        .enumerate()
        .filter(|(_, n)| {
            n.op_type == "Add"
                && n.domain.is_empty()
                && n.input.len() == 2
                && n.output.len() == 1
                && n.input.iter().all(|i| !i.is_empty())
        })
        .flat_map(|(j, n)| n.input.iter().map(move |i| (i.as_str(), j)))
        .collect();
    let mut fused: Vec<(usize, usize, usize)> = vec![];
    for (&at, &r) in replaced.iter() {
        let node = &rewrites[r].node;
        let fusable = node.op_type == QCONV
            || (node.op_type == QGEMM && crate::ops::residual::gemm_enabled());
        if !fusable || node.output.len() != 1 {
            continue;
        }
        let out = node.output[0].as_str();
        if !ix.read_once(out) || keep.iter().any(|k| k == out) {
            continue;
        }
        let Some(&j) = adds.get(out) else {
            continue;
        };
        fused.push((at, r, j));
    }
    // In graph order, so that the result does not depend on the map's order.
    fused.sort_unstable();
    for (at, r, j) in fused {
        // An Add another rewrite replaces, or whose other operand is this conv's output
        // too, stays.
        if replaced.contains_key(&j) {
            continue;
        }
        let add = &ix.graph.node[j];
        let out = rewrites[r].node.output[0].clone();
        let other = match (add.input[0] == out, add.input[1] == out) {
            (true, false) => add.input[1].clone(),
            (false, true) => add.input[0].clone(),
            _ => continue,
        };
        let node = &mut rewrites[r].node;
        node.input.push(other);
        node.output = vec![add.output[0].clone()];
        node.attribute.push(attr::int(RESIDUAL, 1));
        replaced.remove(&at);
        replaced.insert(j, r);
    }
}
