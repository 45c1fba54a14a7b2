//! route-hist: MoE routing traces, router logits or synthetic skew ->
//! per-(layer, step) expert and EP-rank token histograms, the all-to-all
//! matrix, load imbalance and capacity drops.

pub mod cli;
pub mod count;
pub mod cuda;
pub mod hist;
pub mod route_record;
pub mod trace;

pub use cli::Args;
use ftk::cli::Stdout;
use ftk::io::Input;
use ftk::model::ModelConfig;
use ftk::routing::{LayerModel, Placement, Skew};
use ftk::table::Table;
use ftk::tensors::{sniff, TensorFile};
use ftk::{Error, Result};
use hist::Accum;
use rayon::prelude::*;
use std::io::Read;
use std::path::PathBuf;
use trace::{Groups, Settings};

/// Where finished groups go: JSON lines as they come, or a table at the end.
struct Sink {
    out: Stdout,
    table: Option<Table>,
    with_dropped: bool,
    written: u64,
}

impl Sink {
    fn emit(&mut self, acc: &Accum, p: Placement) -> Result<()> {
        let rec = acc.record(p, self.with_dropped);
        self.written += 1;
        match &mut self.table {
            None => {
                ftk::jsonl::write_record(&mut self.out, &rec)?;
                // Stream to live consumers (pipes into mem-plan, a terminal).
                self.out.flush()
            }
            Some(t) => {
                let (hot, max) = rec
                    .counts
                    .iter()
                    .enumerate()
                    .max_by_key(|(_, c)| **c)
                    .map(|(e, c)| (e, *c))
                    .unwrap_or((0, 0));
                let rmax = rec.rank_counts.iter().copied().max().unwrap_or(0);
                let rmean = (rec.tokens * rec.topk) as f64 / rec.ep as f64;
                t.row(vec![
                    rec.layer.to_string(),
                    rec.step.to_string(),
                    rec.tokens.to_string(),
                    format!("{:.3}", rec.max_vio),
                    format!("e{hot}"),
                    max.to_string(),
                    rmax.to_string(),
                    format!(
                        "{:.3}",
                        if rmean > 0.0 {
                            rmax as f64 / rmean
                        } else {
                            0.0
                        }
                    ),
                    rec.dropped.map_or("-".into(), |d| d.to_string()),
                ]);
                Ok(())
            }
        }
    }

    fn finish(mut self) -> Result<u64> {
        if let Some(t) = &self.table {
            t.print(&mut self.out)?;
        }
        self.out.flush()?;
        Ok(self.written)
    }
}

/// Run the tool.
pub fn run(mut a: Args) -> Result<()> {
    a.check()?;
    let model = a.model.as_deref().map(ModelConfig::from_file).transpose()?;
    if let Some(m) = &model {
        let moe = m.moe.as_ref().ok_or_else(|| {
            Error::input(format!(
                "{}: the model has no MoE layers (no expert count in the config)",
                a.model.as_ref().unwrap().display()
            ))
        })?;
        a.experts.get_or_insert(moe.experts as usize);
        a.topk.get_or_insert(moe.topk as usize);
        a.layers.get_or_insert(m.moe_layers());
    }
    let mut sink = Sink {
        out: Stdout::new(),
        table: a.table.then(|| {
            Table::new([
                "layer",
                "step",
                "tokens",
                "max_vio",
                "hot",
                "hot_tokens",
                "max_rank",
                "rank_imb",
                "dropped",
            ])
        }),
        with_dropped: a.capacity_factor.is_some(),
        written: 0,
    };
    let settings = Settings {
        experts: a.experts,
        topk: a.topk,
        ep: a.ep,
        capacity_factor: a.capacity_factor,
        device: a.device.resolve()?,
    };
    if let Some(skew) = a.synthetic {
        if !a.inputs.is_empty() {
            ftk::bail!(
                "--synthetic generates routing; it takes no input files (got {})",
                a.inputs[0].display()
            );
        }
        synthetic(&a, skew, &mut sink)?;
    } else {
        read_inputs(&a, settings, &mut sink)?;
    }
    if sink.written == 0 {
        ftk::bail!("the trace has no routing records; nothing to count (empty input?)");
    }
    sink.finish().map(|_| ())
}

fn synthetic(a: &Args, skew: Skew, sink: &mut Sink) -> Result<()> {
    let need = |v: Option<usize>, flag: &str| {
        v.ok_or_else(|| Error::input(format!("--synthetic needs {flag} (or --model config.json)")))
    };
    let experts = need(a.experts, "--experts")?;
    let k = need(a.topk, "--topk")?;
    let tokens = a
        .tokens
        .ok_or_else(|| Error::input("--synthetic needs --tokens N (tokens per layer and step)"))?;
    if k == 0 || k > experts {
        ftk::bail!("--topk {k} must be in 1..={experts} (the number of experts)");
    }
    if tokens == 0 || a.steps == 0 || a.layers == Some(0) {
        ftk::bail!("--tokens, --steps and --layers must be at least 1");
    }
    let p = Placement::new(experts, a.ep)?;
    let layers = a.layers.unwrap_or(1);
    // Per layer: a popularity table and one accumulator per step (counts,
    // rank counts, the all-to-all matrix), about 64 bytes of overhead each.
    let per_layer = ftk::size::product(&[experts as u64, 8, 3]).and_then(|b| {
        b.checked_add(ftk::size::product(&[a.ep as u64, a.ep as u64, 8])?)?
            .checked_add(256)
    });
    ftk::size::check_memory(
        &format!("--layers {layers} with --experts {experts}"),
        per_layer.and_then(|b| b.checked_mul(layers)),
    )?;
    // Each token is drawn one by one; past 2^36 draws per run (minutes at
    // ~1e8 draws/s) a run would look hung.
    let draws = ftk::size::product(&[tokens, k as u64, layers, a.steps]);
    if draws.is_none_or(|d| d > 1 << 36) {
        ftk::bail!(
            "--tokens {tokens} x --topk {k} x --layers {layers} x --steps {} is {} routing draws, more than the 2^36 a synthetic run takes (it samples every token); lower --tokens: the histogram's shape does not depend on it",
            a.steps,
            draws.map_or("over 2^64".to_string(), |d| d.to_string())
        );
    }
    let models: Vec<LayerModel> = (0..layers)
        .map(|l| LayerModel::new(skew, experts, a.seed, l))
        .collect();
    let bar = ftk::cli::progress(layers * a.steps, "routing");
    for step in 0..a.steps {
        // One stream per (layer, step, rank): the same bytes at any thread count.
        let accs: Vec<Accum> = (0..layers)
            .into_par_iter()
            .map(|layer| {
                let mut acc = Accum::new(layer, step, k as u64, p);
                for r in 0..a.ep {
                    let n = (r as u64 + 1) * tokens / a.ep as u64 - r as u64 * tokens / a.ep as u64;
                    let unit =
                        models[layer as usize].unit(p, k, n, a.seed, [layer, step, r as u64]);
                    acc.add_unit(p, r, n, &unit, a.capacity_factor);
                }
                bar.inc(1);
                acc
            })
            .collect();
        for acc in &accs {
            sink.emit(acc, p)?;
        }
    }
    bar.finish_and_clear();
    Ok(())
}

fn read_inputs(a: &Args, mut s: Settings, sink: &mut Sink) -> Result<()> {
    let inputs = if a.inputs.is_empty() {
        vec![PathBuf::from("-")]
    } else {
        a.inputs.clone()
    };
    let mut groups = Groups::new(a.unordered);
    let mut emit = |acc: &Accum, p: Placement| sink.emit(acc, p);
    for (i, path) in inputs.iter().enumerate() {
        let mut input = Input::open(path)?;
        let head = {
            let buf = input
                .reader
                .fill_buf()
                .map_err(|e| Error::io("reading", &input.name, e))?;
            buf[..buf.len().min(16)].to_vec()
        };
        if sniff(&head) {
            if path.as_os_str() == "-" {
                ftk::bail!("<stdin> looks like safetensors, which is memory-mapped and must be given as a file path");
            }
            let f = TensorFile::open(path)?;
            let step = match f.metadata().and_then(|m| m.get("step")) {
                Some(v) => v.parse::<u64>().map_err(|_| {
                    Error::input(format!(
                        "{}: __metadata__ step '{v}' is not a non-negative integer",
                        f.name()
                    ))
                })?,
                None => a.step + i as u64,
            };
            trace::read_safetensors(&f, step, &s, &mut emit)?;
        } else {
            if head
                .first()
                .is_some_and(|b| *b != b'{' && !b.is_ascii_whitespace())
            {
                // Read a little more to say what it is not.
                // Bytes, not a String: a binary file would read as nothing.
                let mut peek = Vec::new();
                let _ = input.reader.by_ref().take(40).read_to_end(&mut peek);
                let peek = String::from_utf8_lossy(&peek);
                ftk::bail!(
                    "{}: neither JSON lines nor safetensors (starts with {:?})",
                    input.name,
                    peek.lines().next().unwrap_or("")
                );
            }
            let name = input.name.clone();
            if trace::read_jsonl(&name, input.reader, &mut s, &mut groups, &mut emit)? == 0 {
                ftk::bail!("{name}: no route records (empty input?); expected JSON lines with \"kind\":\"route\"");
            }
        }
    }
    if let Some(e) = s.experts {
        let p = Placement::new(e, s.ep)?;
        for acc in std::mem::replace(&mut groups, Groups::new(a.unordered)).finish() {
            emit(&acc, p)?;
        }
    }
    Ok(())
}
