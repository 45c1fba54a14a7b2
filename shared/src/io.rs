//! Opening inputs (`-` is stdin) and writing outputs atomically.

use crate::error::{Error, Result};
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::fd::AsFd;
use std::path::Path;

/// A readable input with the name used in error messages.
pub struct Input {
    pub name: String,
    pub reader: Box<dyn BufRead>,
}

impl Input {
    /// Open `path`, or stdin when `path` is `-`.
    pub fn open(path: &Path) -> Result<Input> {
        if path == Path::new("-") {
            // stdin redirected from a file is an input like any other.
            if let Ok(f) = io::stdin().as_fd().try_clone_to_owned() {
                crate::output::register_input(
                    &File::from(f),
                    Path::new("/proc/self/fd/0"),
                    "<stdin>",
                );
            }
            return Ok(Input {
                name: "<stdin>".into(),
                reader: Box::new(BufReader::with_capacity(256 * 1024, io::stdin())),
            });
        }
        let f = File::open(path).map_err(|e| Error::io("cannot open", path, e))?;
        crate::output::register_input(&f, path, &path.display().to_string());
        Ok(Input {
            name: path.display().to_string(),
            reader: Box::new(BufReader::with_capacity(256 * 1024, f)),
        })
    }

    /// The whole input as a string.
    pub fn read_string(mut self) -> Result<String> {
        let mut b = Vec::new();
        self.reader
            .read_to_end(&mut b)
            .map_err(|e| Error::io("reading", &self.name, e))?;
        // std's "stream did not contain valid UTF-8" names neither the file nor the fix.
        String::from_utf8(b).map_err(|e| {
            Error::input(format!(
                "{}: byte {}: not UTF-8 text (a binary file?); give the text file (JSON) this flag expects",
                self.name,
                e.utf8_error().valid_up_to()
            ))
        })
    }
}

/// Read a whole file as UTF-8 text, naming it in errors.
pub fn read_text(path: &Path) -> Result<String> {
    Input::open(path)?.read_string()
}

/// Write `path` through [`crate::output::Output`]: complete or untouched,
/// never a temporary left behind (see that module for the rules).
pub fn write_atomic(path: &Path, fill: impl FnOnce(&mut dyn Write) -> Result<()>) -> Result<()> {
    crate::output::write_file(path, fill)
}
