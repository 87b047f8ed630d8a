//! `ObserveSink`: a consumer that keeps an observed value in the plan.
//!
//! [`crate::engine::Engine::run_observing`] shows intermediate values to an observer as
//! tract computes them. tract plans only the nodes the outputs need, and after
//! optimization some observed values are computed by nodes that exist only to produce
//! them (a reshape the consuming matmul absorbed, say). A sink on each observed value
//! keeps its producer in the plan; the sink itself outputs a scalar, so the value is
//! freed after its last consumer as usual instead of living to the end of the run as an
//! output would.

use tract_onnx::tract_hir::internal::*;

/// Consumes one value, outputs an f32 scalar zero.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct ObserveSink;

impl Op for ObserveSink {
    fn name(&self) -> StaticName {
        "TfmqcObserveSink".into()
    }
    op_as_typed_op!();
}

impl EvalOp for ObserveSink {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, _inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        Ok(tvec!(tensor0(0f32).into_tvalue()))
    }
}

impl TypedOp for ObserveSink {
    as_op!();

    fn output_facts(&self, _inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        Ok(tvec!(f32::scalar_fact()))
    }
}
