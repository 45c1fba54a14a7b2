//! Privacy accounting for the server-side fixed-clipping Gaussian mechanism.
//!
//! Each client's update is clipped to L2 norm C and the mean of n clients
//! gets Gaussian noise of standard deviation z*C/n (Flower's
//! `compute_stdv`). Adding or removing one client moves the sum by at most
//! C, so one round is a Gaussian mechanism with noise multiplier z. The
//! (epsilon, delta) reported is that of one round, from the analytic
//! Gaussian mechanism (Balle & Wang 2018, Theorem 8):
//!   delta(eps) = Phi(1/(2z) - eps*z) - e^eps * Phi(-1/(2z) - eps*z),
//! solved for the smallest eps with delta(eps) <= delta. It assumes the n
//! clients are the whole population of the round (no sampling
//! amplification) and says nothing about composition over rounds.

/// ln(erfc(x)) for x >= 0 (Numerical Recipes `erfcc`, fractional error
/// below 1.2e-7 everywhere, evaluated in log space so tails do not underflow).
fn ln_erfc_pos(x: f64) -> f64 {
    let t = 1.0 / (1.0 + 0.5 * x);
    let poly = -x * x - 1.265_512_23
        + t * (1.000_023_68
            + t * (0.374_091_96
                + t * (0.096_784_18
                    + t * (-0.186_288_06
                        + t * (0.278_868_07
                            + t * (-1.135_203_98
                                + t * (1.488_515_87 + t * (-0.822_152_23 + t * 0.170_872_77))))))));
    t.ln() + poly
}

/// ln(Phi(x)) for the standard normal CDF.
fn ln_phi(x: f64) -> f64 {
    let y = -x / std::f64::consts::SQRT_2;
    // Phi(x) = erfc(y) / 2
    if y >= 0.0 {
        ln_erfc_pos(y) - std::f64::consts::LN_2
    } else {
        (1.0 - 0.5 * ln_erfc_pos(-y).exp()).ln()
    }
}

fn delta_of(eps: f64, z: f64) -> f64 {
    let a = ln_phi(1.0 / (2.0 * z) - eps * z);
    let b = eps + ln_phi(-1.0 / (2.0 * z) - eps * z);
    a.exp() - b.exp()
}

/// Per-round epsilon at `delta` for noise multiplier `z`; `None` when z = 0
/// (no privacy).
pub fn epsilon(z: f64, delta: f64) -> Option<f64> {
    if z <= 0.0 || delta <= 0.0 {
        return None;
    }
    if delta_of(0.0, z) <= delta {
        return Some(0.0);
    }
    let mut hi = 1.0;
    while delta_of(hi, z) > delta {
        hi *= 2.0;
        if hi > 1e6 {
            return None;
        }
    }
    let mut lo = 0.0;
    for _ in 0..100 {
        let mid = 0.5 * (lo + hi);
        if delta_of(mid, z) > delta {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    Some(hi)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phi_is_accurate_in_body_and_tails() {
        // Phi(-1) = 0.158655253931457, Phi(-5) = 2.866515718791939e-7
        assert!((ln_phi(-1.0).exp() / 0.158_655_253_931_457 - 1.0).abs() < 2e-7);
        assert!((ln_phi(-5.0).exp() / 2.866_515_718_791_939e-7 - 1.0).abs() < 2e-7);
        assert!((ln_phi(2.0).exp() - 0.977_249_868_051_821).abs() < 1e-7);
    }

    #[test]
    fn epsilon_solves_the_analytic_condition_and_beats_the_classic_bound() {
        for z in [0.5, 1.0, 2.0, 5.0, 10.0] {
            let e = epsilon(z, 1e-5).unwrap();
            assert!((delta_of(e, z) / 1e-5 - 1.0).abs() < 1e-6, "z={z}");
            // Dwork-Roth: eps = sqrt(2 ln(1.25/delta)) / z suffices (for eps < 1).
            let classic = (2.0 * (1.25f64 / 1e-5).ln()).sqrt() / z;
            if classic < 1.0 {
                assert!(e < classic, "z={z}: {e} vs {classic}");
            }
        }
        assert!(epsilon(1.0, 1e-5).unwrap() > epsilon(2.0, 1e-5).unwrap());
        assert!(epsilon(0.0, 1e-5).is_none());
    }
}
