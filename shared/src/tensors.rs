//! safetensors files: zero-copy reading through memmap2 (every dtype,
//! F16/BF16 decoded with `half`) and atomic writing.

use crate::error::{Error, Result};
use crate::output::{Output, Ready};
use memmap2::Mmap;
use safetensors::tensor::{Metadata, TensorInfo};
pub use safetensors::Dtype;
use safetensors::SafeTensorError;
use std::collections::HashMap;
use std::fs::File;
use std::path::Path;

/// A memory-mapped safetensors file. Tensors borrow from the map: nothing is
/// copied until a caller decodes elements.
pub struct TensorFile {
    name: String,
    mmap: Option<Mmap>,
    /// The bytes, when given in memory instead of mapped.
    owned: Vec<u8>,
    /// Entry in the SIGBUS table of mapped inputs.
    bus_slot: usize,
    data_start: usize,
    meta: Metadata,
}

/// One tensor's view into a [`TensorFile`].
#[derive(Clone, Copy)]
pub struct Tensor<'a> {
    pub name: &'a str,
    pub dtype: Dtype,
    pub shape: &'a [usize],
    /// Raw little-endian element bytes.
    pub data: &'a [u8],
    file: &'a str,
}

/// True if the first bytes look like a safetensors file (8-byte little-endian
/// header length followed by `{`), as opposed to JSON text.
pub fn sniff(head: &[u8]) -> bool {
    head.len() >= 9 && head[8] == b'{' && head[0] != b'{'
}

fn describe(e: &SafeTensorError, len: usize) -> String {
    match e {
        SafeTensorError::HeaderTooSmall => {
            format!("file is {len} bytes, too short for the 8-byte safetensors header length")
        }
        SafeTensorError::InvalidHeaderLength => {
            "header length runs past the end of the file (truncated file?)".into()
        }
        SafeTensorError::HeaderTooLarge => {
            "header length is implausibly large (not a safetensors file?)".into()
        }
        SafeTensorError::InvalidHeader(_) => "header is not UTF-8 (not a safetensors file?)".into(),
        SafeTensorError::InvalidHeaderDeserialization(e) => {
            format!("header is not valid safetensors JSON: {e}")
        }
        SafeTensorError::MetadataIncompleteBuffer => {
            "data section does not match the header's offsets (truncated or corrupted file)".into()
        }
        other => format!("invalid safetensors file: {other}"),
    }
}

impl Drop for TensorFile {
    fn drop(&mut self) {
        crate::signals::release_mapping(self.bus_slot);
    }
}

impl TensorFile {
    /// Map and validate `path` (header, offsets, total length).
    pub fn open(path: &Path) -> Result<TensorFile> {
        let name = path.display().to_string();
        if path == Path::new("-") {
            return Err(Error::input(
                "safetensors input cannot be read from stdin (it is memory-mapped); give a file path",
            ));
        }
        let f = File::open(path).map_err(|e| Error::io("cannot open", path, e))?;
        let len = f
            .metadata()
            .map_err(|e| Error::io("cannot stat", path, e))?
            .len() as usize;
        if len < 8 {
            return Err(Error::input(format!(
                "{name}: file is {len} bytes, too short for the 8-byte safetensors header length"
            )));
        }
        crate::output::register_input(&f, path, &name);
        // SAFETY: the map is read-only and ftk never writes input files (an
        // output equal to an input is refused). A concurrent truncation
        // raises SIGBUS on access: the handler registered below names the
        // file and exits 2 instead of crashing.
        let mmap = unsafe { Mmap::map(&f) }.map_err(|e| Error::io("cannot map", path, e))?;
        let (n, meta) = safetensors::SafeTensors::read_metadata(&mmap)
            .map_err(|e| Error::input(format!("{name}: {}", describe(&e, len))))?;
        let bus_slot = crate::signals::register_mapping(mmap.as_ptr() as usize, mmap.len(), &name);
        Ok(TensorFile {
            name,
            mmap: Some(mmap),
            owned: Vec::new(),
            bus_slot,
            data_start: 8 + n,
            meta,
        })
    }

    /// Parse safetensors bytes held in memory (the same checks as
    /// [`TensorFile::open`]); `name` is used in messages.
    pub fn from_bytes(name: &str, bytes: Vec<u8>) -> Result<TensorFile> {
        let len = bytes.len();
        if len < 8 {
            return Err(Error::input(format!(
                "{name}: file is {len} bytes, too short for the 8-byte safetensors header length"
            )));
        }
        let (n, meta) = safetensors::SafeTensors::read_metadata(&bytes)
            .map_err(|e| Error::input(format!("{name}: {}", describe(&e, len))))?;
        Ok(TensorFile {
            name: name.to_string(),
            mmap: None,
            owned: bytes,
            bus_slot: crate::signals::NO_SLOT,
            data_start: 8 + n,
            meta,
        })
    }

    /// The whole file's bytes (header included).
    pub fn bytes(&self) -> &[u8] {
        self.mmap.as_deref().unwrap_or(&self.owned)
    }

    /// The file name, for messages.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Tensor names in file order (by data offset).
    pub fn names(&self) -> Vec<String> {
        self.meta.offset_keys()
    }

    /// The `__metadata__` string map, if any.
    pub fn metadata(&self) -> Option<&HashMap<String, String>> {
        self.meta.metadata().as_ref()
    }

    /// The tensor named `name`, if present.
    pub fn get<'a>(&'a self, name: &'a str) -> Option<Tensor<'a>> {
        let info: &TensorInfo = self.meta.info(name)?;
        let bytes = self.bytes();
        let (a, b) = info.data_offsets;
        Some(Tensor {
            name,
            dtype: info.dtype,
            shape: &info.shape,
            data: &bytes[self.data_start + a..self.data_start + b],
            file: &self.name,
        })
    }

    /// The tensor named `name`, or an input error naming the file.
    pub fn require<'a>(&'a self, name: &'a str) -> Result<Tensor<'a>> {
        self.get(name).ok_or_else(|| {
            Error::input(format!(
                "{}: no tensor named '{name}' (the file has {} tensors)",
                self.name,
                self.meta.tensors().len()
            ))
        })
    }
}

/// Size in bytes of one element; `None` for sub-byte dtypes.
pub fn dtype_bytes(d: Dtype) -> Option<usize> {
    let bits = d.bitsize();
    bits.is_multiple_of(8).then_some(bits / 8)
}

/// Whether `d` is an integer dtype ftk can read as indices.
pub fn is_int(d: Dtype) -> bool {
    matches!(
        d,
        Dtype::I8
            | Dtype::I16
            | Dtype::I32
            | Dtype::I64
            | Dtype::U8
            | Dtype::U16
            | Dtype::U32
            | Dtype::U64
    )
}

/// Whether `d` is a float dtype ftk decodes to f32.
pub fn is_float(d: Dtype) -> bool {
    matches!(d, Dtype::F16 | Dtype::BF16 | Dtype::F32 | Dtype::F64)
}

impl<'a> Tensor<'a> {
    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// `"<file>: tensor '<name>'"`, for messages.
    pub fn here(&self) -> String {
        format!("{}: tensor '{}'", self.file, self.name)
    }

    /// Error unless the tensor has `rank` dimensions.
    pub fn expect_rank(&self, rank: usize, meaning: &str) -> Result<()> {
        if self.shape.len() != rank {
            return Err(Error::input(format!(
                "{}: expected shape {meaning}, got {:?}",
                self.here(),
                self.shape
            )));
        }
        Ok(())
    }

    /// Decode elements `[start, start + out.len())` as f32 (F16/BF16/F32/F64).
    pub fn read_f32(&self, start: usize, out: &mut [f32]) -> Result<()> {
        decode_f32(self.dtype, self.data, start, out).map_err(|e| self.decode_error(e))
    }

    /// Decode elements `[start, start + out.len())` as i64 (any integer dtype).
    pub fn read_i64(&self, start: usize, out: &mut [i64]) -> Result<()> {
        decode_i64(self.dtype, self.data, start, out).map_err(|e| self.decode_error(e))
    }

    /// A wrong dtype is the file's fault (exit 2); a range past the end
    /// the caller's (exit 4).
    fn decode_error(&self, e: DecodeError) -> Error {
        let msg = format!("{}: {e}", self.here());
        match e {
            DecodeError::OutOfBounds { .. } => Error::internal(msg),
            _ => Error::input(msg),
        }
    }

    /// All elements as f32.
    pub fn to_f32_vec(&self) -> Result<Vec<f32>> {
        let mut v = vec![0f32; self.numel()];
        self.read_f32(0, &mut v)?;
        Ok(v)
    }

    /// All elements as i64.
    pub fn to_i64_vec(&self) -> Result<Vec<i64>> {
        let mut v = vec![0i64; self.numel()];
        self.read_i64(0, &mut v)?;
        Ok(v)
    }
}

macro_rules! decode_le {
    ($bytes:expr, $start:expr, $out:expr, $t:ty, $conv:expr) => {{
        const W: usize = std::mem::size_of::<$t>();
        let src = &$bytes[$start * W..($start + $out.len()) * W];
        for (o, c) in $out.iter_mut().zip(src.chunks_exact(W)) {
            let x = <$t>::from_le_bytes(c.try_into().unwrap());
            *o = $conv(x);
        }
    }};
}

/// Why [`decode_f32`] or [`decode_i64`] refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DecodeError {
    #[error("dtype {0:?} is not supported here")]
    Unsupported(Dtype),
    /// The caller asked past the end of the data: a bug, not the input.
    #[error("element range {start}..{end} is out of bounds")]
    OutOfBounds { start: usize, end: usize },
    #[error("expected a float dtype (F16, BF16, F32, F64), got {0:?}")]
    NotFloat(Dtype),
    #[error("expected an integer dtype (I8..I64, U8..U64), got {0:?}")]
    NotInt(Dtype),
}

fn check_range(
    dtype: Dtype,
    bytes: &[u8],
    start: usize,
    n: usize,
) -> std::result::Result<(), DecodeError> {
    let w = dtype_bytes(dtype).ok_or(DecodeError::Unsupported(dtype))?;
    if (start + n) * w > bytes.len() {
        return Err(DecodeError::OutOfBounds {
            start,
            end: start + n,
        });
    }
    Ok(())
}

/// Decode little-endian floats of `dtype` into f32.
pub fn decode_f32(
    dtype: Dtype,
    bytes: &[u8],
    start: usize,
    out: &mut [f32],
) -> std::result::Result<(), DecodeError> {
    check_range(dtype, bytes, start, out.len())?;
    match dtype {
        Dtype::F32 => decode_le!(bytes, start, out, f32, |x| x),
        Dtype::F64 => decode_le!(bytes, start, out, f64, |x: f64| x as f32),
        Dtype::F16 => decode_le!(bytes, start, out, u16, |x| half::f16::from_bits(x).to_f32()),
        Dtype::BF16 => decode_le!(bytes, start, out, u16, |x| half::bf16::from_bits(x)
            .to_f32()),
        other => return Err(DecodeError::NotFloat(other)),
    }
    Ok(())
}

/// Decode little-endian integers of `dtype` into i64. U64 values above
/// i64::MAX are reported as errors rather than wrapped.
pub fn decode_i64(
    dtype: Dtype,
    bytes: &[u8],
    start: usize,
    out: &mut [i64],
) -> std::result::Result<(), DecodeError> {
    check_range(dtype, bytes, start, out.len())?;
    match dtype {
        Dtype::I8 => decode_le!(bytes, start, out, i8, i64::from),
        Dtype::I16 => decode_le!(bytes, start, out, i16, i64::from),
        Dtype::I32 => decode_le!(bytes, start, out, i32, i64::from),
        Dtype::I64 => decode_le!(bytes, start, out, i64, |x| x),
        Dtype::U8 => decode_le!(bytes, start, out, u8, i64::from),
        Dtype::U16 => decode_le!(bytes, start, out, u16, i64::from),
        Dtype::U32 => decode_le!(bytes, start, out, u32, i64::from),
        Dtype::U64 => {
            decode_le!(bytes, start, out, u64, |x: u64| i64::try_from(x)
                .unwrap_or(-1));
        }
        other => return Err(DecodeError::NotInt(other)),
    }
    Ok(())
}

/// A tensor to write: name, dtype, shape and little-endian bytes.
pub struct OutTensor<'a> {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub data: std::borrow::Cow<'a, [u8]>,
}

impl<'a> OutTensor<'a> {
    /// An F32 tensor from a slice.
    pub fn f32(name: impl Into<String>, shape: Vec<usize>, v: &[f32]) -> OutTensor<'a> {
        let mut b = Vec::with_capacity(v.len() * 4);
        v.iter().for_each(|x| b.extend_from_slice(&x.to_le_bytes()));
        OutTensor {
            name: name.into(),
            dtype: Dtype::F32,
            shape,
            data: b.into(),
        }
    }

    /// An I64 tensor from a slice.
    pub fn i64(name: impl Into<String>, shape: Vec<usize>, v: &[i64]) -> OutTensor<'a> {
        let mut b = Vec::with_capacity(v.len() * 8);
        v.iter().for_each(|x| b.extend_from_slice(&x.to_le_bytes()));
        OutTensor {
            name: name.into(),
            dtype: Dtype::I64,
            shape,
            data: b.into(),
        }
    }
}

/// A file's header and where each tensor's bytes go.
pub(crate) struct Layout {
    /// The JSON header, padded; written after its 8-byte length.
    pub header: Vec<u8>,
    /// (offset, length) of each tensor in the data section, in spec order.
    pub slots: Vec<(usize, usize)>,
}

/// The layout the safetensors crate itself produces for tensors named,
/// typed and shaped as `specs`: data ordered by descending dtype alignment,
/// then name; header padded to 8 bytes. Returns the header (without its
/// 8-byte length prefix) and each spec's (offset, length) in the data
/// section, in the order given (see [`Layout`]).
pub(crate) fn layout(
    specs: &[(&str, Dtype, &[usize])],
    metadata: Option<HashMap<String, String>>,
) -> Result<Layout> {
    let mut order: Vec<usize> = (0..specs.len()).collect();
    order.sort_by(|&a, &b| specs[b].1.cmp(&specs[a].1).then(specs[a].0.cmp(specs[b].0)));
    let mut infos = Vec::with_capacity(specs.len());
    let mut slots = vec![(0usize, 0usize); specs.len()];
    let mut offset = 0usize;
    for &i in &order {
        let (name, dtype, shape) = specs[i];
        let w = dtype_bytes(dtype)
            .ok_or_else(|| Error::input(format!("cannot write sub-byte dtype {dtype:?}")))?;
        let n = shape.iter().product::<usize>() * w;
        infos.push((
            name.to_string(),
            TensorInfo {
                dtype,
                shape: shape.to_vec(),
                data_offsets: (offset, offset + n),
            },
        ));
        slots[i] = (offset, n);
        offset += n;
    }
    let meta = Metadata::new(metadata, infos)
        .map_err(|e| Error::input(format!("cannot build safetensors header: {e}")))?;
    // The metadata map is a HashMap, whose order changes from process to
    // process: sort it so that the same tensors give the same bytes.
    let enc = |e: serde_json::Error| Error::input(format!("cannot encode header: {e}"));
    let mut value = serde_json::to_value(&meta).map_err(enc)?;
    if let Some(m) = value
        .get_mut("__metadata__")
        .and_then(|m| m.as_object_mut())
    {
        let mut sorted: Vec<_> = std::mem::take(m).into_iter().collect();
        sorted.sort_by(|a, b| a.0.cmp(&b.0));
        m.extend(sorted);
    }
    let mut header = serde_json::to_vec(&value).map_err(enc)?;
    header.resize(header.len().next_multiple_of(8), b' ');
    Ok(Layout { header, slots })
}

/// A short digest of a whole file's bytes: CRC-32 and length, 24 hex digits.
/// It tells two files apart (a state written for another global model), it
/// is no defence against someone forging a file.
pub fn digest(bytes: &[u8]) -> String {
    let mut h = crc32fast::Hasher::new();
    h.update(bytes);
    format!("{:08x}{:016x}", h.finalize(), bytes.len() as u64)
}

/// A digest of a safetensors file's tensors (names, dtypes, shapes and
/// data, by name), blind to header layout and metadata, so a model written
/// again by another library with the same values keeps its digest. Same
/// format as [`digest`]: CRC-32 and total data length, 24 hex digits.
pub fn tensors_digest(bytes: &[u8]) -> Result<String> {
    let (n, meta) = safetensors::SafeTensors::read_metadata(bytes)
        .map_err(|e| Error::input(format!("<digest>: {}", describe(&e, bytes.len()))))?;
    let mut names = meta.offset_keys();
    names.sort();
    let mut h = crc32fast::Hasher::new();
    let mut len = 0u64;
    for name in &names {
        if let Some(info) = meta.info(name) {
            let (a, b) = info.data_offsets;
            h.update(name.as_bytes());
            h.update(format!("{:?}{:?}", info.dtype, info.shape).as_bytes());
            h.update(&bytes[8 + n + a..8 + n + b]);
            len += (b - a) as u64;
        }
    }
    Ok(format!("{:08x}{:016x}", h.finalize(), len))
}

/// [`tensors_digest`] of an open safetensors file's current content.
pub fn digest_file(f: &File) -> Result<String> {
    // SAFETY: a file this process has just written and holds open; nothing
    // else writes it.
    let m = unsafe { Mmap::map(f) }.map_err(|e| Error::io("cannot map", "<output>", e))?;
    tensors_digest(&m)
}

/// Write tensors to `path` atomically, in the safetensors crate's own
/// layout (see [`layout`]), streaming each tensor's bytes once.
pub fn write_safetensors(
    path: &Path,
    tensors: &[OutTensor<'_>],
    metadata: Option<HashMap<String, String>>,
) -> Result<()> {
    write_safetensors_on(Output::create(path)?, tensors, metadata)?.commit()
}

/// [`write_safetensors`] into an output opened earlier (before the work);
/// the caller commits it, after any other outputs it must agree with.
pub fn write_safetensors_on(
    out: Output,
    tensors: &[OutTensor<'_>],
    metadata: Option<HashMap<String, String>>,
) -> Result<Ready> {
    let path = out.path().to_path_buf();
    let path = path.as_path();
    let specs: Vec<(&str, Dtype, &[usize])> = tensors
        .iter()
        .map(|t| (t.name.as_str(), t.dtype, t.shape.as_slice()))
        .collect();
    let Layout { header, slots } = layout(&specs, metadata)?;
    for (t, &(_, n)) in tensors.iter().zip(&slots) {
        if n != t.data.len() {
            return Err(Error::input(format!(
                "tensor '{}': shape {:?} needs {n} bytes, got {}",
                t.name,
                t.shape,
                t.data.len()
            )));
        }
    }
    let mut order: Vec<usize> = (0..tensors.len()).collect();
    order.sort_by_key(|&i| slots[i].0);
    out.fill(|w| {
        let io = |e| Error::io("writing", path, e);
        w.write_all(&(header.len() as u64).to_le_bytes())
            .map_err(io)?;
        w.write_all(&header).map_err(io)?;
        for &i in &order {
            w.write_all(&tensors[i].data).map_err(io)?;
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_all_float_and_int_dtypes() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.safetensors");
        let bf: Vec<u8> = [1.5f32, -2.0, 3.25]
            .iter()
            .flat_map(|x| half::bf16::from_f32(*x).to_bits().to_le_bytes())
            .collect();
        let f16: Vec<u8> = [0.5f32, 65504.0]
            .iter()
            .flat_map(|x| half::f16::from_f32(*x).to_bits().to_le_bytes())
            .collect();
        let i16b: Vec<u8> = [-3i16, 7].iter().flat_map(|x| x.to_le_bytes()).collect();
        let ts = vec![
            OutTensor {
                name: "bf".into(),
                dtype: Dtype::BF16,
                shape: vec![3],
                data: bf.into(),
            },
            OutTensor {
                name: "h".into(),
                dtype: Dtype::F16,
                shape: vec![2],
                data: f16.into(),
            },
            OutTensor {
                name: "i".into(),
                dtype: Dtype::I16,
                shape: vec![2, 1],
                data: i16b.into(),
            },
            OutTensor::f32("f", vec![2], &[1.0, f32::MIN_POSITIVE]),
            OutTensor::i64("l", vec![1], &[i64::MAX]),
        ];
        write_safetensors(&p, &ts, None).unwrap();
        // The reference reader must accept what we wrote.
        let bytes = std::fs::read(&p).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        assert_eq!(st.len(), 5);
        let f = TensorFile::open(&p).unwrap();
        assert_eq!(
            f.require("bf").unwrap().to_f32_vec().unwrap(),
            vec![1.5, -2.0, 3.25]
        );
        assert_eq!(
            f.require("h").unwrap().to_f32_vec().unwrap(),
            vec![0.5, 65504.0]
        );
        assert_eq!(f.require("i").unwrap().to_i64_vec().unwrap(), vec![-3, 7]);
        assert_eq!(
            f.require("l").unwrap().to_i64_vec().unwrap(),
            vec![i64::MAX]
        );
        assert!(f.require("f").unwrap().to_i64_vec().is_err());
        assert!(f.require("nope").is_err());
    }

    #[test]
    fn truncated_file_is_an_input_error() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.safetensors");
        write_safetensors(&p, &[OutTensor::f32("x", vec![4], &[1.0; 4])], None).unwrap();
        let mut b = std::fs::read(&p).unwrap();
        b.truncate(b.len() - 3);
        std::fs::write(&p, &b).unwrap();
        let e = TensorFile::open(&p).err().unwrap();
        assert_eq!(e.exit_code(), 2);
        assert!(e.to_string().contains("truncated"), "{e}");
    }

    #[test]
    fn metadata_order_does_not_change_the_bytes() {
        // Each HashMap has its own random iteration order; 32 keys make an
        // accidental match of two orders vanishingly unlikely.
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, keys: Vec<usize>| {
            let meta: HashMap<String, String> = keys
                .into_iter()
                .map(|k| (format!("key{k}"), k.to_string()))
                .collect();
            let p = dir.path().join(name);
            write_safetensors(&p, &[OutTensor::f32("t", vec![2], &[1.0, 2.0])], Some(meta))
                .unwrap();
            std::fs::read(p).unwrap()
        };
        let a = write("a", (0..32).collect());
        let b = write("b", (0..32).rev().collect());
        assert_eq!(a, b);
    }

    #[test]
    fn failed_write_leaves_no_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("bad.safetensors");
        let bad = OutTensor {
            name: "x".into(),
            dtype: Dtype::F32,
            shape: vec![3],
            data: vec![0u8; 4].into(),
        };
        assert!(write_safetensors(&p, &[bad], None).is_err());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
