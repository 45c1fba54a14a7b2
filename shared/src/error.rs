//! The one error type every ftk tool returns, and the exit-code scheme.
//!
//! Exit codes (DESIGN.md): 0 success, 1 the tool ran but the answer is "no"
//! (e.g. mem-plan found no chunk count that fits), 2 bad usage or bad input.
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

    /// Error from writing to stdout.
    pub fn stdout(source: io::Error) -> Self {
        Error::io("writing", "<stdout>", source)
    }

    /// Exit code for this error.
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::Input(_) | Error::Io { .. } => 2,
            Error::Negative(_) => 1,
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
            other => other,
        })
    }
}
