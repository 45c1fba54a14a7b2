//! chunk-run: a real MoE training step (router, top-k, SwiGLU experts,
//! forward + backward) under none / full / chunked (MemFine FCDA) / auto
//! (MACT) recompute, with MEASURED peak memory and throughput.
//!
//! `cli` holds the flags, `drive` the loop over modes and steps that
//! measures and prints, `step` one training step written against the
//! `Engine` trait, `moe` (CPU) and `gpu` (CUDA) the engines, `predict`
//! mem-plan's model of the same network, `weights` the safetensors I/O.

pub use ftk::linalg;
pub mod cli;
mod drive;
pub mod gpu;
pub mod moe;
pub mod predict;
pub mod sizes;
pub mod step;
pub mod weights;

pub use cli::Args;
use drive::Run;
use ftk::device::Device;
use ftk::model::ModelConfig;
use ftk::records::{self, RouteHist};
use ftk::routing::LayerModel;
use ftk::tensors::TensorFile;
use ftk::{Error, Result};
use moe::{LayerT, LayerW, Shape};
use step::CpuEngine;

fn resolve_shape(a: &Args, wfile: Option<&TensorFile>, tokens: usize) -> Result<Shape> {
    let model = a.model.as_deref().map(ModelConfig::from_file).transpose()?;
    let moe = model.as_ref().and_then(|m| m.moe.clone());
    if let (Some(m), None) = (&model, &moe) {
        ftk::bail!(
            "{}: model '{}' has no experts",
            a.model.as_ref().unwrap().display(),
            m.arch
        );
    }
    let from_file = match wfile {
        Some(f) => Some(weights::infer_shape(
            f,
            &weights::layer_prefix(&a.prefix, 0),
        )?),
        None => None,
    };
    let pick = |flag: Option<usize>,
                file: Option<usize>,
                cfg: Option<usize>,
                name: &str|
     -> Result<usize> {
        let v = file.or(flag).or(cfg).ok_or_else(|| {
            // A weights file gives the sizes, never top-k (no tensor holds it).
            let from = if name == "topk" {
                "--model config.json; a weights file does not record it"
            } else {
                "--model config.json / --weights"
            };
            Error::input(format!("--{name} is needed (or {from})"))
        })?;
        if let (Some(fl), Some(fi)) = (flag, file) {
            if fl != fi {
                ftk::bail!("--{name} {fl} disagrees with the weights file ({fi})");
            }
        }
        if v == 0 {
            ftk::bail!("--{name} must be at least 1");
        }
        Ok(v)
    };
    let m = model.as_ref();
    let hidden = pick(
        a.hidden,
        from_file.map(|x| x.0),
        m.map(|m| m.hidden as usize),
        "hidden",
    )?;
    let ffn = pick(
        a.ffn,
        from_file.map(|x| x.1),
        moe.as_ref().map(|x| x.expert_ffn as usize),
        "ffn",
    )?;
    let experts = pick(
        a.experts,
        from_file.map(|x| x.2),
        moe.as_ref().map(|x| x.experts as usize),
        "experts",
    )?;
    let topk = pick(a.topk, None, moe.as_ref().map(|x| x.topk as usize), "topk")?;
    if topk > experts {
        ftk::bail!("--topk {topk} exceeds the {experts} experts");
    }
    let norm_topk_prob = a
        .norm_topk_prob
        .or(moe.as_ref().map(|x| x.norm_topk_prob))
        .unwrap_or(true);
    Ok(Shape {
        tokens,
        hidden,
        ffn,
        experts,
        topk,
        norm_topk_prob,
    })
}

/// Forced routing for every layer: [T·k] expert ids each.
fn forced_routing(a: &Args, sh: &Shape) -> Result<Option<Vec<Vec<u32>>>> {
    let models: Vec<LayerModel> = if let Some(skew) = a.synthetic {
        (0..a.layers())
            .map(|l| LayerModel::new(skew, sh.experts, a.seed, l as u64))
            .collect()
    } else if let Some(p) = &a.route {
        let input = ftk::io::Input::open(p)?;
        let mut r = ftk::jsonl::Reader::new(input.name.clone(), input.reader);
        let mut by_layer: std::collections::BTreeMap<u64, Vec<f64>> = Default::default();
        while let Some(h) = records::next::<RouteHist, _>(&mut r)? {
            if h.counts.len() != sh.experts {
                ftk::bail!(
                    "{}: histogram has {} counts but the block has {} experts",
                    r.here(),
                    h.counts.len(),
                    sh.experts
                );
            }
            let counts = h.counts.iter().map(|&c| c as f64).collect();
            by_layer.entry(h.layer).or_insert(counts);
        }
        if by_layer.is_empty() {
            ftk::bail!("{}: no route_hist records", input.name);
        }
        let layers: Vec<&Vec<f64>> = by_layer.values().collect();
        (0..a.layers())
            .map(|l| LayerModel::from_weights(layers[l % layers.len()]))
            .collect()
    } else {
        return Ok(None);
    };
    let (t, k) = (sh.tokens, sh.topk);
    let mut chosen = Vec::with_capacity(k);
    Ok(Some(
        models
            .iter()
            .enumerate()
            .map(|(l, m)| {
                let mut r = LayerModel::stream(a.seed, [l as u64, 0, 0]);
                let mut ids = Vec::with_capacity(t * k);
                for _ in 0..t {
                    m.draw_token(&mut r, sh.experts, k, &mut chosen);
                    ids.extend(chosen.iter().map(|&e| e as u32));
                }
                ids
            })
            .collect(),
    ))
}

/// Run the tool.
pub fn run(mut a: Args) -> Result<()> {
    a.check()?;
    if a.quiet {
        ftk::cli::set_quiet();
    }
    if let Some(n) = a.threads {
        rayon::ThreadPoolBuilder::new()
            .num_threads(n.max(1))
            .build_global()
            .map_err(|e| Error::internal(format!("--threads: {e}")))?;
    }
    let wfile = a.weights.as_deref().map(TensorFile::open).transpose()?;
    if let (Some(f), None, true) = (&wfile, a.layers, a.prefix.contains("{l}")) {
        // Every block the file holds, so a checkpoint shard is not silently cut to layer 0.
        let n = weights::count_layers(f, &a.prefix);
        if n == 0 {
            ftk::bail!(
                "{}: no tensor '{}gate.weight'; check --prefix",
                f.name(),
                weights::layer_prefix(&a.prefix, 0)
            );
        }
        a.layers = Some(n);
    }
    let prefix = layer_prefix(&a, wfile.is_some())?;
    let infile = a.input.as_deref().map(TensorFile::open).transpose()?;
    // Open --grads-out before the work (after the inputs, so one of them
    // named as the output is refused now): an unwritable path fails here.
    let grads_out = a
        .grads_out
        .as_deref()
        .map(ftk::output::Output::create)
        .transpose()?;
    let tokens = match &infile {
        Some(f) => f.require("x")?.shape.first().copied().unwrap_or(0),
        None => a.tokens,
    };
    if tokens == 0 {
        match &a.input {
            Some(p) => ftk::bail!(
                "{}: tensor 'x' has no tokens (shape [0, h]); give at least one row",
                p.display()
            ),
            None => ftk::bail!("--tokens must be at least 1"),
        }
    }
    let sh = resolve_shape(&a, wfile.as_ref(), tokens)?;
    sizes::check(&sh, a.layers())?;
    let (x, dy) = match &infile {
        Some(f) => {
            let (_, x, dy) = weights::load_inputs(f, sh.hidden)?;
            (x, dy)
        }
        None => (
            weights::random_tensor(tokens * sh.hidden, a.seed, 0),
            weights::random_tensor(tokens * sh.hidden, a.seed, 1),
        ),
    };
    let layers: Vec<LayerW> = (0..a.layers())
        .map(|l| match &wfile {
            Some(f) => weights::load_layer(f, &weights::layer_prefix(&prefix, l), &sh),
            None => Ok(weights::random_layer(&sh, a.seed, l)),
        })
        .collect::<Result<_>>()?;
    let forced = forced_routing(&a, &sh)?;
    let device = a.device.resolve()?;
    if a.dtype == "bf16" && device == Device::Cpu {
        ftk::bail!("--dtype bf16 runs on CUDA only (--device cuda); the CPU path is f32");
    }
    let mut grads: Vec<LayerW> = (0..a.layers()).map(|_| LayerW::zeros(&sh)).collect();
    let run = Run {
        a: &a,
        sh,
        dy: &dy,
        forced: forced.as_deref(),
        device,
    };
    let last = match device {
        Device::Cpu => {
            let lts: Vec<LayerT> = layers.iter().map(|lw| LayerT::new(&sh, lw)).collect();
            linalg::warm_up();
            let mut eng = CpuEngine {
                sh,
                layers: &layers,
                lts: &lts,
                grads: &mut grads,
            };
            run.drive(&mut eng, &x, &dy)?
        }
        Device::Cuda(n) => {
            if a.dtype == "bf16" {
                run.drive_gpu::<half::bf16>(n, &layers, &x, &mut grads)?
            } else {
                run.drive_gpu::<f32>(n, &layers, &x, &mut grads)?
            }
        }
    };
    if let (Some(out), Some((y, dx))) = (grads_out, &last) {
        ftk::tensors::write_safetensors_on(
            out,
            &weights::grad_tensors(&grads, &sh, &prefix, y, dx),
            None,
        )?
        .commit()?;
    }
    Ok(())
}

/// Each layer needs its own tensor names: '{l}' in --prefix, or one layer.
fn layer_prefix(a: &Args, from_file: bool) -> Result<String> {
    Ok(match (a.prefix.contains("{l}"), a.layers(), from_file) {
        (true, _, _) | (false, 1, _) => a.prefix.clone(),
        (false, _, false) => format!("{}layers.{{l}}.", a.prefix),
        (false, n, true) => ftk::bail!("--layers {n} reads {n} blocks from --weights: put '{{l}}' in --prefix (e.g. 'layers.{{l}}.')"),
    })
}
