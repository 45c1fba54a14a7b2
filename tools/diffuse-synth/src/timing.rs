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
