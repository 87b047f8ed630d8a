//! Builders for node attributes (the protobuf form the IR keeps).

use pb::attribute_proto::AttributeType as T;
use tract_onnx::pb;

pub fn int(name: &str, v: i64) -> pb::AttributeProto {
    pb::AttributeProto {
        name: name.into(),
        r#type: T::Int as i32,
        i: v,
        ..Default::default()
    }
}

pub fn ints(name: &str, v: &[i64]) -> pb::AttributeProto {
    pb::AttributeProto {
        name: name.into(),
        r#type: T::Ints as i32,
        ints: v.to_vec(),
        ..Default::default()
    }
}

pub fn float(name: &str, v: f32) -> pb::AttributeProto {
    pb::AttributeProto {
        name: name.into(),
        r#type: T::Float as i32,
        f: v,
        ..Default::default()
    }
}

pub fn string(name: &str, v: &str) -> pb::AttributeProto {
    pb::AttributeProto {
        name: name.into(),
        r#type: T::String as i32,
        s: v.as_bytes().to_vec(),
        ..Default::default()
    }
}
