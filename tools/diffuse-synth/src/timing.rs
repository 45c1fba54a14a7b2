//! Phase timers for profiling a run: with `FTK_DIFFUSE_TIMINGS=1` in the environment each
//! phase (model loads, every UNet call, the VAE decode, the write) prints one line to stderr
//! with its wall time and the process's CPU time (user + sys) over it, so a noisy shared
//! machine still shows where the work went, and how much of a step or decode went to each
//! kind of layer ([`Kernel`]). Off (one cached env lookup) otherwise.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Instant;

/// The layer kinds a phase's time is split into.
#[derive(Clone, Copy)]
pub enum Kernel {
    Conv,
    Linear,
    Attention,
    Norm,
}

const KINDS: [&str; 4] = ["conv", "linear", "attention", "norm"];

/// Wall nanoseconds spent in each [`Kernel`] (outermost calls only: a kernel is timed
/// where a layer calls it, not inside another kernel).
static NANOS: [AtomicU64; 4] = [const { AtomicU64::new(0) }; 4];

/// Times its kernel until dropped (nothing when timings are off).
pub struct KernelTimer(Option<(Kernel, Instant)>);

impl Kernel {
    /// Time this kind of kernel until the guard drops.
    pub fn timer(self) -> KernelTimer {
        KernelTimer(on().then(|| (self, Instant::now())))
    }
}

impl Drop for KernelTimer {
    fn drop(&mut self) {
        if let Some((k, t0)) = self.0 {
            NANOS[k as usize].fetch_add(t0.elapsed().as_nanos() as u64, Ordering::Relaxed);
        }
    }
}

fn kernel_nanos() -> [u64; 4] {
    std::array::from_fn(|i| NANOS[i].load(Ordering::Relaxed))
}

fn on() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("FTK_DIFFUSE_TIMINGS").is_some_and(|v| v != "0"))
}

/// The process's user and system CPU seconds so far.
fn cpu_s() -> (f64, f64) {
    #[cfg(unix)]
    {
        let mut ru = std::mem::MaybeUninit::<libc::rusage>::zeroed();
        // SAFETY: getrusage fills the struct it is given.
        let ru = unsafe {
            libc::getrusage(libc::RUSAGE_SELF, ru.as_mut_ptr());
            ru.assume_init()
        };
        let s = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
        (s(ru.ru_utime), s(ru.ru_stime))
    }
    #[cfg(not(unix))]
    {
        (0.0, 0.0)
    }
}

/// A running phase; prints its line when [`Phase::done`] is called (nothing when off).
pub struct Phase {
    name: Option<String>,
    t0: Instant,
    c0: (f64, f64),
    k0: [u64; 4],
}

/// Start timing `name` (built only when timings are on).
pub fn phase(name: impl FnOnce() -> String) -> Phase {
    let name = on().then(name);
    Phase {
        t0: Instant::now(),
        c0: if name.is_some() { cpu_s() } else { (0.0, 0.0) },
        k0: if name.is_some() {
            kernel_nanos()
        } else {
            [0; 4]
        },
        name,
    }
}

impl Phase {
    pub fn done(self) {
        if let Some(n) = self.name {
            let (u, s) = cpu_s();
            let k = kernel_nanos();
            let split: String = (0..4)
                .filter(|&i| k[i] > self.k0[i])
                .map(|i| format!(" {}={:.3}", KINDS[i], (k[i] - self.k0[i]) as f64 * 1e-9))
                .collect();
            eprintln!(
                "diffuse-synth: timing: {n}: {:.3} s wall, {:.3} s user, {:.3} s sys;{split}",
                self.t0.elapsed().as_secs_f64(),
                u - self.c0.0,
                s - self.c0.1
            );
        }
    }
}

/// `x` itself; with timings on, an identity node whose backward prints the CPU time since
/// the previous mark's (or [`backward_start`]), so a guided step's backward shows how much
/// of it went to `name`: the layers downstream of this point.
pub fn backward_mark(
    x: candle_core::Tensor,
    name: &'static str,
) -> candle_core::Result<candle_core::Tensor> {
    let cpu_f32 = x.device().is_cpu() && x.dtype() == candle_core::DType::F32;
    if !on() || !x.track_op() || !cpu_f32 {
        return Ok(x);
    }
    x.apply_op1(Mark(name))
}

struct Mark(&'static str);

static LAST_MARK: std::sync::Mutex<Option<(f64, Instant)>> = std::sync::Mutex::new(None);

/// Start the backward's mark clock.
pub fn backward_start() {
    if on() {
        let (u, s) = cpu_s();
        *LAST_MARK.lock().unwrap_or_else(|e| e.into_inner()) = Some((u + s, Instant::now()));
    }
}

/// Print the time since the last mark as `name`'s (the layers upstream of every mark).
pub fn backward_end(name: &'static str) {
    if on() {
        mark(name);
    }
}

fn mark(name: &str) {
    let (u, s) = cpu_s();
    let mut m = LAST_MARK.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((c0, t0)) = *m {
        eprintln!(
            "diffuse-synth: timing: backward of {name}: {:.3} s wall, {:.3} s cpu",
            t0.elapsed().as_secs_f64(),
            u + s - c0
        );
    }
    *m = Some((u + s, Instant::now()));
}

impl candle_core::CustomOp1 for Mark {
    fn name(&self) -> &'static str {
        "ftk-timing-mark"
    }

    fn cpu_fwd(
        &self,
        st: &candle_core::CpuStorage,
        l: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let v = crate::cpu_kernels::contiguous_f32(st, l)?.to_vec();
        Ok((candle_core::CpuStorage::F32(v), l.shape().clone()))
    }

    fn bwd(
        &self,
        _arg: &candle_core::Tensor,
        _res: &candle_core::Tensor,
        grad: &candle_core::Tensor,
    ) -> candle_core::Result<Option<candle_core::Tensor>> {
        mark(self.0);
        Ok(Some(grad.clone()))
    }
}
