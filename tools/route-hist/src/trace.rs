//! Reading routing traces: JSON-lines `route` records (streamed) and
//! safetensors files of `layer.{L}.topk` / `layer.{L}.logits` tensors (mapped).

use crate::count;
use crate::hist::Accum;
use crate::route_record::{RecordSeed, NEED_EXPERTS};
use ftk::error::Context;
use ftk::jsonl::Reader;
use ftk::routing::Placement;
use ftk::tensors::{self, TensorFile};
use ftk::{Error, Result};
use std::collections::BTreeMap;
use std::io::BufRead;

/// What every source needs to know about the run being analysed.
#[derive(Clone, Copy, Debug)]
pub struct Settings {
    pub experts: Option<usize>,
    pub topk: Option<usize>,
    pub ep: usize,
    pub capacity_factor: Option<f64>,
    /// Where top-k histograms of safetensors traces are counted.
    pub device: ftk::device::Device,
}

/// Open (layer, step) groups, emitted in (step, layer) order.
///
/// Ordered mode (the default) emits every group of step S as soon as a record
/// of a later step arrives, so memory stays O(layers · (experts + ep²)).
/// Unordered mode keeps all groups until the end of input.
pub struct Groups {
    open: BTreeMap<(u64, u64), Accum>,
    frontier: Option<u64>,
    pub unordered: bool,
}

impl Groups {
    pub fn new(unordered: bool) -> Groups {
        Groups {
            open: BTreeMap::new(),
            frontier: None,
            unordered,
        }
    }

    /// Groups ready to emit before accepting a record of `step`; errors if
    /// that step was already emitted.
    pub fn advance(&mut self, step: u64, here: impl Fn() -> String) -> Result<Vec<Accum>> {
        if self.unordered {
            return Ok(vec![]);
        }
        match self.frontier {
            Some(f) if step < f => Err(Error::input(format!(
                "{}: a record for step {step} arrives after step {f} began, and step {step} was already written; \
                 sort the trace by step or pass --unordered (holds every step until the end)",
                here()
            ))),
            Some(f) if step == f => Ok(vec![]),
            _ => {
                self.frontier = Some(step);
                let later = self.open.split_off(&(step, 0));
                Ok(std::mem::replace(&mut self.open, later).into_values().collect())
            }
        }
    }

    pub fn entry(&mut self, layer: u64, step: u64, topk: u64, p: Placement) -> &mut Accum {
        self.open
            .entry((step, layer))
            .or_insert_with(|| Accum::new(layer, step, topk, p))
    }

    pub fn finish(self) -> Vec<Accum> {
        self.open.into_values().collect()
    }
}

/// Stream a JSON-lines trace, calling `emit` with each finished group.
/// Returns the number of `route` records read.
pub fn read_jsonl(
    src: &str,
    input: Box<dyn BufRead>,
    s: &mut Settings,
    groups: &mut Groups,
    emit: &mut dyn FnMut(&Accum, Placement) -> Result<()>,
) -> Result<u64> {
    let mut r = Reader::new(src, input);
    let mut n = 0u64;
    let mut unit: Vec<u64> = vec![0; s.experts.unwrap_or(0)];
    loop {
        unit.fill(0);
        let seed = RecordSeed {
            experts: s.experts,
            k: &mut s.topk,
            unit: &mut unit,
        };
        let Some(rec) = r.next_record_seed(seed)? else {
            break;
        };
        if !rec.is_route {
            continue;
        }
        let here = || r.here();
        let field = |v: Option<u64>, name: &str| {
            v.ok_or_else(|| {
                Error::input(format!("{}: route record has no '{name}' field", r.here()))
            })
        };
        let layer = field(rec.layer, "layer")?;
        let step = field(rec.step, "step")?;
        let rank = field(rec.rank, "rank")?;
        let rows = field(rec.rows, "topk")?;
        let (Some(experts), Some(k)) = (s.experts, s.topk) else {
            continue; // an empty topk before any row told us k
        };
        if k == 0 || k > experts {
            return Err(Error::input(format!(
                "{}: top-k of {k} is not in 1..={experts}",
                here()
            )));
        }
        let p = Placement::new(experts, s.ep)?;
        for acc in groups.advance(step, here)? {
            emit(&acc, p)?;
        }
        let src_rank = (rank % s.ep as u64) as usize;
        groups.entry(layer, step, k as u64, p).add_unit(
            p,
            src_rank,
            rows,
            &unit,
            s.capacity_factor,
        );
        n += 1;
    }
    Ok(n)
}

/// One routed layer in a safetensors trace.
enum LayerTensor {
    TopK(String),
    Logits(String),
}

/// `layer.{L}.topk` / `layer.{L}.logits` tensors by layer; `topk` wins when
/// both exist (it is the routing actually taken).
fn layers_of(f: &TensorFile) -> BTreeMap<u64, LayerTensor> {
    let mut out = BTreeMap::new();
    for name in f.names() {
        let Some(rest) = name.strip_prefix("layer.") else {
            continue;
        };
        let Some((l, what)) = rest.split_once('.') else {
            continue;
        };
        let Ok(l) = l.parse::<u64>() else { continue };
        match what {
            "topk" => {
                out.insert(l, LayerTensor::TopK(name));
            }
            "logits" => {
                out.entry(l).or_insert(LayerTensor::Logits(name));
            }
            _ => {}
        }
    }
    out
}

/// Source-rank blocks: rank r holds rows [r*T/ep, (r+1)*T/ep).
fn blocks(tokens: usize, ep: usize) -> impl Iterator<Item = (usize, usize, usize)> {
    (0..ep).map(move |r| (r, r * tokens / ep, (r + 1) * tokens / ep))
}

/// Read every layer of a safetensors trace as step `step`.
pub fn read_safetensors(
    f: &TensorFile,
    step: u64,
    s: &Settings,
    emit: &mut dyn FnMut(&Accum, Placement) -> Result<()>,
) -> Result<u64> {
    let layers = layers_of(f);
    if layers.is_empty() {
        return Err(Error::input(format!(
            "{}: no routing tensors; expected integer 'layer.{{L}}.topk' [tokens,k] or float 'layer.{{L}}.logits' [tokens,experts]",
            f.name()
        )));
    }
    for (layer, lt) in &layers {
        let (acc, p) = match lt {
            LayerTensor::TopK(name) => topk_layer(&f.require(name)?, *layer, step, s)?,
            LayerTensor::Logits(name) => logits_layer(&f.require(name)?, *layer, step, s)?,
        };
        emit(&acc, p)?;
    }
    Ok(layers.len() as u64)
}

/// One layer's integer top-k ids [tokens, k], counted per source-rank block.
fn topk_layer(
    t: &tensors::Tensor<'_>,
    layer: u64,
    step: u64,
    s: &Settings,
) -> Result<(Accum, Placement)> {
    t.expect_rank(2, "[tokens, k]")?;
    if !tensors::is_int(t.dtype) {
        return Err(Error::input(format!(
            "{}: top-k expert ids must be an integer dtype (I8..I64, U8..U64), got {:?}",
            t.here(),
            t.dtype
        )));
    }
    let (tokens, k) = (t.shape[0], t.shape[1]);
    let experts = s
        .experts
        .ok_or_else(|| Error::input(format!("{}: {NEED_EXPERTS}", t.here())))?;
    if let Some(want) = s.topk {
        if want != k {
            return Err(Error::input(format!(
                "{}: has top-{k} rows but --topk is {want}",
                t.here()
            )));
        }
    }
    if tokens == 0 || k == 0 || k > experts {
        return Err(Error::input(format!(
            "{}: shape {:?} has no routed tokens or a top-k outside 1..={experts}",
            t.here(),
            t.shape
        )));
    }
    let p = Placement::new(experts, s.ep)?;
    let w = tensors::dtype_bytes(t.dtype).expect("integer dtypes are whole bytes");
    let mut acc = Accum::new(layer, step, k as u64, p);
    for (r, a, b) in blocks(tokens, s.ep) {
        let bytes = &t.data[a * k * w..b * k * w];
        if let (ftk::device::Device::Cuda(ordinal), Some(_)) =
            (s.device, crate::cuda::kernel_for(t.dtype))
        {
            let counted = crate::cuda::count_topk(ordinal, t.dtype, bytes, experts)
                // Keeps the class: a CUDA failure is exit 3, not the file's fault.
                .context(t.here())?;
            if let Some(unit) = counted {
                acc.add_unit(p, r, (b - a) as u64, &unit, s.capacity_factor);
                continue;
            }
            // ids out of range: the CPU scan below names the first one
        }
        let unit = count::count_topk(t.dtype, bytes, k, experts).map_err(|(i, v)| {
            Error::input(format!(
                "{}: token {} names expert {v}, outside 0..{experts}; check --experts",
                t.here(),
                a + i / k
            ))
        })?;
        acc.add_unit(p, r, (b - a) as u64, &unit, s.capacity_factor);
    }
    Ok((acc, p))
}

/// One layer's float router logits [tokens, experts]: softmax, top-k, counted
/// per source-rank block.
fn logits_layer(
    t: &tensors::Tensor<'_>,
    layer: u64,
    step: u64,
    s: &Settings,
) -> Result<(Accum, Placement)> {
    t.expect_rank(2, "[tokens, experts]")?;
    if !tensors::is_float(t.dtype) {
        return Err(Error::input(format!(
            "{}: router logits must be F16, BF16, F32 or F64, got {:?}",
            t.here(),
            t.dtype
        )));
    }
    let (tokens, experts) = (t.shape[0], t.shape[1]);
    if let Some(e) = s.experts.filter(|e| *e != experts) {
        return Err(Error::input(format!(
            "{}: logits have {experts} experts but --experts/--model says {e}",
            t.here()
        )));
    }
    let k = s.topk.ok_or_else(|| {
        Error::input(format!(
            "{}: routing from logits needs --topk K or --model config.json",
            t.here()
        ))
    })?;
    if tokens == 0 || k == 0 || k > experts {
        return Err(Error::input(format!(
            "{}: shape {:?} has no tokens or top-{k} is outside 1..={experts}",
            t.here(),
            t.shape
        )));
    }
    let p = Placement::new(experts, s.ep)?;
    let mut acc = Accum::new(layer, step, k as u64, p);
    for (r, a, b) in blocks(tokens, s.ep) {
        let unit = count::count_logits(t.dtype, t.data, a, b - a, experts, k).map_err(
            |count::NanAt(row, col)| {
                Error::input(format!(
                    "{}: NaN logit at token {row}, expert {col}",
                    t.here()
                ))
            },
        )?;
        acc.add_unit(p, r, (b - a) as u64, &unit, s.capacity_factor);
    }
    Ok((acc, p))
}
