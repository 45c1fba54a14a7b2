//! Tokens received per MoE layer and EP rank (s'), from route-hist records,
//! a what-if count, or uniform routing.

use ftk::jsonl::Reader;
use ftk::records::{self, RouteHist};
use ftk::Result;
use std::io::BufRead;

/// s' per MoE layer (ordinal) and EP rank, in the formula's units (token
/// copies a rank receives for a micro-batch of b·s tokens per source rank).
pub struct Received {
    pub per_layer: Vec<Vec<f64>>,
    pub source: String,
    pub hist_records: u64,
    pub hist_layers: u64,
}

/// Uniform routing: every rank receives b·s·k copies.
pub fn uniform(moe_layers: usize, ep: usize, bs: f64, topk: f64) -> Received {
    Received {
        per_layer: vec![vec![bs * topk; ep]; moe_layers],
        source: "uniform".into(),
        hist_records: 0,
        hist_layers: 0,
    }
}

/// What the plan expects of the histograms, and the tokens it scales them to.
#[derive(Clone, Copy, Debug)]
pub struct Expect {
    pub moe_layers: usize,
    pub experts: u64,
    pub topk: u64,
    pub ep: usize,
    /// b·s: tokens per micro-batch and source rank.
    pub bs: f64,
}

/// Read route_hist records. Layer L is the model's L-th MoE layer; a layer
/// seen at several steps takes, per rank, its worst step; layers with no
/// record take the element-wise worst of the layers that have one. Counts are
/// re-placed on this plan's EP ranks and scaled from the trace's tokens to
/// the plan's ep·b·s tokens per micro-batch.
pub fn from_hists(src: &str, input: Box<dyn BufRead>, want: &Expect) -> Result<Option<Received>> {
    let Expect {
        moe_layers,
        experts,
        topk,
        ep,
        bs,
    } = *want;
    let mut r = Reader::new(src, input);
    let mut worst: Vec<Option<Vec<f64>>> = vec![None; moe_layers];
    let mut n = 0u64;
    while let Some(h) = records::next::<RouteHist, _>(&mut r)? {
        let RouteHist {
            layer,
            experts: e,
            topk: k,
            tokens,
            counts,
            ..
        } = h;
        if counts.len() as u64 != e {
            ftk::bail!(
                "{}: 'counts' has {} entries but 'experts' is {e}; the record is corrupt",
                r.here(),
                counts.len()
            );
        }
        if e != experts {
            ftk::bail!(
                "{}: histogram has {e} experts but the model has {experts}; route the trace with the same model",
                r.here()
            );
        }
        if k != topk {
            ftk::bail!(
                "{}: histogram is top-{k} but the model routes top-{topk}",
                r.here()
            );
        }
        if tokens == 0 {
            ftk::bail!("{}: histogram has 0 tokens", r.here());
        }
        if counts.iter().sum::<u64>() != tokens * k {
            ftk::bail!(
                "{}: counts sum to {} but tokens × topk is {}",
                r.here(),
                counts.iter().sum::<u64>(),
                tokens * k
            );
        }
        if layer as usize >= moe_layers {
            ftk::bail!(
                "{}: layer {layer} but the model has {moe_layers} MoE layers (histogram layers are MoE-layer ordinals 0..{moe_layers})",
                r.here()
            );
        }
        let scale = ep as f64 * bs / tokens as f64;
        let per = experts as usize / ep;
        let recv: Vec<f64> = counts
            .chunks(per)
            .map(|c| c.iter().sum::<u64>() as f64 * scale)
            .collect();
        let slot = &mut worst[layer as usize];
        match slot {
            Some(w) => w.iter_mut().zip(&recv).for_each(|(a, b)| *a = a.max(*b)),
            None => *slot = Some(recv),
        }
        n += 1;
    }
    if n == 0 {
        return Ok(None);
    }
    let mut fill = vec![0.0f64; ep];
    for w in worst.iter().flatten() {
        fill.iter_mut().zip(w).for_each(|(a, b)| *a = a.max(*b));
    }
    let hist_layers = worst.iter().filter(|w| w.is_some()).count() as u64;
    Ok(Some(Received {
        per_layer: worst
            .into_iter()
            .map(|w| w.unwrap_or_else(|| fill.clone()))
            .collect(),
        source: "histograms".into(),
        hist_records: n,
        hist_layers,
    }))
}
