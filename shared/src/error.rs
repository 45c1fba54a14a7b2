//! The one error type every ftk tool returns, and the exit-code scheme.
//!
//! Exit codes: 0 success; 1 the tool ran but the answer is "no" (e.g.
//! mem-plan found no chunk count that fits); 2 bad usage or bad input
//! (`tool: error: ...`); 3 the device failed (CUDA driver, cuBLAS, NVRTC,
//! out of device memory: `tool: device error: ...`); 4 an internal check
//! failed, a bug (`tool: internal error: ...`); 101 a panic (a bug too).
//! A broken pipe on stdout is not an error: `tool | head` exits 0.

use std::fmt;
use std::io;
use std::path::Path;

/// Result alias used across ftk.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What went wrong, already phrased for the user: `<what>, <where>, <what to do>`.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Bad input or bad usage: exit 2.
    #[error("{0}")]
    Input(String),
    /// An I/O failure on a named file or stream: exit 2.
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: String,
        #[source]
        source: io::Error,
    },
    /// The tool worked but the answer is negative (scripts branch on it): exit 1.
    #[error("{0}")]
    Negative(String),
    /// The accelerator or its libraries failed: exit 3.
    #[error("{0}")]
    Device(String),
    /// An internal consistency check failed (a bug, not the input): exit 4.
    #[error("{0}")]
    Internal(String),
    /// stdout was closed by the reader: exit 0 quietly.
    #[error("broken pipe")]
    BrokenPipe,
}

impl Error {
    /// Bad input or usage (exit 2).
    pub fn input(msg: impl fmt::Display) -> Self {
        Error::Input(msg.to_string())
    }

    /// I/O error on `path` while doing `what` ("reading", "writing", ...).
    /// A broken pipe is folded into [`Error::BrokenPipe`] so it stays quiet.
    pub fn io(what: &'static str, path: impl AsRef<Path>, source: io::Error) -> Self {
        if source.kind() == io::ErrorKind::BrokenPipe {
            return Error::BrokenPipe;
        }
        Error::Io {
            what,
            path: path.as_ref().display().to_string(),
            source,
        }
    }

    /// The device or its libraries failed (exit 3).
    pub fn device(msg: impl fmt::Display) -> Self {
        Error::Device(msg.to_string())
    }

    /// An internal check failed: a bug (exit 4).
    pub fn internal(msg: impl fmt::Display) -> Self {
        Error::Internal(msg.to_string())
    }

    /// The prefix printed after `tool: ` for this class.
    pub fn prefix(&self) -> &'static str {
        match self {
            Error::Device(_) => "device error",
            Error::Internal(_) => "internal error",
            _ => "error",
        }
    }

    /// Error from writing to stdout.
    pub fn stdout(source: io::Error) -> Self {
        Error::io("writing", "<stdout>", source)
    }

    /// Exit code for this error.
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::Input(_) | Error::Io { .. } => 2,
            Error::Negative(_) => 1,
            Error::Device(_) => 3,
            Error::Internal(_) => 4,
            Error::BrokenPipe => 0,
        }
    }
}

/// Shorthand: `bail!("...")` returns `Err(Error::Input(format!(...)))`.
#[macro_export]
macro_rules! bail {
    ($($arg:tt)*) => {
        return Err($crate::Error::input(format!($($arg)*)))
    };
}

/// Adds "where" context to an error message while keeping its exit code.
pub trait Context<T> {
    /// Prefix the error message with `ctx` (e.g. the file and field).
    fn context(self, ctx: impl fmt::Display) -> Result<T>;
}

impl<T> Context<T> for Result<T> {
    fn context(self, ctx: impl fmt::Display) -> Result<T> {
        self.map_err(|e| match e {
            Error::Input(m) => Error::Input(format!("{ctx}: {m}")),
            Error::Negative(m) => Error::Negative(format!("{ctx}: {m}")),
            Error::Device(m) => Error::Device(format!("{ctx}: {m}")),
            Error::Internal(m) => Error::Internal(format!("{ctx}: {m}")),
            other => other,
        })
    }
}

/// Adapter for cudarc's errors (driver, cuBLAS, NVRTC): a device error
/// naming the operation.
pub fn cuda<E: fmt::Debug>(what: impl fmt::Display) -> impl FnOnce(E) -> Error {
    move |e| Error::device(format!("CUDA {what}: {e:?}"))
}

/// Adapter for candle's errors on `what`: missing or mis-shaped weights and
/// unreadable files are the input's fault (exit 2), CUDA failures the
/// device's (exit 3), every other candle error (shape mismatches between
/// ftk's own tensors, bad indices) a bug (exit 4). Only the first line is
/// kept: candle appends a backtrace when RUST_BACKTRACE is set.
pub fn candle(what: impl fmt::Display) -> impl FnOnce(candle_core::Error) -> Error {
    move |e| {
        let line = e.to_string().lines().next().unwrap_or("").to_string();
        let msg = format!("{what}: {line}");
        match candle_class(&e) {
            Class::Input => Error::Input(msg),
            Class::Device => Error::Device(msg),
            Class::Internal => Error::Internal(msg),
        }
    }
}

enum Class {
    Input,
    Device,
    Internal,
}

fn candle_class(e: &candle_core::Error) -> Class {
    use candle_core::Error as C;
    match e {
        C::WithBacktrace { inner, .. } | C::WithPath { inner, .. } => candle_class(inner),
        C::Context { inner, .. } => candle_class(inner),
        C::CannotFindTensor { .. }
        | C::UnexpectedShape { .. }
        | C::ShapeMismatch { .. }
        | C::UnexpectedDType { .. }
        | C::SafeTensor(_)
        | C::UnsupportedSafeTensorDtype(_)
        | C::Io(_)
        | C::Npy(_) => Class::Input,
        C::Cuda(_) | C::NotCompiledWithCudaSupport | C::NotCompiledWithMetalSupport => {
            Class::Device
        }
        // Wrapped errors carry no type to go by; messages from weight
        // loading dominate, so they stay the input's.
        C::Wrapped(_) | C::WrappedContext { .. } => Class::Input,
        _ => Class::Internal,
    }
}
