//! Partial aggregates and merges, personalised layers, FedRA allocation, DP
//! noise statistics, dtypes, and every kind of bad input.

mod common;

use common::*;
use ftk::records;
use ftk::tensors::{write_safetensors, Dtype, OutTensor};
use serde_json::Value;
use std::path::{Path, PathBuf};

fn client(path: &Path) -> PathBuf {
    data().join("clients").join(path)
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn pool9() -> Vec<(String, PathBuf, u64)> {
    let m = std::fs::read_to_string(data().join("m_r1_9.jsonl")).unwrap();
    m.lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            (
                v["cid"].as_str().unwrap().to_string(),
                data().join(v["path"].as_str().unwrap()),
                v["num_examples"].as_u64().unwrap(),
            )
        })
        .collect()
}

fn manifest_of(dir: &Path, name: &str, rows: &[(String, PathBuf, u64)]) -> PathBuf {
    let r: Vec<(&str, &Path, u64)> = rows
        .iter()
        .map(|(c, p, n)| (c.as_str(), p.as_path(), *n))
        .collect();
    write_manifest(dir, name, &r)
}

#[test]
fn two_level_partial_merge_equals_one_shot() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    let pool = pool9();
    let parts = [&pool[0..2], &pool[2..6], &pool[6..9]];
    for strategy in ["fedavg", "fedadam"] {
        let g: &[&str] = if strategy == "fedadam" {
            &["--global", "global0.safetensors"]
        } else {
            &[]
        };
        let mut ps = Vec::new();
        for (i, rows) in parts.iter().enumerate() {
            let m = manifest_of(d, &format!("part{i}.jsonl"), rows);
            let p = d.join(format!("{strategy}_p{i}.safetensors"));
            let v = run_ok(&["--strategy", strategy, "--partial-out", s(&p), s(&m)]);
            assert_eq!(v["clients"], rows.len());
            ps.push(p);
        }
        // Tree ((p0 p1) p2) and (p0 (p1 p2)), against one shot over all nine.
        let p01 = d.join(format!("{strategy}_p01.safetensors"));
        run_ok(&["merge", "--partial-out", s(&p01), s(&ps[0]), s(&ps[1])]);
        let p12 = d.join(format!("{strategy}_p12.safetensors"));
        run_ok(&["merge", "--partial-out", s(&p12), s(&ps[1]), s(&ps[2])]);
        let outs: Vec<PathBuf> = (0..3)
            .map(|k| d.join(format!("{strategy}_out{k}.safetensors")))
            .collect();
        let st: Vec<PathBuf> = (0..3)
            .map(|k| d.join(format!("{strategy}_st{k}.safetensors")))
            .collect();
        let with = |extra: &[&str], k: usize| -> Vec<String> {
            let mut a: Vec<String> = vec!["--strategy".into(), strategy.into()];
            a.extend(g.iter().map(|x| x.to_string()));
            if strategy == "fedadam" {
                a.extend(["--state".to_string(), s(&st[k]).to_string()]);
                a.push("--init-state".to_string());
            }
            a.extend(["-o".to_string(), s(&outs[k]).to_string()]);
            a.extend(extra.iter().map(|x| x.to_string()));
            a
        };
        let a0 = with(&["m_r1_9.jsonl"], 0);
        let v = run_ok(&a0.iter().map(String::as_str).collect::<Vec<_>>());
        assert_eq!(v["clients"], 9);
        let mut a1 = vec!["merge".to_string()];
        a1.extend(with(&[s(&p01), s(&ps[2])], 1));
        let v = run_ok(&a1.iter().map(String::as_str).collect::<Vec<_>>());
        assert_eq!(v["clients"], 9);
        let mut a2 = vec!["merge".to_string()];
        a2.extend(with(&[s(&ps[0]), s(&p12)], 2));
        run_ok(&a2.iter().map(String::as_str).collect::<Vec<_>>());
        assert_close(strategy, &outs[1], &outs[0], 1e-6);
        assert_close(strategy, &outs[2], &outs[0], 1e-6);
        if strategy == "fedavg" {
            let want = data().join("expected/fedavg_r1.safetensors");
            assert_close("merged fedavg vs Flower", &outs[1], &want, 1e-6);
        } else {
            assert_close("merged state", &st[1], &st[0], 1e-6);
        }
    }
}

/// FedRA over testdata's allocation (its client files name blocks.N.).
const FEDRA: [&str; 6] = [
    "--strategy",
    "fedra",
    "--alloc",
    "fedra_alloc.jsonl",
    "--layer-pattern",
    r"blocks\.(\d+)\.",
];

#[test]
fn fedra_partials_merge_to_the_public_code_result() {
    let t = tempfile::tempdir().unwrap();
    let m = std::fs::read_to_string(data().join("m_fedra.jsonl")).unwrap();
    let lines: Vec<&str> = m.lines().collect();
    let mut ps = Vec::new();
    for (i, part) in [&lines[..1], &lines[1..]].iter().enumerate() {
        // Paths in m_fedra.jsonl are relative to testdata/fed-aggregate (the cwd).
        let p = t.path().join(format!("p{i}.safetensors"));
        ftk_test::output_ok(
            cmd()
                .args(FEDRA)
                .arg("--partial-out")
                .arg(&p)
                .write_stdin(part.join("\n")),
            "fedra leaf",
        );
        ps.push(p);
    }
    let out = t.path().join("o.safetensors");
    run_bad(
        &["merge", "-o", s(&out), s(&ps[0]), s(&ps[1])],
        &["needs --global"],
    );
    run_ok(&[
        "merge",
        "--global",
        "fedra_global.safetensors",
        "-o",
        s(&out),
        s(&ps[0]),
        s(&ps[1]),
    ]);
    assert_close(
        "fedra tree",
        &out,
        &data().join("expected/fedra_r1.safetensors"),
        1e-6,
    );
}

#[test]
fn summary_record_schema_help_and_table() {
    let t = tempfile::tempdir().unwrap();
    let o = t.path().join("o.safetensors");
    let v = run_ok(&["--strategy", "fedavg", "-o", s(&o), "m_r1_9.jsonl"]);
    let keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
    assert_eq!(
        keys,
        [
            "accumulator",
            "bytes_read",
            "clients",
            "kind",
            "ms",
            "params",
            "strategy",
            "tensors"
        ]
    );
    assert_eq!(v["kind"], "aggregate");
    assert_eq!(
        (
            v["clients"].as_u64(),
            v["tensors"].as_u64(),
            v["params"].as_u64()
        ),
        (Some(9), Some(6), Some(601))
    );
    // Every client tensor byte read exactly once: 9 clients x 601 f32.
    assert_eq!(v["bytes_read"], 9 * 601 * 4);
    let k = run_ok(&[
        "--strategy",
        "krum",
        "--num-malicious",
        "2",
        "-o",
        s(&o),
        "m_r1_9.jsonl",
    ]);
    assert_eq!(k["selected"].as_array().unwrap().len(), 1);
    let tab = cmd()
        .args([
            "--strategy",
            "fedavg",
            "--table",
            "-o",
            s(&o),
            "m_r1_9.jsonl",
        ])
        .output()
        .unwrap();
    let text = String::from_utf8(tab.stdout).unwrap();
    assert!(
        text.contains("strategy") && text.contains("fedavg") && !text.contains('{'),
        "{text}"
    );
    let h = ftk_test::help("fed-aggregate", &[]);
    ftk_test::assert_documented::<records::Aggregate>(&h);
    ftk_test::assert_documented::<records::ClientUpdate>(&h);
    let readme = std::fs::read_to_string(data().join("../../README.md")).unwrap();
    ftk_test::assert_documented::<records::Aggregate>(&readme);
    ftk_test::assert_documented::<records::ClientUpdate>(&readme);
    let alloc_help = ftk_test::help("fed-aggregate", &["fedra-alloc"]);
    ftk_test::assert_documented::<records::FedraAlloc>(&alloc_help);
    // Every registered strategy has its block in the table and its name in
    // --strategy's value list.
    for spec in fed_aggregate::strategy::ALL {
        let first = spec.doc.lines().next().unwrap();
        assert!(
            h.contains(&format!("  {:19}{first}", spec.name)),
            "{}",
            spec.name
        );
        assert!(h.contains(spec.about), "{}", spec.about);
    }
    for needle in [
        "Examples:",
        "rounded to the",
        "bias-corrected",
        "fedra-alloc",
        "merge",
    ] {
        assert!(h.contains(needle), "--help lacks {needle}");
    }
}

/// The summary printed is the `records::Aggregate` struct's encoding to the
/// byte (alphabetical keys, as the map-based writer it replaced printed), for
/// runs that set each optional field.
#[test]
fn summary_lines_are_the_record_struct() {
    let t = tempfile::tempdir().unwrap();
    let (o, p) = (
        t.path().join("o.safetensors"),
        t.path().join("p.safetensors"),
    );
    let g = data().join("global0.safetensors");
    let runs: Vec<Vec<&str>> = vec![
        vec![
            "--strategy",
            "krum",
            "--to-keep",
            "2",
            "-o",
            s(&o),
            "m_r1_9.jsonl",
        ],
        vec![
            "--strategy",
            "fedavg",
            "--global",
            s(&g),
            "--clip-norm",
            "0.5",
            "--noise-multiplier",
            "1",
            "--partial-out",
            s(&p),
            "-o",
            s(&o),
            "m_r1_5.jsonl",
        ],
        vec![
            "--strategy",
            "fedadam",
            "--flower-api",
            "message",
            "--eta-l",
            "0.1",
            "--global",
            s(&g),
            "--state",
            s(&p),
            "--init-state",
            "--no-timing",
            "-o",
            s(&o),
            "m_r1_5.jsonl",
        ],
    ];
    for args in runs {
        let out = ftk_test::output_ok(cmd().args(&args), &format!("{args:?}"));
        let line = String::from_utf8(out.stdout).unwrap();
        let rec: records::Aggregate = serde_json::from_str(&line).unwrap();
        assert_eq!(
            serde_json::to_string(&rec).unwrap() + "\n",
            line,
            "{args:?}"
        );
    }
    assert!(records::fields::<records::Aggregate>().is_sorted());
}

#[test]
fn robust_strategies_refuse_partials_and_merge_checks_weighting() {
    let t = tempfile::tempdir().unwrap();
    let p = t.path().join("p.safetensors");
    for st in ["fedmedian", "fedtrimmedavg", "krum", "bulyan"] {
        run_bad(
            &["--strategy", st, "--partial-out", s(&p), "m_r1_9.jsonl"],
            &["--partial-out works only for the linear strategies", st],
        );
    }
    assert!(!p.exists());
    run_ok(&[
        "--strategy",
        "fedavg",
        "--partial-out",
        s(&p),
        "m_r1_5.jsonl",
    ]);
    let o = t.path().join("o.safetensors");
    run_bad(
        &["merge", "--strategy", "fedra", "-o", s(&o), s(&p)],
        &["weighted by num_examples"],
    );
    run_bad(
        &["merge", "-o", s(&o), s(&data().join("global0.safetensors"))],
        &["not a fed-aggregate partial"],
    );
}

#[test]
fn keep_local_leaves_matching_tensors_out() {
    let t = tempfile::tempdir().unwrap();
    let o = t.path().join("o.safetensors");
    let v = run_ok(&[
        "--strategy",
        "fedavg",
        "--keep-local",
        r"^layers\.0\.|^scale$",
        "-o",
        s(&o),
        "m_r1_9.jsonl",
    ]);
    assert_eq!(v["tensors"], 3);
    let got = load(&o);
    let want = load(&data().join("expected/fedavg_r1.safetensors"));
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        vec!["head.weight", "layers.1.bias", "layers.1.weight"]
    );
    for (k, (_, g)) in &got {
        for (a, b) in g.iter().zip(&want[k].1) {
            assert!((a - b).abs() <= 1e-6 * b.abs().max(1.0), "{k}");
        }
    }
    run_bad(
        &[
            "--strategy",
            "fedavg",
            "--keep-local",
            "(",
            "-o",
            s(&o),
            "m_r1_9.jsonl",
        ],
        &["--keep-local"],
    );
}

const ALLOC_ROUND2: &[&str] = &[
    "fedra-alloc",
    "--clients",
    "6",
    "--layers",
    "12",
    "--capacity",
    "12,10,8,6,4,3",
    "--round",
    "2",
    "--seed",
    "0",
];

#[test]
fn fedra_alloc_rows() {
    let o = cmd().args(ALLOC_ROUND2).output().unwrap();
    assert!(o.status.success());
    let rows: Vec<Value> = std::str::from_utf8(&o.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 6);
    for (r, cap) in rows.iter().zip([12, 10, 8, 6, 4, 3]) {
        assert_eq!(r["kind"], "fedra_alloc");
        assert_eq!(r["layers"].as_array().unwrap().len(), cap);
        let mask: u64 = r["mask"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m.as_u64().unwrap())
            .sum();
        assert_eq!(mask, cap as u64);
    }
    let again = cmd().args(ALLOC_ROUND2).output().unwrap();
    assert_eq!(o.stdout, again.stdout);
    run_bad(
        &[
            "fedra-alloc",
            "--clients",
            "4",
            "--layers",
            "12",
            "--capacity",
            "4,2,1",
        ],
        &["--capacity has 3 values for 4 clients"],
    );
}

#[test]
fn fedra_without_global_needs_every_layer_held() {
    let t = tempfile::tempdir().unwrap();
    let o = t.path().join("o.safetensors");
    run_bad(
        &[&FEDRA[..], &["-o", s(&o), "m_fedra.jsonl"]].concat(),
        &["is held by none of this round's clients", "--global"],
    );
}

/// Clients with one big tensor (several work units) and a bf16 tensor.
fn big_clients(d: &Path, n: usize, len: usize) -> (PathBuf, Vec<Vec<f32>>) {
    let mut rows = Vec::new();
    let mut vals = Vec::new();
    for i in 0..n {
        let v: Vec<f32> = (0..len)
            .map(|k| ((k * 7919 + i * 104729) % 1000) as f32 / 250.0 - 2.0 + i as f32)
            .collect();
        let bf: Vec<u8> = v
            .iter()
            .take(1000)
            .flat_map(|x| half::bf16::from_f32(*x).to_bits().to_le_bytes())
            .collect();
        let p = d.join(format!("big{i}.safetensors"));
        write_safetensors(
            &p,
            &[
                OutTensor::f32("w", vec![len], &v),
                OutTensor {
                    name: "b".into(),
                    dtype: Dtype::BF16,
                    shape: vec![10, 100],
                    data: bf.into(),
                },
            ],
            None,
        )
        .unwrap();
        rows.push((format!("b{i}"), p, (i as u64 + 1) * 10));
        vals.push(v);
    }
    (manifest_of(d, "big.jsonl", &rows), vals)
}

#[test]
fn multi_unit_tensors_and_bf16_outputs() {
    let t = tempfile::tempdir().unwrap();
    let len = 300_001; // > 2 work units, not a multiple of the unit size
    let (m, vals) = big_clients(t.path(), 3, len);
    let o = t.path().join("o.safetensors");
    let v = run_ok(&["--strategy", "fedavg", "-o", s(&o), s(&m)]);
    assert_eq!(v["params"], len as u64 + 1000);
    assert_eq!(dtypes(&o)["b"], "BF16");
    let got = load(&o);
    let w = [10.0, 20.0, 30.0];
    for k in [0, 131_071, 131_072, 262_144, len - 1] {
        let want: f64 = (0..3).map(|i| w[i] * vals[i][k] as f64).sum::<f64>() / 60.0;
        assert_eq!(got["w"].1[k], want as f32 as f64, "w[{k}]");
    }
    for k in [0, 999] {
        let want: f64 = (0..3)
            .map(|i| w[i] * half::bf16::from_f32(vals[i][k]).to_f64())
            .sum::<f64>()
            / 60.0;
        assert_eq!(got["b"].1[k], half::bf16::from_f64(want).to_f64(), "b[{k}]");
    }
}

#[test]
fn dp_noise_is_gaussian_with_std_z_c_over_n_and_seeded() {
    let t = tempfile::tempdir().unwrap();
    let len = 200_000;
    let (m, _) = big_clients(t.path(), 3, len);
    // Global = client 0, so clipping is well defined; C = 1, z = 2, n = 3.
    let g = t.path().join("big0.safetensors");
    let base = t.path().join("z0.safetensors");
    let o1 = t.path().join("z2a.safetensors");
    let o2 = t.path().join("z2b.safetensors");
    let o3 = t.path().join("z2c.safetensors");
    let common = [
        "--strategy",
        "fedavg",
        "--global",
        s(&g),
        "--clip-norm",
        "1",
    ];
    let v0 = run_ok(
        &[
            &common[..],
            &["--noise-multiplier", "0", "-o", s(&base), s(&m)],
        ]
        .concat(),
    );
    assert_eq!(v0["clipped"], 2);
    assert!(v0["dp"]["epsilon"].is_null());
    let v = run_ok(
        &[
            &common[..],
            &[
                "--noise-multiplier",
                "2",
                "--seed",
                "5",
                "-o",
                s(&o1),
                s(&m),
            ],
        ]
        .concat(),
    );
    for (seed, out) in [("5", &o2), ("6", &o3)] {
        let rest = [
            "--noise-multiplier",
            "2",
            "--seed",
            seed,
            "-o",
            s(out),
            s(&m),
        ];
        run_ok(&[&common[..], &rest[..]].concat());
    }
    let std_want = 2.0 / 3.0;
    assert!((v["dp"]["noise_std"].as_f64().unwrap() - std_want).abs() < 1e-12);
    let eps = v["dp"]["epsilon"].as_f64().unwrap();
    assert!(eps > 0.5 && eps < 5.0, "{eps}");
    assert_eq!(std::fs::read(&o1).unwrap(), std::fs::read(&o2).unwrap());
    assert_ne!(std::fs::read(&o1).unwrap(), std::fs::read(&o3).unwrap());
    let (a, b) = (load(&o1), load(&base));
    let noise: Vec<f64> = a["w"].1.iter().zip(&b["w"].1).map(|(x, y)| x - y).collect();
    let n = noise.len() as f64;
    let mean = noise.iter().sum::<f64>() / n;
    let sd = (noise.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0)).sqrt();
    let within1 = noise.iter().filter(|x| x.abs() <= std_want).count() as f64 / n;
    // SE of the mean = 0.0015; of the sd ~ 0.1%; of the 1-sigma fraction ~ 0.1%.
    assert!(mean.abs() < 5.0 * std_want / n.sqrt(), "mean {mean}");
    assert!((sd / std_want - 1.0).abs() < 0.01, "sd {sd}");
    assert!((within1 - 0.6827).abs() < 0.006, "P(|x|<sd) {within1}");
}

// ---------------------------------------------------------------------------
// Bad input: exit 2, the client and tensor named, nothing written, previous
// global/state untouched.
// ---------------------------------------------------------------------------

struct Bad {
    dir: tempfile::TempDir,
}

impl Bad {
    fn new() -> Bad {
        Bad {
            dir: tempfile::tempdir().unwrap(),
        }
    }
    fn p(&self, n: &str) -> PathBuf {
        self.dir.path().join(n)
    }
    /// The 5 round-1 clients with client r1_c3 replaced by `bad`.
    fn manifest_with(&self, bad: &Path) -> PathBuf {
        let mut rows = pool9()[..5].to_vec();
        rows[3].1 = bad.to_path_buf();
        manifest_of(self.dir.path(), "m.jsonl", &rows)
    }
    /// fedavg over the round-1 clients with `bad` in place of r1_c3 must
    /// fail with exit 2 naming every needle.
    fn fedavg_bad(&self, bad: &Path, needles: &[&str]) {
        let m = self.manifest_with(bad);
        let o = self.p("o.safetensors");
        run_bad(&["--strategy", "fedavg", "-o", s(&o), s(&m)], needles);
    }
    fn copy_client(&self, name: &str) -> PathBuf {
        let dst = self.p(&format!("{name}.safetensors"));
        std::fs::copy(client(Path::new("r1_c3.safetensors")), &dst).unwrap();
        dst
    }
    /// r1_c3's tensors with one changed by `f`.
    fn edited(&self, name: &str, f: impl Fn(&mut Vec<OutTensor<'static>>)) -> PathBuf {
        let src = load(&client(Path::new("r1_c3.safetensors")));
        let mut ts: Vec<OutTensor<'static>> = src
            .iter()
            .map(|(n, (shape, v))| {
                let v32: Vec<f32> = v.iter().map(|x| *x as f32).collect();
                OutTensor::f32(n.clone(), shape.clone(), &v32)
            })
            .collect();
        f(&mut ts);
        let p = self.p(&format!("{name}.safetensors"));
        write_safetensors(&p, &ts, None).unwrap();
        p
    }
}

/// Runs fedadam in place over a global + state, expecting failure; checks
/// both files are byte-for-byte untouched and no temporary is left.
fn assert_untouched(b: &Bad, manifest: &Path, needles: &[&str]) {
    let g = b.p("g.safetensors");
    let st = b.p("st.safetensors");
    std::fs::copy(data().join("global0.safetensors"), &g).unwrap();
    // A first good round creates the state.
    run_ok(&[
        "--strategy",
        "fedadam",
        "--global",
        s(&g),
        "--state",
        s(&st),
        "--init-state",
        "-o",
        s(&g),
        s(&data().join("m_r1_5.jsonl")),
    ]);
    let (g0, s0) = (std::fs::read(&g).unwrap(), std::fs::read(&st).unwrap());
    run_bad(
        &[
            "--strategy",
            "fedadam",
            "--global",
            s(&g),
            "--state",
            s(&st),
            "-o",
            s(&g),
            s(manifest),
        ],
        needles,
    );
    assert_eq!(std::fs::read(&g).unwrap(), g0, "global changed");
    assert_eq!(std::fs::read(&st).unwrap(), s0, "state changed");
    let tmp_left = std::fs::read_dir(b.dir.path())
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with(".ftk-tmp")
        })
        .count();
    assert_eq!(tmp_left, 0, "temporary files left behind");
}

#[test]
fn truncated_and_corrupt_client_files() {
    let b = Bad::new();
    let t = b.copy_client("trunc");
    let bytes = std::fs::read(&t).unwrap();
    std::fs::write(&t, &bytes[..bytes.len() - 10]).unwrap();
    let m = b.manifest_with(&t);
    assert_untouched(&b, &m, &["client 'r1_c3'", "truncated"]);
    let c = b.copy_client("corrupt");
    std::fs::write(&c, b"\x10\0\0\0\0\0\0\0{not json at all}").unwrap();
    b.fedavg_bad(&c, &["client 'r1_c3'", "not valid safetensors JSON"]);
    b.fedavg_bad(
        &b.p("missing.safetensors"),
        &["client 'r1_c3'", "missing.safetensors"],
    );
    assert!(!b.p("o.safetensors").exists());
}

#[test]
fn nan_and_inf_updates_name_client_and_tensor() {
    let b = Bad::new();
    for (tag, val) in [
        ("nan", f32::NAN),
        ("inf", f32::INFINITY),
        ("ninf", f32::NEG_INFINITY),
    ] {
        let p = b.edited(tag, |ts| {
            let t = ts.iter_mut().find(|t| t.name == "layers.1.weight").unwrap();
            let mut d = t.data.to_vec();
            d[4 * 17..4 * 18].copy_from_slice(&val.to_le_bytes());
            t.data = d.into();
        });
        let m = b.manifest_with(&p);
        assert_untouched(
            &b,
            &m,
            &["client 'r1_c3'", "tensor 'layers.1.weight'", "element 17"],
        );
        for st in ["fedavg", "fedmedian", "krum"] {
            run_bad(
                &["--strategy", st, "-o", s(&b.p("o.safetensors")), s(&m)],
                &["client 'r1_c3'", "tensor 'layers.1.weight'"],
            );
        }
    }
    assert!(!b.p("o.safetensors").exists());
}

#[test]
fn shape_dtype_and_name_mismatches() {
    let b = Bad::new();
    let shape = b.edited("shape", |ts| {
        let t = ts.iter_mut().find(|t| t.name == "layers.1.bias").unwrap();
        t.shape = vec![2, 5];
    });
    assert_untouched(
        &b,
        &b.manifest_with(&shape),
        &["client 'r1_c3'", "tensor 'layers.1.bias'", "[2, 5]"],
    );
    let dtype = b.edited("dtype", |ts| {
        let t = ts.iter_mut().find(|t| t.name == "head.weight").unwrap();
        let v: Vec<u8> = t
            .data
            .chunks_exact(4)
            .flat_map(|c| (f32::from_le_bytes(c.try_into().unwrap()) as f64).to_le_bytes())
            .collect();
        t.dtype = Dtype::F64;
        t.data = v.into();
    });
    assert_untouched(
        &b,
        &b.manifest_with(&dtype),
        &["client 'r1_c3'", "tensor 'head.weight'", "F64"],
    );
    let missing = b.edited("missing", |ts| ts.retain(|t| t.name != "layers.0.bias"));
    assert_untouched(
        &b,
        &b.manifest_with(&missing),
        &["client 'r1_c3'", "no tensor 'layers.0.bias'"],
    );
    let extra = b.edited("extra", |ts| {
        ts.push(OutTensor::f32("surprise", vec![2], &[1.0, 2.0]))
    });
    run_bad(
        &[
            "--strategy",
            "fedavg",
            "-o",
            s(&b.p("o.safetensors")),
            s(&b.manifest_with(&extra)),
        ],
        &["client 'r1_c3'", "extra tensor 'surprise'"],
    );
}

#[test]
fn manifest_errors() {
    let b = Bad::new();
    let o = b.p("o.safetensors");
    let cases: [(&str, &[&str]); 6] = [
        ("", &["no client_update records"]),
        ("\n{\"kind\":\"other\"}\n", &["no client_update records"]),
        (
            "{\"kind\":\"client_update\",\"cid\":\"a\",\"num_examples\":3}\n",
            &["line 1", "client 'a'", "\"path\""],
        ),
        (
            "{\"kind\":\"client_update\",\"cid\":\"a\",\"path\":\"x\"}\n",
            &["line 1", "\"num_examples\""],
        ),
        (
            "{\"kind\":\"client_update\",\"cid\":\"a\",\"path\":\"x\",\"num_examples\":-4}\n",
            &["num_examples", "-4"],
        ),
        (
            "{\"kind\":\"client_update\",",
            &["line 1", "malformed JSON"],
        ),
    ];
    for (i, (text, needles)) in cases.iter().enumerate() {
        let m = b.p(&format!("m{i}.jsonl"));
        std::fs::write(&m, text).unwrap();
        run_bad(&["--strategy", "fedavg", "-o", s(&o), s(&m)], needles);
    }
    // stdin works too, and an empty stdin is an empty manifest.
    let out = cmd()
        .args(["--strategy", "fedavg", "-o", s(&o)])
        .write_stdin("")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(!o.exists());
    let dup =
        "{\"kind\":\"client_update\",\"cid\":\"a\",\"path\":\"x\",\"num_examples\":1}\n".repeat(2);
    std::fs::write(b.p("dup.jsonl"), dup).unwrap();
    run_bad(
        &["--strategy", "fedavg", "-o", s(&o), s(&b.p("dup.jsonl"))],
        &["line 2", "appears twice"],
    );
}

#[test]
fn usage_errors() {
    let t = tempfile::tempdir().unwrap();
    let o = t.path().join("o.safetensors");
    run_bad(&["-o", s(&o), "m_r1_5.jsonl"], &["--strategy"]);
    run_bad(&["--strategy", "fedavg", "m_r1_5.jsonl"], &["-o"]);
    run_bad(
        &["--strategy", "fedadam", "-o", s(&o), "m_r1_5.jsonl"],
        &["--global"],
    );
    run_bad(
        &[
            "--strategy",
            "fedadam",
            "--global",
            "global0.safetensors",
            "-o",
            s(&o),
            "m_r1_5.jsonl",
        ],
        &["--state"],
    );
    run_bad(
        &[
            "--strategy",
            "bulyan",
            "--num-malicious",
            "2",
            "-o",
            s(&o),
            "m_r1_9.jsonl",
        ],
        &["4*F+3 = 11"],
    );
    run_bad(
        &[
            "--strategy",
            "multikrum",
            "--to-keep",
            "12",
            "-o",
            s(&o),
            "m_r1_9.jsonl",
        ],
        &["exceeds"],
    );
    run_bad(
        &[
            "--strategy",
            "fedavg",
            "--eta",
            "0.1",
            "-o",
            s(&o),
            "m_r1_9.jsonl",
        ],
        &["--eta does not apply"],
    );
    run_bad(
        &[
            "--strategy",
            "fedavg",
            "--noise-multiplier",
            "1",
            "-o",
            s(&o),
            "m_r1_9.jsonl",
        ],
        &["--clip-norm"],
    );
    // A state file from another strategy is refused.
    let st = t.path().join("st.safetensors");
    run_ok(&[
        "--strategy",
        "fedyogi",
        "--global",
        "global0.safetensors",
        "--state",
        s(&st),
        "--init-state",
        "-o",
        s(&o),
        "m_r1_5.jsonl",
    ]);
    run_bad(
        &[
            "--strategy",
            "fedadam",
            "--global",
            "global0.safetensors",
            "--state",
            s(&st),
            "-o",
            s(&o),
            "m_r1_5.jsonl",
        ],
        &["written by --strategy fedyogi"],
    );
}

#[test]
fn skip_bad_drops_and_reports_bad_clients() {
    let b = Bad::new();
    let nan = b.edited("nan", |ts| {
        let t = ts.iter_mut().find(|t| t.name == "head.weight").unwrap();
        let mut d = t.data.to_vec();
        d[..4].copy_from_slice(&f32::NAN.to_le_bytes());
        t.data = d.into();
    });
    let trunc = b.copy_client("trunc");
    let bytes = std::fs::read(&trunc).unwrap();
    std::fs::write(&trunc, &bytes[..bytes.len() / 2]).unwrap();
    let mut rows = pool9()[..5].to_vec();
    rows.push(("bad_nan".into(), nan, 50));
    rows.push(("bad_trunc".into(), trunc, 50));
    let m = manifest_of(b.dir.path(), "m.jsonl", &rows);
    let o = b.p("o.safetensors");
    let v = run_ok(&["--strategy", "fedavg", "--skip-bad", "-o", s(&o), s(&m)]);
    assert_eq!(v["clients"], 5);
    let skipped: Vec<&str> = v["skipped"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["cid"].as_str().unwrap())
        .collect();
    assert_eq!(skipped.len(), 2);
    assert!(skipped.contains(&"bad_nan") && skipped.contains(&"bad_trunc"));
    // Same result as the five good clients alone.
    let good = b.p("good.safetensors");
    run_ok(&["--strategy", "fedavg", "-o", s(&good), "m_r1_5.jsonl"]);
    assert_eq!(std::fs::read(&o).unwrap(), std::fs::read(&good).unwrap());
}
