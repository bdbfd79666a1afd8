//! Stand-in parts for tests that drive the lease protocol by hand: a small object at exactly
//! the key the coordinator accepts for a lease's rows (`nightshift_proto::layout`), and its
//! record. The checkpoint checks the object's place and size, not its content.

use std::path::{Path, PathBuf};

use nightshift_proto::JobSpec;
use nightshift_proto::layout::{part_name, parts_dir};
use nightshift_proto::wire::{LeaseGrant, PartRecord, ShardLease};

/// The local path of the part (or error part) `lease` writes from `row_start`.
pub fn part_path(lease: &ShardLease, row_start: u64, errors: bool) -> PathBuf {
    PathBuf::from(lease.spec.output.uri.trim_end_matches('/'))
        .join(parts_dir(&lease.job_uid))
        .join(part_name(lease.shard_id, lease.token, row_start, errors))
}

/// Writes a stand-in part of `rows` rows from `row_start` for a lease of a job with a local
/// output, and answers its record.
pub fn write_part(lease: &ShardLease, row_start: u64, rows: u64) -> PartRecord {
    let path = part_path(lease, row_start, false);
    let body = STAND_IN_BODY;
    std::fs::create_dir_all(path.parent().expect("parts directory")).expect("parts directory");
    std::fs::write(&path, body).expect("part written");
    part_record(path, row_start, rows, body.len() as u64)
}

/// What every stand-in part holds.
pub const STAND_IN_BODY: &[u8] = b"stand-in part";

/// As `write_part`, but the part is a hard link to `body` (a file holding `STAND_IN_BODY` on
/// the output's file system): no new inode and no data written, so a harness that checkpoints
/// thousands of times a second spends its CPU on the protocol, not on the file system.
pub fn link_part(lease: &ShardLease, row_start: u64, rows: u64, body: &Path) -> PartRecord {
    let path = part_path(lease, row_start, false);
    std::fs::create_dir_all(path.parent().expect("parts directory")).expect("parts directory");
    std::fs::hard_link(body, &path).expect("part linked");
    part_record(path, row_start, rows, STAND_IN_BODY.len() as u64)
}

fn part_record(path: PathBuf, row_start: u64, rows: u64, bytes: u64) -> PartRecord {
    PartRecord {
        uri: path.display().to_string(),
        row_start,
        rows,
        bytes,
        error_rows: 0,
        error_uri: None,
        error_bytes: 0,
        tokens: None,
    }
}

/// The leases of a raw `POST /v1/worker/lease` answer, each with its job's spec fetched as a
/// worker fetches it (`GET /v1/worker/specs/{hash}` with `token`).
pub async fn with_specs(
    http: &reqwest::Client,
    base: &str,
    token: &str,
    answer: &serde_json::Value,
) -> Vec<ShardLease> {
    let grants: Vec<LeaseGrant> =
        serde_json::from_value(answer["leases"].clone()).expect("lease grants");
    let mut leases = Vec::with_capacity(grants.len());
    for grant in grants {
        let url = format!("{base}/v1/worker/specs/{}", grant.spec_hash);
        let resp = http
            .get(url)
            .bearer_auth(token)
            .send()
            .await
            .expect("coordinator answers");
        assert!(
            resp.status().is_success(),
            "spec {}: {}",
            grant.spec_hash,
            resp.status()
        );
        let spec: JobSpec = resp.json().await.expect("a spec");
        assert_eq!(
            spec.hash(),
            grant.spec_hash,
            "the spec is not the one the lease names"
        );
        leases.push(ShardLease { grant, spec });
    }
    leases
}
