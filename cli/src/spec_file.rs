//! Reading a spec file as users write them: TOML, errors prefixed with the file, local paths
//! taken from the current directory.

use std::path::Path;

use anyhow::{Context, Result, anyhow};
use nightshift_proto::JobSpec;
use nightshift_storage::location::{absolutize, canonical_uri};

pub fn load(path: &Path) -> Result<JobSpec> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read spec `{}`", path.display()))?;
    let mut spec = JobSpec::from_toml(&text).map_err(|e| anyhow!("{}: {e}", path.display()))?;
    for uri in [
        &mut spec.input.uri,
        &mut spec.model.uri,
        &mut spec.output.uri,
    ] {
        *uri = absolutize(uri);
    }
    // The output as the coordinator keeps it (one spelling per place), so that the spec of a
    // rerun hashes as the job's does.
    spec.output.uri = canonical_uri(&spec.output.uri);
    Ok(spec)
}
