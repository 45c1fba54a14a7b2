//! The CUDA weighted mean against the CPU pass: the same output and partial
//! bytes (the f64 sums bit for bit) for f32, bf16 and f16 clients (integer tensors stay on the CPU in
//! the same job), across staging-chunk and accumulator-segment boundaries,
//! and the same error naming the client for a NaN update. Run when a GPU
//! exists, skipped with the reason otherwise; without one, `--device cuda`
//! is a usage error (exit 2).

mod common;

use common::cmd;
use ftk::tensors::{write_safetensors, Dtype, OutTensor};
use std::path::Path;

fn bytes16(v: &[f32], bf: bool) -> Vec<u8> {
    v.iter()
        .flat_map(|&x| {
            if bf {
                half::bf16::from_f32(x).to_le_bytes()
            } else {
                half::f16::from_f32(x).to_le_bytes()
            }
        })
        .collect()
}

/// Five clients of four tensors; client `nan` (if any) holds a NaN.
fn clients(dir: &Path, nan: Option<usize>) -> std::path::PathBuf {
    let mut manifest = String::new();
    for c in 0..5usize {
        let val = |i: usize| ((i * 7 + c * 13) % 1000) as f32 / 997.0 - 0.5 + c as f32;
        let mut a: Vec<f32> = (0..3 * 100_003).map(val).collect();
        if nan == Some(c) {
            a[123_456] = f32::NAN;
        }
        let b: Vec<f32> = (0..50_001).map(val).collect();
        let h: Vec<f32> = (0..77_777).map(val).collect();
        let ints: Vec<i64> = (0..10).map(|i| (i * c) as i64).collect();
        let path = dir.join(format!("c{c}.safetensors"));
        write_safetensors(
            &path,
            &[
                OutTensor::f32("a", vec![3, 100_003], &a),
                OutTensor {
                    name: "b".into(),
                    dtype: Dtype::BF16,
                    shape: vec![50_001],
                    data: bytes16(&b, true).into(),
                },
                OutTensor {
                    name: "h".into(),
                    dtype: Dtype::F16,
                    shape: vec![77_777],
                    data: bytes16(&h, false).into(),
                },
                OutTensor::i64("n", vec![10], &ints),
            ],
            None,
        )
        .unwrap();
        manifest += &format!(
            "{{\"kind\":\"client_update\",\"cid\":\"c{c}\",\"path\":\"{}\",\"num_examples\":{}}}\n",
            path.display(),
            100 + 37 * c
        );
    }
    let m = dir.join("m.jsonl");
    std::fs::write(&m, manifest).unwrap();
    m
}

/// The output and (with `partial`) the partial-sum file's bytes. Without a
/// partial the f32 means are divided and rounded on the device.
fn aggregate(
    m: &Path,
    dir: &Path,
    device: &str,
    env: &[(&str, &str)],
    partial: bool,
) -> (Vec<u8>, Vec<u8>) {
    let (o, p) = (
        dir.join(format!("{device}.safetensors")),
        dir.join(format!("{device}.partial.safetensors")),
    );
    let mut c = cmd();
    for (k, v) in env {
        c.env(k, v);
    }
    c.args(["--strategy", "fedavg", "--device", device, "-o"])
        .arg(&o);
    if partial {
        c.arg("--partial-out").arg(&p);
    }
    let out = c.arg(m).output().unwrap();
    assert!(
        out.status.success(),
        "{device}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let part = if partial {
        std::fs::read(&p).unwrap()
    } else {
        Vec::new()
    };
    (std::fs::read(&o).unwrap(), part)
}

#[test]
fn cuda_mean_equals_cpu_mean() {
    let dir = tempfile::tempdir().unwrap();
    let m = clients(dir.path(), None);
    if let Err(why) = ftk::device::cuda_devices() {
        eprintln!("skipped: no CUDA device ({why})");
        let out = cmd()
            .args(["--strategy", "fedavg", "--device", "cuda", "-o"])
            .arg(dir.path().join("x.safetensors"))
            .arg(&m)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2));
        assert!(String::from_utf8_lossy(&out.stderr).contains("--device cpu"));
        assert!(!dir.path().join("x.safetensors").exists());
        return;
    }
    let cpu = aggregate(&m, dir.path(), "cpu", &[], true);
    let gpu = aggregate(&m, dir.path(), "cuda", &[], true);
    assert!(cpu.0 == gpu.0, "outputs differ");
    assert!(cpu.1 == gpu.1, "partial sums differ");
    // Output only: the f32 mean is computed on the device.
    let gpu = aggregate(&m, dir.path(), "cuda", &[], false);
    assert!(cpu.0 == gpu.0, "device-side means differ");
    // Small staging buffers and segments: many chunks per tensor, several
    // segments, chunks that end mid-segment.
    let small = [
        ("FTK_CUDA_STAGE_BYTES", "40000"),
        ("FTK_CUDA_SEGMENT", "70001"),
    ];
    let gpu = aggregate(&m, dir.path(), "cuda", &small, true);
    assert!(cpu.0 == gpu.0, "outputs differ with small staging");
    assert!(cpu.1 == gpu.1, "partial sums differ with small staging");
    let gpu = aggregate(&m, dir.path(), "cuda", &small, false);
    assert!(
        cpu.0 == gpu.0,
        "device-side means differ with small staging"
    );
}

#[test]
fn cuda_names_the_client_with_a_nan() {
    if ftk::device::cuda_devices().is_err() {
        eprintln!("skipped: no CUDA device");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let m = clients(dir.path(), Some(3));
    let o = dir.path().join("o.safetensors");
    let out = cmd()
        .args(["--strategy", "fedavg", "--device", "cuda", "-o"])
        .arg(&o)
        .arg(&m)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("c3") && err.contains("NaN"), "{err}");
    assert!(!o.exists());
}
