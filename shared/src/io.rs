//! Opening inputs (`-` is stdin) and writing outputs atomically.

use crate::error::{Error, Result};
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};

/// A readable input with the name used in error messages.
pub struct Input {
    pub name: String,
    pub reader: Box<dyn BufRead>,
}

impl Input {
    /// Open `path`, or stdin when `path` is `-`.
    pub fn open(path: &Path) -> Result<Input> {
        if path == Path::new("-") {
            return Ok(Input {
                name: "<stdin>".into(),
                reader: Box::new(BufReader::with_capacity(256 * 1024, io::stdin())),
            });
        }
        let f = File::open(path).map_err(|e| Error::io("cannot open", path, e))?;
        Ok(Input {
            name: path.display().to_string(),
            reader: Box::new(BufReader::with_capacity(256 * 1024, f)),
        })
    }

    /// The whole input as a string.
    pub fn read_string(mut self) -> Result<String> {
        let mut s = String::new();
        self.reader
            .read_to_string(&mut s)
            .map_err(|e| Error::io("reading", &self.name, e))?;
        Ok(s)
    }
}

/// Read a whole file as UTF-8 text, naming it in errors.
pub fn read_text(path: &Path) -> Result<String> {
    Input::open(path)?.read_string()
}

/// A `.ftk-tmp*` file in `path`'s directory, so the final rename stays on
/// one filesystem; removed when dropped unless persisted.
pub fn temp_beside(path: &Path) -> Result<tempfile::NamedTempFile> {
    let dir: PathBuf = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    tempfile::Builder::new()
        .prefix(".ftk-tmp")
        .tempfile_in(&dir)
        .map_err(|e| Error::io("cannot create a temporary file in", &dir, e))
}

/// Write `path` atomically: the content goes to a temporary file in the same
/// directory, is flushed and fsynced, then renamed over `path`. If `fill`
/// fails or the process dies, `path` is untouched and the temporary is removed
/// (or, after a kill, left as an obviously named `.ftk-tmp*` file).
pub fn write_atomic(path: &Path, fill: impl FnOnce(&mut dyn Write) -> Result<()>) -> Result<()> {
    let tmp = temp_beside(path)?;
    let mut w = io::BufWriter::with_capacity(1 << 20, tmp);
    fill(&mut w)?;
    w.flush().map_err(|e| Error::io("writing", path, e))?;
    let tmp = w
        .into_inner()
        .map_err(|e| Error::io("writing", path, e.into_error()))?;
    tmp.as_file()
        .sync_all()
        .map_err(|e| Error::io("syncing", path, e))?;
    tmp.persist(path)
        .map_err(|e| Error::io("renaming the output onto", path, e.error))?;
    Ok(())
}
