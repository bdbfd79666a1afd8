//! `schedule create | list | show | pause | resume | delete`: schedules on a coordinator.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result, anyhow};
use nightshift_proto::CatchUp;
use nightshift_proto::wire::{ScheduleList, ScheduleRequest, ScheduleView};
use nightshift_storage::location::absolutize;

use crate::api_client::{ApiArgs, ApiClient};

#[derive(clap::Subcommand, Debug)]
pub enum ScheduleCommand {
    /// Run a job spec at each fire time of a cron expression. Its URIs may name the fire time:
    /// {{ date }} (YYYY-MM-DD), {{ time }} (HHMMSS), {{ datetime }}, {{ timestamp }} (Unix
    /// seconds), {{ schedule }} (its name), in the schedule's time zone.
    Create(CreateArgs),
    /// List schedules.
    List(ListArgs),
    /// Show a schedule and its latest fire times.
    Show(NameArgs),
    /// Stop firing (fire times while paused are skipped).
    Pause(NameArgs),
    /// Fire again, from the next fire time on.
    Resume(NameArgs),
    /// Remove a schedule (its jobs stay).
    Delete(NameArgs),
}

#[derive(clap::Args, Debug)]
pub struct CreateArgs {
    pub name: String,
    /// Five fields (minute hour day month weekday), or six with seconds first.
    #[arg(long)]
    pub cron: String,
    /// An IANA time zone, e.g. Europe/Berlin.
    #[arg(long, default_value = "UTC")]
    pub timezone: String,
    /// Fire times missed while no coordinator ran: skip | latest | all.
    #[arg(long, default_value = "latest")]
    pub catch_up: CatchUp,
    /// The job spec (TOML); local paths in it are made absolute.
    pub spec: PathBuf,
    #[command(flatten)]
    pub api: ApiArgs,
    #[arg(long)]
    pub json: bool,
}

#[derive(clap::Args, Debug)]
pub struct ListArgs {
    #[command(flatten)]
    pub api: ApiArgs,
    #[arg(long)]
    pub json: bool,
}

#[derive(clap::Args, Debug)]
pub struct NameArgs {
    pub name: String,
    #[command(flatten)]
    pub api: ApiArgs,
    #[arg(long)]
    pub json: bool,
}

pub async fn run(command: ScheduleCommand) -> Result<ExitCode> {
    crate::logging::init("warn", false);
    match command {
        ScheduleCommand::Create(a) => {
            let request = ScheduleRequest {
                name: a.name,
                cron: a.cron,
                timezone: Some(a.timezone),
                catch_up: a.catch_up,
                spec: template(&a.spec)?,
            };
            let client = ApiClient::new(&a.api)?;
            let view = client.post_path("/v1/schedules", Some(&request)).await?;
            print(&view, a.json)
        }
        ScheduleCommand::List(a) => {
            let list: ScheduleList = ApiClient::new(&a.api)?.get_path("/v1/schedules").await?;
            if a.json {
                println!("{}", serde_json::to_string(&list)?);
            } else {
                for s in &list.schedules {
                    println!("{}", line(s));
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        ScheduleCommand::Show(a) => {
            let path = format!("/v1/schedules/{}", a.name);
            print(&ApiClient::new(&a.api)?.get_path(&path).await?, a.json)
        }
        ScheduleCommand::Pause(a) => toggle(a, "pause").await,
        ScheduleCommand::Resume(a) => toggle(a, "resume").await,
        ScheduleCommand::Delete(a) => {
            let path = format!("/v1/schedules/{}", a.name);
            ApiClient::new(&a.api)?.delete_path(&path).await?;
            eprintln!("schedule `{}` deleted", a.name);
            Ok(ExitCode::SUCCESS)
        }
    }
}

async fn toggle(a: NameArgs, action: &str) -> Result<ExitCode> {
    let path = format!("/v1/schedules/{}/{action}", a.name);
    let view = ApiClient::new(&a.api)?
        .post_path(&path, None::<&()>)
        .await?;
    print(&view, a.json)
}

/// The spec file as a template: TOML whose local URIs are made absolute, variables kept.
fn template(path: &std::path::Path) -> Result<String> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read spec `{}`", path.display()))?;
    let mut doc: toml::Table = text
        .parse()
        .map_err(|e| anyhow!("{}: not TOML: {e}", path.display()))?;
    for (table, key) in crate::spec_file::PATH_KEYS {
        if let Some(toml::Value::String(uri)) = doc
            .get_mut(table)
            .and_then(|t| t.as_table_mut())
            .and_then(|t| t.get_mut(key))
        {
            *uri = absolutize(uri);
        }
    }
    Ok(toml::to_string(&doc)?)
}

fn line(s: &ScheduleView) -> String {
    let next = match (s.paused, s.next_fire_at_ms) {
        (true, _) => "paused".to_string(),
        (false, Some(ms)) => format!("next {}", utc(ms)),
        (false, None) => "never again".to_string(),
    };
    format!(
        "{:<24} {:<16} {:<16} catch-up {:<6} {next}",
        s.name, s.cron, s.timezone, s.catch_up
    )
}

fn print(view: &ScheduleView, json: bool) -> Result<ExitCode> {
    if json {
        println!("{}", serde_json::to_string(view)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!("{}", line(view));
    for f in &view.fires {
        let made = match (&f.job_id, &f.error) {
            (Some(job), _) => format!("job {job}"),
            (None, Some(e)) => format!("no job: {e}"),
            (None, None) => "no job".into(),
        };
        println!("  fired {}  {made}", utc(f.fire_at_ms));
    }
    Ok(ExitCode::SUCCESS)
}

/// A time as UTC text.
fn utc(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| t.format("%Y-%m-%d %H:%M:%S UTC").to_string())
        .unwrap_or_else(|| format!("{ms} ms"))
}
