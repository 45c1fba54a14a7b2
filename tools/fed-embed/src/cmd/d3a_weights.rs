//! `fed-embed d3a-weights`: FedD3A per-sample teacher weights from client subspaces.

use crate::cli::{Feat, Out};
use crate::d3a::{self, mean_col};
use crate::input::{self, Matrix};
use crate::{f4, save, shown, subspace};
use ftk::records::{D3aClient, FedEmbedD3aWeights, Tag};
use ftk::table::Table;
use ftk::{bail, Result};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Client basis files (tensor `basis` [D, r]), one per client, in client order.
    #[arg(long = "basis", value_name = "B", required = true)]
    pub bases: Vec<PathBuf>,
    #[command(flatten)]
    pub feat: Feat,
    /// Softmax temperature on -sin^2(theta); 0 = hard selection of the closest domain.
    #[arg(long, default_value_t = 0.1)]
    pub temperature: f64,
    /// Only the K least-discrepant clients teach each sample.
    #[arg(long, value_name = "K")]
    pub top_k: Option<usize>,
    /// Integer tensor in the features file giving each sample's true domain
    /// (client index), for the summary's per-domain table.
    #[arg(long, value_name = "NAME", default_value = "domains")]
    pub domains: String,
    #[command(flatten)]
    pub out: Out,
}

/// Load a [D, r] basis and check it is orthonormal.
fn load_basis(p: &Path, dim: usize) -> Result<Matrix> {
    let f = input::open(p)?;
    let u = input::matrix_in(&f, "basis", false, "[D, r] (an orthonormal basis)")?;
    let here = format!("{}: tensor 'basis'", p.display());
    if u.rows != dim {
        bail!(
            "{here}: basis has dimension {} but the server features have {dim}; both must come from the same feature extractor",
            u.rows
        );
    }
    if u.cols > u.rows {
        bail!(
            "{here}: {} columns in dimension {}: not a basis",
            u.cols,
            u.rows
        );
    }
    let err = subspace::orthonormality_error(&u);
    if err > 1e-3 {
        bail!("{here}: columns are not orthonormal (max |U^T U - I| = {err:.3e}); write it with `fed-embed subspace`");
    }
    Ok(u)
}

/// --top-k, checked against the number of clients.
fn top_k(a: &Args) -> Result<usize> {
    let k = a.bases.len();
    if k == 0 {
        bail!("give at least one --basis (zero clients)");
    }
    Ok(match a.top_k {
        Some(t) if t == 0 || t > k => {
            bail!("--top-k must be in 1..={k} (the number of --basis files), got {t}")
        }
        Some(t) => t,
        None => k,
    })
}

pub fn run(a: &Args) -> Result<(FedEmbedD3aWeights, Table)> {
    if !(a.temperature.is_finite() && a.temperature >= 0.0) {
        bail!("--temperature must be >= 0, got {}", a.temperature);
    }
    let top_k = top_k(a)?;
    let k = a.bases.len();
    let (f, x) = a.feat.load()?;
    let domains = match f.get(&a.domains) {
        Some(t) => Some(input::labels(&t, x.rows, 0)?),
        None => None,
    };
    let bases: Vec<Matrix> = a
        .bases
        .iter()
        .map(|p| load_basis(p, x.cols))
        .collect::<Result<_>>()?;
    let n = x.rows;
    let (sim, disc) = d3a::discrepancies(&x, &bases);
    let w = d3a::weights(&disc, a.temperature, top_k);
    save(
        &a.out.output,
        "d3a-weights",
        &[
            w.out("weights"),
            sim.out("similarity"),
            disc.out("discrepancy"),
        ],
    )?;
    let best = d3a::argmax_rows(&w);
    let mut top = vec![0u64; k];
    best.iter().for_each(|&b| top[b] += 1);
    let all: Vec<usize> = (0..n).collect();
    let per_client = (0..k)
        .map(|j| D3aClient {
            basis: shown(&a.bases[j]),
            client: j as u64,
            mean_cos: mean_col(&sim, j, &all),
            mean_weight: mean_col(&w, j, &all),
            rank: bases[j].cols as u64,
            top_teacher: top[j],
        })
        .collect();
    // Per true domain (when the features carry them): mean weight per client.
    let mut groups: Vec<(String, Vec<usize>)> = vec![];
    let mut own_domain_top = None;
    if let Some(dom) = &domains {
        let mut by: BTreeMap<i64, Vec<usize>> = BTreeMap::new();
        dom.iter()
            .enumerate()
            .for_each(|(i, &d)| by.entry(d).or_default().push(i));
        groups.extend(by.into_iter().map(|(d, rows)| (d.to_string(), rows)));
        // Share of samples whose top teacher is their own domain's client.
        let hit = (0..n).filter(|&i| dom[i] as usize == best[i]).count();
        own_domain_top = Some(hit as f64 / n as f64);
    }
    groups.push(("all".into(), all));
    let mut head = vec!["domain".to_string(), "samples".to_string()];
    head.extend((0..k).map(|j| format!("w[{j}]")));
    let mut t = Table::new(head);
    for (name, rows) in &groups {
        let mut row = vec![name.clone(), rows.len().to_string()];
        row.extend((0..k).map(|j| f4(mean_col(&w, j, rows))));
        t.row(row);
    }
    let s = FedEmbedD3aWeights {
        clients: k as u64,
        kind: Tag::default(),
        output: shown(&a.out.output),
        own_domain_top,
        per_client,
        samples: n as u64,
        temperature: a.temperature,
        top_k: top_k as u64,
    };
    Ok((s, t))
}
