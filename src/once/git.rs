//! Git: resolve a revision once into a full sha, and check that commit out in a worktree
//! under the cache that later runs of the same commit reuse.
//!
//! Everything after [`resolve`] uses the [`CommitSha`]; a branch that moves during a run
//! cannot change what is measured.

use std::fmt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Why git could not give what was asked; each variant names the repository and revision.
#[derive(Debug, thiserror::Error)]
pub enum GitError {
    #[error("cannot run git in {}: {source}", repo.display())]
    Spawn { repo: PathBuf, source: std::io::Error },
    #[error("{}: `{rev}` does not name a commit: {message}", repo.display())]
    NotACommit { repo: PathBuf, rev: String, message: String },
    #[error("{} is not inside a git repository: {message}", dir.display())]
    NotARepo { dir: PathBuf, message: String },
    #[error("{}: `git {args}` failed: {message}", dir.display())]
    Failed { dir: PathBuf, args: String, message: String },
    #[error("git printed `{value}`, which is not a full commit sha")]
    BadSha { value: String },
}

/// A full git object name: 40 (SHA-1) or 64 (SHA-256) lower-case hex digits.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(transparent)]
pub struct CommitSha(String);

impl CommitSha {
    pub fn parse(s: &str) -> Result<CommitSha, GitError> {
        let ok = matches!(s.len(), 40 | 64) && s.bytes().all(|b| b.is_ascii_hexdigit());
        if ok { Ok(CommitSha(s.to_ascii_lowercase())) } else { Err(GitError::BadSha { value: s.to_string() }) }
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
    pub fn short(&self) -> &str {
        &self.0[..12]
    }
}

impl fmt::Display for CommitSha {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A resolved commit: its sha, its generation number and its title.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ResolvedCommit {
    pub sha: CommitSha,
    /// `git rev-list --count <sha>`: commits reachable from it, itself included.
    pub generation: i64,
    pub title: String,
    /// Committer time, seconds since the epoch.
    pub committed_unix: i64,
}

fn git(dir: &Path, args: &[&str]) -> Result<std::process::Output, GitError> {
    Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(args)
        .env("GIT_TERMINAL_PROMPT", "0")
        .output()
        .map_err(|source| GitError::Spawn { repo: dir.to_path_buf(), source })
}

fn git_ok(dir: &Path, args: &[&str]) -> Result<String, GitError> {
    let out = git(dir, args)?;
    if !out.status.success() {
        return Err(GitError::Failed {
            dir: dir.to_path_buf(),
            args: args.join(" "),
            message: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// The top of the repository holding `dir`.
pub fn toplevel(dir: &Path) -> Result<PathBuf, GitError> {
    let out = git(dir, &["rev-parse", "--show-toplevel"])?;
    if !out.status.success() {
        return Err(GitError::NotARepo {
            dir: dir.to_path_buf(),
            message: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
}

/// Resolves `rev` (a sha, `HEAD`, a tag, a branch) with `git rev-parse --verify REV^{commit}`;
/// anything that is not a commit (missing, a tree, a blob) is [`GitError::NotACommit`].
pub fn resolve(repo: &Path, rev: &str) -> Result<ResolvedCommit, GitError> {
    if rev.is_empty() || rev.starts_with('-') {
        return Err(GitError::NotACommit { repo: repo.into(), rev: rev.into(), message: "not a revision".into() });
    }
    let spec = format!("{rev}^{{commit}}");
    let out = git(repo, &["rev-parse", "--verify", "--quiet", "--end-of-options", &spec])?;
    if !out.status.success() {
        let kind = git(repo, &["cat-file", "-t", "--", rev]).ok().filter(|o| o.status.success());
        let message = match kind {
            Some(o) => format!("it is a {}, not a commit", String::from_utf8_lossy(&o.stdout).trim()),
            None => "no such revision in this repository".to_string(),
        };
        return Err(GitError::NotACommit { repo: repo.into(), rev: rev.into(), message });
    }
    let sha = CommitSha::parse(String::from_utf8_lossy(&out.stdout).trim())?;
    let generation = git_ok(repo, &["rev-list", "--count", sha.as_str()])?;
    let generation = generation.parse::<i64>().map_err(|_| GitError::Failed {
        dir: repo.into(),
        args: "rev-list --count".into(),
        message: format!("printed {generation:?}"),
    })?;
    let meta = git_ok(repo, &["show", "-s", "--format=%ct%n%s", sha.as_str()])?;
    let (time, title) = meta.split_once('\n').unwrap_or((meta.as_str(), ""));
    Ok(ResolvedCommit { sha, generation, title: title.to_string(), committed_unix: time.trim().parse().unwrap_or(0) })
}

/// The local repository of an engine: `repo` itself when it is a path, else a bare clone
/// under `<cache>/repos/<engine>.git`, fetched on every call.
pub fn local_repo(repo: &str, engine: &str, cache: &Path) -> Result<PathBuf, GitError> {
    if !crate::config::is_url(repo) {
        return Ok(PathBuf::from(repo));
    }
    let dest = cache.join("repos").join(format!("{engine}.git"));
    if dest.exists() {
        git_ok(
            &dest,
            &["fetch", "--quiet", "--prune", "origin", "+refs/heads/*:refs/heads/*", "+refs/tags/*:refs/tags/*"],
        )?;
    } else {
        std::fs::create_dir_all(dest.parent().expect("has a parent"))
            .map_err(|source| GitError::Spawn { repo: dest.clone(), source })?;
        git_ok(cache, &["clone", "--quiet", "--bare", repo, &dest.display().to_string()])?;
    }
    Ok(dest)
}

/// Checks `sha` out (detached) in `<cache>/worktrees/<sha>`, reusing the worktree when it
/// already holds that commit.
pub fn worktree(repo: &Path, sha: &CommitSha, cache: &Path) -> Result<PathBuf, GitError> {
    let dir = cache.join("worktrees").join(sha.as_str());
    if dir.join(".git").exists() {
        if git_ok(&dir, &["rev-parse", "HEAD"]).is_ok_and(|head| head == sha.as_str()) {
            return Ok(dir);
        }
        git_ok(&dir, &["checkout", "--quiet", "--force", "--detach", sha.as_str()])?;
        return Ok(dir);
    }
    std::fs::create_dir_all(dir.parent().expect("has a parent"))
        .map_err(|source| GitError::Spawn { repo: dir.clone(), source })?;
    // a worktree directory removed by hand leaves a stale registration behind
    let _ = git(repo, &["worktree", "prune"]);
    git_ok(repo, &["worktree", "add", "--quiet", "--force", "--detach", &dir.display().to_string(), sha.as_str()])?;
    Ok(dir)
}
