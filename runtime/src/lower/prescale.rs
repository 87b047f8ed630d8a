//! The lowering side of [`crate::ops::prescale`]: a per-channel constant `Mul` before a
//! quantized convolution's (or linear layer's) input quantizer moves into the lowered
//! node's `a_prescale`.

use super::qdq::ActQ;
use tract_onnx::pb;

use super::Index;
use crate::attr;
use crate::ops::prescale::{enabled, A_PRESCALE};

/// If `act.x` is `Mul(y, r)` (read only by the quantizer) with `r` a constant f32 of one
/// factor per channel of a rank-`rank` input of `channels` channels (`[C, 1, ..]`, or with
/// a leading 1), moves `act.x` to `y` and returns the `a_prescale` attribute holding `r`.
pub(crate) fn fold_channel_scale(
    ix: &Index,
    act: &mut ActQ,
    channels: usize,
    rank: usize,
) -> Option<tract_onnx::pb::AttributeProto> {
    let mul = prescale_mul(ix, act)?;
    let per_channel = |name: &str| -> Option<Vec<f32>> {
        let t = ix.initializer(name).filter(|t| t.data_type == 1)?;
        let d: Vec<i64> = t.dims.clone();
        // Broadcast onto axis 1 of the rank-`rank` input: [C, 1, ..] of rank − 1, or
        // [1, C, 1, ..] of rank `rank`.
        let c = channels as i64;
        let ok = match d.len() {
            n if n + 1 == rank => d[0] == c && d[1..].iter().all(|&v| v == 1),
            n if n == rank => d[0] == 1 && d[1] == c && d[2..].iter().all(|&v| v == 1),
            _ => false,
        };
        let v = ok.then(|| ix.f32s(name))??;
        (v.len() == channels).then_some(v)
    };
    let (y, r) = match (per_channel(&mul.input[1]), per_channel(&mul.input[0])) {
        (Some(r), _) if ix.initializer(&mul.input[0]).is_none() => (&mul.input[0], r),
        (_, Some(r)) if ix.initializer(&mul.input[1]).is_none() => (&mul.input[1], r),
        _ => return None,
    };
    act.x = y.clone();
    Some(attr::floats(A_PRESCALE, r))
}

/// The `Mul` producing `act.x` when the fold is on and only the quantizer reads it.
fn prescale_mul<'g>(ix: &Index<'g>, act: &ActQ) -> Option<&'g pb::NodeProto> {
    if !enabled() || !ix.read_once(&act.x) {
        return None;
    }
    ix.producer(&act.x)
        .filter(|m| m.op_type == "Mul" && m.domain.is_empty() && m.input.len() == 2)
}

/// The linear layers' form of [`fold_channel_scale`]: `act.x` is `Mul(y, r)` with `r` a
/// constant f32 `[k]` (one factor per input column of a `Gemm` / `MatMul` reading `k`
/// columns; what TCR writes). Only the rank-1 form: a higher-rank `r` could broadcast
/// `y` to a larger rank, which the folded node would not reproduce.
pub(crate) fn fold_last_axis_scale(
    ix: &Index,
    act: &mut ActQ,
    k: usize,
) -> Option<tract_onnx::pb::AttributeProto> {
    let mul = prescale_mul(ix, act)?;
    let factors = |name: &str| -> Option<Vec<f32>> {
        let t = ix.initializer(name).filter(|t| t.data_type == 1)?;
        if t.dims != [k as i64] {
            return None;
        }
        ix.f32s(name).filter(|v| v.len() == k)
    };
    let (y, r) = match (factors(&mul.input[1]), factors(&mul.input[0])) {
        (Some(r), _) if ix.initializer(&mul.input[0]).is_none() => (&mul.input[0], r),
        (_, Some(r)) if ix.initializer(&mul.input[1]).is_none() => (&mul.input[1], r),
        _ => return None,
    };
    act.x = y.clone();
    Some(attr::floats(A_PRESCALE, r))
}
