//! chunk-run's CUDA engine: the same block as moe.rs on one GPU. Router and
//! residual stream in f32; expert weights and activations in `T` (f32, or
//! bf16 with f32 accumulation in cuBLAS); weight gradients accumulate in f32.
//! Kernels come from kernels/moe.cu (NVRTC), GEMMs from cuBLAS (GemmEx, one
//! call per expert group, as transformers' expert loop does on CUDA).
//!
//! Device memory is measured two ways: every activation buffer is counted on
//! allocation and release ([`MemTrack`], the analogue of the CPU's counting
//! allocator and of PyTorch's max_memory_allocated), and the driver's own
//! figure (cuMemGetInfo) is read before and after for what the pool reserved.
//! The dispatch maps (which rows go to which expert) are built on the host
//! from the top-k ids, as the CPU path builds them, and uploaded.

use crate::moe::{self, LayerW, Shape};
use crate::step::Engine;
use cudarc::cublas::sys::{cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t, cudaDataType};
use cudarc::cublas::CudaBlas;
use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, DevicePtr, DeviceRepr, LaunchConfig,
    PushKernelArg, ValidAsZeroBits,
};
use ftk::{Error, Result};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// Element type of the expert weights and activations.
pub trait Act: DeviceRepr + ValidAsZeroBits + Copy + Send + Sync + 'static {
    /// Kernel-name suffix in moe.cu.
    const SUFFIX: &'static str;
    const CUDA: cudaDataType;
    const BYTES: usize;
    fn from_f32(v: f32) -> Self;
}

impl Act for f32 {
    const SUFFIX: &'static str = "f32";
    const CUDA: cudaDataType = cudaDataType::CUDA_R_32F;
    const BYTES: usize = 4;
    fn from_f32(v: f32) -> f32 {
        v
    }
}

impl Act for half::bf16 {
    const SUFFIX: &'static str = "bf16";
    const CUDA: cudaDataType = cudaDataType::CUDA_R_16BF;
    const BYTES: usize = 2;
    fn from_f32(v: f32) -> half::bf16 {
        half::bf16::from_f32(v)
    }
}

fn cuda<E: std::fmt::Debug>(what: &str) -> impl Fn(E) -> Error + '_ {
    move |e| Error::input(format!("CUDA {what}: {e:?}"))
}

/// Live and high-water bytes of the counted device buffers.
#[derive(Default)]
pub struct MemTrack {
    live: AtomicUsize,
    peak: AtomicUsize,
}

impl MemTrack {
    pub fn live(&self) -> usize {
        self.live.load(Ordering::Relaxed)
    }
    pub fn peak(&self) -> usize {
        self.peak.load(Ordering::Relaxed)
    }
    pub fn reset_peak(&self) {
        self.peak.store(self.live(), Ordering::Relaxed);
    }
}

/// A counted device buffer.
pub struct DBuf<T> {
    s: CudaSlice<T>,
    bytes: usize,
    mem: Arc<MemTrack>,
}

impl<T> Drop for DBuf<T> {
    fn drop(&mut self) {
        self.mem.live.fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

struct Funcs {
    softmax_topk: CudaFunction,
    router_bwd: CudaFunction,
    gather: CudaFunction,
    combine: CudaFunction,
    swiglu_fwd: CudaFunction,
    swiglu_bwd: CudaFunction,
    row_dots: CudaFunction,
}

/// One layer on the device: gate [E,h] f32, expert weights [E,f,h] / [E,h,f]
/// in `T` as transformers stores them, and their f32 gradients.
struct DevLayer<T> {
    gate: DBuf<f32>,
    w1: DBuf<T>,
    w2: DBuf<T>,
    w3: DBuf<T>,
    g_gate: DBuf<f32>,
    g_w1: DBuf<f32>,
    g_w2: DBuf<f32>,
    g_w3: DBuf<f32>,
}

pub struct GpuRoute {
    probs: DBuf<f32>,
    idx_d: DBuf<u32>,
    w: DBuf<f32>,
    idx: Vec<u32>,
}

pub struct GpuDisp {
    rows: DBuf<u32>,
    slot: DBuf<u32>,
    inv: DBuf<u32>,
    offsets: Vec<usize>,
    t0: usize,
}

impl GpuDisp {
    fn copies(&self) -> usize {
        *self.offsets.last().unwrap_or(&0)
    }
}

pub struct GpuActs<T> {
    x: DBuf<T>,
    a: DBuf<T>,
    b: DBuf<T>,
    o: DBuf<T>,
}

/// The CUDA engine for expert element type `T`.
pub struct GpuEngine<T: Act> {
    sh: Shape,
    stream: Arc<CudaStream>,
    blas: CudaBlas,
    f: Funcs,
    layers: Vec<DevLayer<T>>,
    forced: Vec<DBuf<u32>>,
    pub mem: Arc<MemTrack>,
}

fn grid(n: usize, threads: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: ((n as u64).div_ceil(u64::from(threads)).max(1) as u32, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    }
}

impl<T: Act> GpuEngine<T> {
    /// Upload the weights (and forced routing) of every layer to device `ordinal`.
    pub fn new(
        ordinal: usize,
        sh: &Shape,
        layers: &[LayerW],
        forced: Option<&[Vec<u32>]>,
    ) -> Result<GpuEngine<T>> {
        let ctx = CudaContext::new(ordinal).map_err(cuda("context"))?;
        // One stream: no cross-stream events to record per access.
        // SAFETY: every buffer is used on `stream` only.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.new_stream().map_err(cuda("stream"))?;
        let blas = CudaBlas::new(stream.clone()).map_err(cuda("cuBLAS"))?;
        let ptx = ftk::kernels::ptx("moe")?;
        let module = ctx.load_module((*ptx).clone()).map_err(cuda("module"))?;
        let load = |n: &str| module.load_function(n).map_err(cuda("kernel"));
        let s = T::SUFFIX;
        let f = Funcs {
            softmax_topk: load("softmax_topk")?,
            router_bwd: load("router_bwd")?,
            gather: load(&format!("gather_rows_{s}"))?,
            combine: load(&format!("combine_rows_{s}"))?,
            swiglu_fwd: load(&format!("swiglu_fwd_{s}"))?,
            swiglu_bwd: load(&format!("swiglu_bwd_{s}"))?,
            row_dots: load(&format!("row_dots_{s}"))?,
        };
        let mut eng = GpuEngine {
            sh: *sh,
            stream,
            blas,
            f,
            layers: Vec::new(),
            forced: Vec::new(),
            mem: Arc::default(),
        };
        for lw in layers {
            let cat = |pick: fn(&moe::ExpertW) -> &Vec<f32>| -> Vec<T> {
                lw.experts
                    .iter()
                    .flat_map(|e| pick(e).iter().map(|&v| T::from_f32(v)))
                    .collect()
            };
            let (nw1, nw2) = (
                sh.experts * sh.ffn * sh.hidden,
                sh.experts * sh.hidden * sh.ffn,
            );
            let dl = DevLayer {
                gate: eng.upload(&lw.gate)?,
                w1: eng.upload(&cat(|e| &e.w1))?,
                w2: eng.upload(&cat(|e| &e.w2))?,
                w3: eng.upload(&cat(|e| &e.w3))?,
                g_gate: eng.zeros(lw.gate.len())?,
                g_w1: eng.zeros(nw1)?,
                g_w2: eng.zeros(nw2)?,
                g_w3: eng.zeros(nw1)?,
            };
            eng.layers.push(dl);
        }
        if let Some(fx) = forced {
            for ids in fx {
                let d = eng.upload(ids)?;
                eng.forced.push(d);
            }
        }
        Ok(eng)
    }

    fn track<U>(&self, s: CudaSlice<U>, n: usize) -> DBuf<U> {
        let bytes = n * std::mem::size_of::<U>();
        let live = self.mem.live.fetch_add(bytes, Ordering::Relaxed) + bytes;
        self.mem.peak.fetch_max(live, Ordering::Relaxed);
        DBuf {
            s,
            bytes,
            mem: self.mem.clone(),
        }
    }

    pub fn upload<U: DeviceRepr>(&self, v: &[U]) -> Result<DBuf<U>> {
        let s = self.stream.clone_htod(v).map_err(cuda("upload"))?;
        Ok(self.track(s, v.len()))
    }

    pub fn download<U: DeviceRepr>(&self, b: &DBuf<U>) -> Result<Vec<U>> {
        self.stream.clone_dtoh(&b.s).map_err(cuda("download"))
    }

    fn zeros<U: DeviceRepr + ValidAsZeroBits>(&self, n: usize) -> Result<DBuf<U>> {
        let s = self
            .stream
            .alloc_zeros::<U>(n.max(1))
            .map_err(cuda("alloc"))?;
        Ok(self.track(s, n))
    }

    /// An uninitialised buffer; every caller overwrites all of it.
    fn alloc<U: DeviceRepr>(&self, n: usize) -> Result<DBuf<U>> {
        // SAFETY: the contents are written by a kernel or GEMM before any read.
        let s = unsafe { self.stream.alloc::<U>(n.max(1)) }.map_err(cuda("alloc"))?;
        Ok(self.track(s, n))
    }

    fn ptr<U>(&self, b: &DBuf<U>) -> u64 {
        b.s.device_ptr(&self.stream).0
    }

    /// Row-major C[m,n] = op(A)·op(B) + beta·C, op(A) [m,k] (A stored [k,m]
    /// when `ta`), op(B) [k,n] (B stored [n,k] when `tb`); pointers are byte
    /// addresses, types per operand, f32 compute. cuBLAS is column-major, so
    /// this computes Cᵀ = op(B)ᵀ·op(A)ᵀ.
    #[allow(clippy::too_many_arguments)]
    fn gemm(
        &self,
        c: (u64, cudaDataType),
        a: (u64, cudaDataType),
        b: (u64, cudaDataType),
        (m, n, k): (usize, usize, usize),
        ta: bool,
        tb: bool,
        beta: f32,
    ) -> Result<()> {
        if m == 0 || n == 0 {
            return Ok(());
        }
        let op = |t: bool| {
            if t {
                cublasOperation_t::CUBLAS_OP_T
            } else {
                cublasOperation_t::CUBLAS_OP_N
            }
        };
        let alpha = 1f32;
        // SAFETY: the callers pass buffers holding at least m·k, k·n and m·n
        // elements of the named types at these addresses, all on `stream`.
        unsafe {
            cudarc::cublas::result::gemm_ex(
                *self.blas.handle(),
                op(tb),
                op(ta),
                n as i32,
                m as i32,
                k as i32,
                &alpha as *const f32 as *const _,
                b.0 as *const _,
                b.1,
                if tb { k } else { n } as i32,
                a.0 as *const _,
                a.1,
                if ta { m } else { k } as i32,
                &beta as *const f32 as *const _,
                c.0 as *mut _,
                c.1,
                n as i32,
                cublasComputeType_t::CUBLAS_COMPUTE_32F,
                cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(cuda("GEMM"))
    }

    /// Download a layer's weight gradients into `gw` (transformers' layout).
    pub fn grads_into(&self, l: usize, gw: &mut LayerW) -> Result<()> {
        let d = &self.layers[l];
        gw.gate = self.download(&d.g_gate)?;
        let (fh, e) = (self.sh.ffn * self.sh.hidden, self.sh.experts);
        let (w1, w2, w3) = (
            self.download(&d.g_w1)?,
            self.download(&d.g_w2)?,
            self.download(&d.g_w3)?,
        );
        for (i, ex) in gw.experts.iter_mut().enumerate().take(e) {
            ex.w1 = w1[i * fh..(i + 1) * fh].to_vec();
            ex.w2 = w2[i * fh..(i + 1) * fh].to_vec();
            ex.w3 = w3[i * fh..(i + 1) * fh].to_vec();
        }
        Ok(())
    }

    /// Zero every weight gradient (before a step).
    pub fn zero_grads(&mut self) -> Result<()> {
        for d in &mut self.layers {
            for g in [&mut d.g_gate, &mut d.g_w1, &mut d.g_w2, &mut d.g_w3] {
                self.stream.memset_zeros(&mut g.s).map_err(cuda("memset"))?;
            }
        }
        Ok(())
    }

    /// Bytes the driver reports in use on the device.
    pub fn device_used(&self) -> Result<usize> {
        let (free, total) = self
            .stream
            .context()
            .mem_get_info()
            .map_err(cuda("mem_get_info"))?;
        Ok(total - free)
    }

    pub fn synchronize(&self) -> Result<()> {
        self.stream.synchronize().map_err(cuda("synchronize"))
    }

    /// Launch `func` over `n` work items with `threads` per block.
    fn launch(
        &self,
        func: &CudaFunction,
        n: usize,
        threads: u32,
        args: &[&dyn ArgPush],
    ) -> Result<()> {
        let mut b = self.stream.launch_builder(func);
        for a in args {
            a.push(&mut b);
        }
        // SAFETY: each kernel in moe.cu bounds its threads by the element
        // counts passed with it, and the buffers hold that many elements.
        unsafe { b.launch(grid(n, threads)) }
            .map(|_| ())
            .map_err(cuda("launch"))
    }

    /// One GEMM per expert group of `d`: C_e = A_e ∘ B_e + beta·C_e, the
    /// product `prod` with the group's row count.
    fn expert_gemm(
        &self,
        d: &GpuDisp,
        c: Opnd,
        a: Opnd,
        b: Opnd,
        prod: Prod,
        beta: f32,
    ) -> Result<()> {
        for e in 0..self.sh.experts {
            let (r0, r1) = (d.offsets[e], d.offsets[e + 1]);
            if r1 > r0 {
                let (dims, ta, tb) = prod.shape(r1 - r0);
                self.gemm(c.at(e, r0), a.at(e, r0), b.at(e, r0), dims, ta, tb, beta)?;
            }
        }
        Ok(())
    }

    /// Rows of an expert-grouped buffer, `width` elements each.
    fn rows<U: Act>(&self, buf: &DBuf<U>, width: usize) -> Opnd {
        Opnd::Rows {
            base: self.ptr(buf),
            row_bytes: (width * U::BYTES) as u64,
            ty: U::CUDA,
        }
    }

    /// A stack of per-expert [f,h] or [h,f] matrices.
    fn experts<U: Act>(&self, buf: &DBuf<U>) -> Opnd {
        Opnd::Expert {
            base: self.ptr(buf),
            bytes: (self.sh.ffn * self.sh.hidden * U::BYTES) as u64,
            ty: U::CUDA,
        }
    }
}

/// A GEMM operand of one expert group: the group's first row in an
/// expert-grouped buffer, or the expert's matrix in a per-expert stack.
#[derive(Clone, Copy)]
enum Opnd {
    Rows {
        base: u64,
        row_bytes: u64,
        ty: cudaDataType,
    },
    Expert {
        base: u64,
        bytes: u64,
        ty: cudaDataType,
    },
}

impl Opnd {
    fn at(self, e: usize, r0: usize) -> (u64, cudaDataType) {
        match self {
            Opnd::Rows {
                base,
                row_bytes,
                ty,
            } => (base + r0 as u64 * row_bytes, ty),
            Opnd::Expert { base, bytes, ty } => (base + e as u64 * bytes, ty),
        }
    }
}

/// The three products of an expert group with `n` rows.
#[derive(Clone, Copy)]
enum Prod {
    /// [n, out] = rows [n, inner] · Wᵀ, W stored [out, inner] (nn.Linear).
    RowsWt(usize, usize),
    /// [n, out] = rows [n, inner] · W, W stored [inner, out].
    RowsW(usize, usize),
    /// [m, k] = Aᵀ · B over the group's rows, A [n, m] and B [n, k].
    Grad(usize, usize),
}

impl Prod {
    /// (m, n, k) of the row-major GEMM, and whether A and B are transposed.
    fn shape(self, rows: usize) -> ((usize, usize, usize), bool, bool) {
        match self {
            Prod::RowsWt(out, inner) => ((rows, out, inner), false, true),
            Prod::RowsW(out, inner) => ((rows, out, inner), false, false),
            Prod::Grad(m, k) => ((m, k, rows), true, false),
        }
    }
}

/// A kernel argument: device pointers and scalars, pushed by value.
trait ArgPush {
    fn push<'a>(&'a self, b: &mut cudarc::driver::LaunchArgs<'a>);
}

impl ArgPush for u64 {
    fn push<'a>(&'a self, b: &mut cudarc::driver::LaunchArgs<'a>) {
        b.arg(self);
    }
}
impl ArgPush for u32 {
    fn push<'a>(&'a self, b: &mut cudarc::driver::LaunchArgs<'a>) {
        b.arg(self);
    }
}
impl ArgPush for i32 {
    fn push<'a>(&'a self, b: &mut cudarc::driver::LaunchArgs<'a>) {
        b.arg(self);
    }
}

const NULL: u64 = 0;

impl<T: Act> Engine for GpuEngine<T> {
    type Buf = DBuf<f32>;
    type Route = GpuRoute;
    type Disp = GpuDisp;
    type Acts = GpuActs<T>;
    type Dw = DBuf<f32>;

    fn copy(&mut self, x: &DBuf<f32>) -> Result<DBuf<f32>> {
        let mut y = self.alloc::<f32>(x.s.len())?;
        self.stream
            .memcpy_dtod(&x.s, &mut y.s)
            .map_err(cuda("copy"))?;
        Ok(y)
    }

    fn route(&mut self, l: usize, x: &DBuf<f32>, forced: Option<&[u32]>) -> Result<GpuRoute> {
        let Shape {
            tokens: t,
            experts: e,
            topk: k,
            hidden: h,
            ..
        } = self.sh;
        let f32t = cudaDataType::CUDA_R_32F;
        let probs = self.alloc::<f32>(t * e)?;
        let lay = &self.layers[l];
        self.gemm(
            (self.ptr(&probs), f32t),
            (self.ptr(x), f32t),
            (self.ptr(&lay.gate), f32t),
            (t, e, h),
            false,
            true,
            0.0,
        )?;
        let idx_d = self.alloc::<u32>(t * k)?;
        let w = self.alloc::<f32>(t * k)?;
        let forced_ptr = match forced {
            Some(_) => self.ptr(&self.forced[l]),
            None => NULL,
        };
        let norm = i32::from(self.sh.norm_topk_prob);
        self.launch(
            &self.f.softmax_topk,
            t,
            128,
            &[
                &self.ptr(&probs),
                &self.ptr(&idx_d),
                &self.ptr(&w),
                &forced_ptr,
                &(t as u32),
                &(e as u32),
                &(k as u32),
                &norm,
            ],
        )?;
        let idx = self.download(&idx_d)?;
        Ok(GpuRoute {
            probs,
            idx_d,
            w,
            idx,
        })
    }

    fn ids<'a>(&self, r: &'a GpuRoute) -> &'a [u32] {
        &r.idx
    }

    fn dispatch(&mut self, r: &GpuRoute, t0: usize, t1: usize) -> Result<GpuDisp> {
        let d = moe::dispatch(&self.sh, &r.idx, t0, t1);
        Ok(GpuDisp {
            rows: self.upload(&d.rows)?,
            slot: self.upload(&d.slot)?,
            inv: self.upload(&d.inv)?,
            offsets: d.offsets,
            t0,
        })
    }

    fn experts_forward(&mut self, l: usize, x_in: &DBuf<f32>, d: &GpuDisp) -> Result<GpuActs<T>> {
        let (h, f) = (self.sh.hidden, self.sh.ffn);
        let s = d.copies();
        let x = self.alloc::<T>(s * h)?;
        self.launch(
            &self.f.gather,
            s * h,
            256,
            &[
                &self.ptr(&x),
                &self.ptr(x_in),
                &self.ptr(&d.rows),
                &NULL,
                &NULL,
                &(s as u32),
                &(h as u32),
            ],
        )?;
        let a = self.alloc::<T>(s * f)?;
        let b = self.alloc::<T>(s * f)?;
        let lay = &self.layers[l];
        let xr = self.rows(&x, h);
        // A_e = X_e w1_eᵀ, B_e = X_e w3_eᵀ
        let (ar, br) = (self.rows(&a, f), self.rows(&b, f));
        self.expert_gemm(d, ar, xr, self.experts(&lay.w1), Prod::RowsWt(f, h), 0.0)?;
        self.expert_gemm(d, br, xr, self.experts(&lay.w3), Prod::RowsWt(f, h), 0.0)?;
        let hid = self.alloc::<T>(s * f)?;
        self.launch(
            &self.f.swiglu_fwd,
            s * f,
            256,
            &[
                &self.ptr(&hid),
                &self.ptr(&a),
                &self.ptr(&b),
                &((s * f) as u64),
            ],
        )?;
        // O_e = H_e w2_eᵀ
        let o = self.alloc::<T>(s * h)?;
        let (or, hr) = (self.rows(&o, h), self.rows(&hid, f));
        self.expert_gemm(d, or, hr, self.experts(&lay.w2), Prod::RowsWt(h, f), 0.0)?;
        drop(hid);
        Ok(GpuActs { x, a, b, o })
    }

    fn combine(
        &mut self,
        y: &mut DBuf<f32>,
        a: &GpuActs<T>,
        d: &GpuDisp,
        r: &GpuRoute,
    ) -> Result<()> {
        let (h, k) = (self.sh.hidden, self.sh.topk);
        let n_tok = d.copies() / k.max(1);
        self.launch(
            &self.f.combine,
            n_tok * h,
            256,
            &[
                &self.ptr(y),
                &self.ptr(&a.o),
                &self.ptr(&d.inv),
                &self.ptr(&r.w),
                &(d.t0 as u32),
                &(n_tok as u32),
                &(k as u32),
                &(h as u32),
            ],
        )
    }

    fn new_dw(&mut self) -> Result<DBuf<f32>> {
        self.zeros(self.sh.tokens * self.sh.topk)
    }

    // One function on purpose (over 100 lines): the CUDA twin of
    // moe::experts_backward, buffers allocated and freed in the same order.
    fn experts_backward(
        &mut self,
        l: usize,
        g: &DBuf<f32>,
        acts: GpuActs<T>,
        d: &GpuDisp,
        r: &GpuRoute,
        dx: &mut DBuf<f32>,
        dw: &mut DBuf<f32>,
    ) -> Result<()> {
        let (h, f, k) = (self.sh.hidden, self.sh.ffn, self.sh.topk);
        let s = d.copies();
        let GpuActs { x, a, b, o } = acts;
        let (pg, prows, pslot) = (self.ptr(g), self.ptr(&d.rows), self.ptr(&d.slot));
        // dL/dw for each copy: <g[token], O[row]>, one warp per row
        self.launch(
            &self.f.row_dots,
            s * 32,
            256,
            &[
                &self.ptr(dw),
                &pg,
                &self.ptr(&o),
                &prows,
                &pslot,
                &(s as u32),
                &(h as u32),
            ],
        )?;
        drop(o);
        // G = w · g for every copy
        let gp = self.alloc::<T>(s * h)?;
        let pgp = self.ptr(&gp);
        self.launch(
            &self.f.gather,
            s * h,
            256,
            &[
                &pgp,
                &pg,
                &prows,
                &self.ptr(&r.w),
                &pslot,
                &(s as u32),
                &(h as u32),
            ],
        )?;
        let (pa, pb) = (self.ptr(&a), self.ptr(&b));
        let hid = self.alloc::<T>(s * f)?;
        self.launch(
            &self.f.swiglu_fwd,
            s * f,
            256,
            &[&self.ptr(&hid), &pa, &pb, &((s * f) as u64)],
        )?;
        let lay = &self.layers[l];
        let (xr, gr, hr) = (self.rows(&x, h), self.rows(&gp, h), self.rows(&hid, f));
        // ∂w2_e += G_eᵀ H_e
        self.expert_gemm(d, self.experts(&lay.g_w2), gr, hr, Prod::Grad(h, f), 1.0)?;
        drop(hid);
        // dH_e = G_e w2_e
        let da = self.alloc::<T>(s * f)?;
        let dar = self.rows(&da, f);
        self.expert_gemm(d, dar, gr, self.experts(&lay.w2), Prod::RowsW(f, h), 0.0)?;
        drop(gp);
        let db = self.alloc::<T>(s * f)?;
        let dbr = self.rows(&db, f);
        self.launch(
            &self.f.swiglu_bwd,
            s * f,
            256,
            &[&self.ptr(&da), &self.ptr(&db), &pa, &pb, &((s * f) as u64)],
        )?;
        drop(a);
        drop(b);
        // ∂w1_e += dA_eᵀ X_e, ∂w3_e += dB_eᵀ X_e
        self.expert_gemm(d, self.experts(&lay.g_w1), dar, xr, Prod::Grad(f, h), 1.0)?;
        self.expert_gemm(d, self.experts(&lay.g_w3), dbr, xr, Prod::Grad(f, h), 1.0)?;
        // dX_e = dA_e w1_e + dB_e w3_e
        let dxp = self.alloc::<T>(s * h)?;
        let (dxr, pdxp) = (self.rows(&dxp, h), self.ptr(&dxp));
        self.expert_gemm(d, dxr, dar, self.experts(&lay.w1), Prod::RowsW(h, f), 0.0)?;
        self.expert_gemm(d, dxr, dbr, self.experts(&lay.w3), Prod::RowsW(h, f), 1.0)?;
        drop(da);
        drop(db);
        drop(x);
        let n_tok = s / k.max(1);
        self.launch(
            &self.f.combine,
            n_tok * h,
            256,
            &[
                &self.ptr(dx),
                &pdxp,
                &self.ptr(&d.inv),
                &NULL,
                &(d.t0 as u32),
                &(n_tok as u32),
                &(k as u32),
                &(h as u32),
            ],
        )
    }

    fn router_backward(
        &mut self,
        l: usize,
        x: &DBuf<f32>,
        r: &GpuRoute,
        dw: &DBuf<f32>,
        dx: &mut DBuf<f32>,
    ) -> Result<()> {
        let Shape {
            tokens: t,
            experts: e,
            topk: k,
            hidden: h,
            ..
        } = self.sh;
        let f32t = cudaDataType::CUDA_R_32F;
        let dl = self.alloc::<f32>(t * e)?;
        let norm = i32::from(self.sh.norm_topk_prob);
        self.launch(
            &self.f.router_bwd,
            t,
            128,
            &[
                &self.ptr(&dl),
                &self.ptr(&r.probs),
                &self.ptr(&r.idx_d),
                &self.ptr(&r.w),
                &self.ptr(dw),
                &(t as u32),
                &(e as u32),
                &(k as u32),
                &norm,
            ],
        )?;
        let lay = &self.layers[l];
        // ∂Wg += dlᵀ x; ∂x += dl Wg
        self.gemm(
            (self.ptr(&lay.g_gate), f32t),
            (self.ptr(&dl), f32t),
            (self.ptr(x), f32t),
            (e, h, t),
            true,
            false,
            1.0,
        )?;
        self.gemm(
            (self.ptr(dx), f32t),
            (self.ptr(&dl), f32t),
            (self.ptr(&lay.gate), f32t),
            (t, h, e),
            false,
            false,
            1.0,
        )
    }

    fn sync(&mut self) -> Result<()> {
        self.synchronize()
    }
}
