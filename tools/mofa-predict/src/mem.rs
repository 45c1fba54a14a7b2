//! Memory per GPU in mem-plan's terms (MemFine eqs. 1-2, Table 2; Korthikanti
//! et al. 2022 for the unfused attention core), via the mem-plan library.

use crate::input::Job;
use crate::perf::layout;
use mem_plan::layout::{static_bytes, Precision};
use mem_plan::memory::{self, Dims, Recompute};

/// Usable fraction of device memory (mem-plan's default α).
pub const ALPHA: f64 = 0.9;

/// Peak bytes on the worst GPU: max over the first and last pipeline stage of
/// static (bf16 weights and grads, fp32 Adam, ZeRO-sharded) + activations.
pub fn peak_bytes(job: &Job) -> f64 {
    let m = &job.model;
    let st = &job.strategy;
    let l = layout(job);
    let moe = m.moe.as_ref();
    let d = Dims::new(
        m,
        ftk::memory::RunShape {
            dt: 2.0,
            micro_batch: st.mbs,
            seq: job.seq,
            tp: st.tp,
            cp: st.cp,
        },
    );
    // Uniform routing: an EP rank receives b·s·k token copies (mem-plan's
    // `uniform`), times the imbalance factor.
    let s_recv = d.b * d.s * moe.map_or(0.0, |x| x.topk as f64) * (1.0 + st.moe_imbalance);
    let core = if st.flash_attn || st.recompute != Recompute::None {
        0.0
    } else {
        // Korthikanti's 5as/h · sbh for softmax, dropout mask and output.
        5.0 * d.a * d.s * (d.s / d.c) * d.b / d.t
    };
    let layer_act = |i: u64| {
        (if m.is_moe[i as usize] {
            memory::moe_layer_act(&d, s_recv, 1.0)
        } else {
            memory::dense_layer_act(&d)
        }) + core
    };
    let micro = (st.gbs / (st.mbs * st.dp)) as f64;
    let precision = Precision::new(2.0, false, "adam");
    let mut worst: f64 = 0.0;
    for stage in [0, st.pp - 1] {
        let layers: Vec<u64> = (0..m.layers)
            .filter(|&i| l.stage_of(m.layers, i) == stage)
            .collect();
        let m_g = memory::in_flight_microbatches(st.vpp, st.pp, stage) as f64;
        let in_flight = (m_g / st.vpp as f64).min(micro);
        let acts = match st.recompute {
            Recompute::Full => {
                in_flight * layers.len() as f64 * memory::checkpoint_bytes(&d)
                    + layers.iter().map(|&i| layer_act(i)).fold(0.0, f64::max)
            }
            _ => in_flight * layers.iter().map(|&i| layer_act(i)).sum::<f64>(),
        };
        // fp32 logits of the vocab-parallel cross entropy on the last stage.
        let head = if stage == st.pp - 1 {
            d.b * d.s / d.c * m.vocab as f64 / d.t * 4.0
        } else {
            0.0
        };
        let sta = static_bytes(m, &l, stage, &precision, st.zero);
        worst = worst.max(sta + acts + head);
    }
    worst
}
