//! Tokens from files, as secrets are mounted in Kubernetes: one token per line, blank lines
//! ignored. A token on the command line shows in `ps`; one in a file does not.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

/// The tokens a file holds; an unreadable or empty file is an error naming it.
pub fn read(path: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read token file `{}`", path.display()))?;
    let tokens: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect();
    if tokens.is_empty() {
        bail!("token file `{}` holds no token", path.display());
    }
    Ok(tokens)
}

/// Tokens given inline and in files, together.
pub fn all(inline: Vec<String>, files: &[PathBuf]) -> Result<Vec<String>> {
    let mut tokens: Vec<String> = inline.into_iter().filter(|t| !t.is_empty()).collect();
    for f in files {
        tokens.extend(read(f)?);
    }
    Ok(tokens)
}

/// The one token of a client: inline or from a file (its first line), not both.
pub fn one(inline: Option<&str>, file: Option<&Path>, flags: &str) -> Result<String> {
    match (inline.filter(|t| !t.is_empty()), file) {
        (Some(_), Some(_)) => bail!("give the token once: {flags}, not both"),
        (Some(t), None) => Ok(t.to_string()),
        (None, Some(f)) => Ok(read(f)?.swap_remove(0)),
        (None, None) => bail!("a token is needed: {flags}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_come_from_lines_and_bad_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("tokens");
        std::fs::write(&f, "a1\n\n  b2  \n").unwrap();
        assert_eq!(read(&f).unwrap(), ["a1", "b2"]);
        assert_eq!(
            all(vec!["x".into()], std::slice::from_ref(&f)).unwrap(),
            ["x", "a1", "b2"]
        );
        assert_eq!(one(None, Some(&f), "--token").unwrap(), "a1");
        assert!(one(Some("t"), Some(&f), "--token").is_err());
        assert!(
            one(None, None, "--token or --token-file")
                .unwrap_err()
                .to_string()
                .contains("--token-file")
        );
        let empty = dir.path().join("empty");
        std::fs::write(&empty, "\n").unwrap();
        assert!(
            read(&empty)
                .unwrap_err()
                .to_string()
                .contains("holds no token")
        );
        let missing = dir.path().join("missing");
        assert!(read(&missing).unwrap_err().to_string().contains("missing"));
    }
}
