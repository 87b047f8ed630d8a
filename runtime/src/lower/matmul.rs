//! Products of two quantized activations as `TfmqcQMatMul` nodes ([`crate::ops::matmul`] has the pattern and the op), and the reading of `Einsum` equations as matrix products that the attention fusion shares.

use tract_onnx::pb;

use super::qdq::activation_qdq;
use super::{Index, Rewrite};
use crate::attr;
use crate::ops::matmul::QMATMUL;

/// How an Einsum of two operands maps onto a (batched) matrix product.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct EinsumForm {
    pub x_transposed: bool,
    pub y_transposed: bool,
    /// The output is `[.., N, M]`: the product of the swapped operands.
    pub out_transposed: bool,
}

/// Reads `"<batch>mk,<batch>kn-><batch>mn"` in any of its transposed forms: both inputs
/// and the output of the same rank, the same batch letters first and in order, one summed
/// letter among the last two of each input. Anything else is left to tract.
fn einsum_form(equation: &str) -> Option<EinsumForm> {
    let eq: String = equation.chars().filter(|c| !c.is_whitespace()).collect();
    let (lhs, out) = eq.split_once("->")?;
    let (a, b) = lhs.split_once(',')?;
    let (a, b, o): (Vec<char>, Vec<char>, Vec<char>) = (
        a.chars().collect(),
        b.chars().collect(),
        out.chars().collect(),
    );
    let r = a.len();
    let distinct = |t: &[char]| {
        t.iter().all(|c| c.is_ascii_alphabetic()) && (1..t.len()).all(|i| !t[..i].contains(&t[i]))
    };
    if r < 2 || b.len() != r || o.len() != r || !distinct(&a) || !distinct(&b) || !distinct(&o) {
        return None;
    }
    if a[..r - 2] != b[..r - 2] || a[..r - 2] != o[..r - 2] {
        return None;
    }
    let (a2, b2, o2) = (&a[r - 2..], &b[r - 2..], &o[r - 2..]);
    let k = *a2.iter().find(|c| b2.contains(c) && !o2.contains(c))?;
    let m = *a2.iter().find(|&&c| c != k)?;
    let n = *b2.iter().find(|&&c| c != k)?;
    if m == n || !o2.contains(&m) || !o2.contains(&n) {
        return None;
    }
    Some(EinsumForm {
        x_transposed: a2[1] == m,
        y_transposed: b2[1] == k,
        out_transposed: o2[1] == m,
    })
}

/// How a two-input `MatMul` or `Einsum` node multiplies its operands, if it is a (batched)
/// matrix product.
pub(crate) fn product_form(n: &pb::NodeProto) -> Option<EinsumForm> {
    if n.input.len() != 2 {
        return None;
    }
    match n.op_type.as_str() {
        "MatMul" => Some(EinsumForm {
            x_transposed: false,
            y_transposed: false,
            out_transposed: false,
        }),
        "Einsum" => {
            let eq = n.attribute.iter().find(|a| a.name == "equation")?;
            einsum_form(&String::from_utf8_lossy(&eq.s))
        }
        _ => None,
    }
}

/// The rank of an `Einsum`'s operands (from its equation), `None` for other nodes.
pub(crate) fn einsum_rank(n: &pb::NodeProto) -> Option<usize> {
    let eq = n.attribute.iter().find(|a| a.name == "equation")?;
    let eq = String::from_utf8_lossy(&eq.s);
    let lhs = eq.split("->").next()?.split(',').next()?;
    Some(lhs.chars().filter(|c| c.is_ascii_alphabetic()).count())
}

/// A `MatMul` (or two-operand `Einsum` of matrix-product form) whose two inputs both
/// come through activation Q/DQ with constant per-tensor scales as a `TfmqcQMatMul` node.
/// Tried after the weight products ([`crate::lower`]): a constant weight is not an
/// activation Q/DQ, so those never match here.
pub(crate) fn match_matmul(ix: &Index, n: &pb::NodeProto) -> Option<Rewrite> {
    let form = product_form(n)?;
    let x = activation_qdq(ix, &n.input[0])?;
    let y = activation_qdq(ix, &n.input[1])?;
    // outᵀ = yᵀ·xᵀ: a transposed output is the product of the swapped operands, each
    // read the other way round.
    let (x, y, x_t, y_t) = if form.out_transposed {
        (y, x, !form.y_transposed, !form.x_transposed)
    } else {
        (x, y, form.x_transposed, form.y_transposed)
    };
    let mut node = pb::NodeProto {
        name: format!("{}/int8", n.name),
        op_type: QMATMUL.into(),
        domain: "ai.tfmqc".into(),
        input: vec![x.0, y.0],
        output: vec![n.output[0].clone()],
        ..Default::default()
    };
    node.attribute = vec![
        attr::float("x_scale", x.1),
        attr::int("x_zero_point", x.2 as i64),
        attr::float("y_scale", y.1),
        attr::int("y_zero_point", y.2 as i64),
        attr::int("x_transposed", x_t as i64),
        attr::int("y_transposed", y_t as i64),
    ];
    Some(Rewrite { node, weight: None })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn form(x_transposed: bool, y_transposed: bool, out_transposed: bool) -> Option<EinsumForm> {
        Some(EinsumForm {
            x_transposed,
            y_transposed,
            out_transposed,
        })
    }

    #[test]
    fn einsum_equations_map_to_matrix_products() {
        assert_eq!(einsum_form("bij,bjk->bik"), form(false, false, false));
        // guided-diffusion's attention: weights = qᵀk, then a = v·weightsᵀ.
        assert_eq!(einsum_form("bct,bcs->bts"), form(true, false, false));
        assert_eq!(einsum_form("bts,bcs->bct"), form(false, true, true));
        assert_eq!(einsum_form("mk,nk->mn"), form(false, true, false));
        assert_eq!(
            einsum_form(" b h i d , b h j d -> b h i j "),
            form(false, true, false)
        );
    }

    #[test]
    fn other_einsums_are_left_to_tract() {
        for eq in [
            "bij,bjk->bki2",
            "bij,bjk",
            "bij,bjk->bjk",
            "...ij,...jk->...ik",
            "bii,bij->bij",
            "bij,cjk->bik",
            "ij,jk->k",
            "i,i->",
        ] {
            assert_eq!(einsum_form(eq), None, "{eq}");
        }
    }
}
