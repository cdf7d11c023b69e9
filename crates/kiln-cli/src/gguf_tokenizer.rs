//! A Hugging Face tokenizer rebuilt from the tokenizer a GGUF file carries in its metadata.
//!
//! llama.cpp's converter stores a GPT-2-style (byte-level BPE) tokenizer as
//! `tokenizer.ggml.model = "gpt2"`, the vocabulary (`tokens`, one string per id, already in
//! the byte-to-unicode alphabet), the `merges` (`"a b"`, by rank), the `token_type` of every
//! id (3 = control, i.e. a special token), the special ids, and `tokenizer.ggml.pre`, the
//! name of the pre-tokenizer (how text is split before BPE). [`from_gguf`] turns that back
//! into the `tokenizer.json` the model was converted from and loads it with the `tokenizers`
//! crate, so a GGUF-only model (SmolLM2) can be run on `--text`.
//!
//! Only the pre-tokenizers whose Hugging Face equivalent is known are accepted: the GPT-2
//! split (`gpt-2`, ...) and the GPT-2 split after isolating every digit (`smollm`,
//! `starcoder`, ...). In llama.cpp's `src/llama-vocab.cpp`, `LLAMA_VOCAB_PRE_TYPE_SMOLLM`
//! shares its case with STARCODER, REFACT, CODESHELL, ... and applies the expressions
//! `\p{N}` then `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)`,
//! one after the other: exactly Hugging Face's `Sequence[Digits(individual_digits=true),
//! ByteLevel(add_prefix_space=false, use_regex=true)]`.

use kiln_frontend::Checkpoint;
use kiln_frontend::checkpoint::MetaValue;
use miette::{Result, miette};
use serde_json::{Map, Value, json};
use std::str::FromStr;

/// GGUF `token_type` of a control (special) token, e.g. `<|im_start|>`.
const TOKEN_TYPE_CONTROL: i64 = 3;
/// GGUF `token_type` of a user-defined added token (matched before BPE, not special).
const TOKEN_TYPE_USER_DEFINED: i64 = 4;

/// How llama.cpp splits text before BPE, for the `tokenizer.ggml.pre` values we can mirror.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PreSplit {
    /// The GPT-2 regex (Hugging Face `ByteLevel(use_regex=true)`).
    Gpt2,
    /// Every digit on its own, then the GPT-2 regex.
    DigitsThenGpt2,
}

impl PreSplit {
    fn from_name(pre: &str) -> Option<PreSplit> {
        match pre {
            "gpt-2" | "phi-2" | "mpt" | "olmo" => Some(PreSplit::Gpt2),
            "smollm" | "starcoder" | "refact" | "codeshell" => Some(PreSplit::DigitsThenGpt2),
            _ => None,
        }
    }

    fn to_json(self) -> Value {
        let byte_level = json!({
            "type": "ByteLevel",
            "add_prefix_space": false,
            "trim_offsets": true,
            "use_regex": true,
        });
        match self {
            PreSplit::Gpt2 => byte_level,
            PreSplit::DigitsThenGpt2 => json!({
                "type": "Sequence",
                "pretokenizers": [
                    { "type": "Digits", "individual_digits": true },
                    byte_level,
                ],
            }),
        }
    }
}

/// Builds the Hugging Face tokenizer equivalent to the GPT-2-style (byte-level BPE)
/// tokenizer stored in the metadata of a GGUF checkpoint.
///
/// Control tokens (`token_type` 3) become special added tokens, so `<|im_start|>` in the
/// text maps to its id; BOS/EOS are added by `encode(.., true)` only if the file's
/// `add_bos_token`/`add_eos_token` say so (they default to false, as in llama.cpp).
pub fn from_gguf(ck: &Checkpoint) -> Result<tokenizers::Tokenizer> {
    let json = tokenizer_json(ck)?;
    tokenizers::Tokenizer::from_str(&json.to_string())
        .map_err(|e| miette!("cannot build a tokenizer from the metadata of {}: {e}", ck.path.display()))
}

/// The `tokenizer.json` document for the tokenizer in `ck`'s metadata.
fn tokenizer_json(ck: &Checkpoint) -> Result<Value> {
    let file = ck.path.display();
    let model = meta_str(ck, "tokenizer.ggml.model")?;
    if model != "gpt2" {
        return Err(miette!(
            help =
                "kiln can rebuild only byte-level BPE (\"gpt2\") tokenizers from GGUF; pass --tokenizer tokenizer.json",
            "the tokenizer in {file} is of type {model:?}, not \"gpt2\" (byte-level BPE)"
        ));
    }
    let pre = match ck.metadata.get("tokenizer.ggml.pre") {
        Some(MetaValue::Str(s)) => s.as_str(),
        Some(other) => {
            return Err(miette!("{file}: `tokenizer.ggml.pre` should be a string, found {}", kind(other)));
        }
        None => "default",
    };
    let split = PreSplit::from_name(pre).ok_or_else(|| {
        miette!(
            help = "pass the model's own --tokenizer tokenizer.json",
            "{file} uses the pre-tokenizer {pre:?}, which kiln cannot rebuild from GGUF metadata (known: gpt-2, phi-2, mpt, olmo, smollm, starcoder, refact, codeshell)"
        )
    })?;

    let tokens: Vec<&str> = meta_array(ck, "tokenizer.ggml.tokens")?
        .iter()
        .enumerate()
        .map(|(i, v)| match v {
            MetaValue::Str(s) => Ok(s.as_str()),
            other => Err(miette!("{file}: `tokenizer.ggml.tokens`[{i}] should be a string, found {}", kind(other))),
        })
        .collect::<Result<_>>()?;
    if tokens.is_empty() {
        return Err(miette!("{file}: `tokenizer.ggml.tokens` is empty"));
    }
    let types: Vec<i64> = match ck.metadata.get("tokenizer.ggml.token_type") {
        None => vec![1; tokens.len()],
        Some(MetaValue::Array(items)) => items
            .iter()
            .enumerate()
            .map(|(i, v)| {
                as_int(v).ok_or_else(|| {
                    miette!("{file}: `tokenizer.ggml.token_type`[{i}] should be an integer, found {}", kind(v))
                })
            })
            .collect::<Result<_>>()?,
        Some(other) => {
            return Err(miette!("{file}: `tokenizer.ggml.token_type` should be an array, found {}", kind(other)));
        }
    };
    if types.len() != tokens.len() {
        return Err(miette!(
            "{file}: `tokenizer.ggml.token_type` has {} entries but `tokenizer.ggml.tokens` has {}",
            types.len(),
            tokens.len()
        ));
    }
    let merges: Vec<Value> = meta_array(ck, "tokenizer.ggml.merges")?
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let MetaValue::Str(m) = v else {
                return Err(miette!("{file}: `tokenizer.ggml.merges`[{i}] should be a string, found {}", kind(v)));
            };
            // Byte-level tokens never contain a space (it is `Ġ`), so the split is unambiguous.
            match m.split(' ').collect::<Vec<_>>()[..] {
                [a, b] if !a.is_empty() && !b.is_empty() => Ok(json!([a, b])),
                _ => Err(miette!(
                    "{file}: `tokenizer.ggml.merges`[{i}] = {m:?} is not two tokens separated by one space"
                )),
            }
        })
        .collect::<Result<_>>()?;

    // The vocabulary: the first id of every token string (padded vocabularies may repeat one).
    let mut vocab = Map::with_capacity(tokens.len());
    for (id, t) in tokens.iter().enumerate() {
        vocab.entry(t.to_string()).or_insert(json!(id));
    }
    let added_tokens: Vec<Value> = tokens
        .iter()
        .zip(&types)
        .enumerate()
        .filter(|(_, (_, ty))| matches!(**ty, TOKEN_TYPE_CONTROL | TOKEN_TYPE_USER_DEFINED))
        .map(|(id, (content, ty))| {
            json!({
                "id": id,
                "content": content,
                "single_word": false,
                "lstrip": false,
                "rstrip": false,
                "normalized": false,
                "special": *ty == TOKEN_TYPE_CONTROL,
            })
        })
        .collect();

    let special = |key: &str| -> Result<Option<(String, u32)>> {
        let Some(v) = ck.metadata.get(key) else {
            return Ok(None);
        };
        let id = as_int(v).ok_or_else(|| miette!("{file}: `{key}` should be an integer, found {}", kind(v)))?;
        match usize::try_from(id).ok().and_then(|i| tokens.get(i)) {
            Some(t) => Ok(Some((t.to_string(), id as u32))),
            None => {
                Err(miette!("{file}: `{key}` = {id} is not a token id (the vocabulary has {} tokens)", tokens.len()))
            }
        }
    };
    let flag = |key: &str| -> Result<bool> {
        match ck.metadata.get(key) {
            None => Ok(false),
            Some(MetaValue::Bool(b)) => Ok(*b),
            Some(other) => Err(miette!("{file}: `{key}` should be a boolean, found {}", kind(other))),
        }
    };
    // The token to add at one end (`bos`/`eos`), when the file asks for it.
    let added = |end: &str| -> Result<Option<(String, u32)>> {
        let (flag_key, id_key) = (format!("tokenizer.ggml.add_{end}_token"), format!("tokenizer.ggml.{end}_token_id"));
        if !flag(&flag_key)? {
            return Ok(None);
        }
        special(&id_key)?.map(Some).ok_or_else(|| miette!("{file}: `{flag_key}` is set but there is no `{id_key}`"))
    };
    let bos = added("bos")?;
    let eos = added("eos")?;
    // `tokenizer.ggml.unknown_token_id` is not used: llama.cpp's converter records the
    // transformers-level `unk_token`, but a byte-level BPE `tokenizer.json` has no unknown
    // token, so a byte missing from the vocabulary is dropped (as both Hugging Face and
    // llama.cpp do), not mapped to `<|endoftext|>`.

    let byte_level = json!({
        "type": "ByteLevel",
        "add_prefix_space": true,
        "trim_offsets": false,
        "use_regex": true,
    });
    let post_processor = if bos.is_none() && eos.is_none() {
        byte_level
    } else {
        json!({
            "type": "Sequence",
            "processors": [byte_level, template(bos.as_ref(), eos.as_ref())],
        })
    };

    Ok(json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added_tokens,
        "normalizer": null,
        "pre_tokenizer": split.to_json(),
        "post_processor": post_processor,
        "decoder": {
            "type": "ByteLevel",
            "add_prefix_space": true,
            "trim_offsets": true,
            "use_regex": true,
        },
        "model": {
            "type": "BPE",
            "dropout": null,
            "unk_token": null,
            "continuing_subword_prefix": null,
            "end_of_word_suffix": null,
            "fuse_unk": false,
            "byte_fallback": false,
            "ignore_merges": false,
            "vocab": vocab,
            "merges": merges,
        },
    }))
}

/// A `TemplateProcessing` that wraps every sequence in the BOS and/or EOS token.
fn template(bos: Option<&(String, u32)>, eos: Option<&(String, u32)>) -> Value {
    let special = |(t, _): &(String, u32), type_id: u32| json!({ "SpecialToken": { "id": t, "type_id": type_id } });
    let seq = |id: &str, type_id: u32| json!({ "Sequence": { "id": id, "type_id": type_id } });
    let wrap = |id: &str, type_id: u32| -> Vec<Value> {
        bos.map(|b| special(b, type_id))
            .into_iter()
            .chain([seq(id, type_id)])
            .chain(eos.map(|e| special(e, type_id)))
            .collect()
    };
    let mut pair = wrap("A", 0);
    pair.extend(wrap("B", 1));
    let mut tokens = Map::new();
    for (t, id) in bos.into_iter().chain(eos) {
        tokens.insert(t.clone(), json!({ "id": t, "ids": [id], "tokens": [t] }));
    }
    json!({
        "type": "TemplateProcessing",
        "single": wrap("A", 0),
        "pair": pair,
        "special_tokens": tokens,
    })
}

fn meta_str<'a>(ck: &'a Checkpoint, key: &str) -> Result<&'a str> {
    match ck.metadata.get(key) {
        Some(MetaValue::Str(s)) => Ok(s),
        Some(other) => Err(miette!("{}: `{key}` should be a string, found {}", ck.path.display(), kind(other))),
        None => Err(missing(ck, key)),
    }
}

fn meta_array<'a>(ck: &'a Checkpoint, key: &str) -> Result<&'a [MetaValue]> {
    match ck.metadata.get(key) {
        Some(MetaValue::Array(items)) => Ok(items),
        Some(other) => Err(miette!("{}: `{key}` should be an array, found {}", ck.path.display(), kind(other))),
        None => Err(missing(ck, key)),
    }
}

fn missing(ck: &Checkpoint, key: &str) -> miette::Report {
    miette!(
        help = "pass --tokenizer tokenizer.json (the model's Hugging Face tokenizer)",
        "{} has no tokenizer in its metadata (no `{key}`)",
        ck.path.display()
    )
}

fn as_int(v: &MetaValue) -> Option<i64> {
    match *v {
        MetaValue::Int(i) => Some(i),
        MetaValue::UInt(u) => i64::try_from(u).ok(),
        _ => None,
    }
}

fn kind(v: &MetaValue) -> &'static str {
    match v {
        MetaValue::Str(_) => "a string",
        MetaValue::Int(_) | MetaValue::UInt(_) => "an integer",
        MetaValue::Float(_) => "a float",
        MetaValue::Bool(_) => "a boolean",
        MetaValue::Array(_) => "an array",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The SmolLM2 checkpoint, or `None` (with the reason printed) if it is not fetched.
    fn smollm2() -> Option<Checkpoint> {
        let path = kiln_tests::real_checkpoint(kiln_tests::SMOLLM2_WEIGHTS)?;
        Some(kiln_frontend::checkpoint::load(&path).expect("SmolLM2 GGUF loads"))
    }

    fn i64s(file: &safetensors::SafeTensors, name: &str) -> Vec<u32> {
        let t = file.tensor(name).unwrap();
        assert_eq!(t.dtype(), safetensors::Dtype::I64, "{name}");
        t.data().chunks_exact(8).map(|b| i64::from_le_bytes(b.try_into().unwrap()) as u32).collect()
    }

    #[test]
    fn prompt_matches_the_reference_tokenization() {
        let Some(ck) = smollm2() else { return };
        let tok = from_gguf(&ck).unwrap();
        let bytes = std::fs::read(kiln_tests::fixtures().join("smollm2_greedy.safetensors")).unwrap();
        let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let prompt = i64s(&file, "prompt_ids");
        let generated = i64s(&file, "generated_ids");

        let text = "The key idea of post-training quantization is";
        let enc = tok.encode(text, true).unwrap();
        assert_eq!(enc.get_ids(), &prompt[..], "tokens {:?}", enc.get_tokens());
        assert_eq!(tok.decode(&prompt, false).unwrap(), text);

        let all: Vec<u32> = prompt.iter().chain(&generated).copied().collect();
        let decoded = tok.decode(&all, false).unwrap();
        println!("prompt ids: {prompt:?}\ngenerated ids: {generated:?}\ndecoded: {decoded:?}");
        assert!(decoded.starts_with(text));
        // The greedy continuation decodes to English text.
        let rest = &decoded[text.len()..];
        assert!(rest.chars().filter(|c| c.is_ascii_alphabetic()).count() > rest.len() / 2, "{rest:?}");
    }

    #[test]
    fn decode_inverts_encode() {
        let Some(ck) = smollm2() else { return };
        let tok = from_gguf(&ck).unwrap();
        for s in [
            "12345",
            "In 2024, 3.14159 and 1,000,000 apples.",
            "naïve café — 東京",
            "spaces:  two,   three,\tand\ttabs    ",
            "line one\nline two\n\n\nend\r\n",
            "   leading and trailing   ",
            "<|im_start|>user\nHi<|im_end|>",
            "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>assistant\n",
            "don't won't I'll we've they're it's",
            "fn main() { println!(\"{}\", x[0] + 1); }",
            "emoji 🙂 and ünïcödé",
        ] {
            let enc = tok.encode(s, true).unwrap();
            assert_eq!(tok.decode(enc.get_ids(), false).unwrap(), s, "tokens {:?}", enc.get_tokens());
        }
    }

    #[test]
    fn digits_and_special_tokens() {
        let Some(ck) = smollm2() else { return };
        let tok = from_gguf(&ck).unwrap();
        // Every digit is a token of its own (the `smollm` pre-tokenizer).
        let enc = tok.encode("12345", true).unwrap();
        assert_eq!(enc.get_tokens(), ["1", "2", "3", "4", "5"]);
        let enc = tok.encode("x 2024", true).unwrap();
        assert_eq!(enc.get_tokens(), ["x", "Ġ", "2", "0", "2", "4"]);

        // The chat markers are single special tokens, at the ids the vocabulary gives them.
        let MetaValue::Array(tokens) = &ck.metadata["tokenizer.ggml.tokens"] else { panic!() };
        let id_of = |s: &str| tokens.iter().position(|t| *t == MetaValue::Str(s.into())).unwrap() as u32;
        let (start, end) = (id_of("<|im_start|>"), id_of("<|im_end|>"));
        assert_eq!((start, end), (1, 2));
        let enc = tok.encode("<|im_start|>user\nHi<|im_end|>", true).unwrap();
        let ids = enc.get_ids();
        assert_eq!(ids.first(), Some(&start));
        assert_eq!(ids.last(), Some(&end));
        assert_eq!(ids.iter().filter(|&&i| i == start || i == end).count(), 2, "{:?}", enc.get_tokens());
        assert_eq!(tok.token_to_id("<|im_start|>"), Some(start));
        // Special tokens go away with skip_special_tokens.
        assert_eq!(tok.decode(ids, true).unwrap(), "user\nHi");

        // No BOS is added (add_bos_token = false): encoding with and without special tokens agree.
        assert_eq!(ck.metadata.get("tokenizer.ggml.add_bos_token"), Some(&MetaValue::Bool(false)));
        let s = "Hello world";
        assert_eq!(tok.encode(s, true).unwrap().get_ids(), tok.encode(s, false).unwrap().get_ids());
        assert_eq!(tok.get_vocab_size(true), tokens.len());

        // The byte 0xF1 (`ñ` in the byte-level alphabet) is not in SmolLM2's vocabulary; it is
        // dropped, as by the Hugging Face tokenizer (huggingface/smollm#81), not made `<|endoftext|>`.
        assert!(tok.token_to_id("ñ").is_none());
        assert_eq!(ck.metadata.get("tokenizer.ggml.unknown_token_id"), Some(&MetaValue::UInt(0)));
        let enc = tok.encode("a\u{46131}b", false).unwrap();
        assert!(!enc.get_ids().contains(&0), "{:?}", enc.get_tokens());
    }

    fn fake(metadata: Vec<(&str, MetaValue)>) -> Checkpoint {
        Checkpoint {
            path: "fake.gguf".into(),
            kind: kiln_frontend::checkpoint::CheckpointKind::Gguf,
            tensors: Default::default(),
            metadata: metadata.into_iter().map(|(k, v)| (k.to_string(), v)).collect(),
            skipped: vec![],
        }
    }

    fn strs(items: &[&str]) -> MetaValue {
        MetaValue::Array(items.iter().map(|s| MetaValue::Str(s.to_string())).collect())
    }

    #[test]
    fn small_vocab_with_bos() {
        let ck = fake(vec![
            ("tokenizer.ggml.model", MetaValue::Str("gpt2".into())),
            ("tokenizer.ggml.pre", MetaValue::Str("gpt-2".into())),
            ("tokenizer.ggml.tokens", strs(&["<s>", "a", "b", "ab", "Ġ", "Ġab"])),
            ("tokenizer.ggml.merges", strs(&["a b", "Ġ ab"])),
            ("tokenizer.ggml.token_type", MetaValue::Array([3, 1, 1, 1, 1, 1].map(MetaValue::Int).to_vec())),
            ("tokenizer.ggml.bos_token_id", MetaValue::UInt(0)),
            ("tokenizer.ggml.add_bos_token", MetaValue::Bool(true)),
        ]);
        let tok = from_gguf(&ck).unwrap();
        assert_eq!(tok.encode("ab ab", true).unwrap().get_ids(), [0, 3, 5]);
        assert_eq!(tok.encode("ab ab", false).unwrap().get_ids(), [3, 5]);
        assert_eq!(tok.decode(&[0, 3, 5], true).unwrap(), "ab ab");
    }

    #[test]
    fn clear_errors() {
        let err = |ck: Checkpoint| format!("{:?}", from_gguf(&ck).unwrap_err());
        let e = err(fake(vec![]));
        assert!(e.contains("no tokenizer in its metadata") && e.contains("tokenizer.ggml.model"), "{e}");
        let e = err(fake(vec![("tokenizer.ggml.model", MetaValue::Str("llama".into()))]));
        assert!(e.contains("\"llama\", not \"gpt2\""), "{e}");
        let e = err(fake(vec![
            ("tokenizer.ggml.model", MetaValue::Str("gpt2".into())),
            ("tokenizer.ggml.pre", MetaValue::Str("qwen2".into())),
        ]));
        assert!(e.contains("pre-tokenizer \"qwen2\""), "{e}");
        let e = err(fake(vec![
            ("tokenizer.ggml.model", MetaValue::Str("gpt2".into())),
            ("tokenizer.ggml.pre", MetaValue::Str("smollm".into())),
            ("tokenizer.ggml.tokens", strs(&["a"])),
        ]));
        assert!(e.contains("no `tokenizer.ggml.merges`"), "{e}");
    }
}
