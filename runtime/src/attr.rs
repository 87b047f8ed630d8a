//! Node attributes in their protobuf form: builders (the lowering writes its nodes'
//! attributes with them, and the compiler's IR re-exports them) and readers with the
//! ONNX default for an absent attribute.

use pb::attribute_proto::AttributeType as T;
use tract_onnx::pb;

fn named(name: &str, r#type: T) -> pb::AttributeProto {
    pb::AttributeProto {
        name: name.into(),
        r#type: r#type as i32,
        ..Default::default()
    }
}

pub fn int(name: &str, v: i64) -> pb::AttributeProto {
    pb::AttributeProto {
        i: v,
        ..named(name, T::Int)
    }
}

pub fn ints(name: &str, v: impl Into<Vec<i64>>) -> pb::AttributeProto {
    pb::AttributeProto {
        ints: v.into(),
        ..named(name, T::Ints)
    }
}

pub fn float(name: &str, v: f32) -> pb::AttributeProto {
    pb::AttributeProto {
        f: v,
        ..named(name, T::Float)
    }
}

pub fn floats(name: &str, v: impl Into<Vec<f32>>) -> pb::AttributeProto {
    pb::AttributeProto {
        floats: v.into(),
        ..named(name, T::Floats)
    }
}

pub fn string(name: &str, v: &str) -> pb::AttributeProto {
    pb::AttributeProto {
        s: v.as_bytes().to_vec(),
        ..named(name, T::String)
    }
}

/// Int attribute `name` of `n`, or `default` where `n` lacks it.
pub fn int_or(n: &pb::NodeProto, name: &str, default: i64) -> i64 {
    n.attribute
        .iter()
        .find(|a| a.name == name)
        .map_or(default, |a| a.i)
}

/// Float attribute `name` of `n`, or `default` where `n` lacks it.
pub fn float_or(n: &pb::NodeProto, name: &str, default: f32) -> f32 {
    n.attribute
        .iter()
        .find(|a| a.name == name)
        .map_or(default, |a| a.f)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builders_set_the_type_and_readers_fall_back_to_the_default() {
        let n = pb::NodeProto {
            attribute: vec![int("axis", -1), float("alpha", 0.5), ints("pads", [1, 2])],
            ..Default::default()
        };
        assert_eq!(n.attribute[0].r#type, T::Int as i32);
        assert_eq!(n.attribute[2].ints, [1, 2]);
        assert_eq!(floats("w", vec![1.0]).r#type, T::Floats as i32);
        assert_eq!(string("mode", "x").s, b"x");
        assert_eq!(int_or(&n, "axis", 0), -1);
        assert_eq!(int_or(&n, "group", 1), 1);
        assert_eq!(float_or(&n, "alpha", 1.0), 0.5);
        assert_eq!(float_or(&n, "beta", 1.0), 1.0);
    }
}
