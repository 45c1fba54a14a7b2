//! Block weights and inputs: from safetensors (transformers' names, either
//! the per-expert `experts.{e}.w1.weight` layout or the fused
//! `experts.gate_up_proj` / `experts.down_proj` of transformers 5), or seeded
//! random tensors.

use crate::moe::{ExpertW, LayerW, Shape};
use ftk::tensors::{OutTensor, TensorFile};
use ftk::{Error, Result};
use rand::RngExt;
use rand_distr::{Distribution, Normal};

/// The tensor-name prefix of layer `l`: `{l}` in `prefix` is replaced by l.
pub fn layer_prefix(prefix: &str, l: usize) -> String {
    prefix.replace("{l}", &l.to_string())
}

fn read(f: &TensorFile, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
    let t = f.require(name)?;
    if t.shape != shape {
        return Err(Error::input(format!(
            "{}: expected shape {shape:?}, got {:?}",
            t.here(),
            t.shape
        )));
    }
    let v = t.to_f32_vec()?;
    if let Some(i) = v.iter().position(|x| !x.is_finite()) {
        return Err(Error::input(format!(
            "{}: element {i} is {}; every value must be finite",
            t.here(),
            v[i]
        )));
    }
    Ok(v)
}

/// How many consecutive blocks, from layer 0, have a router under `prefix`
/// ('{l}' replaced by the layer).
pub fn count_layers(f: &TensorFile, prefix: &str) -> usize {
    (0..)
        .take_while(|&l| {
            f.get(&format!("{}gate.weight", layer_prefix(prefix, l)))
                .is_some()
        })
        .count()
}

/// Infer (hidden, ffn, experts) from a layer's tensors.
pub fn infer_shape(f: &TensorFile, p: &str) -> Result<(usize, usize, usize)> {
    let gname = format!("{p}gate.weight");
    let gate = f.require(&gname)?.shape.to_vec();
    if gate.len() != 2 {
        return Err(Error::input(format!(
            "{}: tensor '{p}gate.weight' must be [experts, hidden], got {gate:?}",
            f.name()
        )));
    }
    let (e, h) = (gate[0], gate[1]);
    let w1 = format!("{p}experts.0.w1.weight");
    let fused = format!("{p}experts.gate_up_proj");
    let ffn = match f.get(&w1) {
        Some(t) => t.shape.first().copied().unwrap_or(0),
        None => f.require(&fused)?.shape.get(1).copied().unwrap_or(0) / 2,
    };
    Ok((h, ffn, e))
}

/// Load layer `l`'s weights.
pub fn load_layer(f: &TensorFile, p: &str, sh: &Shape) -> Result<LayerW> {
    let (h, ff, e) = (sh.hidden, sh.ffn, sh.experts);
    let gate = read(f, &format!("{p}gate.weight"), &[e, h])?;
    let w1 = format!("{p}experts.0.w1.weight");
    let experts = if f.get(&w1).is_some() {
        (0..e)
            .map(|i| {
                Ok(ExpertW {
                    w1: read(f, &format!("{p}experts.{i}.w1.weight"), &[ff, h])?,
                    w2: read(f, &format!("{p}experts.{i}.w2.weight"), &[h, ff])?,
                    w3: read(f, &format!("{p}experts.{i}.w3.weight"), &[ff, h])?,
                })
            })
            .collect::<Result<Vec<_>>>()?
    } else {
        // transformers 5: gate_up_proj [E, 2f, h] (w1 rows then w3 rows), down_proj [E, h, f]
        let gu = read(f, &format!("{p}experts.gate_up_proj"), &[e, 2 * ff, h])?;
        let down = read(f, &format!("{p}experts.down_proj"), &[e, h, ff])?;
        (0..e)
            .map(|i| {
                let base = i * 2 * ff * h;
                Ok(ExpertW {
                    w1: gu[base..base + ff * h].to_vec(),
                    w3: gu[base + ff * h..base + 2 * ff * h].to_vec(),
                    w2: down[i * h * ff..(i + 1) * h * ff].to_vec(),
                })
            })
            .collect::<Result<Vec<_>>>()?
    };
    Ok(LayerW { gate, experts })
}

/// Seeded random weights: N(0, 0.02²) like transformers' initializer_range.
pub fn random_layer(sh: &Shape, seed: u64, l: usize) -> LayerW {
    let mut r = ftk::rng::stream(seed, ftk::rng::stream_id(&[1, l as u64]));
    let n = Normal::new(0.0f32, 0.02).expect("valid normal");
    let mut v = |len: usize| (0..len).map(|_| n.sample(&mut r)).collect::<Vec<f32>>();
    let (h, f) = (sh.hidden, sh.ffn);
    LayerW {
        gate: v(sh.experts * h),
        experts: (0..sh.experts)
            .map(|_| ExpertW {
                w1: v(f * h),
                w2: v(h * f),
                w3: v(f * h),
            })
            .collect(),
    }
}

/// Seeded N(0, 1) tensor (inputs and upstream gradients).
pub fn random_tensor(len: usize, seed: u64, which: u64) -> Vec<f32> {
    let mut r = ftk::rng::stream(seed, ftk::rng::stream_id(&[2, which]));
    (0..len)
        .map(|_| r.sample::<f32, _>(rand_distr::StandardNormal))
        .collect()
}

/// Read `x` and `dy` [T,h] from an input file.
pub fn load_inputs(f: &TensorFile, h: usize) -> Result<(usize, Vec<f32>, Vec<f32>)> {
    let x = f.require("x")?;
    if x.shape.len() != 2 || x.shape[1] != h || x.shape[0] == 0 {
        return Err(Error::input(format!(
            "{}: expected shape [tokens, {h}], got {:?}",
            x.here(),
            x.shape
        )));
    }
    let t = x.shape[0];
    let xs = read(f, "x", &[t, h])?;
    let dy = read(f, "dy", &[t, h])?;
    Ok((t, xs, dy))
}

/// `grad.` + each weight's name (its prefix included), plus `y` and `grad.x`.
pub fn grad_tensors<'a>(
    grads: &[LayerW],
    sh: &Shape,
    prefix: &str,
    y: &[f32],
    dx: &[f32],
) -> Vec<OutTensor<'a>> {
    let (h, f, t) = (sh.hidden, sh.ffn, sh.tokens);
    let mut out = vec![
        OutTensor::f32("y", vec![t, h], y),
        OutTensor::f32("grad.x", vec![t, h], dx),
    ];
    for (l, g) in grads.iter().enumerate() {
        let p = layer_prefix(prefix, l);
        out.push(OutTensor::f32(
            format!("grad.{p}gate.weight"),
            vec![sh.experts, h],
            &g.gate,
        ));
        for (e, ex) in g.experts.iter().enumerate() {
            out.push(OutTensor::f32(
                format!("grad.{p}experts.{e}.w1.weight"),
                vec![f, h],
                &ex.w1,
            ));
            out.push(OutTensor::f32(
                format!("grad.{p}experts.{e}.w2.weight"),
                vec![h, f],
                &ex.w2,
            ));
            out.push(OutTensor::f32(
                format!("grad.{p}experts.{e}.w3.weight"),
                vec![f, h],
                &ex.w3,
            ));
        }
    }
    out
}
