//! `submit`, `jobs`, `status`, `watch`, `cancel`, `retry`: driving a coordinator over its API.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Result;
use nightshift_proto::JobState;
use nightshift_proto::wire::{JobQuery, JobView};

use crate::api_client::{ApiArgs, ApiClient, JobAction};
use crate::progress::Progress;

#[derive(clap::Args, Debug)]
pub struct SubmitArgs {
    /// The job spec (TOML). Local paths in it are made absolute.
    pub spec: PathBuf,
    #[command(flatten)]
    pub api: ApiArgs,
    /// Submitting again with the same key and spec returns the same job.
    #[arg(long)]
    pub idempotency_key: Option<String>,
    /// Follow the job until it ends; exit 0 only if it succeeded.
    #[arg(long)]
    pub wait: bool,
    #[arg(long)]
    pub json: bool,
}

#[derive(clap::Args, Debug)]
pub struct JobsArgs {
    #[command(flatten)]
    pub api: ApiArgs,
    /// Only jobs in this state (pending, running, finalizing, succeeded, failed, cancelled).
    #[arg(long)]
    pub state: Option<JobState>,
    /// Only jobs whose name starts with this.
    #[arg(long)]
    pub name_prefix: Option<String>,
    /// Only jobs this schedule made.
    #[arg(long)]
    pub schedule: Option<String>,
    /// Jobs per page (at most 1000).
    #[arg(long, default_value_t = 50)]
    pub limit: u32,
    /// Only jobs older than this job id (what a full page prints to continue with).
    #[arg(long)]
    pub before: Option<i64>,
    #[arg(long)]
    pub json: bool,
}

#[derive(clap::Args, Debug)]
pub struct JobArgs {
    /// Job id, or name (the newest job of that name).
    pub job: String,
    #[command(flatten)]
    pub api: ApiArgs,
    #[arg(long)]
    pub json: bool,
}

pub async fn submit(args: SubmitArgs) -> Result<ExitCode> {
    crate::logging::init("warn", false);
    let spec = crate::spec_file::load(&args.spec)?;
    let body = toml::to_string(&spec)?;
    let client = ApiClient::new(&args.api)?;
    let resp = client.submit(body, args.idempotency_key.as_deref()).await?;
    if args.json {
        println!("{}", serde_json::to_string(&resp)?);
    } else {
        eprintln!(
            "{} job {} `{}`: {} rows in {} shards",
            if resp.created {
                "submitted"
            } else {
                "already submitted:"
            },
            resp.job.id,
            resp.job.name,
            resp.job.rows_total,
            resp.job.shards.total()
        );
    }
    if !args.wait {
        return Ok(ExitCode::SUCCESS);
    }
    follow(&client, &resp.job.id.to_string(), args.json).await
}

pub async fn jobs(args: JobsArgs) -> Result<ExitCode> {
    let query = JobQuery {
        limit: Some(args.limit),
        state: args.state,
        name_prefix: args.name_prefix,
        schedule: args.schedule,
        before: args.before,
    };
    let list = ApiClient::new(&args.api)?.list(&query).await?;
    if args.json {
        println!("{}", serde_json::to_string(&list)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:>6}  {:<24} {:<11} {:>14} {:>14}  shards(p/l/d/x)",
        "id", "name", "state", "rows done", "rows"
    );
    for j in list.jobs {
        println!(
            "{:>6}  {:<24} {:<11} {:>14} {:>14}  {}/{}/{}/{}",
            j.id,
            j.name,
            j.state.as_str(),
            j.rows_done,
            j.rows_total,
            j.shards.pending,
            j.shards.leased,
            j.shards.done,
            j.shards.dead
        );
    }
    if let Some(before) = list.next_before {
        eprintln!("more: --before {before}");
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn status(args: JobArgs) -> Result<ExitCode> {
    let view = ApiClient::new(&args.api)?.get(&args.job).await?;
    if args.json {
        println!("{}", serde_json::to_string(&view)?);
    } else {
        print_view(&view);
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn watch(args: JobArgs) -> Result<ExitCode> {
    let client = ApiClient::new(&args.api)?;
    follow(&client, &args.job, args.json).await
}

/// `cancel` and `retry`: the job's state after the coordinator took the request.
pub async fn act(args: JobArgs, action: JobAction) -> Result<ExitCode> {
    let view = ApiClient::new(&args.api)?.act(&args.job, action).await?;
    if args.json {
        println!("{}", serde_json::to_string(&view)?);
    } else {
        eprintln!("job {} `{}` is {}", view.id, view.name, view.state);
    }
    Ok(ExitCode::SUCCESS)
}

/// Polls until the job ends; exit 0 only if it succeeded.
async fn follow(client: &ApiClient, job: &str, json: bool) -> Result<ExitCode> {
    let mut view = client.get(job).await?;
    let progress = Progress::new(!json, view.rows_total, &view.name);
    let mut misses = 0;
    while !view.state.is_terminal() {
        progress.update(&view);
        tokio::time::sleep(Duration::from_millis(500)).await;
        match client.get(job).await {
            Ok(v) => {
                view = v;
                misses = 0;
            }
            // The coordinator may be restarting: keep watching for a while.
            Err(e) if misses < 120 => {
                misses += 1;
                tracing::warn!(error = %e, "status poll failed");
            }
            Err(e) => return Err(e),
        }
    }
    progress.update(&view);
    progress.finish();
    if json {
        println!("{}", serde_json::to_string(&view)?);
    } else {
        print_view(&view);
    }
    Ok(if view.state == JobState::Succeeded {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn print_view(v: &JobView) {
    for line in view_lines(v) {
        println!("{line}");
    }
}

/// The lines `status` prints for a job.
fn view_lines(v: &JobView) -> Vec<String> {
    let mut lines = Vec::new();
    lines.push(format!("job {} `{}`: {}", v.id, v.name, v.state));
    if let Some(p) = &v.planning {
        let listed = p
            .files_listed
            .map_or("files still being listed".into(), |n| {
                format!("of {n} input files")
            });
        lines.push(format!("  planning  {} {listed}", p.files_planned));
    }
    lines.push(format!(
        "  rows      {} of {} ({} poison)",
        v.rows_done, v.rows_total, v.error_rows
    ));
    let copies = match v.shards.copies {
        0 => String::new(),
        n => format!(" ({n} speculative copies of stragglers running)"),
    };
    lines.push(format!(
        "  shards    {} pending, {} leased, {} done, {} dead{copies}",
        v.shards.pending, v.shards.leased, v.shards.done, v.shards.dead
    ));
    lines.push(format!(
        "  rate      {:.0} rows/s{}",
        v.rows_per_s,
        v.eta_s
            .map(|e| format!(", ETA {e:.0} s"))
            .unwrap_or_default()
    ));
    if let Some(rows) = v.batch_rows {
        lines.push(format!("  batch     {rows} rows per model call"));
    }
    if let Some(text) = &v.text {
        lines.push(format!("  text      {text}"));
    }
    if let Some(cost) = &v.cost {
        lines.push(format!("  cost      {cost}"));
    }
    lines.push(format!("  output    {}", v.output_uri));
    if let Some(e) = &v.error {
        lines.push(format!("  error     {e}"));
    }
    if !v.model_held_by.is_empty() {
        let held: Vec<String> = v
            .model_held_by
            .iter()
            .map(|h| format!("{} ({})", h.worker, h.device))
            .collect();
        lines.push(format!("  model     held by {}", held.join(", ")));
    }
    if let Some(n) = &v.notify {
        let last = match (n.last_status, &n.last_error) {
            (Some(status), _) => format!(", last answer HTTP {status}"),
            (None, Some(e)) => format!(", last try failed: {e}"),
            (None, None) => String::new(),
        };
        lines.push(format!(
            "  notify    {} after {} tries{last}: {}",
            n.state, n.attempts, n.url
        ));
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_shows_who_holds_the_model_and_how_the_callback_went() {
        let view: JobView = serde_json::from_value(serde_json::json!({
            "id": 7, "name": "nightly", "state": "running", "priority": 0, "spec_hash": "h",
            "output_uri": "s3://out/x", "rows_total": 100, "rows_done": 40, "error_rows": 0,
            "shards": {"pending": 1, "leased": 1, "done": 2, "dead": 0},
            "rows_per_s": 10.0, "created_at_ms": 1,
            "model_held_by": [{"worker": "w1", "device": "cuda:0"}, {"worker": "w2", "device": "cpu"}],
            "notify": {"url": "https://backlog/done", "state": "pending", "attempts": 3,
                       "last_status": 503},
        }))
        .unwrap();
        let text = view_lines(&view).join("\n");
        assert!(
            text.contains("model     held by w1 (cuda:0), w2 (cpu)"),
            "{text}"
        );
        assert!(
            text.contains(
                "notify    pending after 3 tries, last answer HTTP 503: https://backlog/done"
            ),
            "{text}"
        );
    }
}
