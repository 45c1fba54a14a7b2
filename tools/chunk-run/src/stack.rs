//! A stack of MoE blocks trained for one step under a recompute mode:
//! none (keep everything), full (keep each block's input, recompute the
//! block in backward), chunked:C (FCDA: route once, then dispatch → experts
//! → combine C token chunks at a time, recomputing chunk by chunk in
//! backward) and auto (MACT: C per layer from the tokens that arrive).

use crate::moe::{self, Acts, Dispatch, LayerT, LayerW, Routing, Shape};
use std::time::Instant;

/// How activations are kept.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Recompute {
    None,
    Full,
    Chunked(usize),
    /// MACT: per layer, c = ceil(s'' / s'_max) rounded up to a bin.
    Auto,
}

/// What MACT needs to choose chunks at run time.
#[derive(Clone, Debug)]
pub struct AutoCfg {
    /// s'_max: token copies one chunk may hold (from mem-plan's model).
    pub s_max: f64,
    pub bins: Vec<u64>,
}

/// What a block keeps between its forward and backward.
enum Saved {
    /// Everything (no recompute).
    All(Routing, Dispatch, Acts),
    /// Only the block input (full recompute).
    Input,
    /// The routing of the whole batch; experts recomputed per chunk.
    Routing(Routing, usize),
}

/// One step's outputs.
pub struct StepOut {
    pub y: Vec<f32>,
    pub dx: Vec<f32>,
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
    let want = mem_plan::memory::mact_chunks(s, auto.s_max, &auto.bins);
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

/// Forward and backward of the whole stack with loss = Σ y·dy. Weight
/// gradients accumulate into `grads` (zero them first).
pub fn step(
    sh: &Shape,
    layers: &[LayerW],
    lts: &[LayerT],
    grads: &mut [LayerW],
    x: &[f32],
    dy: &[f32],
    cfg: &StepCfg,
) -> StepOut {
    let StepCfg { mode, forced, auto } = *cfg;
    let t = sh.tokens;
    let forced_of = |l: usize| forced.map(|f| f[l].as_slice());
    let t_fwd = Instant::now();
    // inputs[l] is block l's input for l >= 1; block 0 reads `x`.
    let mut inputs: Vec<Vec<f32>> = Vec::with_capacity(layers.len());
    let mut saved = Vec::with_capacity(layers.len());
    let mut chunks = Vec::with_capacity(layers.len());
    let mut max_expert_tokens = 0;
    for (l, lw) in layers.iter().enumerate() {
        let xin: &[f32] = if l == 0 { x } else { &inputs[l - 1] };
        let r = moe::route(sh, xin, lw, forced_of(l));
        let mut counts = vec![0usize; sh.experts];
        r.idx.iter().for_each(|&e| counts[e as usize] += 1);
        max_expert_tokens = max_expert_tokens.max(counts.into_iter().max().unwrap_or(0));
        let c = match mode {
            Recompute::None | Recompute::Full => 1,
            Recompute::Chunked(c) => c.min(t.max(1)),
            Recompute::Auto => choose_chunks(sh, auto.expect("auto mode needs its settings")),
        };
        chunks.push(c);
        let mut y = xin.to_vec();
        let keep = if mode == Recompute::None {
            let d = moe::dispatch(sh, &r, 0, t);
            let acts = moe::experts_forward(sh, &lts[l], xin, &d);
            moe::combine(sh, &mut y, &acts.o, &d, &r);
            Saved::All(r, d, acts)
        } else {
            // Full recompute is the one-chunk case; its expert buffers die here too.
            for i in 0..c {
                let (t0, t1) = chunk_bounds(t, c, i);
                let d = moe::dispatch(sh, &r, t0, t1);
                let acts = moe::experts_forward(sh, &lts[l], xin, &d);
                moe::combine(sh, &mut y, &acts.o, &d, &r);
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
    let fwd_ms = t_fwd.elapsed().as_secs_f64() * 1e3;
    let y = inputs.pop().expect("at least one layer");
    let t_bwd = Instant::now();
    let mut g: Option<Vec<f32>> = None;
    for l in (0..layers.len()).rev() {
        let (lw, gw) = (&layers[l], &mut grads[l]);
        let gin: &[f32] = g.as_deref().unwrap_or(dy);
        let xin: &[f32] = if l == 0 { x } else { &inputs[l - 1] };
        let mut dx = gin.to_vec(); // the residual path
        let mut dw = vec![0f32; t * sh.topk];
        let routing = match saved.pop().expect("one saved state per layer") {
            Saved::All(r, d, acts) => {
                moe::experts_backward(sh, lw, gw, gin, acts, &d, &r, &mut dx, &mut dw);
                r
            }
            kept => {
                // Full recompute re-routes the whole batch as one chunk;
                // chunked recompute kept its routing.
                let (r, c) = match kept {
                    Saved::Routing(r, c) => (r, c),
                    _ => (moe::route(sh, xin, lw, forced_of(l)), 1),
                };
                for i in 0..c {
                    let (t0, t1) = chunk_bounds(t, c, i);
                    let d = moe::dispatch(sh, &r, t0, t1);
                    let acts = moe::experts_forward(sh, &lts[l], xin, &d);
                    moe::experts_backward(sh, lw, gw, gin, acts, &d, &r, &mut dx, &mut dw);
                }
                r
            }
        };
        moe::router_backward(sh, lw, gw, xin, &routing, &dw, &mut dx);
        drop(routing);
        drop(dw);
        if l >= 1 {
            inputs.pop(); // block l's input is dead once its backward is done
        }
        g = Some(dx);
    }
    let bwd_ms = t_bwd.elapsed().as_secs_f64() * 1e3;
    StepOut {
        y,
        dx: g.unwrap_or_default(),
        chunks,
        max_expert_tokens,
        fwd_ms,
        bwd_ms,
    }
}
