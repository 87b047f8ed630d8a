//! `tfmqc._tfmqc`: the native half of the `tfmqc` Python module (python/tfmqc/ is the
//! other half, which speaks numpy and torch and calls these functions).
//!
//! Arrays cross as `(dtype name, shape, bytes)` triples, one copy each way, so the module
//! needs no numpy at build time and no numpy ABI at run time. Model calls, sampling and
//! the compiler run with the GIL released.

use std::ffi::OsString;
use std::path::PathBuf;

use pyo3::exceptions::{PyFileNotFoundError, PyOSError, PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::pybacked::PyBackedBytes;
use pyo3::types::PyByteArray;
use tfmqc_runtime::denoiser::InputSpec;
use tfmqc_runtime::{DatumType, Denoiser, Error, Guidance, Sampler, Tensor};

/// An array from Python: numpy's dtype name, the shape, the C-order bytes.
type Array = (String, Vec<usize>, PyBackedBytes);

/// A prediction or samples back to Python: the shape and the float32 values' bytes (a
/// bytearray, so the numpy array over it is writable).
type Out<'py> = (Vec<usize>, Bound<'py, PyByteArray>);

fn to_py(e: Error) -> PyErr {
    let message = e.to_string();
    match e {
        Error::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound => {
            PyFileNotFoundError::new_err(message)
        }
        Error::Io { .. } => PyOSError::new_err(message),
        Error::InvalidModel(_) | Error::BadInput(_) => PyValueError::new_err(message),
        Error::Execution(_) | Error::Engine(_) => PyRuntimeError::new_err(message),
    }
}

/// Runs `f`, a panic (a bug in tfmqc) becoming RuntimeError. Without it pyo3 raises
/// `pyo3_runtime.PanicException`, a BaseException that `except Exception` does not
/// catch; every function and method of the module runs its body here.
fn guarded<T>(f: impl FnOnce() -> PyResult<T>) -> PyResult<T> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|panic| {
        let what = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_default();
        Err(PyRuntimeError::new_err(format!(
            "internal error (a bug in tfmqc; please report it): {what}"
        )))
    })
}

fn dtype(name: &str) -> Option<DatumType> {
    Some(match name {
        "float32" => DatumType::F32,
        "float64" => DatumType::F64,
        "float16" => DatumType::F16,
        "int8" => DatumType::I8,
        "int16" => DatumType::I16,
        "int32" => DatumType::I32,
        "int64" => DatumType::I64,
        "uint8" => DatumType::U8,
        "uint16" => DatumType::U16,
        "uint32" => DatumType::U32,
        "uint64" => DatumType::U64,
        "bool" => DatumType::Bool,
        _ => return None,
    })
}

fn dtype_name(dt: DatumType) -> Option<&'static str> {
    Some(match dt {
        DatumType::F32 => "float32",
        DatumType::F64 => "float64",
        DatumType::F16 => "float16",
        DatumType::I8 => "int8",
        DatumType::I16 => "int16",
        DatumType::I32 => "int32",
        DatumType::I64 => "int64",
        DatumType::U8 => "uint8",
        DatumType::U16 => "uint16",
        DatumType::U32 => "uint32",
        DatumType::U64 => "uint64",
        DatumType::Bool => "bool",
        _ => return None,
    })
}

/// The tensor of an array; `want`: the model input's type, to which an array of the same
/// kind (float to float, integer to integer) is cast.
fn tensor(what: &str, (name, shape, bytes): &Array, want: Option<DatumType>) -> PyResult<Tensor> {
    let dt = dtype(name).ok_or_else(|| {
        PyValueError::new_err(format!("{what}: arrays of {name} are not supported"))
    })?;
    // Safety: from_raw_dt checks the byte count against the shape and copies the bytes;
    // every bit pattern is a valid value of these plain types, except bool's, which
    // numpy stores as 0 or 1.
    let t = unsafe { Tensor::from_raw_dt(dt, shape, bytes) }
        .map_err(|e| PyValueError::new_err(format!("{what}: {e:#}")))?;
    match want {
        Some(w) if w != dt => {
            let same_kind = (w.is_float() && dt.is_float())
                || (w.is_integer() && dt.is_integer() && w != DatumType::Bool);
            if !same_kind {
                return Err(PyValueError::new_err(format!(
                    "{what} is {name}, the model wants {}",
                    dtype_name(w).unwrap_or("another type")
                )));
            }
            t.cast_to_dt(w)
                .map(|c| c.into_owned())
                .map_err(|e| PyValueError::new_err(format!("{what}: {e:#}")))
        }
        _ => Ok(t),
    }
}

fn out<'py>(py: Python<'py>, t: &Tensor) -> PyResult<Out<'py>> {
    let t = t
        .cast_to::<f32>()
        .map_err(|e| PyRuntimeError::new_err(format!("{e:#}")))?;
    let values = t
        .to_plain_array_view::<f32>()
        .map_err(|e| PyRuntimeError::new_err(format!("{e:#}")))?;
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_ne_bytes()).collect();
    Ok((t.shape().to_vec(), PyByteArray::new(py, &bytes)))
}

fn default_threads() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// A loaded denoiser (`tfmqc.Denoiser` wraps it).
#[pyclass(module = "tfmqc._tfmqc", frozen)]
struct NativeDenoiser {
    inner: Denoiser,
    threads: usize,
}

impl NativeDenoiser {
    fn conditioning(
        &self,
        cond: &[(String, Array)],
        what: &str,
    ) -> PyResult<Vec<(String, Tensor)>> {
        let names = self.inner.conditioning_inputs();
        cond.iter()
            .map(|(name, a)| {
                // An unknown name is the runtime's error to give, with the list of inputs.
                let want = self
                    .inner
                    .inputs()
                    .iter()
                    .find(|s| &s.name == name && names.contains(&s.name.as_str()))
                    .and_then(|s| s.dtype);
                Ok((name.clone(), tensor(&format!("{what}'{name}'"), a, want)?))
            })
            .collect()
    }

    fn role(&self, spec: &InputSpec) -> &'static str {
        if spec.name == self.inner.sample_input().name {
            "sample"
        } else if spec.name == self.inner.timestep_input().name {
            "timestep"
        } else {
            "conditioning"
        }
    }
}

#[pymethods]
impl NativeDenoiser {
    #[new]
    #[pyo3(signature = (path, threads=None))]
    fn new(py: Python<'_>, path: PathBuf, threads: Option<usize>) -> PyResult<Self> {
        guarded(|| {
            let threads = threads.unwrap_or_else(default_threads);
            if threads == 0 {
                return Err(PyValueError::new_err("threads must be at least 1"));
            }
            let inner = py.detach(|| Denoiser::load(&path)).map_err(to_py)?;
            Ok(NativeDenoiser { inner, threads })
        })
    }

    /// ε̂(x, t, cond) as float32.
    fn denoise<'py>(
        &self,
        py: Python<'py>,
        x: Array,
        t: i64,
        cond: Vec<(String, Array)>,
    ) -> PyResult<Out<'py>> {
        guarded(|| {
            let x = tensor("the sample", &x, None)?;
            let cond = self.conditioning(&cond, "conditioning input ")?;
            let result = py.detach(|| {
                let refs: Vec<(&str, Tensor)> =
                    cond.iter().map(|(n, t)| (n.as_str(), t.clone())).collect();
                tfmqc_runtime::with_threads(self.threads, || self.inner.denoise(&x, t, &refs))
            });
            out(py, &result.map_err(to_py)?)
        })
    }

    /// Samples `batch` images: seeded noise, then `steps` steps of `sampler`;
    /// `guidance` = (scale, unconditional conditioning) for classifier-free guidance.
    #[pyo3(signature = (seed, steps, cond, batch, sampler, guidance=None))]
    #[allow(clippy::too_many_arguments)]
    fn sample<'py>(
        &self,
        py: Python<'py>,
        seed: u64,
        steps: usize,
        cond: Vec<(String, Array)>,
        batch: usize,
        sampler: &str,
        guidance: Option<(f32, Vec<(String, Array)>)>,
    ) -> PyResult<Out<'py>> {
        guarded(|| {
            let sampler: Sampler = sampler.parse().map_err(PyValueError::new_err)?;
            let cond = self.conditioning(&cond, "conditioning input ")?;
            let uncond = match &guidance {
                Some((_, u)) => self.conditioning(u, "unconditional input ")?,
                None => vec![],
            };
            let result = py.detach(|| {
                let refs: Vec<(&str, Tensor)> =
                    cond.iter().map(|(n, t)| (n.as_str(), t.clone())).collect();
                let urefs: Vec<(&str, Tensor)> = uncond
                    .iter()
                    .map(|(n, t)| (n.as_str(), t.clone()))
                    .collect();
                let g = guidance.as_ref().map(|(scale, _)| Guidance {
                    scale: *scale,
                    uncond: &urefs,
                });
                tfmqc_runtime::with_threads(self.threads, || {
                    self.inner
                        .sample_with(seed, steps, &refs, batch, sampler, g, &mut |_, _| {})
                })
            });
            out(py, &result.map_err(to_py)?)
        })
    }

    /// The time-step set S, ascending (every training step when the model has no set).
    fn timesteps(&self) -> PyResult<Vec<i64>> {
        guarded(|| {
            Ok(match self.inner.timesteps() {
                Some(s) => s.to_vec(),
                None => (0..self.inner.schedule().train_timesteps() as i64).collect(),
            })
        })
    }

    /// The time steps `sampler` visits in `steps` steps, first to last.
    fn trajectory(&self, sampler: &str, steps: usize) -> PyResult<Vec<i64>> {
        guarded(|| {
            let sampler: Sampler = sampler.parse().map_err(PyValueError::new_err)?;
            self.inner.trajectory(sampler, steps).map_err(to_py)
        })
    }

    /// (name, role, dtype, shape) of every input, in the model's order: role `sample`, `timestep` or
    /// `conditioning`; dtype a numpy name or None; shape None or dims (None: free).
    #[allow(clippy::type_complexity)]
    fn inputs(
        &self,
    ) -> Vec<(
        String,
        &'static str,
        Option<&'static str>,
        Option<Vec<Option<usize>>>,
    )> {
        self.inner
            .inputs()
            .iter()
            .map(|s| {
                (
                    s.name.clone(),
                    self.role(s),
                    s.dtype.and_then(dtype_name),
                    s.shape.clone(),
                )
            })
            .collect()
    }

    fn sample_shape(&self) -> Option<[usize; 3]> {
        self.inner.sample_shape()
    }

    fn int8_ops(&self) -> usize {
        self.inner.int8_ops()
    }

    fn threads(&self) -> usize {
        self.threads
    }

    fn __repr__(&self) -> String {
        format!("{:?}", self.inner)
    }
}

/// Runs the command line on `argv` (the program name first) as the `tfmqc` binary does,
/// printing as it does; returns the exit code. `exe`: the program `tfmqc bench` starts
/// its engines with (the `tfmqc` script of this installation).
#[pyfunction]
#[pyo3(signature = (argv, exe=None))]
fn main(py: Python<'_>, argv: Vec<OsString>, exe: Option<PathBuf>) -> PyResult<u8> {
    // tfmqc::main_with catches the command's panics itself (exit code 2); `guarded` is
    // for anything around it.
    guarded(|| {
        if let Some(exe) = exe {
            tfmqc::set_self_exe(exe);
        }
        Ok(py.detach(|| tfmqc::main_with(argv)))
    })
}

/// Runs the command line on `argv` (the program name first); a failure raises ValueError
/// (bad input, usage; exit code 1) or RuntimeError (tfmqc's fault; exit code 2).
#[pyfunction]
fn run(py: Python<'_>, argv: Vec<OsString>) -> PyResult<()> {
    guarded(|| {
        py.detach(|| tfmqc::run(argv)).map_err(|f| {
            if f.code == 1 {
                PyValueError::new_err(f.message)
            } else {
                PyRuntimeError::new_err(f.message)
            }
        })
    })
}

#[pymodule]
fn _tfmqc(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_class::<NativeDenoiser>()?;
    m.add_function(wrap_pyfunction!(main, m)?)?;
    m.add_function(wrap_pyfunction!(run, m)?)?;
    Ok(())
}
