//! The command line: clap's types and the help text. [`crate::plan`] turns them into a
//! checked plan.

use crate::describe;
use clap::{Parser, Subcommand};
use std::path::PathBuf;

const AFTER_HELP: &str = "\
Reads a diffusers folder: unet/ and vae/ (config.json + diffusion_pytorch_model.safetensors)
and scheduler/scheduler_config.json. SD 1.x/2.x shapes (any sizes the configs describe,
linear projection, v-prediction).

Scheduler: the folder's class unless --scheduler names another; the config is read as
`<Class>.from_pretrained(model, subfolder=\"scheduler\")` (keys the class takes come from the
file, the rest are that class's defaults), the override flags are applied, then what
StableDiffusionPipeline's constructor does (steps_offset=1, clip_sample=false).

Conditioning: --prompt-embeds E.safetensors holds `prompt_embeds` [B or 1, L, D] and, for
guidance, `negative_prompt_embeds` (same shape). One file with --guidance-scale G > 1 is
classifier-free guidance exactly as diffusers: e = e_u + G (e_c - e_u). Several files give
several weighted conditions, e = e_u + sum_i w_i (e_i - e_u), with --guidance-scale w1,w2,...
(the unconditional embedding is the first file's negative_prompt_embeds).
--prompt TEXT (once, or once per sample) needs tokenizer/ and text_encoder/ in the folder and
encodes as diffusers' encode_prompt: transformers' CLIPTokenizer padded/truncated to
model_max_length, CLIPTextModel's last hidden state (--clip-skip k: layer n-k's, through the
final layer norm). It is the first condition (--prompt-embeds files follow) and its
--negative-prompt (default \"\", once or once per --prompt) is the unconditional embedding.

Initial noise: --latents L.safetensors (`latents` [B,4,h,w], scaled by the scheduler's init
sigma as diffusers does) or --seed S --batch B: sample j's seed is derived from (S, j) and
draws its initial latents and every scheduler noise from its own stream, so `--shard i/n`
array jobs produce exactly the rows of one unsharded run.

Output (-o): safetensors with `latents` (final latents, before decoding) and `images`
([B,3,H,W] in [0,1]); --png-dir writes index-numbered PNGs. One JSON line per sample on
stdout: {\"kind\":\"sample\",\"class\",\"client\",\"index\",\"path\",\"seed\"}.

FedCADO (--classifier C.safetensors --classifier-arch resnet18|resnet34|resnet50|json:FILE --class K):
torchvision ResNets are read from their state_dict names (conv1, bn1, layer1.0.conv1, ...,
downsample, fc; a prefix such as module.encoder. and a separate Linear head when fc is absent are
found), widths from the shapes; json:FILE (or a .json path) is a small layer list. At every step but
the last, z <- z - classifier-scale * grad_z [CE(f(x), K) + bn-weight * L_BN], where x is the
predicted x0 decoded by the VAE, clamped to [0,1], resized bicubically to --classifier-size and
CLIP-normalised, and L_BN sums ||running_var - var||_2 + ||running_mean - mean||_2 over the BN
layers' inputs; then the ordinary step at the edited z. --noise-edit-steps N first applies N such
updates with the BN term only at the first timestep (the authors' defaults: scale 1, 0.1, 10).

FedDISC (a Stable-unCLIP folder: UNet class_embed_type \"projection\", image_normalizer/,
image_noising_scheduler/): --image-embeds E.safetensors holds [rows, E] image embeddings or
FedDISC uploads [rows, 2E] (tensor --image-embeds-key, default image_embeds, else centroids, else
features; with --class, rows whose `labels` differ are dropped). Each sample's class label is
the embedding normalised, noised to --noise-level (DDPM add_noise, noise drawn from the sample's
seed or --image-embeds-noise FILE `noise` [samples, E]), unnormalised, then [x, emb(level)] for
a raw embedding (diffusers' StableUnCLIPImg2ImgPipeline) or [x, (emb(level) + old)/2] for an
upload (FedDISC's re-noising); rows are used for samples/rows consecutive samples. Guidance
labels the unconditional branch with zeros; each --global-embeds FILE (a client's uploads, their
mean used as given) adds FedDISC's third branch, sample j using file j mod n:
e = e_u + s (e_img - e_u) + s (e_glo - e_u). Defaults in this mode are FedDISC's: --steps 20,
--guidance-scale 2, --noise-level 200; the folder's scheduler config is used as the unCLIP
pipeline does (without StableDiffusionPipeline's steps_offset/clip_sample rewrite).

Devices: --device cuda[:N] runs the UNet, VAE, text encoder, classifiers and guidance gradients
on candle's CUDA backend, in a binary built with the cargo feature `cuda`
(tools/diffuse-synth/cuda/build.sh build); --dtype bf16|f16 holds the UNet and VAE in half
precision (f32 accumulation; latents, schedulers and gradients stay f32). auto uses a GPU when
the build, the driver and a device allow, else the CPU; cuda without them exits 2.

FedDEO: `diffuse-synth describe --model DIR --images X.safetensors --init E.safetensors -o D.safetensors`
learns a description [1,L,D] (SGD on the denoising loss, one image per step); pass it as a
second --prompt-embeds to generate with it (u + 3(text - u) + 3(description - u)).

Examples:
  diffuse-synth --model tiny-sd --prompt-embeds emb.safetensors --seed 7 --batch 8 \\
      --steps 20 --guidance-scale 3 -o out.safetensors --png-dir pngs > manifest.jsonl
  diffuse-synth --model sd15 --prompt \"a photo of a dog\" --negative-prompt blurry --seed 1 \\
      --batch 4 --steps 25 --guidance-scale 7.5 -o dogs.safetensors --png-dir dogs
  diffuse-synth --model tiny-sd --scheduler dpmpp-2m --karras --steps 10 \\
      --prompt-embeds emb.safetensors --seed 7 --batch 64 --shard 3/8 -o part3.safetensors
  diffuse-synth --model tiny-sd --prompt-embeds cls.safetensors --prompt-embeds desc.safetensors \\
      --guidance-scale 3,3 --seed 1 --batch 4 -o feddeo.safetensors
  diffuse-synth --model sd-folder --prompt-embeds cls.safetensors --classifier client.safetensors \\
      --classifier-arch resnet18 --class 4 --seed 1 --batch 8 -o fedcado.safetensors
  diffuse-synth --model sd21-unclip --prompt-embeds cls3.safetensors --image-embeds upload0.safetensors \\
      --class 3 --global-embeds upload0.safetensors --global-embeds upload1.safetensors \\
      --seed 1 --batch 50 -o feddisc.safetensors";

/// Stable Diffusion sampling with diffusers' schedulers, from diffusers weights.
#[derive(Parser, Debug)]
#[command(
    name = "diffuse-synth",
    version,
    after_help = AFTER_HELP,
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true
)]
pub struct Args {
    #[command(subcommand)]
    pub command: Option<Command>,
    /// diffusers model folder (unet/, vae/, scheduler/)
    #[arg(long, value_name = "DIR", required = true)]
    pub model: Option<PathBuf>,
    /// ddpm | ddim | pndm | euler | euler-ancestral | dpmpp-2m (default: the folder's)
    #[arg(long)]
    pub scheduler: Option<String>,
    /// number of inference steps [default: 50; 20 with --image-embeds (FedDISC)]
    #[arg(long)]
    pub steps: Option<usize>,
    /// DDIM's eta (0 = deterministic)
    #[arg(long, default_value_t = 0.0)]
    pub eta: f64,
    /// override: linear | scaled_linear | squaredcos_cap_v2
    #[arg(long)]
    pub beta_schedule: Option<String>,
    /// override: leading | trailing | linspace
    #[arg(long)]
    pub timestep_spacing: Option<String>,
    /// override: epsilon | v_prediction
    #[arg(long)]
    pub prediction_type: Option<String>,
    /// Karras sigmas (euler, dpmpp-2m)
    #[arg(long)]
    pub karras: bool,
    /// guidance scale(s), one per condition (one value applies to all)
    /// [default: 7.5; 2 with --image-embeds (FedDISC)]
    #[arg(long, value_delimiter = ',')]
    pub guidance_scale: Option<Vec<f64>>,
    /// safetensors with `prompt_embeds` (and `negative_prompt_embeds`); repeatable
    #[arg(long, value_name = "FILE", required_unless_present = "prompt")]
    pub prompt_embeds: Vec<PathBuf>,
    /// text prompt, encoded by the folder's tokenizer/ + text_encoder/: once for every
    /// sample, or once per sample (the first condition; --prompt-embeds files follow it)
    #[arg(long, value_name = "TEXT")]
    pub prompt: Vec<String>,
    /// negative prompt for guidance (default ""): once, or once per --prompt
    #[arg(long, value_name = "TEXT", requires = "prompt")]
    pub negative_prompt: Vec<String>,
    /// with --prompt: embed with the layer this many before the last (diffusers' clip_skip;
    /// as there, the negative prompt keeps the last layer)
    #[arg(long, default_value_t = 0, requires = "prompt")]
    pub clip_skip: usize,
    /// initial latents (`latents` [B,C,h,w]) instead of --seed/--batch
    #[arg(long, value_name = "FILE", conflicts_with_all = ["seed", "batch"])]
    pub latents: Option<PathBuf>,
    /// seed for the initial noise and scheduler noise
    #[arg(long)]
    pub seed: Option<u64>,
    /// number of samples (with --seed)
    #[arg(long)]
    pub batch: Option<usize>,
    /// image height in pixels (default: the UNet's sample_size x the VAE's factor)
    #[arg(long)]
    pub height: Option<usize>,
    /// image width in pixels
    #[arg(long)]
    pub width: Option<usize>,
    /// this job's slice: i/n (0-based i) of the samples
    #[arg(long, value_name = "i/n")]
    pub shard: Option<String>,
    /// scheduler noise from a file (`noise` [K,B,C,h,w]: the k-th draw uses noise[k]),
    /// to reproduce a run of diffusers' pipeline with the same draws
    #[arg(long, value_name = "FILE")]
    pub step_noise: Option<PathBuf>,
    /// output safetensors (`latents`, `images`)
    #[arg(short = 'o', long, value_name = "FILE", required = true)]
    pub output: Option<PathBuf>,
    /// also write PNGs here (<index>.png)
    #[arg(long, value_name = "DIR")]
    pub png_dir: Option<PathBuf>,
    /// no progress bar on stderr (shown only when stderr is a terminal)
    #[arg(long)]
    pub quiet: bool,
    /// Where the UNet and VAE run: auto (CUDA when a GPU is present and this build has
    /// CUDA support), cpu, cuda or cuda:N
    #[arg(long, default_value = "cpu")]
    pub device: ftk::device::DeviceArg,
    /// UNet and VAE weights and activations on CUDA: f32, bf16 or f16 (f32 accumulation;
    /// latents, schedulers and gradients stay f32); the CPU path is f32
    #[arg(long, default_value = "f32", value_parser = ["f32", "bf16", "f16"])]
    pub dtype: String,
    /// class label recorded in the manifest
    #[arg(long)]
    pub class: Option<i64>,
    /// client id recorded in the manifest
    #[arg(long)]
    pub client: Option<String>,
    /// FedCADO: client classifier weights (safetensors, PyTorch state_dict names)
    #[arg(long, value_name = "FILE", requires_all = ["classifier_arch", "class"])]
    pub classifier: Option<PathBuf>,
    /// FedCADO: classifier architecture: resnet18 | resnet34 | resnet50 (torchvision
    /// state_dict names) | json:FILE (a JSON layer list; a plain .json path works too)
    #[arg(long, value_name = "ARCH", requires = "classifier")]
    pub classifier_arch: Option<String>,
    /// FedCADO: step size of the gradient update on the latents
    #[arg(long, default_value_t = 1.0)]
    pub classifier_scale: f64,
    /// FedCADO: weight of the BN-statistics loss
    #[arg(long, default_value_t = 0.1)]
    pub bn_weight: f64,
    /// FedCADO: noise-editing iterations before sampling
    #[arg(long, default_value_t = 10)]
    pub noise_edit_steps: usize,
    /// What a sample ends as: `sample` runs every timestep (diffusers' pipelines);
    /// `x0` stops before the last timestep and keeps the last step's predicted x0
    /// (FedCADO's and FedDEO's generate_images.py). Default: x0 with --classifier
    /// (FedCADO), else sample.
    #[arg(long = "final", value_name = "WHAT", value_parser = ["sample", "x0"])]
    pub final_mode: Option<String>,
    /// FedCADO: classifier input size in pixels
    #[arg(long, default_value_t = 224)]
    pub classifier_size: usize,
    /// FedDISC / Stable unCLIP: image embeddings [rows, E] or uploads [rows, 2E] (the UNet's
    /// class labels; needs a UNet with class_embed_type "projection")
    #[arg(long, value_name = "FILE")]
    pub image_embeds: Option<PathBuf>,
    /// tensor to read from --image-embeds and --global-embeds
    /// [default: image_embeds, else centroids, else features, else the only tensor]
    #[arg(long, value_name = "NAME", requires = "image_embeds")]
    pub image_embeds_key: Option<String>,
    /// FedDISC: a client's uploads; their mean is a third guidance branch (repeatable:
    /// sample j uses file j mod n)
    #[arg(long, value_name = "FILE", requires = "image_embeds")]
    pub global_embeds: Vec<PathBuf>,
    /// noise level of the image-embedding augmentation (FedDISC: 200; diffusers' default: 0)
    #[arg(long, default_value_t = 200, requires = "image_embeds")]
    pub noise_level: usize,
    /// the augmentation noise from a file (`noise` [samples, E]) instead of the seed
    #[arg(long, value_name = "FILE", requires = "image_embeds")]
    pub image_embeds_noise: Option<PathBuf>,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// FedDEO: learn a description embedding on a client's images (denoising loss, SGD)
    Describe(describe::DescribeArgs),
}
