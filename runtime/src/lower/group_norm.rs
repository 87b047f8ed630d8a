//! Group normalization (+ SiLU) as one `TfmqcGroupNorm` node ([`crate::ops::group_norm`] has the pattern and the op).

use tract_onnx::pb;

use super::{Index, Rewrite};
use crate::attr;
use crate::ops::group_norm::GROUP_NORM;

/// Whether the fusion is on: `TFMQC_FUSE_GROUP_NORM=0` turns it off (read once per
/// process), e.g. to measure the unfused graph.
fn fusion_enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("TFMQC_FUSE_GROUP_NORM").as_deref() != Ok("0"))
}

/// `op(a, c)` or `op(c, a)` with `c` a constant f32 initializer: `(a, c's tensor)`.
fn with_constant<'g>(
    ix: &Index<'g>,
    n: &'g pb::NodeProto,
    op: &str,
) -> Option<(&'g str, &'g pb::TensorProto)> {
    if n.op_type != op || n.input.len() != 2 {
        return None;
    }
    let konst = |i: usize| ix.initializer(&n.input[i]).filter(|t| t.data_type == 1);
    match (konst(0), konst(1)) {
        (None, Some(t)) => Some((&n.input[0], t)),
        (Some(t), None) => Some((&n.input[1], t)),
        _ => None,
    }
}

fn i64s(ix: &Index, name: &str) -> Option<Vec<i64>> {
    (ix.initializer(name)?.data_type == 7).then_some(())?;
    Some(
        ix.bytes(name)?
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
            .collect(),
    )
}

/// The pattern of the module documentation, ending at `n` (the SiLU's `Mul`, or the
/// affine `Add` when no SiLU follows), as a `TfmqcGroupNorm` node.
pub(crate) fn match_group_norm(ix: &Index, n: &pb::NodeProto) -> Option<Rewrite> {
    if !fusion_enabled() {
        return None;
    }
    // SiLU: Mul(y, Sigmoid(y)), y read by these two only.
    let (add, silu) = match n.op_type.as_str() {
        "Mul" if n.input.len() == 2 => {
            let sig = (0..2).find(|&i| {
                ix.producer(&n.input[i]).is_some_and(|p| {
                    p.op_type == "Sigmoid" && p.input.first() == n.input.get(1 - i)
                })
            })?;
            let y = &n.input[1 - sig];
            (ix.readers(y) == 2 && ix.read_once(&n.input[sig])).then_some(())?;
            (ix.producer(y)?, true)
        }
        "Add" => (n, false),
        _ => return None,
    };
    let (m, beta) = with_constant(ix, add, "Add")?;
    let mul = ix.producer(m)?;
    let (r2, gamma) = with_constant(ix, mul, "Mul")?;
    let back = ix.producer(r2).filter(|p| p.op_type == "Reshape")?;
    let inorm = ix
        .producer(back.input.first()?)
        .filter(|p| p.op_type == "InstanceNormalization" && p.input.len() == 3)?;
    let fwd = ix
        .producer(inorm.input.first()?)
        .filter(|p| p.op_type == "Reshape" && p.input.len() == 2)?;
    let x = &fwd.input[0];
    // `allowzero = 1` would make the shapes' zeros literal.
    (attr::int_or(fwd, "allowzero", 0) == 0 && attr::int_or(back, "allowzero", 0) == 0)
        .then_some(())?;
    for v in [m, r2, &back.input[0], &inorm.input[0]] {
        ix.read_once(v).then_some(())?;
    }
    let group_scale = ix.f32s(&inorm.input[1])?;
    let group_bias = ix.f32s(&inorm.input[2])?;
    let groups = group_scale.len();
    let split = i64s(ix, &fwd.input[1])?;
    (groups > 0
        && group_bias.len() == groups
        && split.len() == 3
        && split[1] == groups as i64
        && split[2] == -1)
        .then_some(())?;
    let out_shape = match ix.producer(&back.input[1]) {
        Some(p)
            if p.op_type == "Shape"
                && p.input.first() == Some(x)
                && p.attribute.iter().all(|a| a.name == "start" && a.i == 0) =>
        {
            None
        }
        Some(_) => return None,
        None => Some(i64s(ix, &back.input[1])?),
    };
    // γ, β: [C, 1, ..].
    let c = *gamma.dims.first()?;
    let affine_rank = gamma.dims.len();
    let channelwise = |t: &pb::TensorProto| {
        t.dims.len() == affine_rank && t.dims[0] == c && t.dims[1..].iter().all(|&d| d == 1)
    };
    (channelwise(gamma) && channelwise(beta) && c > 0 && (c as usize).is_multiple_of(groups))
        .then_some(())?;
    let (gamma, beta) = (ix.f32s(&gamma.name)?, ix.f32s(&beta.name)?);
    let mut node = pb::NodeProto {
        name: format!("{}/group_norm", n.name),
        op_type: GROUP_NORM.into(),
        domain: "ai.tfmqc".into(),
        input: vec![x.clone()],
        output: vec![n.output[0].clone()],
        ..Default::default()
    };
    node.attribute = vec![
        attr::int("groups", groups as i64),
        attr::float("epsilon", attr::float_or(inorm, "epsilon", 1e-5)),
        attr::floats("group_scale", group_scale),
        attr::floats("group_bias", group_bias),
        attr::floats("gamma", gamma),
        attr::floats("beta", beta),
        attr::int("silu", silu as i64),
        attr::int("affine_rank", affine_rank as i64),
    ];
    node.attribute
        .extend(out_shape.map(|o| attr::ints("out_shape", o)));
    Some(Rewrite { node, weight: None })
}
