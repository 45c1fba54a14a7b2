//! The sizes MemFine's memory model takes (arXiv 2511.21431, Table 1), from a
//! model config and a run's micro-batch, sequence and parallel sizes. The
//! formulas over them are mem-plan's (`mem_plan::memory`); mofa-predict uses
//! the same ones.

use crate::model::ModelConfig;

/// D_t bytes per element, b micro-batch, s sequence, h hidden, a heads,
/// h_d head dim, k_a KV heads, e_n routed experts, g_e expert FFN size,
/// g_d dense FFN size, t tensor- and c context-parallel size.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Dims {
    /// D_t: bytes per activation element (2 for BF16).
    pub dt: f64,
    pub b: f64,
    pub s: f64,
    pub h: f64,
    pub a: f64,
    pub hd: f64,
    pub ka: f64,
    pub en: f64,
    pub ge: f64,
    pub gd: f64,
    pub t: f64,
    pub c: f64,
}

/// A run's shape around the model: what [`Dims::new`] needs beside it.
#[derive(Clone, Copy, Debug)]
pub struct RunShape {
    /// Bytes per activation element.
    pub dt: f64,
    pub micro_batch: u64,
    pub seq: u64,
    pub tp: u64,
    pub cp: u64,
}

impl Dims {
    /// The model's sizes with the run's; a dense model has e_n = g_e = 0.
    pub fn new(m: &ModelConfig, r: RunShape) -> Dims {
        let moe = m.moe.as_ref();
        Dims {
            dt: r.dt,
            b: r.micro_batch as f64,
            s: r.seq as f64,
            h: m.hidden as f64,
            a: m.heads() as f64,
            hd: m.head_dim() as f64,
            ka: m.kv_heads() as f64,
            en: moe.map_or(0.0, |x| x.experts as f64),
            ge: moe.map_or(0.0, |x| x.expert_ffn as f64),
            gd: m.ffn as f64,
            t: r.tp as f64,
            c: r.cp as f64,
        }
    }
}
