//! The compiler crate's error type. Every variant names what the user has to look at
//! (file, node, op, tensor); the CLI maps `is_user_error()` to exit code 1.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },

    #[error("{path}: not a valid ONNX model ({reason})")]
    NotOnnx { path: PathBuf, reason: String },

    #[error("tensor '{tensor}': unsupported ONNX data type {code}")]
    UnsupportedDType { tensor: String, code: i32 },

    #[error("the graph has a cycle through node '{node}' ({op})")]
    Cycle { node: String, op: String },

    #[error("opset {domain} {version} is newer than tfmqc supports (at most {max})")]
    OpsetTooNew {
        domain: String,
        version: i64,
        max: i64,
    },

    #[error("node '{node}' ({op}): {reason}")]
    Node {
        node: String,
        op: String,
        reason: String,
    },

    #[error("pass '{pass}': {reason}")]
    Pass { pass: String, reason: String },

    /// A phase's memory estimate does not fit the machine (or `--max-memory`).
    #[error("{phase} needs {need}, {available}: lower it with {lower_with}, or raise --max-memory if the estimate is too cautious")]
    OutOfMemory {
        phase: &'static str,
        need: String,
        available: String,
        lower_with: &'static str,
    },

    /// An error about the contents of a file, prefixed with the file's path (what the
    /// importer reports: the tensor or node it names is in that file).
    #[error("{path}: {source}")]
    InFile { path: PathBuf, source: Box<Error> },

    /// Bad input that does not fit a more precise variant.
    #[error("{0}")]
    Invalid(String),

    /// The execution engine (tract) failed on a graph we built: our bug, not the user's.
    #[error("execution failed: {0}")]
    Engine(String),
}

impl Error {
    pub fn invalid(msg: impl Into<String>) -> Error {
        Error::Invalid(msg.into())
    }

    pub fn pass(pass: &str, reason: impl Into<String>) -> Error {
        Error::Pass {
            pass: pass.to_string(),
            reason: reason.into(),
        }
    }

    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Error {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    /// Whether the cause is the input (exit 1) rather than tfmqc itself (exit 2).
    pub fn is_user_error(&self) -> bool {
        match self {
            Error::InFile { source, .. } => source.is_user_error(),
            e => !matches!(e, Error::Engine(_)),
        }
    }
}

/// The runtime's errors as the compiler reports them: bad input and bad models are the
/// user's (the runtime checks scheduler files and step counts), execution failures ours.
impl From<tfmqc_runtime::Error> for Error {
    fn from(e: tfmqc_runtime::Error) -> Error {
        use tfmqc_runtime::Error as R;
        match e {
            R::Io { path, source } => Error::Io { path, source },
            R::InvalidModel(m) | R::BadInput(m) => Error::Invalid(m),
            R::Execution(m) | R::Engine(m) => Error::Engine(m),
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
