//! Which URIs a submitted spec may name. Without a configured list, object-store URIs are
//! allowed and local paths refused, so the API cannot make a worker read the coordinator's or a
//! worker's own files. With a list, only URIs under one of its prefixes pass.

use nightshift_storage::location::{absolutize, is_local_uri};

#[derive(Debug, Clone, Default)]
pub struct AllowList {
    prefixes: Vec<String>,
    everything: bool,
}

impl AllowList {
    pub fn new(prefixes: Vec<String>) -> Self {
        Self {
            prefixes: prefixes
                .into_iter()
                .map(|p| if is_local_uri(&p) { absolutize(&p) } else { p })
                .collect(),
            everything: false,
        }
    }

    /// Local mode: the user's own machine and files.
    pub fn everything() -> Self {
        Self {
            prefixes: Vec::new(),
            everything: true,
        }
    }

    /// Why `uri` is refused, if it is. `uri` must already be normalized.
    pub fn refusal(&self, uri: &str) -> Option<String> {
        if self.everything {
            return None;
        }
        if self.prefixes.is_empty() {
            return is_local_uri(uri).then(|| {
                "local paths are not allowed on this coordinator (start it with --allow-uri to allow a prefix)"
                    .to_string()
            });
        }
        let allowed = self.prefixes.iter().any(|p| {
            let p = p.trim_end_matches('/');
            uri == p || uri.starts_with(&format!("{p}/"))
        });
        (!allowed).then(|| {
            format!(
                "it is not under an allowed prefix ({})",
                self.prefixes.join(", ")
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_refuses_local_paths_only() {
        let a = AllowList::default();
        assert!(a.refusal("s3://b/x").is_none());
        assert!(a.refusal("/etc/passwd").unwrap().contains("local paths"));
    }

    #[test]
    fn prefixes_match_on_boundaries() {
        let a = AllowList::new(vec!["s3://bucket/".into(), "/data/".into()]);
        assert!(a.refusal("s3://bucket/in/x.parquet").is_none());
        assert!(a.refusal("s3://bucket-other/x").is_some());
        assert!(a.refusal("/data/in").is_none());
        assert!(a.refusal("/database").is_some());
        assert!(a.refusal("/etc/passwd").is_some());
        assert!(AllowList::everything().refusal("/etc/passwd").is_none());
    }
}
