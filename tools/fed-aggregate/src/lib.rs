//! fed-aggregate: the server step of federated learning as a Unix tool.
//! Flower's strategies computed exactly, streaming over memory-mapped client
//! files in constant memory; FedRA layer allocation and aggregation;
//! personalised (local-only) tensors; mergeable partial sums for trees of
//! scheduler jobs; server-side DP with fixed clipping.

pub mod cli;
pub mod cpu;
pub mod cuda;
pub mod engine;
pub mod fedra;
pub mod flower_api;
pub mod plan;
pub mod strategy;

pub use cli::{AllocArgs, Args, Command, Common, MergeArgs};
use engine::{Dp, Job, Sinks};
use ftk::cli::Stdout;
use ftk::dp;
use ftk::output::Output;
use ftk::records::{Aggregate, DpReport, SkippedClient};
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
use strategy::{Kind, Strategy};

/// The summary's statement of what its (epsilon, delta) covers.
const DP_ACCOUNTING: &str =
    "per round, analytic Gaussian mechanism, add/remove one client, no sampling amplification";

/// Placeholder for the state's `global_digest` until the output is written;
/// as long as [`ftk::tensors::digest`]'s result.
const DIGEST_PENDING: &str = "------------------------";

pub fn run(args: Args) -> Result<()> {
    let mut out = Stdout::new();
    let (summary, table) = match &args.command {
        Some(Command::FedraAlloc(a)) => return alloc(a, &mut out),
        Some(Command::Merge(m)) => (merge(m)?, m.common.table),
        None => (aggregate(&args)?, args.common.table),
    };
    if table {
        let mut t = ftk::table::Table::new(["field", "value"]);
        let v = serde_json::to_value(&summary)
            .map_err(|e| Error::internal(format!("summary to JSON: {e}")))?;
        if let serde_json::Value::Object(m) = &v {
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
    // Each client's record holds its layer list and mask (up to 9 bytes a
    // layer) plus ~128 bytes; all are drawn before printing.
    ftk::size::check_memory(
        &format!("--clients {} x --layers {}", a.clients, a.layers),
        (a.layers as u64)
            .checked_mul(9)
            .and_then(|b| b.checked_add(128))
            .and_then(|b| b.checked_mul(a.clients as u64)),
    )?;
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
            "--partial-out works only for the linear strategies ({}); {} needs every client's values at once",
            Strategy::mergeable_names(),
            s.name()
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
            s.name()
        ),
        None => None,
    };
    let slots = s.opt().state_slots();
    if !slots.is_empty() && c.state.is_none() && c.output.is_some() {
        bail!(
            "--strategy {} keeps server state between rounds: give --state S.safetensors (with --init-state in round 1)",
            s.name()
        );
    }
    if let (Some(p), None) = (&c.state, &c.output) {
        // Only the run that applies the server step reads and writes the
        // state; ignoring it here would hide a pipeline wired wrongly.
        bail!(
            "--state {}: the optimiser state is read and written only by the run that writes the model (-o); a --partial-out run only sums clients: drop --state here and give it to the final run",
            p.display()
        );
    }
    if c.init_state && c.state.is_none() {
        bail!("--init-state needs --state S.safetensors (the file to create)");
    }
    let mut round = 1;
    let state = match &c.state {
        Some(p) if !c.init_state && !p.exists() && c.output.is_some() => bail!(
            "--state {}: no such file; a new optimiser state starts only with --init-state (round 1); check the path",
            p.display()
        ),
        Some(p) if !c.init_state && c.output.is_some() => {
            let m = Mapped::open(p).map_err(|e| ctx("state", e))?;
            let name = p.display().to_string();
            let meta = m.metadata().cloned().unwrap_or_default();
            if meta.get("ftk_state").map(String::as_str) != Some("fed-aggregate") {
                bail!("state {name}: not a fed-aggregate state file (no ftk_state metadata); give the --state file of the previous round, or --init-state to start one");
            }
            let st = meta.get("strategy").cloned().unwrap_or_default();
            if st != s.name() {
                bail!(
                    "state {name}: written by --strategy {st}, not {}; start a new state file",
                    s.name()
                );
            }
            let done: u64 = meta
                .get("round")
                .and_then(|r| r.parse().ok())
                .ok_or_else(|| {
                    Error::input(format!("state {name}: bad or missing \"round\" metadata"))
                })?;
            round = done + 1;
            if let (Some(want), Some((g, gname))) = (meta.get("global_digest"), &global) {
                let have = ftk::tensors::tensors_digest(g.bytes())?;
                if *want != have {
                    bail!(
                        "state {name}: written with the global model of round {done} (digest {want}), but --global {gname} has digest {have}: not the model this state belongs to (another run's model, or a crash between writing the model and the state); give the matching pair, or start a new state with --init-state"
                    );
                }
            }
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

fn aggregate(args: &Args) -> Result<Aggregate> {
    let c = &args.common;
    let Some(spec) = c.strategy else {
        bail!(
            "--strategy NAME is required ({}; see --help)",
            strategy::names()
        );
    };
    let strategy = Strategy::new(spec, &c.flags)?;
    check_outputs(c, &strategy)?;
    let keep = keep_regex(c)?;
    let fedra_parts = if spec.layer_alloc {
        let Some(a) = &args.alloc else {
            bail!(
                "--strategy {} needs --alloc ALLOC.jsonl (from `fed-aggregate fedra-alloc`)",
                spec.name
            );
        };
        if c.clip_norm.is_some() {
            bail!("--clip-norm is not supported with --strategy {}", spec.name);
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
    if c.clip_norm.is_some() && c.global.is_none() {
        bail!("--clip-norm clips each client's update against the current model: give --global G.safetensors");
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
            need_global: need_global || spec.layer_alloc && c.global.is_some(),
            fill_from_global: spec.layer_alloc,
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

fn merge(m: &MergeArgs) -> Result<Aggregate> {
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
    for (o, p) in origins.iter().zip(&metas) {
        if p.strategy != recorded {
            bail!(
                "{}: written by --strategy {}, but {} by {recorded}; merge partials of one strategy",
                o.label,
                p.strategy,
                origins[0].label
            );
        }
    }
    let mut owner: HashMap<&str, &str> = HashMap::new();
    for (o, p) in origins.iter().zip(&metas) {
        for cid in p.cids.iter().flatten() {
            if let Some(prev) = owner.insert(cid, &o.label) {
                bail!(
                    "client '{cid}' is in both {prev} and {}; each client may be counted once (the same partial given twice, or overlapping manifests)",
                    o.label
                );
            }
        }
    }
    let spec = match c.strategy {
        Some(s) => s,
        None => strategy::by_name(&recorded).ok_or_else(|| {
            Error::input(format!(
                "{}: unknown strategy '{recorded}'",
                origins[0].label
            ))
        })?,
    };
    let strategy = Strategy::new(spec, &c.flags)?;
    check_outputs(c, &strategy)?;
    for (o, p) in origins.iter().zip(&metas) {
        if p.weighting != strategy.weighting() {
            bail!(
                "{}: weighted by {}, but --strategy {} weights by {}",
                o.label,
                p.weighting,
                spec.name,
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
    if spec.layer_alloc && global.is_none() && c.output.is_some() {
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
            fill_from_global: spec.layer_alloc,
        },
        skip_bad: false,
        clip: None,
        noise: c.noise_multiplier.map(|z| z * clip.unwrap_or(0.0)),
        merged_clients: Some(merged),
    };
    let mut v = execute(&inputs, c)?;
    v.partials = Some(m.partials.len() as u64);
    v.clip_norm = v.clip_norm.or(clip);
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

fn execute(inp: &Inputs, c: &Common) -> Result<Aggregate> {
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
    let skipped: Vec<SkippedClient> = inp
        .skipped
        .iter()
        .cloned()
        .chain(
            bad.iter()
                .map(|(i, e)| (inp.origins[*i].cid.clone(), e.clone())),
        )
        .map(|(cid, error)| SkippedClient { cid, error })
        .collect();
    let s = &inp.strategy;
    let dp = done.noise_std.map(|noise_std| {
        let z = c.noise_multiplier.unwrap_or(0.0);
        DpReport {
            accounting: DP_ACCOUNTING.to_string(),
            delta: c.dp_delta,
            epsilon: dp::epsilon(z, c.dp_delta),
            noise_multiplier: z,
            noise_std,
        }
    });
    Ok(Aggregate {
        accumulator: "f64".to_string(),
        bytes_read: done.bytes_read,
        clients: inp.merged_clients.unwrap_or(done.clients as u64),
        clip_norm: inp.clip,
        clipped: inp.clip.and(done.clipped.map(|n| n as u64)),
        dp,
        eta_l: s.eta_l,
        flower_api: (s.api == flower_api::FlowerApi::Message).then(|| s.api.as_str().to_string()),
        kind: Default::default(),
        ms: (!c.no_timing).then(|| t0.elapsed().as_millis() as u64),
        params: done.params,
        partial: c.partial_out.as_ref().map(|p| p.display().to_string()),
        partials: None,
        round: (s.opt().needs_global() || c.state.is_some()).then_some(inp.round),
        selected: done.selected,
        skipped: (!skipped.is_empty()).then_some(skipped),
        strategy: s.name().to_string(),
        tensors: done.specs as u64,
    })
}

fn attempt(inp: &Inputs, c: &Common, active: &[usize]) -> std::result::Result<Done, Fault> {
    let specs = plan::build(
        &inp.origins,
        active,
        inp.global.as_ref().map(|(m, n)| (m, n.as_str())),
        &inp.layout,
    )?;
    if specs.is_empty() {
        if let Some(k) = &c.keep_local {
            return Err(Fault::Fatal(Error::input(format!(
                "--keep-local '{k}' matches every tensor: nothing is left to aggregate; narrow the pattern"
            ))));
        }
    }
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
    let (clipped, noise_std) = dp_setup(inp, c, active, clients_in, &mut job)?;
    let selected = select_robust(inp, active, &mut job)?;
    let w = Writers::open(inp, c, &specs, clients_in, active, &job)?;
    let sinks = Sinks {
        out: w.out.as_ref(),
        partial: w.part.as_ref(),
        state: w.state.as_ref(),
        state_base: w.state_base.clone(),
    };
    match c.device.resolve()? {
        ftk::device::Device::Cuda(n) => cuda::finish(&mut job, &sinks, n)?,
        ftk::device::Device::Cpu => job.finish(&sinks)?,
    }
    job.bar.finish_and_clear();
    let finished = w.finish()?;
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

/// Server-side DP (Flower's fixed clipping): each client's scale, and the
/// noise std for the result. Returns (clients clipped, noise std).
fn dp_setup(
    inp: &Inputs,
    c: &Common,
    active: &[usize],
    clients_in: u64,
    job: &mut Job,
) -> std::result::Result<(Option<usize>, Option<f64>), Fault> {
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
    Ok((clipped, noise_std))
}

/// Krum / MultiKrum / Bulyan: choose the clients the aggregate keeps, and
/// return their ids (None for the other strategies).
fn select_robust(
    inp: &Inputs,
    active: &[usize],
    job: &mut Job,
) -> std::result::Result<Option<Vec<String>>, Fault> {
    let s = &inp.strategy;
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
            let mask = s.api.bulyan_select(&d, inp.origins.len(), active, f);
            selected = Some(names_of(inp, &mask));
            job.select = Some(mask);
        }
        _ => {}
    }
    Ok(selected)
}

/// The outputs of one attempt: main output, partial, state, opened before
/// the pass and finished together after it.
struct Writers {
    out: Option<StreamWriter>,
    part: Option<StreamWriter>,
    state: Option<StreamWriter>,
    state_base: Vec<Option<usize>>,
}

impl Writers {
    fn open(
        inp: &Inputs,
        c: &Common,
        specs: &[Spec],
        clients_in: u64,
        active: &[usize],
        job: &Job,
    ) -> std::result::Result<Writers, Fault> {
        let s = &inp.strategy;
        let out_specs: Vec<TensorSpec> = specs
            .iter()
            .map(|s| TensorSpec {
                name: s.name.clone(),
                dtype: s.dtype,
                shape: s.shape.clone(),
            })
            .collect();
        let out_w = match &c.output {
            // -o may be --global itself: the documented in-place update.
            Some(p) => Some(StreamWriter::on(
                Output::create_in_place(p, c.global.as_deref())?,
                &out_specs,
                None,
            )?),
            None => None,
        };
        let part_w = match &c.partial_out {
            Some(p) => Some(partial_writer(p, inp, specs, clients_in, active)?),
            None => None,
        };
        let slots = job.opt.state_slots();
        let (state_w, state_base) = match (&c.state, &c.output) {
            (Some(p), Some(_)) => {
                let mut st_specs = Vec::new();
                let mut base = Vec::new();
                for s in specs {
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
                meta.insert("strategy".to_string(), s.name().to_string());
                meta.insert("round".to_string(), inp.round.to_string());
                // Filled in once the output is complete (same length).
                meta.insert("global_digest".to_string(), DIGEST_PENDING.to_string());
                // Replaced in place only when it was read as the state: a new
                // state (--init-state) over a client or --global would destroy it.
                let read = (!c.init_state).then_some(p.as_path());
                let out = Output::create_in_place(p, read)?;
                (Some(StreamWriter::on(out, &st_specs, Some(meta))?), base)
            }
            _ => (None, vec![None; specs.len()]),
        };
        Ok(Writers {
            out: out_w,
            part: part_w,
            state: state_w,
            state_base,
        })
    }

    /// Finish every output; the state records the digest of the output.
    fn finish(self) -> Result<Vec<Finished>> {
        // The output first: the state records its digest.
        let mut finished = Vec::new();
        let mut digest = None;
        if let Some(w) = self.out {
            let f = w.finish()?;
            digest = Some(ftk::tensors::digest_file(f.file())?);
            finished.push(f);
        }
        if let Some(w) = self.part {
            finished.push(w.finish()?);
        }
        if let Some(w) = self.state {
            if let Some(d) = &digest {
                w.patch_metadata("global_digest", DIGEST_PENDING, d)?;
            }
            finished.push(w.finish()?);
        }
        Ok(finished)
    }
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
    active: &[usize],
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
    meta.insert("strategy".to_string(), inp.strategy.name().to_string());
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
    // Who is in it, so a merge can refuse counting a client twice.
    let mut cids: Vec<&str> = Vec::new();
    for &i in active {
        let o = &inp.origins[i];
        match &o.partial {
            Some(p) => cids.extend(p.cids.iter().flatten().map(String::as_str)),
            None => cids.push(&o.cid),
        }
    }
    meta.insert("cids".to_string(), json!(cids).to_string());
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
