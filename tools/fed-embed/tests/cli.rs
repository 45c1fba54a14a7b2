//! Bad input (one-line error naming the file/tensor, exit 2, no output
//! file), per-class clustering rules, noise statistics, keys, and the
//! seeded prompt sampler.

use assert_cmd::Command;
use ftk::tensors::{write_safetensors, Dtype, OutTensor, TensorFile};
use serde_json::Value;
use std::path::{Path, PathBuf};

fn data() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../testdata/fed-embed")
}

fn cmd() -> Command {
    let mut c = Command::cargo_bin("fed-embed").unwrap();
    c.current_dir(data()).env("FTK_NO_PROGRESS", "1");
    c
}

fn run_ok(args: &[&str]) -> Value {
    let o = cmd().args(args).output().unwrap();
    assert!(
        o.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_slice(&o.stdout).unwrap()
}

/// Expects exit 2, one stderr line with every needle, no stdout, no output file.
fn run_bad(args: &[&str], out: &Path, needles: &[&str]) {
    let o = cmd().args(args).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert_eq!(o.status.code(), Some(2), "{args:?}: {err}");
    assert!(o.stdout.is_empty(), "{args:?}");
    assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
    assert!(err.starts_with("fed-embed: error: "), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    for n in needles {
        assert!(err.contains(n), "{args:?}: expected '{n}' in: {err}");
    }
    assert!(!out.exists(), "{args:?}: wrote {}", out.display());
    let dir = out.parent().unwrap();
    let stray: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with(".ftk-tmp"))
        .collect();
    assert!(stray.is_empty(), "temporary files left behind");
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn write(p: &Path, ts: Vec<OutTensor<'static>>) {
    write_safetensors(p, &ts, None).unwrap();
}

#[test]
fn bad_inputs_are_one_line_errors_naming_the_file_and_tensor() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    let o = d.join("out.safetensors");
    let os = s(&o);
    // NaN in the features.
    let nan = d.join("nan.safetensors");
    write(
        &nan,
        vec![OutTensor::f32(
            "features",
            vec![2, 2],
            &[1.0, f32::NAN, 0.0, 1.0],
        )],
    );
    run_bad(
        &["subspace", "--features", s(&nan), "--rank", "1", "-o", os],
        &o,
        &[
            "nan.safetensors",
            "'features'",
            "row 0, column 1",
            "not finite",
        ],
    );
    // Wrong rank and wrong dtype.
    let v = d.join("vec.safetensors");
    write(&v, vec![OutTensor::f32("features", vec![4], &[1.0; 4])]);
    run_bad(
        &["cluster", "--features", s(&v), "-o", os],
        &o,
        &["vec.safetensors", "'features'", "[N, D]"],
    );
    let it = d.join("int.safetensors");
    write(&it, vec![OutTensor::i64("features", vec![2, 2], &[1; 4])]);
    run_bad(
        &["prototypes", "--features", s(&it), "-o", os],
        &o,
        &["'features'", "float"],
    );
    // Truncated file.
    let tr = d.join("trunc.safetensors");
    std::fs::copy(data().join("client0.safetensors"), &tr).unwrap();
    let b = std::fs::read(&tr).unwrap();
    std::fs::write(&tr, &b[..b.len() - 100]).unwrap();
    run_bad(
        &["cluster", "--features", s(&tr), "-o", os],
        &o,
        &["trunc.safetensors", "truncated"],
    );
    // Missing tensor (file with two other tensors).
    run_bad(
        &[
            "subspace",
            "--features",
            "teacher0.safetensors",
            "--tensor",
            "emb",
            "--rank",
            "2",
            "-o",
            os,
        ],
        &o,
        &["teacher0.safetensors", "'emb'"],
    );
    run_bad(
        &[
            "prototypes",
            "--features",
            "d3a_server.safetensors",
            "-o",
            os,
        ],
        &o,
        &["'labels'"],
    );
    // Zero clients / too many top-k.
    run_bad(
        &[
            "d3a-weights",
            "--basis",
            "expected/subspace_c0_r8.safetensors",
            "--features",
            "d3a_server.safetensors",
            "--top-k",
            "2",
            "-o",
            os,
        ],
        &o,
        &["--top-k"],
    );
    // k > samples.
    let small = d.join("small.safetensors");
    write(
        &small,
        vec![OutTensor::f32(
            "features",
            vec![3, 2],
            &[0.0, 1.0, 2.0, 3.0, 4.0, 5.0],
        )],
    );
    run_bad(
        &["cluster", "--features", s(&small), "--k", "5", "-o", os],
        &o,
        &["small.safetensors", "--k 5", "3 samples"],
    );
    // Dimension mismatch between a basis and the server features.
    run_bad(
        &[
            "d3a-weights",
            "--basis",
            "expected/subspace_c0_r8.safetensors",
            "--features",
            s(&small),
            "-o",
            os,
        ],
        &o,
        &["subspace_c0_r8", "dimension 64", "2"],
    );
    // Non-orthonormal basis.
    let nb = d.join("nb.safetensors");
    write(&nb, vec![OutTensor::f32("basis", vec![2, 1], &[1.0, 1.0])]);
    run_bad(
        &[
            "d3a-weights",
            "--basis",
            s(&nb),
            "--features",
            s(&small),
            "-o",
            os,
        ],
        &o,
        &["nb.safetensors", "orthonormal"],
    );
    // Labels: wrong length, negative for prototypes.
    let bl = d.join("badlab.safetensors");
    write(
        &bl,
        vec![
            OutTensor::f32("features", vec![3, 2], &[0.0; 6]),
            OutTensor::i64("labels", vec![2], &[0, 1]),
        ],
    );
    run_bad(
        &["prototypes", "--features", s(&bl), "-o", os],
        &o,
        &["'labels'", "2 labels for 3 samples"],
    );
    let nl = d.join("neglab.safetensors");
    write(
        &nl,
        vec![
            OutTensor::f32("features", vec![2, 2], &[0.0; 4]),
            OutTensor::i64("labels", vec![2], &[0, -1]),
        ],
    );
    run_bad(
        &["prototypes", "--features", s(&nl), "-o", os],
        &o,
        &["'labels'", "-1"],
    );
    // Rank above the numerical rank.
    let r1 = d.join("rank1.safetensors");
    write(
        &r1,
        vec![OutTensor::f32(
            "features",
            vec![3, 2],
            &[1.0, 2.0, 2.0, 4.0, 3.0, 6.0],
        )],
    );
    run_bad(
        &["subspace", "--features", s(&r1), "--rank", "2", "-o", os],
        &o,
        &["numerical rank 1"],
    );
    // Ensemble: teachers disagree on shape.
    run_bad(
        &[
            "ensemble",
            "-o",
            os,
            "--logits",
            "teacher0.safetensors",
            "client0.safetensors",
            "--logits-tensor",
            "features",
        ],
        &o,
        &["features"],
    );
    // Missing file.
    run_bad(
        &["cluster", "--features", "nope.safetensors", "-o", os],
        &o,
        &["nope.safetensors"],
    );
    // Prompt sampler: arch/weights mismatch.
    run_bad(
        &[
            "prompt-sample",
            "--generator",
            "bayes_gen_mean.safetensors",
            "--arch",
            "bayes_arch_mean.json",
            "--features",
            s(&small),
            "-o",
            os,
        ],
        &o,
        &["layer 0", "takes 72 inputs", "10 arrive"],
    );
    // Adapter with the wrong number of domains.
    run_bad(
        &[
            "adapt-weights",
            "--keys",
            "apt_keys.safetensors",
            "--prompt",
            "apt_ctx.safetensors",
            "--adapter",
            "teacher0.safetensors",
            "--features",
            "apt_features.safetensors",
            "-o",
            os,
        ],
        &o,
        &["teacher0.safetensors"],
    );
}

#[test]
fn feddisc_round_sends_raw_rows_for_small_classes() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    let p = d.join("p.safetensors");
    let pl = d.join("pl.safetensors");
    let c = d.join("c.safetensors");
    run_ok(&[
        "prototypes",
        "--features",
        "server.safetensors",
        "-o",
        s(&p),
    ]);
    let sl = run_ok(&[
        "pseudo-label",
        "--prototypes",
        s(&p),
        "--features",
        "client1.safetensors",
        "--min-confidence",
        "0.9",
        "-o",
        s(&pl),
    ]);
    let labels = TensorFile::open(&pl)
        .unwrap()
        .require("labels")
        .unwrap()
        .to_i64_vec()
        .unwrap();
    let rejected = labels.iter().filter(|&&l| l < 0).count();
    assert_eq!(sl["rejected"].as_u64().unwrap() as usize, rejected);
    let sc = run_ok(&[
        "cluster",
        "--features",
        "client1.safetensors",
        "--labels",
        s(&pl),
        "--k",
        "5",
        "--seed",
        "1",
        "-o",
        s(&c),
    ]);
    let f = TensorFile::open(&c).unwrap();
    let sizes = f.require("sizes").unwrap().to_i64_vec().unwrap();
    let cls = f.require("labels").unwrap().to_i64_vec().unwrap();
    let assign = f.require("assign").unwrap().to_i64_vec().unwrap();
    // Every labelled sample is in exactly one row; sizes add up.
    assert_eq!(sizes.iter().sum::<i64>() as usize, labels.len() - rejected);
    for (i, &a) in assign.iter().enumerate() {
        if labels[i] < 0 {
            assert_eq!(a, -1);
        } else {
            assert_eq!(cls[a as usize], labels[i], "sample {i}");
        }
    }
    // Classes with <= 5 members are sent raw (size-1 rows), bigger ones as 5 centroids.
    for c in 0..10 {
        let n = labels.iter().filter(|&&l| l == c).count();
        let rows = cls.iter().filter(|&&l| l == c).count();
        let want = if n == 0 {
            0
        } else if n <= 5 {
            n
        } else {
            5
        };
        assert_eq!(rows, want, "class {c} with {n} members");
    }
    assert_eq!(sc["rows"].as_u64().unwrap() as usize, cls.len());
    // Noise: deterministic with the seed, other tensors copied unchanged.
    let n1 = d.join("n1.safetensors");
    let n2 = d.join("n2.safetensors");
    let r = run_ok(&[
        "noise",
        "--features",
        s(&c),
        "--sigma",
        "0.5",
        "--clip",
        "3",
        "--seed",
        "9",
        "-o",
        s(&n1),
    ]);
    run_ok(&[
        "noise",
        "--features",
        s(&c),
        "--sigma",
        "0.5",
        "--clip",
        "3",
        "--seed",
        "9",
        "-o",
        s(&n2),
    ]);
    assert_eq!(std::fs::read(&n1).unwrap(), std::fs::read(&n2).unwrap());
    assert_eq!(r["tensor"], "centroids");
    let g = TensorFile::open(&n1).unwrap();
    assert_eq!(g.require("sizes").unwrap().to_i64_vec().unwrap(), sizes);
    let before = f.require("centroids").unwrap().to_f32_vec().unwrap();
    let after = g.require("centroids").unwrap().to_f32_vec().unwrap();
    let var = before
        .iter()
        .zip(&after)
        .map(|(a, b)| f64::from(b - a).powi(2))
        .sum::<f64>()
        / before.len() as f64;
    // The change is clipping shift + independent noise of variance 0.25, so
    // its mean square is at least about 0.25.
    assert!(var > 0.2, "{var}");
}

#[test]
fn keys_and_seeded_prompt_samples_are_reproducible() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    let k = d.join("k.safetensors");
    run_ok(&[
        "keys",
        "--domains",
        "6",
        "--ctx",
        "24",
        "--dim",
        "512",
        "--seed",
        "3",
        "-o",
        s(&k),
    ]);
    let f = TensorFile::open(&k).unwrap();
    let t_ = f.require("keys").unwrap();
    assert_eq!(t_.shape, &[6, 24, 512]);
    assert_eq!(t_.dtype, Dtype::F32);
    let v = t_.to_f32_vec().unwrap();
    assert!(v.iter().all(|&x| (0.0..1.0).contains(&x)));
    let var = v.iter().map(|&x| (f64::from(x) - 0.5).powi(2)).sum::<f64>() / v.len() as f64;
    assert!((var - 1.0 / 12.0).abs() < 0.002, "{var}");
    // Seeded sampling: same seed same bytes, and with many samples the
    // mean_logvar head's variance exceeds the mean head's (it adds
    // exp(logvar) on top of the noise passed through the MLP).
    let a = d.join("a.safetensors");
    let b = d.join("b.safetensors");
    for p in [&a, &b] {
        run_ok(&[
            "prompt-sample",
            "--generator",
            "bayes_gen_mean_logvar.safetensors",
            "--arch",
            "bayes_arch_mean_logvar.json",
            "--features",
            "bayes_features.safetensors",
            "--samples",
            "64",
            "--seed",
            "5",
            "-o",
            s(p),
        ]);
    }
    assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
    let m = d.join("m.safetensors");
    let sm = run_ok(&[
        "prompt-sample",
        "--generator",
        "bayes_gen_mean.safetensors",
        "--arch",
        "bayes_arch_mean.json",
        "--features",
        "bayes_features.safetensors",
        "--samples",
        "64",
        "--seed",
        "5",
        "--write-samples",
        "-o",
        s(&m),
    ]);
    assert!(sm["mean_var"].as_f64().unwrap() > 0.0);
    let g = TensorFile::open(&m).unwrap();
    assert_eq!(g.require("samples").unwrap().shape, &[64, 120, 4, 8]);
}
