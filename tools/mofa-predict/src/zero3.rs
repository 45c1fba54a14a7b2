//! The ZeRO-3 schedule of one micro-batch, module by module.
//!
//! Under ZeRO stage 3 every GPU holds 1/N of each weight matrix; a module's
//! 16-bit weights are all-gathered just before it runs and released after,
//! in the forward and again in the backward, and its gradients are
//! reduce-scattered once they exist (Rajbhandari et al. 2020, ZeRO, §7.2.2:
//! 3Ψ of traffic per step against data parallelism's 2Ψ). How much of that
//! traffic hides under compute depends on *when* each gather may start. The
//! model follows DeepSpeed's stage-3 engine (`deepspeed/runtime/zero/stage3.py`,
//! read at v0.3.13; v0.3.12-v0.3.16, March-April 2021, the ZeRO-3 releases
//! out when Narayanan et al. 2021 measured the ZeRO-3 rows of their Table 2,
//! behave the same here; which one they ran is not stated):
//!
//! - hooks on every sub-module fetch its parameters in its pre-forward (and
//!   pre-backward) hook; when any of them is missing or still in flight the
//!   fetch waits for the gathers *and synchronises the device*
//!   (`_synchronize_communication` → `torch.cuda.synchronize()`), so nothing
//!   issued earlier, compute or collective, runs past that point;
//! - right after the fetch, if no prefetch is in flight, the parameters of the
//!   next modules in the recorded trace are all-gathered asynchronously, whole
//!   tensors until at least `stage3_prefetch_bucket_size` elements (default
//!   5e7, [`PREFETCH_BUCKET`]): with today's layer sizes that is exactly the
//!   next weight matrix, so a module's gather hides only under the compute of
//!   the module before it;
//! - a module's gradients are reduce-scattered from the gradient hook of the
//!   next module in backward order (`reduce_independent_p_g_buckets_and_remove_grads`
//!   reduces the previous bucket when a new gradient arrives), on a side stream
//!   that shares the network link with the gathers.
//!
//! So a step lasts the longer of its compute and the link work queued before
//! the next synchronising fetch; the link is one FIFO queue. With full
//! recompute a checkpointed layer's recompute-forward gathers its weights,
//! which stay for its backward right after (ZeRO's 3Ψ; DeepSpeed's
//! `stage3_max_reuse_distance` and `stage3_max_live_parameters` limits, which
//! can force more gathers or stall prefetch, are not modelled).

/// `stage3_prefetch_bucket_size` default (DeepSpeed v0.3.13
/// `runtime/zero/constants.py`, `ZERO_OPTIMIZATION_PREFETCH_BUCKET_SIZE_DEFAULT`).
pub const PREFETCH_BUCKET: f64 = 5e7;

use std::borrow::Borrow;

/// One parameter-holding module of a micro-batch's schedule (seconds).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Module {
    /// Parameters the module gathers (elements, per GPU after TP/EP sharding).
    pub params: f64,
    /// All-gather of its 16-bit weights over the ZeRO group.
    pub gather_s: f64,
    /// Reduce-scatter of its 16-bit gradients.
    pub rs_s: f64,
    /// Compute-stream time of its forward, its recompute forward (full
    /// recompute only) and its backward, including the collectives that run
    /// on the compute stream (tensor/context/expert parallel).
    pub fwd_s: f64,
    pub rc_s: f64,
    pub bwd_s: f64,
}

/// A run of modules checkpointed together (a transformer layer) or not (the
/// embedding, the LM head).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Block {
    pub modules: Vec<Module>,
    /// Full recompute re-runs the block's forward right before its backward.
    pub recomputed: bool,
}

struct Step {
    module: usize,
    compute: f64,
    /// The weights are released after the step (forward, backward) or kept
    /// for the backward that follows (recompute forward).
    release: bool,
    /// The step produces the module's gradients.
    grads: bool,
}

/// Compute-stream seconds of the micro-batch without any ZeRO-3 traffic.
pub fn busy_s<B: Borrow<Block>>(blocks: &[B]) -> f64 {
    blocks
        .iter()
        .flat_map(|b| &b.borrow().modules)
        .map(|m| m.fwd_s + m.rc_s + m.bwd_s)
        .sum()
}

/// Seconds one micro-batch takes: forward over `blocks` in order, then the
/// backward (recompute forward + backward of each block) in reverse.
///
/// Blocks may be shared (`Rc<Block>`): the layers of a stage repeat one or
/// two blocks, and tune runs this for every ZeRO-3 candidate.
pub fn micro_batch_s<B: Borrow<Block>>(blocks: &[B], bucket: f64) -> f64 {
    let blocks: Vec<&Block> = blocks.iter().map(|b| b.borrow()).collect();
    let mods: Vec<&Module> = blocks.iter().flat_map(|b| &b.modules).collect();
    let mut first = Vec::with_capacity(blocks.len());
    let mut n = 0;
    for b in &blocks {
        first.push(n);
        n += b.modules.len();
    }
    let mut trace = Vec::with_capacity(3 * mods.len());
    for (bi, b) in blocks.iter().enumerate() {
        for j in 0..b.modules.len() {
            let m = first[bi] + j;
            trace.push(Step {
                module: m,
                compute: mods[m].fwd_s,
                release: true,
                grads: false,
            });
        }
    }
    for (bi, b) in blocks.iter().enumerate().rev() {
        if b.recomputed {
            for j in 0..b.modules.len() {
                let m = first[bi] + j;
                trace.push(Step {
                    module: m,
                    compute: mods[m].rc_s,
                    release: false,
                    grads: false,
                });
            }
        }
        for j in (0..b.modules.len()).rev() {
            let m = first[bi] + j;
            trace.push(Step {
                module: m,
                compute: mods[m].bwd_s,
                release: true,
                grads: true,
            });
        }
    }

    let mut avail = vec![false; mods.len()];
    let mut inflight: Vec<usize> = vec![];
    let (mut t, mut link) = (0.0f64, 0.0f64);
    let mut pending_rs: Option<f64> = None;
    for (k, st) in trace.iter().enumerate() {
        let m = st.module;
        if mods[m].params > 0.0 && !avail[m] {
            // Fetch: wait for everything in flight (device synchronise); a
            // module not prefetched is gathered now, behind the queue.
            t = t.max(link);
            for &i in &inflight {
                avail[i] = true;
            }
            let was_inflight = inflight.contains(&m);
            inflight.clear();
            if !was_inflight {
                link = t + mods[m].gather_s;
                t = link;
            }
            avail[m] = true;
        }
        // Prefetch the next modules' weights, one bucket, if none is in flight.
        if inflight.is_empty() {
            let mut acc = 0.0;
            for s in &trace[k + 1..] {
                let j = s.module;
                if mods[j].params > 0.0 && !avail[j] && !inflight.contains(&j) {
                    inflight.push(j);
                    link = link.max(t) + mods[j].gather_s;
                    acc += mods[j].params;
                    if acc >= bucket {
                        break;
                    }
                }
            }
        }
        // The previous module's gradients are reduce-scattered from this
        // step's gradient hook.
        if let Some(rs) = pending_rs.take() {
            link = link.max(t) + rs;
        }
        t += st.compute;
        if st.release {
            avail[m] = false;
        }
        if st.grads {
            pending_rs = Some(mods[m].rs_s);
        }
    }
    if let Some(rs) = pending_rs {
        link = link.max(t) + rs;
    }
    t.max(link)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(params: f64, gather: f64, rs: f64, fwd: f64, rc: f64, bwd: f64) -> Module {
        Module {
            params,
            gather_s: gather,
            rs_s: rs,
            fwd_s: fwd,
            rc_s: rc,
            bwd_s: bwd,
        }
    }

    #[test]
    fn two_modules_by_hand() {
        // A (gather 1, fwd 2, bwd 4, rs 1), B (gather 3, fwd 1, bwd 2, rs 3),
        // one block, no recompute; each prefetch takes one module.
        // fwd A: A gathered exposed [0,1]; prefetch B on the link [1,4]; A runs [1,3].
        // fwd B: wait for B (t=4); prefetch A for the backward [4,5]; B runs [4,5].
        // bwd B: B was released: wait (5), gather [5,8]; B's backward [8,10].
        // bwd A: A arrived at 5; B's gradients reduce-scattered [10,13]; A's backward [10,14].
        // end: A's gradients [14,15].
        let blocks = [Block {
            modules: vec![
                m(1e8, 1.0, 1.0, 2.0, 0.0, 4.0),
                m(1e8, 3.0, 3.0, 1.0, 0.0, 2.0),
            ],
            recomputed: false,
        }];
        assert_eq!(micro_batch_s(&blocks, PREFETCH_BUCKET), 15.0);
        assert_eq!(busy_s(&blocks), 9.0);
    }

    #[test]
    fn recompute_gathers_once_for_the_recompute_and_the_backward() {
        // One block of one module (gather 2, rs 2), fwd 1, rc 1, bwd 2.
        // fwd: gathered exposed [0,2], runs [2,3], released. Nothing to
        // prefetch then (the module is still available), so the recompute
        // gathers it exposed [3,5] and runs [5,6]; the backward keeps it and
        // runs [6,8]; its gradients are reduce-scattered [8,10].
        let blocks = [Block {
            modules: vec![m(1e8, 2.0, 2.0, 1.0, 1.0, 2.0)],
            recomputed: true,
        }];
        assert_eq!(micro_batch_s(&blocks, PREFETCH_BUCKET), 10.0);
        // Compute-bound: gathers of 0.1 s hide under the previous module's compute.
        let blocks = [Block {
            modules: vec![m(1e8, 0.1, 0.1, 1.0, 1.0, 2.0); 3],
            recomputed: true,
        }];
        // Only the first gather (0.1) and the last reduce-scatter (0.1) show.
        let got = micro_batch_s(&blocks, PREFETCH_BUCKET);
        assert!((got - (busy_s(&blocks) + 0.2)).abs() < 1e-12, "{got}");
    }

    #[test]
    fn a_bucket_prefetches_several_small_modules() {
        // Four modules of 1e7 parameters: a 5e7 bucket takes all the rest at once.
        let blocks = [Block {
            modules: vec![m(1e7, 1.0, 0.0, 0.5, 0.0, 0.5); 4],
            recomputed: false,
        }];
        // f0: gathered exposed [0,1]; prefetch f1-f3 in one go [1,4]; runs [1,1.5].
        // f1: waits (4); prefetch what is missing next, A0's weights for b0
        // [4,5]; f1-f3 run [4,5.5]. b3: released, gathered behind it [5.5,6.5];
        // prefetch b2, b1 [6.5,8.5]; b3 runs [6.5,7]. b2: waits (8.5); b2, b1,
        // b0 run [8.5,10].
        assert_eq!(micro_batch_s(&blocks, PREFETCH_BUCKET), 10.0);
    }
}
