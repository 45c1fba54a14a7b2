//! GFLOP/s of the expert GEMM shapes by row count (a development probe):
//! one GEMM at a time on all threads, against 8 independent GEMMs spread
//! over the threads with single-threaded kernels.
use rayon::prelude::*;

fn main() {
    let (n, k) = (2816usize, 1024usize);
    let ws: Vec<Vec<f32>> = (0..8).map(|_| vec![0.01f32; n * k]).collect();
    for m in [64usize, 128, 256, 512, 1024] {
        let a = vec![0.02f32; m * k];
        let mut cs: Vec<Vec<f32>> = (0..8).map(|_| vec![0f32; m * n]).collect();
        let flops = 2.0 * (8 * m * n * k) as f64;
        let t = std::time::Instant::now();
        for (c, w) in cs.iter_mut().zip(&ws) {
            chunk_run::linalg::matmul_bt(c, &a, w, m, n, k, false);
        }
        let seq = flops / t.elapsed().as_secs_f64() / 1e9;
        let t = std::time::Instant::now();
        cs.par_iter_mut().zip(ws.par_iter()).for_each(|(c, w)| {
            chunk_run::linalg::serial(|| chunk_run::linalg::matmul_bt(c, &a, w, m, n, k, false))
        });
        let par = flops / t.elapsed().as_secs_f64() / 1e9;
        println!("m={m:5} one-at-a-time {seq:.0} GFLOP/s, side-by-side {par:.0} GFLOP/s");
    }
}
