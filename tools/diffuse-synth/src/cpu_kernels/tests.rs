//! The kernels against the candle ops they replace.

use super::attention::softmax_last_dim;
use super::math::exp_g;
use super::*;
use candle_core::{Device, Module, D};
use candle_nn as nn;

#[test]
fn exp_and_erf_are_accurate() {
    let mut worst = 0f64;
    let mut x = -87.0f32;
    while x < 88.0 {
        let r = (exp(x) as f64 - (x as f64).exp()).abs() / (x as f64).exp();
        worst = worst.max(r);
        x += 0.001_37;
    }
    assert!(worst < 4e-7, "exp relative error {worst}");
    let mut worst = 0f64;
    let mut x = -87.0f32;
    while x < 88.0 {
        let r = (exp_g::<true>(x) as f64 - (x as f64).exp()).abs() / (x as f64).exp();
        worst = worst.max(r);
        x += 0.0137;
    }
    assert!(worst < 4e-7, "exp (fma) relative error {worst}");
    assert_eq!(exp(-200.0), 0.0);
    let mut worst = 0f64;
    let mut x = -6.0f32;
    while x < 6.0 {
        // erf via the complementary series is not in std: compare with a
        // high-precision Taylor/continued-fraction-free check through libm-like f64
        let e = erf_f64(x as f64);
        worst = worst.max((erf(x) as f64 - e).abs());
        x += 0.000_91;
    }
    assert!(worst < 1e-6, "erf error {worst}");
}

/// erf in f64 by its Maclaurin series (|x| < 3) or 1 - erfc asymptotics.
fn erf_f64(x: f64) -> f64 {
    let a = x.abs();
    let v = if a < 3.0 {
        let mut sum = 0.0;
        let mut term = a;
        let mut n = 0.0;
        loop {
            let t = term / (2.0 * n + 1.0);
            sum += t;
            if t.abs() < 1e-17 {
                break;
            }
            n += 1.0;
            term *= -a * a / n;
        }
        sum * 2.0 / std::f64::consts::PI.sqrt()
    } else {
        // erfc(a) ~ exp(-a^2)/(a sqrt(pi)) (1 - 1/(2a^2) + 3/(4a^4)); < 1e-4 here anyway
        let e = (-a * a).exp() / (a * std::f64::consts::PI.sqrt())
            * (1.0 - 0.5 / (a * a) + 0.75 / (a * a * a * a));
        1.0 - e
    };
    v.copysign(x)
}

fn close(a: &Tensor, b: &Tensor, tol: f32) {
    let a = a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let b = b.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(a.len(), b.len());
    let d = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    assert!(d <= tol, "max abs diff {d}");
}

fn randn(shape: &[usize], seed: u64) -> Tensor {
    use rand::RngExt;
    let mut r = ftk::rng::stream(seed, 0);
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|_| r.sample::<f32, _>(rand_distr::StandardNormal))
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

#[test]
fn kernels_match_candle() {
    // conv: 3x3 pad 1, stride 2, 1x1, no bias, dilation 2
    for (k, p, s, d, bias) in [
        (3, 1, 1, 1, true),
        (3, 1, 1, 1, false),
        (3, 1, 2, 1, true),
        (1, 0, 1, 1, true),
        (3, 0, 1, 1, false),
        (3, 2, 1, 2, true),
    ] {
        let x = randn(&[2, 5, 9, 7], 1);
        let w = (randn(&[6, 5, k, k], 2) * 0.3).unwrap();
        let bt = bias.then(|| randn(&[6], 3));
        let cfg = nn::Conv2dConfig {
            padding: p,
            stride: s,
            dilation: d,
            ..Default::default()
        };
        let c = nn::Conv2d::new(w, bt, cfg);
        let want = c.forward(&x).unwrap();
        let got = Conv2d(c).forward(&x).unwrap();
        assert_eq!(got.dims(), want.dims());
        close(&got, &want, 1e-5);
    }
    // linear, 3-D and 2-D, with and without bias
    for bias in [true, false] {
        let w = randn(&[7, 5], 12);
        let bt = bias.then(|| randn(&[7], 13));
        let l = nn::Linear::new(w, bt);
        for x in [randn(&[3, 4, 5], 14), randn(&[6, 5], 15)] {
            close(
                &Linear(l.clone()).forward(&x).unwrap(),
                &l.forward(&x).unwrap(),
                1e-5,
            );
        }
    }
    // group norm (+ silu)
    let x = ((randn(&[2, 8, 5, 3], 4) * 3.0).unwrap() + 1.0).unwrap();
    let w = randn(&[8], 5);
    let b = randn(&[8], 6);
    let gn = nn::GroupNorm::new(w.clone(), b.clone(), 8, 4, 1e-5).unwrap();
    let f = GroupNorm {
        inner: gn.clone(),
        weight: w,
        bias: b,
        groups: 4,
        eps: 1e-5,
    };
    close(&f.forward(&x).unwrap(), &gn.forward(&x).unwrap(), 1e-5);
    close(
        &f.forward_act(&x, true).unwrap(),
        &nn::ops::silu(&gn.forward(&x).unwrap()).unwrap(),
        1e-5,
    );
    // softmax, geglu
    let x = (randn(&[3, 4, 37], 7) * 4.0).unwrap();
    close(
        &softmax_last_dim(&x).unwrap(),
        &nn::ops::softmax(&x, D::Minus1).unwrap(),
        1e-6,
    );
    // attention against the plain tensor-op formula, 2 heads of 3, Lq 70 (two row blocks)
    let (q, k, v) = (
        randn(&[2, 70, 6], 9),
        randn(&[2, 11, 6], 10),
        randn(&[2, 11, 6], 11),
    );
    let heads = |t: &Tensor| {
        let (b, l, _) = t.dims3().unwrap();
        t.reshape((b, l, 2, 3))
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .contiguous()
            .unwrap()
    };
    let w = (heads(&q).matmul(&heads(&k).t().unwrap()).unwrap() * 0.5).unwrap();
    let want = nn::ops::softmax(&w, D::Minus1)
        .unwrap()
        .matmul(&heads(&v))
        .unwrap()
        .transpose(1, 2)
        .unwrap()
        .reshape((2, 70, 6))
        .unwrap();
    close(&attention(&q, &k, &v, 2, 0.5).unwrap(), &want, 1e-5);
    let g = randn(&[3, 4, 37], 8);
    close(
        &geglu(&x, &g).unwrap(),
        &(&x * g.gelu_erf().unwrap()).unwrap(),
        1e-5,
    );
    // the projection and its gating fused, over several row blocks per sample
    let l = Linear(nn::Linear::new(randn(&[14, 5], 9), Some(randn(&[14], 10))));
    let x = randn(&[2, 150, 5], 11);
    let y = l.0.forward(&x).unwrap().chunk(2, D::Minus1).unwrap();
    close(
        &l.forward_geglu(&x).unwrap(),
        &(&y[0] * y[1].gelu_erf().unwrap()).unwrap(),
        1e-5,
    );
}

/// d/dx sum(f(x) · r) by candle's autograd, x a fresh variable.
fn grad_of(x: &Tensor, f: impl Fn(&Tensor) -> candle_core::Result<Tensor>) -> (Tensor, Tensor) {
    let v = candle_core::Var::from_tensor(x).unwrap();
    let y = f(v.as_tensor()).unwrap();
    let r = randn(y.dims(), 99);
    let loss = (&y * &r).unwrap().sum_all().unwrap();
    let g = loss.backward().unwrap();
    (y.detach(), g.get(v.as_tensor()).unwrap().clone())
}

#[test]
fn input_gradients_match_candle_autograd() {
    // conv: the kernels' custom op against candle's conv2d backward
    for (k, p, s, bias) in [
        (3, 1, 1, true),
        (3, 1, 2, false),
        (1, 0, 1, true),
        (7, 3, 2, false),
        (3, 0, 1, false),
        (5, 1, 1, true),
    ] {
        let x = randn(&[2, 5, 9, 9], 1); // square: candle derives the output padding from the height
        let w = (randn(&[6, 5, k, k], 2) * 0.3).unwrap();
        let bt = bias.then(|| randn(&[6], 3));
        let cfg = nn::Conv2dConfig {
            padding: p,
            stride: s,
            ..Default::default()
        };
        let c = nn::Conv2d::new(w, bt, cfg);
        let (y0, g0) = grad_of(&x, |x| c.forward(x));
        let fc = Conv2d(c.clone());
        let (y1, g1) = grad_of(&x, |x| fc.forward(x));
        close(&y1, &y0, 1e-5);
        close(&g1, &g0, 1e-5);
    }
    // linear (3-D and 2-D)
    let l = nn::Linear::new(randn(&[7, 5], 12), Some(randn(&[7], 13)));
    for x in [randn(&[3, 4, 5], 14), randn(&[6, 5], 15)] {
        let (y0, g0) = grad_of(&x, |x| l.forward(x));
        let (y1, g1) = grad_of(&x, |x| Linear(l.clone()).forward(x));
        close(&y1, &y0, 1e-5);
        close(&g1, &g0, 1e-5);
    }
    // group norm (+ silu)
    let x = ((randn(&[2, 8, 5, 3], 4) * 3.0).unwrap() + 1.0).unwrap();
    let (w, b) = (randn(&[8], 5), randn(&[8], 6));
    let gn = nn::GroupNorm::new(w.clone(), b.clone(), 8, 4, 1e-5).unwrap();
    let f = GroupNorm {
        inner: gn.clone(),
        weight: w,
        bias: b,
        groups: 4,
        eps: 1e-5,
    };
    for silu in [false, true] {
        let (y0, g0) = grad_of(&x, |x| {
            let y = gn.forward(x)?;
            if silu {
                nn::ops::silu(&y)
            } else {
                Ok(y)
            }
        });
        let (y1, g1) = grad_of(&x, |x| f.forward_act(x, silu));
        close(&y1, &y0, 1e-5);
        close(&g1, &g0, 2e-5);
    }
    // layer norm
    let x = randn(&[2, 3, 10], 16);
    let (w, b) = (randn(&[10], 17), randn(&[10], 18));
    let (y0, g0) = grad_of(&x, |x| nn::ops::layer_norm_slow(x, &w, &b, 1e-5));
    let (y1, g1) = grad_of(&x, |x| layer_norm(x, &w, &b, 1e-5));
    close(&y1, &y0, 1e-5);
    close(&g1, &g0, 2e-5);
    // geglu
    let (a, g) = (randn(&[3, 4, 37], 19), randn(&[3, 4, 37], 20));
    let (_, ga0) = grad_of(&a, |a| a * g.gelu_erf()?);
    let (_, ga1) = grad_of(&a, |a| geglu(a, &g));
    close(&ga1, &ga0, 1e-5);
    let (_, gg0) = grad_of(&g, |g| &a * g.gelu_erf()?);
    let (_, gg1) = grad_of(&g, |g| geglu(&a, g));
    close(&gg1, &gg0, 1e-5);
    // geglu on the packed projection [.., 2d] (as diffusers' GEGLU chunks it)
    let x = randn(&[3, 70, 74], 24);
    let packed_ref = |x: &Tensor| -> candle_core::Result<Tensor> {
        let h = x.chunk(2, D::Minus1)?;
        &h[0] * h[1].gelu_erf()?
    };
    let (y0, g0) = grad_of(&x, packed_ref);
    let (y1, g1) = grad_of(&x, geglu_packed);
    close(&y1, &y0, 1e-5);
    close(&g1, &g0, 1e-5);
    close(&geglu_packed(&x).unwrap(), &y0, 1e-5);
    // the spatial transformer's layout changes (blocks of 32: odd sizes cross them)
    let x = randn(&[2, 37, 5, 9], 25);
    let (y0, g0) = grad_of(&x, |x| x.transpose(1, 2)?.t()?.reshape((2, 45, 37)));
    let (y1, g1) = grad_of(&x, nchw_to_tokens);
    close(&y1, &y0, 0.0);
    close(&g1, &g0, 0.0);
    let t = randn(&[2, 45, 37], 26);
    let (y0, g0) = grad_of(&t, |t| t.reshape((2, 5, 9, 37))?.t()?.transpose(1, 2));
    let (y1, g1) = grad_of(&t, |t| tokens_to_nchw(t, 5, 9));
    close(&y1, &y0, 0.0);
    close(&g1, &g0, 0.0);
    // attention: gradient w.r.t. each of q, k, v (Lq 70: two row blocks)
    let (q, k, v) = (
        randn(&[2, 70, 6], 21),
        randn(&[2, 11, 6], 22),
        randn(&[2, 11, 6], 23),
    );
    let heads = |t: &Tensor| -> candle_core::Result<Tensor> {
        let (b, l, _) = t.dims3()?;
        t.reshape((b, l, 2, 3))?.transpose(1, 2)?.contiguous()
    };
    let reference = |q: &Tensor, k: &Tensor, v: &Tensor| -> candle_core::Result<Tensor> {
        let w = (heads(q)?.matmul(&heads(k)?.t()?)? * 0.5)?;
        nn::ops::softmax(&w, D::Minus1)?
            .matmul(&heads(v)?)?
            .transpose(1, 2)?
            .reshape((2, 70, 6))
    };
    let (y0, g0) = grad_of(&q, |q| reference(q, &k, &v));
    let (y1, g1) = grad_of(&q, |q| attention(q, &k, &v, 2, 0.5));
    close(&y1, &y0, 1e-5);
    close(&g1, &g0, 1e-5);
    let (_, g0) = grad_of(&k, |k| reference(&q, k, &v));
    let (_, g1) = grad_of(&k, |k| attention(&q, k, &v, 2, 0.5));
    close(&g1, &g0, 1e-5);
    let (_, g0) = grad_of(&v, |v| reference(&q, &k, v));
    let (_, g1) = grad_of(&v, |v| attention(&q, &k, v, 2, 0.5));
    close(&g1, &g0, 1e-5);
}

#[test]
fn classifier_kernels_match_tensor_ops() {
    use super::resnet::{
        channel_affine, channel_affine_relu, channel_stats, max_pool_3x3_s2, relu,
    };
    let x = randn(&[2, 3, 7, 6], 30);
    // relu, per-channel affine
    let (y0, g0) = grad_of(&x, |x| x.relu());
    let (y1, g1) = grad_of(&x, relu);
    close(&y1, &y0, 0.0);
    close(&g1, &g0, 0.0);
    let (sc, sh) = ([0.5f32, -2.0, 3.0], [0.1f32, 0.2, -0.3]);
    let (y0, g0) = grad_of(&x, |x| {
        let a = Tensor::new(&sc, &Device::Cpu)?.reshape((1, 3, 1, 1))?;
        let b = Tensor::new(&sh, &Device::Cpu)?.reshape((1, 3, 1, 1))?;
        x.broadcast_mul(&a)?.broadcast_add(&b)
    });
    let (y1, g1) = grad_of(&x, |x| channel_affine(x, &sc, &sh));
    close(&y1, &y0, 1e-6);
    close(&g1, &g0, 1e-6);
    // BN + ReLU and BN + residual + ReLU as one op, against the separate kernels; the
    // residual's gradient too
    let res = randn(&[2, 3, 7, 6], 32);
    let (y0, g0) = grad_of(&x, |x| relu(&channel_affine(x, &sc, &sh)?));
    let (y1, g1) = grad_of(&x, |x| channel_affine_relu(x, &sc, &sh, None));
    close(&y1, &y0, 0.0);
    close(&g1, &g0, 0.0);
    let (y0, g0) = grad_of(&x, |x| relu(&(channel_affine(x, &sc, &sh)? + &res)?));
    let (y1, g1) = grad_of(&x, |x| channel_affine_relu(x, &sc, &sh, Some(&res)));
    close(&y1, &y0, 0.0);
    close(&g1, &g0, 0.0);
    let (_, g0) = grad_of(&res, |r| relu(&(channel_affine(&x, &sc, &sh)? + r)?));
    let (_, g1) = grad_of(&res, |r| channel_affine_relu(&x, &sc, &sh, Some(r)));
    close(&g1, &g0, 0.0);
    // batch statistics [2, C]
    let (y0, g0) = grad_of(&x, |x| {
        let mu = x.mean_keepdim(0)?.mean_keepdim(2)?.mean_keepdim(3)?;
        let v = x
            .broadcast_sub(&mu)?
            .sqr()?
            .mean_keepdim(0)?
            .mean_keepdim(2)?
            .mean_keepdim(3)?;
        Tensor::stack(&[mu.flatten_all()?, v.flatten_all()?], 0)
    });
    let (y1, g1) = grad_of(&x, channel_stats);
    close(&y1, &y0, 1e-5);
    close(&g1, &g0, 1e-5);
    // max-pool 3x3/2 pad 1 against a direct loop (random input: no ties)
    let xv = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let (ho, wo) = (4, 3);
    let mut want = vec![0f32; 6 * ho * wo];
    let mut arg = vec![0usize; 6 * ho * wo];
    for pl in 0..6 {
        for oy in 0..ho {
            for ox in 0..wo {
                let mut best = (f32::NEG_INFINITY, 0);
                for iy in (2 * oy).saturating_sub(1)..(2 * oy + 2).min(7) {
                    for ix in (2 * ox).saturating_sub(1)..(2 * ox + 2).min(6) {
                        let j = pl * 42 + iy * 6 + ix;
                        if xv[j] > best.0 {
                            best = (xv[j], j);
                        }
                    }
                }
                want[(pl * ho + oy) * wo + ox] = best.0;
                arg[(pl * ho + oy) * wo + ox] = best.1;
            }
        }
    }
    let v = candle_core::Var::from_tensor(&x).unwrap();
    let y = max_pool_3x3_s2(v.as_tensor()).unwrap();
    assert_eq!(y.dims(), &[2, 3, ho, wo]);
    assert_eq!(y.flatten_all().unwrap().to_vec1::<f32>().unwrap(), want);
    let r = randn(y.dims(), 31);
    let g = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
    let got = g
        .get(v.as_tensor())
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let rv = r.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let mut want_g = vec![0f32; xv.len()];
    for (o, &j) in arg.iter().enumerate() {
        want_g[j] += rv[o];
    }
    assert_eq!(got, want_g);
}

/// Convs inside other rayon work, as the test harness's parallel tests and a batch's
/// per-sample tasks make them: a pool thread that waits inside one conv (its im2col or
/// col2im is parallel) runs another queued conv on the same thread, which must get its
/// own scratch buffers (the flaky `kernels_match_candle` failure was a "buffer already
/// borrowed" panic raised there and re-thrown without its message). Every result must
/// equal the one computed alone.
#[test]
fn nested_convs_on_one_pool_thread_get_their_own_buffers() {
    use rayon::prelude::*;
    let x = randn(&[3, 5, 9, 7], 40);
    let w = (randn(&[6, 5, 3, 3], 41) * 0.3).unwrap();
    let cfg = nn::Conv2dConfig {
        padding: 1,
        ..Default::default()
    };
    let c = Conv2d(nn::Conv2d::new(w, Some(randn(&[6], 42)), cfg));
    let (want, gwant) = grad_of(&x, |x| c.forward(x));
    let want = want.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let gwant = gwant.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .build()
        .unwrap();
    pool.install(|| {
        (0..48).into_par_iter().for_each(|_| {
            let (y, g) = grad_of(&x, |x| c.forward(x));
            assert_eq!(y.flatten_all().unwrap().to_vec1::<f32>().unwrap(), want);
            assert_eq!(g.flatten_all().unwrap().to_vec1::<f32>().unwrap(), gwant);
        })
    });
}

/// Attention with the head widths of small SD-1.x UNets' first levels (8 and 16),
/// forward and the three input gradients, against plain tensor ops (Lk 37: no
/// multiple of any vector width).
#[test]
fn narrow_head_attention_matches_tensor_ops() {
    for d in [8usize, 16] {
        let (heads, lq, lk) = (2usize, 70usize, 37usize);
        let hd = heads * d;
        let (q, k, v) = (
            randn(&[2, lq, hd], 50),
            randn(&[2, lk, hd], 51),
            randn(&[2, lk, hd], 52),
        );
        let split = |t: &Tensor| -> candle_core::Result<Tensor> {
            let (b, l, _) = t.dims3()?;
            t.reshape((b, l, heads, d))?.transpose(1, 2)?.contiguous()
        };
        let scale = 1.0 / (d as f64).sqrt();
        let reference = |q: &Tensor, k: &Tensor, v: &Tensor| -> candle_core::Result<Tensor> {
            let w = (split(q)?.matmul(&split(k)?.t()?)? * scale)?;
            nn::ops::softmax(&w, D::Minus1)?
                .matmul(&split(v)?)?
                .transpose(1, 2)?
                .reshape((2, lq, hd))
        };
        close(
            &attention(&q, &k, &v, heads, scale).unwrap(),
            &reference(&q, &k, &v).unwrap(),
            1e-5,
        );
        let (y0, g0) = grad_of(&q, |q| reference(q, &k, &v));
        let (y1, g1) = grad_of(&q, |q| attention(q, &k, &v, heads, scale));
        close(&y1, &y0, 1e-5);
        close(&g1, &g0, 2e-5);
        let (_, g0) = grad_of(&k, |k| reference(&q, k, &v));
        let (_, g1) = grad_of(&k, |k| attention(&q, k, &v, heads, scale));
        close(&g1, &g0, 2e-5);
        let (_, g0) = grad_of(&v, |v| reference(&q, &k, v));
        let (_, g1) = grad_of(&v, |v| attention(&q, &k, v, heads, scale));
        close(&g1, &g0, 2e-5);
    }
}

#[test]
fn large_zeros_are_zero() {
    // past the parallel-fill threshold, on a heap block that held other values
    let n = (5 << 18) + 3;
    drop(vec![1f32; n]);
    let z = zeros(n);
    assert_eq!(z.len(), n);
    assert!(z.iter().all(|&v| v == 0.0));
}
