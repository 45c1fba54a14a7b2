//! CPU and CUDA histograms agree exactly (run when a GPU exists, skipped with
//! the reason otherwise); without a GPU, `--device cuda` is a clear usage error.

use std::path::PathBuf;

fn data() -> PathBuf {
    ftk_test::testdata("route-hist")
}

fn run(device: &str, args: &[&str]) -> std::process::Output {
    ftk_test::tool("route-hist")
        .current_dir(data())
        .arg("--device")
        .arg(device)
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn cuda_and_cpu_histograms_agree() {
    if let Err(why) = ftk::device::cuda_devices() {
        eprintln!("skipped: no CUDA device ({why})");
        let out = run("cuda", &["--experts", "8", "topk_e8_k2.safetensors"]);
        assert_eq!(out.status.code(), Some(2));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("--device cuda:0") && err.contains("--device cpu"),
            "{err}"
        );
        // auto falls back to the CPU silently
        let auto = run("auto", &["--experts", "8", "topk_e8_k2.safetensors"]);
        assert!(auto.status.success() && auto.stderr.is_empty());
        return;
    }
    for (file, flags) in [
        (
            "topk_e8_k2.safetensors",
            vec!["--experts", "8", "--ep", "2"],
        ),
        (
            "topk_e64_k8.safetensors",
            vec!["--experts", "64", "--ep", "8", "--capacity-factor", "1.5"],
        ),
    ] {
        let mut args = flags.clone();
        args.push(file);
        let (cpu, gpu) = (run("cpu", &args), run("cuda", &args));
        assert!(
            gpu.status.success(),
            "{}",
            String::from_utf8_lossy(&gpu.stderr)
        );
        assert_eq!(cpu.stdout, gpu.stdout, "{file}");
    }
    // out-of-range ids are still named by the CPU rescan
    let bad = run(
        "cuda",
        &["--experts", "8", "bad/topk_out_of_range.safetensors"],
    );
    assert_eq!(bad.status.code(), Some(2));
}
