//! fed-aggregate: the server step of federated learning as a Unix tool.
//! Flower's strategies computed exactly, streaming over memory-mapped client
//! files in constant memory; FedRA layer allocation and aggregation;
//! personalised (local-only) tensors; mergeable partial sums for trees of
//! scheduler jobs; server-side DP with fixed clipping.

pub mod cpu;
pub mod cuda;
pub mod engine;
pub mod fedra;
pub mod plan;
pub mod strategy;

use clap::{Parser, Subcommand};
use engine::{Dp, Job, Sinks};
use ftk::cli::Stdout;
use ftk::dp;
use ftk::tensor_writer::{Finished, StreamWriter, TensorSpec};
use ftk::tensors::{Dtype, Tensor};
use ftk::{bail, Error, Result};
use plan::{Fault, Layout, Mapped, Origin, Spec};
use regex::Regex;
use serde_json::json;
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::Instant;
use strategy::{Kind, Name, Strategy, StrategyFlags};

const AFTER_HELP: &str = "\
Input: JSON lines, one per client (other kinds are skipped; paths are relative to the
manifest's directory, or the working directory for stdin):
  {\"kind\":\"client_update\",\"cid\":\"7\",\"path\":\"c7.safetensors\",\"num_examples\":120}
Every client file holds the same tensor names, shapes and dtypes (else exit 2 naming the
client and tensor; --skip-bad drops such clients and lists them). Output keeps names and
dtypes. Summary to stdout:
  {\"kind\":\"aggregate\",\"strategy\",\"clients\",\"tensors\",\"params\",\"bytes_read\",\"ms\",...}

Strategies (Flower 1.x server math and defaults, to float32 rounding):
  fedavg, fedprox    weighted mean by num_examples (FedProx's server side is FedAvg)
  fedavgm            --server-lr 1 --server-momentum 0; steps from --global when either differs
  fedadam            --eta 0.1 --beta1 0.9 --beta2 0.99 --tau 1e-9, Flower's bias-corrected
                     eta*sqrt(1-b2^(t+1))/(1-b1^(t+1)) with t the round (1 = first)
  fedyogi            --eta 0.01 --beta1 0.9 --beta2 0.99 --tau 1e-3 (no bias correction)
  fedadagrad         --eta 0.1 --tau 1e-9
  fedmedian          coordinate-wise median (unweighted)
  fedtrimmedavg      --trim-beta 0.2: drop int(beta*n) values at each end, mean of the rest
  krum, multikrum    --num-malicious F --to-keep K: score = sum of the max(1,n-F-2) smallest
                     squared distances; krum returns the best client, multikrum the
                     num_examples-weighted mean of the K best
  bulyan             --num-malicious F (n >= 4F+3): n-2F rounds of Krum, then per coordinate
                     the mean of the n-4F selected values closest to their median
  fedra              FedRA (leondada/FedRA): --alloc from `fed-aggregate fedra-alloc`; each
                     layer (--layer-pattern) is the unweighted mean over the clients that held
                     it, a layer nobody held keeps its --global value; client files may number
                     their layers locally (0..L_i) or globally. Other tensors: mean over holders.
fedavgm (with momentum) and fedadam/fedyogi/fedadagrad need --global (this round's model) and
--state (created if missing, rewritten atomically with the round counter).

Numerics: accumulation in f64 (Flower: float32), one rounding to the output dtype.
Integer tensors (step counters): the weighted mean (or the robust statistic) rounded to the
nearest integer; no server optimiser and no DP noise is applied to them. Flower's in-place
FedAvg turns them into zeros instead: a deliberate, documented difference.

Personalised layers: --keep-local REGEX leaves matching tensors out (they stay on clients).
Partial aggregates (linear strategies): --partial-out P writes f64 weighted sums and
weights; `fed-aggregate merge P1 P2 ... -o OUT` (or --partial-out again, for deeper trees)
combines them; robust strategies refuse partials.
DP (Flower's server-side fixed clipping): --clip-norm C [--noise-multiplier z --seed s]:
each client's update against --global is clipped to L2 norm C, then noise of std z*C/n is
added to the result; the summary reports the per-round (epsilon, delta).
GPU (--device cuda): plain weighted means of f32/bf16/f16 tensors stream through pinned
buffers to the GPU (same output bytes as the CPU); other strategies and tensors stay on the
CPU. The pass is host-memory bound: it pays off for large aggregates.

Examples:
  fed-aggregate --strategy fedavg -o global1.safetensors clients.jsonl
  fed-aggregate --strategy fedadam --global g.safetensors --state opt.safetensors -o g.safetensors < clients.jsonl
  fed-aggregate fedra-alloc --clients 6 --layers 12 --capacity 12,10,8,6,4,3 --round 1 --seed 0 > alloc.jsonl
  fed-aggregate --strategy fedra --alloc alloc.jsonl --layer-pattern 'blocks\\.(\\d+)\\.' --global g.safetensors -o g2.safetensors clients.jsonl
  fed-aggregate --strategy fedavg --partial-out p0.safetensors part0.jsonl   # one per array task
  fed-aggregate merge --strategy fedavg -o global.safetensors p*.safetensors
  fed-aggregate --strategy fedavg --device cuda -o global1.safetensors clients.jsonl";

/// Federated aggregation of client updates (Flower's strategies, FedRA,
/// mergeable partials) in constant memory.
#[derive(Parser, Debug)]
#[command(
    name = "fed-aggregate",
    version,
    about,
    after_help = AFTER_HELP,
    args_conflicts_with_subcommands = true
)]
pub struct Args {
    #[command(subcommand)]
    pub command: Option<Command>,
    /// Client manifest (JSON lines); '-' or nothing reads stdin.
    #[arg(value_name = "MANIFEST")]
    pub manifest: Option<PathBuf>,
    #[command(flatten)]
    pub common: Common,
    /// FedRA allocation (JSON lines from `fed-aggregate fedra-alloc`).
    #[arg(long, value_name = "ALLOC")]
    pub alloc: Option<PathBuf>,
    /// FedRA: regex whose first group is the layer index.
    #[arg(long, value_name = "REGEX", default_value = r"layers\.(\d+)\.")]
    pub layer_pattern: String,
    /// Drop clients with unreadable files, mismatched tensors or NaN/Inf
    /// values, and list them in the summary, instead of failing.
    #[arg(long)]
    pub skip_bad: bool,
}

#[derive(Subcommand, Debug)]
// Parsed once per process; boxing would only complicate clap's derive.
#[allow(clippy::large_enum_variant)]
pub enum Command {
    /// Draw FedRA's random layer allocation for one round (JSON lines).
    FedraAlloc(AllocArgs),
    /// Combine partial aggregates (from --partial-out) and finish them.
    Merge(MergeArgs),
}

#[derive(clap::Args, Debug)]
pub struct AllocArgs {
    /// Number of clients.
    #[arg(long)]
    pub clients: usize,
    /// Layers in the global model.
    #[arg(long)]
    pub layers: usize,
    /// Layers each client holds: N values, one for all, or K values each
    /// covering N/K consecutive clients.
    #[arg(long, value_delimiter = ',', required = true)]
    pub capacity: Vec<usize>,
    /// Round number (each round draws anew).
    #[arg(long, default_value_t = 1)]
    pub round: u64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

#[derive(clap::Args, Debug)]
pub struct MergeArgs {
    /// Partial aggregates written with --partial-out.
    #[arg(required = true, value_name = "PARTIAL")]
    pub partials: Vec<PathBuf>,
    #[command(flatten)]
    pub common: Common,
}

/// Flags shared by aggregation and merge.
#[derive(clap::Args, Debug)]
pub struct Common {
    /// Aggregation strategy (merge: defaults to the partials' strategy).
    #[arg(long, value_enum)]
    pub strategy: Option<Name>,
    #[command(flatten)]
    pub flags: StrategyFlags,
    /// Current global parameters (server optimisers, DP clipping, FedRA).
    #[arg(long, value_name = "G")]
    pub global: Option<PathBuf>,
    /// Server optimiser state, read if present and rewritten atomically.
    #[arg(long, value_name = "S")]
    pub state: Option<PathBuf>,
    /// Output parameters (safetensors, written atomically).
    #[arg(short = 'o', long = "output", value_name = "OUT")]
    pub output: Option<PathBuf>,
    /// Write mergeable weighted sums instead of (or besides) -o.
    #[arg(long, value_name = "P")]
    pub partial_out: Option<PathBuf>,
    /// Leave tensors whose names match out of the aggregate.
    #[arg(long, value_name = "REGEX")]
    pub keep_local: Option<String>,
    /// DP: clip each client's update (against --global) to this L2 norm.
    #[arg(long, value_name = "C")]
    pub clip_norm: Option<f64>,
    /// DP: Gaussian noise std = z * C / clients.
    #[arg(long, value_name = "Z")]
    pub noise_multiplier: Option<f64>,
    /// DP: delta for the reported per-round epsilon.
    #[arg(long, value_name = "D", default_value_t = 1e-5)]
    pub dp_delta: f64,
    /// Seed for the DP noise.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Where weighted means run: cpu, cuda[:N] (client tensors streamed to the
    /// GPU through pinned buffers; robust strategies, DP and server optimisers
    /// stay on the CPU) or auto.
    #[arg(long, default_value = "cpu")]
    pub device: ftk::device::DeviceArg,
    /// Print the summary as an aligned table instead of a JSON line.
    #[arg(long)]
    pub table: bool,
}

pub fn run(args: Args) -> Result<()> {
    let mut out = Stdout::new();
    let (summary, table) = match &args.command {
        Some(Command::FedraAlloc(a)) => return alloc(a, &mut out),
        Some(Command::Merge(m)) => (merge(m)?, m.common.table),
        None => (aggregate(&args)?, args.common.table),
    };
    if table {
        let mut t = ftk::table::Table::new(["field", "value"]);
        if let serde_json::Value::Object(m) = &summary {
            for (k, v) in m {
                let v = match v {
                    serde_json::Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                t.row(vec![k.clone(), v]);
            }
        }
        t.print(&mut out)?;
    } else {
        ftk::jsonl::write_record(&mut out, &summary)?;
    }
    out.flush()
}

fn alloc(a: &AllocArgs, out: &mut Stdout) -> Result<()> {
    let cap = fedra::expand_capacity(&a.capacity, a.clients, a.layers)?;
    for rec in fedra::allocate(&cap, a.layers, a.round, a.seed) {
        ftk::jsonl::write_record(out, &rec)?;
    }
    out.flush()
}

/// Inputs opened, ready for one or more attempts (with --skip-bad).
struct Inputs<'r> {
    strategy: Strategy,
    origins: Vec<Origin>,
    /// Clients that could not be opened, with the reason.
    skipped: Vec<(String, String)>,
    global: Option<(Mapped, String)>,
    state: Option<(Mapped, String)>,
    round: u64,
    layout: Layout<'r>,
    skip_bad: bool,
    /// DP clipping at this step (clients), and the clip norm for the noise.
    clip: Option<f64>,
    noise: Option<f64>,
    /// Clients behind the inputs (partials count theirs).
    merged_clients: Option<u64>,
}

fn keep_regex(c: &Common) -> Result<Option<Regex>> {
    c.keep_local
        .as_deref()
        .map(|p| {
            Regex::new(p).map_err(|e| {
                Error::input(format!(
                    "--keep-local '{p}' is not a valid regex: {}",
                    fedra::regex_error(&e)
                ))
            })
        })
        .transpose()
}

fn check_outputs(c: &Common, s: &Strategy) -> Result<()> {
    if c.output.is_none() && c.partial_out.is_none() {
        bail!("give -o OUT.safetensors (or --partial-out P.safetensors for a mergeable partial)");
    }
    if c.partial_out.is_some() && !s.mergeable() {
        bail!(
            "--partial-out works only for the linear strategies (fedavg, fedprox, fedavgm, fedadam, fedyogi, fedadagrad, fedra); {} needs every client's values at once",
            s.name.as_str()
        );
    }
    if let Some(cn) = c.clip_norm {
        if !(cn.is_finite() && cn > 0.0) {
            bail!("--clip-norm must be positive, got {cn}");
        }
    }
    if let Some(z) = c.noise_multiplier {
        if !(z.is_finite() && z >= 0.0) {
            bail!("--noise-multiplier must be >= 0, got {z}");
        }
        if c.output.is_none() {
            bail!("--noise-multiplier adds noise to the final result: use it with -o (at the final merge), not with --partial-out alone");
        }
    }
    if !(c.dp_delta > 0.0 && c.dp_delta < 1.0) {
        bail!("--dp-delta must be in (0, 1), got {}", c.dp_delta);
    }
    Ok(())
}

/// An optional opened file and its name for messages.
type Opened = Option<(Mapped, String)>;

/// Open --global and --state, and read the round counter.
fn open_global_state(c: &Common, s: &Strategy, need_global: bool) -> Result<(Opened, Opened, u64)> {
    let global = match &c.global {
        Some(p) => Some((
            Mapped::open(p).map_err(|e| ctx("global", e))?,
            p.display().to_string(),
        )),
        None if need_global => bail!(
            "--strategy {} needs --global G.safetensors (the current global model)",
            s.name.as_str()
        ),
        None => None,
    };
    let slots = s.opt().state_slots();
    if !slots.is_empty() && c.state.is_none() && c.output.is_some() {
        bail!(
            "--strategy {} keeps server state between rounds: give --state S.safetensors (created if missing)",
            s.name.as_str()
        );
    }
    let mut round = 1;
    let state = match &c.state {
        Some(p) if p.exists() && c.output.is_some() => {
            let m = Mapped::open(p).map_err(|e| ctx("state", e))?;
            let name = p.display().to_string();
            let meta = m.metadata().cloned().unwrap_or_default();
            if meta.get("ftk_state").map(String::as_str) != Some("fed-aggregate") {
                bail!("state {name}: not a fed-aggregate state file (no ftk_state metadata)");
            }
            let st = meta.get("strategy").cloned().unwrap_or_default();
            if st != s.name.as_str() {
                bail!(
                    "state {name}: written by --strategy {st}, not {}; start a new state file",
                    s.name.as_str()
                );
            }
            let done: u64 = meta
                .get("round")
                .and_then(|r| r.parse().ok())
                .ok_or_else(|| {
                    Error::input(format!("state {name}: bad or missing \"round\" metadata"))
                })?;
            round = done + 1;
            Some((m, name))
        }
        _ => None,
    };
    Ok((global, state, round))
}

fn ctx(what: &str, e: Error) -> Error {
    match e {
        Error::Input(m) => Error::input(format!("{what} {m}")),
        other => other,
    }
}

fn aggregate(args: &Args) -> Result<serde_json::Value> {
    let c = &args.common;
    let Some(name) = c.strategy else {
        bail!("--strategy NAME is required (fedavg, fedadam, krum, fedra, ...; see --help)");
    };
    let strategy = Strategy::new(name, &c.flags)?;
    check_outputs(c, &strategy)?;
    let keep = keep_regex(c)?;
    let fedra_parts = if name == Name::Fedra {
        let Some(a) = &args.alloc else {
            bail!("--strategy fedra needs --alloc ALLOC.jsonl (from `fed-aggregate fedra-alloc`)");
        };
        if c.clip_norm.is_some() {
            bail!("--clip-norm is not supported with --strategy fedra");
        }
        Some((
            fedra::layer_regex(&args.layer_pattern)?,
            fedra::read_alloc(a)?,
        ))
    } else {
        if args.alloc.is_some() {
            bail!("--alloc applies only to --strategy fedra");
        }
        None
    };
    if c.noise_multiplier.is_some() && c.clip_norm.is_none() {
        bail!("--noise-multiplier needs --clip-norm C (noise std is z*C/clients)");
    }
    let need_global = strategy.opt().needs_global() && c.output.is_some() || c.clip_norm.is_some();
    let manifest = args.manifest.clone().unwrap_or_else(|| PathBuf::from("-"));
    let entries = plan::read_manifest(&manifest)?;
    let uniform = strategy.weighting() == "uniform";
    let mut origins = Vec::new();
    let mut skipped = Vec::new();
    for e in &entries {
        match Origin::open_client(e, uniform) {
            Ok(o) => origins.push(o),
            Err(err) if args.skip_bad => skipped.push((e.cid.clone(), err.to_string())),
            Err(err) => return Err(Fault::Client(0, err.to_string()).into_error()),
        }
    }
    let (global, state, round) = open_global_state(c, &strategy, need_global)?;
    let inputs = Inputs {
        strategy,
        origins,
        skipped,
        global,
        state,
        round,
        layout: Layout {
            keep_local: keep.as_ref(),
            fedra: fedra_parts.as_ref().map(|(r, a)| (r, a)),
            need_global: need_global || name == Name::Fedra && c.global.is_some(),
            fill_from_global: name == Name::Fedra,
        },
        skip_bad: args.skip_bad,
        clip: c.clip_norm,
        noise: c.noise_multiplier,
        merged_clients: None,
    };
    if let Some((_, a)) = &fedra_parts {
        // A leaf writing only a partial need not cover every layer: the merge does.
        if inputs.global.is_none() && c.output.is_some() {
            check_fedra_coverage(&inputs, a, &args.layer_pattern)?;
        }
    }
    execute(&inputs, c)
}

/// Without --global, every layer must be held by some client.
fn check_fedra_coverage(inp: &Inputs, a: &fedra::Alloc, pat: &str) -> Result<()> {
    let held: BTreeSet<usize> = inp
        .origins
        .iter()
        .filter_map(|o| a.held.get(&o.cid))
        .flatten()
        .copied()
        .collect();
    if let Some(l) = (0..a.num_layers).find(|l| !held.contains(l)) {
        bail!(
            "layer {l} (pattern '{pat}') is held by none of this round's clients; give --global so it keeps its value"
        );
    }
    Ok(())
}

fn merge(m: &MergeArgs) -> Result<serde_json::Value> {
    let c = &m.common;
    let mut origins = Vec::new();
    for p in &m.partials {
        origins.push(Origin::open_partial(p)?);
    }
    let metas: Vec<&plan::PartialMeta> = origins
        .iter()
        .map(|o| o.partial.as_ref().expect("partial"))
        .collect();
    let recorded = metas[0].strategy.clone();
    let name = match c.strategy {
        Some(n) => n,
        None => <Name as clap::ValueEnum>::from_str(&recorded, false).map_err(|_| {
            Error::input(format!(
                "{}: unknown strategy '{recorded}'",
                origins[0].label
            ))
        })?,
    };
    let strategy = Strategy::new(name, &c.flags)?;
    check_outputs(c, &strategy)?;
    for (o, p) in origins.iter().zip(&metas) {
        if p.weighting != strategy.weighting() {
            bail!(
                "{}: weighted by {}, but --strategy {} weights by {}",
                o.label,
                p.weighting,
                name.as_str(),
                strategy.weighting()
            );
        }
        if p.clip_norm != metas[0].clip_norm {
            bail!(
                "{}: clip norm {} differs from {}'s {}; merge partials clipped alike",
                o.label,
                p.clip_norm.map_or("none".to_string(), |c| c.to_string()),
                origins[0].label,
                metas[0]
                    .clip_norm
                    .map_or("none".to_string(), |c| c.to_string())
            );
        }
    }
    if strategy.weighting() == "num_examples" {
        let first: BTreeSet<&String> = metas[0].dtypes.keys().collect();
        for (o, p) in origins.iter().zip(&metas) {
            let set: BTreeSet<&String> = p.dtypes.keys().collect();
            if let Some(n) = first.symmetric_difference(&set).next() {
                bail!(
                    "{}: tensor sets differ from {} (at '{n}'); partials of one round must cover the same tensors",
                    o.label,
                    origins[0].label
                );
            }
        }
    }
    let clip = metas[0].clip_norm;
    if let Some(cn) = c.clip_norm {
        if clip != Some(cn) {
            bail!(
                "--clip-norm {cn} differs from the partials' recorded clip norm ({}); clipping happens at the leaves",
                clip.map_or("none".to_string(), |c| c.to_string())
            );
        }
    }
    if c.noise_multiplier.is_some() && clip.is_none() {
        bail!("--noise-multiplier needs partials written with --clip-norm (clipping happens at the leaves)");
    }
    let merged: u64 = metas.iter().map(|p| p.clients).sum();
    let keep = keep_regex(c)?;
    let need_global = strategy.opt().needs_global() && c.output.is_some();
    let (global, state, round) = open_global_state(c, &strategy, need_global)?;
    if name == Name::Fedra && global.is_none() && c.output.is_some() {
        // Partials only know the layers their clients held: a layer nobody
        // held keeps its value from the global model.
        bail!("merging fedra partials needs --global G.safetensors (layers no client held keep their global value)");
    }
    let inputs = Inputs {
        strategy,
        origins,
        skipped: Vec::new(),
        global,
        state,
        round,
        layout: Layout {
            keep_local: keep.as_ref(),
            fedra: None,
            need_global,
            fill_from_global: name == Name::Fedra,
        },
        skip_bad: false,
        clip: None,
        noise: c.noise_multiplier.map(|z| z * clip.unwrap_or(0.0)),
        merged_clients: Some(merged),
    };
    let mut v = execute(&inputs, c)?;
    v["partials"] = json!(m.partials.len());
    if let Some(cn) = clip {
        v["clip_norm"] = json!(cn);
    }
    Ok(v)
}

/// What one successful attempt produced.
struct Done {
    finished: Vec<Finished>,
    specs: usize,
    params: u64,
    bytes_read: u64,
    clients: usize,
    selected: Option<Vec<String>>,
    clipped: Option<usize>,
    noise_std: Option<f64>,
}

fn execute(inp: &Inputs, c: &Common) -> Result<serde_json::Value> {
    let t0 = Instant::now();
    let mut bad: Vec<(usize, String)> = Vec::new();
    let done = loop {
        let active: Vec<usize> = (0..inp.origins.len())
            .filter(|i| !bad.iter().any(|b| b.0 == *i))
            .collect();
        if active.is_empty() {
            let why: Vec<String> = inp
                .skipped
                .iter()
                .map(|s| s.1.clone())
                .chain(bad.iter().map(|b| b.1.clone()))
                .collect();
            bail!("no usable client is left: {}", why.join("; "));
        }
        match attempt(inp, c, &active) {
            Ok(d) => break d,
            Err(Fault::Client(i, m)) if inp.skip_bad => bad.push((i, m)),
            Err(f) => return Err(f.into_error()),
        }
    };
    // Every output is complete and fsynced: rename them into place together.
    for f in done.finished {
        f.commit()?;
    }
    let mut skipped: Vec<serde_json::Value> = inp
        .skipped
        .iter()
        .map(|(cid, e)| json!({"cid": cid, "error": e}))
        .collect();
    skipped.extend(
        bad.iter()
            .map(|(i, e)| json!({"cid": inp.origins[*i].cid, "error": e})),
    );
    let mut v = json!({
        "kind": "aggregate",
        "strategy": inp.strategy.name.as_str(),
        "clients": inp.merged_clients.unwrap_or(done.clients as u64),
        "tensors": done.specs,
        "params": done.params,
        "bytes_read": done.bytes_read,
        "ms": t0.elapsed().as_millis() as u64,
        "accumulator": "f64",
    });
    if inp.strategy.opt().needs_global() || c.state.is_some() {
        v["round"] = json!(inp.round);
    }
    if let Some(e) = inp.strategy.eta_l {
        v["eta_l"] = json!(e);
    }
    if let Some(p) = &c.partial_out {
        v["partial"] = json!(p.display().to_string());
    }
    if let Some(s) = done.selected {
        v["selected"] = json!(s);
    }
    if !skipped.is_empty() {
        v["skipped"] = json!(skipped);
    }
    if let Some(cn) = inp.clip {
        v["clip_norm"] = json!(cn);
        v["clipped"] = json!(done.clipped);
    }
    if let Some(std) = done.noise_std {
        let z = c.noise_multiplier.unwrap_or(0.0);
        v["dp"] = json!({
            "noise_multiplier": z,
            "noise_std": std,
            "epsilon": dp::epsilon(z, c.dp_delta),
            "delta": c.dp_delta,
            "accounting": "per round, analytic Gaussian mechanism, add/remove one client, no sampling amplification",
        });
    }
    Ok(v)
}

fn attempt(inp: &Inputs, c: &Common, active: &[usize]) -> std::result::Result<Done, Fault> {
    let specs = plan::build(
        &inp.origins,
        active,
        inp.global.as_ref().map(|(m, n)| (m, n.as_str())),
        &inp.layout,
    )?;
    let s = &inp.strategy;
    let clients_in = inp.merged_clients.unwrap_or(active.len() as u64);
    // Weighted strategies need a positive total weight.
    if matches!(s.kind, Kind::Linear { uniform: false, .. }) {
        let w: f64 = active.iter().map(|&i| inp.origins[i].weight).sum();
        if inp.merged_clients.is_none() && w <= 0.0 {
            return Err(Fault::Fatal(Error::input(
                "the clients' num_examples sum to 0; FedAvg weights need at least one positive count",
            )));
        }
    }
    let state_in = state_tensors(inp, &specs)?;
    let mut job = Job {
        origins: &inp.origins,
        specs: &specs,
        kind: s.kind,
        opt: if c.output.is_some() {
            s.opt()
        } else {
            strategy::ServerOpt::None
        },
        round: inp.round,
        state_in,
        dp: None,
        select: None,
        bytes_read: Default::default(),
        bar: ftk::cli::progress(0, "aggregating"),
        spans: {
            let mut v: Vec<(usize, usize)> = inp
                .origins
                .iter()
                .map(|o| o.file.span())
                .chain(inp.global.iter().map(|g| g.0.span()))
                .chain(inp.state.iter().map(|g| g.0.span()))
                .filter(|s| s.0 < s.1)
                .collect();
            v.sort_unstable();
            v
        },
        cpu_only: None,
    };
    // DP clipping scales.
    let mut clipped = None;
    if let Some(cn) = inp.clip {
        let sq = job.update_norms()?;
        let mut scale = vec![1.0; inp.origins.len()];
        let mut n = 0;
        for &i in active {
            let norm = sq[i].sqrt();
            // Flower: min(1, C / norm) (norm 0 gives inf, so 1).
            if norm > cn {
                scale[i] = cn / norm;
                n += 1;
            }
        }
        clipped = Some(n);
        job.dp = Some(Dp {
            scale,
            noise_std: 0.0,
            seed: c.seed,
        });
    }
    let noise_std = match (inp.noise, inp.clip) {
        (Some(z), Some(cn)) => Some(z * cn / clients_in as f64),
        // merge: inp.noise already holds z * C
        (Some(zc), None) => Some(zc / clients_in as f64),
        _ => None,
    };
    if let Some(std) = noise_std {
        let scale = job
            .dp
            .take()
            .map_or_else(|| vec![1.0; inp.origins.len()], |d| d.scale);
        job.dp = Some(Dp {
            scale,
            noise_std: std,
            seed: c.seed,
        });
    }
    // Krum / Bulyan selection.
    let mut selected = None;
    match s.kind {
        Kind::Krum { f, to_keep } => {
            let d = job.distances()?;
            let n_all = inp.origins.len();
            let scores = engine::krum_scores(&d, n_all, active, f);
            let mut mask = vec![false; n_all];
            if to_keep == 0 {
                mask[active[engine::argmin(&scores)]] = true;
            } else {
                if to_keep > active.len() {
                    return Err(Fault::Fatal(Error::input(format!(
                        "--to-keep {to_keep} exceeds the {} clients",
                        active.len()
                    ))));
                }
                let mut order: Vec<usize> = (0..active.len()).collect();
                order.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]));
                order[..to_keep]
                    .iter()
                    .for_each(|&k| mask[active[k]] = true);
                let w: f64 = active
                    .iter()
                    .filter(|&&i| mask[i])
                    .map(|&i| inp.origins[i].weight)
                    .sum();
                if w <= 0.0 {
                    return Err(Fault::Fatal(Error::input(
                        "the clients multikrum kept have num_examples summing to 0",
                    )));
                }
            }
            selected = Some(names_of(inp, &mask));
            job.select = Some(mask);
        }
        Kind::Bulyan { f } => {
            let n = active.len();
            if n < 4 * f + 3 {
                return Err(Fault::Fatal(Error::input(format!(
                    "bulyan needs at least 4*F+3 = {} clients for --num-malicious {f}, got {n}",
                    4 * f + 3
                ))));
            }
            let d = job.distances()?;
            let n_all = inp.origins.len();
            let mut remaining: Vec<usize> = active.to_vec();
            let mut mask = vec![false; n_all];
            for _ in 0..n - 2 * f {
                let scores = engine::krum_scores(&d, n_all, &remaining, f);
                let best = remaining.remove(engine::argmin(&scores));
                mask[best] = true;
            }
            selected = Some(names_of(inp, &mask));
            job.select = Some(mask);
        }
        _ => {}
    }
    // Writers: main output, partial, state.
    let out_specs: Vec<TensorSpec> = specs
        .iter()
        .map(|s| TensorSpec {
            name: s.name.clone(),
            dtype: s.dtype,
            shape: s.shape.clone(),
        })
        .collect();
    let out_w = match &c.output {
        Some(p) => Some(StreamWriter::create(p, &out_specs, None)?),
        None => None,
    };
    let part_w = match &c.partial_out {
        Some(p) => Some(partial_writer(p, inp, &specs, clients_in, active)?),
        None => None,
    };
    let slots = job.opt.state_slots();
    let (state_w, state_base) = match (&c.state, &c.output) {
        (Some(p), Some(_)) => {
            let mut st_specs = Vec::new();
            let mut base = Vec::new();
            for s in &specs {
                if cpu::is_int(s.dtype) || slots.is_empty() {
                    base.push(None);
                    continue;
                }
                base.push(Some(st_specs.len()));
                for slot in slots {
                    st_specs.push(TensorSpec {
                        name: format!("{slot}/{}", s.name),
                        dtype: Dtype::F32,
                        shape: s.shape.clone(),
                    });
                }
            }
            let mut meta = HashMap::new();
            meta.insert("ftk_state".to_string(), "fed-aggregate".to_string());
            meta.insert("strategy".to_string(), s.name.as_str().to_string());
            meta.insert("round".to_string(), inp.round.to_string());
            (Some(StreamWriter::create(p, &st_specs, Some(meta))?), base)
        }
        _ => (None, vec![None; specs.len()]),
    };
    let sinks = Sinks {
        out: out_w.as_ref(),
        partial: part_w.as_ref(),
        state: state_w.as_ref(),
        state_base,
    };
    match c.device.resolve()? {
        ftk::device::Device::Cuda(n) => cuda::finish(&mut job, &sinks, n)?,
        ftk::device::Device::Cpu => job.finish(&sinks)?,
    }
    job.bar.finish_and_clear();
    let mut finished = Vec::new();
    for w in [out_w, part_w, state_w].into_iter().flatten() {
        finished.push(w.finish()?);
    }
    Ok(Done {
        finished,
        specs: specs.len(),
        params: specs.iter().map(|s| s.numel as u64).sum(),
        bytes_read: job.bytes_read.load(Ordering::Relaxed),
        clients: active.len(),
        selected,
        clipped,
        noise_std,
    })
}

fn names_of(inp: &Inputs, mask: &[bool]) -> Vec<String> {
    mask.iter()
        .enumerate()
        .filter(|p| *p.1)
        .map(|(i, _)| inp.origins[i].cid.clone())
        .collect()
}

/// The previous state's tensor for each spec and slot.
fn state_tensors<'a>(
    inp: &'a Inputs,
    specs: &[Spec],
) -> std::result::Result<Vec<Vec<Option<Tensor<'a>>>>, Fault> {
    let slots = inp.strategy.opt().state_slots();
    let mut out = Vec::with_capacity(specs.len());
    for s in specs {
        let mut row = Vec::new();
        for slot in slots {
            let t = match &inp.state {
                Some((m, name)) if !cpu::is_int(s.dtype) => {
                    let key = format!("{slot}/{}", s.name);
                    let t = m.tensor(&key).ok_or_else(|| {
                        Fault::Fatal(Error::input(format!(
                            "state {name}: no tensor '{key}'; the state does not match these tensors (start a new state file)"
                        )))
                    })?;
                    if t.shape != s.shape.as_slice() || !ftk::tensors::is_float(t.dtype) {
                        return Err(Fault::Fatal(Error::input(format!(
                            "state {name}: tensor '{key}' is {:?} {:?}, expected a float tensor of shape {:?}",
                            t.dtype, t.shape, s.shape
                        ))));
                    }
                    Some(t)
                }
                _ => None,
            };
            row.push(t);
        }
        out.push(row);
    }
    Ok(out)
}

fn partial_writer(
    p: &Path,
    inp: &Inputs,
    specs: &[Spec],
    clients: u64,
    _active: &[usize],
) -> Result<StreamWriter> {
    let mut weights = serde_json::Map::new();
    let mut dtypes = serde_json::Map::new();
    for s in specs {
        // Tensors nobody here holds (FedRA) get weight 0: the merge keeps the global.
        let w = s.total_weight();
        weights.insert(s.name.clone(), json!(w));
        dtypes.insert(s.name.clone(), json!(s.dtype));
    }
    let mut meta = HashMap::new();
    meta.insert("ftk_partial".to_string(), "1".to_string());
    meta.insert(
        "strategy".to_string(),
        inp.strategy.name.as_str().to_string(),
    );
    meta.insert(
        "weighting".to_string(),
        inp.strategy.weighting().to_string(),
    );
    meta.insert("clients".to_string(), clients.to_string());
    meta.insert(
        "weights".to_string(),
        serde_json::Value::Object(weights).to_string(),
    );
    meta.insert(
        "dtypes".to_string(),
        serde_json::Value::Object(dtypes).to_string(),
    );
    if let Some(cn) = inp.clip {
        meta.insert("clip_norm".to_string(), format!("{cn:?}"));
    }
    let specs: Vec<TensorSpec> = specs
        .iter()
        .map(|s| TensorSpec {
            name: s.name.clone(),
            dtype: Dtype::F64,
            shape: s.shape.clone(),
        })
        .collect();
    StreamWriter::create(p, &specs, Some(meta))
}
