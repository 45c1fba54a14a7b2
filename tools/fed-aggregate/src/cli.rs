//! fed-aggregate's command line: the clap types, nothing else. [`crate::run`]
//! turns them into a checked plan (`Inputs`) and runs the library on it.

use crate::strategy::{self, Spec, StrategyFlags};
use clap::{Parser, Subcommand};
use std::path::PathBuf;

/// `--help`'s text up to the strategy table.
const HELP_HEAD: &str = "\
Input: JSON lines, one per client (other kinds are skipped; paths are relative to the
manifest's directory, or the working directory for stdin):
  {\"kind\":\"client_update\",\"cid\":\"7\",\"path\":\"c7.safetensors\",\"num_examples\":120}
Every client file holds the same tensor names, shapes and dtypes (else exit 2 naming the
client and tensor; --skip-bad drops such clients and lists them). Output keeps names and
dtypes. Summary to stdout, keys in alphabetical order; the fields from clip_norm to
flower_api and from partial to skipped appear only when they apply, ms unless --no-timing:
  {\"kind\":\"aggregate\",\"accumulator\":\"f64\",\"bytes_read\",\"clients\",\"clip_norm\",
   \"clipped\",\"dp\":{\"accounting\",\"delta\",\"epsilon\",\"noise_multiplier\",\"noise_std\"},
   \"eta_l\",\"flower_api\",\"ms\",\"params\",\"partial\",\"partials\",\"round\",
   \"selected\":[cid,...],\"skipped\":[{\"cid\",\"error\"},...],\"strategy\",\"tensors\"}

Strategies (Flower 1.x server math and defaults, to float32 rounding):
";

/// `--help`'s text after the strategy table.
const HELP_TAIL: &str = "\
--flower-api message reproduces Flower's Message-API strategies (flwr.serverapp.strategy,
Flower 1.21+) instead of the legacy ones: fedadam/fedadagrad default to --tau 1e-3, and
bulyan keeps the n-2F best scores of one Krum pass (select_multikrum) instead of n-2F
rounds of Krum. Everything else is the same math in both families. num_examples may be
fractional (the Message API weights by any numeric metric).
fedavgm (with momentum) and fedadam/fedyogi/fedadagrad need --global (this round's model) and
--state. The state records the rounds done and a digest of the global model it was written
with; a --global that does not match (another run's model, or a crash between the two
renames) is refused. A state is created only with --init-state (round 1); a missing
--state is an error. The output is renamed into place first, then the state: a crash
between the two leaves a pair the next run refuses; restore both from the previous round.

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

/// `fedra-alloc --help`'s record description.
const ALLOC_HELP: &str = "\
Output: one JSON line per client, clients in order; layers are the held global layers
(increasing), mask has a 1 at each of them:
  {\"kind\":\"fedra_alloc\",\"round\",\"client\",\"cid\",\"num_layers\",\"capacity\",
   \"layers\":[l,...],\"mask\":[0|1,...]}
Each client draws its layers uniformly without replacement from a seeded stream per
(round, client): the same --seed and --round give the same rows.

Example:
  fed-aggregate fedra-alloc --clients 6 --layers 12 --capacity 12,10,8,6,4,3 --round 1 --seed 0";

/// `--help`'s closing text; the strategy table comes from the registry.
fn after_help() -> String {
    format!("{HELP_HEAD}{}{HELP_TAIL}", strategy::help_table())
}

/// Federated aggregation of client updates (Flower's strategies, FedRA,
/// mergeable partials) in constant memory.
#[derive(Parser, Debug)]
#[command(
    name = "fed-aggregate",
    version,
    about,
    after_help = after_help(),
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
    #[command(after_help = ALLOC_HELP)]
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
    /// Seed of the draws (every random choice takes one).
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
    #[arg(long, value_parser = strategy::NameParser)]
    pub strategy: Option<&'static Spec>,
    #[command(flatten)]
    pub flags: StrategyFlags,
    /// Current global parameters (server optimisers, DP clipping, FedRA).
    #[arg(long, value_name = "G")]
    pub global: Option<PathBuf>,
    /// Server optimiser state: read, checked against --global (round and
    /// digest) and rewritten with the output.
    #[arg(long, value_name = "S")]
    pub state: Option<PathBuf>,
    /// Start a new optimiser state at --state (round 1), replacing any file
    /// there. Without it a missing --state is an error, so a typo cannot
    /// silently restart the optimiser.
    #[arg(long)]
    pub init_state: bool,
    /// Leave the timing field ("ms") out of the summary, so that the same
    /// inputs give the same bytes.
    #[arg(long)]
    pub no_timing: bool,
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
