//! Reading a spec file as users write them: TOML, errors prefixed with the file, local paths
//! taken from the current directory.

use std::path::Path;

use anyhow::{Context, Result, anyhow};
use nightshift_proto::JobSpec;
use nightshift_storage::location::{absolutize, canonical_uri};

/// The spec's `(table, key)`s that name a file or object: a local path in them is taken from
/// the current directory.
pub const PATH_KEYS: [(&str, &str); 4] = [
    ("input", "uri"),
    ("model", "uri"),
    ("output", "uri"),
    ("text", "tokenizer"),
];

pub fn load(path: &Path) -> Result<JobSpec> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read spec `{}`", path.display()))?;
    let mut spec = JobSpec::from_toml(&text).map_err(|e| anyhow!("{}: {e}", path.display()))?;
    // The same keys as `PATH_KEYS`.
    let tokenizer = spec.text.as_mut().map(|t| &mut t.tokenizer);
    for uri in [
        &mut spec.input.uri,
        &mut spec.model.uri,
        &mut spec.output.uri,
    ]
    .into_iter()
    .chain(tokenizer)
    {
        *uri = absolutize(uri);
    }
    // The output as the coordinator keeps it (one spelling per place), so that the spec of a
    // rerun hashes as the job's does.
    spec.output.uri = canonical_uri(&spec.output.uri);
    Ok(spec)
}
