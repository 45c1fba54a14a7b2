//! GEMM throughput on SD-1.5's shapes, as the conv / linear / attention kernels call it,
//! against the machine's f32 FMA peak. A measurement, not a test: `#[ignore]`d, run with
//! `cargo test --release -p diffuse-synth gemm_bench -- --ignored --nocapture`.
//! Each shape runs on every thread at once (own operands per thread), as the kernels run
//! their single-threaded GEMMs side by side. Rates are GFLOP per CPU second of each
//! thread (the machine is shared: wall time would count other processes' turns),
//! summed over the threads.

/// How a kernel calls the GEMM: c (+)= alpha · a · b with (column, row) strides.
#[derive(Clone, Copy)]
struct Shape {
    name: &'static str,
    m: usize,
    n: usize,
    k: usize,
    /// (column, row) strides of c, a, b
    c: (usize, usize),
    a: (usize, usize),
    b: (usize, usize),
    acc: bool,
    /// about how many times the kernels run it per SD-1.5 step at batch 2 (a FLOP weight
    /// for the summary line; counted from the UNet's block layout)
    per_step: usize,
}

fn rowmaj(cols: usize) -> (usize, usize) {
    (1, cols)
}

/// The shapes that carry a SD-1.5 step's FLOPs (512x512, CFG batch 2), with the
/// strides and accumulate flags of the call sites.
fn shapes() -> Vec<Shape> {
    let mut v = Vec::new();
    // conv taps (conv.rs forward_taps): M = co, N = band rows · (w + 2), K = ci,
    // b rows `plane` apart, accumulating after the first tap
    for &(name, w, ci, co, per_step) in &[
        ("tap 64x64 320->320", 64usize, 320usize, 320usize, 9 * 2 * 7),
        ("tap 64x64 640->320", 64, 640, 320, 9 * 2 * 2),
        ("tap 64x64 640->640", 64, 640, 640, 9 * 2),
        ("tap 32x32 640->640", 32, 640, 640, 9 * 2 * 6),
        ("tap 32x32 1280->1280", 32, 1280, 1280, 9 * 2),
    ] {
        let wp = w + 2;
        let rows = ((1usize << 18) / (co * wp)).clamp(1, w);
        let nq = rows * wp;
        let plane = wp * wp;
        v.push(Shape {
            name,
            m: co,
            n: nq,
            k: ci,
            c: rowmaj(nq),
            a: rowmaj(ci),
            b: (1, plane),
            acc: true,
            per_step: per_step * w.div_ceil(rows),
        });
    }
    // im2col convs (16x16, 8x8 planes): out[co, np] = W[co, 9 ci] · col[9 ci, np]
    for &(name, np, ci, co, per_step) in &[
        ("im2col 16x16 1280", 256usize, 1280usize, 1280usize, 2 * 7),
        ("im2col 8x8 1280", 64, 1280, 1280, 2 * 11),
    ] {
        v.push(Shape {
            name,
            m: co,
            n: np,
            k: 9 * ci,
            c: rowmaj(np),
            a: rowmaj(9 * ci),
            b: rowmaj(np),
            acc: false,
            per_step,
        });
    }
    // linear layers (linear.rs, matmul_bt): y[m, o] (+)= x[m, i] · W[o, i]ᵀ
    for &(name, m, i, o, per_step) in &[
        (
            "linear 4096x320x320",
            4096usize,
            320usize,
            320usize,
            2 * 5 * 6,
        ),
        ("geglu blk 64x320x2560", 64, 320, 2560, 2 * 5 * 64),
        ("linear 4096x1280x320", 4096, 1280, 320, 2 * 5),
        ("linear 1024x640x640", 1024, 640, 640, 2 * 5 * 6),
        ("linear 1024x640x5120", 1024, 640, 5120, 2 * 5),
        // the same projection as 64-row blocks (not fused below 2048 rows today)
        ("geglu blk 64x640x5120", 64, 640, 5120, 0),
        ("linear 1024x2560x640", 1024, 2560, 640, 2 * 5),
        ("linear 256x1280x1280", 256, 1280, 1280, 2 * 5 * 6),
    ] {
        v.push(Shape {
            name,
            m,
            n: o,
            k: i,
            c: rowmaj(o),
            a: rowmaj(i),
            b: (i, 1),
            acc: true,
            per_step,
        });
    }
    // 1x1 convs (proj_in / proj_out at 64x64): out[co, np] = W[co, ci] · x[ci, np]
    v.push(Shape {
        name: "conv1x1 320x4096x320",
        m: 320,
        n: 4096,
        k: 320,
        c: rowmaj(4096),
        a: rowmaj(320),
        b: rowmaj(4096),
        acc: true,
        per_step: 2 * 2 * 5,
    });
    // everything in L2: the register tile's own ceiling (no FLOP weight)
    v.push(Shape {
        name: "in-cache 240x256x256",
        m: 240,
        n: 256,
        k: 256,
        c: rowmaj(256),
        a: rowmaj(256),
        b: rowmaj(256),
        acc: true,
        per_step: 0,
    });
    // flash attention blocks at 64x64 (d = 40, 8 heads, hd = 320), column-major scores
    v.push(Shape {
        name: "attn QK^T 128x256x40",
        m: 128,
        n: 256,
        k: 40,
        c: (128, 1),
        a: (1, 320),
        b: (320, 1),
        acc: false,
        per_step: 2 * 8 * 32 * 16 * 5,
    });
    v.push(Shape {
        name: "attn PV 128x40x256",
        m: 128,
        n: 40,
        k: 256,
        c: (128, 1),
        a: (128, 1),
        b: (1, 320),
        acc: true,
        per_step: 2 * 8 * 32 * 16 * 5,
    });
    v
}

/// Elements a (column, row)-strided r x c matrix reaches.
fn span(r: usize, c: usize, (cs, rs): (usize, usize)) -> usize {
    (r - 1) * rs + (c - 1) * cs + 1
}

/// Operands of one shape, filled with small values.
struct Bufs {
    a: Vec<f32>,
    b: Vec<f32>,
    c: Vec<f32>,
}

fn bufs(s: &Shape, seed: u32) -> Bufs {
    let fill = |n: usize, s: u32| {
        (0..n)
            .map(|i| {
                ((i as u32).wrapping_mul(2_654_435_761).wrapping_add(s) >> 20) as f32 / 4096.0 - 0.5
            })
            .collect::<Vec<f32>>()
    };
    Bufs {
        a: fill(span(s.m, s.k, s.a), seed),
        b: fill(span(s.k, s.n, s.b), seed + 1),
        c: fill(span(s.m, s.n, s.c), seed + 2),
    }
}

/// One GEMM of shape `s` by the `gemm` crate, as `attention::gemm_s` calls it.
fn run_crate(s: &Shape, o: &mut Bufs) {
    // SAFETY: the buffers span every element the strides reach (`bufs`).
    unsafe {
        super::attention::gemm_s(
            (s.m, s.n, s.k),
            o.c.as_mut_ptr(),
            s.c,
            s.acc,
            o.a.as_ptr(),
            s.a,
            o.b.as_ptr(),
            s.b,
            1.0,
        )
    }
}

/// Blocking for [`run_ours`]: `GEMM_BENCH_BLOCKING=kc,mc,nc,direct_a,a_in_l1` (flags 0/1) overrides the default.
fn blocking() -> super::sgemm::Blocking {
    let v: Vec<usize> = std::env::var("GEMM_BENCH_BLOCKING")
        .unwrap_or_default()
        .split(',')
        .filter_map(|x| x.parse().ok())
        .collect();
    match v[..] {
        [kc, mc, nc, d, l] => super::sgemm::Blocking {
            kc,
            mc,
            nc,
            direct_a: d != 0,
            a_in_l1: l != 0,
        },
        _ => super::sgemm::BLOCKING,
    }
}

/// One GEMM of shape `s` by [`super::sgemm`].
fn run_ours(s: &Shape, o: &mut Bufs) {
    // SAFETY: as in `run_crate`.
    unsafe {
        super::sgemm::gemm_with(
            blocking(),
            (s.m, s.n, s.k),
            o.c.as_mut_ptr(),
            s.c,
            s.acc,
            o.a.as_ptr(),
            s.a,
            o.b.as_ptr(),
            s.b,
            1.0,
        )
    }
}

/// CPU seconds this thread has run: the machine is shared, so throughput is counted per
/// CPU second, not per wall second.
fn thread_cpu() -> f64 {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid out pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut t) };
    t.tv_sec as f64 + t.tv_nsec as f64 * 1e-9
}

/// Runs `rate(t)` on threads t = 0..threads at once; the sum of their rates.
fn on_threads(threads: usize, rate: impl Fn(usize) -> f64 + Sync) -> f64 {
    let rate = &rate;
    std::thread::scope(|sc| {
        let hs: Vec<_> = (0..threads).map(|t| sc.spawn(move || rate(t))).collect();
        hs.into_iter().map(|h| h.join().unwrap_or(0.0)).sum()
    })
}

/// GFLOP per CPU second, summed over threads, of `f` on shape `s` with `threads`
/// threads each running it on their own operands.
fn gflops(s: &Shape, threads: usize, f: fn(&Shape, &mut Bufs)) -> f64 {
    let flop = 2.0 * (s.m * s.n * s.k) as f64;
    // about 0.1 s per thread per measurement
    let reps = ((2e10 / flop) as usize).max(3);
    on_threads(threads, |t| {
        let mut b = bufs(s, 7 * t as u32);
        // warm up (packing buffers, page faults)
        f(s, &mut b);
        let t0 = thread_cpu();
        for _ in 0..reps {
            f(s, &mut b);
        }
        flop * reps as f64 / (thread_cpu() - t0) / 1e9
    })
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn fma_loop(iters: usize) -> f32 {
    use std::arch::x86_64::*;
    // 16 independent chains: twice the FMA latency x pipes of any current core
    let mut acc = [_mm512_set1_ps(0.0); 16];
    let a = _mm512_set1_ps(0.999_9);
    let b = _mm512_set1_ps(1e-4);
    for _ in 0..iters {
        for x in acc.iter_mut() {
            *x = _mm512_fmadd_ps(*x, a, b);
        }
    }
    let mut s = _mm512_setzero_ps();
    for x in acc {
        s = _mm512_add_ps(s, x);
    }
    _mm512_reduce_add_ps(s)
}

/// f32 FMA peak in GFLOP per CPU second with `threads` threads (register-only loop).
#[cfg(target_arch = "x86_64")]
fn peak(threads: usize) -> f64 {
    let iters = 20_000_000usize;
    on_threads(threads, |_| {
        let t0 = thread_cpu();
        // SAFETY: the caller checked avx512f.
        std::hint::black_box(unsafe { fma_loop(std::hint::black_box(iters)) });
        (iters * 16 * 16 * 2) as f64 / (thread_cpu() - t0) / 1e9
    })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

#[test]
#[ignore = "measurement: run with --ignored --nocapture"]
fn gemm_bench() {
    #[cfg(target_arch = "x86_64")]
    if !std::arch::is_x86_feature_detected!("avx512f") {
        eprintln!("no avx512f: nothing to measure");
        return;
    }
    let reps: usize = std::env::var("GEMM_BENCH_REPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let only = std::env::var("GEMM_BENCH_ONLY").unwrap_or_default();
    let ours = std::env::var("GEMM_BENCH_OURS").is_ok_and(|v| v == "1");
    // threads running GEMMs side by side (the kernels' 2 by default)
    let threads: usize = std::env::var("GEMM_BENCH_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2);
    let p1 = median((0..reps).map(|_| peak(1)).collect());
    let p2 = median((0..reps).map(|_| peak(2)).collect());
    println!("FMA peak: 1 thread {p1:.1} GFLOP/s, 2 threads {p2:.1} GFLOP/s");
    let p2 = if threads == 1 { p1 } else { p2 };
    println!(
        "{:<24} {:>6} {:>6} {:>6} {:>9} {:>8} {:>9} {:>8} {:>7}",
        "shape", "M", "N", "K", "crate GF", "%peak", "ours GF", "%peak", "GFLOP"
    );
    let (mut wc, mut wo, mut tot) = (0f64, 0f64, 0f64);
    for s in shapes().iter().filter(|s| s.name.contains(&only)) {
        let (mut c, mut o) = (Vec::new(), Vec::new());
        // interleaved: crate, ours, crate, ours, ...
        for _ in 0..reps {
            c.push(gflops(s, threads, run_crate));
            if ours {
                o.push(gflops(s, threads, run_ours));
            }
        }
        let gc = median(c);
        let go = if ours { median(o) } else { f64::NAN };
        let gf = 2.0 * (s.m * s.n * s.k * s.per_step) as f64 / 1e9;
        tot += gf;
        wc += gf / gc;
        wo += gf / go;
        println!(
            "{:<24} {:>6} {:>6} {:>6} {:>9.1} {:>7.0}% {:>9.1} {:>7.0}% {:>7.1}",
            s.name,
            s.m,
            s.n,
            s.k,
            gc,
            100.0 * gc / p2,
            go,
            100.0 * go / p2,
            gf
        );
    }
    // GEGLU's blocks with the weight packed once per call (as `forward_geglu` does; the
    // packing, shared by a call's 2 x 64 blocks, is left out)
    for s in shapes()
        .iter()
        .filter(|s| ours && s.name.starts_with("geglu") && s.name.contains(&only))
    {
        let b = bufs(s, 1).b;
        let pb = super::sgemm::PackedB::new(&b, s.b, s.k, s.n);
        let flop = 2.0 * (s.m * s.n * s.k) as f64;
        let reps_n = ((2e10 / flop) as usize).max(3);
        let (mut c, mut o) = (Vec::new(), Vec::new());
        for _ in 0..reps {
            c.push(gflops(s, threads, run_crate));
            o.push(on_threads(threads, |t| {
                let mut bb = bufs(s, 7 * t as u32);
                super::sgemm::gemm_packed(&mut bb.c, s.m, s.acc, &bb.a, &pb, 1.0);
                let t0 = thread_cpu();
                for _ in 0..reps_n {
                    super::sgemm::gemm_packed(&mut bb.c, s.m, s.acc, &bb.a, &pb, 1.0);
                }
                flop * reps_n as f64 / (thread_cpu() - t0) / 1e9
            }));
        }
        let (gc, go) = (median(c), median(o));
        println!(
            "{:<24} {:>6} {:>6} {:>6} {:>9.1} {:>7.0}% {:>9.1} {:>7.0}%",
            format!("{}, W prepacked", s.name),
            s.m,
            s.n,
            s.k,
            gc,
            100.0 * gc / p2,
            go,
            100.0 * go / p2
        );
    }
    println!(
        "FLOP-weighted over these shapes ({tot:.0} GFLOP/step): crate {:.1} GFLOP/s, ours {:.1} GFLOP/s",
        tot / wc,
        tot / wo
    );
}
