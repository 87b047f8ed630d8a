//! Storing accumulator tiles: raw i32, dequantized f32, requantized u8 / i8.

use super::par::Shared;
use super::{Addend, Dequant, Output};

/// Which output channel each value of a stored run belongs to.
#[derive(Clone, Copy)]
pub(crate) enum Channel {
    /// Every value of the run belongs to this channel (conv: a tile row).
    Fixed(usize),
    /// Value `i` belongs to channel `start + i` (GEMM: tile columns).
    Run(usize),
}

pub(crate) enum QOut<'a> {
    U8(Shared<'a, u8>),
    I8(Shared<'a, i8>),
    /// u8 codes stored dequantized: `(q - zp) · out_scale`.
    Requant(Shared<'a, f32>),
}

/// The output of a driver. Several threads store through one `Sink`, each to its own
/// disjoint range of the output (see [`Sink::store`]).
pub(crate) enum Sink<'a> {
    I32(Shared<'a, i32>),
    F32 {
        out: Shared<'a, f32>,
        scale: Vec<f32>,
        bias: Option<&'a [f32]>,
    },
    Quant {
        out: QOut<'a>,
        scale: Vec<f32>,
        bias: Option<&'a [f32]>,
        out_scale: f32,
        zp: i32,
    },
    /// [`Output::Sum`]: f32 (or requantized) values plus the addend.
    Sum {
        out: Shared<'a, f32>,
        scale: Vec<f32>,
        bias: Option<&'a [f32]>,
        requant: Option<(f32, i32)>,
        addend: Addend<'a>,
    },
}

/// Per-channel `a_scale * w_scale[ch]`, validated.
fn combined_scales(d: &Dequant, channels: usize) -> Vec<f32> {
    let ws = d.w_scale;
    assert!(
        ws.len() == 1 || ws.len() == channels,
        "int8: {} weight scales for {channels} output channels",
        ws.len()
    );
    if let Some(b) = d.bias {
        assert_eq!(
            b.len(),
            channels,
            "int8: bias length is not the channel count"
        );
    }
    (0..channels)
        .map(|c| d.a_scale * ws[if ws.len() == 1 { 0 } else { c }])
        .collect()
}

/// `round_half_even(v / out_scale) + zp`, clamped to `[lo, hi]` (ONNX QuantizeLinear).
#[inline(always)]
#[allow(clippy::manual_clamp)] // max/min map NaN to -1024 where clamp would keep it
pub(crate) fn quantize(v: f32, out_scale: f32, zp: i32, lo: i32, hi: i32) -> i32 {
    // Clamp first (a NaN becomes -1024, i.e. the lowest code), then round to nearest
    // even by adding 1.5·2²³: for |x| ≤ 2²² the sum's mantissa holds round(x) exactly,
    // read back from the bits (integer ops only, so the loop vectorizes).
    let x = (v / out_scale).max(-1024.0).min(1024.0);
    let r = ((x + 12_582_912.0).to_bits() as i32).wrapping_sub(0x4B40_0000);
    (r + zp).clamp(lo, hi)
}

impl<'a> Sink<'a> {
    pub fn new(out: Output<'a>, channels: usize) -> Self {
        match out {
            Output::I32(o) => Sink::I32(Shared::new(o)),
            Output::F32 { out, dequant } => Sink::F32 {
                out: Shared::new(out),
                scale: combined_scales(&dequant, channels),
                bias: dequant.bias,
            },
            Output::U8 {
                out,
                dequant,
                scale,
                zero_point,
            } => Sink::Quant {
                out: QOut::U8(Shared::new(out)),
                scale: combined_scales(&dequant, channels),
                bias: dequant.bias,
                out_scale: scale,
                zp: zero_point as i32,
            },
            Output::I8 {
                out,
                dequant,
                scale,
                zero_point,
            } => Sink::Quant {
                out: QOut::I8(Shared::new(out)),
                scale: combined_scales(&dequant, channels),
                bias: dequant.bias,
                out_scale: scale,
                zp: zero_point as i32,
            },
            Output::Requant {
                out,
                dequant,
                scale,
                zero_point,
            } => Sink::Quant {
                out: QOut::Requant(Shared::new(out)),
                scale: combined_scales(&dequant, channels),
                bias: dequant.bias,
                out_scale: scale,
                zp: zero_point as i32,
            },
            Output::Sum {
                out,
                dequant,
                requant,
                addend,
            } => {
                let n = out.len();
                match addend {
                    Addend::Same(v) => {
                        assert_eq!(v.len(), n, "int8: addend length is not the output's")
                    }
                    Addend::Planes { values, plane } => assert!(
                        plane > 0
                            && n.is_multiple_of(plane)
                            && !values.is_empty()
                            && (n / plane).is_multiple_of(values.len()),
                        "int8: {} plane addends do not tile {n} outputs in planes of {plane}",
                        values.len()
                    ),
                }
                Sink::Sum {
                    out: Shared::new(out),
                    scale: combined_scales(&dequant, channels),
                    bias: dequant.bias,
                    requant: requant.map(|(s, z)| (s, z as i32)),
                    addend,
                }
            }
        }
    }

    /// Stores `acc` at `dst..dst + acc.len()`.
    ///
    /// # Safety
    /// No other thread may store to an overlapping range at the same time.
    #[inline(always)]
    pub unsafe fn store(&self, dst: usize, acc: &[i32], ch: Channel) {
        let n = acc.len();
        match self {
            Sink::I32(o) => o.range(dst, n).copy_from_slice(acc),
            Sink::F32 { out, scale, bias } => {
                let o = out.range(dst, n);
                dequant_run(o, acc, scale, *bias, ch, |v| v);
            }
            Sink::Quant {
                out,
                scale,
                bias,
                out_scale,
                zp,
            } => {
                let (os, zp) = (*out_scale, *zp);
                match out {
                    QOut::U8(out) => dequant_run(out.range(dst, n), acc, scale, *bias, ch, |v| {
                        quantize(v, os, zp, 0, 255) as u8
                    }),
                    QOut::I8(out) => dequant_run(out.range(dst, n), acc, scale, *bias, ch, |v| {
                        quantize(v, os, zp, -128, 127) as i8
                    }),
                    // As tract's DequantizeLinear: the centered code times the scale.
                    QOut::Requant(out) => {
                        dequant_run(out.range(dst, n), acc, scale, *bias, ch, |v| {
                            (quantize(v, os, zp, 0, 255) - zp) as f32 * os
                        })
                    }
                }
            }
            Sink::Sum {
                out,
                scale,
                bias,
                requant,
                addend,
            } => {
                let o = out.range(dst, n);
                match *requant {
                    None => dequant_run(o, acc, scale, *bias, ch, |v| v),
                    Some((os, zp)) => dequant_run(o, acc, scale, *bias, ch, |v| {
                        (quantize(v, os, zp, 0, 255) - zp) as f32 * os
                    }),
                }
                // The run was just written (it is in L1): one f32 addition per value,
                // `stored + addend`, as ONNX Add (IEEE addition is commutative, so the
                // operands' order in the Add does not matter).
                match *addend {
                    Addend::Same(v) => {
                        for (o, &a) in o.iter_mut().zip(&v[dst..dst + n]) {
                            *o += a;
                        }
                    }
                    Addend::Planes { values, plane } => {
                        debug_assert!(n == 0 || dst / plane == (dst + n - 1) / plane);
                        let a = values[(dst / plane) % values.len()];
                        for o in o.iter_mut() {
                            *o += a;
                        }
                    }
                }
            }
        }
    }
}

#[inline(always)]
fn dequant_run<T>(
    out: &mut [T],
    acc: &[i32],
    scale: &[f32],
    bias: Option<&[f32]>,
    ch: Channel,
    f: impl Fn(f32) -> T,
) {
    match (ch, bias) {
        (Channel::Fixed(c), None) => {
            let s = scale[c];
            for (o, &a) in out.iter_mut().zip(acc) {
                *o = f(a as f32 * s);
            }
        }
        (Channel::Fixed(c), Some(b)) => {
            let (s, b) = (scale[c], b[c]);
            for (o, &a) in out.iter_mut().zip(acc) {
                *o = f(a as f32 * s + b);
            }
        }
        (Channel::Run(c), None) => {
            let s = &scale[c..c + acc.len()];
            for ((o, &a), &s) in out.iter_mut().zip(acc).zip(s) {
                *o = f(a as f32 * s);
            }
        }
        (Channel::Run(c), Some(b)) => {
            let s = &scale[c..c + acc.len()];
            let b = &b[c..c + acc.len()];
            for (((o, &a), &s), &b) in out.iter_mut().zip(acc).zip(s).zip(b) {
                *o = f(a as f32 * s + b);
            }
        }
    }
}
