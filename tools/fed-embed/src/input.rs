//! Reading the feature matrices, label vectors and parameter tensors every
//! subcommand takes, with the checks that turn bad input into one-line
//! errors naming the file and tensor (exit 2) before any work is done.

use ftk::tensors::{is_float, is_int, OutTensor, Tensor, TensorFile};
use ftk::{bail, Error, Result};
use std::path::Path;

/// A dense row-major f32 matrix.
#[derive(Clone, Debug)]
pub struct Matrix {
    pub rows: usize,
    pub cols: usize,
    pub data: Vec<f32>,
}

impl Matrix {
    pub fn new(rows: usize, cols: usize, data: Vec<f32>) -> Matrix {
        debug_assert_eq!(data.len(), rows * cols);
        Matrix { rows, cols, data }
    }

    pub fn zeros(rows: usize, cols: usize) -> Matrix {
        Matrix::new(rows, cols, vec![0.0; rows * cols])
    }

    pub fn row(&self, i: usize) -> &[f32] {
        &self.data[i * self.cols..(i + 1) * self.cols]
    }

    pub fn row_mut(&mut self, i: usize) -> &mut [f32] {
        &mut self.data[i * self.cols..(i + 1) * self.cols]
    }

    pub fn out(&self, name: &str) -> OutTensor<'static> {
        OutTensor::f32(name, vec![self.rows, self.cols], &self.data)
    }
}

/// Open a safetensors file (every header check runs here).
pub fn open(path: &Path) -> Result<TensorFile> {
    TensorFile::open(path)
}

/// The name of tensor `name` in `f`, or, when the file holds exactly one
/// tensor and `name` was only a default (`explicit` false), that tensor's.
pub fn pick(f: &TensorFile, name: &str, explicit: bool) -> Result<String> {
    if f.get(name).is_some() {
        return Ok(name.to_string());
    }
    let mut names = f.names();
    if !explicit && names.len() == 1 {
        return Ok(names.remove(0));
    }
    bail!(
        "{}: no tensor named '{name}' (it has: {}); name it with the tensor flag",
        f.name(),
        list(&names)
    )
}

fn list(names: &[String]) -> String {
    if names.is_empty() {
        return "no tensors".into();
    }
    let mut s = names
        .iter()
        .take(8)
        .map(|n| format!("'{n}'"))
        .collect::<Vec<_>>()
        .join(", ");
    if names.len() > 8 {
        s.push_str(&format!(", ... {} in all", names.len()));
    }
    s
}

/// A float matrix tensor (default name `name`) from `f`.
pub fn matrix_in(f: &TensorFile, name: &str, explicit: bool, meaning: &str) -> Result<Matrix> {
    let n = pick(f, name, explicit)?;
    matrix(&f.require(&n)?, meaning)
}

/// A float tensor of any rank (default name `name`) from `f`, with its shape.
pub fn floats_in(
    f: &TensorFile,
    name: &str,
    explicit: bool,
    meaning: &str,
) -> Result<(Vec<usize>, Vec<f32>)> {
    let n = pick(f, name, explicit)?;
    let t = f.require(&n)?;
    Ok((t.shape.to_vec(), floats(&t, meaning)?))
}

/// Decode a float tensor of rank 2 into a matrix, rejecting empty shapes and
/// non-finite values (naming the first bad row and column).
pub fn matrix(t: &Tensor<'_>, meaning: &str) -> Result<Matrix> {
    if !is_float(t.dtype) {
        bail!(
            "{}: expected a float tensor (F16, BF16, F32, F64) {meaning}, got {:?}",
            t.here(),
            t.dtype
        );
    }
    t.expect_rank(2, meaning)?;
    let (rows, cols) = (t.shape[0], t.shape[1]);
    if rows == 0 || cols == 0 {
        bail!(
            "{}: empty tensor {:?}, expected {meaning}",
            t.here(),
            t.shape
        );
    }
    let data = t.to_f32_vec()?;
    finite(t, &data, cols)?;
    Ok(Matrix::new(rows, cols, data))
}

/// Decode a float tensor of any rank to f32, checking values are finite.
pub fn floats(t: &Tensor<'_>, meaning: &str) -> Result<Vec<f32>> {
    if !is_float(t.dtype) {
        bail!(
            "{}: expected a float tensor {meaning}, got {:?}",
            t.here(),
            t.dtype
        );
    }
    if t.numel() == 0 {
        bail!(
            "{}: empty tensor {:?}, expected {meaning}",
            t.here(),
            t.shape
        );
    }
    let data = t.to_f32_vec()?;
    finite(t, &data, *t.shape.last().unwrap_or(&1))?;
    Ok(data)
}

fn finite(t: &Tensor<'_>, data: &[f32], cols: usize) -> Result<()> {
    if let Some(i) = data.iter().position(|x| !x.is_finite()) {
        let cols = cols.max(1);
        bail!(
            "{}: value {} at row {}, column {} is not finite; remove or repair that sample",
            t.here(),
            data[i],
            i / cols,
            i % cols
        );
    }
    Ok(())
}

/// An integer label vector of length `n`, every value in `min..`.
pub fn labels(t: &Tensor<'_>, n: usize, min: i64) -> Result<Vec<i64>> {
    if !is_int(t.dtype) {
        bail!(
            "{}: labels must be an integer tensor (I8..I64, U8..U64), got {:?}",
            t.here(),
            t.dtype
        );
    }
    t.expect_rank(1, &format!("[{n}] (one label per sample)"))?;
    if t.shape[0] != n {
        bail!(
            "{}: {} labels for {n} samples; they must match one to one",
            t.here(),
            t.shape[0]
        );
    }
    let v = t.to_i64_vec()?;
    if let Some(i) = v.iter().position(|&x| x < min) {
        bail!(
            "{}: label {} at index {i} is below {min}{}",
            t.here(),
            v[i],
            if min == 0 {
                " (labels are class indices 0..C-1)"
            } else {
                " (-1 marks an unlabelled sample)"
            }
        );
    }
    Ok(v)
}

/// Features from `path` (tensor `name`), plus the file for optional extras.
pub fn features(path: &Path, name: &str, explicit: bool) -> Result<(TensorFile, Matrix)> {
    let f = open(path)?;
    let m = matrix_in(&f, name, explicit, "[N, D] (one feature row per sample)")?;
    Ok((f, m))
}

/// Optional labels: from `--labels FILE` (tensor `labels`) if given, else the
/// `labels` tensor of the features file if it has one.
pub fn optional_labels(
    features: &TensorFile,
    labels_file: Option<&Path>,
    name: &str,
    n: usize,
    min: i64,
) -> Result<Option<Vec<i64>>> {
    if let Some(p) = labels_file {
        let f = open(p)?;
        let t = f.get(name).ok_or_else(|| {
            Error::input(format!(
                "{}: no tensor named '{name}' (it has: {})",
                f.name(),
                list(&f.names())
            ))
        })?;
        return labels(&t, n, min).map(Some);
    }
    match features.get(name) {
        Some(t) => labels(&t, n, min).map(Some),
        None => Ok(None),
    }
}

/// Parse a positive count flag, naming it.
pub fn positive(flag: &str, v: usize) -> Result<usize> {
    if v == 0 {
        bail!("{flag} must be at least 1");
    }
    Ok(v)
}

/// Error unless a float flag is finite and inside (lo, hi] or [lo, hi].
pub fn in_range(flag: &str, v: f64, lo: f64, hi: f64, lo_open: bool) -> Result<f64> {
    let ok = v.is_finite() && v <= hi && if lo_open { v > lo } else { v >= lo };
    if !ok {
        let l = if lo_open { '(' } else { '[' };
        bail!("{flag} must be in {l}{lo}, {hi}], got {v}");
    }
    Ok(v)
}

/// Refuse, before allocating, a buffer of `dims` elements of `elem_bytes`
/// that cannot exist: its size overflows, or it exceeds the machine's memory
/// (/proc/meminfo; unchecked where that cannot be read).
pub fn fits_in_memory(what: &str, dims: &[usize], elem_bytes: usize) -> Result<()> {
    let shape = dims
        .iter()
        .map(usize::to_string)
        .collect::<Vec<_>>()
        .join(" × ");
    let bytes = dims
        .iter()
        .try_fold(elem_bytes as u64, |acc, &d| acc.checked_mul(d as u64));
    let Some(bytes) = bytes else {
        bail!("{what}: {shape} elements overflow a 64-bit size; lower them");
    };
    if let Some(total) = machine_memory() {
        if bytes > total {
            let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
            bail!(
                "{what}: {shape} elements need {:.1} GiB, the machine has {:.1} GiB; lower them",
                gib(bytes),
                gib(total)
            );
        }
    }
    Ok(())
}

/// MemTotal in bytes.
fn machine_memory() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib: u64 = info
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))?
        .trim()
        .strip_suffix("kB")?
        .trim()
        .parse()
        .ok()?;
    kib.checked_mul(1024)
}
