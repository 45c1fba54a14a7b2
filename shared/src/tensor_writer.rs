//! Streaming safetensors output for results too large to hold in memory.
//!
//! The layout is fixed up front from names, dtypes and shapes (the same
//! layout [`crate::tensors::write_safetensors`] produces: data ordered by
//! descending dtype alignment, then name; header padded to 8 bytes). Tensor
//! bytes are then written at their offsets, from any thread and in any order,
//! into an [`Output`] (an unnamed file beside the destination; see
//! [`crate::output`]). [`StreamWriter::finish`] checks that every byte was
//! written and fsyncs; [`Finished::commit`] puts the file in place. Dropping
//! either before the commit leaves the destination untouched. Finishing
//! several outputs first and committing them last keeps a set of files
//! (e.g. parameters and optimiser state) consistent on any error before the
//! commits.

use crate::error::{Error, Result};
use crate::output::{Output, Ready};
use crate::tensors::{layout, Layout};
use safetensors::Dtype;
use std::collections::HashMap;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Name, dtype and shape of one tensor to be written.
#[derive(Clone, Debug)]
pub struct TensorSpec {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
}

/// A safetensors file being written piecewise; see the module docs.
pub struct StreamWriter {
    path: PathBuf,
    out: Output,
    header: Vec<u8>,
    /// Absolute file offset and byte length of each spec, in spec order.
    slots: Vec<(u64, u64)>,
    total: u64,
    written: AtomicU64,
}

/// A fully written and fsynced output waiting to be renamed into place.
pub struct Finished {
    ready: Ready,
}

impl StreamWriter {
    /// Lay out `specs` and open `path` for writing.
    pub fn create(
        path: &Path,
        specs: &[TensorSpec],
        metadata: Option<HashMap<String, String>>,
    ) -> Result<StreamWriter> {
        Self::on(Output::create(path)?, specs, metadata)
    }

    /// Lay out `specs` in an output opened earlier.
    pub fn on(
        mut out: Output,
        specs: &[TensorSpec],
        metadata: Option<HashMap<String, String>>,
    ) -> Result<StreamWriter> {
        let path = out.path().to_path_buf();
        let path = path.as_path();
        let shapes: Vec<(&str, Dtype, &[usize])> = specs
            .iter()
            .map(|s| (s.name.as_str(), s.dtype, s.shape.as_slice()))
            .collect();
        let Layout { header, slots: rel } = layout(&shapes, metadata)?;
        let data_start = 8 + header.len() as u64;
        let total = rel.iter().map(|&(_, n)| n as u64).sum();
        {
            let mut f = out.seekable()?;
            f.set_len(data_start + total)
                .map_err(|e| Error::io("writing", path, e))?;
            f.write_all(&(header.len() as u64).to_le_bytes())
                .and_then(|_| f.write_all(&header))
                .map_err(|e| Error::io("writing", path, e))?;
        }
        Ok(StreamWriter {
            path: path.to_path_buf(),
            out,
            header,
            slots: rel
                .into_iter()
                .map(|(o, n)| (data_start + o as u64, n as u64))
                .collect(),
            total,
            written: AtomicU64::new(0),
        })
    }

    /// The destination path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Write `bytes` into tensor `spec` (index into the specs given to
    /// [`StreamWriter::create`]) starting `byte_offset` bytes into its data.
    /// Safe to call from several threads for disjoint ranges.
    pub fn write_at(&self, spec: usize, byte_offset: u64, bytes: &[u8]) -> Result<()> {
        let (start, len) = self.slots[spec];
        if byte_offset + bytes.len() as u64 > len {
            return Err(Error::internal(format!(
                "write of {} bytes at {byte_offset} overruns a {len}-byte tensor",
                bytes.len()
            )));
        }
        self.out
            .file()
            .write_all_at(bytes, start + byte_offset)
            .map_err(|e| Error::io("writing", &self.path, e))?;
        self.written
            .fetch_add(bytes.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    /// Overwrite metadata `key`'s value `placeholder` with `value` of the
    /// same length (for a value known only after other outputs are written).
    pub fn patch_metadata(&self, key: &str, placeholder: &str, value: &str) -> Result<()> {
        if placeholder.len() != value.len() {
            return Err(Error::internal(format!(
                "metadata {key}: value length {} differs from the placeholder's {}",
                value.len(),
                placeholder.len()
            )));
        }
        let needle = format!("\"{key}\":\"{placeholder}\"");
        let at = self
            .header
            .windows(needle.len())
            .position(|w| w == needle.as_bytes())
            .ok_or_else(|| Error::internal(format!("metadata {key}: placeholder not found")))?;
        let off = 8 + at + key.len() + 4;
        self.out
            .file()
            .write_all_at(value.as_bytes(), off as u64)
            .map_err(|e| Error::io("writing", &self.path, e))
    }

    /// Check every data byte was written once, then fsync.
    pub fn finish(self) -> Result<Finished> {
        let w = self.written.load(Ordering::Relaxed);
        if w != self.total {
            return Err(Error::internal(format!(
                "{} of {} data bytes written to {}",
                w,
                self.total,
                self.path.display()
            )));
        }
        Ok(Finished {
            ready: self.out.finish()?,
        })
    }
}

impl Finished {
    /// Put the finished file in place.
    pub fn commit(self) -> Result<()> {
        self.ready.commit()
    }

    /// The finished file (e.g. to digest what was written).
    pub fn file(&self) -> &std::fs::File {
        self.ready.file()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensors::{write_safetensors, OutTensor};

    #[test]
    fn same_bytes_as_write_safetensors_in_any_write_order() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a.safetensors");
        let b = dir.path().join("b.safetensors");
        let x: Vec<f32> = (0..10).map(|i| i as f32 * 0.5).collect();
        let y: Vec<i64> = vec![3, -4];
        let mut meta = HashMap::new();
        meta.insert("k".to_string(), "v".to_string());
        write_safetensors(
            &a,
            &[
                OutTensor::f32("x", vec![2, 5], &x),
                OutTensor::i64("y", vec![2], &y),
            ],
            Some(meta.clone()),
        )
        .unwrap();
        let specs = vec![
            TensorSpec {
                name: "y".into(),
                dtype: Dtype::I64,
                shape: vec![2],
            },
            TensorSpec {
                name: "x".into(),
                dtype: Dtype::F32,
                shape: vec![2, 5],
            },
        ];
        let w = StreamWriter::create(&b, &specs, Some(meta)).unwrap();
        let xb: Vec<u8> = x.iter().flat_map(|v| v.to_le_bytes()).collect();
        w.write_at(1, 20, &xb[20..]).unwrap();
        w.write_at(
            0,
            0,
            &y.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<_>>(),
        )
        .unwrap();
        w.write_at(1, 0, &xb[..20]).unwrap();
        assert!(!b.exists());
        w.finish().unwrap().commit().unwrap();
        assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
    }

    #[test]
    fn incomplete_or_dropped_writes_leave_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("o.safetensors");
        let specs = vec![TensorSpec {
            name: "x".into(),
            dtype: Dtype::F32,
            shape: vec![4],
        }];
        let w = StreamWriter::create(&p, &specs, None).unwrap();
        w.write_at(0, 0, &[0u8; 8]).unwrap();
        assert!(w.write_at(0, 12, &[0u8; 8]).is_err());
        assert!(w.finish().is_err());
        let w = StreamWriter::create(&p, &specs, None).unwrap();
        w.write_at(0, 0, &[0u8; 16]).unwrap();
        drop(w.finish().unwrap());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
