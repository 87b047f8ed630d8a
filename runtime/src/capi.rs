//! The C API: the functions `include/tfmqc.h` declares.
//!
//! Plain C types only cross the boundary: a denoiser is an opaque handle, arrays are
//! pointers with their shapes, the caller owns every buffer, and a failure is a status
//! code with a message (`tfmqc_last_error`, per thread). A panic never crosses: it is
//! caught and returned as `TFMQC_ERROR_PANIC`.
//!
//! The shared library is the example `tfmqc` of this crate (examples/capi.rs):
//!
//! ```text
//! cargo build --release -p tfmqc-runtime --example tfmqc   # target/release/examples/libtfmqc.so
//! ```
//!
//! A static library: `cargo rustc --release -p tfmqc-runtime --lib --crate-type
//! staticlib` (`libtfmqc_runtime.a`; link it with `-lpthread -ldl -lm`).
//! `runtime/examples/denoise.c` is the program to copy.

#![allow(non_camel_case_types)]

use std::cell::RefCell;
use std::ffi::{c_char, c_int, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;

use tract_onnx::prelude::{DatumType, Tensor};

use crate::{Denoiser, Error, Guidance, Sampler};

/// A status: `TFMQC_OK` or one of the `TFMQC_ERROR_*` codes.
pub type tfmqc_status = c_int;

pub const TFMQC_OK: tfmqc_status = 0;
pub const TFMQC_ERROR_IO: tfmqc_status = 1;
pub const TFMQC_ERROR_INVALID_MODEL: tfmqc_status = 2;
pub const TFMQC_ERROR_BAD_INPUT: tfmqc_status = 3;
pub const TFMQC_ERROR_EXECUTION: tfmqc_status = 4;
pub const TFMQC_ERROR_INVALID_ARGUMENT: tfmqc_status = 5;
pub const TFMQC_ERROR_PANIC: tfmqc_status = 6;

pub const TFMQC_DTYPE_F32: c_int = 1;
pub const TFMQC_DTYPE_F64: c_int = 2;
pub const TFMQC_DTYPE_I32: c_int = 3;
pub const TFMQC_DTYPE_I64: c_int = 4;

pub const TFMQC_SAMPLER_DDIM: c_int = 0;
pub const TFMQC_SAMPLER_DDPM: c_int = 1;
pub const TFMQC_SAMPLER_EULER: c_int = 2;
pub const TFMQC_SAMPLER_DPMSOLVER_PP: c_int = 3;

/// A loaded denoiser (opaque to C).
pub struct tfmqc_denoiser {
    model: Denoiser,
    threads: usize,
    /// The conditioning inputs' names, NUL-terminated for `tfmqc_conditioning_name`.
    conditioning: Vec<CString>,
}

/// A conditioning array, given by the model input's name.
#[repr(C)]
pub struct tfmqc_tensor {
    pub name: *const c_char,
    pub dtype: c_int,
    pub data: *const std::ffi::c_void,
    pub shape: *const usize,
    pub rank: usize,
}

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

/// A failure on its way to C: the status and the message.
struct Failure(tfmqc_status, String);

impl From<Error> for Failure {
    fn from(e: Error) -> Failure {
        let code = match &e {
            Error::Io { .. } => TFMQC_ERROR_IO,
            Error::InvalidModel(_) => TFMQC_ERROR_INVALID_MODEL,
            Error::BadInput(_) => TFMQC_ERROR_BAD_INPUT,
            Error::Execution(_) | Error::Engine(_) => TFMQC_ERROR_EXECUTION,
        };
        Failure(code, e.to_string())
    }
}

fn argument(message: impl Into<String>) -> Failure {
    Failure(TFMQC_ERROR_INVALID_ARGUMENT, message.into())
}

/// Runs `f`, records its failure (or panic) for `tfmqc_last_error`, returns the status.
fn status(f: impl FnOnce() -> Result<(), Failure>) -> tfmqc_status {
    match guard(Err(TFMQC_ERROR_PANIC), || match f() {
        Ok(()) => Ok(()),
        Err(Failure(code, message)) => {
            set_last_error(message);
            Err(code)
        }
    }) {
        Ok(()) => TFMQC_OK,
        Err(code) => code,
    }
}

/// Runs `f`; a panic (a bug in tfmqc) is recorded for `tfmqc_last_error` and gives
/// `fallback`. Every exported function goes through it or [`status`]: since Rust 1.81 a
/// panic reaching an `extern "C"` function's end aborts the caller's process.
fn guard<T>(fallback: T, f: impl FnOnce() -> T) -> T {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|panic| {
        let what = crate::engine::panic_message(panic.as_ref());
        set_last_error(format!(
            "internal error (a bug in tfmqc; please report it): {what}"
        ));
        fallback
    })
}

fn set_last_error(message: String) {
    let message = CString::new(message.replace('\0', " ")).unwrap_or_default();
    // try_with: during the thread's exit the slot may be gone; the message is lost then.
    let _ = LAST_ERROR.try_with(|e| *e.borrow_mut() = message);
}

fn model_of<'a>(p: *const tfmqc_denoiser) -> Result<&'a tfmqc_denoiser, Failure> {
    // Safety: the caller passes NULL or a handle from tfmqc_load, not yet freed.
    unsafe { p.as_ref() }.ok_or_else(|| argument("the denoiser is NULL"))
}

/// The `len` values at `p` (NULL only when `len` is 0).
unsafe fn slice<'a, T>(p: *const T, len: usize, what: &str) -> Result<&'a [T], Failure> {
    if len == 0 {
        return Ok(&[]);
    }
    if p.is_null() {
        return Err(argument(format!("{what} is NULL")));
    }
    // Safety: the caller promises `len` readable values at `p`.
    Ok(unsafe { std::slice::from_raw_parts(p, len) })
}

unsafe fn slice_mut<'a, T>(p: *mut T, len: usize, what: &str) -> Result<&'a mut [T], Failure> {
    if p.is_null() {
        return Err(argument(format!("{what} is NULL")));
    }
    // Safety: the caller promises `len` writable values at `p`.
    Ok(unsafe { std::slice::from_raw_parts_mut(p, len) })
}

unsafe fn string<'a>(p: *const c_char, what: &str) -> Result<&'a str, Failure> {
    if p.is_null() {
        return Err(argument(format!("{what} is NULL")));
    }
    // Safety: the caller promises a NUL-terminated string.
    unsafe { CStr::from_ptr(p) }
        .to_str()
        .map_err(|_| argument(format!("{what} is not UTF-8")))
}

fn sampler(code: c_int) -> Result<Sampler, Failure> {
    Ok(match code {
        TFMQC_SAMPLER_DDIM => Sampler::Ddim,
        TFMQC_SAMPLER_DDPM => Sampler::Ddpm,
        TFMQC_SAMPLER_EULER => Sampler::Euler,
        TFMQC_SAMPLER_DPMSOLVER_PP => Sampler::DpmSolverPP,
        _ => return Err(argument(format!("unknown sampler {code}"))),
    })
}

/// The conditioning arrays as (name, tensor) pairs.
unsafe fn conditioning<'a>(
    cond: *const tfmqc_tensor,
    count: usize,
) -> Result<Vec<(&'a str, Tensor)>, Failure> {
    let given = unsafe { slice(cond, count, "cond") }?;
    given
        .iter()
        .map(|c| {
            let name = unsafe { string(c.name, "a conditioning tensor's name") }?;
            let shape = unsafe { slice(c.shape, c.rank, "a conditioning tensor's shape") }?;
            let dt = match c.dtype {
                TFMQC_DTYPE_F32 => DatumType::F32,
                TFMQC_DTYPE_F64 => DatumType::F64,
                TFMQC_DTYPE_I32 => DatumType::I32,
                TFMQC_DTYPE_I64 => DatumType::I64,
                other => return Err(argument(format!("'{name}': unknown dtype {other}"))),
            };
            let len = shape
                .iter()
                .try_fold(dt.size_of(), |n, &d| n.checked_mul(d))
                .ok_or_else(|| argument(format!("'{name}': the shape {shape:?} overflows")))?;
            let bytes = unsafe { slice(c.data as *const u8, len, "a conditioning tensor's data") }?;
            // Safety: from_raw_dt copies `len` bytes, every pattern a valid value.
            let t = unsafe { Tensor::from_raw_dt(dt, shape, bytes) }
                .map_err(|e| argument(format!("'{name}': {e:#}")))?;
            Ok((name, t))
        })
        .collect()
}

/// Copies the float values of `t` into `out` (exactly `out_len` of them).
fn write(t: &Tensor, out: *mut f32, out_len: usize) -> Result<(), Failure> {
    let view = t
        .to_plain_array_view::<f32>()
        .map_err(|e| Failure(TFMQC_ERROR_EXECUTION, format!("{e:#}")))?;
    if view.len() != out_len {
        return Err(argument(format!(
            "the result has {} values ({:?}), the output buffer holds {out_len}",
            view.len(),
            t.shape()
        )));
    }
    let out = unsafe { slice_mut(out, out_len, "out") }?;
    for (o, v) in out.iter_mut().zip(view.iter()) {
        *o = *v;
    }
    Ok(())
}

/// The library's version, e.g. "0.1.0".
#[no_mangle]
pub extern "C" fn tfmqc_version() -> *const c_char {
    concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr() as *const c_char
}

/// The message of this thread's last failed call ("" before any failure); valid until
/// the next failing call on this thread.
#[no_mangle]
pub extern "C" fn tfmqc_last_error() -> *const c_char {
    guard(c"".as_ptr(), || {
        LAST_ERROR
            .try_with(|e| e.borrow().as_ptr())
            .unwrap_or(c"".as_ptr())
    })
}

/// Loads a denoiser from an ONNX file into `*out` (free it with `tfmqc_free`).
///
/// # Safety
/// `path` is a NUL-terminated string; `out` points to writable storage for a pointer.
#[no_mangle]
pub unsafe extern "C" fn tfmqc_load(
    path: *const c_char,
    out: *mut *mut tfmqc_denoiser,
) -> tfmqc_status {
    status(|| {
        if out.is_null() {
            return Err(argument("out is NULL"));
        }
        let path = unsafe { string(path, "path") }?;
        let model = Denoiser::load(Path::new(path))?;
        let conditioning = model
            .conditioning_inputs()
            .into_iter()
            .map(|n| CString::new(n).unwrap_or_default())
            .collect();
        let threads = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1);
        let handle = Box::new(tfmqc_denoiser {
            model,
            threads,
            conditioning,
        });
        // Safety: checked non-NULL above.
        unsafe { *out = Box::into_raw(handle) };
        Ok(())
    })
}

/// Frees a denoiser (NULL is ignored).
///
/// # Safety
/// `model` is NULL or a handle from `tfmqc_load` not yet freed, in use by no other call.
#[no_mangle]
pub unsafe extern "C" fn tfmqc_free(model: *mut tfmqc_denoiser) {
    if !model.is_null() {
        // Safety: the handle came from Box::into_raw in tfmqc_load.
        guard((), || drop(unsafe { Box::from_raw(model) }));
    }
}

/// Sets the threads of each call on `model` (default: every core; 1: the calling thread
/// only). Results are the same for any count.
///
/// # Safety
/// `model` is a live handle, in use by no other call.
#[no_mangle]
pub unsafe extern "C" fn tfmqc_set_threads(
    model: *mut tfmqc_denoiser,
    threads: usize,
) -> tfmqc_status {
    status(|| {
        // Safety: a live handle, used by this call only.
        let m = unsafe { model.as_mut() }.ok_or_else(|| argument("the denoiser is NULL"))?;
        if threads == 0 {
            return Err(argument("threads must be at least 1"));
        }
        m.threads = threads;
        Ok(())
    })
}

/// Writes (C, H, W) of one sample to `chw`; TFMQC_ERROR_INVALID_MODEL when the model
/// does not fix them.
///
/// # Safety
/// `model` is a live handle; `chw` has room for 3 values.
#[no_mangle]
pub unsafe extern "C" fn tfmqc_sample_shape(
    model: *const tfmqc_denoiser,
    chw: *mut usize,
) -> tfmqc_status {
    status(|| {
        let shape = model_of(model)?.model.sample_shape().ok_or_else(|| {
            Failure(
                TFMQC_ERROR_INVALID_MODEL,
                "the model does not fix the sample's [C, H, W]".into(),
            )
        })?;
        unsafe { slice_mut(chw, 3, "chw") }?.copy_from_slice(&shape);
        Ok(())
    })
}

/// |S|, the number of time steps the model accepts (0 for a NULL model).
///
/// # Safety
/// `model` is NULL or a live handle.
#[no_mangle]
pub unsafe extern "C" fn tfmqc_timestep_count(model: *const tfmqc_denoiser) -> usize {
    guard(0, || {
        model_of(model).map_or(0, |m| m.model.timestep_count())
    })
}

/// Writes the time-step set S, ascending, to `out` (room for `capacity` values, at least
/// `tfmqc_timestep_count`).
///
/// # Safety
/// `model` is a live handle; `out` has room for `capacity` values.
#[no_mangle]
pub unsafe extern "C" fn tfmqc_timesteps(
    model: *const tfmqc_denoiser,
    out: *mut i64,
    capacity: usize,
) -> tfmqc_status {
    status(|| {
        let m = &model_of(model)?.model;
        let all: Vec<i64> = match m.timesteps() {
            Some(s) => s.to_vec(),
            None => (0..m.timestep_count() as i64).collect(),
        };
        if capacity < all.len() {
            return Err(argument(format!(
                "{} time steps, room for {capacity}",
                all.len()
            )));
        }
        unsafe { slice_mut(out, all.len(), "out") }?.copy_from_slice(&all);
        Ok(())
    })
}

/// The number of conditioning inputs (0 for a NULL model).
///
/// # Safety
/// `model` is NULL or a live handle.
#[no_mangle]
pub unsafe extern "C" fn tfmqc_conditioning_count(model: *const tfmqc_denoiser) -> usize {
    guard(0, || model_of(model).map_or(0, |m| m.conditioning.len()))
}

/// The name of conditioning input `index` (NULL past the end); owned by the model.
///
/// # Safety
/// `model` is NULL or a live handle.
#[no_mangle]
pub unsafe extern "C" fn tfmqc_conditioning_name(
    model: *const tfmqc_denoiser,
    index: usize,
) -> *const c_char {
    guard(std::ptr::null(), || {
        model_of(model)
            .ok()
            .and_then(|m| m.conditioning.get(index))
            .map_or(std::ptr::null(), |n| n.as_ptr())
    })
}

/// The noise prediction for the batch `x` of shape `shape` [B, C, H, W] at time step `t`
/// (which must be in S), written to `out` (`out_len` floats: B·C·H·W).
///
/// # Safety
/// `model` is a live handle; `x` holds B·C·H·W floats; `shape` 4 values; `cond`
/// `cond_count` tensors (NULL when 0) whose data match their shapes; `out` room for
/// `out_len` floats.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn tfmqc_denoise(
    model: *const tfmqc_denoiser,
    x: *const f32,
    shape: *const usize,
    t: i64,
    cond: *const tfmqc_tensor,
    cond_count: usize,
    out: *mut f32,
    out_len: usize,
) -> tfmqc_status {
    status(|| {
        let m = model_of(model)?;
        let shape = unsafe { slice(shape, 4, "shape") }?;
        let len = shape
            .iter()
            .try_fold(1usize, |n, &d| n.checked_mul(d))
            .ok_or_else(|| argument(format!("the shape {shape:?} overflows")))?;
        let x = unsafe { slice(x, len, "x") }?;
        let x = Tensor::from_shape(shape, x).map_err(|e| argument(format!("x: {e:#}")))?;
        let cond = unsafe { conditioning(cond, cond_count) }?;
        let eps = crate::with_threads(m.threads, || m.model.denoise(&x, t, &cond))?;
        write(&eps, out, out_len)
    })
}

/// `batch` samples [batch, C, H, W] written to `out` (`out_len` floats): seeded N(0, 1)
/// noise, then `steps` steps of `sampler` (`TFMQC_SAMPLER_*`) under the model's
/// scheduler. `cond`: the conditioning (`batch` rows, or fewer, cycled). With
/// `guidance_scale` > 0 and `uncond` (the unconditional conditioning, same names),
/// classifier-free guidance; otherwise pass 0 and NULL.
///
/// # Safety
/// `model` is a live handle; `cond` and `uncond` hold `cond_count` / `uncond_count`
/// tensors (NULL when 0); `out` room for `out_len` floats.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn tfmqc_sample(
    model: *const tfmqc_denoiser,
    seed: u64,
    steps: usize,
    sampler_kind: c_int,
    batch: usize,
    cond: *const tfmqc_tensor,
    cond_count: usize,
    guidance_scale: f32,
    uncond: *const tfmqc_tensor,
    uncond_count: usize,
    out: *mut f32,
    out_len: usize,
) -> tfmqc_status {
    status(|| {
        let m = model_of(model)?;
        let s = sampler(sampler_kind)?;
        let cond = unsafe { conditioning(cond, cond_count) }?;
        let uncond = unsafe { conditioning(uncond, uncond_count) }?;
        let guidance = (guidance_scale > 0.0 && uncond_count > 0).then_some(Guidance {
            scale: guidance_scale,
            uncond: &uncond,
        });
        let images = crate::with_threads(m.threads, || {
            m.model
                .sample_with(seed, steps, &cond, batch, s, guidance, &mut |_, _| {})
        })?;
        write(&images, out, out_len)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn last_error() -> String {
        // Safety: tfmqc_last_error returns a NUL-terminated string.
        unsafe { CStr::from_ptr(tfmqc_last_error()) }
            .to_string_lossy()
            .into_owned()
    }

    #[test]
    fn a_panic_becomes_the_panic_status_with_its_message() {
        let code = status(|| panic!("index out of bounds: the len is 3 but the index is 7"));
        assert_eq!(code, TFMQC_ERROR_PANIC);
        let e = last_error();
        assert!(
            e.starts_with("internal error (a bug in tfmqc; please report it)")
                && e.contains("the index is 7"),
            "{e}"
        );
        assert_eq!(
            guard(17usize, || panic!("{}", String::from("formatted"))),
            17
        );
        assert!(last_error().ends_with("formatted"));
        // A failure keeps its own code; success leaves the last message alone.
        assert_eq!(
            status(|| Err(argument("bad"))),
            TFMQC_ERROR_INVALID_ARGUMENT
        );
        assert_eq!(last_error(), "bad");
        assert_eq!(status(|| Ok(())), TFMQC_OK);
        assert_eq!(last_error(), "bad");
    }

    /// Every exported function's body runs under `status` or `guard` (or cannot panic:
    /// `tfmqc_version` returns a constant): read from this file, so that a new function
    /// without one fails here.
    #[test]
    fn every_exported_function_catches_panics() {
        let source = include_str!("capi.rs");
        let source = &source[..source.find("#[cfg(test)]").expect("this module")];
        let mut checked = 0;
        for item in source.split("#[no_mangle]").skip(1) {
            let name = item
                .split("fn ")
                .nth(1)
                .and_then(|s| s.split('(').next())
                .expect("a function after #[no_mangle]");
            let body = &item[item.find('{').expect("a body") + 1..];
            let first = body.trim_start();
            let wrapped = ["status(", "guard("].iter().any(|w| first.starts_with(w))
                || (name == "tfmqc_free" && body.contains("guard((), ||"))
                || name == "tfmqc_version";
            assert!(wrapped, "{name} does not run under status() or guard()");
            checked += 1;
        }
        assert!(checked >= 12, "only {checked} exported functions found");
    }

    #[test]
    fn null_handles_and_arguments_are_errors_not_crashes() {
        unsafe {
            assert_eq!(tfmqc_timestep_count(std::ptr::null()), 0);
            assert_eq!(tfmqc_conditioning_count(std::ptr::null()), 0);
            assert!(tfmqc_conditioning_name(std::ptr::null(), 0).is_null());
            tfmqc_free(std::ptr::null_mut());
            let mut out = std::ptr::null_mut();
            assert_eq!(
                tfmqc_load(std::ptr::null(), &mut out),
                TFMQC_ERROR_INVALID_ARGUMENT
            );
            assert_eq!(
                tfmqc_load(c"/nonexistent/m.onnx".as_ptr(), std::ptr::null_mut()),
                TFMQC_ERROR_INVALID_ARGUMENT
            );
            assert_eq!(
                tfmqc_load(c"/nonexistent/m.onnx".as_ptr(), &mut out),
                TFMQC_ERROR_IO
            );
            assert!(last_error().contains("/nonexistent/m.onnx"));
            assert_eq!(
                tfmqc_set_threads(std::ptr::null_mut(), 1),
                TFMQC_ERROR_INVALID_ARGUMENT
            );
            let mut chw = [0usize; 3];
            assert_eq!(
                tfmqc_sample_shape(std::ptr::null(), chw.as_mut_ptr()),
                TFMQC_ERROR_INVALID_ARGUMENT
            );
        }
    }
}
