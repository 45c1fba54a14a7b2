//! fed-embed: feature-space federated learning as Unix tools. Server- and
//! client-side numerics of FedD3A (subspaces, per-sample teacher weights,
//! weighted ensembles), FedDISC (prototypes, pseudo-labels, per-class
//! k-means, upload noise), FedAPT (keys, adaptive prompt weights) and
//! pFedBayesPT (semi-implicit prompt sampling) over safetensors feature
//! matrices, with JSON-lines summaries.

//!
//! Layout: `cli` (the subcommands and shared flag groups), `cmd/<sub>.rs`
//! (each subcommand's flags, their checks and its summary record), and one
//! library module per method: `subspace` and `d3a` (FedD3A), `proto`,
//! `kmeans` and `noise` (FedDISC), `apt` (FedAPT), `bayes` (pFedBayesPT);
//! `input` loads and checks tensors.

pub mod apt;
pub mod bayes;
pub mod cli;
pub mod cluster;
pub mod cmd;
pub mod d3a;
pub mod input;
pub mod kmeans;
pub mod noise;
pub mod proto;
pub mod subspace;

pub use cli::{Args, Command};
use ftk::cli::Stdout;
use ftk::records::Record;
use ftk::table::Table;
use ftk::tensors::{write_safetensors, OutTensor};
use ftk::Result;
use serde_json::Value;
use std::collections::HashMap;
use std::path::Path;

pub fn run(args: Args) -> Result<()> {
    use cmd::*;
    let mut out = Stdout::new();
    match &args.command {
        Command::Subspace(a) => emit(&mut out, &subspace::run(a)?, None, a.out.table),
        Command::D3aWeights(a) => {
            let (s, t) = d3a_weights::run(a)?;
            emit(&mut out, &s, Some(t), a.out.table)
        }
        Command::Ensemble(a) => emit(&mut out, &ensemble::run(a)?, None, a.out.table),
        Command::Prototypes(a) => {
            let (s, t) = prototypes::run(a)?;
            emit(&mut out, &s, Some(t), a.out.table)
        }
        Command::PseudoLabel(a) => {
            let (s, t) = pseudo_label::run(a)?;
            emit(&mut out, &s, Some(t), a.out.table)
        }
        Command::Cluster(a) => {
            let (s, t) = cluster::run(a)?;
            emit(&mut out, &s, Some(t), a.out.table)
        }
        Command::Noise(a) => emit(&mut out, &noise::run(a)?, None, a.out.table),
        Command::Keys(a) => emit(&mut out, &keys::run(a)?, None, a.out.table),
        Command::AdaptWeights(a) => emit(&mut out, &adapt_weights::run(a)?, None, a.out.table),
        Command::PromptSample(a) => emit(&mut out, &prompt_sample::run(a)?, None, a.out.table),
    }?;
    out.flush()
}

/// Print the summary: one JSON line, or with --table the subcommand's own
/// table (else the record's fields as a two-column table).
fn emit<R: Record>(out: &mut Stdout, rec: &R, table: Option<Table>, as_table: bool) -> Result<()> {
    if !as_table {
        return ftk::jsonl::write_record(out, rec);
    }
    match table {
        Some(t) => t.print(out),
        None => kv_table(rec).print(out),
    }
}

fn kv_table<R: Record>(rec: &R) -> Table {
    let mut t = Table::new(["field", "value"]);
    if let Ok(Value::Object(m)) = serde_json::to_value(rec) {
        for (k, v) in m {
            let v = match v {
                Value::String(s) => s,
                other => other.to_string(),
            };
            t.row(vec![k, v]);
        }
    }
    t
}

/// One metadata entry: safetensors serialises the map in HashMap order, so
/// a single key keeps outputs byte-for-byte reproducible.
fn meta(op: &str) -> Option<HashMap<String, String>> {
    Some(HashMap::from([(
        "ftk".to_string(),
        format!("fed-embed {op}"),
    )]))
}

pub(crate) fn save(path: &Path, op: &str, tensors: &[OutTensor<'_>]) -> Result<()> {
    write_safetensors(path, tensors, meta(op))
}

pub(crate) fn f4(v: f64) -> String {
    format!("{v:.4}")
}

/// `--output` as the summaries name it.
pub(crate) fn shown(p: &Path) -> String {
    p.display().to_string()
}
