//! The model-config parser on real published config.json files, checked
//! against the parameter counts their authors published
//! (testdata/configs/SOURCES.md cites each).

use ftk::model::{Attention, ModelConfig};
use std::path::PathBuf;

fn load(name: &str) -> ModelConfig {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../testdata/configs")
        .join(name)
        .join("config.json");
    ModelConfig::from_file(&p).unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// Round to the precision a number was published with.
fn round_to(x: u64, unit: f64, digits: i32) -> f64 {
    let f = 10f64.powi(digits);
    (x as f64 / unit * f).round() / f
}

#[test]
fn total_parameters_match_published_counts() {
    // (config, published total, unit, decimals)
    let cases = [
        ("mixtral-8x7b", 46.7, 1e9, 1),
        ("qwen1.5-moe-a2.7b", 14.3, 1e9, 1),
        ("qwen3-30b-a3b", 30.5, 1e9, 1),
        ("deepseek-v3", 671.0, 1e9, 0),
        ("deepseek-v2-lite", 15.7, 1e9, 1),
        ("llama-3-8b", 8.03, 1e9, 2),
        ("gpt2", 124.0, 1e6, 0),
    ];
    for (name, want, unit, digits) in cases {
        let got = load(name).total_params();
        assert_eq!(
            round_to(got, unit, digits),
            want,
            "{name}: {got} parameters"
        );
    }
}

#[test]
fn active_parameters_match_published_counts() {
    // Mixtral: 12.9B active (model card). DeepSeek-V3: 37B active (paper),
    // which leaves out the input embedding (the helper notes in SOURCES.md).
    let m = load("mixtral-8x7b");
    assert_eq!(round_to(m.active_params(), 1e9, 1), 12.9);
    let d = load("deepseek-v3");
    assert_eq!(
        round_to(d.active_params() - d.vocab * d.hidden, 1e9, 0),
        37.0
    );
    // Qwen3-30B-A3B's card says "3.3B activated": 3.35B truncated.
    let q = load("qwen3-30b-a3b").active_params() as f64 / 1e9;
    assert!((3.3..3.4).contains(&q), "{q}");
}

#[test]
fn moe_fields_per_family() {
    let m = load("mixtral-8x7b");
    let moe = m.moe.as_ref().unwrap();
    assert_eq!(
        (moe.experts, moe.topk, moe.expert_ffn, moe.shared_experts),
        (8, 2, 14336, 0)
    );
    assert!(moe.norm_topk_prob);
    assert_eq!((m.heads(), m.kv_heads(), m.head_dim()), (32, 8, 128));
    assert_eq!(m.moe_layers(), 32);

    let q = load("qwen1.5-moe-a2.7b");
    let moe = q.moe.as_ref().unwrap();
    assert_eq!(
        (
            moe.experts,
            moe.topk,
            moe.expert_ffn,
            moe.shared_experts,
            moe.shared_ffn
        ),
        (60, 4, 1408, 1, 5632)
    );
    assert!(moe.shared_gate && !moe.norm_topk_prob);

    let q3 = load("qwen3-30b-a3b");
    assert_eq!((q3.heads(), q3.kv_heads(), q3.head_dim()), (32, 4, 128));
    assert_eq!(q3.moe.as_ref().unwrap().experts, 128);

    let d = load("deepseek-v3");
    let moe = d.moe.as_ref().unwrap();
    assert_eq!(
        (moe.experts, moe.topk, moe.expert_ffn, moe.shared_experts),
        (256, 8, 2048, 1)
    );
    assert_eq!(d.dense_layers(), 3);
    assert_eq!(d.moe_layers(), 58);
    assert!(matches!(
        d.attention,
        Attention::Mla {
            q_lora_rank: Some(1536),
            kv_lora_rank: 512,
            ..
        }
    ));
    // MemFine's reading: a = k_a = 128, h_d = 192 (qk nope + rope)
    assert_eq!((d.heads(), d.kv_heads(), d.head_dim()), (128, 128, 192));
    assert_eq!(d.mtp_layers, 1);

    let lite = load("deepseek-v2-lite");
    assert!(matches!(
        lite.attention,
        Attention::Mla {
            q_lora_rank: None,
            ..
        }
    ));
    assert_eq!(lite.dense_layers(), 1);

    let g = load("gpt2");
    assert!(g.moe.is_none());
    assert_eq!((g.hidden, g.ffn, g.layers), (768, 3072, 12));
}
