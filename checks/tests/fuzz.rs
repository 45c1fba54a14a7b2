//! A fuzzing harness on the stable toolchain: seeded structured-random and
//! mutated inputs through every parser ftk has — safetensors headers, each
//! JSON-lines kind (route traces and histograms, client manifests, FedRA
//! allocations, mofa-predict jobs), Hugging Face and diffusers configs
//! (scheduler, UNet, VAE, CLIP text encoder, unCLIP noising), tokenizer files, PNG, and the strategy / skew / recompute / size strings.
//!
//! Property: no panic, and every refusal is one line of the input class
//! (exit 2) or a "no" (exit 1), never an internal or device error.
//!
//! `make test` runs `fuzz_smoke` (a few hundred inputs per target);
//! `make fuzz` runs `cargo test --release -p ftk-checks -- --ignored fuzz`
//! with FTK_FUZZ_COUNT inputs per target (default 1,000,000) and
//! FTK_FUZZ_SEED (default 0), and prints the count per target.

use clap::Parser;
use ftk::Error;
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

type Rng8 = ChaCha8Rng;

/// The message of the last panic (the hook keeps them off stderr).
static PANIC: Mutex<Option<String>> = Mutex::new(None);

fn td() -> PathBuf {
    ftk_checks::testdata()
}

// ---------------------------------------------------------------- mutators

const INTERESTING: &[&str] = &[
    "0",
    "-1",
    "1",
    "1e308",
    "-1e308",
    "1e-320",
    "NaN",
    "Infinity",
    "18446744073709551615",
    "18446744073709551616",
    "9223372036854775807",
    "4294967296",
    "2147483648",
    "1099511627776",
    "0.5",
    "\"\"",
    "null",
    "true",
    "[]",
    "{}",
    "\"x\"",
];

fn interesting_value(r: &mut Rng8) -> Value {
    let s = INTERESTING[r.random_range(0..INTERESTING.len())];
    serde_json::from_str(s).unwrap_or_else(|_| Value::String(s.into()))
}

/// Byte-level mutation: flips, interesting bytes, cuts, splices, repeats.
fn mutate_bytes(r: &mut Rng8, mut b: Vec<u8>) -> Vec<u8> {
    let n = r.random_range(1..=4);
    for _ in 0..n {
        if b.is_empty() {
            b.push(r.random());
            continue;
        }
        let i = r.random_range(0..b.len());
        match r.random_range(0..8) {
            0 => b[i] ^= 1 << r.random_range(0..8),
            1 => b[i] = [0u8, 0xff, b'{', b'"', b'-', b'9', b'\n', b','][r.random_range(0..8)],
            2 => b.truncate(i),
            3 => {
                let j = r.random_range(i..b.len());
                let chunk = b[i..j].to_vec();
                let at = r.random_range(0..b.len());
                b.splice(at..at, chunk);
            }
            4 => {
                let j = r.random_range(i..b.len().min(i + 16) + 1).min(b.len());
                b.drain(i..j);
            }
            5 => {
                let k = r.random_range(0..INTERESTING.len());
                b.splice(i..i, INTERESTING[k].bytes());
            }
            6 => {
                // Overwrite 8 bytes (safetensors' header length, a float).
                let v: u64 =
                    [0, u64::MAX, 1 << 40, b.len() as u64, r.random()][r.random_range(0..5)];
                for (k, x) in v.to_le_bytes().iter().enumerate() {
                    if i + k < b.len() {
                        b[i + k] = *x;
                    }
                }
            }
            _ => {
                let extra: Vec<u8> = (0..r.random_range(1..32)).map(|_| r.random()).collect();
                b.splice(i..i, extra);
            }
        }
    }
    b
}

/// Structure-aware: change one leaf, drop or add a key, change a type.
fn mutate_json(r: &mut Rng8, v: &mut Value, keys: &[&str]) {
    match v {
        Value::Object(m) if !m.is_empty() && r.random_bool(0.8) => {
            let ks: Vec<String> = m.keys().cloned().collect();
            let k = &ks[r.random_range(0..ks.len())];
            match r.random_range(0..5) {
                0 => {
                    m.remove(k);
                }
                1 => {
                    let key = if !keys.is_empty() && r.random_bool(0.7) {
                        keys[r.random_range(0..keys.len())].to_string()
                    } else {
                        format!("k{}", r.random_range(0..100))
                    };
                    m.insert(key, interesting_value(r));
                }
                _ => mutate_json(r, m.get_mut(k).unwrap(), keys),
            }
        }
        Value::Array(a) if !a.is_empty() && r.random_bool(0.8) => {
            let i = r.random_range(0..a.len());
            match r.random_range(0..4) {
                0 => {
                    a.remove(i);
                }
                1 => {
                    let x = a[i].clone();
                    a.push(x);
                }
                _ => mutate_json(r, &mut a[i], keys),
            }
        }
        _ => *v = interesting_value(r),
    }
}

/// A JSON object's text: with probability `p_struct` one to three
/// structured mutations (new keys drawn from the object's own), else
/// byte-level mutation.
fn mutate_config(r: &mut Rng8, text: &str, p_struct: f64) -> Vec<u8> {
    if r.random_bool(p_struct) {
        let mut v: Value = serde_json::from_str(text).unwrap();
        let keys: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
        let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
        for _ in 0..r.random_range(1..=3) {
            mutate_json(r, &mut v, &keys);
        }
        v.to_string().into_bytes()
    } else {
        mutate_bytes(r, text.as_bytes().to_vec())
    }
}

/// A JSON-lines text: structured mutation of one record, a random record
/// built from the kind's keys, or byte-level mutation.
fn mutate_jsonl(r: &mut Rng8, seed: &str, keys: &[&str]) -> Vec<u8> {
    let mut lines: Vec<String> = seed.lines().map(String::from).collect();
    match r.random_range(0..4) {
        0 | 1 if !lines.is_empty() => {
            let i = r.random_range(0..lines.len());
            if let Ok(mut v) = serde_json::from_str::<Value>(&lines[i]) {
                for _ in 0..r.random_range(1..=3) {
                    mutate_json(r, &mut v, keys);
                }
                lines[i] = v.to_string();
            }
            lines.join("\n").into_bytes()
        }
        2 => {
            let mut m = serde_json::Map::new();
            for _ in 0..r.random_range(0..keys.len() + 2) {
                let k = keys[r.random_range(0..keys.len())];
                m.insert(k.into(), interesting_value(r));
            }
            let at = r.random_range(0..=lines.len());
            lines.insert(at, Value::Object(m).to_string());
            lines.join("\n").into_bytes()
        }
        _ => mutate_bytes(r, seed.as_bytes().to_vec()),
    }
}

// ---------------------------------------------------------------- checking

enum Verdict {
    Ok,
    Bad(String),
}

/// Run `f`; a panic, an internal/device error or a multi-line message is a
/// finding.
fn check(f: impl FnOnce() -> ftk::Result<()>) -> Verdict {
    *PANIC.lock().unwrap() = None;
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(Ok(())) => Verdict::Ok,
        Ok(Err(e)) => {
            // As the tools print it (control characters escaped).
            let m = ftk::cli::one_line(&e.to_string());
            match e {
                Error::Internal(_) | Error::Device(_) => {
                    Verdict::Bad(format!("{} error: {m}", e.prefix()))
                }
                _ if m.contains('\n') => Verdict::Bad(format!("multi-line message: {m:?}")),
                _ => Verdict::Ok,
            }
        }
        Err(_) => Verdict::Bad(format!(
            "panic: {}",
            PANIC.lock().unwrap().clone().unwrap_or_default()
        )),
    }
}

fn parse<T: Parser>(args: &[String]) -> ftk::Result<T> {
    T::try_parse_from(args).map_err(|e| Error::input(ftk::cli::usage_line(&e.to_string(), "t")))
}

fn argv(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

/// Makes one input from the generator and runs it (the path is a scratch
/// directory).
type Runner = Box<dyn FnMut(&mut Rng8, &Path) -> Verdict>;

struct Target {
    name: &'static str,
    run: Runner,
}

fn write(p: &Path, b: &[u8]) {
    std::fs::write(p, b).unwrap();
}

fn targets() -> Vec<Target> {
    let mut t: Vec<Target> = Vec::new();

    // safetensors headers and data, parsed and decoded in memory
    let seeds: Vec<Vec<u8>> = [
        "fed-aggregate/clients/r1_c0.safetensors",
        "chunk-run/mixtral_k2.input.safetensors",
        "route-hist/logits_bf16_e8_k2.safetensors",
        "fed-embed/server.safetensors",
    ]
    .iter()
    .map(|p| std::fs::read(td().join(p)).unwrap())
    .collect();
    t.push(Target {
        name: "safetensors",
        run: Box::new(move |r, _| {
            let seed = seeds[r.random_range(0..seeds.len())].clone();
            let b = if r.random_bool(0.5) {
                // Mutate the header JSON itself, keeping the layout.
                let n = u64::from_le_bytes(seed[..8].try_into().unwrap()) as usize;
                let mut h: Value = serde_json::from_slice(&seed[8..8 + n]).unwrap();
                mutate_json(
                    r,
                    &mut h,
                    &["dtype", "shape", "data_offsets", "__metadata__"],
                );
                let hb = h.to_string().into_bytes();
                let mut out = (hb.len() as u64).to_le_bytes().to_vec();
                out.extend(hb);
                out.extend(&seed[8 + n..]);
                out
            } else {
                mutate_bytes(r, seed)
            };
            check(|| {
                let f = ftk::tensors::TensorFile::from_bytes("fuzz.safetensors", b)?;
                for n in f.names() {
                    if let Some(x) = f.get(&n) {
                        if ftk::tensors::is_float(x.dtype) {
                            x.to_f32_vec()?;
                        } else if ftk::tensors::is_int(x.dtype) {
                            x.to_i64_vec()?;
                        }
                    }
                }
                Ok(())
            })
        }),
    });

    // route-hist: JSON-lines traces
    let trace = std::fs::read_to_string(td().join("route-hist/trace.jsonl")).unwrap();
    t.push(Target {
        name: "route trace (jsonl)",
        run: Box::new(move |r, dir| {
            let p = dir.join("trace.jsonl");
            write(
                &p,
                &mutate_jsonl(
                    r,
                    &trace,
                    &["kind", "layer", "step", "rank", "topk", "logits"],
                ),
            );
            let a = argv(&[
                "route-hist",
                "--experts",
                "8",
                "--ep",
                "2",
                p.to_str().unwrap(),
            ]);
            check(|| route_hist::run(parse::<route_hist::Args>(&a)?))
        }),
    });

    // mem-plan: route_hist records and HF configs
    let hist = std::fs::read_to_string(td().join("route-hist/logits_f32_e8_k2.ep1.expected.jsonl"))
        .unwrap();
    let small = td().join("mem-plan/memfine-model1.json");
    t.push(Target {
        name: "route_hist records (jsonl)",
        run: Box::new(move |r, dir| {
            let p = dir.join("hist.jsonl");
            write(
                &p,
                &mutate_jsonl(
                    r,
                    &hist,
                    &[
                        "kind", "layer", "step", "experts", "topk", "tokens", "counts", "ep",
                    ],
                ),
            );
            let cfg = td().join("configs/mixtral-8x7b/config.json");
            let a = argv(&[
                "mem-plan",
                "--model",
                cfg.to_str().unwrap(),
                "--hist",
                p.to_str().unwrap(),
                "--ep",
                "8",
                "--dp",
                "8",
            ]);
            check(|| match mem_plan::run(parse::<mem_plan::Args>(&a)?) {
                Err(Error::Negative(_)) => Ok(()),
                other => other,
            })
        }),
    });
    let cfgs: Vec<String> = [
        "mixtral-8x7b",
        "deepseek-v3",
        "qwen3-30b-a3b",
        "gpt2",
        "llama-3-8b",
    ]
    .iter()
    .map(|c| std::fs::read_to_string(td().join(format!("configs/{c}/config.json"))).unwrap())
    .chain([std::fs::read_to_string(&small).unwrap()])
    .collect();
    t.push(Target {
        name: "HF config.json",
        run: Box::new(move |r, _| {
            let seed = &cfgs[r.random_range(0..cfgs.len())];
            let text = mutate_config(r, seed, 0.7);
            check(|| {
                let s = String::from_utf8(text).map_err(|_| Error::input("not UTF-8"))?;
                let m = ftk::model::ModelConfig::from_json_str(&s, "fuzz.json")?;
                let _ = (m.total_params(), m.active_params());
                Ok(())
            })
        }),
    });

    // fed-aggregate: client manifests (paths to the real clients) and FedRA allocations
    let clients = td().join("fed-aggregate");
    let manifest = std::fs::read_to_string(clients.join("m_r1_5.jsonl"))
        .unwrap()
        .replace("clients/", &format!("{}/clients/", clients.display()));
    t.push(Target {
        name: "client manifest (jsonl)",
        run: Box::new(move |r, dir| {
            let p = dir.join("m.jsonl");
            write(
                &p,
                &mutate_jsonl(r, &manifest, &["kind", "cid", "path", "num_examples"]),
            );
            let o = dir.join("g.safetensors");
            let strategy = ["fedavg", "fedmedian", "krum", "fedtrimmedavg"][r.random_range(0..4)];
            let a = argv(&[
                "fed-aggregate",
                "--strategy",
                strategy,
                "-o",
                o.to_str().unwrap(),
                p.to_str().unwrap(),
            ]);
            check(|| fed_aggregate::run(parse::<fed_aggregate::Args>(&a)?))
        }),
    });
    let alloc = std::fs::read_to_string(clients.join("fedra_alloc.jsonl")).unwrap();
    let fedra_manifest = std::fs::read_to_string(clients.join("m_fedra.jsonl"))
        .unwrap()
        .replace(
            "\"path\": \"",
            &format!("\"path\": \"{}/", clients.display()),
        )
        .replace("\"path\":\"", &format!("\"path\":\"{}/", clients.display()));
    t.push(Target {
        name: "fedra allocation (jsonl)",
        run: Box::new(move |r, dir| {
            let p = dir.join("alloc.jsonl");
            write(
                &p,
                &mutate_jsonl(
                    r,
                    &alloc,
                    &["kind", "round", "client", "layers", "mask", "num_layers"],
                ),
            );
            let m = dir.join("mf.jsonl");
            write(&m, fedra_manifest.as_bytes());
            let o = dir.join("f.safetensors");
            let g = clients.join("fedra_global.safetensors");
            let a = argv(&[
                "fed-aggregate",
                "--strategy",
                "fedra",
                "--alloc",
                p.to_str().unwrap(),
                "--layer-pattern",
                r"blocks\.(\d+)\.",
                "--global",
                g.to_str().unwrap(),
                "-o",
                o.to_str().unwrap(),
                m.to_str().unwrap(),
            ]);
            check(|| fed_aggregate::run(parse::<fed_aggregate::Args>(&a)?))
        }),
    });

    // mofa-predict: JSON jobs (the published-run records) and strategy strings
    let jobs = std::fs::read_to_string(td().join("mofa-predict/measurements.jsonl")).unwrap();
    let first_jobs: String = jobs.lines().take(3).collect::<Vec<_>>().join("\n");
    t.push(Target {
        name: "mofa-predict jobs (jsonl)",
        run: Box::new(move |r, dir| {
            let p = dir.join("jobs.jsonl");
            write(
                &p,
                &mutate_jsonl(
                    r,
                    &first_jobs,
                    &[
                        "model", "cluster", "strategy", "tp", "pp", "gbs", "mbs", "gpus", "seq",
                    ],
                ),
            );
            let a = argv(&["mofa-predict", p.to_str().unwrap()]);
            check(
                || match mofa_predict::run(parse::<mofa_predict::Args>(&a)?) {
                    Err(Error::Negative(_)) => Ok(()),
                    other => other,
                },
            )
        }),
    });
    t.push(Target {
        name: "strategy strings",
        run: Box::new(move |r, _| {
            let base = "tp=8,pp=4,vpp=2,mbs=1,gbs=1024,recompute=selective,zero=1";
            let s =
                String::from_utf8_lossy(&mutate_bytes(r, base.as_bytes().to_vec())).into_owned();
            let cfg = td().join("configs/llama-3-70b/config.json");
            let which = r.random_range(0..5);
            let s2 = s.clone();
            check(move || match which {
                0 => {
                    let a = vec![
                        "mofa-predict".to_string(),
                        "--model".into(),
                        cfg.display().to_string(),
                        "--seq".into(),
                        "8192".into(),
                        "--cluster".into(),
                        "H100".into(),
                        "--gpus".into(),
                        "1024".into(),
                        "--strategy".into(),
                        s2,
                    ];
                    match mofa_predict::run(parse::<mofa_predict::Args>(&a)?) {
                        Err(Error::Negative(_)) => Ok(()),
                        other => other,
                    }
                }
                1 => parse::<route_hist::Args>(&["route-hist".into(), "--synthetic".into(), s2])
                    .map(|_| ()),
                2 => parse::<chunk_run::Args>(&["chunk-run".into(), "--recompute".into(), s2])
                    .map(|_| ()),
                3 => ftk::size::parse_size(&s2).map(|_| ()),
                _ => {
                    parse::<fed_aggregate::Args>(&["fed-aggregate".into(), "--strategy".into(), s2])
                        .map(|_| ())
                }
            })
        }),
    });

    // diffusers scheduler configs, for every scheduler
    let sched =
        std::fs::read_to_string(td().join("diffuse-synth/tiny-sd/scheduler/scheduler_config.json"))
            .unwrap();
    t.push(Target {
        name: "diffusers scheduler_config.json",
        run: Box::new(move |r, dir| {
            let mut v: Value = serde_json::from_str(&sched).unwrap();
            let keys: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
            let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
            for _ in 0..r.random_range(1..=3) {
                mutate_json(r, &mut v, &keys);
            }
            let kinds = diffuse_synth::scheduler::Kind::ALL;
            let kind = kinds[r.random_range(0..kinds.len())];
            let steps = r.random_range(1..60);
            // Kept on disk so that a hang report can point at it.
            write(
                &dir.join("scheduler_config.json"),
                format!(
                    "{{\"kind\":\"{}\",\"steps\":{steps},\"config\":{v}}}",
                    kind.name()
                )
                .as_bytes(),
            );
            check(|| {
                let c = diffuse_synth::scheduler::Config::from_json(kind, &v, "fuzz.json")?;
                diffuse_synth::scheduler::Scheduler::new(&c, steps, 0.0)?;
                Ok(())
            })
        }),
    });

    // diffusers model folders: unet/, vae/ and text_encoder/ config.json
    // (the weights linked in unchanged), and Stable-unCLIP's image_normalizer
    // and image_noising_scheduler; every config field is mapped or refused.
    let sd = td().join("diffuse-synth/tiny-sd");
    let unclip = td().join("diffuse-synth/tiny-unclip");
    let parts: Vec<(PathBuf, &'static str, String)> = [
        (&sd, "unet"),
        (&sd, "vae"),
        (&sd, "text_encoder"),
        (&unclip, "image_noising_scheduler"),
    ]
    .iter()
    .map(|(root, sub)| {
        let name = if *sub == "image_noising_scheduler" {
            "scheduler_config.json"
        } else {
            "config.json"
        };
        let text = std::fs::read_to_string(root.join(sub).join(name)).unwrap();
        (root.to_path_buf(), *sub, text)
    })
    .collect();
    t.push(Target {
        name: "diffusers model configs",
        run: Box::new(move |r, dir| {
            let (root, sub, text) = &parts[r.random_range(0..parts.len())];
            // A model folder of links to the real one, with one config mutated.
            let m = dir.join("model");
            let _ = std::fs::remove_dir_all(&m);
            std::fs::create_dir_all(&m).unwrap();
            for e in std::fs::read_dir(root).unwrap().flatten() {
                let to = m.join(e.file_name());
                if e.file_name() == *sub {
                    std::fs::create_dir(&to).unwrap();
                    for f in std::fs::read_dir(e.path()).unwrap().flatten() {
                        std::os::unix::fs::symlink(f.path(), to.join(f.file_name())).unwrap();
                    }
                } else {
                    std::os::unix::fs::symlink(e.path(), to).unwrap();
                }
            }
            let name = if *sub == "image_noising_scheduler" {
                "scheduler_config.json"
            } else {
                "config.json"
            };
            let b = mutate_config(r, text, 0.8);
            let cfg = m.join(sub).join(name);
            let _ = std::fs::remove_file(&cfg);
            write(&cfg, &b);
            let sub = *sub;
            check(move || match sub {
                "unet" => diffuse_synth::model::load_unet(&m).map(|_| ()),
                "vae" => diffuse_synth::model::load_vae(&m).map(|_| ()),
                "text_encoder" => {
                    diffuse_synth::text::TextModel::load(&m.join("text_encoder")).map(|_| ())
                }
                _ => diffuse_synth::unclip::Noiser::load(&m, 16).map(|_| ()),
            })
        }),
    });

    // CLIP tokenizer folders
    let tok_dir = td().join("diffuse-synth/tiny-sd/tokenizer");
    let tok = std::fs::read_to_string(tok_dir.join("tokenizer.json")).unwrap();
    let tok_cfg = std::fs::read_to_string(tok_dir.join("tokenizer_config.json")).unwrap();
    t.push(Target {
        name: "tokenizer files",
        run: Box::new(move |r, dir| {
            let d = dir.join("tok");
            std::fs::create_dir_all(&d).unwrap();
            let (a, b) = if r.random_bool(0.5) {
                let mut v: Value = serde_json::from_str(&tok).unwrap();
                mutate_json(r, &mut v, &["model", "vocab", "merges", "added_tokens"]);
                (v.to_string().into_bytes(), tok_cfg.clone().into_bytes())
            } else {
                let mut v: Value = serde_json::from_str(&tok_cfg).unwrap();
                mutate_json(
                    r,
                    &mut v,
                    &[
                        "bos_token",
                        "eos_token",
                        "pad_token",
                        "unk_token",
                        "model_max_length",
                    ],
                );
                (tok.clone().into_bytes(), v.to_string().into_bytes())
            };
            write(&d.join("tokenizer.json"), &a);
            write(&d.join("tokenizer_config.json"), &b);
            let prompt = ["a photo of a cat", "", "!!", "<|endoftext|> x"][r.random_range(0..4)];
            check(|| {
                let t = diffuse_synth::text::Tokenizer::load(&d)?;
                t.encode(prompt)?;
                Ok(())
            })
        }),
    });

    // PNG decoding
    let px: Vec<f32> = (0..3 * 8 * 8).map(|i| (i % 7) as f32 / 7.0).collect();
    let png_seed = diffuse_synth::png::encode_chw(&px, 3, 8, 8).unwrap();
    t.push(Target {
        name: "PNG",
        run: Box::new(move |r, dir| {
            let p = dir.join("x.png");
            write(&p, &mutate_bytes(r, png_seed.clone()));
            check(|| diffuse_synth::png::read_rgb_chw(&p).map(|_| ()))
        }),
    });
    t
}

/// Findings not fixed yet: the smoke run (part of `make test`) leaves these
/// targets out and says so; `make fuzz` runs them. Empty: the two found so far
/// (mofa-predict's inline model sizes, a scheduler's num_train_timesteps) are fixed.
const KNOWN: &[(&str, &str)] = &[];

/// Run every target `count` times from `seed`; returns the findings.
fn run_all(count: u64, seed: u64, skip_known: bool) -> Vec<String> {
    std::panic::set_hook(Box::new(|info| {
        let msg = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_default();
        let loc = info
            .location()
            .map(|l| format!(" at {l}"))
            .unwrap_or_default();
        *PANIC.lock().unwrap() = Some(format!("{msg}{loc}"));
    }));
    // The tools print records: send stdout to /dev/null while fuzzing.
    let null = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/null")
        .unwrap();
    // SAFETY: duplicating descriptors this process owns.
    let saved = unsafe { libc::dup(1) };
    unsafe { libc::dup2(std::os::fd::AsRawFd::as_raw_fd(&null), 1) };
    let dir = tempfile::Builder::new()
        .prefix("ftk-fuzz")
        .tempdir()
        .unwrap();
    let mut findings = Vec::new();
    // A watchdog: an input that runs for more than FTK_FUZZ_HANG_S seconds
    // is a finding too (a hang); it is reported and the process aborts,
    // leaving the input in the work directory.
    let watch = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let current: std::sync::Arc<Mutex<&'static str>> = std::sync::Arc::new(Mutex::new(""));
    {
        let (watch, current) = (watch.clone(), current.clone());
        let keep = dir.path().to_path_buf();
        let limit = env_u64("FTK_FUZZ_HANG_S", 20);
        std::thread::spawn(move || {
            let mut last = (0, std::time::Instant::now());
            loop {
                std::thread::sleep(std::time::Duration::from_millis(500));
                let now = watch.load(std::sync::atomic::Ordering::Relaxed);
                if now != last.0 {
                    last = (now, std::time::Instant::now());
                } else if now != u64::MAX && last.1.elapsed().as_secs() > limit {
                    let name = *current.lock().unwrap();
                    eprintln!(
                        "fuzz {name}: input {} (seed {seed}) runs for over {limit} s (a hang); its files are in {}",
                        now - 1,
                        keep.display()
                    );
                    std::process::abort();
                }
            }
        });
    }
    let only = std::env::var("FTK_FUZZ_TARGET").unwrap_or_default();
    for (k, mut t) in targets().into_iter().enumerate() {
        if !t.name.contains(only.as_str()) {
            continue;
        }
        if let Some((_, why)) = KNOWN.iter().find(|k| skip_known && k.0 == t.name) {
            eprintln!(
                "fuzz {:<32} skipped in the smoke run, known finding: {why}",
                t.name
            );
            continue;
        }
        let mut r = Rng8::seed_from_u64(seed ^ (k as u64) << 32);
        let mut bad = 0u64;
        for i in 0..count {
            watch.store(i + 1, std::sync::atomic::Ordering::Relaxed);
            *current.lock().unwrap() = t.name;
            if let Verdict::Bad(m) = (t.run)(&mut r, dir.path()) {
                bad += 1;
                if findings.len() < 20 {
                    findings.push(format!("{} input {i} (seed {seed}): {m}", t.name));
                }
            }
        }
        eprintln!("fuzz {:<32} {count} inputs, {bad} findings", t.name);
    }
    watch.store(u64::MAX, std::sync::atomic::Ordering::Relaxed);
    // SAFETY: restoring the saved descriptor.
    unsafe {
        libc::dup2(saved, 1);
        libc::close(saved);
    }
    let _ = std::panic::take_hook();
    findings
}

fn env_u64(k: &str, d: u64) -> u64 {
    std::env::var(k)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(d)
}

#[test]
fn fuzz_smoke() {
    let f = run_all(
        env_u64("FTK_FUZZ_SMOKE", 150),
        env_u64("FTK_FUZZ_SEED", 0),
        true,
    );
    assert!(f.is_empty(), "{}", f.join("\n"));
}

#[test]
#[ignore = "long: make fuzz"]
fn fuzz() {
    let f = run_all(
        env_u64("FTK_FUZZ_COUNT", 1_000_000),
        env_u64("FTK_FUZZ_SEED", 0),
        false,
    );
    assert!(f.is_empty(), "{}", f.join("\n"));
}
