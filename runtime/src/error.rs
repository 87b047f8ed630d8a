//! Errors of the runtime crate.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The model file cannot be loaded.
    #[error("{0}")]
    InvalidModel(String),
    /// The caller's inputs do not fit the model.
    #[error("{0}")]
    BadInput(String),
    /// tract failed while running.
    #[error("execution failed: {0}")]
    Execution(String),
    /// tract failed while preparing a model it had accepted.
    #[error("{0}")]
    Engine(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
