//! Kill and signal tests for every tool that writes files: SIGKILL and
//! SIGTERM at random moments of a run (seeded) leave either the old output
//! intact or the new one complete, and never a temporary file. Also: a
//! mapped input truncated under a reader ends in one line and exit 2, not a
//! SIGBUS crash.

use ftk::tensors::{write_safetensors, OutTensor};
use ftk_checks::{bin_dir, temps_in, testdata};
use rand::{RngExt, SeedableRng};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The arguments of a run writing the given output path.
type ArgsFor = Box<dyn Fn(&Path) -> Vec<String>>;

/// One writer under test: how to run it with `out` as its output.
struct Writer {
    name: &'static str,
    args: ArgsFor,
}

/// `args` followed by the output path (a tool whose output flag comes last).
fn then_output(args: &[&str], o: &Path) -> Vec<String> {
    let mut v: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    v.push(o.display().to_string());
    v
}

/// diffuse-synth sampling a batch of 2 from the tiny SD fixture with DDIM, seed 1.
fn tiny_sd_ddim(td: &Path, steps: usize, out: &str) -> Vec<String> {
    let mut v: Vec<String> = vec![
        "--model".into(),
        td.join("diffuse-synth/tiny-sd").display().to_string(),
        "--scheduler".into(),
        "ddim".into(),
        "--steps".into(),
        steps.to_string(),
        "--prompt-embeds".into(),
        td.join("diffuse-synth/pipeline.safetensors")
            .display()
            .to_string(),
    ];
    v.extend(["--seed", "1", "--batch", "2", "-o", out].map(String::from));
    v
}

fn run_to_end(tool: &str, args: &[String], dir: &Path) -> Duration {
    let t0 = Instant::now();
    let o = Command::new(bin_dir().join(tool))
        .args(args)
        .current_dir(dir)
        .env("FTK_NO_PROGRESS", "1")
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "{tool} {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    t0.elapsed()
}

fn features(path: &Path, rows: usize, dim: usize) {
    let v: Vec<f32> = (0..rows * dim)
        .map(|i| ((i * 7919) % 1000) as f32 / 1000.0)
        .collect();
    write_safetensors(
        path,
        &[OutTensor::f32("features", vec![rows, dim], &v)],
        None,
    )
    .unwrap();
}

fn clients(dir: &Path, n: usize, len: usize) -> PathBuf {
    let mut m = String::new();
    for c in 0..n {
        let v: Vec<f32> = (0..len)
            .map(|i| (i % 997) as f32 * 1e-3 + c as f32)
            .collect();
        let p = dir.join(format!("c{c}.safetensors"));
        write_safetensors(&p, &[OutTensor::f32("w", vec![len], &v)], None).unwrap();
        m.push_str(&format!(
            "{{\"kind\":\"client_update\",\"cid\":\"{c}\",\"path\":\"c{c}.safetensors\",\"num_examples\":{}}}\n",
            c + 1
        ));
    }
    let mp = dir.join("m.jsonl");
    std::fs::write(&mp, m).unwrap();
    mp
}

/// Start `cmd` (output discarded), send it SIGKILL on even trials and
/// SIGTERM on odd ones after `after`, and reap it; the signal sent.
fn kill_after(cmd: &mut Command, after: Duration, trial: usize) -> i32 {
    let mut child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(after);
    let sig = if trial.is_multiple_of(2) {
        libc::SIGKILL
    } else {
        libc::SIGTERM
    };
    // SAFETY: signalling our own child by pid.
    unsafe { libc::kill(child.id() as i32, sig) };
    child.wait().unwrap();
    sig
}

/// Kill `tool` at random moments; after each: the output is the old bytes
/// or the complete new bytes, and no temporary is left.
fn kill_at_random(tool: &str, w: &Writer, work: &Path, trials: usize, seed: u64) {
    let out = work.join(format!("{}.out", w.name));
    // The complete new output, from an uninterrupted run.
    let _ = std::fs::remove_file(&out);
    let t_ref = run_to_end(tool, &(w.args)(&out), work);
    let new = std::fs::read(&out).unwrap();
    let old = b"the previous output, which must survive".to_vec();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let (mut saw_old, mut saw_new) = (0, 0);
    for trial in 0..trials {
        std::fs::write(&out, &old).unwrap();
        let at = t_ref.mul_f64(rng.random_range(0.0..1.2));
        let mut cmd = Command::new(bin_dir().join(tool));
        cmd.args((w.args)(&out))
            .current_dir(work)
            .env("FTK_NO_PROGRESS", "1");
        let sig = kill_after(&mut cmd, at, trial);
        let got = std::fs::read(&out).unwrap();
        if got == old {
            saw_old += 1;
        } else if got == new {
            saw_new += 1;
        } else {
            panic!(
                "{} trial {trial} (signal {sig} at {at:?}): output is neither the old nor the complete new file ({} bytes, new is {})",
                w.name,
                got.len(),
                new.len()
            );
        }
        let left = temps_in(work);
        assert!(
            left.is_empty(),
            "{} trial {trial}: temporaries left: {left:?}",
            w.name
        );
    }
    eprintln!(
        "{}: {trials} kills, old output kept {saw_old}, new complete {saw_new} (run {t_ref:?})",
        w.name
    );
}

#[test]
fn killed_writers_leave_old_or_complete_output_and_no_temporaries() {
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path();
    let td = testdata();
    clients(work, 3, 1 << 22);
    features(&work.join("f.safetensors"), 1 << 14, 256);
    let cases: Vec<(&str, Writer)> = vec![
        (
            "fed-aggregate",
            Writer {
                name: "fedavg",
                args: Box::new(|o| {
                    vec![
                        "--strategy".into(),
                        "fedavg".into(),
                        "-o".into(),
                        o.display().to_string(),
                        "m.jsonl".into(),
                    ]
                }),
            },
        ),
        (
            "fed-embed",
            Writer {
                name: "noise",
                args: Box::new(|o| {
                    then_output(
                        &[
                            "noise",
                            "--features",
                            "f.safetensors",
                            "--clip",
                            "4",
                            "--sigma",
                            "1",
                            "--seed",
                            "0",
                            "-o",
                        ],
                        o,
                    )
                }),
            },
        ),
        (
            "chunk-run",
            Writer {
                name: "grads",
                args: Box::new(|o| {
                    then_output(
                        &[
                            "--hidden",
                            "128",
                            "--ffn",
                            "256",
                            "--experts",
                            "8",
                            "--topk",
                            "2",
                            "--tokens",
                            "256",
                            "--grads-out",
                        ],
                        o,
                    )
                }),
            },
        ),
        (
            "diffuse-synth",
            Writer {
                name: "samples",
                args: Box::new(move |o| tiny_sd_ddim(&td, 3, &o.display().to_string())),
            },
        ),
    ];
    for (i, (tool, w)) in cases.iter().enumerate() {
        kill_at_random(tool, w, work, 8, i as u64);
    }
}

/// The child half of the SIGBUS test: map a file, cut it, touch its data.
#[test]
#[ignore = "run by truncated_input_is_one_line_not_a_crash in a child process"]
fn child_reads_a_file_truncated_under_it() {
    let Ok(p) = std::env::var("FTK_SIGBUS_FILE") else {
        return;
    };
    let f = ftk::tensors::TensorFile::open(Path::new(&p)).unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&p)
        .unwrap()
        .set_len(64)
        .unwrap();
    let t = f.get("w").unwrap();
    let sum: f32 = t.data.iter().map(|&b| b as f32).sum();
    println!("read past the end without a fault: {sum}");
}

#[test]
fn truncated_input_is_one_line_not_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("c.safetensors");
    let v = vec![1.0f32; 1 << 20];
    write_safetensors(&p, &[OutTensor::f32("w", vec![v.len()], &v)], None).unwrap();
    let o = Command::new(std::env::current_exe().unwrap())
        .args([
            "--ignored",
            "--exact",
            "child_reads_a_file_truncated_under_it",
            "--nocapture",
        ])
        .env("FTK_SIGBUS_FILE", &p)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    let line = err
        .lines()
        .find(|l| l.contains("shrank"))
        .unwrap_or_else(|| panic!("no message: {err}"));
    assert!(
        line.contains("c.safetensors") && line.contains("rename"),
        "{line}"
    );
}

#[test]
fn fed_aggregate_truncated_client_mid_read_names_it() {
    // The same through the tool: a client cut while fed-aggregate streams it
    // either finishes first (exit 0) or ends in the one line naming it.
    let dir = tempfile::tempdir().unwrap();
    let m = clients(dir.path(), 2, 1 << 23);
    let child = Command::new(bin_dir().join("fed-aggregate"))
        .args(["--strategy", "fedavg", "-o", "g.safetensors"])
        .arg(&m)
        .current_dir(dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(30));
    std::fs::OpenOptions::new()
        .write(true)
        .open(dir.path().join("c1.safetensors"))
        .unwrap()
        .set_len(4096)
        .unwrap();
    let o = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    match o.status.code() {
        Some(0) => eprintln!("fed-aggregate finished before the cut"),
        Some(2) => assert!(
            err.lines().count() == 1 && err.contains("c1.safetensors"),
            "{err}"
        ),
        other => panic!("exit {other:?}: {err}"),
    }
    assert!(temps_in(dir.path()).is_empty());
}

/// The two files of a FedAdam round (global model, then optimiser state)
/// under SIGKILL/SIGTERM at random moments: afterwards the pair is the old
/// one, the new one, or (a kill between the two renames) the new model with
/// the old state, which the next round refuses rather than applying round 1
/// again. Never a torn file, never a temporary left after the next run.
#[test]
fn killed_fedadam_round_leaves_a_consistent_or_refused_pair() {
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path();
    let m = clients(work, 3, 1 << 22);
    let g0: Vec<f32> = (0..1 << 22).map(|i| (i % 13) as f32 * 1e-2).collect();
    write_safetensors(
        &work.join("g0.safetensors"),
        &[OutTensor::f32("w", vec![g0.len()], &g0)],
        None,
    )
    .unwrap();
    let round = |extra: &[&str]| -> Vec<String> {
        [
            "--strategy",
            "fedadam",
            "--global",
            "g.safetensors",
            "--state",
            "s.safetensors",
            "-o",
            "g.safetensors",
        ]
        .iter()
        .chain(extra)
        .map(|s| s.to_string())
        .chain([m.display().to_string()])
        .collect()
    };
    let read = |n: &str| std::fs::read(work.join(n)).unwrap();
    let put = |n: &str, b: &[u8]| std::fs::write(work.join(n), b).unwrap();
    // Round 1 from g0 gives the old pair; round 2 from it the new pair.
    put("g.safetensors", &read("g0.safetensors"));
    run_to_end("fed-aggregate", &round(&["--init-state"]), work);
    let (g1, s1) = (read("g.safetensors"), read("s.safetensors"));
    let t_ref = run_to_end("fed-aggregate", &round(&[]), work);
    let (g2, s2) = (read("g.safetensors"), read("s.safetensors"));
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    let (mut old, mut new, mut torn_pair) = (0, 0, 0);
    for trial in 0..10 {
        put("g.safetensors", &g1);
        put("s.safetensors", &s1);
        let mut cmd = Command::new(bin_dir().join("fed-aggregate"));
        cmd.args(round(&[])).current_dir(work);
        let sig = kill_after(&mut cmd, t_ref.mul_f64(rng.random_range(0.0..1.2)), trial);
        let (g, s) = (read("g.safetensors"), read("s.safetensors"));
        if g == g1 && s == s1 {
            old += 1;
        } else if g == g2 && s == s2 {
            new += 1;
        } else if g == g2 && s == s1 {
            // The next round must refuse this pair.
            torn_pair += 1;
            let o = Command::new(bin_dir().join("fed-aggregate"))
                .args(round(&[]))
                .current_dir(work)
                .output()
                .unwrap();
            let err = String::from_utf8_lossy(&o.stderr);
            assert_eq!(o.status.code(), Some(2), "{err}");
            assert!(err.contains("not the model this state belongs to"), "{err}");
        } else {
            panic!("trial {trial} (signal {sig}): a global/state pair that is neither old nor new");
        }
        // A kill inside the instant between link and rename may leave a
        // temporary; the next run writing there removes it.
        if !temps_in(work).is_empty() {
            run_to_end(
                "fed-aggregate",
                &[
                    "--strategy".into(),
                    "fedavg".into(),
                    "-o".into(),
                    "sweep.safetensors".into(),
                    m.display().to_string(),
                ],
                work,
            );
            assert!(temps_in(work).is_empty(), "trial {trial}: not swept");
        }
    }
    eprintln!("fedadam pair: old {old}, new {new}, new model + old state (refused) {torn_pair}");
}

/// diffuse-synth with --png-dir: -o is committed after every PNG, so a kill
/// leaves -o old (or new and complete), each PNG present complete, and no
/// temporary in either directory.
#[test]
fn killed_diffuse_synth_leaves_complete_pngs_and_no_temporaries() {
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path();
    let td = testdata();
    let args = |out: &str| -> Vec<String> {
        let mut v = tiny_sd_ddim(&td, 30, out);
        v.extend(["--png-dir".into(), "png".into()]);
        v
    };
    let t_ref = run_to_end("diffuse-synth", &args("ref.safetensors"), work);
    let new = std::fs::read(work.join("ref.safetensors")).unwrap();
    let pngs: std::collections::BTreeMap<_, _> = std::fs::read_dir(work.join("png"))
        .unwrap()
        .flatten()
        .map(|e| (e.file_name(), std::fs::read(e.path()).unwrap()))
        .collect();
    assert_eq!(pngs.len(), 2);
    let old = b"previous samples".to_vec();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
    for trial in 0..8 {
        std::fs::remove_dir_all(work.join("png")).unwrap();
        std::fs::write(work.join("o.safetensors"), &old).unwrap();
        let mut cmd = Command::new(bin_dir().join("diffuse-synth"));
        cmd.args(args("o.safetensors"))
            .current_dir(work)
            .env("FTK_NO_PROGRESS", "1");
        kill_after(&mut cmd, t_ref.mul_f64(rng.random_range(0.0..1.2)), trial);
        let got = std::fs::read(work.join("o.safetensors")).unwrap();
        assert!(got == old || got == new, "trial {trial}: -o torn");
        let mut present = 0;
        if let Ok(rd) = std::fs::read_dir(work.join("png")) {
            for e in rd
                .flatten()
                .filter(|e| !e.file_name().to_string_lossy().starts_with(".ftk-tmp"))
            {
                let want = pngs
                    .get(&e.file_name())
                    .unwrap_or_else(|| panic!("trial {trial}: stray {:?}", e.file_name()));
                assert_eq!(
                    &std::fs::read(e.path()).unwrap(),
                    want,
                    "trial {trial}: {:?} torn",
                    e.file_name()
                );
                present += 1;
            }
        }
        if got == new {
            assert_eq!(present, 2, "trial {trial}: -o committed before every PNG");
        }
        assert!(temps_in(work).is_empty() && temps_in(&work.join("png")).is_empty());
    }
}
