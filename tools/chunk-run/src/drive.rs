//! The loop over recompute modes and steps: zero the gradients, run a step,
//! measure its peak memory and time, and print one `chunk_run` record (or a
//! table row) per (mode, step).

use crate::cli::Args;
use crate::gpu;
use crate::moe::{LayerW, Shape};
use crate::predict::{block_peak_act, block_s_prime_max, BlockDims};
use crate::step::{self, AutoCfg, CpuEngine, Engine, StepCfg};
use ftk::cli::Stdout;
use ftk::device::Device;
use ftk::recompute::Recompute;
use ftk::records::{ChunkRun, Tag};
use ftk::table::Table;
use ftk::Result;

/// Memory accounting and host transfers an engine offers the driver loop.
pub trait Measured: Engine {
    /// Bytes counted live now (heap on the CPU, device buffers on CUDA).
    fn live(&self) -> usize;
    fn peak(&self) -> usize;
    fn reset_peak(&self);
    fn zero_grads(&mut self) -> Result<()>;
    fn to_host(&self, b: &Self::Buf) -> Result<Vec<f32>>;
    /// What the device driver reports in use, where there is one.
    fn reserved(&self) -> Result<Option<usize>>;
}

impl Measured for CpuEngine<'_> {
    fn live(&self) -> usize {
        ftk::alloc::live()
    }
    fn peak(&self) -> usize {
        ftk::alloc::peak()
    }
    fn reset_peak(&self) {
        ftk::alloc::reset_peak()
    }
    fn zero_grads(&mut self) -> Result<()> {
        self.grads.iter_mut().for_each(LayerW::fill_zero);
        Ok(())
    }
    fn to_host(&self, b: &Vec<f32>) -> Result<Vec<f32>> {
        Ok(b.clone())
    }
    fn reserved(&self) -> Result<Option<usize>> {
        Ok(None)
    }
}

impl<T: gpu::Act> Measured for gpu::GpuEngine<T> {
    fn live(&self) -> usize {
        self.mem.live()
    }
    fn peak(&self) -> usize {
        self.mem.peak()
    }
    fn reset_peak(&self) {
        self.mem.reset_peak()
    }
    fn zero_grads(&mut self) -> Result<()> {
        gpu::GpuEngine::zero_grads(self)
    }
    fn to_host(&self, b: &gpu::DBuf<f32>) -> Result<Vec<f32>> {
        self.download(b)
    }
    fn reserved(&self) -> Result<Option<usize>> {
        self.synchronize()?;
        self.device_used().map(Some)
    }
}

/// One invocation's settings, shared by the CPU and CUDA drivers.
pub(crate) struct Run<'a> {
    pub a: &'a Args,
    pub sh: Shape,
    pub dy: &'a [f32],
    pub forced: Option<&'a [Vec<u32>]>,
    pub device: Device,
}

impl Run<'_> {
    pub fn drive_gpu<T: gpu::Act>(
        &self,
        ordinal: usize,
        layers: &[LayerW],
        x: &[f32],
        grads: &mut [LayerW],
    ) -> Result<Option<(Vec<f32>, Vec<f32>)>> {
        let mut eng = gpu::GpuEngine::<T>::new(ordinal, &self.sh, layers, self.forced)?;
        let xd = eng.upload(x)?;
        let dyd = eng.upload(self.dy)?;
        let last = self.drive(&mut eng, &xd, &dyd)?;
        for (l, gw) in grads.iter_mut().enumerate() {
            eng.grads_into(l, gw)?;
        }
        Ok(last)
    }

    /// Every (mode, step): zero the gradients, run the step, print its record.
    /// Returns the last step's y and input gradient.
    /// Just over 100 lines: the measurement (live bytes before, peak after,
    /// timings) must stay around the one `step::step` call it brackets.
    pub fn drive<E: Measured>(
        &self,
        eng: &mut E,
        x: &E::Buf,
        dy: &E::Buf,
    ) -> Result<Option<(Vec<f32>, Vec<f32>)>> {
        let (a, sh) = (self.a, &self.sh);
        let dims = BlockDims {
            t: sh.tokens as f64,
            h: sh.hidden as f64,
            f: sh.ffn as f64,
            e: sh.experts as f64,
            k: sh.topk as f64,
            layers: a.layers() as f64,
            elem: a.elem_bytes(),
        };
        let mut out = Stdout::new();
        let mut table = a.table.then(|| {
            Table::new([
                "step",
                "recompute",
                "chunks",
                "peak_act",
                "predicted",
                "peak",
                "fwd_ms",
                "bwd_ms",
                "tokens/s",
            ])
        });
        let reserved0 = eng.reserved()?;
        let bar = ftk::cli::progress(a.recompute.len() as u64 * a.steps, "steps");
        let mut last = None;
        for (mode, step) in a
            .recompute
            .iter()
            .flat_map(|&m| (0..a.steps).map(move |s| (m, s)))
        {
            eng.zero_grads()?;
            let base = eng.live();
            let auto = a.mact.budget().map(|b| AutoCfg {
                s_max: block_s_prime_max(&dims, b, base as f64),
                bins: a.mact.chunk_bins.clone(),
            });
            if let (Recompute::Auto, Some(c)) = (mode, &auto) {
                nothing_fits(a, sh, c)?;
            }
            eng.sync()?;
            eng.reset_peak();
            let t0 = std::time::Instant::now();
            let cfg = StepCfg {
                mode,
                forced: self.forced,
                auto: auto.as_ref(),
            };
            let r = step::step(eng, sh, a.layers(), x, dy, &cfg)?;
            let step_ms = t0.elapsed().as_secs_f64() * 1e3;
            let peak = eng.peak();
            let reserved = match (reserved0, eng.reserved()?) {
                (Some(b), Some(n)) => Some(n.saturating_sub(b) as u64),
                _ => None,
            };
            let y = eng.to_host(&r.y)?;
            let loss: f64 = y
                .iter()
                .zip(self.dy)
                .map(|(p, q)| f64::from(*p) * f64::from(*q))
                .sum();
            if !loss.is_finite() {
                ftk::bail!("the step produced a non-finite loss ({loss}); check the inputs and weights for huge values");
            }
            let c_max = r.chunks.iter().copied().max().unwrap_or(1);
            let rec = ChunkRun {
                kind: Tag::default(),
                step,
                recompute: mode.name().to_string(),
                chunks: c_max as u64,
                chunks_per_layer: r.chunks.iter().map(|&c| c as u64).collect(),
                layers: a.layers() as u64,
                tokens: sh.tokens as u64,
                max_expert_tokens: r.max_expert_tokens as u64,
                peak_act_bytes: peak.saturating_sub(base) as u64,
                predicted_act_bytes: block_peak_act(&dims, mode, c_max as u64).round() as u64,
                peak_bytes: peak as u64,
                device: self.device.to_string(),
                dtype: a.dtype.clone(),
                device_reserved_bytes: reserved,
                fwd_ms: r.fwd_ms,
                bwd_ms: r.bwd_ms,
                step_ms,
                tokens_per_s: sh.tokens as f64 / (step_ms / 1e3),
                loss,
            };
            match &mut table {
                Some(t) => t.row(table_row(mode, &rec)),
                None if a.no_timing => {
                    let mut v = serde_json::to_value(&rec)
                        .map_err(|e| ftk::Error::internal(format!("encoding a record: {e}")))?;
                    if let Some(m) = v.as_object_mut() {
                        for k in ["fwd_ms", "bwd_ms", "step_ms", "tokens_per_s"] {
                            m.remove(k);
                        }
                    }
                    ftk::jsonl::write_record(&mut out, &v)?;
                    out.flush()?;
                }
                None => {
                    ftk::jsonl::write_record(&mut out, &rec)?;
                    out.flush()?;
                }
            }
            let dx = eng.to_host(&r.dx)?;
            last = Some((y, dx));
            bar.inc(1);
        }
        bar.finish_and_clear();
        if let Some(t) = &table {
            t.print(&mut out)?;
        }
        out.flush()?;
        Ok(last)
    }
}

/// The --table row of one record.
fn table_row(mode: Recompute, rec: &ChunkRun) -> Vec<String> {
    let mib = |b: u64| format!("{:.1} MiB", b as f64 / (1 << 20) as f64);
    vec![
        rec.step.to_string(),
        mode.to_string(),
        format!("{:?}", rec.chunks_per_layer),
        mib(rec.peak_act_bytes),
        mib(rec.predicted_act_bytes),
        mib(rec.peak_bytes),
        format!("{:.1}", rec.fwd_ms),
        format!("{:.1}", rec.bwd_ms),
        format!("{:.0}", rec.tokens_per_s),
    ]
}

/// MACT finds no chunk count in --chunk-bins that fits: the answer is "no"
/// (exit 1), as mem-plan says it, not a run at the largest count.
fn nothing_fits(a: &Args, sh: &Shape, c: &AutoCfg) -> Result<()> {
    let s = (sh.tokens * sh.topk) as f64;
    if ftk::mact::chunks(s, c.s_max, &c.bins).is_some() {
        return Ok(());
    }
    Err(ftk::Error::Negative(format!(
        "recompute auto: does not fit with any chunk count in {:?}: {s} token copies arrive per layer and a chunk may hold at most {:.0} within --device-mem {} × --alpha {} (after weights, gradients and inputs)",
        c.bins,
        c.s_max.max(0.0),
        ftk::size::format_bytes(a.mact.device_mem.unwrap_or(0) as f64),
        a.mact.alpha
    )))
}
