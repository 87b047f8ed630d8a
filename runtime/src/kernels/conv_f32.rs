//! Small float convolutions as direct loops: a UNet's stem and head (`conv_in`: 1–4 input
//! channels; `conv_out`: 1–8 output channels), which the compiler keeps in float. tract
//! runs them as Im2col + matrix product, whose fixed cost per call (packing the patches,
//! ~0.07 ms at 16×16) is many times the arithmetic (≈ 75 K multiply-adds).

/// The weights and geometry of one convolution: stride 1, dilation 1, one group.
#[derive(Debug, Clone, PartialEq)]
pub struct ConvF32 {
    /// `[O, C, kh, kw]`, row-major. Shared, not copied, when tract clones the op (a plan
    /// per concrete input shape, [`crate::Engine`]).
    pub weight: std::sync::Arc<[f32]>,
    pub bias: Option<Vec<f32>>,
    pub out_channels: usize,
    pub in_channels: usize,
    pub kernel: [usize; 2],
    /// Top, left, bottom, right.
    pub pads: [usize; 4],
}

impl ConvF32 {
    /// `(Ho, Wo)` for an `H × W` input; `None` when the kernel is larger than the padded
    /// input.
    pub fn output_hw(&self, h: usize, w: usize) -> Option<(usize, usize)> {
        let [pt, pl, pb, pr] = self.pads;
        let (hp, wp) = (h + pt + pb, w + pl + pr);
        let [kh, kw] = self.kernel;
        (hp >= kh && wp >= kw && kh > 0 && kw > 0).then(|| (hp - kh + 1, wp - kw + 1))
    }
}

/// `out[n, o, y, x] = (Σ_{c, ky, kx} w[o, c, ky, kx] · in[n, c, y + ky − pt, x + kx −
/// pl]) + bias[o]` (zero outside the input): one fused multiply-add per term from 0, in
/// that order, padding terms included, then the bias. That is what tract's Conv computes
/// (Im2col's patch rows in that order, its matrix-product kernels one FMA a term, the bias
/// added after the product), so the direct loop gives tract's bits: checked on the
/// stem and head of ddpm_digits, ddim_unet and unet2d_attn, whole samplings bit for bit
/// (`TFMQC_CONV_F32=0` against the default). On every CPU with FMA the same bits; one
/// without runs `mul_add` in software, still exact. `shape` is the input's `[N, C, H,
/// W]`; `out` is `[N, O, Ho, Wo]`.
pub fn conv2d_f32(p: &ConvF32, input: &[f32], shape: [usize; 4], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
        // SAFETY: AVX2 and FMA were just detected.
        return unsafe { conv2d_avx2(p, input, shape, out) };
    }
    conv2d_plain(p, input, shape, out)
}

/// [`conv2d_plain`] compiled for AVX2 and FMA (its inner loop vectorizes eight wide, one
/// `vfmadd` a term).
///
/// # Safety
/// The CPU must support AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn conv2d_avx2(p: &ConvF32, input: &[f32], shape: [usize; 4], out: &mut [f32]) {
    conv2d_plain(p, input, shape, out)
}

#[inline(always)]
fn conv2d_plain(p: &ConvF32, input: &[f32], shape: [usize; 4], out: &mut [f32]) {
    let [nb, c, h, w] = shape;
    assert_eq!(c, p.in_channels, "conv f32: input channels");
    assert_eq!(input.len(), nb * c * h * w, "conv f32: input length");
    let (ho, wo) = p
        .output_hw(h, w)
        .expect("conv f32: kernel larger than input");
    let oc = p.out_channels;
    assert_eq!(out.len(), nb * oc * ho * wo, "conv f32: output length");
    assert_eq!(p.weight.len(), oc * c * p.kernel[0] * p.kernel[1]);
    if out.is_empty() {
        return;
    }
    let [pt, pl, pb, pr] = p.pads;
    let [kh, kw] = p.kernel;
    let (hp, wp) = (h + pt + pb, w + pl + pr);
    // Outputs on the padded pitch `wp` (columns past `wo` are computed and dropped), so
    // that each (channel, tap) is one contiguous multiply-add over every position.
    let npos = (ho - 1) * wp + wo;
    let plane = hp * wp;
    let mut padded = vec![0f32; c * plane];
    let mut acc = vec![0f32; npos];
    for b in 0..nb {
        for ci in 0..c {
            let src = &input[(b * c + ci) * h * w..][..h * w];
            let dst = &mut padded[ci * plane..][..plane];
            for (y, row) in src.chunks_exact(w).enumerate() {
                dst[(y + pt) * wp + pl..][..w].copy_from_slice(row);
            }
        }
        for o in 0..oc {
            acc.fill(0.0);
            for ci in 0..c {
                let src = &padded[ci * plane..][..plane];
                let taps = &p.weight[(o * c + ci) * kh * kw..][..kh * kw];
                for ky in 0..kh {
                    for kx in 0..kw {
                        let wv = taps[ky * kw + kx];
                        for (a, &v) in acc.iter_mut().zip(&src[ky * wp + kx..][..npos]) {
                            *a = wv.mul_add(v, *a);
                        }
                    }
                }
            }
            let dst = &mut out[(b * oc + o) * ho * wo..][..ho * wo];
            for (y, row) in dst.chunks_exact_mut(wo).enumerate() {
                let sums = &acc[y * wp..][..wo];
                match &p.bias {
                    Some(bias) => {
                        for (d, &a) in row.iter_mut().zip(sums) {
                            *d = a + bias[o];
                        }
                    }
                    None => row.copy_from_slice(sums),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::SplitMix64;

    /// The textbook loop, terms in the same order, one fused multiply-add each, the bias
    /// last.
    fn reference(p: &ConvF32, x: &[f32], [nb, c, h, w]: [usize; 4]) -> Vec<f32> {
        let (ho, wo) = p.output_hw(h, w).unwrap();
        let [kh, kw] = p.kernel;
        let [pt, pl, _, _] = p.pads;
        let mut out = vec![];
        for b in 0..nb {
            for o in 0..p.out_channels {
                for y in 0..ho {
                    for xo in 0..wo {
                        let mut s = 0f32;
                        for ci in 0..c {
                            for ky in 0..kh {
                                for kx in 0..kw {
                                    let (iy, ix) = (y + ky, xo + kx);
                                    let v = if iy < pt || ix < pl || iy - pt >= h || ix - pl >= w {
                                        0.0
                                    } else {
                                        x[((b * c + ci) * h + iy - pt) * w + ix - pl]
                                    };
                                    s = p.weight[((o * c + ci) * kh + ky) * kw + kx].mul_add(v, s);
                                }
                            }
                        }
                        out.push(p.bias.as_ref().map_or(s, |bias| s + bias[o]));
                    }
                }
            }
        }
        out
    }

    #[test]
    fn direct_conv_is_the_textbook_sum_bit_for_bit() {
        let mut rng = SplitMix64::new(5);
        let mut f = || (rng.next_u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0;
        for case in 0..24 {
            let (nb, c, oc) = (1 + case % 2, 1 + case % 4, 1 + (case * 7) % 9);
            let kernel = [1 + case % 3, 1 + (case / 3) % 3];
            let pads = [case % 2, (case / 2) % 2, (case / 4) % 2, 1];
            let (h, w) = (3 + case % 5, 2 + (case * 3) % 7);
            let p = ConvF32 {
                weight: (0..oc * c * kernel[0] * kernel[1])
                    .map(|_| f())
                    .collect::<Vec<_>>()
                    .into(),
                bias: (case % 3 != 0).then(|| (0..oc).map(|_| f()).collect()),
                out_channels: oc,
                in_channels: c,
                kernel,
                pads,
            };
            let Some((ho, wo)) = p.output_hw(h, w) else {
                continue;
            };
            let x: Vec<f32> = (0..nb * c * h * w).map(|_| f()).collect();
            let mut got = vec![f32::NAN; nb * oc * ho * wo];
            conv2d_f32(&p, &x, [nb, c, h, w], &mut got);
            let want = reference(&p, &x, [nb, c, h, w]);
            for (i, (a, b)) in want.iter().zip(&got).enumerate() {
                assert_eq!(a.to_bits(), b.to_bits(), "case {case} [{i}]: {a} vs {b}");
            }
        }
    }

    /// A one-node ONNX Conv (f32 weight, optional bias) run by tract, as the runtime runs
    /// a float model's Conv.
    fn tract_conv(p: &ConvF32, x: &[f32], shape: [usize; 4]) -> Vec<f32> {
        use tract_onnx::pb;
        use tract_onnx::prelude::*;
        let f32s = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        let tensor = |name: &str, dims: Vec<i64>, data: &[f32]| pb::TensorProto {
            name: name.into(),
            data_type: 1,
            dims,
            raw_data: f32s(data),
            ..Default::default()
        };
        let [kh, kw] = p.kernel;
        let [pt, pl, pb_, pr] = p.pads;
        let mut initializer = vec![tensor(
            "w",
            [p.out_channels, p.in_channels, kh, kw]
                .iter()
                .map(|&d| d as i64)
                .collect(),
            &p.weight,
        )];
        let mut inputs = vec!["x".to_string(), "w".to_string()];
        if let Some(b) = &p.bias {
            initializer.push(tensor("b", vec![b.len() as i64], b));
            inputs.push("b".into());
        }
        let ints = |name: &str, v: Vec<i64>| pb::AttributeProto {
            name: name.into(),
            r#type: pb::attribute_proto::AttributeType::Ints as i32,
            ints: v,
            ..Default::default()
        };
        let dims = |d: &[usize]| pb::TypeProto {
            value: Some(pb::type_proto::Value::TensorType(pb::type_proto::Tensor {
                elem_type: 1,
                shape: Some(pb::TensorShapeProto {
                    dim: d
                        .iter()
                        .map(|&v| pb::tensor_shape_proto::Dimension {
                            value: Some(pb::tensor_shape_proto::dimension::Value::DimValue(
                                v as i64,
                            )),
                            ..Default::default()
                        })
                        .collect(),
                }),
            })),
            ..Default::default()
        };
        let model = pb::ModelProto {
            ir_version: 8,
            opset_import: vec![pb::OperatorSetIdProto {
                domain: String::new(),
                version: 17,
            }],
            graph: Some(pb::GraphProto {
                node: vec![pb::NodeProto {
                    op_type: "Conv".into(),
                    input: inputs,
                    output: vec!["y".into()],
                    attribute: vec![
                        ints("kernel_shape", vec![kh as i64, kw as i64]),
                        ints("pads", vec![pt as i64, pl as i64, pb_ as i64, pr as i64]),
                    ],
                    ..Default::default()
                }],
                initializer,
                input: vec![pb::ValueInfoProto {
                    name: "x".into(),
                    r#type: Some(dims(&shape)),
                    ..Default::default()
                }],
                output: vec![pb::ValueInfoProto {
                    name: "y".into(),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            ..Default::default()
        };
        let plan = tract_onnx::onnx()
            .model_for_proto_model(&model)
            .unwrap()
            .into_optimized()
            .unwrap()
            .into_runnable()
            .unwrap();
        let input = Tensor::from_shape(&shape, x).unwrap();
        let out = plan.run(tvec!(input.into_tvalue())).unwrap();
        let y = out[0].clone().into_tensor();
        y.to_plain_array_view::<f32>()
            .unwrap()
            .iter()
            .copied()
            .collect()
    }

    /// The direct loop gives tract's bits on the stem and head shapes it runs (1–4 input
    /// channels into many, many into 1–8, K up to 320 · 9 = 2880), so the compiler's
    /// decisions are the same with the direct loop or without.
    #[test]
    fn direct_conv_gives_tracts_bits() {
        let mut rng = SplitMix64::new(9);
        let mut f = || (rng.next_u64() >> 40) as f32 / (1u64 << 22) as f32 - 2.0;
        for (case, (nb, c, oc, h, w)) in [
            (1, 1, 32, 16, 16),
            (2, 3, 64, 8, 12),
            (2, 4, 320, 8, 8),
            (2, 32, 1, 16, 16),
            (1, 64, 6, 7, 9),
            (2, 320, 4, 8, 8),
        ]
        .into_iter()
        .enumerate()
        {
            let p = ConvF32 {
                weight: (0..oc * c * 9)
                    .map(|_| f() * 0.1)
                    .collect::<Vec<_>>()
                    .into(),
                bias: (case % 3 != 2).then(|| (0..oc).map(|_| f()).collect()),
                out_channels: oc,
                in_channels: c,
                kernel: [3, 3],
                pads: [1; 4],
            };
            let x: Vec<f32> = (0..nb * c * h * w).map(|_| f()).collect();
            let mut got = vec![f32::NAN; nb * oc * h * w];
            conv2d_f32(&p, &x, [nb, c, h, w], &mut got);
            let want = tract_conv(&p, &x, [nb, c, h, w]);
            let differ = want
                .iter()
                .zip(&got)
                .filter(|(a, b)| a.to_bits() != b.to_bits())
                .count();
            assert_eq!(
                differ,
                0,
                "case {case}: {differ} of {} values differ",
                want.len()
            );
        }
    }
}
