//! Builders for node attributes (the protobuf form the IR keeps): the runtime's, which
//! its int8 lowering writes its nodes with, so both crates build attributes one way.

pub use tfmqc_runtime::attr::{float, floats, int, ints, string};
