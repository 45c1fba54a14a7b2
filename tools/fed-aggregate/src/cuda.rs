//! The weighted-mean pass on a GPU (`--device cuda`): every client tensor is
//! streamed from its memory map through two pinned host buffers to two device
//! staging buffers and accumulated into an f64 device accumulator by
//! kernels/fed_aggregate.cu. Host copies (rayon, into pinned memory), the
//! DMA (copy stream) and the accumulation (compute stream) of consecutive
//! chunks overlap; events order the reuse of each buffer. The accumulated
//! segment comes back once and is divided, encoded and written exactly as
//! the CPU pass does, so the output bytes are the same.
//!
//! Taken for plain weighted means (FedAvg, FedProx, FedRA, partial sums)
//! without DP or a server optimiser, on f32/f16/bf16 client tensors; every
//! other tensor runs on the CPU path in the same job.

use crate::cpu;
use crate::engine::{Job, Sinks, Unit};
use crate::plan::{Fault, Spec};
use crate::strategy::Kind;
use cudarc::driver::{
    CudaContext, CudaEvent, CudaFunction, CudaSlice, CudaStream, DevicePtr, DevicePtrMut,
    LaunchConfig, PinnedHostSlice, PushKernelArg,
};
use ftk::tensors::{dtype_bytes, Dtype};
use ftk::Error;
use rayon::prelude::*;
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// Bytes per staging buffer (two of them, host and device), and elements
/// per device accumulator segment (f64: 128 MiB). The environment can shrink
/// them (FTK_CUDA_STAGE_BYTES, FTK_CUDA_SEGMENT) so that tests cross chunk
/// and segment boundaries with small tensors.
fn sizes() -> (usize, usize) {
    let env = |k: &str, d: usize| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
            .filter(|&v| v >= 8)
            .unwrap_or(d)
    };
    (
        env("FTK_CUDA_STAGE_BYTES", 32 << 20),
        env("FTK_CUDA_SEGMENT", 1 << 24),
    )
}

type R<T> = std::result::Result<T, Fault>;

fn cuda<E: std::fmt::Debug>(what: &'static str) -> impl Fn(E) -> Fault {
    move |e| Fault::Fatal(Error::input(format!("CUDA {what}: {e:?}")))
}

fn kernel_for(d: Dtype) -> Option<&'static str> {
    match d {
        Dtype::F32 => Some("axpy_f32"),
        Dtype::BF16 => Some("axpy_bf16"),
        Dtype::F16 => Some("axpy_f16"),
        _ => None,
    }
}

impl Job<'_> {
    /// Whether spec `i` can run on the GPU.
    fn gpu_eligible(&self, spec: &Spec) -> bool {
        matches!(self.kind, Kind::Linear { .. })
            && self.dp.is_none()
            && !self.opt.needs_global()
            && self.select.is_none()
            && !cpu::is_int(spec.dtype)
            && !spec.sources.is_empty()
            && spec
                .sources
                .iter()
                .all(|s| !s.summed && kernel_for(s.t.dtype).is_some())
            && spec.total_weight() > 0.0
    }
}

struct Staging {
    pinned: [PinnedHostSlice<u8>; 2],
    dev: [CudaSlice<u8>; 2],
    /// Copy into staging slot i finished (host buffer free, device data ready).
    copied: [Option<CudaEvent>; 2],
    /// Accumulation from staging slot i finished (device buffer free).
    used: [Option<CudaEvent>; 2],
    next: usize,
    stage: usize,
}

/// The final pass with eligible tensors on CUDA device `ordinal`.
pub fn finish(job: &mut Job, sinks: &Sinks, ordinal: usize) -> R<()> {
    let gpu: Vec<bool> = job.specs.iter().map(|s| job.gpu_eligible(s)).collect();
    let (stage, seg_max) = sizes();
    let trace = std::env::var_os("FTK_CUDA_TRACE").is_some();
    let t_init = std::time::Instant::now();
    if gpu.iter().any(|&g| g) {
        let ctx = CudaContext::new(ordinal).map_err(cuda("context"))?;
        // The events below order every reuse; cudarc's per-access tracking would
        // only add waits.
        // SAFETY: all cross-stream dependencies are explicit events.
        unsafe { ctx.disable_event_tracking() };
        let copy = ctx.new_stream().map_err(cuda("stream"))?;
        let comp = ctx.new_stream().map_err(cuda("stream"))?;
        let ptx = ftk::kernels::ptx("fed_aggregate")?;
        let module = ctx.load_module((*ptx).clone()).map_err(cuda("module"))?;
        // SAFETY: pinned buffers are only written after their copy event completed.
        let pinned = |_| unsafe { ctx.alloc_pinned_with_flags::<u8>(stage, 0) };
        let mut st = Staging {
            pinned: [
                pinned(0).map_err(cuda("pinned alloc"))?,
                pinned(1).map_err(cuda("pinned alloc"))?,
            ],
            // SAFETY: staging bytes are written by a copy before a kernel reads them.
            dev: [
                unsafe { copy.alloc::<u8>(stage) }.map_err(cuda("alloc"))?,
                unsafe { copy.alloc::<u8>(stage) }.map_err(cuda("alloc"))?,
            ],
            copied: [None, None],
            used: [None, None],
            next: 0,
            stage,
        };
        let max_seg = job
            .specs
            .iter()
            .zip(&gpu)
            .filter(|(_, &g)| g)
            .map(|(s, _)| s.numel.min(seg_max))
            .max()
            .unwrap_or(1);
        let mut acc = comp.alloc_zeros::<f64>(max_seg).map_err(cuda("alloc"))?;
        let direct = |s: &Spec| s.dtype == Dtype::F32 && sinks.partial.is_none();
        let (n_direct, n_host) =
            job.specs
                .iter()
                .zip(&gpu)
                .filter(|(_, &g)| g)
                .fold((0, 0), |(d, h), (s, _)| {
                    let n = s.numel.min(seg_max);
                    if direct(s) {
                        (d.max(n), h)
                    } else {
                        (d, h.max(n))
                    }
                });
        let mut means = if n_direct > 0 {
            Some(comp.alloc_zeros::<f32>(n_direct).map_err(cuda("alloc"))?)
        } else {
            None
        };
        let mut host_f32 = vec![0f32; n_direct];
        let mut host = vec![0f64; n_host];
        let load = |name| module.load_function(name).map_err(cuda("kernel"));
        let mean_fn = load("mean_to_f32")?;
        // One kernel per client dtype, looked up per source.
        let axpy: Vec<(Dtype, CudaFunction)> = [Dtype::F32, Dtype::BF16, Dtype::F16]
            .into_iter()
            .map(|d| Ok((d, load(kernel_for(d).expect("float dtype"))?)))
            .collect::<R<_>>()?;
        if trace {
            eprintln!("cuda: init {:.1} ms", t_init.elapsed().as_secs_f64() * 1e3);
        }
        for (i, spec) in job.specs.iter().enumerate().filter(|(i, _)| gpu[*i]) {
            let mut start = 0;
            while start < spec.numel {
                let len = seg_max.min(spec.numel - start);
                let u = Unit {
                    spec: i,
                    start,
                    len,
                };
                let t0 = std::time::Instant::now();
                segment(job, &axpy, &copy, &comp, &mut st, &mut acc, spec, u)?;
                let t1 = std::time::Instant::now();
                let w = spec.total_weight();
                let t2;
                if spec.dtype == Dtype::F32 && sinks.partial.is_none() {
                    // The mean is all that is written: divide and round on the
                    // device, bring back 4 bytes per element instead of 8.
                    let out = means.as_mut().expect("allocated for f32 outputs");
                    mean_f32(&comp, &mean_fn, out, &acc, w, len)?;
                    let hf = &mut host_f32[..len];
                    comp.memcpy_dtoh(&out.slice(0..len), hf)
                        .map_err(cuda("download"))?;
                    comp.synchronize().map_err(cuda("synchronize"))?;
                    t2 = std::time::Instant::now();
                    if hf.par_iter().any(|v| !v.is_finite()) {
                        // Rare path: the CPU pass names the client (or overflow).
                        let (mut buf, mut a) = (Vec::new(), vec![0f64; len]);
                        job.accumulate(spec, u, &[], &mut a, &mut buf)?;
                        return Err(Fault::Fatal(Error::input(format!(
                            "tensor '{}': the weighted mean is not finite",
                            spec.name
                        ))));
                    }
                    if let Some(o) = sinks.out {
                        hf.par_chunks(cpu::CHUNK)
                            .enumerate()
                            .try_for_each(|(j, c)| {
                                let bytes: Vec<u8> =
                                    c.iter().flat_map(|v| v.to_le_bytes()).collect();
                                o.write_at(i, ((start + j * cpu::CHUNK) * 4) as u64, &bytes)
                                    .map_err(Fault::from)
                            })?;
                    }
                } else {
                    let host = &mut host[..len];
                    comp.memcpy_dtoh(&acc.slice(0..len), host)
                        .map_err(cuda("download"))?;
                    comp.synchronize().map_err(cuda("synchronize"))?;
                    t2 = std::time::Instant::now();
                    let bad = host
                        .par_chunks(cpu::CHUNK)
                        .any(|c| cpu::first_non_finite(c).is_some());
                    if bad {
                        // Rare path: the CPU pass names the client (or overflow).
                        let mut buf = Vec::new();
                        let mut a = vec![0f64; len];
                        job.accumulate(spec, u, &[], &mut a, &mut buf)?;
                        host.copy_from_slice(&a);
                    }
                    host.par_chunks_mut(cpu::CHUNK)
                        .enumerate()
                        .try_for_each(|(j, a)| {
                            let sub = Unit {
                                spec: i,
                                start: start + j * cpu::CHUNK,
                                len: a.len(),
                            };
                            sinks.write_mean(spec, sub, a, w)
                        })?;
                }
                if trace {
                    let ms =
                        |a: std::time::Instant, b: std::time::Instant| (b - a).as_secs_f64() * 1e3;
                    let now = std::time::Instant::now();
                    eprintln!(
                        "cuda: {} [{start}, +{len}): stream {:.1} ms, download {:.1} ms, write {:.1} ms",
                        spec.name,
                        ms(t0, t1),
                        ms(t1, t2),
                        ms(t2, now)
                    );
                }
                start += len;
            }
        }
    }
    job.cpu_only = Some(gpu.iter().map(|g| !g).collect());
    job.finish(sinks)
}

#[allow(clippy::too_many_arguments)]
fn segment(
    job: &Job,
    axpy: &[(Dtype, CudaFunction)],
    copy: &Arc<CudaStream>,
    comp: &Arc<CudaStream>,
    st: &mut Staging,
    acc: &mut CudaSlice<f64>,
    spec: &Spec,
    u: Unit,
) -> R<()> {
    comp.memset_zeros(acc).map_err(cuda("memset"))?;
    let (acc_ptr, _) = acc.device_ptr_mut(comp);
    for src in &spec.sources {
        let w = dtype_bytes(src.t.dtype).expect("float dtypes are whole bytes");
        let func = axpy
            .iter()
            .find(|(d, _)| *d == src.t.dtype)
            .map(|(_, f)| f)
            .expect("checked eligible");
        let bytes = &src.t.data[u.start * w..(u.start + u.len) * w];
        let per = st.stage / w * w;
        for (c, chunk) in bytes.chunks(per).enumerate() {
            let slot = st.next % 2;
            st.next += 1;
            if let Some(ev) = &st.copied[slot] {
                ev.synchronize().map_err(cuda("event"))?;
            }
            // The copy that last read this pinned buffer has completed (above);
            // its own event is never recorded, so this does not wait.
            let dst = st.pinned[slot].as_mut_slice().map_err(cuda("pinned"))?;
            dst[..chunk.len()]
                .par_chunks_mut(1 << 20)
                .zip(chunk.par_chunks(1 << 20))
                .for_each(|(d, s)| d.copy_from_slice(s));
            job.bytes_read
                .fetch_add(chunk.len() as u64, Ordering::Relaxed);
            job.release(chunk);
            if let Some(ev) = &st.used[slot] {
                copy.wait(ev).map_err(cuda("wait"))?;
            }
            let (dev_ptr, _) = st.dev[slot].device_ptr(copy);
            // SAFETY: dev_ptr holds stage >= chunk.len() bytes; the pinned
            // source stays untouched until `copied[slot]` completes.
            unsafe {
                cudarc::driver::result::memcpy_htod_async(
                    dev_ptr,
                    &dst[..chunk.len()],
                    copy.cu_stream(),
                )
            }
            .map_err(cuda("copy"))?;
            let ev = copy.record_event(None).map_err(cuda("event"))?;
            comp.wait(&ev).map_err(cuda("wait"))?;
            st.copied[slot] = Some(ev);
            let n = (chunk.len() / w) as u64;
            let off = acc_ptr + ((c * per / w) * 8) as u64;
            let threads = 256u32;
            let blocks = n.div_ceil(u64::from(threads)).clamp(1, 8192) as u32;
            let cfg = LaunchConfig {
                grid_dim: (blocks, 1, 1),
                block_dim: (threads, 1, 1),
                shared_mem_bytes: 0,
            };
            let mut b = comp.launch_builder(func);
            b.arg(&off).arg(&dev_ptr).arg(&src.weight).arg(&n);
            // SAFETY: n elements of the source dtype were copied to dev_ptr and
            // the accumulator holds u.len >= offset + n f64s.
            unsafe { b.launch(cfg) }.map_err(cuda("launch"))?;
            st.used[slot] = Some(comp.record_event(None).map_err(cuda("event"))?);
        }
    }
    Ok(())
}

/// out[..n] = acc[..n] / w as f32, on `comp`.
fn mean_f32(
    comp: &Arc<CudaStream>,
    func: &CudaFunction,
    out: &mut CudaSlice<f32>,
    acc: &CudaSlice<f64>,
    w: f64,
    n: usize,
) -> R<()> {
    let n = n as u64;
    let cfg = LaunchConfig {
        grid_dim: (n.div_ceil(256).clamp(1, 8192) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    let mut b = comp.launch_builder(func);
    b.arg(out).arg(acc).arg(&w).arg(&n);
    // SAFETY: both buffers hold at least n elements.
    unsafe { b.launch(cfg) }.map(|_| ()).map_err(cuda("launch"))
}
