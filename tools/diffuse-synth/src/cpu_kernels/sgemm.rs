//! A BLIS-style single-threaded f32 GEMM for AVX-512 (the `gemm` crate where the CPU
//! lacks avx512f, or for layouts it does not cover).
//!
//! C is computed in MR x NR tiles held in 28 zmm registers: each step of k loads two
//! vectors of a packed B row and broadcasts MR values of A against them. B is packed in
//! [KC, NR] panels; A is read in place when its rows are contiguous along k (packing it
//! would be a transpose) and packed in [KC, MR] panels otherwise. Tiles run along C's
//! rows, so one A sliver stays in L1 while the packed B block streams from L2. C is
//! written once per KC block, unpacked, with masked stores at its right edge.
//!
//! Measured with `gemm_bench` (2-core Zen 5, GFLOP per CPU second, 9 interleaved runs):
//! on the 3x3 conv taps of the 64x64 and 32x32 planes (about 440 of a SD-1.5 step's 1610
//! GFLOP) 2-13% above the `gemm` crate (75-85% of the FMA peak against its 70-78%), so
//! `conv.rs` uses it there; on GEGLU's 64-row blocks with the weight packed once per call
//! ([`PackedB`]) 91% of the peak against the crate's 55% (it repacks the weight per block).
//! Elsewhere it is at best even (linear layers) or slower (attention's PV, the 8x8 im2col
//! conv: small or transposed operands it packs with scalar loads), so those keep the crate.

use rayon::prelude::*;
#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

/// Rows of a register tile (broadcast from A).
const MR: usize = 14;
/// Columns of a register tile: two zmm vectors.
const NR: usize = 32;

/// Cache blocking: k per packed panel (a [KC, NR] B panel is KC · 128 bytes of L1),
/// rows of A per packed block (MC · KC floats of L2), columns of B per packed block.
#[derive(Debug, Clone, Copy)]
pub(super) struct Blocking {
    pub kc: usize,
    pub mc: usize,
    pub nc: usize,
    /// read row-major A in place rather than packing it
    pub direct_a: bool,
    /// tiles along a row of C (one A sliver in L1, B panels streaming from L2) rather
    /// than down a column (one B panel in L1, A slivers streaming)
    pub a_in_l1: bool,
}

/// Blocking for a Zen 5 core: 48 KiB L1d, 1 MiB L2 (see /sys/devices/system/cpu).
/// Tiles go along C's rows: the A sliver (MR rows x KC) stays in L1 and the packed B
/// block (KC x NC, 768 KiB) streams contiguously from L2, which measured 3-10% faster
/// on the 64x64 conv taps than keeping a B panel in L1 and streaming A slivers.
pub(super) const BLOCKING: Blocking = Blocking {
    kc: 256,
    mc: 224,
    nc: 768,
    direct_a: true,
    a_in_l1: true,
};

/// Whether this CPU runs the AVX-512 kernel (`FTK_SGEMM=0` in the environment sends every
/// product to the `gemm` crate instead: an A/B switch for benchmarks in one binary).
pub(super) fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::sync::OnceLock;
        static HAS: OnceLock<bool> = OnceLock::new();
        *HAS.get_or_init(|| {
            std::arch::is_x86_feature_detected!("avx512f")
                && std::env::var_os("FTK_SGEMM").is_none_or(|v| v != "0")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// c (+)= beta · a · b for strided matrices (strides as (column, row)), single-threaded:
/// the same contract as `attention::gemm_s`, which it replaces where the CPU has avx512f.
///
/// # Safety
/// Every element the strides reach must lie inside its allocation; `c` must not alias
/// `a` or `b`, and no other thread writes the elements of `c` it reaches.
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn gemm_s(
    mnk: (usize, usize, usize),
    c: *mut f32,
    cs: (usize, usize),
    acc: bool,
    a: *const f32,
    as_: (usize, usize),
    b: *const f32,
    bs: (usize, usize),
    beta: f32,
) {
    // SAFETY: forwarded to the caller.
    unsafe { gemm_with(BLOCKING, mnk, c, cs, acc, a, as_, b, bs, beta) }
}

/// [`gemm_s`] with explicit blocking (the benchmark sweeps it).
///
/// # Safety
/// As [`gemm_s`].
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn gemm_with(
    bl: Blocking,
    (m, n, k): (usize, usize, usize),
    c: *mut f32,
    (ccs, crs): (usize, usize),
    acc: bool,
    a: *const f32,
    (acs, ars): (usize, usize),
    b: *const f32,
    (bcs, brs): (usize, usize),
    beta: f32,
) {
    #[cfg(target_arch = "x86_64")]
    if available() && m > 0 && n > 0 && k > 0 {
        let p = Problem {
            m,
            n,
            k,
            c,
            crs,
            acc,
            beta,
            a,
            ars,
            acs,
            b,
            brs,
            bcs,
        };
        if ccs == 1 {
            // SAFETY: avx512f checked; the operands as the caller promised.
            return unsafe { drive(bl, &p, None) };
        }
        if crs == 1 {
            // column-major C: compute Cᵀ = Bᵀ Aᵀ, whose rows are C's columns
            let t = Problem {
                m: n,
                n: m,
                crs: ccs,
                a: b,
                ars: bcs,
                acs: brs,
                b: a,
                brs: acs,
                bcs: ars,
                ..p
            };
            // SAFETY: as above; the transposed view reaches the same elements.
            return unsafe { drive(bl, &t, None) };
        }
    }
    // SAFETY: forwarded to the caller.
    unsafe {
        super::attention::gemm_s(
            (m, n, k),
            c,
            (ccs, crs),
            acc,
            a,
            (acs, ars),
            b,
            (bcs, brs),
            beta,
        )
    }
}

/// One product with unit column stride in C: c[i crs + j] (+)= beta Σ_p a[i ars + p acs]
/// b[p brs + j bcs].
#[derive(Clone, Copy)]
struct Problem {
    m: usize,
    n: usize,
    k: usize,
    c: *mut f32,
    crs: usize,
    acc: bool,
    beta: f32,
    a: *const f32,
    ars: usize,
    acs: usize,
    b: *const f32,
    brs: usize,
    bcs: usize,
}

thread_local! {
    /// Packed A and B blocks of this thread (grown, never shrunk).
    static PACK: std::cell::Cell<Vec<f32>> = const { std::cell::Cell::new(Vec::new()) };
}

/// B's pointer, shared read-only by the packing tasks.
#[derive(Clone, Copy)]
struct SendPtr(*const f32);
// SAFETY: only read, while the slice it comes from is borrowed by `PackedB::new`.
unsafe impl Send for SendPtr {}
// SAFETY: as above.
unsafe impl Sync for SendPtr {}

impl SendPtr {
    fn get(self) -> *const f32 {
        self.0
    }
}

/// Equal k blocks no longer than `kc`: a short last block would pay a full C load and
/// store for little work.
fn k_block(k: usize, kc: usize) -> usize {
    k.div_ceil(k.div_ceil(kc).max(1)).max(1)
}

/// A [k, n] B packed once in the driver's layout (k blocks of [`k_block`] rows, each the
/// block's [kk, NR] panels left to right), for several products with the same B: GEGLU's
/// weight over its 64-row blocks, which would otherwise each transpose it again.
pub(super) struct PackedB {
    k: usize,
    n: usize,
    kc: usize,
    npan: usize,
    buf: Vec<f32>,
    /// floats skipped at `buf`'s start for 64-byte alignment
    skip: usize,
}

impl PackedB {
    /// Packs b[p brs + j bcs] for p < k, j < n.
    ///
    /// # Panics
    /// If the strides reach past `b`.
    pub fn new(b: &[f32], (bcs, brs): (usize, usize), k: usize, n: usize) -> Self {
        assert!(
            k > 0 && n > 0 && (k - 1) * brs + (n - 1) * bcs < b.len(),
            "sgemm: packed operand empty or too small"
        );
        let kc = k_block(k, BLOCKING.kc);
        let npan = n.div_ceil(NR);
        let len = k * npan * NR;
        let buf = vec![0f32; len + 16];
        let skip = buf.as_ptr().align_offset(64).min(15);
        let mut pb = PackedB {
            k,
            n,
            kc,
            npan,
            buf,
            skip,
        };
        // panels on every thread: the weights of a call are packed while nothing else runs
        let dst = &mut pb.buf[skip..skip + len];
        let ptr = SendPtr(b.as_ptr());
        dst.par_chunks_mut(kc * npan * NR)
            .enumerate()
            .for_each(|(kb, blk)| {
                let p0 = kb * kc;
                let kk = kc.min(k - p0);
                blk.par_chunks_mut(kk * NR)
                    .enumerate()
                    .for_each(|(jp, pan)| {
                        let p = Problem {
                            m: 0,
                            n,
                            k,
                            c: std::ptr::null_mut(),
                            crs: 0,
                            acc: false,
                            beta: 0.0,
                            a: std::ptr::null(),
                            ars: 0,
                            acs: 0,
                            b: ptr.get(),
                            brs,
                            bcs,
                        };
                        let nb = NR.min(n - jp * NR);
                        // SAFETY: rows p0..p0 + kk and columns jp NR..jp NR + nb lie inside
                        // `b` (asserted above); `pan` holds one [kk, NR] panel.
                        unsafe { pack_b(&p, p0, kk, jp * NR, nb, pan) };
                    });
            });
        pb
    }

    fn data(&self) -> &[f32] {
        &self.buf[self.skip..]
    }
}

/// c[m, n] (+)= beta · a[m, k] · B for row-major contiguous c and a and a B packed by
/// [`PackedB::new`] (k and n are its).
///
/// # Panics
/// Without avx512f (callers check [`available`]), or if `c` or `a` is too short.
pub(super) fn gemm_packed(c: &mut [f32], m: usize, acc: bool, a: &[f32], pb: &PackedB, beta: f32) {
    let (n, k) = (pb.n, pb.k);
    assert!(available(), "sgemm: no avx512f");
    assert!(
        c.len() >= m * n && a.len() >= m * k,
        "sgemm: operand too small"
    );
    if m == 0 {
        return;
    }
    let p = Problem {
        m,
        n,
        k,
        c: c.as_mut_ptr(),
        crs: n,
        acc,
        beta,
        a: a.as_ptr(),
        ars: k,
        acs: 1,
        b: std::ptr::null(),
        brs: 0,
        bcs: 0,
    };
    // SAFETY: avx512f checked; c and a span [m, n] and [m, k] (asserted); B comes packed,
    // with the kc the driver reads it with.
    #[cfg(target_arch = "x86_64")]
    unsafe {
        drive(BLOCKING, &p, Some(pb))
    }
}

/// `len` rounded up to a whole number of cache lines (16 floats).
fn lines(len: usize) -> usize {
    len.div_ceil(16) * 16
}

/// The five-loop BLIS driver: NC columns of B, KC of k, MC rows of A, then NR x MR
/// register tiles.
///
/// # Safety
/// avx512f; the operands as [`gemm_s`] requires.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn drive(bl: Blocking, p: &Problem, pre: Option<&PackedB>) {
    let Problem { m, n, k, .. } = *p;
    // rows of A contiguous along k: the kernel broadcasts straight from them (packing
    // them would be a transpose costing a good part of the products at these sizes)
    let direct = p.acs == 1 && bl.direct_a;
    // equal k blocks no longer than bl.kc: a short last block would pay a full C
    // load/store for little work
    let kc = pre.map_or_else(|| k_block(k, bl.kc), |pb| pb.kc);
    let nc = bl.nc.min(n.div_ceil(NR) * NR);
    let mc = (bl.mc / MR).max(1) * MR;
    let mc = mc.min(m.div_ceil(MR) * MR);
    let (alen, blen) = (
        lines(mc * kc),
        if pre.is_some() { 0 } else { lines(nc * kc) },
    );
    let mut buf = PACK.take();
    if buf.len() < alen + blen + 16 {
        buf = vec![0f32; alen + blen + 16];
    }
    // 64-byte aligned start: the kernel's B loads are aligned
    let skip = buf.as_ptr().align_offset(64).min(15);
    let (ap, bp) = buf[skip..].split_at_mut(alen);
    for j0 in (0..n).step_by(nc) {
        let nb = nc.min(n - j0);
        for p0 in (0..k).step_by(kc) {
            let kk = kc.min(k - p0);
            let acc = p.acc || p0 > 0;
            let bsrc = match pre {
                // the block's panels, consecutive in the packed copy
                Some(pb) => pb.data()[p0 * pb.npan * NR + (j0 / NR) * kk * NR..].as_ptr(),
                None => {
                    // SAFETY: the block lies inside B; `bp` holds nc · kc floats.
                    unsafe { pack_b(p, p0, kk, j0, nb, bp) };
                    bp.as_ptr()
                }
            };
            for i0 in (0..m).step_by(mc) {
                let mb = mc.min(m - i0);
                if !direct {
                    // SAFETY: as for B.
                    unsafe { pack_a(p, i0, mb, p0, kk, ap) };
                }
                // one register tile: rows i0 + ir.., columns j0 + jr..
                let tile_at = |ir: usize, jr: usize| {
                    let (mv, nv) = (MR.min(mb - ir), NR.min(nb - jr));
                    // SAFETY: panel jr / NR of the block (kk · NR floats each).
                    let bpan = unsafe { bsrc.add(jr * kk) };
                    // SAFETY: the tile's rows and columns lie inside C; A's rows
                    // i0 + ir.. and columns p0.. inside A.
                    unsafe {
                        let cp = p.c.add((i0 + ir) * p.crs + j0 + jr);
                        if direct {
                            let a = p.a.add((i0 + ir) * p.ars + p0);
                            tile::<false>(mv, kk, a, p.ars, bpan, cp, p.crs, nv, acc, p.beta);
                        } else {
                            let a = ap[ir * kk..].as_ptr();
                            tile::<true>(mv, kk, a, MR, bpan, cp, p.crs, nv, acc, p.beta);
                        }
                    }
                };
                if bl.a_in_l1 {
                    for ir in (0..mb).step_by(MR) {
                        for jr in (0..nb).step_by(NR) {
                            tile_at(ir, jr);
                        }
                    }
                } else {
                    for jr in (0..nb).step_by(NR) {
                        for ir in (0..mb).step_by(MR) {
                            tile_at(ir, jr);
                        }
                    }
                }
            }
        }
    }
    PACK.set(buf);
}

/// A[i0..i0+mb, p0..p0+kk] into [kk, MR] panels (rows past mb zero).
///
/// # Safety
/// The block lies inside A; `dst` holds ceil(mb / MR) · MR · kk floats.
unsafe fn pack_a(p: &Problem, i0: usize, mb: usize, p0: usize, kk: usize, dst: &mut [f32]) {
    for (r, pan) in dst[..mb.div_ceil(MR) * MR * kk]
        .chunks_exact_mut(MR * kk)
        .enumerate()
    {
        let rows = MR.min(mb - r * MR);
        for i in 0..rows {
            // SAFETY: row i0 + r MR + i < m, columns p0..p0 + kk < k.
            let src = unsafe { p.a.add((i0 + r * MR + i) * p.ars + p0 * p.acs) };
            if p.acs == 1 {
                // SAFETY: as above, a row of kk contiguous floats.
                let s = unsafe { std::slice::from_raw_parts(src, kk) };
                for (q, &v) in s.iter().enumerate() {
                    pan[q * MR + i] = v;
                }
            } else {
                for q in 0..kk {
                    // SAFETY: as above.
                    pan[q * MR + i] = unsafe { *src.add(q * p.acs) };
                }
            }
        }
        if rows < MR {
            for q in 0..kk {
                pan[q * MR + rows..(q + 1) * MR].fill(0.0);
            }
        }
    }
}

/// B[p0..p0+kk, j0..j0+nb] into [kk, NR] panels (columns past nb zero).
///
/// # Safety
/// The block lies inside B; `dst` holds ceil(nb / NR) · NR · kk floats.
unsafe fn pack_b(p: &Problem, p0: usize, kk: usize, j0: usize, nb: usize, dst: &mut [f32]) {
    for (jp, pan) in dst[..nb.div_ceil(NR) * NR * kk]
        .chunks_exact_mut(NR * kk)
        .enumerate()
    {
        let cols = NR.min(nb - jp * NR);
        let base = j0 + jp * NR;
        if p.bcs == 1 {
            for (q, row) in pan.chunks_exact_mut(NR).enumerate() {
                // SAFETY: row p0 + q < k, columns base..base + cols < n, contiguous.
                let s =
                    unsafe { std::slice::from_raw_parts(p.b.add((p0 + q) * p.brs + base), cols) };
                row[..cols].copy_from_slice(s);
                row[cols..].fill(0.0);
            }
        } else {
            for j in 0..cols {
                // SAFETY: column base + j < n, rows p0..p0 + kk < k.
                let src = unsafe { p.b.add(p0 * p.brs + (base + j) * p.bcs) };
                for q in 0..kk {
                    // SAFETY: as above.
                    pan[q * NR + j] = unsafe { *src.add(q * p.brs) };
                }
            }
            if cols < NR {
                for row in pan.chunks_exact_mut(NR) {
                    row[cols..].fill(0.0);
                }
            }
        }
    }
}

/// The register tile for `mv` (1..=MR) rows.
///
/// # Safety
/// avx512f; `a` is a packed panel of kk steps (PACKED) or mv rows `ars` apart reaching kk
/// floats, `b` a packed panel of kk steps; C's mv rows (crs apart) reach nv
/// columns.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn tile<const PACKED: bool>(
    mv: usize,
    kk: usize,
    a: *const f32,
    ars: usize,
    b: *const f32,
    c: *mut f32,
    crs: usize,
    nv: usize,
    acc: bool,
    beta: f32,
) {
    // SAFETY: forwarded.
    unsafe {
        match mv {
            14 => micro::<14, PACKED>(kk, a, ars, b, c, crs, nv, acc, beta),
            13 => micro::<13, PACKED>(kk, a, ars, b, c, crs, nv, acc, beta),
            12 => micro::<12, PACKED>(kk, a, ars, b, c, crs, nv, acc, beta),
            11 => micro::<11, PACKED>(kk, a, ars, b, c, crs, nv, acc, beta),
            10 => micro::<10, PACKED>(kk, a, ars, b, c, crs, nv, acc, beta),
            9 => micro::<9, PACKED>(kk, a, ars, b, c, crs, nv, acc, beta),
            8 => micro::<8, PACKED>(kk, a, ars, b, c, crs, nv, acc, beta),
            7 => micro::<7, PACKED>(kk, a, ars, b, c, crs, nv, acc, beta),
            6 => micro::<6, PACKED>(kk, a, ars, b, c, crs, nv, acc, beta),
            5 => micro::<5, PACKED>(kk, a, ars, b, c, crs, nv, acc, beta),
            4 => micro::<4, PACKED>(kk, a, ars, b, c, crs, nv, acc, beta),
            3 => micro::<3, PACKED>(kk, a, ars, b, c, crs, nv, acc, beta),
            2 => micro::<2, PACKED>(kk, a, ars, b, c, crs, nv, acc, beta),
            _ => micro::<1, PACKED>(kk, a, ars, b, c, crs, nv, acc, beta),
        }
    }
}

/// C[0..M, 0..nv] (+)= beta · A · Bpanel over kk steps, in 2 M zmm accumulators. A is a
/// packed panel (PACKED: row i at a + i, steps MR apart) or rows `ars` apart, steps
/// contiguous.
///
/// # Safety
/// As [`tile`], with M = mv.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn micro<const M: usize, const PACKED: bool>(
    kk: usize,
    a: *const f32,
    ars: usize,
    b: *const f32,
    c: *mut f32,
    crs: usize,
    nv: usize,
    acc: bool,
    beta: f32,
) {
    let mut lo = [_mm512_setzero_ps(); M];
    let mut hi = [_mm512_setzero_ps(); M];
    // SAFETY: the caller's bounds: kk steps of MR floats of A and NR of B; C's rows.
    unsafe {
        if acc {
            for i in 0..M {
                _mm_prefetch::<_MM_HINT_T0>(c.add(i * crs) as *const i8);
                _mm_prefetch::<_MM_HINT_T0>(c.add(i * crs + 16) as *const i8);
            }
        }
        let (mut a, mut b) = (a, b);
        for _ in 0..kk {
            let b0 = _mm512_load_ps(b);
            let b1 = _mm512_load_ps(b.add(16));
            for i in 0..M {
                let x = _mm512_set1_ps(*a.add(if PACKED { i } else { i * ars }));
                lo[i] = _mm512_fmadd_ps(x, b0, lo[i]);
                hi[i] = _mm512_fmadd_ps(x, b1, hi[i]);
            }
            a = a.add(if PACKED { MR } else { 1 });
            b = b.add(NR);
        }
        let s = _mm512_set1_ps(beta);
        if nv == NR {
            for i in 0..M {
                let cp = c.add(i * crs);
                let (mut x, mut y) = (_mm512_mul_ps(lo[i], s), _mm512_mul_ps(hi[i], s));
                if acc {
                    x = _mm512_add_ps(x, _mm512_loadu_ps(cp));
                    y = _mm512_add_ps(y, _mm512_loadu_ps(cp.add(16)));
                }
                _mm512_storeu_ps(cp, x);
                _mm512_storeu_ps(cp.add(16), y);
            }
        } else {
            let m0: __mmask16 = if nv >= 16 { 0xffff } else { (1u16 << nv) - 1 };
            let m1: __mmask16 = if nv <= 16 {
                0
            } else {
                ((1u32 << (nv - 16)) - 1) as u16
            };
            for i in 0..M {
                let cp = c.add(i * crs);
                let (mut x, mut y) = (_mm512_mul_ps(lo[i], s), _mm512_mul_ps(hi[i], s));
                if acc {
                    x = _mm512_add_ps(x, _mm512_maskz_loadu_ps(m0, cp));
                    y = _mm512_add_ps(y, _mm512_maskz_loadu_ps(m1, cp.add(16)));
                }
                _mm512_mask_storeu_ps(cp, m0, x);
                _mm512_mask_storeu_ps(cp.add(16), m1, y);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::RngExt;

    /// c (+)= beta a b in f64, same strides.
    #[allow(clippy::too_many_arguments)]
    fn reference(
        (m, n, k): (usize, usize, usize),
        c: &mut [f32],
        (ccs, crs): (usize, usize),
        acc: bool,
        a: &[f32],
        (acs, ars): (usize, usize),
        b: &[f32],
        (bcs, brs): (usize, usize),
        beta: f32,
    ) {
        for i in 0..m {
            for j in 0..n {
                let mut s = 0f64;
                for p in 0..k {
                    s += a[i * ars + p * acs] as f64 * b[p * brs + j * bcs] as f64;
                }
                let y = &mut c[i * crs + j * ccs];
                *y = (beta as f64 * s + if acc { *y as f64 } else { 0.0 }) as f32;
            }
        }
    }

    #[test]
    fn prepacked_b_matches_f64_reference() {
        if !available() {
            return;
        }
        let mut rng = ftk::rng::stream(18, 0);
        for case in 0..100 {
            let (m, n) = (rng.random_range(1..70), rng.random_range(1..110));
            // k past one k block in some cases
            let k = if case % 3 == 0 {
                rng.random_range(250..600)
            } else {
                rng.random_range(1..60)
            };
            let bs = strides(&mut rng, k, n);
            let acc = rng.random_bool(0.5);
            let mut gen = |len: usize| -> Vec<f32> {
                (0..len).map(|_| rng.random_range(-1.0f32..1.0)).collect()
            };
            let (a, b, c0) = (gen(m * k), gen(span(k, n, bs)), gen(m * n));
            let mut want = c0.clone();
            reference((m, n, k), &mut want, (1, n), acc, &a, (1, k), &b, bs, 0.5);
            let pb = PackedB::new(&b, bs, k, n);
            let mut got = c0;
            gemm_packed(&mut got, m, acc, &a, &pb, 0.5);
            for (idx, (&g, &w)) in got.iter().zip(&want).enumerate() {
                assert!(
                    (g - w).abs() <= 1e-5 * (1.0 + k as f32),
                    "case {case} ({m}x{n}x{k}, b {bs:?}, acc {acc}): element {idx}: {g} vs {w}"
                );
            }
        }
    }

    /// Strides of an r x c matrix: row-major or column-major, rows / columns padded.
    fn strides(rng: &mut impl RngExt, r: usize, c: usize) -> (usize, usize) {
        let pad = if rng.random_bool(0.5) {
            0
        } else {
            rng.random_range(1..5)
        };
        if rng.random_bool(0.7) {
            (1, c + pad)
        } else {
            (r + pad, 1)
        }
    }

    fn span(r: usize, c: usize, (cs, rs): (usize, usize)) -> usize {
        (r - 1) * rs + (c - 1) * cs + 1
    }

    #[test]
    fn matches_f64_reference_on_random_shapes() {
        let mut rng = ftk::rng::stream(17, 0);
        // small blocking too, so a handful of rows and columns cross every block edge
        let small = Blocking {
            kc: 7,
            mc: 2 * MR,
            nc: 2 * NR,
            direct_a: false,
            a_in_l1: false,
        };
        for case in 0..300 {
            let m = rng.random_range(1..70);
            let n = rng.random_range(1..110);
            let k = rng.random_range(1..60);
            let (cs, as_, bs) = (
                strides(&mut rng, m, n),
                strides(&mut rng, m, k),
                strides(&mut rng, k, n),
            );
            let acc = rng.random_bool(0.5);
            let beta = if rng.random_bool(0.5) { 1.0 } else { 0.37 };
            let mut gen = |len: usize| -> Vec<f32> {
                (0..len).map(|_| rng.random_range(-1.0f32..1.0)).collect()
            };
            let a = gen(span(m, k, as_));
            let b = gen(span(k, n, bs));
            let c0 = gen(span(m, n, cs));
            let mut want = c0.clone();
            reference((m, n, k), &mut want, cs, acc, &a, as_, &b, bs, beta);
            let bl = match case % 4 {
                0 => small,
                1 => Blocking {
                    direct_a: true,
                    a_in_l1: true,
                    ..small
                },
                2 => BLOCKING,
                _ => Blocking {
                    direct_a: false,
                    a_in_l1: !BLOCKING.a_in_l1,
                    ..BLOCKING
                },
            };
            let mut got = c0.clone();
            // SAFETY: the buffers span what the strides reach.
            unsafe {
                gemm_with(
                    bl,
                    (m, n, k),
                    got.as_mut_ptr(),
                    cs,
                    acc,
                    a.as_ptr(),
                    as_,
                    b.as_ptr(),
                    bs,
                    beta,
                )
            };
            for (idx, (&g, &w)) in got.iter().zip(&want).enumerate() {
                // elements C's strides skip keep their old value
                assert!(
                    (g - w).abs() <= 1e-5 * (1.0 + k as f32),
                    "case {case} ({m}x{n}x{k}, c {cs:?}, a {as_:?}, b {bs:?}, acc {acc}): \
                     element {idx}: {g} vs {w}"
                );
            }
        }
    }
}
