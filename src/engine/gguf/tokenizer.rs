//! A `tokenizers::Tokenizer` rebuilt from the vocabulary a GGUF file embeds, so that a
//! GGUF model tokenizes exactly as the `tokenizer.json` it was converted from.
//!
//! `convert_hf_to_gguf.py` stores a byte-level BPE tokenizer (`tokenizer.ggml.model` =
//! `gpt2`) as: `tokens` (byte-level strings, `Ġthe`; added tokens as their plain text),
//! `token_type` (1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte), `merges`
//! (`"Ġ t"`), and `pre`, the name of the pre-tokenizer (the split regex is not stored; llama.cpp
//! keeps a table of them in `src/llama-vocab.cpp`). Rebuilt here:
//! - model: BPE over the normal/control/user-defined tokens with their ids; unused tokens
//!   (the `[PAD151669]` rows that fill the vocabulary up to the embedding size) are left out,
//!   as `tokenizer.json` has no entry for those ids;
//! - added tokens: control -> special, user-defined -> not special, both matched on the raw
//!   text (`normalized: false`), so `<|im_start|>` and `<think>` are single ids;
//! - `pre` = `qwen2`: NFC normalizer (Qwen's `tokenizer.json` has it; llama.cpp does not
//!   normalize, so it differs on non-NFC input), the Qwen split regex (Isolated), then
//!   ByteLevel without prefix space or its own regex; ByteLevel decoder and post-processor.
//!
//! Other `pre` values and other tokenizer models are refused by name rather than guessed.

use std::path::{Path, PathBuf};

use tokenizers::models::bpe::{BPE, Merges, Vocab};
use tokenizers::normalizers::unicode::NFC;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, PreTokenizerWrapper, SplitDelimiterBehavior, Tokenizer};

use super::file::{GgufError, GgufFile};

/// The split regex of Qwen2/Qwen3's `tokenizer.json` (llama.cpp's `LLAMA_VOCAB_PRE_TYPE_QWEN2`
/// spells the case-insensitive group out, which matches the same strings).
pub const QWEN2_SPLIT_REGEX: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// `tokenizer.ggml.token_type` values (llama.cpp's `llama_token_type`).
mod token_type {
    pub const CONTROL: i64 = 3;
    pub const USER_DEFINED: i64 = 4;
    pub const UNUSED: i64 = 5;
}

/// Why no tokenizer could be built. Every variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error(
        "{}: no tokenizer: the file embeds no vocabulary (tokenizer.ggml.tokens) and no tokenizer.json was given",
        path.display()
    )]
    NoTokenizer { path: PathBuf },
    #[error("{}: tokenizer model `{model}` is not supported (only `gpt2`, byte-level BPE)", path.display())]
    UnsupportedModel { path: PathBuf, model: String },
    #[error("{}: pre-tokenizer `{pre}` is not supported (only `qwen2`)", path.display())]
    UnsupportedPre { path: PathBuf, pre: String },
    #[error("{}: tokenizer.ggml.token_type has {types} entries but tokenizer.ggml.tokens has {tokens}", path.display())]
    TypeCount { path: PathBuf, tokens: usize, types: usize },
    #[error("{}: tokenizer.ggml.merges[{index}] = {merge:?} is not two tokens separated by one space", path.display())]
    BadMerge { path: PathBuf, index: usize, merge: String },
    #[error(transparent)]
    Metadata(#[from] GgufError),
    #[error("{}: building the tokenizer failed: {message}", path.display())]
    Build { path: PathBuf, message: String },
}

/// A tokenizer and the special-token facts the GGUF file records beside it.
#[derive(Debug, Clone)]
pub struct GgufTokenizer {
    pub tokenizer: Tokenizer,
    /// `tokenizer.ggml.add_bos_token` (false when absent, as for Qwen).
    pub add_bos: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<u32>,
    /// The file the tokenizer came from: the GGUF file itself, or the tokenizer.json given.
    pub source: PathBuf,
    /// Whether it was rebuilt from the GGUF file's embedded vocabulary.
    pub embedded: bool,
}

impl GgufTokenizer {
    /// Token ids of `text`: added tokens matched, BOS prepended when the file asks for it.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        let enc = self
            .tokenizer
            .encode(text, false)
            .map_err(|e| TokenizerError::Build { path: self.source.clone(), message: e.to_string() })?;
        let mut ids = Vec::with_capacity(enc.len() + 1);
        if let (true, Some(bos)) = (self.add_bos, self.bos_token_id) {
            ids.push(bos);
        }
        ids.extend_from_slice(enc.get_ids());
        Ok(ids)
    }
}

/// The tokenizer for a GGUF model: `tokenizer_json` when given, else the embedded one.
pub fn load_tokenizer(file: &GgufFile, tokenizer_json: Option<&Path>) -> Result<GgufTokenizer, TokenizerError> {
    let add_bos = file.get_bool("tokenizer.ggml.add_bos_token")?.unwrap_or(false);
    let id =
        |key: &str| -> Result<Option<u32>, GgufError> { Ok(file.get_u64(key)?.and_then(|v| u32::try_from(v).ok())) };
    let bos_token_id = id("tokenizer.ggml.bos_token_id")?;
    let eos_token_id = id("tokenizer.ggml.eos_token_id")?;
    let (tokenizer, source) = match tokenizer_json {
        Some(json) => {
            let t = Tokenizer::from_file(json)
                .map_err(|e| TokenizerError::Build { path: json.to_path_buf(), message: e.to_string() })?;
            (t, json.to_path_buf())
        }
        None => (embedded_tokenizer(file)?, file.path().to_path_buf()),
    };
    let embedded = tokenizer_json.is_none();
    Ok(GgufTokenizer { tokenizer, add_bos, bos_token_id, eos_token_id, source, embedded })
}

/// Build the tokenizer from `tokenizer.ggml.*` alone.
pub fn embedded_tokenizer(file: &GgufFile) -> Result<Tokenizer, TokenizerError> {
    let path = file.path().to_path_buf();
    let Some(tokens) = file.get_str_array("tokenizer.ggml.tokens")? else {
        return Err(TokenizerError::NoTokenizer { path });
    };
    let model = file.get_str("tokenizer.ggml.model")?;
    if model != "gpt2" {
        return Err(TokenizerError::UnsupportedModel { path, model: model.to_string() });
    }
    let pre = match file.get("tokenizer.ggml.pre") {
        Some(_) => file.get_str("tokenizer.ggml.pre")?,
        None => "default",
    };
    if pre != "qwen2" {
        return Err(TokenizerError::UnsupportedPre { path, pre: pre.to_string() });
    }
    let types = file.get_int_array("tokenizer.ggml.token_type")?.unwrap_or_else(|| vec![1; tokens.len()]);
    if types.len() != tokens.len() {
        return Err(TokenizerError::TypeCount { path, tokens: tokens.len(), types: types.len() });
    }
    let merges = file.get_str_array("tokenizer.ggml.merges")?.unwrap_or_default();

    // BPE vocabulary: token -> id; the first id wins if a string repeats.
    let mut vocab = Vocab::default();
    let mut added = Vec::new();
    for (id, (&token, &ty)) in tokens.iter().zip(&types).enumerate() {
        if ty == token_type::UNUSED {
            continue;
        }
        vocab.entry(token.to_string()).or_insert(id as u32);
        if ty == token_type::CONTROL || ty == token_type::USER_DEFINED {
            added.push(AddedToken::from(token, ty == token_type::CONTROL).normalized(false));
        }
    }
    let merges = parse_merges(&path, &merges)?;
    let build = |e: tokenizers::Error| TokenizerError::Build { path: path.clone(), message: e.to_string() };
    let bpe = BPE::builder().vocab_and_merges(vocab, merges).build().map_err(build)?;

    let split = Split::new(SplitPattern::Regex(QWEN2_SPLIT_REGEX.to_string()), SplitDelimiterBehavior::Isolated, false)
        .map_err(build)?;
    let byte_level = ByteLevel::new(false, false, false);
    let mut tokenizer = Tokenizer::new(bpe);
    tokenizer
        .with_normalizer(Some(NFC))
        .with_pre_tokenizer(Some(Sequence::new(vec![
            PreTokenizerWrapper::Split(split),
            PreTokenizerWrapper::ByteLevel(byte_level),
        ])))
        .with_post_processor(Some(byte_level))
        .with_decoder(Some(byte_level));
    // Specials first, as tokenizer.json lists them; ids come from the BPE vocabulary above.
    let (special, plain): (Vec<_>, Vec<_>) = added.into_iter().partition(|t| t.special);
    tokenizer.add_special_tokens(&special);
    tokenizer.add_tokens(&plain);
    Ok(tokenizer)
}

/// `"Ġ t"` -> `("Ġ", "t")`. Byte-level tokens never contain a space (it is `Ġ`), so exactly
/// one space separates the pair.
fn parse_merges(path: &Path, merges: &[&str]) -> Result<Merges, TokenizerError> {
    merges
        .iter()
        .enumerate()
        .map(|(index, m)| match m.split_once(' ') {
            Some((a, b)) if !a.is_empty() && !b.is_empty() && !b.contains(' ') => Ok((a.to_string(), b.to_string())),
            _ => Err(TokenizerError::BadMerge { path: path.to_path_buf(), index, merge: m.to_string() }),
        })
        .collect()
}
