//! Model weights read from a safetensors file on demand: each tensor is read when a
//! module asks for it (`VarBuilder::get`), straight from the file into the buffer the
//! tensor keeps (one copy, by `pread`, large tensors in parallel pieces), so nothing
//! that is never built is read (the VAE's encoder in a sampling run) and the process
//! never holds a mapped copy of the weights next to its own (7.5 GB peak at SD-1.5 size
//! when every tensor was first copied out of a map into a table).
//!
//! The header is read and checked once through ftk's safetensors reader (which maps the
//! file but touches only the header), so a defect is named with the file.

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;
use ftk::tensors::{Dtype, TensorFile};
use ftk::{Error, Result};
use rayon::prelude::*;
use std::fs::File;
use std::path::Path;

/// Bytes per parallel read piece: large enough that a piece's syscall costs nothing,
/// small enough that a 10 MB conv weight still uses both cores.
const PIECE: usize = 1 << 21;

/// A safetensors file whose tensors are read on request (see the module docs).
pub struct LazyFile {
    meta: TensorFile,
    file: File,
    /// Address of byte 0 of the file in `meta`'s map (tensor offsets are taken from it).
    base: usize,
}

impl LazyFile {
    pub fn open(path: &Path) -> Result<LazyFile> {
        let meta = TensorFile::open(path)?;
        let file = File::open(path).map_err(|e| Error::io("cannot open", path, e))?;
        let base = meta.bytes().as_ptr() as usize;
        Ok(LazyFile { meta, file, base })
    }

    /// Tensor `name` as f32 on the CPU.
    fn read(&self, name: &str) -> candle_core::Result<Tensor> {
        let t = self.meta.get(name).ok_or_else(|| {
            candle_core::Error::CannotFindTensor {
                path: name.to_string(),
            }
            .bt()
        })?;
        let v = if t.dtype == Dtype::F32 && cfg!(target_endian = "little") {
            // fresh zero pages from the allocator (no memset)
            let mut v = vec![0f32; t.numel()];
            let off = (t.data.as_ptr() as usize - self.base) as u64;
            // SAFETY: every bit pattern is a valid f32; the byte view covers exactly `v`.
            let bytes =
                unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr() as *mut u8, v.len() * 4) };
            bytes
                .par_chunks_mut(PIECE)
                .enumerate()
                .try_for_each(|(i, piece)| {
                    populate(piece);
                    read_at(&self.file, piece, off + (i * PIECE) as u64)
                })
                .map_err(|e| {
                    let msg = format!("{}: cannot read: {e}", t.here());
                    candle_core::Error::wrap(std::io::Error::new(e.kind(), msg))
                })?;
            v
        } else {
            // other dtypes decode from the map; its pages are dropped once decoded
            let v = t
                .to_f32_vec()
                .map_err(|e| candle_core::Error::wrap(std::io::Error::other(e.to_string())))?;
            release_pages(t.data);
            v
        };
        Tensor::from_vec(v, t.shape, &Device::Cpu)
    }
}

#[cfg(unix)]
fn read_at(f: &File, buf: &mut [u8], off: u64) -> std::io::Result<()> {
    std::os::unix::fs::FileExt::read_exact_at(f, buf, off)
}

#[cfg(not(unix))]
fn read_at(f: &File, buf: &mut [u8], off: u64) -> std::io::Result<()> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = f.try_clone()?;
    f.seek(SeekFrom::Start(off))?;
    f.read_exact(buf)
}

/// Map `buf`'s pages in one call before it is read into: one fault per 4 KiB page
/// otherwise costs about as much as the copy itself over 3.4 GB.
fn populate(buf: &mut [u8]) {
    #[cfg(target_os = "linux")]
    {
        const PAGE: usize = 4096;
        let start = (buf.as_ptr() as usize).next_multiple_of(PAGE);
        let end = (buf.as_ptr() as usize + buf.len()) & !(PAGE - 1);
        if end > start {
            // SAFETY: [start, end) lies inside `buf`; MADV_POPULATE_WRITE only faults its
            // pages in (contents unchanged); on an older kernel it fails and nothing happens.
            unsafe {
                libc::madvise(
                    start as *mut libc::c_void,
                    end - start,
                    libc::MADV_POPULATE_WRITE,
                );
            }
        }
    }
}

/// Drop the resident pages of a read-only file mapping (they are read again from the
/// file on a later access, so a page shared with a neighbouring tensor stays correct).
fn release_pages(b: &[u8]) {
    #[cfg(unix)]
    {
        const PAGE: usize = 4096;
        let start = (b.as_ptr() as usize) & !(PAGE - 1);
        let end = b.as_ptr() as usize + b.len();
        if end > start {
            // SAFETY: [start, end) lies in a read-only shared file mapping that stays
            // mapped; MADV_DONTNEED only drops its resident copy.
            unsafe {
                libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_DONTNEED);
            }
        }
    }
}

impl SimpleBackend for LazyFile {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        // the shape is checked from the header, before anything is read
        if let Some(t) = self.meta.get(name) {
            if t.shape != s.dims() {
                Err(candle_core::Error::UnexpectedShape {
                    msg: format!("shape mismatch for {name}"),
                    expected: s,
                    got: Shape::from(t.shape.to_vec()),
                }
                .bt())?
            }
        }
        self.get_unchecked(name, dtype, dev)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.read(name)?.to_device(dev)?.to_dtype(dtype)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.meta.get(name).is_some()
    }
}

/// A VarBuilder over `file` that reads each tensor when asked, as `dtype` on `dev`.
pub fn var_builder(file: &Path, dtype: DType, dev: &Device) -> Result<VarBuilder<'static>> {
    let f = LazyFile::open(file)?;
    Ok(VarBuilder::from_backend(Box::new(f), dtype, dev.clone()))
}
