//! CPU hot loops: decoding client bytes to f64, weighted accumulation, the
//! coordinate-wise robust statistics, encoding results, and giving mapped
//! pages back to the kernel once consumed.
//!
//! Everything accumulates in f64: an f32 weight times an f32 value is exact in
//! f64, and the sum of up to millions of such terms keeps ~1e-16 relative
//! error, so the result rounds to the f32 nearest the exact weighted mean in
//! all but rare half-way cases. Flower accumulates in f32, so the two agree to
//! f32 rounding (the tests allow 1e-6 relative).

use ftk::tensors::Dtype;

/// Elements per work unit: 128 Ki elements = 1 MiB of f64 accumulator.
/// Small enough that a few units per thread stay in L2/L3, large enough that
/// the per-unit overhead (one madvise per client) is negligible.
pub const CHUNK: usize = 1 << 17;

/// Decode elements `[start, start + out.len())` of little-endian `dtype`
/// bytes into f64. The dtype was checked when the plan was built.
pub fn decode(dtype: Dtype, bytes: &[u8], start: usize, out: &mut [f64]) {
    macro_rules! dec {
        ($t:ty, $conv:expr) => {{
            const W: usize = std::mem::size_of::<$t>();
            let src = &bytes[start * W..(start + out.len()) * W];
            for (o, c) in out.iter_mut().zip(src.chunks_exact(W)) {
                let x = <$t>::from_le_bytes(c.try_into().expect("chunk width"));
                *o = $conv(x);
            }
        }};
    }
    match dtype {
        Dtype::F32 => dec!(f32, f64::from),
        Dtype::F64 => dec!(f64, |x| x),
        Dtype::F16 => dec!(u16, |x| half::f16::from_bits(x).to_f64()),
        Dtype::BF16 => dec!(u16, |x| half::bf16::from_bits(x).to_f64()),
        Dtype::I8 => dec!(i8, f64::from),
        Dtype::I16 => dec!(i16, f64::from),
        Dtype::I32 => dec!(i32, f64::from),
        Dtype::I64 => dec!(i64, |x| x as f64),
        Dtype::U8 => dec!(u8, f64::from),
        Dtype::U16 => dec!(u16, f64::from),
        Dtype::U32 => dec!(u32, f64::from),
        Dtype::U64 => dec!(u64, |x| x as f64),
        other => unreachable!("dtype {other:?} rejected when planning"),
    }
}

/// `acc += w * x` where x is the f32 data `bytes[start..start+acc.len()]`:
/// the fast path for the common case (no staging buffer).
pub fn axpy_f32(acc: &mut [f64], w: f64, bytes: &[u8], start: usize) {
    let src = &bytes[start * 4..(start + acc.len()) * 4];
    for (a, c) in acc.iter_mut().zip(src.chunks_exact(4)) {
        *a += w * f64::from(f32::from_le_bytes(c.try_into().expect("4 bytes")));
    }
}

/// `acc += w * x`.
pub fn axpy(acc: &mut [f64], w: f64, x: &[f64]) {
    for (a, v) in acc.iter_mut().zip(x) {
        *a += w * v;
    }
}

/// Index of the first non-finite value, if any.
pub fn first_non_finite(x: &[f64]) -> Option<usize> {
    x.iter().position(|v| !v.is_finite())
}

/// Whether the dtype holds integers (step counters and the like).
pub fn is_int(d: Dtype) -> bool {
    ftk::tensors::is_int(d)
}

/// Whether fed-aggregate can read and write this dtype.
pub fn supported(d: Dtype) -> bool {
    ftk::tensors::is_float(d) || is_int(d)
}

/// Append `vals` encoded as `dtype` to `out`. Integers are rounded to the
/// nearest (half away from zero) and saturate at the dtype's range.
pub fn encode(dtype: Dtype, vals: &[f64], out: &mut Vec<u8>) {
    macro_rules! enc {
        ($conv:expr) => {{
            for &v in vals {
                out.extend_from_slice(&$conv(v).to_le_bytes());
            }
        }};
    }
    match dtype {
        Dtype::F32 => enc!(|v: f64| v as f32),
        Dtype::F64 => enc!(|v: f64| v),
        Dtype::F16 => enc!(|v: f64| half::f16::from_f64(v).to_bits()),
        Dtype::BF16 => enc!(|v: f64| half::bf16::from_f64(v).to_bits()),
        // `as` from f64 saturates and maps NaN to 0.
        Dtype::I8 => enc!(|v: f64| v.round() as i8),
        Dtype::I16 => enc!(|v: f64| v.round() as i16),
        Dtype::I32 => enc!(|v: f64| v.round() as i32),
        Dtype::I64 => enc!(|v: f64| v.round() as i64),
        Dtype::U8 => enc!(|v: f64| v.round() as u8),
        Dtype::U16 => enc!(|v: f64| v.round() as u16),
        Dtype::U32 => enc!(|v: f64| v.round() as u32),
        Dtype::U64 => enc!(|v: f64| v.round() as u64),
        other => unreachable!("dtype {other:?} rejected when planning"),
    }
}

/// Slack around each released range. A read fault maps more than the
/// faulting page: `fault_around_bytes` (64 KiB) of cached neighbours, and on
/// kernels with large page-cache folios (measured on 6.18) whole folios of up
/// to 2 MiB, including pages *before* the faulting address that an earlier
/// unit already released. Releasing 2 MiB extra on both sides gets those back
/// too (measured: 128 KiB of slack left ~4% of every file mapped, 2 MiB
/// none), so nothing accumulates per client.
const SLACK: usize = 2 * 1024 * 1024;

/// Tell the kernel the mapped pages under `bytes` (plus [`SLACK`], clamped
/// to `span`, the data range of the file's own mapping) are no longer
/// needed, so they leave this process's resident set. They stay in the page
/// cache; a later read faults them back in with the same contents (the
/// mapping is a read-only private file mapping that is never written, so
/// MADV_DONTNEED only drops page-table entries). A neighbouring unit that
/// loses a page simply re-faults it.
///
/// This is what keeps peak RSS independent of the number of clients: without
/// it every page of every client file read stays mapped until exit.
pub fn release(bytes: &[u8], span: (usize, usize)) {
    #[cfg(target_os = "linux")]
    {
        if bytes.is_empty() || span.0 >= span.1 {
            return;
        }
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as usize;
        let p = bytes.as_ptr() as usize;
        let lo = p.saturating_sub(SLACK).max(span.0) & !(page - 1);
        let hi = (p + bytes.len() + SLACK).min(span.1).next_multiple_of(page);
        // SAFETY: [lo, hi) lies inside one live read-only file mapping: span
        // is the data range of that mapping, and rounding out to whole pages
        // stays inside it (mmap maps whole pages from file offset 0).
        // DONTNEED on such a mapping does not change what later reads return
        // (see above). Errors are ignored: the call is only a memory hint.
        unsafe {
            libc::madvise(lo as *mut libc::c_void, hi - lo, libc::MADV_DONTNEED);
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (bytes, span);
}

/// numpy's median of `v` (sorted in place): the middle value, or the mean of
/// the two middle values for an even count.
pub fn median(v: &mut [f64]) -> f64 {
    v.sort_unstable_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Flower's `_trim_mean`: drop `int(beta * n)` values from each end, average
/// the rest. `v` is sorted in place.
pub fn trimmed_mean(v: &mut [f64], cut: usize) -> f64 {
    v.sort_unstable_by(f64::total_cmp);
    let kept = &v[cut..v.len() - cut];
    kept.iter().sum::<f64>() / kept.len() as f64
}

/// Bulyan's last step for one coordinate: the mean of the `beta` values
/// closest to the coordinate-wise median of `v`. `dist` is scratch space.
pub fn mean_of_closest(v: &mut [f64], beta: usize, scratch: &mut Vec<(f64, f64)>) -> f64 {
    let med = median(v);
    scratch.clear();
    scratch.extend(v.iter().map(|&x| ((x - med).abs(), x)));
    scratch.sort_by(|a, b| a.0.total_cmp(&b.0));
    scratch[..beta].iter().map(|p| p.1).sum::<f64>() / beta as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_encode_roundtrip_every_dtype() {
        let vals = [0.0, 1.0, -2.0, 3.0, 100.0];
        for d in [
            Dtype::F32,
            Dtype::F64,
            Dtype::F16,
            Dtype::BF16,
            Dtype::I8,
            Dtype::I16,
            Dtype::I32,
            Dtype::I64,
        ] {
            let mut b = Vec::new();
            encode(d, &vals, &mut b);
            let mut out = [0.0; 5];
            decode(d, &b, 0, &mut out);
            assert_eq!(out, vals, "{d:?}");
            let mut two = [0.0; 2];
            decode(d, &b, 3, &mut two);
            assert_eq!(two, [3.0, 100.0], "{d:?}");
        }
        let mut b = Vec::new();
        encode(Dtype::U8, &[-3.0, 2.5, 300.0], &mut b);
        assert_eq!(b, vec![0, 3, 255]);
    }

    #[test]
    fn statistics_match_numpy_conventions() {
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&mut [4.0, 1.0, 3.0, 2.0]), 2.5);
        // int(0.2 * 7) = 1 cut from each end: mean of 2..=6
        let mut v = [7.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
        assert_eq!(trimmed_mean(&mut v, 1), 4.0);
        let mut s = Vec::new();
        // median 3; closest three: 3, 2 or 4 (tie), then the other
        assert_eq!(
            mean_of_closest(&mut [1.0, 2.0, 3.0, 4.0, 100.0], 3, &mut s),
            3.0
        );
    }

    #[test]
    fn axpy_f32_fast_path_equals_general_path() {
        let x: Vec<f32> = (0..37).map(|i| i as f32 * 0.37 - 3.0).collect();
        let b: Vec<u8> = x.iter().flat_map(|v| v.to_le_bytes()).collect();
        let mut a1 = vec![1.0; 30];
        let mut a2 = vec![1.0; 30];
        axpy_f32(&mut a1, 0.25, &b, 7);
        let mut d = vec![0.0; 30];
        decode(Dtype::F32, &b, 7, &mut d);
        axpy(&mut a2, 0.25, &d);
        assert_eq!(a1, a2);
    }
}
