//! Who may read and who may write: a bearer token, compared in constant time.
//!
//! Reads are open unless `public_reads` is off; writes always need the token. The token
//! is wrapped in [`Token`], whose `Debug` prints `***`, so it cannot leak into logs.

use std::fmt;

use axum::http::HeaderMap;
use sha2::{Digest, Sha256};

use super::{ApiError, ServeConfig};

/// A bearer token; never printed.
#[derive(Clone)]
pub struct Token(String);

impl Token {
    /// A token must be at least 16 characters (a guessable token is no protection).
    pub fn parse(s: &str) -> Result<Token, ApiError> {
        let s = s.trim();
        if s.len() < 16 {
            return Err(ApiError::BadToken { len: s.len() });
        }
        Ok(Token(s.to_string()))
    }

    /// Constant-time comparison: both sides are hashed to 32 bytes and every byte is
    /// compared, so the time does not depend on where they first differ or on the length.
    pub fn matches(&self, presented: &str) -> bool {
        let (a, b) = (Sha256::digest(self.0.as_bytes()), Sha256::digest(presented.as_bytes()));
        a.iter().zip(b.iter()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token(***)")
    }
}

/// The token of an `Authorization: Bearer ...` header.
fn presented(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(axum::http::header::AUTHORIZATION)?.to_str().ok()?;
    value.strip_prefix("Bearer ").map(str::trim)
}

fn check(cfg: &ServeConfig, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(token) = &cfg.token else { return Err(ApiError::WritesDisabled) };
    match presented(headers) {
        None => Err(ApiError::Unauthorized { why: "no `Authorization: Bearer` header" }),
        Some(p) if token.matches(p) => Ok(()),
        Some(_) => Err(ApiError::Unauthorized { why: "the bearer token does not match" }),
    }
}

/// Reads pass when they are public, else they need the token.
pub fn require_read(cfg: &ServeConfig, headers: &HeaderMap) -> Result<(), ApiError> {
    if cfg.public_reads { Ok(()) } else { check(cfg, headers) }
}

/// Writes need the token.
pub fn require_write(cfg: &ServeConfig, headers: &HeaderMap) -> Result<(), ApiError> {
    check(cfg, headers)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_compare_and_never_print() {
        let t = Token::parse("0123456789abcdef-secret").unwrap();
        assert!(t.matches("0123456789abcdef-secret"));
        assert!(!t.matches("0123456789abcdef-secreT"));
        assert!(!t.matches(""));
        assert!(!format!("{t:?}").contains("secret"));
        assert!(Token::parse("short").is_err());
    }

    #[test]
    fn reads_and_writes() {
        let mut cfg = ServeConfig { token: Some(Token::parse("0123456789abcdef").unwrap()), ..Default::default() };
        let mut ok = HeaderMap::new();
        ok.insert("authorization", "Bearer 0123456789abcdef".parse().unwrap());
        let none = HeaderMap::new();
        assert!(require_read(&cfg, &none).is_ok());
        assert!(require_write(&cfg, &none).is_err());
        assert!(require_write(&cfg, &ok).is_ok());
        cfg.public_reads = false;
        assert!(require_read(&cfg, &none).is_err());
        assert!(require_read(&cfg, &ok).is_ok());
    }
}
