//! The hot loops: counting expert ids straight out of the mapped file, and
//! top-k selection over router logits. Both split the rows over rayon and
//! keep one small histogram per task, so the file is read once, in place.

use ftk::tensors::{decode_f32, Dtype};
use rayon::prelude::*;

/// Rows handed to one rayon task; large enough to amortise the per-task
/// histogram, small enough to balance two to many cores.
const ROWS_PER_TASK: usize = 1 << 15;

/// The first out-of-range entry found: (flat element index, value).
pub type BadId = (usize, i128);

trait LeInt: Copy {
    const W: usize;
    /// The value as u64; negative values map to huge ones (out of range).
    fn get(b: &[u8]) -> u64;
    fn wide(b: &[u8]) -> i128;
}

macro_rules! le_int {
    ($t:ty) => {
        impl LeInt for $t {
            const W: usize = std::mem::size_of::<$t>();
            #[inline(always)]
            fn get(b: &[u8]) -> u64 {
                <$t>::from_le_bytes(b.try_into().unwrap()) as i128 as u64
            }
            fn wide(b: &[u8]) -> i128 {
                <$t>::from_le_bytes(b.try_into().unwrap()) as i128
            }
        }
    };
}
le_int!(i8);
le_int!(i16);
le_int!(i32);
le_int!(i64);
le_int!(u8);
le_int!(u16);
le_int!(u32);
le_int!(u64);

/// Count ids in `bytes` (little-endian `T`) into `hist`; report the first
/// id outside `0..hist.len()`.
fn count_slice<T: LeInt>(bytes: &[u8], hist: &mut [u64]) -> Result<(), BadId> {
    let n = hist.len() as u64;
    // Four interleaved histograms break the store-to-load dependency when
    // consecutive ids repeat (hot experts), which otherwise serialises the loop.
    let mut h = vec![0u32; 4 * hist.len()];
    let len = hist.len();
    let mut chunks = bytes.chunks_exact(4 * T::W);
    let mut bad = false;
    for c in &mut chunks {
        let a = T::get(&c[..T::W]);
        let b = T::get(&c[T::W..2 * T::W]);
        let d = T::get(&c[2 * T::W..3 * T::W]);
        let e = T::get(&c[3 * T::W..]);
        if (a >= n) | (b >= n) | (d >= n) | (e >= n) {
            bad = true;
            break;
        }
        h[a as usize] += 1;
        h[len + b as usize] += 1;
        h[2 * len + d as usize] += 1;
        h[3 * len + e as usize] += 1;
    }
    if !bad {
        for c in chunks.remainder().chunks_exact(T::W) {
            let a = T::get(c);
            if a >= n {
                bad = true;
                break;
            }
            h[a as usize] += 1;
        }
    }
    if bad {
        let i = bytes
            .chunks_exact(T::W)
            .position(|c| T::get(c) >= n)
            .unwrap_or(0);
        return Err((i, T::wide(&bytes[i * T::W..(i + 1) * T::W])));
    }
    for (i, o) in hist.iter_mut().enumerate() {
        *o += u64::from(h[i])
            + u64::from(h[len + i])
            + u64::from(h[2 * len + i])
            + u64::from(h[3 * len + i]);
    }
    Ok(())
}

/// Element-wise sum of two task histograms (rayon's reduce step).
fn add_hist<E>(mut a: Vec<u64>, b: Vec<u64>) -> Result<Vec<u64>, E> {
    a.iter_mut().zip(&b).for_each(|(x, y)| *x += y);
    Ok(a)
}

fn count_par<T: LeInt + Send + Sync>(
    bytes: &[u8],
    k: usize,
    experts: usize,
) -> Result<Vec<u64>, BadId> {
    // u32 task-local counts cannot overflow: a task holds < 2^32 entries.
    let step = ROWS_PER_TASK * k * T::W;
    bytes
        .par_chunks(step)
        .enumerate()
        .map(|(ci, chunk)| {
            let mut hist = vec![0u64; experts];
            count_slice::<T>(chunk, &mut hist).map_err(|(i, v)| (ci * step / T::W + i, v))?;
            Ok(hist)
        })
        .try_reduce(|| vec![0u64; experts], add_hist)
}

/// Per-expert counts of a block of a [tokens, k] integer tensor's raw bytes.
pub fn count_topk(dtype: Dtype, bytes: &[u8], k: usize, experts: usize) -> Result<Vec<u64>, BadId> {
    match dtype {
        Dtype::I8 => count_par::<i8>(bytes, k, experts),
        Dtype::I16 => count_par::<i16>(bytes, k, experts),
        Dtype::I32 => count_par::<i32>(bytes, k, experts),
        Dtype::I64 => count_par::<i64>(bytes, k, experts),
        Dtype::U8 => count_par::<u8>(bytes, k, experts),
        Dtype::U16 => count_par::<u16>(bytes, k, experts),
        Dtype::U32 => count_par::<u32>(bytes, k, experts),
        Dtype::U64 => count_par::<u64>(bytes, k, experts),
        _ => unreachable!("caller checks the dtype is an integer"),
    }
}

use ftk::routing::topk_row;

/// What went wrong in a logits block: a NaN at (row, col).
pub struct NanAt(pub usize, pub usize);

/// Per-expert counts of top-k routing over `rows` rows of [rows, experts]
/// float logits starting at row `first` of the tensor's raw bytes.
pub fn count_logits(
    dtype: Dtype,
    bytes: &[u8],
    first: usize,
    rows: usize,
    experts: usize,
    k: usize,
) -> Result<Vec<u64>, NanAt> {
    let task_rows = (ROWS_PER_TASK / experts.max(1)).max(64);
    let tasks = rows.div_ceil(task_rows);
    (0..tasks)
        .into_par_iter()
        .map(|t| {
            let r0 = first + t * task_rows;
            let r1 = (first + rows).min(r0 + task_rows);
            let mut hist = vec![0u64; experts];
            let mut buf = vec![0f32; experts];
            let mut top = Vec::with_capacity(k + 1);
            for r in r0..r1 {
                decode_f32(dtype, bytes, r * experts, &mut buf)
                    .expect("caller checked dtype and size");
                topk_row(&buf, k, &mut top).map_err(|c| NanAt(r, c))?;
                for &(_, e) in &top {
                    hist[e] += 1;
                }
            }
            Ok(hist)
        })
        .try_reduce(|| vec![0u64; experts], add_hist)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_match_naive_for_every_dtype_and_tail() {
        let ids: Vec<i64> = (0..1003).map(|i| (i * 7 + i / 3) % 13).collect();
        let mut naive = vec![0u64; 13];
        ids.iter().for_each(|&i| naive[i as usize] += 1);
        let b64: Vec<u8> = ids.iter().flat_map(|x| x.to_le_bytes()).collect();
        let b8: Vec<u8> = ids.iter().map(|&x| x as u8).collect();
        let b16: Vec<u8> = ids.iter().flat_map(|&x| (x as i16).to_le_bytes()).collect();
        assert_eq!(count_topk(Dtype::I64, &b64, 1, 13).unwrap(), naive);
        assert_eq!(count_topk(Dtype::U8, &b8, 1, 13).unwrap(), naive);
        assert_eq!(count_topk(Dtype::I16, &b16, 1, 13).unwrap(), naive);
    }

    #[test]
    fn bad_ids_are_located() {
        let mut ids: Vec<i32> = vec![1; 100];
        ids[57] = -1;
        let b: Vec<u8> = ids.iter().flat_map(|x| x.to_le_bytes()).collect();
        assert_eq!(count_topk(Dtype::I32, &b, 2, 4).unwrap_err(), (57, -1));
        ids[57] = 4;
        let b: Vec<u8> = ids.iter().flat_map(|x| x.to_le_bytes()).collect();
        assert_eq!(count_topk(Dtype::I32, &b, 2, 4).unwrap_err(), (57, 4));
    }

    #[test]
    fn topk_ties_go_to_lower_index() {
        let mut out = vec![];
        topk_row(&[1.0, 3.0, 3.0, 2.0, 3.0], 2, &mut out).unwrap();
        assert_eq!(out.iter().map(|x| x.1).collect::<Vec<_>>(), vec![1, 2]);
        topk_row(&[0.0, 5.0, 1.0, 5.0], 3, &mut out).unwrap();
        assert_eq!(out.iter().map(|x| x.1).collect::<Vec<_>>(), vec![1, 3, 2]);
        assert_eq!(topk_row(&[0.0, f32::NAN], 1, &mut out), Err(1));
    }

    proptest::proptest! {
        /// The parallel, 4-way interleaved counter equals a plain loop for any
        /// ids, widths and lengths (including tails shorter than one block).
        #[test]
        fn parallel_count_equals_plain_loop(ids in proptest::collection::vec(0u8..40, 0..5000), k in 1usize..9) {
            let n = ids.len() / k * k;
            let ids = &ids[..n];
            let mut want = vec![0u64; 40];
            ids.iter().for_each(|&i| want[i as usize] += 1);
            let b32: Vec<u8> = ids.iter().flat_map(|&x| u32::from(x).to_le_bytes()).collect();
            proptest::prop_assert_eq!(count_topk(Dtype::U32, &b32, k, 40).unwrap(), want.clone());
            proptest::prop_assert_eq!(count_topk(Dtype::U8, ids, k, 40).unwrap(), want);
        }

        /// top-k by insertion equals a stable sort by (value desc, index asc).
        #[test]
        fn topk_equals_stable_sort(row in proptest::collection::vec(-4i8..4, 1..70), k in 1usize..9) {
            let row: Vec<f32> = row.iter().map(|&x| f32::from(x) * 0.5).collect();
            let k = k.min(row.len());
            let mut idx: Vec<usize> = (0..row.len()).collect();
            idx.sort_by(|&a, &b| row[b].partial_cmp(&row[a]).unwrap().then(a.cmp(&b)));
            let mut out = vec![];
            topk_row(&row, k, &mut out).unwrap();
            let mut got: Vec<usize> = out.iter().map(|x| x.1).collect();
            let mut want = idx[..k].to_vec();
            got.sort_unstable();
            want.sort_unstable();
            proptest::prop_assert_eq!(got, want);
        }
    }
}
