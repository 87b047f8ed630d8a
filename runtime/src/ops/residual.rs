//! A residual `Add` fused into the epilogue of the int8 convolution (or linear layer)
//! that produces one of its operands.
//!
//! A ResNet block ends in `skip(x) + h` (and adds the time embedding after its first
//! conv: `h + temb[:, :, None, None]`), where `h` is a lowered convolution's f32 output.
//! tract runs that `Add` as an op of its own: it reads two f32 tensors and writes a third,
//! after the kernel wrote `h`. The lowering ([`crate::lower`]) gives the convolution the
//! other operand as its last input instead (attribute [`RESIDUAL`]), and the kernel's
//! store adds it to each value as it writes it ([`Output::Sum`]): one f32 addition per
//! value, the same one tract's `Add` makes, so the result is bit-identical to the unfused
//! graph (`tests/residual.rs`). A linear layer (`TfmqcQGemm`: a transformer block's
//! `x + proj(..)`) adds an operand of its output's shape the same way; any other
//! broadcast is added after the kernel.

use tract_onnx::tract_hir::internal::*;

use crate::kernels::int8::{Addend, Dequant, Output};

/// The attribute (int 1) of a lowered node whose last input is added to its output.
pub const RESIDUAL: &str = "residual";

/// Whether the fusion is on: `TFMQC_FUSE_RESIDUAL=0` turns it off (read once per
/// process; the "before" rows of BENCHMARKS.md), as do [`super::requant::unfused`] and
/// [`unfused`] on their thread.
pub fn enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    !super::requant::forced_off()
        && !OFF.get()
        && *ON.get_or_init(|| std::env::var("TFMQC_FUSE_RESIDUAL").as_deref() != Ok("0"))
}

/// Whether residual `Add`s after int8 linear layers (`TfmqcQGemm`) are fused too:
/// only with `TFMQC_FUSE_RESIDUAL=all`. Measured on the SD-1.5-size UNet at latent 32
/// (`tfmqc bench … --profile`, 1 thread), fusing them made the 160 linear layers 463 →
/// 589 ms a step (the whole step 1.56 → 1.78 s), while on digits_cond the gain was within
/// noise (3.06 → 3.04 ms); the convolutions' fusion is kept (ddpm_digits 1.65 → 1.40 ms,
/// SD's convs unchanged).
pub fn gemm_enabled() -> bool {
    static ALL: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    enabled() && *ALL.get_or_init(|| std::env::var("TFMQC_FUSE_RESIDUAL").as_deref() == Ok("all"))
}

thread_local! {
    static OFF: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f` with this fusion alone off on this thread (the other fusions as they are):
/// the reference the exactness tests compare the fused node with.
pub fn unfused<R>(f: impl FnOnce() -> R) -> R {
    crate::scoped::with_local(&OFF, true, f)
}

/// How the addend of shape `r` lines up with a convolution output of shape `out`
/// (`[N, C, ..]`): element by element (the same shape), or one value per `(image,
/// channel)` plane (`[N or 1, C, 1, ..]`, or that without its leading 1). `None`: any
/// other broadcast, which [`add_broadcast`] does after the kernel.
pub(crate) fn addend<'a>(out: &[usize], r: &[usize], values: &'a [f32]) -> Option<Addend<'a>> {
    if out == r {
        return Some(Addend::Same(values));
    }
    // Right-aligned onto `out`: a missing leading axis is 1.
    let r: Vec<usize> = std::iter::repeat_n(1, out.len().checked_sub(r.len())?)
        .chain(r.iter().copied())
        .collect();
    let planes = out.len() >= 3
        && (r[0] == 1 || r[0] == out[0])
        && r[1] == out[1]
        && r[2..].iter().all(|&d| d == 1);
    let plane: usize = out[2..].iter().product();
    (planes && plane > 0 && !values.is_empty()).then_some(Addend::Planes { values, plane })
}

/// `out + r` with ONNX (numpy) broadcasting: the unfused `Add`, for shapes [`addend`]
/// does not fuse.
pub(crate) fn add_broadcast(out: Tensor, r: &Tensor) -> TractResult<Tensor> {
    let a = out.to_plain_array_view::<f32>()?;
    let b = r.to_plain_array_view::<f32>()?;
    let sum = &a + &b;
    Ok(sum.into_tensor())
}

/// The output fact's shape of a lowered node whose kernel writes `kernel_out`: with a
/// residual (its last input), the broadcast of the two; the one rule for every fused op.
pub(crate) fn output_fact_shape(
    kernel_out: TVec<TDim>,
    residual: bool,
    inputs: &[&TypedFact],
) -> TractResult<TVec<TDim>> {
    match residual {
        true => {
            let r = inputs.last().expect("checked by the rules");
            sum_shape(&kernel_out, &r.shape.to_tvec())
        }
        false => Ok(kernel_out),
    }
}

/// The output shape of a lowered node writing `out` plus an addend of shape `r`.
pub(crate) fn sum_shape<D: DimLike>(out: &[D], r: &[D]) -> TractResult<TVec<D>> {
    tract_onnx::tract_core::broadcast::multi_broadcast(&[out, r])
}

/// The kernel output of a lowered node writing f32 `out` plus `addend`, with its fused
/// output pair if any ([`super::requant::output`] without an addend).
pub(crate) fn output<'a>(
    pair: Option<(f32, u8)>,
    out: &'a mut [f32],
    dequant: Dequant<'a>,
    addend: Option<Addend<'a>>,
) -> Output<'a> {
    match addend {
        None => super::requant::output(pair, out, dequant),
        Some(addend) => Output::Sum {
            out,
            dequant,
            requant: pair,
            addend,
        },
    }
}
