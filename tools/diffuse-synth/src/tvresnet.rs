//! torchvision ResNet-18/34/50 classifiers (FedCADO's client models), read from a
//! safetensors state_dict with torchvision's names:
//!
//! ```text
//! conv1.weight  bn1.{weight,bias,running_mean,running_var}
//! layer{1..4}.{i}.conv{1,2[,3]}.weight  layer{s}.{i}.bn{1,2[,3]}.*
//! layer{s}.0.downsample.0.weight  layer{s}.0.downsample.1.*      (1x1 conv + BN)
//! fc.{weight,bias}
//! ```
//!
//! The structure is the one torchvision builds: a 7x7/2 stem conv, BN, ReLU, 3x3/2 max-pool,
//! four stages whose first block strides 2 (stages 2-4; ResNet v1.5: on the 3x3 conv of a
//! Bottleneck), BasicBlock (two 3x3 convs) for resnet18/34 and Bottleneck (1x1, 3x3, 1x1)
//! for resnet50, global average pool, `fc`. Widths come from the tensor shapes, so narrow
//! variants of the same structure load too. A common prefix (`module.`, `encoder.`) is found
//! from where `conv1.weight` sits; when `fc` is absent (FedCADO's `ClientTune`: `fc` =
//! Identity and a separate `Linear(512, C)` head) the one 2-D weight outside the backbone
//! whose input width is the feature width is the head. BatchNorm runs in eval mode (running
//! statistics); every BN layer's input also feeds the DeepInversion BN-statistics loss.

use crate::classifier::BatchNorm;
use crate::cpu_kernels::{Conv2d, Linear};
use crate::model::ce;
use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{Conv2dConfig, VarBuilder};
use ftk::{Error, Result};
use std::collections::BTreeMap;
use std::path::Path;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Block {
    Basic,
    Bottleneck,
}

/// A torchvision ResNet depth.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    Resnet18,
    Resnet34,
    Resnet50,
}

impl Arch {
    pub fn parse(s: &str) -> Option<Arch> {
        match s {
            "resnet18" => Some(Arch::Resnet18),
            "resnet34" => Some(Arch::Resnet34),
            "resnet50" => Some(Arch::Resnet50),
            _ => None,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Arch::Resnet18 => "resnet18",
            Arch::Resnet34 => "resnet34",
            Arch::Resnet50 => "resnet50",
        }
    }
    pub fn block(self) -> Block {
        match self {
            Arch::Resnet18 | Arch::Resnet34 => Block::Basic,
            Arch::Resnet50 => Block::Bottleneck,
        }
    }
    pub fn counts(self) -> [usize; 4] {
        match self {
            Arch::Resnet18 => [2, 2, 2, 2],
            Arch::Resnet34 | Arch::Resnet50 => [3, 4, 6, 3],
        }
    }
}

/// One conv of the plan: its state_dict name, shape [out, in, k, k], stride, padding.
#[derive(Clone, Debug)]
pub struct ConvSpec {
    pub name: String,
    pub out: usize,
    pub inp: usize,
    pub kernel: usize,
    pub stride: usize,
    pub padding: usize,
}

/// A residual block: its convs and BN names in order, and the downsample branch.
#[derive(Clone, Debug)]
pub struct BlockSpec {
    pub convs: Vec<(ConvSpec, String)>,
    pub downsample: Option<(ConvSpec, String)>,
}

/// The network as read from the names and shapes, before any weight is loaded.
#[derive(Clone, Debug)]
pub struct Plan {
    pub arch: Arch,
    pub prefix: String,
    pub stem: (ConvSpec, String),
    pub blocks: Vec<BlockSpec>,
    /// Head weight name ([classes, features]) and its bias name, if present.
    pub head: (String, Option<String>),
    pub features: usize,
    pub num_classes: usize,
}

impl Plan {
    /// BatchNorm layers (each one a term of the BN-statistics loss).
    pub fn bn_layers(&self) -> usize {
        1 + self
            .blocks
            .iter()
            .map(|b| b.convs.len() + usize::from(b.downsample.is_some()))
            .sum::<usize>()
    }
    /// Blocks per stage.
    pub fn counts(&self) -> [usize; 4] {
        self.arch.counts()
    }
}

/// Reads the plan of `arch` from a state_dict's names and shapes (`src` names the file).
///
/// Long because each torchvision name it looks for is checked where it is read, with the
/// error naming it; split up, the name list would be spread over several functions.
pub fn plan(shapes: &BTreeMap<String, Vec<usize>>, arch: Arch, src: &str) -> Result<Plan> {
    let err = |m: String| Error::input(format!("{src}: {} state_dict: {m}", arch.name()));
    // the prefix: where `conv1.weight` sits next to `layer1.0.conv1.weight`
    let prefixes: Vec<String> = shapes
        .keys()
        .filter_map(|k| k.strip_suffix("conv1.weight"))
        .filter(|p| p.is_empty() || p.ends_with('.'))
        .filter(|p| shapes.contains_key(&format!("{p}layer1.0.conv1.weight")))
        .map(String::from)
        .collect();
    let prefix = match prefixes.as_slice() {
        [p] => p.clone(),
        [] => return Err(err(
            "no `conv1.weight` with `layer1.0.conv1.weight` beside it (torchvision ResNet names)"
                .into(),
        )),
        many => {
            return Err(err(format!(
                "several ResNets in one file (prefixes {many:?})"
            )))
        }
    };
    let conv = |name: &str, kernel: usize, stride: usize, inp: usize| -> Result<ConvSpec> {
        let key = format!("{prefix}{name}.weight");
        let s = shapes
            .get(&key)
            .ok_or_else(|| err(format!("missing `{key}`")))?;
        if s.len() != 4 || s[2] != kernel || s[3] != kernel {
            return Err(err(format!(
                "`{key}` has shape {s:?}, expected [out, {inp}, {kernel}, {kernel}]"
            )));
        }
        if s[1] != inp {
            return Err(err(format!(
                "`{key}` takes {} channels but its input has {inp}",
                s[1]
            )));
        }
        Ok(ConvSpec {
            name: key,
            out: s[0],
            inp,
            kernel,
            stride,
            padding: kernel / 2,
        })
    };
    let bn = |name: &str, ch: usize| -> Result<String> {
        let base = format!("{prefix}{name}");
        for p in ["weight", "bias", "running_mean", "running_var"] {
            let key = format!("{base}.{p}");
            match shapes.get(&key) {
                Some(s) if s.as_slice() == [ch] => {}
                Some(s) => return Err(err(format!("`{key}` has shape {s:?}, expected [{ch}]"))),
                None => return Err(err(format!("missing `{key}`"))),
            }
        }
        Ok(base)
    };
    // the depth the names describe must be the one asked for
    let bottleneck = shapes.contains_key(&format!("{prefix}layer1.0.conv3.weight"));
    let mut counts = [0usize; 4];
    for (s, c) in counts.iter_mut().enumerate() {
        while shapes.contains_key(&format!("{prefix}layer{}.{}.conv1.weight", s + 1, *c)) {
            *c += 1;
        }
    }
    let found_block = if bottleneck {
        Block::Bottleneck
    } else {
        Block::Basic
    };
    if found_block != arch.block() || counts != arch.counts() {
        return Err(err(format!(
            "the names describe {} blocks {counts:?}, but {} has {} blocks {:?}",
            if bottleneck {
                "Bottleneck"
            } else {
                "BasicBlock"
            },
            arch.name(),
            if arch.block() == Block::Bottleneck {
                "Bottleneck"
            } else {
                "BasicBlock"
            },
            arch.counts()
        )));
    }
    let stem_c = conv("conv1", 7, 2, 3)?;
    let stem = (stem_c.clone(), bn("bn1", stem_c.out)?);
    let mut ch = stem_c.out;
    let mut blocks = vec![];
    for (s, &n) in counts.iter().enumerate() {
        for i in 0..n {
            let stride = if s > 0 && i == 0 { 2 } else { 1 };
            let b = format!("layer{}.{i}", s + 1);
            let mut convs = vec![];
            let block_in = ch;
            let layout: &[(usize, usize)] = match arch.block() {
                Block::Basic => &[(3, stride), (3, 1)],
                Block::Bottleneck => &[(1, 1), (3, stride), (1, 1)],
            };
            for (j, &(k, st)) in layout.iter().enumerate() {
                let c = conv(&format!("{b}.conv{}", j + 1), k, st, ch)?;
                ch = c.out;
                let bname = bn(&format!("{b}.bn{}", j + 1), c.out)?;
                convs.push((c, bname));
            }
            let has_ds = shapes.contains_key(&format!("{prefix}{b}.downsample.0.weight"));
            let downsample = if has_ds {
                let c = conv(&format!("{b}.downsample.0"), 1, stride, block_in)?;
                if c.out != ch {
                    return Err(err(format!(
                        "`{}` gives {} channels but the block outputs {ch}",
                        c.name, c.out
                    )));
                }
                let bname = bn(&format!("{b}.downsample.1"), c.out)?;
                Some((c, bname))
            } else {
                if stride != 1 || block_in != ch {
                    return Err(err(format!(
                        "`{prefix}{b}` changes the shape ({block_in} -> {ch} channels, stride \
                         {stride}) but has no `downsample.0.weight`"
                    )));
                }
                None
            };
            blocks.push(BlockSpec { convs, downsample });
        }
    }
    let features = ch;
    // the head: `fc`, else the one 2-D weight outside the backbone taking the features
    let fc = format!("{prefix}fc.weight");
    let head = if shapes.contains_key(&fc) {
        fc
    } else {
        let backbone = |k: &str| {
            k.strip_prefix(prefix.as_str()).is_some_and(|r| {
                [
                    "conv1.", "bn1.", "layer1.", "layer2.", "layer3.", "layer4.", "fc.",
                ]
                .iter()
                .any(|s| r.starts_with(s))
            })
        };
        let cands: Vec<&String> = shapes
            .iter()
            .filter(|(k, s)| {
                k.ends_with(".weight") && !backbone(k) && s.len() == 2 && s[1] == features
            })
            .map(|(k, _)| k)
            .collect();
        match cands.as_slice() {
            [h] => (*h).clone(),
            [] => {
                return Err(err(format!(
                    "no `{fc}` and no other [classes, {features}] weight (the classifier head)"
                )))
            }
            many => {
                return Err(err(format!(
                    "no `{fc}` and several possible heads: {many:?}"
                )))
            }
        }
    };
    let hs = &shapes[&head];
    if hs.len() != 2 || hs[1] != features || hs[0] == 0 {
        return Err(err(format!(
            "`{head}` has shape {hs:?}, expected [classes, {features}]"
        )));
    }
    let num_classes = hs[0];
    let stem_name = head.strip_suffix(".weight").unwrap_or(&head).to_string();
    let bias = format!("{stem_name}.bias");
    let bias = match shapes.get(&bias) {
        Some(s) if s.as_slice() == [num_classes] => Some(bias),
        Some(s) => {
            return Err(err(format!(
                "`{bias}` has shape {s:?}, expected [{num_classes}]"
            )))
        }
        None => None,
    };
    Ok(Plan {
        arch,
        prefix,
        stem,
        blocks,
        head: (head, bias),
        features,
        num_classes,
    })
}

struct Block2 {
    convs: Vec<(Conv2d, BatchNorm)>,
    downsample: Option<(Conv2d, BatchNorm)>,
}

/// A loaded torchvision ResNet (eval mode).
pub struct ResNet {
    stem: (Conv2d, BatchNorm),
    blocks: Vec<Block2>,
    head: Linear,
    pub plan: Plan,
}

fn load_conv(vb: &VarBuilder, c: &ConvSpec, what: &str) -> Result<Conv2d> {
    let w = vb
        .get((c.out, c.inp, c.kernel, c.kernel), &c.name)
        .map_err(ce(what))?;
    Ok(Conv2d(candle_nn::Conv2d::new(
        w,
        None,
        Conv2dConfig {
            stride: c.stride,
            padding: c.padding,
            ..Default::default()
        },
    )))
}

impl ResNet {
    pub fn load(weights: &Path, arch: Arch) -> Result<ResNet> {
        ResNet::load_on(weights, arch, &Device::Cpu)
    }

    /// [`ResNet::load`] with the (f32) weights on `dev`.
    pub fn load_on(weights: &Path, arch: Arch, dev: &Device) -> Result<ResNet> {
        let f = ftk::tensors::TensorFile::open(weights)?;
        let shapes: BTreeMap<String, Vec<usize>> = f
            .names()
            .into_iter()
            .filter_map(|n| f.get(&n).map(|t| (n.clone(), t.shape.to_vec())))
            .collect();
        let plan = plan(&shapes, arch, &weights.display().to_string())?;
        // SAFETY: read-only map of a file nobody modifies while we run.
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[weights], DType::F32, dev) }
            .map_err(ce(weights.display()))?;
        let what = weights.display().to_string();
        let cb = |(c, b): &(ConvSpec, String)| -> Result<(Conv2d, BatchNorm)> {
            Ok((
                load_conv(&vb, c, &what)?,
                BatchNorm::load(&vb, b, 1e-5, weights)?,
            ))
        };
        let stem = cb(&plan.stem)?;
        let mut blocks = vec![];
        for b in &plan.blocks {
            blocks.push(Block2 {
                convs: b.convs.iter().map(cb).collect::<Result<_>>()?,
                downsample: b.downsample.as_ref().map(cb).transpose()?,
            });
        }
        let (hw, hb) = &plan.head;
        let w = vb
            .get((plan.num_classes, plan.features), hw)
            .map_err(ce(&what))?;
        let b = match hb {
            Some(n) => Some(vb.get(plan.num_classes, n).map_err(ce(&what))?),
            None => None,
        };
        let head = Linear(candle_nn::Linear::new(w, b));
        Ok(ResNet {
            stem,
            blocks,
            head,
            plan,
        })
    }

    /// Logits [N, classes] and the summed BN-statistics loss of every BN layer's input.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<(Tensor, Tensor)> {
        let mut loss = Tensor::zeros((), DType::F32, x.device())?;
        let (c, b) = &self.stem;
        let x = b.forward_relu(&c.forward(x)?, &mut loss)?;
        let mut x = crate::place::max_pool_3x3_s2(&x)?;
        for blk in &self.blocks {
            let mut out = x.clone();
            let n = blk.convs.len();
            for (j, (c, b)) in blk.convs.iter().enumerate() {
                let z = c.forward(&out)?;
                if j + 1 < n {
                    out = b.forward_relu(&z, &mut loss)?;
                } else {
                    // BN, + identity, ReLU as one op after the identity branch; the loss
                    // terms in torchvision's order (this BN's before the downsample's)
                    b.add_term(&z, &mut loss)?;
                    out = z;
                }
            }
            let identity = match &blk.downsample {
                Some((c, b)) => b.forward(&c.forward(&x)?, &mut loss)?,
                None => x.clone(),
            };
            let (_, b) = blk
                .convs
                .last()
                .ok_or_else(|| candle_core::Error::Msg("a residual block without convs".into()))?;
            x = b.apply_relu(&out, Some(&identity))?;
        }
        let feats = x.mean_keepdim(2)?.mean_keepdim(3)?.flatten_from(1)?;
        Ok((self.head.forward(&feats)?, loss))
    }
}
