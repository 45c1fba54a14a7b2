//! Row-major f32/f64 matrix products on the `gemm` crate (runtime-dispatched
//! AVX2/AVX-512 kernels, rayon-parallel), in the three orientations a linear
//! layer's forward and backward need.

use gemm::{gemm, Parallelism};

thread_local! {
    /// Set inside a rayon task that already runs GEMMs side by side.
    static SERIAL: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

fn par() -> Parallelism {
    if SERIAL.with(|s| s.get()) {
        return Parallelism::None;
    }
    match rayon::current_num_threads() {
        0 | 1 => Parallelism::None,
        n => Parallelism::Rayon(n),
    }
}

/// Run `f` with single-threaded GEMMs (the caller parallelises across calls).
/// Nests: the previous setting comes back afterwards (a rayon thread waiting inside
/// `f` may run another task's `serial` call).
pub fn serial<R>(f: impl FnOnce() -> R) -> R {
    let before = SERIAL.with(|s| s.replace(true));
    let r = f();
    SERIAL.with(|s| s.set(before));
    r
}

/// Element types the products run on.
pub trait Scalar: Copy + Send + Sync + 'static {
    const ZERO: Self;
    const ONE: Self;
}

impl Scalar for f32 {
    const ZERO: f32 = 0.0;
    const ONE: f32 = 1.0;
}

impl Scalar for f64 {
    const ZERO: f64 = 0.0;
    const ONE: f64 = 1.0;
}

/// Shared driver: dst[m,n] (+)= lhs · rhs with explicit strides.
#[allow(clippy::too_many_arguments)]
fn run<T: Scalar>(
    c: &mut [T],
    m: usize,
    n: usize,
    k: usize,
    a: &[T],
    (a_rs, a_cs): (isize, isize),
    b: &[T],
    (b_rs, b_cs): (isize, isize),
    acc: bool,
) {
    assert!(c.len() >= m * n, "gemm: destination too small");
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !acc {
            c[..m * n].fill(T::ZERO);
        }
        return;
    }
    assert!(
        a.len() >= m * k && b.len() >= k * n,
        "gemm: operand too small"
    );
    // SAFETY: the asserts above keep every index the strides can reach inside
    // the slices; `c` does not alias `a` or `b` (distinct &mut / & borrows).
    unsafe {
        gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            n as isize,
            acc,
            a.as_ptr(),
            a_cs,
            a_rs,
            b.as_ptr(),
            b_cs,
            b_rs,
            T::ONE,
            T::ONE,
            false,
            false,
            false,
            par(),
        )
    }
}

/// Run a GEMM on every thread, serial and parallel, so the kernels' packing
/// buffers (thread-local, kept for the process's life) exist before memory
/// is measured rather than showing up in the first step's peak.
pub fn warm_up() {
    let (m, n, k) = (512, 1024, 1024);
    let (a, b) = (vec![0f32; m * k], vec![0f32; n * k]);
    rayon::broadcast(|_| {
        let mut c = vec![0f32; m * n];
        serial(|| matmul_bt(&mut c, &a, &b, m, n, k, false));
    });
    let mut c = vec![0f32; m * n];
    matmul_bt(&mut c, &a, &b, m, n, k, false);
}

/// c[m,n] (+)= a[m,k] · b[n,k]ᵀ — a linear layer `x Wᵀ` with W stored [out, in].
pub fn matmul_bt<T: Scalar>(
    c: &mut [T],
    a: &[T],
    b: &[T],
    m: usize,
    n: usize,
    k: usize,
    acc: bool,
) {
    run(c, m, n, k, a, (k as isize, 1), b, (1, k as isize), acc)
}

/// c[m,n] (+)= a[m,k] · b[k,n] — the input gradient `g W`.
pub fn matmul<T: Scalar>(c: &mut [T], a: &[T], b: &[T], m: usize, n: usize, k: usize, acc: bool) {
    run(c, m, n, k, a, (k as isize, 1), b, (n as isize, 1), acc)
}

/// c[m,n] (+)= a[k,m]ᵀ · b[k,n] — the weight gradient `gᵀ x`.
pub fn matmul_at<T: Scalar>(
    c: &mut [T],
    a: &[T],
    b: &[T],
    m: usize,
    n: usize,
    k: usize,
    acc: bool,
) {
    run(c, m, n, k, a, (1, m as isize), b, (n as isize, 1), acc)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(
        a: impl Fn(usize, usize) -> f32,
        b: impl Fn(usize, usize) -> f32,
        m: usize,
        n: usize,
        k: usize,
    ) -> Vec<f32> {
        let mut c = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                c[i * n + j] = (0..k).map(|p| a(i, p) * b(p, j)).sum();
            }
        }
        c
    }

    #[test]
    fn orientations_match_naive() {
        let (m, n, k) = (7, 5, 9);
        let a: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.37).sin()).collect();
        let bt: Vec<f32> = (0..n * k).map(|i| (i as f32 * 0.11).cos()).collect(); // [n,k]
        let bn: Vec<f32> = (0..k * n).map(|i| (i as f32 * 0.23).sin()).collect(); // [k,n]
        let at: Vec<f32> = (0..k * m).map(|i| (i as f32 * 0.19).cos()).collect(); // [k,m]
        let close = |x: &[f32], y: &[f32]| x.iter().zip(y).all(|(p, q)| (p - q).abs() < 1e-5);
        let mut c = vec![0.0; m * n];
        matmul_bt(&mut c, &a, &bt, m, n, k, false);
        assert!(close(
            &c,
            &naive(|i, p| a[i * k + p], |p, j| bt[j * k + p], m, n, k)
        ));
        matmul(&mut c, &a, &bn, m, n, k, false);
        assert!(close(
            &c,
            &naive(|i, p| a[i * k + p], |p, j| bn[p * n + j], m, n, k)
        ));
        let want = naive(|i, p| at[p * m + i], |p, j| bn[p * n + j], m, n, k);
        matmul_at(&mut c, &at, &bn, m, n, k, false);
        assert!(close(&c, &want));
        matmul_at(&mut c, &at, &bn, m, n, k, true);
        assert!(close(&c, &want.iter().map(|x| 2.0 * x).collect::<Vec<_>>()));
    }
}
