//! Schedules: a job spec run at each fire time of a cron expression in a time zone. Every
//! replica runs the scheduler loop; a fire time makes exactly one job however many replicas
//! handle it, because the job's idempotency key names the schedule and the fire time, and the
//! schedule's next fire time moves on only from the value a pass read.

use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, TimeZone};
use chrono_tz::Tz;
use croner::Cron;
use croner::parser::{CronParser, Seconds};
use nightshift_metastore::{NewSchedule, ScheduleRecord, StoreError};
use nightshift_proto::wire::{FireView, ScheduleRequest, ScheduleView};
use nightshift_proto::{CatchUp, JobSpec, SpecError, check_text};
use tokio_util::sync::CancellationToken;

use crate::api_error::ApiError;
use crate::service::Service;

/// How often the scheduler looks for fire times that have come.
const SCHEDULE_EVERY: Duration = Duration::from_millis(500);
/// A fire time at most this late is on time; an older one was missed (no coordinator ran)
/// and is run or not by the schedule's catch-up policy.
const ON_TIME_MS: i64 = 60_000;
/// Fire times one pass handles for one schedule, at most (catch-up `all` after a long outage).
const MAX_FIRES_PER_PASS: usize = 1000;
const MS_PER_S: i64 = 1000;
/// Fire times a schedule's status lists.
const FIRES_SHOWN: u32 = 20;
/// A schedule's output must differ at every fire time within this span of its first (every
/// variable repeats within a day, or never).
const REPEAT_HORIZON_MS: i64 = 2 * 24 * 3600 * MS_PER_S;
/// Fire times whose outputs are compared at most (a cron of every second reaches it in under
/// three hours).
const FIRES_CHECKED: usize = 10_000;
/// The variables a spec template may use, as `{{ name }}`.
pub const VARIABLES: [&str; 5] = ["date", "time", "datetime", "timestamp", "schedule"];

/// A cron expression in a time zone.
pub struct Timetable {
    cron: Cron,
    tz: Tz,
}

fn invalid(key: &str, message: String) -> ApiError {
    ApiError::Spec(SpecError {
        key: Some(key.to_string()),
        line: None,
        message,
    })
}

impl Timetable {
    /// Five fields (minute hour day month weekday), or six with seconds first; an IANA zone.
    pub fn parse(cron: &str, timezone: &str) -> Result<Self, ApiError> {
        let parser = CronParser::builder().seconds(Seconds::Optional).build();
        let cron = parser
            .parse(cron)
            .map_err(|e| invalid("cron", format!("`{cron}` is not a cron expression: {e}")))?;
        let tz = Tz::from_str(timezone).map_err(|_| {
            invalid(
                "timezone",
                format!("`{timezone}` is not an IANA time zone (e.g. Europe/Berlin, UTC)"),
            )
        })?;
        Ok(Self { cron, tz })
    }

    fn at(&self, ms: i64) -> Option<DateTime<Tz>> {
        self.tz.timestamp_millis_opt(ms).single()
    }

    /// The first fire time after `after_ms`: a whole second (cron has no finer unit).
    pub fn next_after(&self, after_ms: i64) -> Option<i64> {
        let after = self.at(after_ms.div_euclid(MS_PER_S) * MS_PER_S)?;
        let next = self.cron.find_next_occurrence(&after, false).ok()?;
        Some(next.timestamp_millis())
    }

    /// The fire times from `from_ms` (itself one) to `to_ms`, oldest first, at most `max`.
    pub fn between(&self, from_ms: i64, to_ms: i64, max: usize) -> Vec<i64> {
        let mut fires = Vec::new();
        let mut at = Some(from_ms);
        while let Some(t) = at.filter(|&t| t <= to_ms && fires.len() < max) {
            fires.push(t);
            at = self.next_after(t);
        }
        fires
    }

    /// A spec template with its variables filled in for the fire time `fire_ms`.
    pub fn render(&self, template: &str, schedule: &str, fire_ms: i64) -> Result<String, String> {
        let at = self
            .at(fire_ms)
            .ok_or_else(|| format!("fire time {fire_ms} is out of range"))?;
        let mut out = String::with_capacity(template.len());
        let mut rest = template;
        while let Some(open) = rest.find("{{") {
            out.push_str(&rest[..open]);
            let close = rest[open..]
                .find("}}")
                .ok_or_else(|| "a `{{` is not closed by `}}`".to_string())?;
            let value = match rest[open + 2..open + close].trim() {
                "date" => at.format("%Y-%m-%d").to_string(),
                "time" => at.format("%H%M%S").to_string(),
                "datetime" => at.format("%Y-%m-%dT%H-%M-%S").to_string(),
                "timestamp" => at.timestamp().to_string(),
                "schedule" => schedule.to_string(),
                other => {
                    return Err(format!(
                        "unknown variable `{other}` (known: {})",
                        VARIABLES.join(", ")
                    ));
                }
            };
            out.push_str(&value);
            rest = &rest[open + close + 2..];
        }
        out.push_str(rest);
        Ok(out)
    }
}

/// Which of a schedule's due fire times a pass runs: those on time always; of those missed,
/// none (`skip`), the newest when none is on time (`latest`), or all (`all`).
pub fn to_run(policy: CatchUp, due: Vec<i64>, now_ms: i64) -> Vec<i64> {
    let (missed, on_time): (Vec<i64>, Vec<i64>) =
        due.into_iter().partition(|&f| now_ms - f > ON_TIME_MS);
    match policy {
        CatchUp::Skip => on_time,
        CatchUp::Latest if on_time.is_empty() => missed.last().copied().into_iter().collect(),
        CatchUp::Latest => on_time,
        CatchUp::All => missed.into_iter().chain(on_time).collect(),
    }
}

/// Whether the output a spec template names repeats among the fire times of the two days from
/// `first` (at most `FIRES_CHECKED` of them): `{{ date }}` under an hourly cron, or `{{ time }}`
/// the next day. Read from the template's `output.uri` alone, when the template is TOML before
/// its variables are filled in (they stand in strings); otherwise the next two fire times are
/// all that is compared.
fn output_repeats(table: &Timetable, template: &str, schedule: &str, first: i64) -> bool {
    let Ok(raw) = toml::from_str::<toml::Table>(template) else {
        return false;
    };
    let Some(uri) = raw
        .get("output")
        .and_then(|o| o.get("uri"))
        .and_then(|u| u.as_str())
    else {
        return false;
    };
    let fires = table.between(first, first + REPEAT_HORIZON_MS, FIRES_CHECKED);
    let mut seen = std::collections::HashSet::new();
    fires
        .into_iter()
        .filter_map(|fire| table.render(uri, schedule, fire).ok())
        .any(|out| !seen.insert(out))
}

/// The rules of `schedule create`: a name like a job's, a cron expression and time zone that
/// parse, and a spec that is valid at the next two fire times and writes to another output at
/// each (and at every fire time of the next two days: `output_repeats`). Answers the schedule
/// to insert and the spec of its first fire.
fn check(req: ScheduleRequest, now_ms: i64) -> Result<(NewSchedule, JobSpec), ApiError> {
    let name_ok = !req.name.is_empty()
        && req.name.len() <= nightshift_proto::spec_check::MAX_NAME_LEN
        && req
            .name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if !name_ok {
        return Err(invalid(
            "name",
            "must be 1 to 64 letters, digits, '-' or '_'".into(),
        ));
    }
    let timezone = req.timezone.unwrap_or_else(|| "UTC".into());
    let table = Timetable::parse(&req.cron, &timezone)?;
    let first = table
        .next_after(now_ms)
        .ok_or_else(|| invalid("cron", "never fires".into()))?;
    let second = table
        .next_after(first)
        .ok_or_else(|| invalid("cron", "fires only once".into()))?;
    let [a, b] = [first, second].map(|fire| -> Result<JobSpec, ApiError> {
        let text = table
            .render(&req.spec, &req.name, fire)
            .map_err(|e| invalid("spec", e))?;
        JobSpec::from_toml(&text).map_err(ApiError::Spec)
    });
    let first_spec = a?;
    let repeated = first_spec.output.uri == b?.output.uri
        || output_repeats(&table, &req.spec, &req.name, first);
    if repeated {
        return Err(invalid(
            "output.uri",
            "must differ between fire times: put a variable in it that changes as often as \
             the schedule fires, e.g. `.../{{ date }}/` for a daily schedule or \
             `.../{{ datetime }}/`"
                .into(),
        ));
    }
    let schedule = NewSchedule {
        name: req.name,
        cron: req.cron,
        timezone,
        catch_up: req.catch_up,
        spec: req.spec,
        next_fire_at_ms: first,
    };
    Ok((schedule, first_spec))
}

impl Service {
    pub async fn create_schedule(&self, req: ScheduleRequest) -> Result<ScheduleView, ApiError> {
        let now = self.store.now_ms().await?;
        let (schedule, mut first) = check(req, now)?;
        // Its jobs must pass what every job passes (allow-list, callback), or every fire fails.
        self.admit(&mut first)?;
        let record = self.store.create_schedule(schedule).await?;
        tracing::info!(schedule = %record.name, cron = %record.cron, "schedule created");
        self.schedule_view(record).await
    }

    pub async fn schedules(&self) -> Result<Vec<ScheduleView>, ApiError> {
        let mut views = Vec::new();
        for record in self.store.schedules().await? {
            views.push(self.schedule_view(record).await?);
        }
        Ok(views)
    }

    pub async fn schedule(&self, name: &str) -> Result<ScheduleView, ApiError> {
        check_text("schedule", name)?;
        let record = self.store.schedule(name).await?;
        self.schedule_view(record.ok_or_else(|| no_schedule(name))?)
            .await
    }

    /// Pauses a schedule; resuming it fires next at its first fire time from now (the ones
    /// in between are not caught up). Resuming a schedule that is not paused changes nothing:
    /// a fire time that is due but not yet fired (the scheduler's next pass, or the catch-up
    /// after every replica was down) still fires.
    pub async fn pause_schedule(&self, name: &str, paused: bool) -> Result<ScheduleView, ApiError> {
        check_text("schedule", name)?;
        let record = self
            .store
            .schedule(name)
            .await?
            .ok_or_else(|| no_schedule(name))?;
        if record.paused == paused {
            return self.schedule_view(record).await;
        }
        let next = if paused {
            None
        } else {
            let now = self.store.now_ms().await?;
            Timetable::parse(&record.cron, &record.timezone)?.next_after(now)
        };
        let record = self.store.set_schedule_paused(name, paused, next).await?;
        self.schedule_view(record.ok_or_else(|| no_schedule(name))?)
            .await
    }

    pub async fn delete_schedule(&self, name: &str) -> Result<(), ApiError> {
        check_text("schedule", name)?;
        if self.store.delete_schedule(name).await? {
            Ok(())
        } else {
            Err(no_schedule(name))
        }
    }

    async fn schedule_view(&self, s: ScheduleRecord) -> Result<ScheduleView, ApiError> {
        let fires = self.store.fires(s.id, FIRES_SHOWN).await?;
        Ok(ScheduleView {
            next_fire_at_ms: s.next_fire_at_ms.filter(|_| !s.paused),
            name: s.name,
            cron: s.cron,
            timezone: s.timezone,
            catch_up: s.catch_up,
            paused: s.paused,
            created_at_ms: s.created_at_ms,
            spec: s.spec,
            fires: fires
                .into_iter()
                .map(|f| FireView {
                    fire_at_ms: f.fire_at_ms,
                    job_id: f.job_id,
                    error: f.error,
                })
                .collect(),
        })
    }
}

fn no_schedule(name: &str) -> ApiError {
    ApiError::NotFound(format!(
        "no schedule named `{}`",
        nightshift_proto::excerpt(name)
    ))
}

/// Makes the jobs of the fire times that have come until `shutdown`.
pub async fn scheduler(service: Service, shutdown: CancellationToken) {
    loop {
        if let Err(e) = fire_due(&service).await {
            tracing::warn!(error = %e, "scheduler pass failed");
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(SCHEDULE_EVERY) => {}
        }
    }
}

/// One pass: each due schedule's fire times up to now, by its catch-up policy, then its next
/// fire time moved past now.
async fn fire_due(service: &Service) -> Result<(), ApiError> {
    let now = service.store.now_ms().await?;
    for s in service.store.due_schedules().await? {
        let Some(next) = s.next_fire_at_ms else {
            continue;
        };
        // Checked at create; should one no longer parse, it is left for the others' sake.
        let table = match Timetable::parse(&s.cron, &s.timezone) {
            Ok(table) => table,
            Err(e) => {
                tracing::error!(schedule = %s.name, error = %e, "schedule cannot fire");
                continue;
            }
        };
        let due = table.between(next, now, MAX_FIRES_PER_PASS);
        for fire in to_run(s.catch_up, due, now) {
            fire_once(service, &s, &table, fire).await?;
        }
        let after = table.next_after(now).unwrap_or(i64::MAX);
        service.store.advance_schedule(s.id, next, after).await?;
    }
    Ok(())
}

/// The job of one fire time, made once: its idempotency key names the schedule and the time.
async fn fire_once(
    service: &Service,
    s: &ScheduleRecord,
    table: &Timetable,
    fire_ms: i64,
) -> Result<(), ApiError> {
    let made = async {
        let text = table
            .render(&s.spec, &s.name, fire_ms)
            .map_err(|e| invalid("spec", e))?;
        let spec = JobSpec::from_toml(&text).map_err(ApiError::Spec)?;
        let key = nightshift_metastore::schedule_key(&s.name, fire_ms);
        Ok::<_, ApiError>(service.submit(spec, Some(key)).await?.job.id)
    }
    .await;
    let error = match &made {
        Ok(job) => {
            tracing::info!(schedule = %s.name, fire_ms, job, "schedule fired");
            None
        }
        // The database being away fails the pass: the fire time is tried again.
        Err(ApiError::Metastore(StoreError::Db(_) | StoreError::Batch(_))) => {
            return made.map(|_| ());
        }
        Err(e) => {
            tracing::warn!(schedule = %s.name, fire_ms, error = %e, "schedule fire made no job");
            Some(e.to_string())
        }
    };
    let outcome = match (&made, &error) {
        (Ok(job), _) => Ok(*job),
        (Err(_), e) => Err(e.as_deref().unwrap_or_default()),
    };
    service.store.record_fire(s.id, fire_ms, outcome).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(tz: Tz, y: i32, mo: u32, d: u32, h: u32, mi: u32) -> i64 {
        tz.with_ymd_and_hms(y, mo, d, h, mi, 0)
            .earliest()
            .unwrap()
            .timestamp_millis()
    }

    #[test]
    fn a_nightly_schedule_keeps_its_local_hour_across_daylight_saving_changes() {
        let berlin = Timetable::parse("0 2 * * *", "Europe/Berlin").unwrap();
        // 2026-03-29: 02:00 does not exist in Berlin (clocks jump to 03:00); the job runs at
        // the first valid minute after the gap, once; the next night is 02:00 again.
        let before = ms(chrono_tz::Europe::Berlin, 2026, 3, 28, 12, 0);
        let fires = berlin.between(
            berlin.next_after(before).unwrap(),
            before + 3 * 86_400_000,
            10,
        );
        let local: Vec<String> = fires
            .iter()
            .map(|&f| berlin.at(f).unwrap().format("%m-%d %H:%M %Z").to_string())
            .collect();
        assert_eq!(
            local,
            ["03-29 03:00 CEST", "03-30 02:00 CEST", "03-31 02:00 CEST"]
        );
        // 2026-10-25: 02:00 happens twice (CEST, then CET); a fixed-time job runs once.
        let before = ms(chrono_tz::Europe::Berlin, 2026, 10, 24, 12, 0);
        let fires = berlin.between(
            berlin.next_after(before).unwrap(),
            before + 2 * 86_400_000,
            10,
        );
        assert_eq!(fires.len(), 2, "{fires:?}");
        assert_eq!(fires[1] - fires[0], 25 * 3_600_000, "a 25-hour night");
    }

    #[test]
    fn time_zones_place_the_same_cron_at_different_instants() {
        let utc = Timetable::parse("30 6 * * 1-5", "UTC").unwrap();
        let tokyo = Timetable::parse("30 6 * * 1-5", "Asia/Tokyo").unwrap();
        let from = ms(chrono_tz::UTC, 2026, 11, 30, 0, 0); // a Monday
        let (u, t) = (
            utc.next_after(from).unwrap(),
            tokyo.next_after(from).unwrap(),
        );
        assert_eq!(u, ms(chrono_tz::UTC, 2026, 11, 30, 6, 30));
        assert_eq!(
            t,
            ms(chrono_tz::UTC, 2026, 11, 30, 21, 30),
            "06:30 on Tuesday in Tokyo"
        );
        let seconds = Timetable::parse("*/5 * * * * *", "UTC").unwrap();
        assert_eq!(seconds.next_after(from).unwrap() - from, 5_000);
        assert_eq!(
            seconds.next_after(from + 1_234),
            Some(from + 5_000),
            "whole seconds"
        );
        assert_eq!(seconds.between(from + 5_000, from + 15_000, 10).len(), 3);
    }

    #[test]
    fn bad_crons_time_zones_and_variables_are_named() {
        let e = Timetable::parse("61 * * * *", "UTC").err().unwrap();
        assert!(
            matches!(&e, ApiError::Spec(s) if s.key.as_deref() == Some("cron")),
            "{e}"
        );
        let e = Timetable::parse("0 2 * * *", "Mars/Olympus").err().unwrap();
        assert!(
            matches!(&e, ApiError::Spec(s) if s.key.as_deref() == Some("timezone")),
            "{e}"
        );
        let t = Timetable::parse("0 2 * * *", "Europe/Berlin").unwrap();
        let fire = ms(chrono_tz::Europe::Berlin, 2026, 11, 28, 2, 0);
        assert_eq!(
            t.render(
                "s3://lake/{{ date }}/{{time}}-{{ schedule }}",
                "nightly",
                fire
            )
            .unwrap(),
            "s3://lake/2026-11-28/020000-nightly"
        );
        assert!(
            t.render("{{ day }}", "n", fire)
                .unwrap_err()
                .contains("unknown variable `day`")
        );
        assert!(
            t.render("{{ date", "n", fire)
                .unwrap_err()
                .contains("not closed")
        );
    }

    fn request(spec_output: &str) -> ScheduleRequest {
        ScheduleRequest {
            name: "nightly".into(),
            cron: "0 2 * * *".into(),
            timezone: Some("Europe/Berlin".into()),
            catch_up: CatchUp::Latest,
            spec: format!(
                "name = \"scores\"\n[input]\nuri = \"s3://lake/in/{{{{ date }}}}/*.parquet\"\n\
                 [model]\nuri = \"s3://m/m.onnx\"\n[model.inputs]\nx = \"f\"\n\
                 [model.outputs]\ny = \"y\"\n[output]\nuri = \"{spec_output}\"\n"
            ),
        }
    }

    #[test]
    fn a_schedule_is_checked_at_its_next_two_fire_times() {
        let now = ms(chrono_tz::UTC, 2026, 11, 28, 12, 0);
        let (made, first) = check(request("s3://lake/out/{{ date }}/"), now).unwrap();
        assert_eq!(first.output.uri, "s3://lake/out/2026-11-29/");
        assert_eq!(
            made.next_fire_at_ms,
            ms(chrono_tz::Europe::Berlin, 2026, 11, 29, 2, 0)
        );
        assert_eq!(made.timezone, "Europe/Berlin");
        let key = |r: ScheduleRequest| match check(r, now) {
            Err(ApiError::Spec(e)) => (e.key.unwrap_or_default(), e.message),
            other => panic!("{:?}", other.map(|s| s.0.name)),
        };
        let (k, m) = key(request("s3://lake/out/fixed/"));
        assert_eq!(k, "output.uri", "{m}");
        // Outputs that repeat later than the next fire time: a date under an hourly cron
        // (its first two fires fall on two days at 22:30), a time of day under any cron.
        let late = ms(chrono_tz::UTC, 2026, 11, 28, 22, 30);
        let mut hourly = request("s3://lake/out/{{ date }}/");
        hourly.cron = "0 * * * *".into();
        hourly.timezone = Some("UTC".into());
        let Err(ApiError::Spec(e)) = check(hourly.clone(), late) else {
            panic!("an hourly schedule writing daily outputs was accepted")
        };
        assert_eq!(e.key.as_deref(), Some("output.uri"), "{e}");
        hourly.spec = hourly.spec.replace("{{ date }}", "{{ time }}");
        assert!(
            check(hourly.clone(), late).is_err(),
            "the time repeats a day later"
        );
        hourly.spec = hourly.spec.replace("{{ time }}", "{{ datetime }}");
        check(hourly, late).unwrap();
        let (k, m) = key(request("s3://lake/out/{{ day }}/"));
        assert!(
            k == "spec" && m.contains("unknown variable `day`"),
            "{k}: {m}"
        );
        let mut bad_name = request("s3://lake/out/{{ date }}/");
        bad_name.name = "night ly".into();
        assert_eq!(key(bad_name).0, "name");
        let mut bad_spec = request("s3://lake/out/{{ date }}/");
        bad_spec.spec = bad_spec.spec.replace("[model.outputs]\ny = \"y\"\n", "");
        assert_eq!(key(bad_spec).0, "model.outputs");
    }

    #[test]
    fn catch_up_runs_none_the_newest_or_all_missed_fire_times() {
        let now = 10 * ON_TIME_MS;
        let missed = vec![now - 5 * ON_TIME_MS, now - 3 * ON_TIME_MS];
        let mut due = missed.clone();
        assert!(to_run(CatchUp::Skip, due.clone(), now).is_empty());
        assert_eq!(
            to_run(CatchUp::Latest, due.clone(), now),
            [now - 3 * ON_TIME_MS]
        );
        assert_eq!(to_run(CatchUp::All, due.clone(), now), missed);
        due.push(now - 1_000);
        for policy in [CatchUp::Skip, CatchUp::Latest] {
            assert_eq!(to_run(policy, due.clone(), now), [now - 1_000], "{policy}");
        }
        assert_eq!(to_run(CatchUp::All, due.clone(), now).len(), 3);
    }
}
