//! Putting the terms together: per MoE layer and EP rank records, per stage
//! peaks, and MACT's chunk choice.

use crate::layout::{layer_params, param_bytes, static_bytes, Layout, Precision};
use crate::memory::{self, Dims, Recompute};
use crate::routing::Received;
use ftk::model::ModelConfig;
use ftk::records::{Acts, MemPlan, StageSummary, Tag};
use ftk::size::format_bytes;
use serde::Serialize;

/// How dense (non-MoE) layers' activations are modelled.
#[derive(Clone, Copy, Debug, PartialEq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DenseAct {
    /// MemFine's Table 2 terms with a SwiGLU MLP (flash attention, no dropout).
    Memfine,
    /// Korthikanti et al.: sbh(34 + 5as/h) and its TP/SP variants (GPT layer with dropout, no flash attention).
    Korthikanti,
}

pub struct Inputs<'a> {
    pub model: &'a ModelConfig,
    pub layout: Layout,
    pub dims: Dims,
    pub precision: Precision,
    pub zero: u64,
    pub budget: Option<f64>,
    pub bins: Vec<u64>,
    pub fixed_chunks: Option<u64>,
    pub recv: &'a Received,
    pub dense_act: DenseAct,
    pub sequence_parallel: bool,
}

pub struct Plan {
    pub records: Vec<MemPlan>,
    pub stages: Vec<StageSummary>,
    pub chunks: u64,
    pub fits: Option<bool>,
    pub dominant: &'static str,
    pub why: String,
    pub min_peak: u64,
}

fn dense_act(i: &Inputs) -> f64 {
    match i.dense_act {
        DenseAct::Memfine => memory::dense_layer_act(&i.dims),
        DenseAct::Korthikanti => {
            let d = &i.dims;
            // Korthikanti's constants assume 16-bit values; scale for other widths.
            memory::korthikanti_layer_act(
                d.s / d.c,
                d.b,
                d.h,
                d.a,
                d.t,
                i.sequence_parallel,
                Recompute::None,
            ) * d.dt
                / 2.0
        }
    }
}

/// Compute the plan.
pub fn plan(i: &Inputs) -> Plan {
    let cx = Ctx::new(i);
    let mut records = vec![];
    let mut stages = vec![];
    let mut worst: Option<Hardest> = None;
    for stage in 0..i.layout.pp {
        let st = cx.stage(stage);
        records.extend(st.records);
        if let Some(h) = st.hardest {
            if worst.as_ref().is_none_or(|w| h.harder_than(w)) {
                worst = Some(h);
            }
        }
        stages.push(st.summary);
    }
    records.sort_by_key(|r| (r.layer, r.rank));
    let fits = i
        .budget
        .map(|_| stages.iter().all(|s| s.fits == Some(true)));
    let chunks = stages.iter().map(|s| s.chunks).max().unwrap_or(1);
    let min_peak = stages
        .iter()
        .map(|s| s.peak_bytes.chunked)
        .max()
        .unwrap_or(0);
    let seq = memory::moe_seq_bytes(&i.dims);
    let per_recv = memory::moe_bytes_per_received(&i.dims);
    let (dominant, why) = explain(i, worst, seq, per_recv, cx.dense, &stages);
    Plan {
        records,
        stages,
        chunks,
        fits,
        dominant,
        why,
        min_peak,
    }
}

/// What every stage's plan reads.
struct Ctx<'a> {
    i: &'a Inputs<'a>,
    /// Each layer's ordinal among the MoE layers (None: dense).
    moe_ordinal: Vec<Option<u64>>,
    /// One dense layer's activations.
    dense: f64,
}

/// One pipeline stage: its records (per MoE layer and EP rank), summary,
/// and its hardest (layer, rank).
struct StagePlan {
    records: Vec<MemPlan>,
    summary: StageSummary,
    hardest: Option<Hardest>,
}

impl<'a> Ctx<'a> {
    fn new(i: &'a Inputs<'a>) -> Ctx<'a> {
        let mut n = 0;
        let moe_ordinal = i
            .model
            .is_moe
            .iter()
            .map(|&x| {
                x.then(|| {
                    n += 1;
                    n - 1
                })
            })
            .collect();
        Ctx {
            i,
            moe_ordinal,
            dense: dense_act(i),
        }
    }

    /// Chunks per MoE layer of the stage, shared by all EP ranks (each chunk
    /// is one all-to-all): (layer, MoE ordinal, C), and whether MACT found a
    /// bin for every layer.
    fn layer_chunks(&self, layers: &[u64], s_max: Option<f64>) -> (Vec<(u64, u64, u64)>, bool) {
        let i = self.i;
        let max_bin = *i.bins.last().unwrap_or(&1);
        let mut feasible = true;
        let chunks = layers
            .iter()
            .filter_map(|&x| self.moe_ordinal[x as usize].map(|o| (x, o)))
            .map(|(x, o)| {
                let s_layer = i.recv.per_layer[o as usize]
                    .iter()
                    .cloned()
                    .fold(0.0, f64::max);
                let c = match (i.fixed_chunks, s_max) {
                    (Some(c), _) => c,
                    (None, Some(sm)) => {
                        ftk::mact::chunks(s_layer, sm, &i.bins).unwrap_or_else(|| {
                            feasible = false;
                            max_bin
                        })
                    }
                    (None, None) => 1,
                };
                (x, o, c)
            })
            .collect();
        (chunks, feasible)
    }

    fn stage(&self, stage: u64) -> StagePlan {
        let (i, d) = (self.i, &self.i.dims);
        let (m, l) = (i.model, &i.layout);
        let layers: Vec<u64> = (0..m.layers)
            .filter(|&x| l.stage_of(m.layers, x) == stage)
            .collect();
        let has_dense = layers
            .iter()
            .any(|&x| self.moe_ordinal[x as usize].is_none());
        let sta = static_bytes(m, l, stage, &i.precision, i.zero);
        let m_g = memory::in_flight_microbatches(l.vpp, l.pp, stage);
        let per_chunk_inflight = m_g as f64 / l.vpp as f64;
        let ckpt = per_chunk_inflight * layers.len() as f64 * memory::checkpoint_bytes(d);
        let s_max = i.budget.map(|b| memory::s_prime_max(d, b, sta, ckpt));
        let (layer_chunks, mut feasible) = self.layer_chunks(&layers, s_max);
        if i.budget.is_some_and(|b| sta + ckpt + self.dense > b) && has_dense {
            feasible = false;
        }
        let mut records = vec![];
        let mut hardest: Option<Hardest> = None;
        let (mut pn, mut pf, mut pc) = (0f64, 0f64, 0f64);
        for r in 0..l.ep as usize {
            let act = |x: u64, c: f64| match self.moe_ordinal[x as usize] {
                Some(o) => memory::moe_layer_act(d, i.recv.per_layer[o as usize][r], c),
                None => self.dense,
            };
            let none: f64 = layers.iter().map(|&x| act(x, 1.0)).sum::<f64>() * per_chunk_inflight;
            let full = layers.iter().map(|&x| act(x, 1.0)).fold(0.0, f64::max);
            let mut chunked = if has_dense { self.dense } else { 0.0 };
            for &(x, o, c) in &layer_chunks {
                let s_recv = i.recv.per_layer[o as usize][r];
                let a_c = memory::moe_layer_act(d, s_recv, c as f64);
                chunked = chunked.max(a_c);
                let peak_r = sta + ckpt + a_c;
                let h = Hardest {
                    stage,
                    layer: x,
                    rank: r as u64,
                    sta,
                    ckpt,
                    s_recv,
                    chunks: c,
                    feasible,
                    peak: peak_r,
                };
                if hardest.as_ref().is_none_or(|w| h.harder_than(w)) {
                    hardest = Some(h);
                }
                records.push(MemPlan {
                    kind: Tag::default(),
                    layer: x,
                    moe_layer: o,
                    stage,
                    rank: r as u64,
                    tokens_received: s_recv.round() as u64,
                    static_bytes: sta.round() as u64,
                    layer_static_bytes: param_bytes(layer_params(m, l, x), l, &i.precision, i.zero)
                        .round() as u64,
                    ckpt_bytes: ckpt.round() as u64,
                    act_bytes: Acts {
                        none: (per_chunk_inflight * memory::moe_layer_act(d, s_recv, 1.0)).round()
                            as u64,
                        full: memory::moe_layer_act(d, s_recv, 1.0).round() as u64,
                        chunked: a_c.round() as u64,
                    },
                    chunks: c,
                    peak_bytes: peak_r.round() as u64,
                    fits: i.budget.map(|b| peak_r <= b),
                });
            }
            pn = pn.max(sta + none);
            pf = pf.max(sta + ckpt + full);
            pc = pc.max(sta + ckpt + chunked);
        }
        let summary = StageSummary {
            stage,
            layers: layers.len() as u64,
            moe_layers: layer_chunks.len() as u64,
            m_g,
            static_bytes: sta.round() as u64,
            ckpt_bytes: ckpt.round() as u64,
            s_max: s_max.map(|x| x.floor().max(-1.0) as i64),
            peak_bytes: Acts {
                none: pn.round() as u64,
                full: pf.round() as u64,
                chunked: pc.round() as u64,
            },
            chunks: layer_chunks.iter().map(|x| x.2).max().unwrap_or(1),
            fits: i.budget.map(|b| feasible && pc <= b),
        };
        StagePlan {
            records,
            summary,
            hardest,
        }
    }
}

/// The (layer, EP rank) that is hardest to fit, which the summary explains.
struct Hardest {
    stage: u64,
    layer: u64,
    rank: u64,
    sta: f64,
    ckpt: f64,
    s_recv: f64,
    chunks: u64,
    feasible: bool,
    peak: f64,
}

impl Hardest {
    /// Infeasible first, then the most chunks, then the highest peak.
    fn key(&self) -> (bool, u64, f64) {
        (!self.feasible, self.chunks, self.peak)
    }

    /// Strictly harder: on a tie the first one seen stays.
    fn harder_than(&self, o: &Hardest) -> bool {
        self.key().partial_cmp(&o.key()) == Some(std::cmp::Ordering::Greater)
    }
}

fn explain(
    i: &Inputs,
    worst: Option<Hardest>,
    seq: f64,
    per_recv: f64,
    dense: f64,
    stages: &[StageSummary],
) -> (&'static str, String) {
    let gb = format_bytes;
    let Some(Hardest {
        stage,
        layer,
        rank,
        sta,
        ckpt,
        s_recv,
        chunks: c,
        peak,
        ..
    }) = worst
    else {
        let s = stages
            .iter()
            .max_by_key(|s| s.peak_bytes.chunked)
            .expect("at least one stage");
        return (
            if s.static_bytes as f64 > dense {
                "static"
            } else {
                "dense activations"
            },
            format!(
                "no MoE layers; stage {} peaks at {} ({} static)",
                s.stage,
                gb(s.peak_bytes.chunked as f64),
                gb(s.static_bytes as f64)
            ),
        );
    };
    let expert = s_recv * per_recv;
    let terms = [
        ("static", sta),
        ("checkpoints", ckpt),
        ("attention and router activations", seq),
        ("expert activations", expert),
    ];
    let dominant = terms
        .iter()
        .max_by(|a, b| a.1.total_cmp(&b.1))
        .map(|t| t.0)
        .unwrap_or("static");
    let head = format!(
        "stage {stage}: static {} + checkpoints {}; MoE layer {layer} on EP rank {rank} receives {:.0} token copies: \
         expert activations {} unchunked, attention and router {}",
        gb(sta),
        gb(ckpt),
        s_recv,
        gb(expert),
        gb(seq)
    );
    let tail = match i.budget {
        None => format!("; peak {} at C={c}", gb(peak)),
        Some(b) if sta + ckpt + seq > b => format!(
            "; static, checkpoints and the unchunkable attention terms alone exceed the {} budget, so no chunk count helps",
            gb(b)
        ),
        Some(b) if peak > b => format!("; even C={c} peaks at {} > budget {}", gb(peak), gb(b)),
        Some(b) if c > 1 => format!(
            "; {} left for the expert term, so C={c} ({} per chunk), peak {} of {}",
            gb(b - sta - ckpt - seq),
            gb(expert / c as f64),
            gb(peak),
            gb(b)
        ),
        Some(b) => format!("; fits unchunked, peak {} of {}", gb(peak), gb(b)),
    };
    (dominant, head + &tail)
}
