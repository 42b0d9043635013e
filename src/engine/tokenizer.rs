//! The model's tokenizer (HF `tokenizer.json`), used only to check tokenizer parity: the
//! engine is always given token ids, and reports whether its own tokenization of a
//! prompt's text gives the same ids.

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{}: not a usable tokenizer.json: {message}", path.display())]
    Load { path: PathBuf, message: String },
    #[error("{}: cannot encode prompt {prompt:?}: {message}", path.display())]
    Encode { path: PathBuf, prompt: String, message: String },
}

pub struct Tokenizer {
    path: PathBuf,
    sha256: String,
    inner: tokenizers::Tokenizer,
}

impl Tokenizer {
    /// The tokenizer to use for a model: `explicit` when given, else `tokenizer.json`
    /// beside the weights (in the checkpoint directory, or next to a single file).
    pub fn locate(model_path: &Path, explicit: Option<&Path>) -> Option<PathBuf> {
        if let Some(p) = explicit {
            return Some(p.to_path_buf());
        }
        let dir = if model_path.is_dir() { model_path } else { model_path.parent()? };
        let p = dir.join("tokenizer.json");
        p.exists().then_some(p)
    }

    pub fn open(path: &Path) -> Result<Tokenizer, TokenizerError> {
        let bytes = std::fs::read(path).map_err(|source| TokenizerError::Io { path: path.to_path_buf(), source })?;
        let inner = tokenizers::Tokenizer::from_bytes(&bytes)
            .map_err(|e| TokenizerError::Load { path: path.to_path_buf(), message: e.to_string() })?;
        Ok(Tokenizer { path: path.to_path_buf(), sha256: crate::protocol::sha256_hex(&bytes), inner })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// sha256 of the tokenizer.json bytes.
    pub fn sha256(&self) -> &str {
        &self.sha256
    }

    /// Token ids of `text` as the suite made them, HF's `tokenizer(text,
    /// add_special_tokens=False)`: added tokens in the text (a chat template's
    /// `<|im_start|>`) are recognised, nothing is prepended or appended.
    pub fn encode(&self, prompt: &str, text: &str) -> Result<Vec<u32>, TokenizerError> {
        let enc = self.inner.encode(text, false).map_err(|e| TokenizerError::Encode {
            path: self.path.clone(),
            prompt: prompt.to_string(),
            message: e.to_string(),
        })?;
        Ok(enc.get_ids().to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A word-level tokenizer.json small enough to write inline.
    const TINY: &str = r#"{"version":"1.0","truncation":null,"padding":null,"added_tokens":[],
        "normalizer":null,"pre_tokenizer":{"type":"Whitespace"},"post_processor":null,"decoder":null,
        "model":{"type":"WordLevel","vocab":{"[UNK]":0,"hello":1,"world":2},"unk_token":"[UNK]"}}"#;

    #[test]
    fn encodes_and_hashes() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("tokenizer.json");
        std::fs::write(&p, TINY).unwrap();
        assert_eq!(Tokenizer::locate(d.path(), None), Some(p.clone()));
        let t = Tokenizer::open(&p).unwrap();
        assert_eq!(t.encode("a", "hello world zzz").unwrap(), vec![1, 2, 0]);
        assert_eq!(t.sha256(), crate::protocol::sha256_hex(TINY.as_bytes()));
    }

    #[test]
    fn a_broken_file_is_named() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("tokenizer.json");
        std::fs::write(&p, "{").unwrap();
        let e = Tokenizer::open(&p).err().unwrap().to_string();
        assert!(e.contains("tokenizer.json"), "{e}");
    }
}
