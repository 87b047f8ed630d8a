//! A linear layer's bias into its lowered node: PyTorch exports `nn.Linear` as `MatMul`
//! followed by `Add` of a constant `[N]` bias, so the lowered `TfmqcQGemm` wrote its
//! product and tract added the bias in a pass of its own (on a GEGLU projection, tract
//! split that `Add` over the two halves that follow: unet2d_cond's two spent ~0.3 ms of a
//! 6.5 ms step). The node takes the bias as its `bias` attribute instead, which its kernel
//! adds as it stores each value: `acc · scale + bias`, the multiply and the add the
//! unfused graph makes (no FMA), so the result is bit-identical.

use super::requant::only_reader;
use super::{Index, Rewrite};
use crate::attr;
use crate::ops::gemm::QGEMM;

thread_local! {
    static OFF: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f` with this fusion alone off on this thread (the others as they are): the
/// reference the exactness test compares the fused nodes with (as
/// [`crate::ops::requant::unfused`], which turns it off too).
pub fn unfused<R>(f: impl FnOnce() -> R) -> R {
    crate::scoped::with_local(&OFF, true, f)
}

/// If `r` is a `TfmqcQGemm` with no bias and no fused output pair whose output (not in
/// `keep`) is read only by a two-input `Add` of the default domain whose other operand is
/// a constant of shape `[N]` (`N` output channels: broadcasting it changes no shape),
/// makes `r` write the `Add`'s output with that bias, and returns the `Add`'s graph index
/// (the node `r` now replaces).
pub(crate) fn fuse_bias_add(ix: &Index, r: &mut Rewrite, keep: &[String]) -> Option<usize> {
    let has = |name: &str| r.node.attribute.iter().any(|a| a.name == name);
    if OFF.get()
        || crate::ops::requant::forced_off()
        || r.node.op_type != QGEMM
        || has("bias")
        || has(crate::ops::requant::O_SCALE)
    {
        return None;
    }
    let n_out = r
        .node
        .attribute
        .iter()
        .find(|a| a.name == "w_scale")?
        .floats
        .len();
    let out = r.node.output.first()?.clone();
    if keep.contains(&out) {
        return None;
    }
    let (at, add) = only_reader(ix, &out).filter(|(_, a)| {
        a.op_type == "Add" && a.domain.is_empty() && a.input.len() == 2 && a.output.len() == 1
    })?;
    let other = match (add.input[0] == out, add.input[1] == out) {
        (true, false) => &add.input[1],
        (false, true) => &add.input[0],
        _ => return None,
    };
    let t = ix.initializer(other)?;
    if t.dims != [n_out as i64] {
        return None;
    }
    let bias = ix.f32s(other).filter(|b| b.len() == n_out)?;
    r.node.output = vec![add.output[0].clone()];
    r.node.attribute.push(attr::floats("bias", bias));
    Some(at)
}
