//! The passes over the inputs. Work is split into units of at most
//! [`CHUNK`] elements of one tensor; units run in parallel (rayon) and each
//! reads its slice of every input once, through the memory maps, then hands
//! the pages back ([`cpu::release`]). Results are written straight to
//! their offsets in the output files, so memory is a few units per thread
//! whatever the number of clients or the model size.

use crate::cpu::{self, CHUNK};
use crate::plan::{Fault, Origin, Spec, Src};
use crate::strategy::{Kind, ServerOpt};
use ftk::tensor_writer::StreamWriter;
use ftk::tensors::{dtype_bytes, Dtype, Tensor};
use ftk::Error;
use rand_distr::{Distribution, Normal};
use rayon::prelude::*;
use std::sync::atomic::{AtomicU64, Ordering};

type R<T> = std::result::Result<T, Fault>;

/// Server-side DP (Flower's fixed clipping wrapper): per-origin clip scale
/// and the Gaussian noise added to the result.
pub struct Dp {
    /// min(1, C / ||x_i - global||) per origin (1 for partial sums).
    pub scale: Vec<f64>,
    pub noise_std: f64,
    pub seed: u64,
}

/// Where results go. Indices are spec indices; `state_base[i]` is the index
/// of spec i's first state slot in the state writer.
#[derive(Default)]
pub struct Sinks<'w> {
    pub out: Option<&'w StreamWriter>,
    pub partial: Option<&'w StreamWriter>,
    pub state: Option<&'w StreamWriter>,
    pub state_base: Vec<Option<usize>>,
}

impl Sinks<'_> {
    /// A unit's weighted sums into the partial file (f64), if one is written.
    fn write_partial(&self, u: Unit, acc: &[f64], bytes: &mut Vec<u8>) -> R<()> {
        if let Some(p) = self.partial {
            bytes.clear();
            cpu::encode(Dtype::F64, acc, bytes);
            p.write_at(u.spec, (u.start * 8) as u64, bytes)?;
        }
        Ok(())
    }

    /// A unit's results into the output file, in the spec's dtype, if one is written.
    fn write_out(&self, spec: &Spec, u: Unit, acc: &[f64], bytes: &mut Vec<u8>) -> R<()> {
        if let Some(out) = self.out {
            bytes.clear();
            cpu::encode(spec.dtype, acc, bytes);
            let w = dtype_bytes(spec.dtype).unwrap_or(0);
            out.write_at(u.spec, (u.start * w) as u64, bytes)?;
        }
        Ok(())
    }

    /// A plain weighted mean from its weighted sum `acc` (which becomes the
    /// mean, divided by the total weight `w`): the partial sum, then the mean
    /// in the spec's dtype. The CUDA pass's tail, with no server optimiser,
    /// DP or selection.
    pub(crate) fn write_mean(&self, spec: &Spec, u: Unit, acc: &mut [f64], w: f64) -> R<()> {
        let mut bytes = Vec::new();
        self.write_partial(u, acc, &mut bytes)?;
        if self.out.is_some() {
            acc.iter_mut().for_each(|a| *a /= w);
            self.write_out(spec, u, acc, &mut bytes)?;
        }
        Ok(())
    }
}

/// Everything a pass needs.
pub struct Job<'a> {
    pub origins: &'a [Origin],
    pub specs: &'a [Spec<'a>],
    pub kind: Kind,
    pub opt: ServerOpt,
    /// This round (1 = first).
    pub round: u64,
    /// Previous optimiser state per spec and slot (None: zeros / first round).
    pub state_in: Vec<Vec<Option<Tensor<'a>>>>,
    pub dp: Option<Dp>,
    /// Origins taking part in the final pass (Krum / Bulyan selection).
    pub select: Option<Vec<bool>>,
    pub bytes_read: AtomicU64,
    pub bar: indicatif::ProgressBar,
    /// Data ranges of every memory map, sorted (see [`cpu::release`]).
    pub spans: Vec<(usize, usize)>,
    /// Specs the CPU passes cover (None: all); the CUDA pass did the rest.
    pub cpu_only: Option<Vec<bool>>,
}

#[derive(Clone, Copy)]
pub(crate) struct Unit {
    pub spec: usize,
    pub start: usize,
    pub len: usize,
}

#[derive(Default)]
struct Scratch {
    acc: Vec<f64>,
    buf: Vec<f64>,
    g: Vec<f64>,
    vals: Vec<f64>,
    col: Vec<f64>,
    pairs: Vec<(f64, f64)>,
    bytes: Vec<u8>,
    st: Vec<Vec<f64>>,
}

fn non_finite_msg(label: &str, tensor: &str, k: usize, v: f64) -> String {
    format!("{label}: tensor '{tensor}' element {k} is {v} (NaN/Inf update)")
}

impl<'a> Job<'a> {
    /// A NaN/Inf in one source's values: that client is at fault.
    fn non_finite(&self, src: &Src, spec: &Spec, k: usize, v: f64) -> Fault {
        Fault::Client(
            src.origin,
            non_finite_msg(&self.origins[src.origin].label, &spec.name, k, v),
        )
    }

    fn units(&self) -> Vec<Unit> {
        let mut u = Vec::new();
        for (i, s) in self.specs.iter().enumerate() {
            if self.cpu_only.as_ref().is_some_and(|m| !m[i]) {
                continue;
            }
            let mut start = 0;
            while start < s.numel {
                let len = CHUNK.min(s.numel - start);
                u.push(Unit {
                    spec: i,
                    start,
                    len,
                });
                start += len;
            }
        }
        u
    }

    fn selected(&self, src: &Src) -> bool {
        self.select.as_ref().is_none_or(|m| m[src.origin])
    }

    fn read(&self, t: &Tensor, start: usize, out: &mut [f64]) {
        cpu::decode(t.dtype, t.data, start, out);
        let w = dtype_bytes(t.dtype).unwrap_or(0);
        self.bytes_read
            .fetch_add((out.len() * w) as u64, Ordering::Relaxed);
        self.release(&t.data[start * w..(start + out.len()) * w]);
    }

    /// Give consumed mapped pages back (clamped to their file's mapping).
    pub(crate) fn release(&self, bytes: &[u8]) {
        let p = bytes.as_ptr() as usize;
        let i = self.spans.partition_point(|s| s.0 <= p);
        if i > 0 {
            let span = self.spans[i - 1];
            if p + bytes.len() <= span.1 {
                cpu::release(bytes, span);
            }
        }
    }

    /// The global's values for a unit, checked finite.
    fn load_global(&self, spec: &Spec, u: Unit, g: &mut Vec<f64>) -> R<bool> {
        let Some(t) = &spec.global else {
            return Ok(false);
        };
        g.resize(u.len, 0.0);
        self.read(t, u.start, g);
        if let Some(k) = cpu::first_non_finite(g) {
            return Err(Fault::Fatal(Error::input(non_finite_msg(
                "global",
                &spec.name,
                u.start + k,
                g[k],
            ))));
        }
        Ok(true)
    }

    /// One source's (clipped) values for a unit, checked finite.
    fn load_src(&self, spec: &Spec, src: &Src, u: Unit, g: &[f64], out: &mut [f64]) -> R<()> {
        self.read(&src.t, u.start, out);
        if let Some(k) = cpu::first_non_finite(out) {
            return Err(self.non_finite(src, spec, u.start + k, out[k]));
        }
        if let (Some(dp), false) = (&self.dp, src.summed) {
            let s = dp.scale[src.origin];
            if s != 1.0 {
                for (x, gv) in out.iter_mut().zip(g) {
                    *x = gv + s * (*x - gv);
                }
            }
        }
        Ok(())
    }

    fn run_units<T: Send>(
        &self,
        f: impl Fn(&mut Scratch, Unit) -> R<T> + Sync + Send,
    ) -> R<Vec<T>> {
        let units = self.units();
        self.bar.set_length(units.len() as u64);
        self.bar.set_position(0);
        units
            .par_iter()
            .map_init(Scratch::default, |s, &u| {
                let r = f(s, u);
                self.bar.inc(1);
                r
            })
            .collect()
    }

    /// DP pass: squared L2 norm of each origin's update against the global.
    pub fn update_norms(&self) -> R<Vec<f64>> {
        let n = self.origins.len();
        let parts = self.run_units(|s, u| {
            let spec = &self.specs[u.spec];
            let mut sq = vec![0.0f64; n];
            if !self.load_global(spec, u, &mut s.g)? {
                return Err(Fault::Fatal(Error::input(format!(
                    "--clip-norm needs the global value of tensor '{}' (give --global)",
                    spec.name
                ))));
            }
            s.buf.resize(u.len, 0.0);
            for src in spec.sources.iter().filter(|s| !s.summed) {
                self.read(&src.t, u.start, &mut s.buf);
                let mut acc = 0.0;
                for (x, g) in s.buf.iter().zip(&s.g) {
                    acc += (x - g) * (x - g);
                }
                if !acc.is_finite() {
                    let k = cpu::first_non_finite(&s.buf).unwrap_or(0);
                    return Err(self.non_finite(src, spec, u.start + k, s.buf[k]));
                }
                sq[src.origin] += acc;
            }
            Ok(sq)
        })?;
        // Summed in unit order, so the result does not depend on scheduling.
        let mut tot = vec![0.0; n];
        for p in parts {
            tot.iter_mut().zip(p).for_each(|(t, v)| *t += v);
        }
        Ok(tot)
    }

    /// Krum pass: squared Euclidean distances between origins' flattened
    /// parameters (row-major n x n).
    pub fn distances(&self) -> R<Vec<f64>> {
        let n = self.origins.len();
        let parts = self.run_units(|s, u| {
            let spec = &self.specs[u.spec];
            let has_g = self.dp.is_some() && self.load_global(spec, u, &mut s.g)?;
            let srcs: Vec<&Src> = spec.sources.iter().collect();
            s.vals.resize(srcs.len() * u.len, 0.0);
            for (j, src) in srcs.iter().enumerate() {
                let (g, row) = (
                    &s.g[..if has_g { u.len } else { 0 }],
                    &mut s.vals[j * u.len..(j + 1) * u.len],
                );
                self.load_src(spec, src, u, g, row)?;
            }
            let mut d = vec![0.0f64; n * n];
            for a in 0..srcs.len() {
                for b in a + 1..srcs.len() {
                    let (xa, xb) = (
                        &s.vals[a * u.len..(a + 1) * u.len],
                        &s.vals[b * u.len..(b + 1) * u.len],
                    );
                    let mut acc = 0.0;
                    for (x, y) in xa.iter().zip(xb) {
                        acc += (x - y) * (x - y);
                    }
                    let (i, j) = (srcs[a].origin, srcs[b].origin);
                    d[i * n + j] += acc;
                    d[j * n + i] += acc;
                }
            }
            Ok(d)
        })?;
        let mut tot = vec![0.0; n * n];
        for p in parts {
            tot.iter_mut().zip(p).for_each(|(t, v)| *t += v);
        }
        Ok(tot)
    }

    /// The final pass: compute every output value and write it.
    pub fn finish(&self, sinks: &Sinks) -> R<()> {
        // Total weight per spec over the selected sources.
        let weights: Vec<f64> = self
            .specs
            .iter()
            .map(|s| {
                s.sources
                    .iter()
                    .filter(|x| self.selected(x))
                    .map(|x| x.weight)
                    .sum()
            })
            .collect();
        self.run_units(|s, u| {
            let spec = &self.specs[u.spec];
            let need_g = self.opt.needs_global() || self.dp.is_some() || spec.sources.is_empty();
            let has_g = need_g && self.load_global(spec, u, &mut s.g)?;
            let g: &[f64] = if has_g { &s.g } else { &[] };
            s.acc.clear();
            s.acc.resize(u.len, 0.0);
            match self.kind {
                Kind::Linear { .. } | Kind::Krum { .. } => {
                    self.accumulate(spec, u, g, &mut s.acc, &mut s.buf)?;
                    sinks.write_partial(u, &s.acc, &mut s.bytes)?;
                    if sinks.out.is_none() {
                        return Ok(());
                    }
                    let w = weights[u.spec];
                    if w > 0.0 {
                        s.acc.iter_mut().for_each(|a| *a /= w);
                    } else if has_g {
                        s.acc.copy_from_slice(g);
                    } else {
                        return Err(Fault::Fatal(Error::input(format!(
                            "tensor '{}': no client holds it and there is no --global value to keep",
                            spec.name
                        ))));
                    }
                    if w > 0.0 && !cpu::is_int(spec.dtype) && self.opt.needs_global() {
                        let gv = std::mem::take(&mut s.g);
                        self.server_step(spec, u, &gv, s, sinks)?;
                        s.g = gv;
                    }
                }
                Kind::Median | Kind::TrimmedMean { .. } | Kind::Bulyan { .. } => {
                    let srcs: Vec<&Src> =
                        spec.sources.iter().filter(|x| self.selected(x)).collect();
                    s.vals.resize(srcs.len() * u.len, 0.0);
                    for (j, src) in srcs.iter().enumerate() {
                        self.load_src(spec, src, u, g, &mut s.vals[j * u.len..(j + 1) * u.len])?;
                    }
                    let n = srcs.len();
                    for k in 0..u.len {
                        s.col.clear();
                        s.col.extend((0..n).map(|j| s.vals[j * u.len + k]));
                        s.acc[k] = match self.kind {
                            Kind::Median => cpu::median(&mut s.col),
                            Kind::TrimmedMean { beta } => {
                                let cut = (beta * n as f64) as usize;
                                cpu::trimmed_mean(&mut s.col, cut)
                            }
                            Kind::Bulyan { f } => {
                                cpu::mean_of_closest(&mut s.col, n - 2 * f, &mut s.pairs)
                            }
                            _ => unreachable!(),
                        };
                    }
                }
            }
            if let Some(dp) = &self.dp {
                if dp.noise_std > 0.0 && !cpu::is_int(spec.dtype) {
                    let mut rng = ftk::rng::stream(
                        dp.seed,
                        ftk::rng::stream_id(&[u.spec as u64, u.start as u64]),
                    );
                    let normal = Normal::new(0.0, dp.noise_std)
                        .map_err(|e| Fault::Fatal(Error::input(format!("noise: {e}"))))?;
                    s.acc
                        .iter_mut()
                        .for_each(|v| *v += normal.sample(&mut rng));
                }
            }
            sinks.write_out(spec, u, &s.acc, &mut s.bytes)?;
            Ok(())
        })?;
        Ok(())
    }

    /// acc = sum of weight * value over the selected sources of one unit.
    pub(crate) fn accumulate(
        &self,
        spec: &Spec,
        u: Unit,
        g: &[f64],
        acc: &mut [f64],
        buf: &mut Vec<f64>,
    ) -> R<()> {
        buf.resize(u.len, 0.0);
        for src in spec.sources.iter().filter(|x| self.selected(x)) {
            if src.summed {
                self.read(&src.t, u.start, buf);
                cpu::axpy(acc, 1.0, buf);
            } else if src.t.dtype == Dtype::F32 && self.dp.is_none() {
                // Fast path: straight from the mapped bytes.
                cpu::axpy_f32(acc, src.weight, src.t.data, u.start);
                self.bytes_read
                    .fetch_add((u.len * 4) as u64, Ordering::Relaxed);
                self.release(&src.t.data[u.start * 4..(u.start + u.len) * 4]);
            } else {
                self.load_src(spec, src, u, g, buf)?;
                cpu::axpy(acc, src.weight, buf);
            }
        }
        if cpu::first_non_finite(acc).is_some() {
            // Rare path: find the culprit to name it.
            for src in spec.sources.iter().filter(|x| self.selected(x)) {
                self.read(&src.t, u.start, buf);
                if let Some(k) = cpu::first_non_finite(buf) {
                    let who = &self.origins[src.origin].label;
                    let m = non_finite_msg(who, &spec.name, u.start + k, buf[k]);
                    return Err(if src.summed {
                        Fault::Fatal(Error::input(m))
                    } else {
                        Fault::Client(src.origin, m)
                    });
                }
            }
            return Err(Fault::Fatal(Error::input(format!(
                "tensor '{}': the weighted sum overflowed (weights too large?)",
                spec.name
            ))));
        }
        Ok(())
    }

    /// Apply the server optimiser to `s.acc` (the average) in place and write
    /// the new state.
    fn server_step(
        &self,
        spec: &Spec,
        u: Unit,
        g: &[f64],
        s: &mut Scratch,
        sinks: &Sinks,
    ) -> R<()> {
        let slots = self.opt.state_slots();
        s.st.resize(slots.len(), Vec::new());
        for (k, st) in s.st.iter_mut().enumerate() {
            st.clear();
            st.resize(u.len, 0.0);
            if let Some(t) = &self.state_in[u.spec][k] {
                self.read(t, u.start, st);
                if let Some(e) = cpu::first_non_finite(st) {
                    return Err(Fault::Fatal(Error::input(format!(
                        "state: tensor '{}/{}' element {} is not finite",
                        slots[k],
                        spec.name,
                        u.start + e
                    ))));
                }
            }
        }
        let r = self.round as f64;
        let acc = &mut s.acc;
        match self.opt {
            ServerOpt::None => {}
            ServerOpt::AvgM { lr, momentum } if momentum > 0.0 => {
                for ((a, gv), mom) in acc.iter_mut().zip(g).zip(s.st[0].iter_mut()) {
                    let pg = gv - *a;
                    // Flower: round 1 starts the momentum at the pseudo-gradient.
                    *mom = if self.round > 1 {
                        momentum * *mom + pg
                    } else {
                        pg
                    };
                    *a = gv - lr * *mom;
                }
            }
            ServerOpt::AvgM { lr, .. } => {
                for (a, gv) in acc.iter_mut().zip(g) {
                    *a = gv - lr * (gv - *a);
                }
            }
            ServerOpt::Adam {
                eta,
                beta1,
                beta2,
                tau,
            } => {
                // Flower: eta_norm = eta * sqrt(1 - b2^(t+1)) / (1 - b1^(t+1)).
                let eta_norm =
                    eta * (1.0 - beta2.powf(r + 1.0)).sqrt() / (1.0 - beta1.powf(r + 1.0));
                let (m, v) = s.st.split_at_mut(1);
                for (((a, gv), m), v) in acc.iter_mut().zip(g).zip(&mut m[0]).zip(&mut v[0]) {
                    let d = *a - gv;
                    *m = beta1 * *m + (1.0 - beta1) * d;
                    *v = beta2 * *v + (1.0 - beta2) * d * d;
                    *a = gv + eta_norm * *m / (v.sqrt() + tau);
                }
            }
            ServerOpt::Yogi {
                eta,
                beta1,
                beta2,
                tau,
            } => {
                let (m, v) = s.st.split_at_mut(1);
                for (((a, gv), m), v) in acc.iter_mut().zip(g).zip(&mut m[0]).zip(&mut v[0]) {
                    let d = *a - gv;
                    let d2 = d * d;
                    *m = beta1 * *m + (1.0 - beta1) * d;
                    *v -= (1.0 - beta2) * d2 * sign(*v - d2);
                    *a = gv + eta * *m / (v.sqrt() + tau);
                }
            }
            ServerOpt::Adagrad { eta, tau } => {
                // beta1 = 0: the first moment is this round's delta.
                for ((a, gv), v) in acc.iter_mut().zip(g).zip(&mut s.st[0]) {
                    let d = *a - gv;
                    *v += d * d;
                    *a = gv + eta * d / (v.sqrt() + tau);
                }
            }
        }
        if let (Some(w), Some(base)) = (sinks.state, sinks.state_base[u.spec]) {
            for (k, st) in s.st.iter().enumerate() {
                s.bytes.clear();
                cpu::encode(Dtype::F32, st, &mut s.bytes);
                w.write_at(base + k, (u.start * 4) as u64, &s.bytes)?;
            }
        }
        Ok(())
    }
}

/// numpy's sign: -1, 0 or 1.
fn sign(x: f64) -> f64 {
    if x > 0.0 {
        1.0
    } else if x < 0.0 {
        -1.0
    } else {
        0.0
    }
}

/// Flower's Krum score of each origin in `idx`: the sum of its
/// `max(1, n - f - 2)` smallest distances to the others (its zero distance to
/// itself, first after sorting, is skipped).
pub fn krum_scores(d: &[f64], n_all: usize, idx: &[usize], f: usize) -> Vec<f64> {
    let n = idx.len();
    let closest = (n as isize - f as isize - 2).max(1) as usize;
    idx.iter()
        .map(|&i| {
            let mut row: Vec<f64> = idx.iter().map(|&j| d[i * n_all + j]).collect();
            row.sort_by(f64::total_cmp);
            row[1.min(n)..(closest + 1).min(n)].iter().sum()
        })
        .collect()
}

/// Index of the first minimum (numpy argmin).
pub fn argmin(v: &[f64]) -> usize {
    let mut best = 0;
    for (i, x) in v.iter().enumerate() {
        if *x < v[best] {
            best = i;
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn krum_scores_skip_self_and_sum_the_closest() {
        // 4 points on a line: 0, 1, 3, 10.
        let p = [0.0f64, 1.0, 3.0, 10.0];
        let n = 4;
        let mut d = vec![0.0; 16];
        for i in 0..n {
            for j in 0..n {
                d[i * n + j] = (p[i] - p[j]).powi(2);
            }
        }
        // f = 0: closest = 2.
        let s = krum_scores(&d, n, &[0, 1, 2, 3], 0);
        assert_eq!(s, vec![1.0 + 9.0, 1.0 + 4.0, 4.0 + 9.0, 49.0 + 81.0]);
        assert_eq!(argmin(&s), 1);
        // f large: closest = max(1, ..) = 1.
        let s = krum_scores(&d, n, &[0, 2, 3], 5);
        assert_eq!(s, vec![9.0, 9.0, 49.0]);
        assert_eq!(argmin(&s), 0);
    }
}
