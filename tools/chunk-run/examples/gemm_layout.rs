//! Single-threaded GFLOP/s of x·Wᵀ with W stored [out,in] (packed by the
//! kernel on every call) against x·W with W stored [in,out] (used in place).
fn main() {
    let (n, k) = (2816usize, 1024usize);
    let w = vec![0.01f32; n * k];
    for m in [64usize, 128, 256, 512, 1024] {
        let a = vec![0.02f32; m * k];
        let mut c = vec![0f32; m * n];
        let reps = (2048 / m).max(2);
        let flops = 2.0 * (reps * m * n * k) as f64;
        let t = std::time::Instant::now();
        for _ in 0..reps {
            chunk_run::linalg::serial(|| {
                chunk_run::linalg::matmul_bt(&mut c, &a, &w, m, n, k, false)
            });
        }
        let bt = flops / t.elapsed().as_secs_f64() / 1e9;
        let t = std::time::Instant::now();
        for _ in 0..reps {
            chunk_run::linalg::serial(|| chunk_run::linalg::matmul(&mut c, &a, &w, m, n, k, false));
        }
        let nn = flops / t.elapsed().as_secs_f64() / 1e9;
        println!("m={m:5} W[out,in] {bt:.0} GFLOP/s   W[in,out] {nn:.0} GFLOP/s");
    }
}
