//! CPU kernels for the UNet, the VAE and the classifiers: conv2d as im2col + GEMM written
//! straight into NCHW, one-pass group norm (+ SiLU), layer norm, softmax, GEGLU and
//! attention with a vectorisable exp/erf, and the input-gradient passes of the same
//! kernels for FedCADO guidance and FedDEO description learning.
//!
//! Untracked f32 CPU inputs take the inference kernels. When candle tracks a gradient
//! through the input (but not the weights) the layer runs as a candle custom op whose
//! forward is the same kernel and whose backward computes only the input gradient (no
//! weight gradients: guidance and description learning never need them). Anything else
//! (f64, a tracked weight) runs the candle ops the kernels replace. Every kernel works
//! one sample at a time with shapes that do not depend on the batch, so a sample's numbers
//! do not depend on which samples share its batch (`--shard`).

use candle_core::{DType, Result, Storage, Tensor};
use rayon::prelude::*;

/// Defines `fn $name` that runs its body compiled for AVX-512 or AVX2 (+FMA) when the CPU
/// has them (elementwise loops vectorise 16 or 8 wide), else for the baseline target.
/// The body is a block, or `= f::<FMA>` for a function generic over `const FMA: bool`
/// (the vector paths run `f::<true>`, the baseline `f::<false>`).
macro_rules! multiversion {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($a:ident: $t:ty),*) $(-> $r:ty)? $body:block) => {
        $(#[$m])*
        $vis fn $name($($a: $t),*) $(-> $r)? {
            #[inline(always)]
            fn generic<const FMA: bool>($($a: $t),*) $(-> $r)? $body
            multiversion!(@dispatch generic; $($a: $t),*; $($r)?)
        }
    };
    ($(#[$m:meta])* $vis:vis fn $name:ident($($a:ident: $t:ty),*) $(-> $r:ty)? = $body:ident::<FMA>) => {
        $(#[$m])*
        $vis fn $name($($a: $t),*) $(-> $r)? {
            multiversion!(@dispatch $body; $($a: $t),*; $($r)?)
        }
    };
    (@dispatch $body:ident; $($a:ident: $t:ty),*; $($r:ty)?) => {{
        #[cfg(target_arch = "x86_64")]
        {
            #[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
            unsafe fn avx512($($a: $t),*) $(-> $r)? {
                $body::<true>($($a),*)
            }
            #[target_feature(enable = "avx2,fma")]
            unsafe fn avx2($($a: $t),*) $(-> $r)? {
                $body::<true>($($a),*)
            }
            if std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx512vl")
                && std::arch::is_x86_feature_detected!("fma")
            {
                // SAFETY: the CPU has the features `avx512` was compiled for.
                return unsafe { avx512($($a),*) };
            }
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
            {
                // SAFETY: the CPU has the features `avx2` was compiled for.
                return unsafe { avx2($($a),*) };
            }
        }
        $body::<false>($($a),*)
    }};
}

mod attention;
mod conv;
#[cfg(test)]
mod gemm_bench;
mod layout;
mod linear;
mod math;
mod norm;
pub mod resnet;
mod sgemm;
#[cfg(test)]
mod tests;

pub use attention::{attention, attention_ok, geglu, geglu_packed, softmax_last_dim};
pub use conv::{conv2d, Conv2d};
pub use layout::{nchw_to_tokens, tokens_to_nchw};
pub use linear::{linear, linear_no_bias, Linear};
pub use math::{erf, exp};
pub use norm::{group_norm, layer_norm, GroupNorm};

/// Whether `xs` can take the fast path.
pub(crate) fn fast(xs: &[&Tensor]) -> bool {
    xs.iter()
        .all(|x| !x.track_op() && x.dtype() == DType::F32 && x.device().is_cpu())
}

/// The f32 values of a contiguous CPU tensor, passed to `f`.
pub(crate) fn with_slice<R>(x: &Tensor, f: impl FnOnce(&[f32]) -> Result<R>) -> Result<R> {
    let x = x.contiguous()?;
    let (s, l) = x.storage_and_layout();
    match &*s {
        Storage::Cpu(c) => {
            let v = c.as_slice::<f32>()?;
            let o = l.start_offset();
            f(&v[o..o + l.shape().elem_count()])
        }
        _ => candle_core::bail!("fast kernels run on the CPU"),
    }
}

/// Run `f(n, out_n)` for each `chunk`-long output block: several blocks side by
/// side with single-threaded GEMMs (fewer, larger tasks than one multi-threaded
/// GEMM per block), or one block with every thread. A block's result is the
/// same either way: the GEMM splits rows and columns across threads, never the
/// sum.
pub(crate) fn per_sample(out: &mut [f32], chunk: usize, f: impl Fn(usize, &mut [f32]) + Sync) {
    let blocks = out.len() / chunk.max(1);
    if blocks >= 2 && rayon::current_num_threads() > 1 {
        out.par_chunks_mut(chunk)
            .enumerate()
            .for_each(|(n, o)| ftk::linalg::serial(|| f(n, o)));
    } else {
        out.chunks_mut(chunk.max(1))
            .enumerate()
            .for_each(|(n, o)| f(n, o));
    }
}

/// `n` zeros, filled by every thread when `n` is large: a kernel's output buffer comes from
/// glibc's kept heap (see `ftk::alloc::keep_freed_memory`), where `calloc` would zero it on
/// one thread while the other waits (a few percent of a step at SD-1.5 size).
pub(crate) fn zeros(n: usize) -> Vec<f32> {
    const PAR: usize = 1 << 18;
    if n < 4 * PAR || rayon::current_num_threads() < 2 {
        return vec![0f32; n];
    }
    let mut v: Vec<f32> = Vec::with_capacity(n);
    v.spare_capacity_mut()[..n]
        .par_chunks_mut(PAR)
        .for_each(|c| c.fill(std::mem::MaybeUninit::new(0.0)));
    // SAFETY: all n elements were written just above.
    unsafe { v.set_len(n) };
    v
}

type Scratch = std::thread::LocalKey<std::cell::Cell<Vec<f32>>>;

thread_local! {
    /// Per-thread scratch: attention scores, im2col columns (grown, never shrunk).
    pub(crate) static SCORES: std::cell::Cell<Vec<f32>> = const { std::cell::Cell::new(Vec::new()) };
    pub(crate) static COLS: std::cell::Cell<Vec<f32>> = const { std::cell::Cell::new(Vec::new()) };
    /// A band of a conv's output (or of its output gradient) while it runs in bands.
    pub(crate) static BAND: std::cell::Cell<Vec<f32>> = const { std::cell::Cell::new(Vec::new()) };
}

/// Run `f` on this thread's `key` buffer, at least `n` long (contents unspecified).
///
/// The buffer is moved out while `f` runs rather than borrowed: `f` may start rayon
/// work, and a rayon thread waiting for it runs other queued tasks (another sample's
/// conv, another test's) that ask for the same buffer. Such a nested call gets a fresh
/// one instead of a `RefCell` "already borrowed" panic.
pub(crate) fn with_scratch<R>(
    key: &'static Scratch,
    n: usize,
    f: impl FnOnce(&mut [f32]) -> R,
) -> R {
    let mut v = key.take();
    if v.len() < n {
        v.resize(n, 0.0);
    }
    let r = f(&mut v[..n]);
    key.set(v);
    r
}

/// The f32 values of a CPU storage under a contiguous layout (custom ops' inputs).
pub(crate) fn contiguous_f32<'a>(
    st: &'a candle_core::CpuStorage,
    l: &candle_core::Layout,
) -> Result<&'a [f32]> {
    match (st, l.contiguous_offsets()) {
        (candle_core::CpuStorage::F32(v), Some((a, b))) => Ok(&v[a..b]),
        _ => candle_core::bail!("ftk kernel: expected a contiguous f32 tensor"),
    }
}

/// Whether `x` is f32 on the CPU (tracked or not).
pub(crate) fn f32_cpu(x: &Tensor) -> bool {
    x.dtype() == DType::F32 && x.device().is_cpu()
}
