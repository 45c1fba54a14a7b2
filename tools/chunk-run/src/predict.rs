//! mem-plan's itemised memory model, in the terms of chunk-run's own
//! network: what `predicted_act_bytes` reports next to the measured peak,
//! and the s'_max MACT (`--recompute auto`) sizes chunks with.

use ftk::recompute::Recompute;

/// chunk-run's network: a stack of MoE-only blocks (router + SwiGLU experts,
/// residual, no attention), residual stream and router in f32 and expert
/// activations in `elem` bytes per element (4: f32, 2: bf16), with every
/// buffer chunk-run allocates itemised, so its measured peaks can be
/// predicted term by term. `s` counts token copies (tokens × top-k) in the
/// chunk being processed.
#[derive(Clone, Copy, Debug)]
pub struct BlockDims {
    pub t: f64,
    pub h: f64,
    pub f: f64,
    pub e: f64,
    pub k: f64,
    pub layers: f64,
    pub elem: f64,
}

/// Routing kept per layer: router probabilities (4·T·E), top-k ids and
/// combine weights (4·T·k each).
pub fn block_routing_bytes(d: &BlockDims) -> f64 {
    4.0 * d.t * d.e + 8.0 * d.t * d.k
}

/// Dispatch maps for `s` token copies: row → token, row → slot, (token, slot)
/// → row (u32 each), and the expert offsets.
pub fn block_dispatch_bytes(d: &BlockDims, s: f64) -> f64 {
    12.0 * s + 8.0 * (d.e + 1.0)
}

/// Expert activations kept per token copy for backward: the gathered input
/// X (h), w1 and w3 outputs A, B (2f) and the expert output O (h) that the
/// combine weight's gradient needs: elem·(2h + 2f) bytes.
pub fn block_stored_per_copy(d: &BlockDims) -> f64 {
    d.elem * (2.0 * d.h + 2.0 * d.f)
}

/// The expert working set per token copy at its largest, over the phases of
/// chunk-run's forward and backward: forward holds X, A, B, H, O (2h + 3f);
/// backward X, A, B, G, H (2h + 3f), then X, A, B, dA, dB (h + 4f), then X,
/// dA, dB, dX (2h + 2f), `elem` bytes per element.
pub fn block_working_per_copy(d: &BlockDims) -> f64 {
    d.elem
        * (2.0 * d.h + 3.0 * d.f)
            .max(d.h + 4.0 * d.f)
            .max(2.0 * d.h + 2.0 * d.f)
}

/// Layer inputs 1..L−1 and the output (4·T·h each), plus the input-gradient
/// buffer and the combine-weight gradients of the layer in backward.
pub fn block_fixed_bytes(d: &BlockDims) -> f64 {
    4.0 * d.t * d.h * (d.layers + 1.0) + 4.0 * d.t * d.k
}

/// Predicted peak activation bytes of one chunk-run step:
/// none: every layer's routing, dispatch and stored expert activations, with
/// the last layer's expert term at its working-set peak; full: one layer
/// recomputed at a time; chunked: routing kept for every layer and the
/// expert working set of one chunk of s/C copies, C = `chunks` (chunked and
/// auto; auto passes the largest C it chose). The blocks have no attention,
/// so selective keeps what none keeps.
pub fn block_peak_act(d: &BlockDims, mode: Recompute, chunks: u64) -> f64 {
    let s = d.t * d.k;
    let fixed = block_fixed_bytes(d);
    let routing = block_routing_bytes(d);
    match mode {
        Recompute::None | Recompute::Selective => {
            fixed
                + d.layers * (routing + block_dispatch_bytes(d, s))
                + (d.layers - 1.0) * s * block_stored_per_copy(d)
                + s * block_working_per_copy(d)
        }
        Recompute::Full => {
            fixed + routing + block_dispatch_bytes(d, s) + s * block_working_per_copy(d)
        }
        Recompute::Chunked(_) | Recompute::Auto => {
            let sc = (d.t / chunks as f64).ceil() * d.k;
            fixed
                + d.layers * routing
                + block_dispatch_bytes(d, sc)
                + sc * block_working_per_copy(d)
        }
    }
}

/// MACT's s'_max (eq. 8) in chunk-run's terms: token copies one chunk may
/// hold so that static + activations stay within `budget`.
pub fn block_s_prime_max(d: &BlockDims, budget: f64, static_bytes: f64) -> f64 {
    let fixed = block_fixed_bytes(d) + d.layers * block_routing_bytes(d) + 8.0 * (d.e + 1.0);
    (budget - static_bytes - fixed) / (block_working_per_copy(d) + 12.0)
}
