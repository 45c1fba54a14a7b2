//! torchvision ResNet classifiers for FedCADO against torchvision itself
//! (testdata/gen/diffuse_synth_resnet_ref.py): narrow resnet18/resnet50 built from
//! torchvision's own blocks give the same logits (1e-4), BN-statistics loss and input
//! gradient of CE + 0.1 x BN loss (rel 1e-3); the full-size resnet18/34/50 state_dict
//! name and shape sets are recognised; and a ResNet-guided run through the CLI.

mod common;

use common::*;

use candle_core::{Device, Tensor, Var};
use diffuse_synth::classifier::{cross_entropy, Classifier};
use diffuse_synth::tvresnet::{plan, Arch};
use ftk::tensors::TensorFile;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;

fn vec_of(f: &TensorFile, name: &str) -> Vec<f32> {
    f32_of(f, name)
}

#[test]
fn narrow_resnets_match_torchvision() {
    let td = td();
    let r = TensorFile::open(&td.join("resnet.safetensors")).unwrap();
    let inp = r.require("input").unwrap();
    let shape = inp.shape.to_vec();
    let x0 = inp.to_f32_vec().unwrap();
    for net in ["resnet18", "resnet50"] {
        let clf =
            Classifier::from_arch(net, &td.join(format!("{net}-narrow.safetensors"))).unwrap();
        assert_eq!(clf.num_classes, 5);
        let x = Var::from_vec(x0.clone(), shape.clone(), &Device::Cpu).unwrap();
        let (logits, bn) = clf.forward(x.as_tensor()).unwrap();
        let got = logits.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let want = vec_of(&r, &format!("{net}.logits"));
        let dl = max_abs_diff(&got, &want);
        assert!(dl <= 1e-4, "{net}: logits differ from torchvision by {dl}");
        let bn_got = bn.to_scalar::<f32>().unwrap();
        let bn_want = vec_of(&r, &format!("{net}.bn_loss"))[0];
        assert!(
            (bn_got - bn_want).abs() <= 1e-4 * bn_want.abs(),
            "{net}: BN loss {bn_got} vs torch {bn_want}"
        );
        let loss = (cross_entropy(&logits, 2).unwrap() + (bn * 0.1).unwrap()).unwrap();
        let l = loss.to_scalar::<f32>().unwrap();
        let l_want = vec_of(&r, &format!("{net}.loss"))[0];
        assert!(
            (l - l_want).abs() <= 1e-4 * l_want.abs(),
            "{net}: loss {l} vs {l_want}"
        );
        let grads = loss.backward().unwrap();
        let g = grads
            .get(x.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let want = vec_of(&r, &format!("{net}.grad"));
        let scale = max_abs(&want);
        assert!(scale > 0.0);
        let d = max_abs_diff(&g, &want);
        eprintln!(
            "{net}: logits max diff {dl:e}, loss {l} (torch {l_want}), grad rel diff {:e}",
            d / scale
        );
        assert!(
            d <= 1e-3 * scale,
            "{net}: input gradient differs from PyTorch by {d} (max |grad| {scale})"
        );
    }
}

fn key_sets() -> BTreeMap<String, (usize, BTreeMap<String, Vec<usize>>)> {
    let text = std::fs::read_to_string(td().join("resnet-keys.json")).unwrap();
    let v: Value = serde_json::from_str(&text).unwrap();
    v.as_object()
        .unwrap()
        .iter()
        .map(|(name, e)| {
            let shapes = e["shapes"]
                .as_object()
                .unwrap()
                .iter()
                .map(|(k, s)| {
                    let s = s
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|d| d.as_u64().unwrap() as usize)
                        .collect();
                    (k.clone(), s)
                })
                .collect();
            (
                name.clone(),
                (e["bn_layers"].as_u64().unwrap() as usize, shapes),
            )
        })
        .collect()
}

#[test]
fn full_size_torchvision_names_are_recognised() {
    let sets = key_sets();
    assert_eq!(sets.len(), 3);
    for (name, (bn_layers, shapes)) in &sets {
        let arch = Arch::parse(name).unwrap();
        let p = plan(shapes, arch, name).unwrap();
        assert_eq!(p.bn_layers(), *bn_layers, "{name}: BN layer count");
        assert_eq!(p.num_classes, 1000);
        let want_feat = if arch == Arch::Resnet50 { 2048 } else { 512 };
        assert_eq!(p.features, want_feat, "{name}");
        assert_eq!(p.stem.0.out, 64);
        assert_eq!(p.prefix, "");
        // every conv and BN tensor of the file is used by the plan
        let mut used = vec![p.stem.0.name.clone()];
        let mut bns = vec![p.stem.1.clone()];
        for b in &p.blocks {
            for (c, n) in b.convs.iter().chain(b.downsample.iter()) {
                used.push(c.name.clone());
                bns.push(n.clone());
            }
        }
        for k in shapes.keys() {
            let covered = used.contains(k)
                || k.starts_with("fc.")
                || bns.iter().any(|b| {
                    k.strip_prefix(b.as_str())
                        .is_some_and(|r| r.starts_with('.'))
                });
            assert!(covered, "{name}: `{k}` is not part of the plan");
        }
        // the wrong depth is refused with the reason
        for other in [Arch::Resnet18, Arch::Resnet34, Arch::Resnet50] {
            if other != arch {
                let e = plan(shapes, other, name).unwrap_err().to_string();
                assert!(e.contains("blocks"), "{e}");
            }
        }
    }
    // FedCADO's ClientTune: `module.encoder.` backbone, fc = Identity, head `final_proj.0`
    let (_, r18) = &sets["resnet18"];
    let mut ct: BTreeMap<String, Vec<usize>> = r18
        .iter()
        .filter(|(k, _)| !k.starts_with("fc."))
        .map(|(k, s)| (format!("module.encoder.{k}"), s.clone()))
        .collect();
    ct.insert("module.final_proj.0.weight".into(), vec![90, 512]);
    ct.insert("module.final_proj.0.bias".into(), vec![90]);
    let p = plan(&ct, Arch::Resnet18, "clienttune").unwrap();
    assert_eq!(p.prefix, "module.encoder.");
    assert_eq!(p.num_classes, 90);
    assert_eq!(p.head.0, "module.final_proj.0.weight");
    // a missing tensor is named
    let mut bad = r18.clone();
    bad.remove("layer3.1.bn2.running_var");
    let e = plan(&bad, Arch::Resnet18, "bad").unwrap_err().to_string();
    assert!(e.contains("layer3.1.bn2.running_var"), "{e}");
}

#[test]
fn resnet_guided_run_through_the_cli() {
    let td = td();
    let dir = tempfile::tempdir().unwrap();
    let run = |o: &Path, arch: Option<&str>| {
        let mut c = bin();
        c.arg("--model")
            .arg(td.join("tiny-sd"))
            .args([
                "--scheduler",
                "ddpm",
                "--steps",
                "2",
                "--guidance-scale",
                "3",
            ])
            .args(["--seed", "5", "--batch", "2", "--shard", "0/2"])
            .arg("--prompt-embeds")
            .arg(td.join("pipeline.safetensors"))
            .arg("-o")
            .arg(o);
        if let Some(a) = arch {
            c.arg("--classifier")
                .arg(td.join("resnet18-narrow.safetensors"))
                .args(["--classifier-arch", a, "--class", "3"])
                .args(["--classifier-size", "36", "--noise-edit-steps", "1"])
                .args(["--classifier-scale", "20"]);
        }
        c.output().unwrap()
    };
    let g = dir.path().join("g.safetensors");
    let p = dir.path().join("p.safetensors");
    let o = run(&g, Some("resnet18"));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(run(&p, None).status.success());
    let a = vec_of(&TensorFile::open(&g).unwrap(), "latents");
    let b = vec_of(&TensorFile::open(&p).unwrap(), "latents");
    let d = max_abs_diff(&a, &b);
    assert!(d > 1e-3, "ResNet guidance must change the samples ({d})");
    // the wrong depth: exit 2, one line naming the file and the reason, no output
    let bad = dir.path().join("bad.safetensors");
    let o = run(&bad, Some("resnet34"));
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("resnet18-narrow.safetensors") && err.contains("resnet34"),
        "{err}"
    );
    assert!(!bad.exists());
    let o = run(&bad, Some("vgg16"));
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("--classifier-arch"));
}

#[test]
fn json_arch_spellings_load_the_same_net() {
    let td = td();
    let w = td.join("classifier.safetensors");
    let json = td.join("classifier.json");
    let x = Tensor::ones((1, 3, 8, 8), candle_core::DType::F32, &Device::Cpu).unwrap();
    let a = Classifier::from_arch(json.to_str().unwrap(), &w).unwrap();
    let b = Classifier::from_arch(&format!("json:{}", json.display()), &w).unwrap();
    let logits = |c: &Classifier| {
        let l = c.forward(&x).unwrap().0;
        l.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    };
    let (la, lb) = (logits(&a), logits(&b));
    assert_eq!(la.len(), 3);
    assert_eq!(la, lb);
    let e = Classifier::from_arch("json:no-such-file.json", &w)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("no-such-file.json"), "{e}");
}
