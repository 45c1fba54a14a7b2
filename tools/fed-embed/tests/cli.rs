//! Bad input (one-line error naming the file/tensor, exit 2, no output
//! file), per-class clustering rules, noise statistics, keys, and the
//! seeded prompt sampler.

use ftk::records::{self, Record};
use ftk::tensors::{write_safetensors, Dtype, OutTensor, TensorFile};
use serde_json::Value;
use std::path::{Path, PathBuf};

fn data() -> PathBuf {
    ftk_test::testdata("fed-embed")
}

fn cmd() -> assert_cmd::Command {
    let mut c = ftk_test::tool("fed-embed");
    c.current_dir(data());
    c
}

fn run_ok(args: &[&str]) -> Value {
    let mut lines = ftk_test::run_ok(cmd().args(args), &format!("{args:?}"));
    assert_eq!(lines.len(), 1, "{args:?}: one summary line");
    lines.remove(0)
}

/// Expects exit 2, one stderr line with every needle, no stdout, no output
/// file and no temporary file left beside it.
fn run_bad(args: &[&str], out: &Path, needles: &[&str]) {
    let o = cmd().args(args).output().unwrap();
    ftk_test::assert_error("fed-embed", &o, 2, needles);
    assert!(!out.exists(), "{args:?}: wrote {}", out.display());
    let stray: Vec<_> = std::fs::read_dir(out.parent().unwrap())
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

/// Small bad fixtures, written into `d`.
fn bad_fixtures(d: &Path) {
    let f32s = |name: &str, shape: Vec<usize>, v: &[f32]| OutTensor::f32(name, shape, v);
    write(
        &d.join("nan.safetensors"),
        vec![f32s("features", vec![2, 2], &[1.0, f32::NAN, 0.0, 1.0])],
    );
    write(
        &d.join("vec.safetensors"),
        vec![f32s("features", vec![4], &[1.0; 4])],
    );
    write(
        &d.join("int.safetensors"),
        vec![OutTensor::i64("features", vec![2, 2], &[1; 4])],
    );
    let b = std::fs::read(data().join("client0.safetensors")).unwrap();
    std::fs::write(d.join("trunc.safetensors"), &b[..b.len() - 100]).unwrap();
    write(
        &d.join("small.safetensors"),
        vec![f32s(
            "features",
            vec![3, 2],
            &[0.0, 1.0, 2.0, 3.0, 4.0, 5.0],
        )],
    );
    write(
        &d.join("nb.safetensors"),
        vec![f32s("basis", vec![2, 1], &[1.0, 1.0])],
    );
    let labelled = |p: &str, n: usize, labels: &[i64]| {
        write(
            &d.join(p),
            vec![
                f32s("features", vec![n, 2], &vec![0.0; 2 * n]),
                OutTensor::i64("labels", vec![labels.len()], labels),
            ],
        )
    };
    labelled("badlab.safetensors", 3, &[0, 1]);
    labelled("neglab.safetensors", 2, &[0, -1]);
    // A label of 2^40: prototypes would need 2^40 rows; refused from the data.
    labelled("hugelab.safetensors", 2, &[0, 1 << 40]);
    write(
        &d.join("rank1.safetensors"),
        vec![f32s(
            "features",
            vec![3, 2],
            &[1.0, 2.0, 2.0, 4.0, 3.0, 6.0],
        )],
    );
}

#[test]
fn bad_inputs_are_one_line_errors_naming_the_file_and_tensor() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    bad_fixtures(d);
    let o = d.join("out.safetensors");
    let f = |name: &str| d.join(name).to_str().unwrap().to_string();
    let (nan, vec, int, trunc, small, nb) = (
        f("nan.safetensors"),
        f("vec.safetensors"),
        f("int.safetensors"),
        f("trunc.safetensors"),
        f("small.safetensors"),
        f("nb.safetensors"),
    );
    let (badlab, neglab, hugelab, rank1) = (
        f("badlab.safetensors"),
        f("neglab.safetensors"),
        f("hugelab.safetensors"),
        f("rank1.safetensors"),
    );
    // (what, arguments before -o, needles in the one-line error)
    let cases: Vec<(&str, Vec<&str>, Vec<&str>)> = vec![
        (
            "NaN feature",
            vec!["subspace", "--features", &nan, "--rank", "1"],
            vec![
                "nan.safetensors",
                "'features'",
                "row 0, column 1",
                "not finite",
            ],
        ),
        (
            "wrong rank",
            vec!["cluster", "--features", &vec],
            vec!["vec.safetensors", "'features'", "[N, D]"],
        ),
        (
            "integer features",
            vec!["prototypes", "--features", &int],
            vec!["'features'", "float"],
        ),
        (
            "truncated file",
            vec!["cluster", "--features", &trunc],
            vec!["trunc.safetensors", "truncated"],
        ),
        (
            "missing tensor",
            vec![
                "subspace",
                "--features",
                "teacher0.safetensors",
                "--tensor",
                "emb",
                "--rank",
                "2",
            ],
            vec!["teacher0.safetensors", "'emb'"],
        ),
        (
            "no labels",
            vec!["prototypes", "--features", "d3a_server.safetensors"],
            vec!["'labels'"],
        ),
        (
            "top-k above the clients",
            vec![
                "d3a-weights",
                "--basis",
                "expected/subspace_c0_r8.safetensors",
                "--features",
                "d3a_server.safetensors",
                "--top-k",
                "2",
            ],
            vec!["--top-k"],
        ),
        (
            "k above the samples",
            vec!["cluster", "--features", &small, "--k", "5"],
            vec!["small.safetensors", "--k 5", "3 samples"],
        ),
        (
            "basis of another dimension",
            vec![
                "d3a-weights",
                "--basis",
                "expected/subspace_c0_r8.safetensors",
                "--features",
                &small,
            ],
            vec!["subspace_c0_r8", "dimension 64", "2"],
        ),
        (
            "non-orthonormal basis",
            vec!["d3a-weights", "--basis", &nb, "--features", &small],
            vec!["nb.safetensors", "orthonormal"],
        ),
        (
            "labels of the wrong length",
            vec!["prototypes", "--features", &badlab],
            vec!["'labels'", "2 labels for 3 samples"],
        ),
        (
            "negative label",
            vec!["prototypes", "--features", &neglab],
            vec!["'labels'", "-1"],
        ),
        (
            "label 2^40",
            vec!["prototypes", "--features", &hugelab],
            vec![
                "hugelab.safetensors",
                "1099511627777 classes",
                "only 2 samples",
            ],
        ),
        (
            "rank above the numerical rank",
            vec!["subspace", "--features", &rank1, "--rank", "2"],
            vec!["numerical rank 1"],
        ),
        (
            "teachers of different shapes",
            vec![
                "ensemble",
                "--logits",
                "teacher0.safetensors",
                "client0.safetensors",
                "--logits-tensor",
                "features",
            ],
            vec!["features"],
        ),
        (
            "missing file",
            vec!["cluster", "--features", "nope.safetensors"],
            vec!["nope.safetensors"],
        ),
        (
            "generator of another width",
            vec![
                "prompt-sample",
                "--generator",
                "bayes_gen_mean.safetensors",
                "--arch",
                "bayes_arch_mean.json",
                "--features",
                &small,
            ],
            vec!["layer 0", "takes 72 inputs", "10 arrive"],
        ),
        (
            "adapter with the wrong domains",
            vec![
                "adapt-weights",
                "--keys",
                "apt_keys.safetensors",
                "--prompt",
                "apt_ctx.safetensors",
                "--adapter",
                "teacher0.safetensors",
                "--features",
                "apt_features.safetensors",
            ],
            vec!["teacher0.safetensors"],
        ),
        (
            "keys larger than memory",
            vec![
                "keys",
                "--domains",
                "2",
                "--ctx",
                "100000000",
                "--dim",
                "100000000",
            ],
            vec!["--ctx", "GiB, the machine has"],
        ),
        (
            "keys whose size overflows",
            vec![
                "keys",
                "--domains",
                "1000000000",
                "--ctx",
                "100000000000",
                "--dim",
                "100000000000",
            ],
            vec!["--ctx", "overflow"],
        ),
    ];
    for (what, args, needles) in cases {
        let mut all = args.clone();
        all.extend(["-o", s(&o)]);
        eprintln!("case: {what}");
        run_bad(&all, &o, &needles);
    }
}

#[test]
fn summaries_match_their_record_structs_and_the_help() {
    let help = ftk_test::help("fed-embed", &[]);
    ftk_test::assert_documented::<records::FedEmbedSubspace>(&help);
    ftk_test::assert_documented::<records::FedEmbedD3aWeights>(&help);
    ftk_test::assert_documented::<records::FedEmbedEnsemble>(&help);
    ftk_test::assert_documented::<records::FedEmbedPrototypes>(&help);
    ftk_test::assert_documented::<records::FedEmbedPseudoLabel>(&help);
    ftk_test::assert_documented::<records::FedEmbedCluster>(&help);
    ftk_test::assert_documented::<records::FedEmbedNoise>(&help);
    ftk_test::assert_documented::<records::FedEmbedKeys>(&help);
    ftk_test::assert_documented::<records::FedEmbedAdaptWeights>(&help);
    ftk_test::assert_documented::<records::FedEmbedPromptSample>(&help);
    // And what a run prints decodes into its struct.
    let t = tempfile::tempdir().unwrap();
    let k = t.path().join("k.safetensors");
    let v = run_ok(&[
        "keys",
        "--domains",
        "2",
        "--ctx",
        "3",
        "--dim",
        "4",
        "-o",
        s(&k),
    ]);
    let r: records::FedEmbedKeys = serde_json::from_value(v).unwrap();
    assert_eq!((r.domains, r.ctx, r.dim), (2, 3, 4));
    assert_eq!(records::FedEmbedKeys::KIND, "fed_embed_keys");
}

#[test]
fn noise_reports_what_it_did_to_the_rows() {
    // Rows of norm 5, 0.5 and 10 in D = 400, clipped to 2, then noise of
    // sigma 0.1: noise norm about 0.1·sqrt(400) = 2.
    let t = tempfile::tempdir().unwrap();
    let (x, o) = (
        t.path().join("x.safetensors"),
        t.path().join("o.safetensors"),
    );
    let d = 400;
    let mut v = vec![0f32; 3 * d];
    v[0] = 5.0;
    v[d] = 0.5;
    v[2 * d + 1] = 10.0;
    write(&x, vec![OutTensor::f32("features", vec![3, d], &v)]);
    let r = run_ok(&[
        "noise",
        "--features",
        s(&x),
        "--clip",
        "2",
        "--sigma",
        "0.1",
        "--seed",
        "1",
        "-o",
        s(&o),
    ]);
    let f = |k: &str| r[k].as_f64().unwrap_or_else(|| panic!("{k} in {r}"));
    assert_eq!(r["clipped_rows"], 2);
    assert!((f("clipped_fraction") - 2.0 / 3.0).abs() < 1e-12);
    assert!((f("mean_norm_before") - 15.5 / 3.0).abs() < 1e-6);
    assert!((f("mean_norm_clipped") - 4.5 / 3.0).abs() < 1e-6);
    assert!((f("noise_norm") - 2.0).abs() < 0.2, "{r}");
    // What was uploaded: signal plus independent noise, so about sqrt(c² + 4) per row.
    let up = TensorFile::open(&o)
        .unwrap()
        .require("features")
        .unwrap()
        .to_f32_vec()
        .unwrap();
    let norms: Vec<f64> = up
        .chunks(d)
        .map(|r| r.iter().map(|&x| f64::from(x).powi(2)).sum::<f64>().sqrt())
        .collect();
    assert!((f("mean_norm_after") - norms.iter().sum::<f64>() / 3.0).abs() < 1e-4);
    for (got, c) in norms.iter().zip([2.0f64, 0.5, 2.0]) {
        assert!((got - (c * c + 4.0).sqrt()).abs() < 0.35, "{got} vs {c}");
    }
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
