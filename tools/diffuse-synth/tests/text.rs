//! `--prompt`'s tokenizer and text encoder against transformers 5 (testdata/gen/
//! diffuse_synth_ref.py, gen_text): token ids of CLIPTokenizer on tricky prompts — with the
//! real CLIP vocabulary (ids computed by transformers with the full 49408-token files; the
//! checked-in cut-down copy keeps every token and merge those prompts reach, with their real
//! ids), SD 1.x and SD 2.x special-token layouts, and the tokenizer.json layout transformers 5
//! saves — and CLIPTextModel's embeddings (quick_gelu and gelu, clip_skip, attention mask).

mod common;

use common::*;

use diffuse_synth::text::{TextEncoder, Tokenizer};
use ftk::tensors::TensorFile;
use std::path::Path;

fn prompts(f: &TensorFile) -> Vec<String> {
    serde_json::from_str(&f.metadata().unwrap()["prompts"]).unwrap()
}

fn check_ids(tok: &Tokenizer, f: &TensorFile, key: &str) {
    let ps = prompts(f);
    let t = f.require(key).unwrap();
    let want = t.to_i64_vec().unwrap();
    let l = t.shape[1];
    assert_eq!(tok.max_len, l);
    for (i, p) in ps.iter().enumerate() {
        let (ids, _) = tok.encode(p).unwrap();
        let got: Vec<i64> = ids.iter().map(|&x| x as i64).collect();
        assert_eq!(got, want[i * l..(i + 1) * l], "{key}: prompt {i} {p:?}");
    }
}

#[test]
fn token_ids_match_transformers_with_the_real_clip_vocab() {
    let f = TensorFile::open(&td().join("text.safetensors")).unwrap();
    for layout in ["sd15", "sd2"] {
        let tok = Tokenizer::load(&td().join("clip-vocab").join(layout)).unwrap();
        check_ids(&tok, &f, &format!("real.{layout}.ids"));
        // the attention mask: 1 up to and including the end token
        let m = f
            .require(&format!("real.{layout}.mask"))
            .unwrap()
            .to_i64_vec()
            .unwrap();
        for (i, p) in prompts(&f).iter().enumerate() {
            let (_, got) = tok.encode(p).unwrap();
            let got: Vec<i64> = got.iter().map(|&x| x as i64).collect();
            assert_eq!(got, m[i * 77..(i + 1) * 77], "{layout} mask {i}");
        }
    }
}

#[test]
fn token_ids_match_transformers_tiny_vocabs() {
    let f = TensorFile::open(&td().join("text.safetensors")).unwrap();
    // transformers 5's save_pretrained layout (tokenizer.json)
    check_ids(
        &Tokenizer::load(&td().join("tiny-sd/tokenizer")).unwrap(),
        &f,
        "sd.ids",
    );
    // legacy files with pad "!" in special_tokens_map.json
    check_ids(
        &Tokenizer::load(&td().join("tiny-clip-sd2/tokenizer")).unwrap(),
        &f,
        "sd2.ids",
    );
}

fn check_embeds(dir: &Path, f: &TensorFile, sel_key: &str, key: &str, rows: &[usize], skip: usize) {
    let ps = prompts(f);
    let te = TextEncoder::load(dir).unwrap();
    let chosen: Vec<String> = rows.iter().map(|&i| ps[i].clone()).collect();
    let got = te.encode(&chosen, skip).unwrap();
    let t = f.require(key).unwrap();
    assert_eq!(t.shape, [rows.len(), 77, te.model.hidden], "{sel_key}");
    let want = t.to_f32_vec().unwrap();
    let d = max_abs_diff(&got, &want);
    assert!(
        d <= 1e-4,
        "{key}: embeddings differ from transformers by {d}"
    );
    let scale = want.iter().fold(0f32, |m, x| m.max(x.abs()));
    assert!(scale > 0.5, "{key}: reference too small to test ({scale})");
}

#[test]
fn embeddings_match_clip_text_model() {
    let f = TensorFile::open(&td().join("text.safetensors")).unwrap();
    let meta = f.metadata().unwrap();
    let sel: Vec<usize> = serde_json::from_str(&meta["sd.embeds"]).unwrap();
    let sel2: Vec<usize> = serde_json::from_str(&meta["sd2.embeds"]).unwrap();
    check_embeds(&td().join("tiny-sd"), &f, "sd", "sd.embeds", &sel, 0);
    check_embeds(
        &td().join("tiny-sd"),
        &f,
        "sd",
        "sd.embeds_skip1",
        &[0, 1],
        1,
    );
    // gelu, `text_model.` names, use_attention_mask
    check_embeds(
        &td().join("tiny-clip-sd2"),
        &f,
        "sd2",
        "sd2.embeds",
        &sel2,
        0,
    );
}
