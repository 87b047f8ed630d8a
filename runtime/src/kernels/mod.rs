//! Numeric kernels of the runtime (plain Rust on slices, no tract types).
pub mod conv_f32;
pub(crate) mod expf;
pub mod int8;
pub mod norm;
