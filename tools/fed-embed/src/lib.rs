//! fed-embed: feature-space federated learning as Unix tools. Server- and
//! client-side numerics of FedD3A (subspaces, per-sample teacher weights,
//! weighted ensembles), FedDISC (prototypes, pseudo-labels, per-class
//! k-means, upload noise), FedAPT (keys, adaptive prompt weights) and
//! pFedBayesPT (semi-implicit prompt sampling) over safetensors feature
//! matrices, with JSON-lines summaries.

pub mod apt;
pub mod bayes;
pub mod d3a;
pub mod input;
pub mod kmeans;
pub mod noise;
pub mod proto;
pub mod subspace;

use clap::{Parser, Subcommand};
use ftk::cli::Stdout;
use ftk::table::Table;
use ftk::tensors::{write_safetensors, OutTensor};
use ftk::{bail, Result};
use input::Matrix;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

const AFTER_HELP: &str = "\
Inputs are safetensors: a feature matrix is a float tensor [N, D] named `features`
(F16/BF16/F32/F64; --tensor picks another; a file holding one tensor needs no name), labels
an integer tensor `labels` [N] in the same file or in --labels FILE. Outputs (-o) are F32/I64
safetensors written atomically; a JSON-lines summary goes to stdout (--table: a table).
Bad input (non-finite values, wrong shapes or dtypes, truncated files, missing tensors, zero
clients, k > samples) exits 2 with one line naming the file and tensor, and writes nothing.

FedD3A (arXiv 2210.02190; no public code, so the weighting is ftk's, stated exactly):
  subspace      client: orthonormal basis U [D, r] (`basis`) of span(features): top-r right
                singular vectors (uncentred), by --rank r or the smallest r with --energy share of
                sum(sigma^2); also `singular_values`. Only U leaves the client, never the data.
  d3a-weights   server: per sample x and client k, cos(theta) = |U_k^T x| / |x| and discrepancy
                d = sin^2(theta) = 1 - cos^2 (share of x's energy outside the client's subspace);
                weights w_k = softmax(-d_k / T) over the --top-k least-discrepant clients (all by
                default), 0 for the others. Why: the paper selects, per server sample, only the
                clients of similar domains as teachers; softmax(-d/T) does that with one knob:
                T -> 0 (--temperature 0) is hard selection of the most similar domain (ties
                share), T -> inf the uniform ensemble of plain ensemble distillation (FedDF).
                sin^2 is bounded and scale-free, so one T works at any feature scale. Default
                T = 0.1. Tensors: `weights`, `similarity` (cos), `discrepancy` [N, K].
  ensemble      distillation targets: Sum_k w_k softmax(z_k / T) (--combine probs, default) or
                softmax(Sum_k w_k z_k / T) (--combine logits); `soft_labels` [N, C].
FedDISC (arXiv 2305.04063; MingzhaoYang/FedDISC):
  prototypes    per-class mean features (`prototypes` [C, D], `counts` [C]).
  pseudo-label  nearest prototype: --metric euclidean (authors) or cosine; `labels` [N] I64,
                `confidence` [N] = softmax(score / --temperature) at the label, score = -|f-p|^2
                or cos; --min-confidence sets label -1 below the threshold. If the features file
                has true `labels`, the summary reports accuracy.
  cluster       per pseudo-class c with n_c members: n_c > K: k-means (sklearn Lloyd, greedy
                k-means++ from --seed, --max-iter 100 as the authors, --tol 1e-4, --n-init 1 =
                sklearn >= 1.4 'auto'; the authors' sklearn used 10), upload K centroids;
                0 < n_c <= K: upload the raw features; label -1 samples are skipped. Without
                labels: one k-means over all rows. Tensors `centroids` [M, D], `sizes` [M],
                `labels` [M] (class, -1 without labels), `assign` [N] (row of each sample).
  noise         add N(0, sigma^2) to the shared tensor (`centroids`, else `features`); with
                --clip C rows are first clipped to L2 norm C and the summary gives the (epsilon,
                delta) of the Gaussian mechanism per row (sensitivity 2C, analytic bound).
FedAPT (arXiv 2211.07864; leondada/FedAPT):
  keys          frozen keys U[0,1) [domains, ctx, dim] (`keys`), one per client domain.
  adapt-weights z = W f (adapter `weight` [domains, D], no bias); z standardised with the
                unbiased variance over domains; w = softmax(z / 0.01); prompt = ctx * (1 +
                Sum_d w_d key_d) for ctx [M, dim] or class-specific [C, M, dim]. Tensors
                `weights`, `scores` [N, domains], `prompts` [N, (C,) M, dim].
pFedBayesPT (arXiv 2508.19621; no public code):
  prompt-sample generator MLP over [feature, eps], eps ~ N(0, I), run --samples M times per
                instance; `mean`, `var` (unbiased) [N, *prompt_shape]. See --arch below.

Examples (a FedDISC round, then FedD3A):
  fed-embed prototypes --features server.safetensors -o protos.safetensors
  fed-embed pseudo-label --prototypes protos.safetensors --features client.safetensors -o pl.safetensors
  fed-embed cluster --features client.safetensors --labels pl.safetensors --k 5 --seed 0 -o c.safetensors
  fed-embed noise --features c.safetensors --clip 10 --sigma 2 --seed 0 -o upload.safetensors
  fed-embed subspace --features client1.safetensors --energy 0.95 -o b1.safetensors
  fed-embed d3a-weights --basis b1.safetensors --basis b2.safetensors --features server.safetensors -o w.safetensors --table
  fed-embed ensemble --weights w.safetensors --logits t1.safetensors t2.safetensors --temperature 3 -o soft.safetensors";

/// Feature-space federated learning: FedD3A, FedDISC, FedAPT, pFedBayesPT.
#[derive(Parser, Debug)]
#[command(name = "fed-embed", version, about, after_help = AFTER_HELP)]
pub struct Args {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// FedD3A client: orthonormal basis of the feature subspace.
    Subspace(SubspaceArgs),
    /// FedD3A server: per-sample teacher weights from client subspaces.
    D3aWeights(D3aArgs),
    /// Weighted teacher soft labels for distillation.
    Ensemble(EnsembleArgs),
    /// FedDISC server: per-class prototypes from labelled features.
    Prototypes(ProtoArgs),
    /// FedDISC client: nearest-prototype pseudo-labels.
    PseudoLabel(PseudoArgs),
    /// FedDISC client: per-class k-means centroids (raw rows for small classes).
    Cluster(ClusterArgs),
    /// FedDISC client: Gaussian noise on the shared vectors, with DP accounting.
    Noise(NoiseArgs),
    /// FedAPT server: frozen random keys, one per domain.
    Keys(KeysArgs),
    /// FedAPT test time: adaptive domain weights and personalised prompts.
    AdaptWeights(AdaptArgs),
    /// pFedBayesPT: instance-wise prompt samples from a semi-implicit generator.
    PromptSample(PromptArgs),
}

/// Flags every subcommand with a feature input shares.
#[derive(clap::Args, Debug)]
pub struct Feat {
    /// Feature matrix [N, D] (safetensors).
    #[arg(long, value_name = "F")]
    pub features: PathBuf,
    /// Name of the feature tensor.
    #[arg(long, value_name = "NAME", default_value = "features")]
    pub tensor: String,
}

impl Feat {
    fn explicit(&self) -> bool {
        self.tensor != "features"
    }
    fn load(&self) -> Result<(ftk::tensors::TensorFile, Matrix)> {
        input::features(&self.features, &self.tensor, self.explicit())
    }
}

#[derive(clap::Args, Debug)]
pub struct Out {
    /// Output safetensors (written atomically).
    #[arg(short = 'o', long = "output", value_name = "OUT")]
    pub output: PathBuf,
    /// Print an aligned table instead of the JSON summary line.
    #[arg(long)]
    pub table: bool,
}

#[derive(clap::Args, Debug)]
pub struct SubspaceArgs {
    #[command(flatten)]
    pub feat: Feat,
    /// Keep exactly r directions.
    #[arg(long, conflicts_with = "energy", required_unless_present = "energy")]
    pub rank: Option<usize>,
    /// Keep the fewest directions whose share of sum(sigma^2) reaches this (0, 1].
    #[arg(long)]
    pub energy: Option<f64>,
    #[command(flatten)]
    pub out: Out,
}

#[derive(clap::Args, Debug)]
pub struct D3aArgs {
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

#[derive(clap::Args, Debug)]
pub struct EnsembleArgs {
    /// Teacher weights [N, K] (tensor `weights`, from d3a-weights); uniform if absent.
    #[arg(long, value_name = "W")]
    pub weights: Option<PathBuf>,
    /// Teacher logits, one file per client in the weights' client order (tensor `logits` [N, C]).
    #[arg(long, value_name = "L", num_args = 1.., required = true)]
    pub logits: Vec<PathBuf>,
    /// Name of the logits tensor.
    #[arg(long, value_name = "NAME", default_value = "logits")]
    pub logits_tensor: String,
    /// Distillation temperature.
    #[arg(long, default_value_t = 1.0)]
    pub temperature: f64,
    /// Average probabilities (probs) or logits (logits).
    #[arg(long, value_enum, default_value_t = d3a::Combine::Probs)]
    pub combine: d3a::Combine,
    #[command(flatten)]
    pub out: Out,
}

#[derive(clap::Args, Debug)]
pub struct ProtoArgs {
    #[command(flatten)]
    pub feat: Feat,
    /// Labels file (tensor `labels`); default: the features file's `labels`.
    #[arg(long, value_name = "L")]
    pub labels: Option<PathBuf>,
    /// Number of classes (default: largest label + 1).
    #[arg(long)]
    pub classes: Option<usize>,
    #[command(flatten)]
    pub out: Out,
}

#[derive(clap::Args, Debug)]
pub struct PseudoArgs {
    /// Prototypes [C, D] (tensor `prototypes`).
    #[arg(long, value_name = "P")]
    pub prototypes: PathBuf,
    #[command(flatten)]
    pub feat: Feat,
    #[arg(long, value_enum, default_value_t = proto::Metric::Euclidean)]
    pub metric: proto::Metric,
    /// Temperature of the confidence softmax over class scores.
    #[arg(long, default_value_t = 1.0)]
    pub temperature: f64,
    /// Label samples below this confidence -1 (skipped by `cluster`).
    #[arg(long, value_name = "P")]
    pub min_confidence: Option<f64>,
    #[command(flatten)]
    pub out: Out,
}

#[derive(clap::Args, Debug)]
pub struct ClusterArgs {
    #[command(flatten)]
    pub feat: Feat,
    /// Pseudo-labels (tensor `labels`, -1 = skip); default: the features file's `labels`.
    #[arg(long, value_name = "L")]
    pub labels: Option<PathBuf>,
    /// Ignore any `labels` tensor in the features file: one k-means over all rows.
    #[arg(long, conflicts_with = "labels")]
    pub no_labels: bool,
    /// Clusters per class (the authors' K = 5).
    #[arg(long, default_value_t = 5)]
    pub k: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long, default_value_t = 100)]
    pub max_iter: usize,
    /// Relative tolerance (times the mean feature variance), as sklearn.
    #[arg(long, default_value_t = 1e-4)]
    pub tol: f64,
    /// k-means++ restarts; the lowest inertia wins.
    #[arg(long, default_value_t = 1)]
    pub n_init: usize,
    /// Initial centroids [K, D] (tensor `centroids`) instead of k-means++;
    /// only without labels.
    #[arg(long, value_name = "C")]
    pub init: Option<PathBuf>,
    #[command(flatten)]
    pub out: Out,
}

#[derive(clap::Args, Debug)]
pub struct NoiseArgs {
    /// File with the vectors to share (other tensors are copied unchanged).
    #[arg(long, value_name = "F")]
    pub features: PathBuf,
    /// Tensor to noise (default: `centroids` if present, else `features`).
    #[arg(long, value_name = "NAME")]
    pub tensor: Option<String>,
    /// Noise standard deviation (the authors' beta; 0 = none).
    #[arg(long, default_value_t = 0.0)]
    pub sigma: f64,
    /// Clip each row to this L2 norm first, and report (epsilon, delta).
    #[arg(long, value_name = "C")]
    pub clip: Option<f64>,
    /// delta for the reported epsilon.
    #[arg(long, default_value_t = 1e-5)]
    pub delta: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[command(flatten)]
    pub out: Out,
}

#[derive(clap::Args, Debug)]
pub struct KeysArgs {
    /// Number of client domains.
    #[arg(long)]
    pub domains: usize,
    /// Context tokens per prompt (the authors' --gctx, 24).
    #[arg(long, default_value_t = 24)]
    pub ctx: usize,
    /// Token width (CLIP ViT-B/32 text width 512).
    #[arg(long, default_value_t = 512)]
    pub dim: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[command(flatten)]
    pub out: Out,
}

#[derive(clap::Args, Debug)]
pub struct AdaptArgs {
    /// Keys [domains, M, dim] (tensor `keys`).
    #[arg(long, value_name = "K")]
    pub keys: PathBuf,
    /// Global prompt context [M, dim] or [C, M, dim] (tensor `ctx`).
    #[arg(long, value_name = "P")]
    pub prompt: PathBuf,
    /// Adapter weight [domains, D] (tensor `weight`, nn.Linear layout).
    #[arg(long, value_name = "A")]
    pub adapter: PathBuf,
    #[command(flatten)]
    pub feat: Feat,
    /// Softmax temperature on the standardised scores (authors: 0.01).
    #[arg(long, default_value_t = 0.01)]
    pub temperature: f64,
    /// Write only `weights` and `scores`, not the [N, ...] prompts.
    #[arg(long)]
    pub weights_only: bool,
    #[command(flatten)]
    pub out: Out,
}

#[derive(clap::Args, Debug)]
pub struct PromptArgs {
    /// Generator weights (safetensors).
    #[arg(long, value_name = "G")]
    pub generator: PathBuf,
    /// Architecture JSON: {"noise_dim": n, "prompt_shape": [L, P], "output": "mean" |
    /// "mean_logvar", "layers": [{"weight": NAME, "bias": NAME, "activation":
    /// "relu"|"tanh"|"sigmoid"|"silu"|"gelu_tanh"|"identity"}, ...]}.
    #[arg(long, value_name = "JSON")]
    pub arch: PathBuf,
    #[command(flatten)]
    pub feat: Feat,
    /// Monte-Carlo samples per instance.
    #[arg(long, default_value_t = 16)]
    pub samples: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Explicit noise instead of --seed: tensors `eps` [M, N, noise_dim] and,
    /// for mean_logvar, `eta` [M, N, width] (for checking against PyTorch).
    #[arg(long, value_name = "E")]
    pub noise: Option<PathBuf>,
    /// Also write every sample (`samples` [M, N, ...]).
    #[arg(long)]
    pub write_samples: bool,
    #[command(flatten)]
    pub out: Out,
}

pub fn run(args: Args) -> Result<()> {
    let mut out = Stdout::new();
    let (summary, table, as_table) = match &args.command {
        Command::Subspace(a) => (cmd_subspace(a)?, None, a.out.table),
        Command::D3aWeights(a) => {
            let (s, t) = cmd_d3a(a)?;
            (s, Some(t), a.out.table)
        }
        Command::Ensemble(a) => (cmd_ensemble(a)?, None, a.out.table),
        Command::Prototypes(a) => {
            let (s, t) = cmd_prototypes(a)?;
            (s, Some(t), a.out.table)
        }
        Command::PseudoLabel(a) => {
            let (s, t) = cmd_pseudo(a)?;
            (s, Some(t), a.out.table)
        }
        Command::Cluster(a) => {
            let (s, t) = cmd_cluster(a)?;
            (s, Some(t), a.out.table)
        }
        Command::Noise(a) => (cmd_noise(a)?, None, a.out.table),
        Command::Keys(a) => (cmd_keys(a)?, None, a.out.table),
        Command::AdaptWeights(a) => (cmd_adapt(a)?, None, a.out.table),
        Command::PromptSample(a) => (cmd_prompt(a)?, None, a.out.table),
    };
    if as_table {
        match table {
            Some(t) => t.print(&mut out)?,
            None => kv_table(&summary).print(&mut out)?,
        }
    } else {
        ftk::jsonl::write_record(&mut out, &summary)?;
    }
    out.flush()
}

fn kv_table(v: &Value) -> Table {
    let mut t = Table::new(["field", "value"]);
    if let Value::Object(m) = v {
        for (k, v) in m {
            let v = match v {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            t.row(vec![k.clone(), v]);
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

fn save(path: &Path, op: &str, tensors: &[OutTensor<'_>]) -> Result<()> {
    write_safetensors(path, tensors, meta(op))
}

fn f4(v: f64) -> String {
    format!("{v:.4}")
}

fn cmd_subspace(a: &SubspaceArgs) -> Result<Value> {
    let rank = match (a.rank, a.energy) {
        (Some(r), _) => subspace::Rank::Fixed(input::positive("--rank", r)?),
        (None, Some(e)) => subspace::Rank::Energy(input::in_range("--energy", e, 0.0, 1.0, true)?),
        (None, None) => bail!("give --rank r or --energy e"),
    };
    let (_f, x) = a.feat.load()?;
    let what = format!("{}: tensor '{}'", a.feat.features.display(), a.feat.tensor);
    let s = subspace::fit(&x, rank, &what)?;
    let sv: Vec<f32> = s.singular[..s.rank].iter().map(|&v| v as f32).collect();
    save(
        &a.out.output,
        "subspace",
        &[
            s.basis.out("basis"),
            OutTensor::f32("singular_values", vec![s.rank], &sv),
        ],
    )?;
    Ok(json!({
        "kind": "fed_embed_subspace",
        "samples": x.rows,
        "dim": x.cols,
        "rank": s.rank,
        "energy": s.energy,
        "numerical_rank": s.numerical_rank,
        "sigma_max": s.singular[0],
        "sigma_r": s.singular[s.rank - 1],
        "output": a.out.output.display().to_string(),
    }))
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

fn cmd_d3a(a: &D3aArgs) -> Result<(Value, Table)> {
    if !(a.temperature.is_finite() && a.temperature >= 0.0) {
        bail!("--temperature must be >= 0, got {}", a.temperature);
    }
    let k = a.bases.len();
    if k == 0 {
        bail!("give at least one --basis (zero clients)");
    }
    let top_k = match a.top_k {
        Some(t) if t == 0 || t > k => {
            bail!("--top-k must be in 1..={k} (the number of --basis files), got {t}")
        }
        Some(t) => t,
        None => k,
    };
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
    let mut sim = Matrix::zeros(n, k);
    let mut disc = Matrix::zeros(n, k);
    for (j, u) in bases.iter().enumerate() {
        let c = subspace::cosines(&x, u);
        for (i, &ci) in c.iter().enumerate() {
            sim.data[i * k + j] = ci as f32;
            disc.data[i * k + j] = (1.0 - ci * ci).max(0.0) as f32;
        }
    }
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
    // Per client: mean weight, mean cos, how often it is the top teacher.
    let mut top = vec![0u64; k];
    for i in 0..n {
        let r = w.row(i);
        let mut b = 0;
        for j in 1..k {
            if r[j] > r[b] {
                b = j;
            }
        }
        top[b] += 1;
    }
    let mean_col = |m: &Matrix, j: usize, rows: &[usize]| {
        rows.iter()
            .map(|&i| f64::from(m.data[i * k + j]))
            .sum::<f64>()
            / rows.len().max(1) as f64
    };
    let all: Vec<usize> = (0..n).collect();
    let clients: Vec<Value> = (0..k)
        .map(|j| {
            json!({
                "client": j,
                "basis": a.bases[j].display().to_string(),
                "rank": bases[j].cols,
                "mean_weight": mean_col(&w, j, &all),
                "mean_cos": mean_col(&sim, j, &all),
                "top_teacher": top[j],
            })
        })
        .collect();
    let mut head = vec!["domain".to_string(), "samples".to_string()];
    head.extend((0..k).map(|j| format!("w[{j}]")));
    let mut t = Table::new(head);
    let mut groups: Vec<(String, Vec<usize>)> = vec![];
    let mut matched = None;
    if let Some(dom) = &domains {
        let nd = dom.iter().copied().max().unwrap_or(0) as usize + 1;
        for d in 0..nd {
            let rows: Vec<usize> = (0..n).filter(|&i| dom[i] as usize == d).collect();
            if !rows.is_empty() {
                groups.push((d.to_string(), rows));
            }
        }
        // Share of samples whose top teacher is their own domain's client.
        let hit = (0..n)
            .filter(|&i| {
                let r = w.row(i);
                let b = (0..k).fold(0, |b, j| if r[j] > r[b] { j } else { b });
                dom[i] as usize == b
            })
            .count();
        matched = Some(hit as f64 / n as f64);
    }
    groups.push(("all".into(), all.clone()));
    for (name, rows) in &groups {
        let mut row = vec![name.clone(), rows.len().to_string()];
        row.extend((0..k).map(|j| f4(mean_col(&w, j, rows))));
        t.row(row);
    }
    let mut s = json!({
        "kind": "fed_embed_d3a_weights",
        "samples": n,
        "clients": k,
        "temperature": a.temperature,
        "top_k": top_k,
        "per_client": clients,
        "output": a.out.output.display().to_string(),
    });
    if let Some(m) = matched {
        s["own_domain_top"] = json!(m);
    }
    Ok((s, t))
}

fn cmd_ensemble(a: &EnsembleArgs) -> Result<Value> {
    if !(a.temperature.is_finite() && a.temperature > 0.0) {
        bail!("--temperature must be > 0, got {}", a.temperature);
    }
    let explicit = a.logits_tensor != "logits";
    let mut logits = Vec::with_capacity(a.logits.len());
    for p in &a.logits {
        let f = input::open(p)?;
        let m = input::matrix_in(&f, &a.logits_tensor, explicit, "[N, C] (teacher logits)")?;
        if let Some(first) = logits.first() {
            let first: &Matrix = first;
            if (m.rows, m.cols) != (first.rows, first.cols) {
                bail!(
                    "{}: logits are [{}, {}] but {} has [{}, {}]; every teacher must score the same samples and classes",
                    p.display(),
                    m.rows,
                    m.cols,
                    a.logits[0].display(),
                    first.rows,
                    first.cols
                );
            }
        }
        logits.push(m);
    }
    let (n, c, k) = (logits[0].rows, logits[0].cols, logits.len());
    let w = match &a.weights {
        Some(p) => {
            let f = input::open(p)?;
            let w = input::matrix_in(&f, "weights", false, "[N, K] (teacher weights)")?;
            if (w.rows, w.cols) != (n, k) {
                bail!(
                    "{}: tensor 'weights' is [{}, {}], but there are {n} samples and {k} teachers (--logits files)",
                    p.display(),
                    w.rows,
                    w.cols
                );
            }
            if let Some(i) = w.data.iter().position(|&v| v < 0.0) {
                bail!(
                    "{}: tensor 'weights': negative weight at row {}, teacher {}",
                    p.display(),
                    i / k,
                    i % k
                );
            }
            w
        }
        None => Matrix::new(n, k, vec![1.0 / k as f32; n * k]),
    };
    let soft = d3a::ensemble(&logits, &w, a.temperature, a.combine);
    save(&a.out.output, "ensemble", &[soft.out("soft_labels")])?;
    let ent = soft
        .data
        .chunks(c)
        .map(|r| {
            -r.iter()
                .filter(|&&p| p > 0.0)
                .map(|&p| f64::from(p) * f64::from(p).ln())
                .sum::<f64>()
        })
        .sum::<f64>()
        / n as f64;
    Ok(json!({
        "kind": "fed_embed_ensemble",
        "samples": n,
        "classes": c,
        "teachers": k,
        "temperature": a.temperature,
        "combine": format!("{:?}", a.combine).to_lowercase(),
        "mean_entropy": ent,
        "output": a.out.output.display().to_string(),
    }))
}

fn cmd_prototypes(a: &ProtoArgs) -> Result<(Value, Table)> {
    let (f, x) = a.feat.load()?;
    let Some(labels) = input::optional_labels(&f, a.labels.as_deref(), "labels", x.rows, 0)? else {
        bail!(
            "{}: no tensor named 'labels' (prototypes need labelled server features); add one or pass --labels FILE",
            a.feat.features.display()
        );
    };
    let max = labels.iter().copied().max().unwrap_or(0) as usize;
    let classes = match a.classes {
        Some(c) => input::positive("--classes", c)?,
        None => max + 1,
    };
    if max >= classes {
        bail!("label {max} is out of range for --classes {classes}");
    }
    let (p, counts) = proto::prototypes(&x, &labels, classes)?;
    save(
        &a.out.output,
        "prototypes",
        &[
            p.out("prototypes"),
            OutTensor::i64("counts", vec![classes], &counts),
        ],
    )?;
    let mut t = Table::new(["class", "samples", "norm"]);
    for (c, count) in counts.iter().enumerate() {
        let norm = p
            .row(c)
            .iter()
            .map(|&v| f64::from(v).powi(2))
            .sum::<f64>()
            .sqrt();
        t.row(vec![c.to_string(), count.to_string(), f4(norm)]);
    }
    Ok((
        json!({
            "kind": "fed_embed_prototypes",
            "samples": x.rows,
            "dim": x.cols,
            "classes": classes,
            "min_count": counts.iter().min(),
            "max_count": counts.iter().max(),
            "output": a.out.output.display().to_string(),
        }),
        t,
    ))
}

fn cmd_pseudo(a: &PseudoArgs) -> Result<(Value, Table)> {
    if !(a.temperature.is_finite() && a.temperature > 0.0) {
        bail!("--temperature must be > 0, got {}", a.temperature);
    }
    if let Some(m) = a.min_confidence {
        input::in_range("--min-confidence", m, 0.0, 1.0, false)?;
    }
    let pf = input::open(&a.prototypes)?;
    let p = input::matrix_in(&pf, "prototypes", false, "[C, D] (class prototypes)")?;
    let (f, x) = a.feat.load()?;
    if p.cols != x.cols {
        bail!(
            "{}: prototypes have dimension {} but the features have {}; both must come from the same feature extractor",
            a.prototypes.display(),
            p.cols,
            x.cols
        );
    }
    let truth = match f.get("labels") {
        Some(t) => Some(input::labels(&t, x.rows, 0)?),
        None => None,
    };
    let mut l = proto::pseudo_label(&x, &p, a.metric, a.temperature);
    let mut rejected = 0;
    if let Some(m) = a.min_confidence {
        for (lab, &c) in l.labels.iter_mut().zip(&l.confidence) {
            if f64::from(c) < m {
                *lab = -1;
                rejected += 1;
            }
        }
    }
    let n = x.rows;
    save(
        &a.out.output,
        "pseudo-label",
        &[
            OutTensor::i64("labels", vec![n], &l.labels),
            OutTensor::f32("confidence", vec![n], &l.confidence),
        ],
    )?;
    let classes = p.rows;
    let mut t = Table::new(["class", "assigned", "mean_conf", "correct"]);
    let mut correct_total = 0usize;
    for c in 0..classes {
        let idx: Vec<usize> = (0..n).filter(|&i| l.labels[i] == c as i64).collect();
        let conf =
            idx.iter().map(|&i| f64::from(l.confidence[i])).sum::<f64>() / idx.len().max(1) as f64;
        let correct = truth
            .as_ref()
            .map(|tr| idx.iter().filter(|&&i| tr[i] == c as i64).count());
        correct_total += correct.unwrap_or(0);
        t.row(vec![
            c.to_string(),
            idx.len().to_string(),
            f4(conf),
            correct.map_or("-".into(), |v| v.to_string()),
        ]);
    }
    let mut s = json!({
        "kind": "fed_embed_pseudo_label",
        "samples": n,
        "classes": classes,
        "metric": format!("{:?}", a.metric).to_lowercase(),
        "rejected": rejected,
        "mean_confidence": l.confidence.iter().map(|&v| f64::from(v)).sum::<f64>() / n as f64,
        "output": a.out.output.display().to_string(),
    });
    if truth.is_some() {
        s["accuracy"] = json!(correct_total as f64 / n as f64);
    }
    Ok((s, t))
}

fn cmd_cluster(a: &ClusterArgs) -> Result<(Value, Table)> {
    let k = input::positive("--k", a.k)?;
    input::positive("--max-iter", a.max_iter)?;
    input::positive("--n-init", a.n_init)?;
    if !(a.tol.is_finite() && a.tol >= 0.0) {
        bail!("--tol must be >= 0, got {}", a.tol);
    }
    let (f, x) = a.feat.load()?;
    let labels = if a.no_labels {
        None
    } else {
        input::optional_labels(&f, a.labels.as_deref(), "labels", x.rows, -1)?
    };
    let init = match &a.init {
        Some(p) => {
            if labels.is_some() {
                bail!("--init gives one set of centroids, so it works only without labels (pass --no-labels, or drop --init)");
            }
            let f = input::open(p)?;
            let c = input::matrix_in(&f, "centroids", false, "[K, D] (initial centroids)")?;
            if c.rows != k || c.cols != x.cols {
                bail!(
                    "{}: initial centroids are [{}, {}], expected [--k {k}, {}]",
                    p.display(),
                    c.rows,
                    c.cols,
                    x.cols
                );
            }
            Some(c)
        }
        None => None,
    };
    let opts = kmeans::Opts {
        k,
        max_iter: a.max_iter,
        tol: a.tol,
        n_init: a.n_init,
    };
    let d = x.cols;
    // Groups: (class, member rows).
    let groups: Vec<(i64, Vec<usize>)> = match &labels {
        None => {
            if k > x.rows {
                bail!(
                    "{}: --k {k} is more than the {} samples; lower --k",
                    a.feat.features.display(),
                    x.rows
                );
            }
            vec![(-1, (0..x.rows).collect())]
        }
        Some(l) => {
            let c = l.iter().copied().max().unwrap_or(-1);
            (0..=c)
                .map(|c| (c, (0..x.rows).filter(|&i| l[i] == c).collect::<Vec<_>>()))
                .filter(|(_, r)| !r.is_empty())
                .collect()
        }
    };
    let mut cents: Vec<f32> = vec![];
    let mut sizes: Vec<i64> = vec![];
    let mut classes: Vec<i64> = vec![];
    let mut assign = vec![-1i64; x.rows];
    let mut t = Table::new([
        "class",
        "members",
        "rows_sent",
        "sent_as",
        "inertia",
        "iters",
    ]);
    let mut total_inertia = 0f64;
    let (mut raw_rows, mut centroid_rows) = (0usize, 0usize);
    let bar = ftk::cli::progress(groups.len() as u64, "k-means");
    for (c, rows) in &groups {
        let base = sizes.len() as i64;
        if labels.is_some() && rows.len() <= k {
            // The authors upload small classes' raw features.
            for (j, &i) in rows.iter().enumerate() {
                cents.extend_from_slice(x.row(i));
                sizes.push(1);
                classes.push(*c);
                assign[i] = base + j as i64;
            }
            raw_rows += rows.len();
            t.row(vec![
                c.to_string(),
                rows.len().to_string(),
                rows.len().to_string(),
                "raw".into(),
                "0".into(),
                "-".into(),
            ]);
        } else {
            let sub = if rows.len() == x.rows {
                x.clone()
            } else {
                let mut m = Matrix::zeros(rows.len(), d);
                for (j, &i) in rows.iter().enumerate() {
                    m.row_mut(j).copy_from_slice(x.row(i));
                }
                m
            };
            let mut rng = ftk::rng::stream(a.seed, (*c + 1) as u64);
            let fit = kmeans::fit(&sub, &opts, init.as_ref(), &mut rng);
            let mut sz = vec![0i64; k];
            for (j, &l) in fit.labels.iter().enumerate() {
                sz[l as usize] += 1;
                assign[rows[j]] = base + i64::from(l);
            }
            cents.extend_from_slice(&fit.centers.data);
            sizes.extend_from_slice(&sz);
            classes.extend(std::iter::repeat_n(*c, k));
            centroid_rows += k;
            total_inertia += fit.inertia;
            t.row(vec![
                c.to_string(),
                rows.len().to_string(),
                k.to_string(),
                "centroids".into(),
                f4(fit.inertia),
                fit.iters.to_string(),
            ]);
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    let m = sizes.len();
    save(
        &a.out.output,
        "cluster",
        &[
            OutTensor::f32("centroids", vec![m, d], &cents),
            OutTensor::i64("sizes", vec![m], &sizes),
            OutTensor::i64("labels", vec![m], &classes),
            OutTensor::i64("assign", vec![x.rows], &assign),
        ],
    )?;
    let skipped = assign.iter().filter(|&&v| v < 0).count();
    Ok((
        json!({
            "kind": "fed_embed_cluster",
            "samples": x.rows,
            "dim": d,
            "k": k,
            "classes": groups.len(),
            "rows": m,
            "centroid_rows": centroid_rows,
            "raw_rows": raw_rows,
            "skipped_unlabelled": skipped,
            "inertia": total_inertia,
            "seed": a.seed,
            "output": a.out.output.display().to_string(),
        }),
        t,
    ))
}

fn cmd_noise(a: &NoiseArgs) -> Result<Value> {
    if !(a.sigma.is_finite() && a.sigma >= 0.0) {
        bail!("--sigma must be >= 0, got {}", a.sigma);
    }
    if let Some(c) = a.clip {
        if !(c.is_finite() && c > 0.0) {
            bail!("--clip must be > 0, got {c}");
        }
    }
    input::in_range("--delta", a.delta, 0.0, 1.0, true)?;
    let f = input::open(&a.features)?;
    let name = match &a.tensor {
        Some(t) => input::pick(&f, t, true)?,
        None if f.get("centroids").is_some() => "centroids".to_string(),
        None => input::pick(&f, "features", false)?,
    };
    let mut x = input::matrix(&f.require(&name)?, "[N, D] (vectors to share)")?;
    let r = noise::apply(&mut x, a.sigma, a.clip, a.seed);
    let mut out: Vec<OutTensor> = vec![x.out(&name)];
    let names = f.names();
    for n in &names {
        if *n != name {
            let t = f.require(n)?;
            out.push(OutTensor {
                name: n.clone(),
                dtype: t.dtype,
                shape: t.shape.to_vec(),
                data: t.data.into(),
            });
        }
    }
    save(&a.out.output, "noise", &out)?;
    let mut s = json!({
        "kind": "fed_embed_noise",
        "tensor": name,
        "rows": x.rows,
        "dim": x.cols,
        "sigma": a.sigma,
        "max_row_norm": r.max_norm,
        "seed": a.seed,
        "output": a.out.output.display().to_string(),
    });
    if let Some(c) = a.clip {
        let sens = 2.0 * c;
        s["clip"] = json!(c);
        s["clipped_rows"] = json!(r.clipped_rows);
        s["sensitivity"] = json!(sens);
        s["noise_multiplier"] = json!(a.sigma / sens);
        s["delta"] = json!(a.delta);
        s["epsilon"] = match fed_aggregate::dp::epsilon(a.sigma / sens, a.delta) {
            Some(e) => json!(e),
            None => Value::Null,
        };
    }
    Ok(s)
}

fn cmd_keys(a: &KeysArgs) -> Result<Value> {
    let d = input::positive("--domains", a.domains)?;
    let m = input::positive("--ctx", a.ctx)?;
    let w = input::positive("--dim", a.dim)?;
    let k = apt::keys(d, m, w, a.seed);
    save(
        &a.out.output,
        "keys",
        &[OutTensor::f32("keys", vec![d, m, w], &k)],
    )?;
    Ok(json!({
        "kind": "fed_embed_keys",
        "domains": d,
        "ctx": m,
        "dim": w,
        "seed": a.seed,
        "output": a.out.output.display().to_string(),
    }))
}

fn cmd_adapt(a: &AdaptArgs) -> Result<Value> {
    if !(a.temperature.is_finite() && a.temperature > 0.0) {
        bail!("--temperature must be > 0, got {}", a.temperature);
    }
    let kf = input::open(&a.keys)?;
    let (kshape, keys) = input::floats_in(&kf, "keys", false, "[domains, M, dim] (keys)")?;
    if kshape.len() != 3 {
        bail!(
            "{}: tensor 'keys' must be [domains, M, dim], got {kshape:?}",
            a.keys.display()
        );
    }
    let af = input::open(&a.adapter)?;
    let w = input::matrix_in(
        &af,
        "weight",
        false,
        "[domains, D] (adapter weight, nn.Linear layout)",
    )?;
    let (_f, x) = a.feat.load()?;
    let domains = kshape[0];
    if w.rows != domains {
        bail!(
            "{}: adapter has {} outputs but {} holds {domains} keys; there must be one score per domain",
            a.adapter.display(),
            w.rows,
            a.keys.display()
        );
    }
    if domains < 2 {
        bail!(
            "{}: {domains} domain: standardising scores needs at least 2 domains",
            a.keys.display()
        );
    }
    if w.cols != x.cols {
        bail!(
            "{}: adapter takes {} inputs but the features have {}",
            a.adapter.display(),
            w.cols,
            x.cols
        );
    }
    let (z, wt) = apt::weights(&x, &w, a.temperature);
    let n = x.rows;
    let mut out = vec![wt.out("weights"), z.out("scores")];
    let mut pshape = vec![];
    if !a.weights_only {
        let pf = input::open(&a.prompt)?;
        let (cshape, ctx) = input::floats_in(
            &pf,
            "ctx",
            false,
            "[M, dim] or [C, M, dim] (prompt context)",
        )?;
        let tail_ok = cshape.len() >= 2 && cshape[cshape.len() - 2..] == kshape[1..];
        if !tail_ok || cshape.len() > 3 {
            bail!(
                "{}: prompt context {cshape:?} does not match the keys' [M, dim] = {:?}; expected [M, dim] or [C, M, dim]",
                a.prompt.display(),
                &kshape[1..]
            );
        }
        let p = apt::prompts(&ctx, &keys, &wt);
        pshape = std::iter::once(n).chain(cshape.iter().copied()).collect();
        out.push(OutTensor::f32("prompts", pshape.clone(), &p));
    }
    save(&a.out.output, "adapt-weights", &out)?;
    let mut hist = vec![0u64; domains];
    for i in 0..n {
        let r = wt.row(i);
        let b = (0..domains).fold(0, |b, j| if r[j] > r[b] { j } else { b });
        hist[b] += 1;
    }
    Ok(json!({
        "kind": "fed_embed_adapt_weights",
        "samples": n,
        "domains": domains,
        "temperature": a.temperature,
        "top_domain_counts": hist,
        "prompts_shape": pshape,
        "output": a.out.output.display().to_string(),
    }))
}

fn cmd_prompt(a: &PromptArgs) -> Result<Value> {
    let m = input::positive("--samples", a.samples)?;
    let text = ftk::io::read_text(&a.arch)?;
    let arch: bayes::Arch = serde_json::from_str(&text).map_err(|e| {
        ftk::Error::input(format!("{}: bad architecture JSON: {e}", a.arch.display()))
    })?;
    if arch.layers.is_empty() || arch.prompt_shape.is_empty() || arch.prompt_shape.contains(&0) {
        bail!(
            "{}: need at least one layer and a non-empty prompt_shape without zeros",
            a.arch.display()
        );
    }
    let gf = input::open(&a.generator)?;
    let mut layers = vec![];
    for l in &arch.layers {
        let w = input::matrix_in(&gf, &l.weight, true, "[out, in] (nn.Linear weight)")?;
        let b = match &l.bias {
            Some(bn) => {
                let n = input::pick(&gf, bn, true)?;
                Some(input::floats(&gf.require(&n)?, "[out] (bias)")?)
            }
            None => None,
        };
        layers.push(bayes::Layer {
            w,
            b,
            act: l.activation,
        });
    }
    let width: usize = arch.prompt_shape.iter().product();
    let g = bayes::Generator {
        arch: arch.clone(),
        layers,
        width,
    };
    let what = format!("{} + {}", a.arch.display(), a.generator.display());
    let (_f, x) = a.feat.load()?;
    g.check(x.cols, &what)?;
    let n = x.rows;
    let nd = arch.noise_dim;
    let logvar = arch.output == bayes::Output::MeanLogvar;
    let explicit = match &a.noise {
        Some(p) => {
            let f = input::open(p)?;
            let (es, e) = input::floats_in(&f, "eps", true, "[M, N, noise_dim]")?;
            if es != [m, n, nd] {
                bail!(
                    "{}: tensor 'eps' is {es:?}, expected [--samples {m}, {n}, {nd}]",
                    p.display()
                );
            }
            let h = if logvar {
                let (hs, h) = input::floats_in(&f, "eta", true, "[M, N, width]")?;
                if hs != [m, n, width] {
                    bail!(
                        "{}: tensor 'eta' is {hs:?}, expected [{m}, {n}, {width}]",
                        p.display()
                    );
                }
                h
            } else {
                vec![]
            };
            Some((e, h))
        }
        None => None,
    };
    let mut mom = bayes::Moments::new(n * width);
    let mut all = if a.write_samples {
        Vec::with_capacity(m * n * width)
    } else {
        vec![]
    };
    for s in 0..m {
        let (e, h) = match &explicit {
            Some((e, h)) => (
                e[s * n * nd..(s + 1) * n * nd].to_vec(),
                if logvar {
                    h[s * n * width..(s + 1) * n * width].to_vec()
                } else {
                    vec![]
                },
            ),
            None => bayes::draw(a.seed, s, n, nd, width, logvar),
        };
        let psi = g.forward(&x, &e);
        let p = bayes::sample(&psi, &h, arch.output, width);
        mom.push(&p);
        if a.write_samples {
            all.extend_from_slice(&p);
        }
    }
    let (mean, var) = mom.finish();
    let shape: Vec<usize> = std::iter::once(n)
        .chain(arch.prompt_shape.iter().copied())
        .collect();
    let mut out = vec![
        OutTensor::f32("mean", shape.clone(), &mean),
        OutTensor::f32("var", shape.clone(), &var),
    ];
    if a.write_samples {
        let s: Vec<usize> = std::iter::once(m).chain(shape.iter().copied()).collect();
        out.push(OutTensor::f32("samples", s, &all));
    }
    save(&a.out.output, "prompt-sample", &out)?;
    let mean_var = var.iter().map(|&v| f64::from(v)).sum::<f64>() / var.len() as f64;
    Ok(json!({
        "kind": "fed_embed_prompt_sample",
        "samples": n,
        "mc_samples": m,
        "prompt_shape": arch.prompt_shape,
        "output_kind": if logvar { "mean_logvar" } else { "mean" },
        "mean_var": mean_var,
        "seed": a.seed,
        "output": a.out.output.display().to_string(),
    }))
}
