//! A stack of MoE blocks trained for one step under a recompute mode:
//! none (keep everything), full (keep each block's input, recompute the
//! block in backward), chunked:C (FCDA: route once, then dispatch → experts
//! → combine C token chunks at a time, recomputing chunk by chunk in
//! backward) and auto (MACT: C per layer from the tokens that arrive).

use crate::moe::{self, Acts, Dispatch, LayerT, LayerW, Routing, Shape};
use ftk::recompute::Recompute;
use ftk::Result;
use std::time::Instant;

/// What MACT needs to choose chunks at run time.
#[derive(Clone, Debug)]
pub struct AutoCfg {
    /// s'_max: token copies one chunk may hold (from mem-plan's model).
    pub s_max: f64,
    pub bins: Vec<u64>,
}

/// What a block keeps between its forward and backward.
enum Saved<E: Engine> {
    /// Everything (no recompute).
    All(E::Route, E::Disp, E::Acts),
    /// Only the block input (full recompute).
    Input,
    /// The routing of the whole batch; experts recomputed per chunk.
    Routing(E::Route, usize),
}

/// The operations of one MoE block on a device. The step below is written
/// once against this; the CPU ([`CpuEngine`]) and CUDA (`gpu::GpuEngine`)
/// implementations keep the same buffers alive in the same order, so both
/// follow mem-plan's itemised `block_*` terms. Weights and weight gradients
/// live inside the engine; `l` names the layer.
pub trait Engine {
    /// A residual-stream tensor [T,h] (f32).
    type Buf;
    /// One layer's routing of the whole batch.
    type Route;
    /// The token copies of one chunk grouped by expert.
    type Disp;
    /// Expert activations kept for backward.
    type Acts;
    /// Combine-weight gradients [T·k].
    type Dw;
    fn copy(&mut self, x: &Self::Buf) -> Result<Self::Buf>;
    fn route(&mut self, l: usize, x: &Self::Buf, forced: Option<&[u32]>) -> Result<Self::Route>;
    /// The chosen expert ids [T·k], on the host.
    fn ids<'a>(&self, r: &'a Self::Route) -> &'a [u32];
    fn dispatch(&mut self, r: &Self::Route, t0: usize, t1: usize) -> Result<Self::Disp>;
    fn experts_forward(&mut self, l: usize, x: &Self::Buf, d: &Self::Disp) -> Result<Self::Acts>;
    fn combine(
        &mut self,
        y: &mut Self::Buf,
        a: &Self::Acts,
        d: &Self::Disp,
        r: &Self::Route,
    ) -> Result<()>;
    fn new_dw(&mut self) -> Result<Self::Dw>;
    #[allow(clippy::too_many_arguments)]
    fn experts_backward(
        &mut self,
        l: usize,
        g: &Self::Buf,
        a: Self::Acts,
        d: &Self::Disp,
        r: &Self::Route,
        dx: &mut Self::Buf,
        dw: &mut Self::Dw,
    ) -> Result<()>;
    fn router_backward(
        &mut self,
        l: usize,
        x: &Self::Buf,
        r: &Self::Route,
        dw: &Self::Dw,
        dx: &mut Self::Buf,
    ) -> Result<()>;
    /// Wait for queued work (so that timings are real).
    fn sync(&mut self) -> Result<()>;
}

/// The CPU engine: moe.rs on host vectors.
pub struct CpuEngine<'a> {
    pub sh: Shape,
    pub layers: &'a [LayerW],
    pub lts: &'a [LayerT],
    pub grads: &'a mut [LayerW],
}

impl Engine for CpuEngine<'_> {
    type Buf = Vec<f32>;
    type Route = Routing;
    type Disp = Dispatch;
    type Acts = Acts;
    type Dw = Vec<f32>;
    fn copy(&mut self, x: &Vec<f32>) -> Result<Vec<f32>> {
        Ok(x.clone())
    }
    fn route(&mut self, l: usize, x: &Vec<f32>, forced: Option<&[u32]>) -> Result<Routing> {
        moe::route(&self.sh, x, &self.layers[l], forced).map_err(|tok| {
            ftk::Error::input(format!(
                "layer {l}: the router logits of token {tok} are NaN (x·gateᵀ overflowed or an input is NaN); check --input and --weights for NaN or huge values"
            ))
        })
    }
    fn ids<'a>(&self, r: &'a Routing) -> &'a [u32] {
        &r.idx
    }
    fn dispatch(&mut self, r: &Routing, t0: usize, t1: usize) -> Result<Dispatch> {
        Ok(moe::dispatch(&self.sh, &r.idx, t0, t1))
    }
    fn experts_forward(&mut self, l: usize, x: &Vec<f32>, d: &Dispatch) -> Result<Acts> {
        Ok(moe::experts_forward(&self.sh, &self.lts[l], x, d))
    }
    fn combine(&mut self, y: &mut Vec<f32>, a: &Acts, d: &Dispatch, r: &Routing) -> Result<()> {
        moe::combine(&self.sh, y, &a.o, d, r);
        Ok(())
    }
    fn new_dw(&mut self) -> Result<Vec<f32>> {
        Ok(vec![0f32; self.sh.tokens * self.sh.topk])
    }
    fn experts_backward(
        &mut self,
        l: usize,
        g: &Vec<f32>,
        a: Acts,
        d: &Dispatch,
        r: &Routing,
        dx: &mut Vec<f32>,
        dw: &mut Vec<f32>,
    ) -> Result<()> {
        let (lw, gw) = (&self.layers[l], &mut self.grads[l]);
        moe::experts_backward(&self.sh, lw, gw, g, a, d, r, dx, dw);
        Ok(())
    }
    fn router_backward(
        &mut self,
        l: usize,
        x: &Vec<f32>,
        r: &Routing,
        dw: &Vec<f32>,
        dx: &mut Vec<f32>,
    ) -> Result<()> {
        let (lw, gw) = (&self.layers[l], &mut self.grads[l]);
        moe::router_backward(&self.sh, lw, gw, x, r, dw, dx);
        Ok(())
    }
    fn sync(&mut self) -> Result<()> {
        Ok(())
    }
}

/// One step's outputs.
pub struct StepOut<B> {
    pub y: B,
    pub dx: B,
    pub chunks: Vec<usize>,
    pub max_expert_tokens: usize,
    pub fwd_ms: f64,
    pub bwd_ms: f64,
}

fn chunk_bounds(t: usize, c: usize, i: usize) -> (usize, usize) {
    (i * t / c, (i + 1) * t / c)
}

fn choose_chunks(sh: &Shape, auto: &AutoCfg) -> usize {
    // All experts are local here, so s'' (copies arriving) is T·k.
    let s = (sh.tokens * sh.topk) as f64;
    let want = ftk::mact::chunks(s, auto.s_max, &auto.bins);
    // No bin is large enough: take the largest and let the measurement show it.
    (want.or(auto.bins.last().copied()).unwrap_or(1) as usize).min(sh.tokens.max(1))
}

/// How a step keeps activations and routes tokens.
pub struct StepCfg<'a> {
    pub mode: Recompute,
    /// Forced expert ids per layer ([T·k] each), if routing is forced.
    pub forced: Option<&'a [Vec<u32>]>,
    /// MACT's settings, for `Recompute::Auto`.
    pub auto: Option<&'a AutoCfg>,
}

/// Forward and backward of a stack of `layers` blocks with loss = Σ y·dy.
/// Weight gradients accumulate into the engine's gradients (zero them first).
/// One function on purpose (just over 100 lines): forward and backward of
/// every mode side by side, so what each mode keeps alive is read in one place.
pub fn step<E: Engine>(
    eng: &mut E,
    sh: &Shape,
    layers: usize,
    x: &E::Buf,
    dy: &E::Buf,
    cfg: &StepCfg,
) -> Result<StepOut<E::Buf>> {
    let StepCfg { mode, forced, auto } = *cfg;
    let t = sh.tokens;
    let forced_of = |l: usize| forced.map(|f| f[l].as_slice());
    let t_fwd = Instant::now();
    // inputs[l] is block l's output, the input of block l + 1; block 0 reads `x`.
    let mut inputs: Vec<E::Buf> = Vec::with_capacity(layers);
    let mut saved: Vec<Saved<E>> = Vec::with_capacity(layers);
    let mut chunks = Vec::with_capacity(layers);
    let mut max_expert_tokens = 0;
    for l in 0..layers {
        let xin: &E::Buf = if l == 0 { x } else { &inputs[l - 1] };
        let r = eng.route(l, xin, forced_of(l))?;
        let mut counts = vec![0usize; sh.experts];
        eng.ids(&r).iter().for_each(|&e| counts[e as usize] += 1);
        max_expert_tokens = max_expert_tokens.max(counts.into_iter().max().unwrap_or(0));
        let c = match mode {
            Recompute::None | Recompute::Selective | Recompute::Full => 1,
            Recompute::Chunked(c) => (c as usize).min(t.max(1)),
            Recompute::Auto => choose_chunks(sh, auto.expect("auto mode needs its settings")),
        };
        chunks.push(c);
        let mut y = eng.copy(xin)?;
        let keep = if mode == Recompute::None {
            let d = eng.dispatch(&r, 0, t)?;
            let acts = eng.experts_forward(l, xin, &d)?;
            eng.combine(&mut y, &acts, &d, &r)?;
            Saved::All(r, d, acts)
        } else {
            // Full recompute is the one-chunk case; its expert buffers die here too.
            for i in 0..c {
                let (t0, t1) = chunk_bounds(t, c, i);
                let d = eng.dispatch(&r, t0, t1)?;
                let acts = eng.experts_forward(l, xin, &d)?;
                eng.combine(&mut y, &acts, &d, &r)?;
            }
            if mode == Recompute::Full {
                Saved::Input
            } else {
                Saved::Routing(r, c)
            }
        };
        saved.push(keep);
        inputs.push(y);
    }
    eng.sync()?;
    let fwd_ms = t_fwd.elapsed().as_secs_f64() * 1e3;
    let y = inputs.pop().expect("at least one layer");
    let t_bwd = Instant::now();
    let mut g: Option<E::Buf> = None;
    for l in (0..layers).rev() {
        let gin: &E::Buf = g.as_ref().unwrap_or(dy);
        let xin: &E::Buf = if l == 0 { x } else { &inputs[l - 1] };
        let mut dx = eng.copy(gin)?; // the residual path
        let mut dw = eng.new_dw()?;
        let routing = match saved.pop().expect("one saved state per layer") {
            Saved::All(r, d, acts) => {
                eng.experts_backward(l, gin, acts, &d, &r, &mut dx, &mut dw)?;
                r
            }
            kept => {
                // Full recompute re-routes the whole batch as one chunk;
                // chunked recompute kept its routing.
                let (r, c) = match kept {
                    Saved::Routing(r, c) => (r, c),
                    _ => (eng.route(l, xin, forced_of(l))?, 1),
                };
                for i in 0..c {
                    let (t0, t1) = chunk_bounds(t, c, i);
                    let d = eng.dispatch(&r, t0, t1)?;
                    let acts = eng.experts_forward(l, xin, &d)?;
                    eng.experts_backward(l, gin, acts, &d, &r, &mut dx, &mut dw)?;
                }
                r
            }
        };
        eng.router_backward(l, xin, &routing, &dw, &mut dx)?;
        drop(routing);
        drop(dw);
        if l >= 1 {
            inputs.pop(); // block l's input is dead once its backward is done
        }
        g = Some(dx);
    }
    eng.sync()?;
    let bwd_ms = t_bwd.elapsed().as_secs_f64() * 1e3;
    Ok(StepOut {
        y,
        dx: g.expect("at least one layer"),
        chunks,
        max_expert_tokens,
        fwd_ms,
        bwd_ms,
    })
}
