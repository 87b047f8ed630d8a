//! Group normalization (+ SiLU) as one op ([`crate::kernels::norm::group_norm`]):
//!
//! ```text
//! r = Reshape(x, [N|0, G, -1])
//! i = InstanceNormalization(r, s[G], b[G], epsilon)
//! y = Add(Mul(Reshape(i, Shape(x) | constant), γ[C, 1, ..]), β[C, 1, ..])
//! [ y = Mul(y, Sigmoid(y)) ]
//! ```
//!
//! (diffusers' and guided-diffusion's `GroupNorm` exports, with the SiLU that follows in
//! every ResNet block), every intermediate read only by the next node, becomes one
//! `TfmqcGroupNorm` node: one pass for the statistics of each (image, group), one for the
//! output, split over the threads. tract runs the same as a dozen single-threaded
//! element-wise and reduce nodes. Float only: the result differs from tract's by float
//! rounding (statistics accumulated in f64; the SiLU's `exp` within 2 ulp).

use tract_onnx::pb;
use tract_onnx::tract_hir::internal::*;

use crate::kernels::norm::{group_norm, GroupNorm};
use crate::lower::{Index, Rewrite};
use crate::ops::conv::{attr, attr_float, attr_int, float_attr, floats_attr, int_attr, ints_attr};

/// The op name of fused group normalizations (domain `ai.tfmqc`).
pub const GROUP_NORM: &str = "TfmqcGroupNorm";

#[derive(Debug, Clone, PartialEq)]
pub struct QGroupNorm {
    pub groups: usize,
    pub epsilon: f32,
    pub group_scale: Vec<f32>,
    pub group_bias: Vec<f32>,
    pub gamma: Vec<f32>,
    pub beta: Vec<f32>,
    pub silu: bool,
    /// Rank of γ / β as stored (`[C, 1, ..]`): they broadcast onto axis 1 only for an
    /// input of rank `affine_rank + 1`.
    pub affine_rank: usize,
    /// The constant shape of the Reshape back (ONNX rules: 0 copies, −1 infers), if
    /// not `Shape(x)`: it must give the input's shape.
    pub out_shape: Option<Vec<i64>>,
}

impl Eq for QGroupNorm {}

impl QGroupNorm {
    fn check<D: DimLike>(&self, shape: &[D]) -> TractResult<()> {
        let c = self.gamma.len();
        ensure!(
            shape.len() == self.affine_rank + 1 && shape[1].to_usize().ok() == Some(c),
            "{GROUP_NORM}: input {shape:?} does not take γ [{c}, 1, ..] of rank {}",
            self.affine_rank
        );
        if let Some(o) = &self.out_shape {
            let same = o.len() == shape.len()
                && o.iter()
                    .zip(shape)
                    .all(|(&v, d)| v == 0 || v == -1 || d.to_usize().ok() == Some(v as usize))
                && o.iter().filter(|&&v| v == -1).count() <= 1;
            ensure!(
                same,
                "{GROUP_NORM}: the Reshape back to {o:?} does not restore {shape:?}"
            );
        }
        Ok(())
    }
}

impl Op for QGroupNorm {
    fn name(&self) -> StaticName {
        GROUP_NORM.into()
    }
    op_as_typed_op!();
}

impl EvalOp for QGroupNorm {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let input = args_1!(inputs);
        let shape = input.shape();
        self.check(shape)?;
        let plain = input.try_as_plain_ram()?;
        let x = plain.as_slice::<f32>()?;
        let (n, c) = (shape[0], shape[1]);
        let s: usize = shape[2..].iter().product();
        let mut out = Tensor::zero::<f32>(shape)?;
        group_norm(
            x,
            n,
            c,
            s,
            &GroupNorm {
                groups: self.groups,
                epsilon: self.epsilon,
                group_scale: &self.group_scale,
                group_bias: &self.group_bias,
                gamma: &self.gamma,
                beta: &self.beta,
                silu: self.silu,
            },
            out.try_as_plain_ram_mut()?.as_slice_mut::<f32>()?,
        );
        Ok(tvec!(out.into_tvalue()))
    }
}

impl TypedOp for QGroupNorm {
    as_op!();

    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        self.check(&inputs[0].shape)?;
        Ok(tvec!(f32::fact(inputs[0].shape.clone())))
    }
}

fn group_norm_rules<'p>(
    _op: &dyn Op,
    s: &mut Solver,
    inputs: &'p [TensorProxy],
    outputs: &'p [TensorProxy],
) -> InferenceResult {
    check_input_arity(inputs, 1)?;
    check_output_arity(outputs, 1)?;
    s.equals(&inputs[0].datum_type, f32::datum_type())?;
    s.equals(&outputs[0].datum_type, f32::datum_type())?;
    s.equals(&inputs[0].shape, &outputs[0].shape)?;
    Ok(())
}

/// tract op builder for `TfmqcGroupNorm` nodes.
pub fn build_group_norm(
    _ctx: &tract_onnx::model::ParsingContext,
    node: &pb::NodeProto,
) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    let find = |name: &str| attr(node, name);
    let op = QGroupNorm {
        groups: find("groups")?.i as usize,
        epsilon: find("epsilon")?.f,
        group_scale: find("group_scale")?.floats.clone(),
        group_bias: find("group_bias")?.floats.clone(),
        gamma: find("gamma")?.floats.clone(),
        beta: find("beta")?.floats.clone(),
        silu: find("silu")?.i != 0,
        affine_rank: find("affine_rank")?.i as usize,
        out_shape: find("out_shape").ok().map(|a| a.ints.clone()),
    };
    ensure!(
        op.groups > 0
            && op.gamma.len().is_multiple_of(op.groups)
            && op.beta.len() == op.gamma.len()
            && op.group_scale.len() == op.groups
            && op.group_bias.len() == op.groups,
        "{GROUP_NORM} '{}': inconsistent parameters",
        node.name
    );
    Ok((
        tract_onnx::tract_hir::ops::expandable::inference_wrap(op, 1, group_norm_rules),
        vec![],
    ))
}

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
    (attr_int(fwd, "allowzero", 0) == 0 && attr_int(back, "allowzero", 0) == 0).then_some(())?;
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
        int_attr("groups", groups as i64),
        float_attr("epsilon", attr_float(inorm, "epsilon", 1e-5)),
        floats_attr("group_scale", group_scale),
        floats_attr("group_bias", group_bias),
        floats_attr("gamma", gamma),
        floats_attr("beta", beta),
        int_attr("silu", silu as i64),
        int_attr("affine_rank", affine_rank as i64),
    ];
    node.attribute
        .extend(out_shape.map(|o| ints_attr("out_shape", o)));
    Some(Rewrite { node, weight: None })
}
