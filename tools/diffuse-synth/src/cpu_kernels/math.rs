//! Vectorisable f32 helpers: lane sums and maxima, exp, erf.

/// Sum with 16 independent lanes (so the loop vectorises).
#[inline(always)]
pub(crate) fn sum_lanes(x: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let ch = x.chunks_exact(16);
    let rem = ch.remainder();
    for c in ch {
        for i in 0..16 {
            acc[i] += c[i];
        }
    }
    acc.iter().sum::<f32>() + rem.iter().sum::<f32>()
}

/// Max with 16 independent lanes.
#[inline(always)]
pub(crate) fn max_lanes(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; 16];
    let ch = x.chunks_exact(16);
    let rem = ch.remainder();
    for c in ch {
        for i in 0..16 {
            acc[i] = acc[i].max(c[i]);
        }
    }
    acc.iter()
        .chain(rem)
        .copied()
        .fold(f32::NEG_INFINITY, f32::max)
}

// ---------------------------------------------------------------- exp, erf

/// e^x for f32, |relative error| < 2e-7 on [-87, 88]; 0 below -87.3. Written so that loops
/// over slices vectorise (no calls, no branches beyond selects).
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    exp_g::<false>(x)
}

/// a * b + c, fused when `FMA` (only inside functions compiled with the `fma` feature).
#[inline(always)]
pub(crate) fn fma<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

/// [`exp`], with fused multiply-adds when `FMA`.
#[inline(always)]
pub(crate) fn exp_g<const FMA: bool>(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    const ROUND: f32 = 12_582_912.0; // 1.5 * 2^23: adding it rounds to an integer
    #[allow(clippy::manual_clamp)] // plain max/min: vmaxps/vminps, no NaN branches
    let xc = x.max(-87.3).min(88.7);
    let t = fma::<FMA>(xc, LOG2E, ROUND);
    let n = t - ROUND;
    // the integer n sits in t's low mantissa bits: no float->int conversion (which
    // would not vectorise with Rust's saturating `as`)
    let ni = t.to_bits().wrapping_sub(0x4B40_0000);
    let r = fma::<FMA>(-n, LN2_LO, fma::<FMA>(-n, LN2_HI, xc));
    // exp(r) on |r| <= ln2/2: degree-6 Taylor/minimax coefficients
    let mut p = fma::<FMA>(r, 0.001_388_989_5, 0.008_333_452);
    p = fma::<FMA>(r, p, 0.041_666_668);
    p = fma::<FMA>(r, p, 0.166_666_67);
    p = fma::<FMA>(r, p, 0.5);
    p = fma::<FMA>(r, p, 1.0);
    p = fma::<FMA>(r, p, 1.0);
    let bits = ni.wrapping_add(127) << 23;
    let y = p * f32::from_bits(bits);
    if x < -87.3 {
        0.0
    } else {
        y
    }
}

/// erf(x), |error| < 1e-6 in f32 (Abramowitz & Stegun 7.1.26 with the fast exp).
#[inline(always)]
pub fn erf(x: f32) -> f32 {
    let a = x.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * a);
    let y = 1.0
        - t * (0.254_829_6
            + t * (-0.284_496_74 + t * (1.421_413_8 + t * (-1.453_152_1 + t * 1.061_405_4))))
            * exp(-a * a);
    y.copysign(x)
}
