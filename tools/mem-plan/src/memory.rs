//! MemFine's theoretical memory model (arXiv 2511.21431 §3) and the dense
//! transformer activation model of Korthikanti et al. 2022 (arXiv 2205.05198),
//! one named function per term. Symbols follow MemFine's Table 1:
//! D_t bytes per element, b micro-batch, s sequence, h hidden, a heads,
//! h_d head dim, k_a KV heads, e_n routed experts, g_e expert FFN size,
//! g_d dense FFN size, t tensor-, c context-parallel size, s' tokens
//! (token copies) an EP rank's MoE layer receives.
//!
//! chunk-run (MemFine FCDA measured) reports the same terms, so the two can be
//! compared line by line; its own network's itemised model is chunk-run's
//! `predict.rs`. The sizes ([`Dims`]) and MACT's bin rounding are in `ftk`.

pub use ftk::memory::Dims;
pub use ftk::recompute::Recompute;

/// Which token count a row of MemFine's Table 2 scales with.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Per {
    /// Every token of the micro-batch (s).
    Seq,
    /// The token copies this rank's experts receive (s').
    Received,
}

/// One row of MemFine's Table 2: a stored activation, elements per token.
#[derive(Clone, Copy, Debug)]
pub struct Row {
    pub id: u32,
    pub module: &'static str,
    pub per: Per,
    pub elems_per_token: f64,
}

/// MemFine Table 2, "Activation of MoE module": what one MoE transformer
/// layer stores for backward, row by row (before the 1/(tc) sharding and D_t b).
pub fn moe_table2_rows(d: &Dims) -> Vec<Row> {
    use Per::*;
    let r = |id, module, per, elems_per_token| Row {
        id,
        module,
        per,
        elems_per_token,
    };
    vec![
        r(1, "norm", Seq, d.h),
        r(2, "q, k, v (input)", Seq, d.h),
        r(3, "attention: q", Seq, d.a * d.hd),
        r(4, "attention: k", Seq, d.ka * d.hd),
        r(5, "attention: v", Seq, d.ka * d.hd),
        r(6, "o (input)", Seq, d.h),
        r(8, "norm", Seq, d.h),
        r(9, "router (input)", Seq, d.h),
        r(10, "router (logits)", Seq, d.en),
        r(11, "activated expert (input)", Received, d.h),
        r(
            12,
            "activated expert (w1, w3 outputs)",
            Received,
            2.0 * d.ge,
        ),
        r(13, "score mul", Received, d.h),
    ]
}

/// s-term of eq. (2) for one micro-batch and m_g = 1:
/// `D_t b s (5h + a h_d + 2 k_a h_d + e_n) / (t c)` bytes.
pub fn moe_seq_bytes(d: &Dims) -> f64 {
    d.dt * d.b * d.s * (5.0 * d.h + d.a * d.hd + 2.0 * d.ka * d.hd + d.en) / (d.t * d.c)
}

/// s'-term of eq. (2) per received token copy:
/// `D_t b (2h + 2 g_e) / (t c)` bytes (multiply by s').
pub fn moe_bytes_per_received(d: &Dims) -> f64 {
    d.dt * d.b * (2.0 * d.h + 2.0 * d.ge) / (d.t * d.c)
}

/// One MoE layer's activations with C chunks (FCDA): the expert term only
/// holds one chunk at a time, so it divides by C:
/// `moe_seq_bytes + s' · moe_bytes_per_received / C`. C = 1 is eq. (2) with m_g = 1.
pub fn moe_layer_act(d: &Dims, s_recv: f64, chunks: f64) -> f64 {
    moe_seq_bytes(d) + s_recv * moe_bytes_per_received(d) / chunks
}

/// A dense (non-MoE) layer in the same terms as Table 2: rows 1-8, then
/// the SwiGLU MLP storing its input (h) and its w1/w3 outputs (2 g_d) for
/// every token, with no router: `D_t b s (5h + a h_d + 2 k_a h_d + 2 g_d) / (t c)`.
pub fn dense_layer_act(d: &Dims) -> f64 {
    d.dt * d.b * d.s * (5.0 * d.h + d.a * d.hd + 2.0 * d.ka * d.hd + 2.0 * d.gd) / (d.t * d.c)
}

/// The layer input kept per layer and in-flight micro-batch under full (and
/// chunked) recompute: `D_t b s h / (t c)`.
pub fn checkpoint_bytes(d: &Dims) -> f64 {
    d.dt * d.b * d.s * d.h / (d.t * d.c)
}

/// m_g of eq. (2): micro-batches whose activations a pipeline stage holds at
/// its peak in Megatron's interleaved 1F1B schedule, `v p + p - 2 r_pp - 1`
/// for pipeline rank r_pp (0-based), counted in (model chunk, micro-batch)
/// pairs. Under full recompute the paper sets m_g = 1 (one layer is
/// recomputed at a time); the layer inputs kept meanwhile are counted by
/// [`checkpoint_bytes`].
pub fn in_flight_microbatches(v: u64, p: u64, r_pp: u64) -> u64 {
    (v * p + p).saturating_sub(2 * r_pp + 1).max(1)
}

/// Eq. (8), with the checkpointed inputs added to the static side:
/// `s'_max = (α M_GPU − M_sta − ckpt − moe_seq_bytes) / moe_bytes_per_received`,
/// the most token copies one MoE layer can receive unchunked and still fit.
/// Negative means not even an empty expert fits.
pub fn s_prime_max(d: &Dims, budget: f64, static_bytes: f64, ckpt: f64) -> f64 {
    (budget - static_bytes - ckpt - moe_seq_bytes(d)) / moe_bytes_per_received(d)
}

/// One stored tensor of a GPT layer in Korthikanti et al. §4.1 (16-bit
/// values, 1-byte dropout masks): bytes per s·b·h, how tensor parallelism
/// shards it, and whether it belongs to the attention core.
#[derive(Clone, Copy, Debug)]
pub struct KItem {
    pub name: &'static str,
    /// Bytes per s·b·h (the attention-core items scale with a·s/h, see `core`).
    pub sbh: f64,
    /// Sharded by t under plain tensor parallelism.
    pub tp: bool,
    /// Part of the attention core: its size is `sbh · a s / h`.
    pub core: bool,
}

/// Korthikanti's inventory of a transformer layer's activations.
pub fn korthikanti_items() -> Vec<KItem> {
    let i = |name, sbh, tp, core| KItem {
        name,
        sbh,
        tp,
        core,
    };
    vec![
        i("layernorm 1 input", 2.0, false, false),
        i("QKV input", 2.0, false, false),
        i("Q and K (QK^T inputs)", 4.0, true, false),
        i("softmax output", 2.0, true, true),
        i("attention dropout mask", 1.0, true, true),
        i("attention dropout output", 2.0, true, true),
        i("V", 2.0, true, false),
        i("output projection input", 2.0, true, false),
        i(
            "attention dropout mask (after projection)",
            1.0,
            false,
            false,
        ),
        i("layernorm 2 input", 2.0, false, false),
        i("MLP fc1 input", 2.0, false, false),
        i("GeLU input", 8.0, true, false),
        i("MLP fc2 input", 8.0, true, false),
        i("MLP dropout mask", 1.0, false, false),
    ]
}

/// Per-layer activation bytes from the itemised inventory: tensor parallelism
/// shards the `tp` items, sequence parallelism the rest, selective recompute
/// drops the attention core, full recompute keeps only the 2sbh layer input.
/// Chunked and auto (FCDA) chunk only the MoE experts, so a dense layer keeps
/// what it keeps under none.
pub fn korthikanti_layer_act(
    s: f64,
    b: f64,
    h: f64,
    a: f64,
    t: f64,
    sp: bool,
    rc: Recompute,
) -> f64 {
    if rc == Recompute::Full {
        return 2.0 * s * b * h / if sp { t } else { 1.0 };
    }
    korthikanti_items()
        .iter()
        .filter(|it| !(it.core && rc == Recompute::Selective))
        .map(|it| {
            let scale = if it.core { a * s / h } else { 1.0 };
            let shard = if it.tp || sp { t } else { 1.0 };
            s * b * h * it.sbh * scale / shard
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model2() -> Dims {
        // MemFine Model II: DeepSeek-V3 shape, t = c = b = 1, s = 4096, BF16.
        Dims {
            dt: 2.0,
            b: 1.0,
            s: 4096.0,
            h: 7168.0,
            a: 128.0,
            hd: 192.0,
            ka: 128.0,
            en: 256.0,
            ge: 2048.0,
            gd: 18432.0,
            t: 1.0,
            c: 1.0,
        }
    }

    #[test]
    fn table2_rows_sum_to_the_printed_total() {
        let d = model2();
        let rows = moe_table2_rows(&d);
        let seq: f64 = rows
            .iter()
            .filter(|r| r.per == Per::Seq)
            .map(|r| r.elems_per_token)
            .sum();
        let recv: f64 = rows
            .iter()
            .filter(|r| r.per == Per::Received)
            .map(|r| r.elems_per_token)
            .sum();
        assert_eq!(d.dt * d.b * d.s * seq / (d.t * d.c), moe_seq_bytes(&d));
        assert_eq!(d.dt * d.b * recv / (d.t * d.c), moe_bytes_per_received(&d));
    }

    #[test]
    fn korthikanti_inventory_reproduces_the_papers_closed_forms() {
        // Table 2 of Korthikanti et al.: per-layer activation memory.
        let (s, b, h, a) = (2048.0, 1.0, 12288.0, 96.0); // GPT-3 175B
        let sbh = s * b * h;
        for t in [1.0, 2.0, 8.0] {
            let close = |x: f64, y: f64| assert!((x - y).abs() <= 1e-9 * y, "{x} vs {y} at t={t}");
            close(
                korthikanti_layer_act(s, b, h, a, 1.0, false, Recompute::None),
                sbh * (34.0 + 5.0 * a * s / h),
            );
            close(
                korthikanti_layer_act(s, b, h, a, t, false, Recompute::None),
                sbh * (10.0 + 24.0 / t + 5.0 * a * s / (h * t)),
            );
            close(
                korthikanti_layer_act(s, b, h, a, t, true, Recompute::None),
                sbh * (34.0 / t + 5.0 * a * s / (h * t)),
            );
            close(
                korthikanti_layer_act(s, b, h, a, t, false, Recompute::Selective),
                sbh * (10.0 + 24.0 / t),
            );
            close(
                korthikanti_layer_act(s, b, h, a, t, true, Recompute::Selective),
                sbh * 34.0 / t,
            );
            close(
                korthikanti_layer_act(s, b, h, a, t, false, Recompute::Full),
                2.0 * sbh,
            );
        }
    }

    #[test]
    fn in_flight_counts() {
        // p = 4, v = 1: 2p - 2r - 1 = 7, 5, 3, 1; no pipeline: 1.
        assert_eq!(
            (0..4)
                .map(|r| in_flight_microbatches(1, 4, r))
                .collect::<Vec<_>>(),
            vec![7, 5, 3, 1]
        );
        assert_eq!(in_flight_microbatches(1, 1, 0), 1);
        assert_eq!(in_flight_microbatches(2, 4, 0), 11);
    }
}
