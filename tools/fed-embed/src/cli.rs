//! fed-embed's command line: the subcommands and the flag groups they
//! share. Each subcommand's own flags are in `cmd/<subcommand>.rs`.

use crate::cmd;
use crate::input::{self, Matrix};
use clap::{Parser, Subcommand};
use ftk::Result;
use std::path::PathBuf;

pub(crate) const AFTER_HELP: &str = "\
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
                delta) of the Gaussian mechanism per row (sensitivity 2C, analytic bound). The
                authors add no noise by default; the summary says what clipping and noise did
                to the rows, so the trade-off is visible before the upload is used.
FedAPT (arXiv 2211.07864; leondada/FedAPT):
  keys          frozen keys U[0,1) [domains, ctx, dim] (`keys`), one per client domain.
  adapt-weights z = W f (adapter `weight` [domains, D], no bias); z standardised with the
                unbiased variance over domains (scores in f64); w = softmax(z / 0.01), uniform
                when a sample's scores are all equal (the authors' code gives NaN); prompt =
                ctx * (1 + Sum_d w_d key_d) for ctx [M, dim] or class-specific [C, M, dim]. Tensors
                `weights`, `scores` [N, domains], `prompts` [N, (C,) M, dim].
pFedBayesPT (arXiv 2508.19621; no public code):
  prompt-sample generator MLP over [feature, eps], eps ~ N(0, I), run --samples M times per
                instance; `mean`, `var` (unbiased) [N, *prompt_shape]. See --arch below.

Summaries (one JSON line on stdout per run; --table prints them as a table):
  subspace      {\"kind\":\"fed_embed_subspace\",\"dim\",\"energy\",\"numerical_rank\",\"output\",\"rank\",
                 \"samples\",\"sigma_max\",\"sigma_r\"}
  d3a-weights   {\"kind\":\"fed_embed_d3a_weights\",\"clients\",\"output\",\"own_domain_top\" (with
                 domains),\"per_client\":[{\"basis\",\"client\",\"mean_cos\",\"mean_weight\",\"rank\",
                 \"top_teacher\"}],\"samples\",\"temperature\",\"top_k\"}
  ensemble      {\"kind\":\"fed_embed_ensemble\",\"classes\",\"combine\",\"mean_entropy\",\"output\",
                 \"samples\",\"teachers\",\"temperature\"}
  prototypes    {\"kind\":\"fed_embed_prototypes\",\"classes\",\"dim\",\"max_count\",\"min_count\",
                 \"output\",\"samples\"}
  pseudo-label  {\"kind\":\"fed_embed_pseudo_label\",\"accuracy\" (with true labels),\"classes\",
                 \"mean_confidence\",\"metric\",\"output\",\"rejected\",\"samples\"}
  cluster       {\"kind\":\"fed_embed_cluster\",\"centroid_rows\",\"classes\",\"dim\",\"inertia\",\"k\",
                 \"output\",\"raw_rows\",\"rows\",\"samples\",\"seed\",\"skipped_unlabelled\"}
  noise         {\"kind\":\"fed_embed_noise\",\"clip\",\"clipped_fraction\",\"clipped_rows\",\"delta\",
                 \"dim\",\"epsilon\",\"max_row_norm\",\"mean_norm_after\",\"mean_norm_before\",
                 \"mean_norm_clipped\",\"noise_multiplier\",\"noise_norm\",\"output\",\"rows\",\"seed\",
                 \"sensitivity\",\"sigma\",\"tensor\"}; the DP fields (clip .. sensitivity) only
                 with --clip. mean_norm_before/_clipped/_after are mean row norms of the input,
                 after clipping and of the upload; noise_norm is the mean norm of the noise
                 added to a row (about sigma·sqrt(D)): compare it with mean_norm_clipped.
  keys          {\"kind\":\"fed_embed_keys\",\"ctx\",\"dim\",\"domains\",\"output\",\"seed\"}
  adapt-weights {\"kind\":\"fed_embed_adapt_weights\",\"domains\",\"output\",\"prompts_shape\",
                 \"samples\",\"temperature\",\"top_domain_counts\"}
  prompt-sample {\"kind\":\"fed_embed_prompt_sample\",\"mc_samples\",\"mean_var\",\"output\",
                 \"output_kind\",\"prompt_shape\",\"samples\",\"seed\"}

Examples (a FedDISC round, then FedD3A):
  fed-embed prototypes --features server.safetensors -o protos.safetensors
  fed-embed pseudo-label --prototypes protos.safetensors --features client.safetensors -o pl.safetensors
  fed-embed cluster --features client.safetensors --labels pl.safetensors --k 5 --seed 0 -o c.safetensors
  fed-embed noise --features c.safetensors -o upload.safetensors   (the authors' default: no noise)
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
    Subspace(cmd::subspace::Args),
    /// FedD3A server: per-sample teacher weights from client subspaces.
    D3aWeights(cmd::d3a_weights::Args),
    /// Weighted teacher soft labels for distillation.
    Ensemble(cmd::ensemble::Args),
    /// FedDISC server: per-class prototypes from labelled features.
    Prototypes(cmd::prototypes::Args),
    /// FedDISC client: nearest-prototype pseudo-labels.
    PseudoLabel(cmd::pseudo_label::Args),
    /// FedDISC client: per-class k-means centroids (raw rows for small classes).
    Cluster(cmd::cluster::Args),
    /// FedDISC client: Gaussian noise on the shared vectors, with DP accounting.
    Noise(cmd::noise::Args),
    /// FedAPT server: frozen random keys, one per domain.
    Keys(cmd::keys::Args),
    /// FedAPT test time: adaptive domain weights and personalised prompts.
    AdaptWeights(cmd::adapt_weights::Args),
    /// pFedBayesPT: instance-wise prompt samples from a semi-implicit generator.
    PromptSample(cmd::prompt_sample::Args),
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
    /// The features file and its feature matrix.
    pub fn load(&self) -> Result<(ftk::tensors::TensorFile, Matrix)> {
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
