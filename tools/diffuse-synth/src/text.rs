//! `--prompt`: the CLIP tokenizer and text encoder of a diffusers folder (tokenizer/,
//! text_encoder/), run as diffusers 0.42's `StableDiffusionPipeline.encode_prompt` does:
//! pad/truncate to the tokenizer's `model_max_length`, the encoder's last hidden state
//! (or, with `clip_skip`, an earlier layer's output through the final layer norm), the
//! attention mask only when the encoder's config sets `use_attention_mask`.
//!
//! The tokenizer is transformers 5's `CLIPTokenizer` rebuilt on the `tokenizers` crate
//! (the library transformers itself runs): NFC, `\s+` -> " ", lower-casing; CLIP's split
//! regex then byte-level mapping; BPE with `</w>` word ends; `<|startoftext|> ...
//! <|endoftext|>` around the ids; the special tokens matched in the text as transformers
//! registers them (see [`Tokenizer::load`]).

use crate::model::{ce, read_json, Fields};
use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{embedding, layer_norm, linear, Embedding, LayerNorm, Linear, VarBuilder};
use ftk::{bail, Error, Result};
use serde_json::Value;
use std::collections::HashMap;
use std::path::Path;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::normalizers::{Lowercase, Replace, Sequence as NormSeq, NFC};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreSeq;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::roberta::RobertaProcessing;
use tokenizers::{
    AddedToken, PaddingDirection, PaddingParams, PaddingStrategy, SplitDelimiterBehavior,
    TruncationDirection, TruncationParams, TruncationStrategy,
};

/// transformers' CLIPTokenizer pre-tokenisation regex.
const CLIP_SPLIT: &str =
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";

/// A CLIP tokenizer folder, loaded.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// Every prompt is padded / truncated to this many ids (`model_max_length`).
    pub max_len: usize,
    /// Largest id it can produce.
    pub max_id: u32,
    src: String,
}

/// A special token's content and whether transformers matches it after normalisation.
fn special(v: &Value) -> Option<(String, bool)> {
    match v {
        Value::String(s) => Some((s.clone(), false)),
        Value::Object(o) => Some((
            o.get("content")?.as_str()?.to_string(),
            o.get("normalized")
                .and_then(Value::as_bool)
                .unwrap_or(false),
        )),
        _ => None,
    }
}

fn optional_json(p: &Path) -> Result<Option<Value>> {
    if p.is_file() {
        read_json(p).map(Some)
    } else {
        Ok(None)
    }
}

fn tk_err(what: impl std::fmt::Display) -> impl FnOnce(tokenizers::Error) -> Error {
    move |e| Error::input(format!("{what}: {e}"))
}

impl Tokenizer {
    /// Reads `dir` as transformers 5 reads a CLIPTokenizer folder: vocab and merges from
    /// tokenizer.json when present, else vocab.json + merges.txt; special tokens (bos, eos,
    /// unk, pad) from special_tokens_map.json over tokenizer_config.json over CLIPTokenizer's
    /// defaults. A special token written as a plain string is matched in the raw text, one
    /// written as an AddedToken object by its `normalized` flag, the later of bos, eos, unk,
    /// pad deciding for a shared content (so SD 1.x's string pad makes `<|endoftext|>` raw-
    /// matched, while SD 2.x's pad "!" leaves it matched after lower-casing, and every "!"
    /// in an SD 2.x prompt becomes the pad id, as transformers does).
    ///
    /// Long because tokenizer.json's pieces (normalizer, pre-tokenizer, model, added
    /// tokens) and the legacy vocab.json/merges.txt layout are each read and refused in
    /// place, with the file and key named.
    pub fn load(dir: &Path) -> Result<Self> {
        let src = dir.display().to_string();
        let tj = dir.join("tokenizer.json");
        let mut flags: HashMap<String, bool> = HashMap::new();
        let (vocab, merges) = if tj.is_file() {
            let v = read_json(&tj)?;
            let f = Fields {
                v: &v["model"],
                src: format!("{}: model", tj.display()),
            };
            if f.get("type").and_then(Value::as_str) != Some("BPE") {
                return Err(f.err("type", "is not BPE (not a CLIP tokenizer)"));
            }
            let vocab = vocab_of(f.get("vocab"), &tj)?;
            let merges = match f.get("merges").and_then(Value::as_array) {
                Some(a) => a
                    .iter()
                    .map(|m| match m {
                        Value::String(s) => s
                            .split_once(' ')
                            .map(|(a, b)| (a.to_string(), b.to_string())),
                        Value::Array(p) if p.len() == 2 => {
                            Some((p[0].as_str()?.to_string(), p[1].as_str()?.to_string()))
                        }
                        _ => None,
                    })
                    .collect::<Option<Vec<_>>>()
                    .ok_or_else(|| f.err("merges", "expected \"a b\" strings or [a, b] pairs"))?,
                None => return Err(f.err("merges", "missing")),
            };
            if let Some(a) = v.get("added_tokens").and_then(Value::as_array) {
                for t in a {
                    if let Some((c, n)) = special(t) {
                        flags.insert(c, n);
                    }
                }
            }
            (vocab, merges)
        } else {
            let vp = dir.join("vocab.json");
            let mp = dir.join("merges.txt");
            if !vp.is_file() || !mp.is_file() {
                bail!("{src}: no tokenizer.json, nor vocab.json + merges.txt (a CLIPTokenizer folder)");
            }
            let vocab = vocab_of(Some(&read_json(&vp)?), &vp)?;
            let text = ftk::io::read_text(&mp)?;
            let mut merges = vec![];
            for (i, line) in text.lines().enumerate() {
                if (i == 0 && line.starts_with("#version")) || line.trim().is_empty() {
                    continue;
                }
                let (a, b) = line.split_once(' ').ok_or_else(|| {
                    Error::input(format!(
                        "{}: line {}: expected two space-separated symbols",
                        mp.display(),
                        i + 1
                    ))
                })?;
                merges.push((a.to_string(), b.to_string()));
            }
            (vocab, merges)
        };
        let cfg_path = dir.join("tokenizer_config.json");
        let cfg = optional_json(&cfg_path)?.unwrap_or(Value::Null);
        if let Some(m) = cfg.get("added_tokens_decoder").and_then(Value::as_object) {
            for t in m.values() {
                if let Some((c, n)) = special(t) {
                    flags.insert(c, n);
                }
            }
        }
        let map = optional_json(&dir.join("special_tokens_map.json"))?.unwrap_or(Value::Null);
        let mut names = vec![];
        for (key, default) in [
            ("bos_token", "<|startoftext|>"),
            ("eos_token", "<|endoftext|>"),
            ("unk_token", "<|endoftext|>"),
            ("pad_token", "<|endoftext|>"),
        ] {
            let v = map
                .get(key)
                .or_else(|| cfg.get(key))
                .filter(|v| !v.is_null());
            let (c, n) = match v {
                Some(v) => special(v).ok_or_else(|| {
                    Error::input(format!(
                        "{src}: `{key}` in tokenizer_config.json / special_tokens_map.json: \
                         expected a string or an object with `content`, got {v}"
                    ))
                })?,
                None => (default.to_string(), false),
            };
            flags.insert(c.clone(), n);
            names.push(c);
        }
        let id = |c: &str, key: &str| -> Result<u32> {
            vocab
                .get(c)
                .copied()
                .ok_or_else(|| Error::input(format!("{src}: {key} {c:?} is not in the vocabulary")))
        };
        let bos = id(&names[0], "bos_token")?;
        let eos = id(&names[1], "eos_token")?;
        let pad = id(&names[3], "pad_token")?;
        let max_len = match cfg.get("model_max_length").and_then(Value::as_f64) {
            Some(m) if (2.0..=1e6).contains(&m) => m as usize,
            _ => bail!(
                "{}: field `model_max_length`: missing or not a length; diffusers pads every \
                 prompt to it (77 for CLIP)",
                cfg_path.display()
            ),
        };
        let max_id = vocab.values().copied().max().unwrap_or(0);
        let mut b = BPE::builder()
            .vocab_and_merges(vocab.clone(), merges)
            .continuing_subword_prefix(String::new())
            .end_of_word_suffix("</w>".to_string())
            .fuse_unk(false);
        if vocab.contains_key(&names[2]) {
            b = b.unk_token(names[2].clone());
        }
        let bpe = b.build().map_err(tk_err(format!("{src}: merges")))?;
        let mut inner = tokenizers::Tokenizer::new(bpe);
        let replace = Replace::new(
            tokenizers::normalizers::replace::ReplacePattern::Regex(r"\s+".into()),
            " ",
        )
        .map_err(tk_err("tokenizer"))?;
        inner
            .with_normalizer(Some(NormSeq::new(vec![
                NFC.into(),
                replace.into(),
                Lowercase.into(),
            ])))
            .map_err(tk_err("tokenizer"))?;
        let split = Split::new(
            SplitPattern::Regex(CLIP_SPLIT.into()),
            SplitDelimiterBehavior::Removed,
            true,
        )
        .map_err(tk_err("tokenizer"))?;
        inner.with_pre_tokenizer(Some(PreSeq::new(vec![
            split.into(),
            ByteLevel::new(false, true, true).into(),
        ])));
        inner.with_post_processor(Some(
            RobertaProcessing::new((names[1].clone(), eos), (names[0].clone(), bos))
                .trim_offsets(false)
                .add_prefix_space(false),
        ));
        let mut seen = vec![];
        for c in &names {
            if !seen.contains(c) {
                seen.push(c.clone());
            }
        }
        let specials: Vec<AddedToken> = seen
            .iter()
            .map(|c| AddedToken::from(c.clone(), true).normalized(flags[c]))
            .collect();
        inner
            .add_special_tokens(specials)
            .map_err(tk_err("tokenizer"))?;
        inner
            .with_truncation(Some(TruncationParams {
                direction: TruncationDirection::Right,
                max_length: max_len,
                strategy: TruncationStrategy::LongestFirst,
                stride: 0,
            }))
            .map_err(tk_err("tokenizer"))?;
        inner.with_padding(Some(PaddingParams {
            strategy: PaddingStrategy::Fixed(max_len),
            direction: PaddingDirection::Right,
            pad_to_multiple_of: None,
            pad_id: pad,
            pad_type_id: 0,
            pad_token: names[3].clone(),
        }));
        Ok(Self {
            inner,
            max_len,
            max_id,
            src,
        })
    }

    /// `tokenizer(text, padding="max_length", max_length=model_max_length, truncation=True)`:
    /// (input_ids, attention_mask), each `max_len` long.
    pub fn encode(&self, text: &str) -> Result<(Vec<u32>, Vec<u32>)> {
        let e = self
            .inner
            .encode(text, true)
            .map_err(tk_err(format!("{}: tokenizing {text:?}", self.src)))?;
        Ok((e.get_ids().to_vec(), e.get_attention_mask().to_vec()))
    }
}

fn vocab_of(v: Option<&Value>, p: &Path) -> Result<Vocab> {
    let bad = || Error::input(format!("{}: vocab: expected {{token: id}}", p.display()));
    let o = v.and_then(Value::as_object).ok_or_else(bad)?;
    o.iter()
        .map(|(k, v)| {
            v.as_u64()
                .filter(|&i| i <= u32::MAX as u64)
                .map(|i| (k.clone(), i as u32))
        })
        .collect::<Option<Vocab>>()
        .ok_or_else(bad)
}

#[derive(Clone, Copy)]
enum Act {
    QuickGelu,
    GeluErf,
    GeluTanh,
    Relu,
    Silu,
}

impl Act {
    fn forward(self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Act::QuickGelu => x * candle_nn::ops::sigmoid(&(x * 1.702)?)?,
            Act::GeluErf => x.gelu_erf(),
            Act::GeluTanh => x.gelu(),
            Act::Relu => x.relu(),
            Act::Silu => x.silu(),
        }
    }
}

struct Layer {
    ln1: LayerNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    ln2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
}

/// transformers' CLIPTextModel (pre-LN encoder layers under a causal mask).
pub struct TextModel {
    token: Embedding,
    pos: Tensor,
    layers: Vec<Layer>,
    final_ln: LayerNorm,
    heads: usize,
    act: Act,
    pub hidden: usize,
    pub vocab_size: usize,
    pub max_positions: usize,
    /// diffusers passes the tokenizer's attention mask only when the config says so.
    pub use_attention_mask: bool,
}

impl TextModel {
    /// text_encoder/: config.json + model.safetensors (names with or without the
    /// `text_model.` prefix that transformers 4 wrote).
    ///
    /// Long because it is one list: each CLIPTextConfig field with its default and
    /// refusal, in transformers' order.
    pub fn load(dir: &Path) -> Result<Self> {
        TextModel::load_on(dir, &Device::Cpu)
    }

    /// [`TextModel::load`] with the (f32) weights on `dev`.
    pub fn load_on(dir: &Path, dev: &Device) -> Result<Self> {
        let cfg_path = dir.join("config.json");
        let v = read_json(&cfg_path)?;
        // a CLIPConfig (text + vision) keeps the text part under text_config
        let f = Fields {
            v: &v,
            src: cfg_path.display().to_string(),
        };
        let hidden = f.usize_or("hidden_size", 512)?;
        let inter = f.usize_or("intermediate_size", 2048)?;
        let n_layers = f.usize_or("num_hidden_layers", 12)?;
        let heads = f.usize_or("num_attention_heads", 8)?;
        let max_positions = f.usize_or("max_position_embeddings", 77)?;
        let vocab_size = f.usize_or("vocab_size", 49408)?;
        let eps = f.f64_or("layer_norm_eps", 1e-5)?;
        let use_attention_mask = f.bool_or("use_attention_mask", false)?;
        let act = match f.get("hidden_act").map(|a| a.as_str().unwrap_or("?")) {
            None | Some("quick_gelu") => Act::QuickGelu,
            Some("gelu") => Act::GeluErf,
            Some("gelu_new") | Some("gelu_pytorch_tanh") | Some("gelu_fast") => Act::GeluTanh,
            Some("relu") => Act::Relu,
            Some("silu") | Some("swish") => Act::Silu,
            Some(o) => return Err(f.err("hidden_act", format!("{o:?} is not supported"))),
        };
        if heads == 0 || hidden % heads != 0 {
            return Err(f.err(
                "num_attention_heads",
                format!("{heads} does not divide hidden_size {hidden}"),
            ));
        }
        let wf = ["model.safetensors", "model.fp16.safetensors"]
            .iter()
            .map(|n| dir.join(n))
            .find(|p| p.is_file())
            .ok_or_else(|| {
                Error::input(format!(
                    "{}: no model.safetensors (only safetensors weights are read)",
                    dir.display()
                ))
            })?;
        let prefixed = ftk::tensors::TensorFile::open(&wf)?
            .get("text_model.embeddings.token_embedding.weight")
            .is_some();
        let vb = crate::place::var_builder(&wf, &crate::place::Placement::cpu().on(dev))?;
        let vb = if prefixed { vb.pp("text_model") } else { vb };
        let build =
            |vb: VarBuilder| -> candle_core::Result<(Embedding, Tensor, Vec<Layer>, LayerNorm)> {
                let e = vb.pp("embeddings");
                let token = embedding(vocab_size, hidden, e.pp("token_embedding"))?;
                let pos = e.get((max_positions, hidden), "position_embedding.weight")?;
                // Grown as the file's layers load: num_hidden_layers comes from
                // the config and a hostile one (2^40) must fail on the missing
                // layer, not abort reserving for it.
                let mut layers = Vec::new();
                for i in 0..n_layers {
                    let l = vb.pp(format!("encoder.layers.{i}"));
                    let a = l.pp("self_attn");
                    layers.push(Layer {
                        ln1: layer_norm(hidden, eps, l.pp("layer_norm1"))?,
                        q: linear(hidden, hidden, a.pp("q_proj"))?,
                        k: linear(hidden, hidden, a.pp("k_proj"))?,
                        v: linear(hidden, hidden, a.pp("v_proj"))?,
                        o: linear(hidden, hidden, a.pp("out_proj"))?,
                        ln2: layer_norm(hidden, eps, l.pp("layer_norm2"))?,
                        fc1: linear(hidden, inter, l.pp("mlp.fc1"))?,
                        fc2: linear(inter, hidden, l.pp("mlp.fc2"))?,
                    });
                }
                let final_ln = layer_norm(hidden, eps, vb.pp("final_layer_norm"))?;
                Ok((token, pos, layers, final_ln))
            };
        let (token, pos, layers, final_ln) = build(vb).map_err(ce(format!(
            "{}: does not match {}",
            wf.display(),
            cfg_path.display()
        )))?;
        Ok(Self {
            token,
            pos,
            layers,
            final_ln,
            heads,
            act,
            hidden,
            vocab_size,
            max_positions,
            use_attention_mask,
        })
    }

    /// Hidden states [B, L, hidden] for ids [B, L] (and the attention mask [B, L] when the
    /// config uses one): the last layer's, or with `clip_skip` = k > 0 layer (n - k)'s
    /// output, each through the final layer norm (diffusers' `clip_skip`).
    pub fn forward(
        &self,
        ids: &Tensor,
        mask: Option<&Tensor>,
        clip_skip: usize,
    ) -> candle_core::Result<Tensor> {
        let (b, l) = ids.dims2()?;
        let dev = ids.device();
        let mut x = self
            .token
            .forward(ids)?
            .broadcast_add(&self.pos.narrow(0, 0, l)?)?;
        // additive mask [B or 1, 1, L, L]: causal, and padded keys when asked
        let causal: Vec<f32> = (0..l * l)
            .map(|i| {
                if i % l > i / l {
                    f32::NEG_INFINITY
                } else {
                    0.0
                }
            })
            .collect();
        let mut bias = Tensor::from_vec(causal, (1, 1, l, l), dev)?;
        if let Some(m) = mask.filter(|_| self.use_attention_mask) {
            let keys = ((m.to_dtype(DType::F32)? - 1.0)? * 1e30)?.reshape((b, 1, 1, l))?;
            bias = bias.broadcast_add(&keys)?;
        }
        let hd = self.hidden / self.heads;
        let scale = 1.0 / (hd as f64).sqrt();
        let keep = self.layers.len() - clip_skip.min(self.layers.len());
        for layer in &self.layers[..keep] {
            let h = layer.ln1.forward(&x)?;
            let split = |t: Tensor| {
                t.reshape((b, l, self.heads, hd))?
                    .transpose(1, 2)?
                    .contiguous()
            };
            let q = split(layer.q.forward(&h)?)?;
            let k = split(layer.k.forward(&h)?)?;
            let v = split(layer.v.forward(&h)?)?;
            let w = (q.matmul(&k.t()?.contiguous()?)? * scale)?.broadcast_add(&bias)?;
            let w = candle_nn::ops::softmax_last_dim(&w)?;
            let a = w
                .matmul(&v)?
                .transpose(1, 2)?
                .contiguous()?
                .reshape((b, l, self.hidden))?;
            x = (x + layer.o.forward(&a)?)?;
            let h = layer.ln2.forward(&x)?;
            let h = layer
                .fc2
                .forward(&self.act.forward(&layer.fc1.forward(&h)?)?)?;
            x = (x + h)?;
        }
        self.final_ln.forward(&x)
    }
}

/// A folder's tokenizer and text encoder.
pub struct TextEncoder {
    pub tokenizer: Tokenizer,
    pub model: TextModel,
}

impl TextEncoder {
    /// `model_dir/tokenizer` and `model_dir/text_encoder`.
    pub fn load(model_dir: &Path) -> Result<Self> {
        TextEncoder::load_on(model_dir, &Device::Cpu)
    }

    /// [`TextEncoder::load`] with the text model on `dev`.
    pub fn load_on(model_dir: &Path, dev: &Device) -> Result<Self> {
        let (td, ed) = (model_dir.join("tokenizer"), model_dir.join("text_encoder"));
        if !td.is_dir() || !ed.is_dir() {
            bail!(
                "{}: --prompt needs tokenizer/ and text_encoder/ in the model folder \
                 (or pass --prompt-embeds)",
                model_dir.display()
            );
        }
        let tokenizer = Tokenizer::load(&td)?;
        let model = TextModel::load_on(&ed, dev)?;
        if tokenizer.max_id as usize >= model.vocab_size {
            bail!(
                "{}: ids up to {} but {} has vocab_size {}",
                td.display(),
                tokenizer.max_id,
                ed.join("config.json").display(),
                model.vocab_size
            );
        }
        if tokenizer.max_len > model.max_positions {
            bail!(
                "{}: model_max_length {} exceeds {}'s max_position_embeddings {}",
                td.join("tokenizer_config.json").display(),
                tokenizer.max_len,
                ed.join("config.json").display(),
                model.max_positions
            );
        }
        Ok(Self { tokenizer, model })
    }

    /// Embeddings [n, max_len, hidden] of `prompts`, row-major.
    pub fn encode(&self, prompts: &[String], clip_skip: usize) -> Result<Vec<f32>> {
        let l = self.tokenizer.max_len;
        let mut ids = Vec::with_capacity(prompts.len() * l);
        let mut mask = Vec::with_capacity(prompts.len() * l);
        for p in prompts {
            let (i, m) = self.tokenizer.encode(p)?;
            ids.extend(i);
            mask.extend(m);
        }
        let n = prompts.len();
        let run = || -> candle_core::Result<Vec<f32>> {
            let dev = self.model.pos.device();
            let ids = Tensor::from_vec(ids, (n, l), dev)?;
            let mask = Tensor::from_vec(mask, (n, l), dev)?;
            self.model
                .forward(&ids, Some(&mask), clip_skip)?
                .flatten_all()?
                .to_vec1::<f32>()
        };
        run().map_err(ce("text encoder"))
    }
}

/// The `--prompt` condition for rows [start, end) of `total` samples, as diffusers'
/// encode_prompt builds it: the prompt embeddings [rows, L, D] and, when `guided`, the
/// negative prompt's (default "", never clip-skipped). `prompts` has 1 entry (every
/// sample) or `total`; `negatives` 0, 1 or as many as `prompts`.
#[allow(clippy::too_many_arguments)]
pub fn prompt_rows(
    model_dir: &Path,
    prompts: &[String],
    negatives: &[String],
    clip_skip: usize,
    guided: bool,
    (total, start, end): (usize, usize, usize),
    cross_attention_dim: usize,
    tokens: Option<usize>,
    dev: &Device,
) -> Result<(Tensor, Option<Tensor>)> {
    let (np, nn) = (prompts.len(), negatives.len());
    if np != 1 && np != total {
        bail!(
            "--prompt given {np} times: give it once (every sample) or once per sample ({total})"
        );
    }
    if nn > 1 && nn != np {
        bail!("--negative-prompt given {nn} times: give it once or once per --prompt ({np})");
    }
    let te = TextEncoder::load_on(model_dir, dev)?;
    let cfg = model_dir.join("text_encoder").join("config.json");
    if te.model.hidden != cross_attention_dim {
        bail!(
            "{}: hidden_size {} != the UNet's cross_attention_dim {cross_attention_dim}",
            cfg.display(),
            te.model.hidden
        );
    }
    let l = te.tokenizer.max_len;
    if let Some(t) = tokens.filter(|&t| t != l) {
        bail!(
            "{}: model_max_length {l} != the {t} tokens of the --prompt-embeds files",
            model_dir.join("tokenizer").display()
        );
    }
    if clip_skip > te.model.layers.len() {
        bail!(
            "--clip-skip {clip_skip}: {} has {} layers",
            cfg.display(),
            te.model.layers.len()
        );
    }
    let rows = end - start;
    // texts for the rows: one shared text is encoded once
    let embed = |texts: &[String], skip: usize| -> Result<Tensor> {
        let (sel, shared) = if texts.len() == 1 {
            (&texts[..1], true)
        } else {
            (&texts[start..end], false)
        };
        let n = sel.len();
        let v = te.encode(sel, skip)?;
        let t = Tensor::from_vec(v, (n, l, te.model.hidden), &Device::Cpu)
            .map_err(ce("prompt embeddings"))?;
        if shared {
            t.repeat((rows, 1, 1)).map_err(ce("prompt embeddings"))
        } else {
            Ok(t)
        }
    };
    let cond = embed(prompts, clip_skip)?;
    let neg = if guided {
        let empty = [String::new()];
        Some(embed(if nn == 0 { &empty } else { negatives }, 0)?)
    } else {
        None
    };
    Ok((cond, neg))
}
