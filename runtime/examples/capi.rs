//! The C library: the functions of `include/tfmqc.h` (src/capi.rs) in `libtfmqc.so`.
//!
//!     cargo build --release -p tfmqc-runtime --example tfmqc
//!     cc app.c -I runtime/include -L target/release/examples -ltfmqc
//!
//! A cdylib exports the `#[no_mangle]` functions of the crates it links; this one links
//! the runtime and nothing else.

pub use tfmqc_runtime::capi::*;
