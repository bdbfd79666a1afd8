//! The coordinator's metrics, rendered in Prometheus text format. Names are constants here.

use std::collections::{BTreeMap, VecDeque};
use std::fmt::Write;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use nightshift_proto::wire::{GpuSample, LoadedModel, ModelHolder};

use nightshift_metastore::{CopyOutcome, StoreMetrics};

pub const PENDING_SHARDS: &str = "nightshift_pending_shards";
pub const PENDING_ROWS: &str = "nightshift_pending_rows";
pub const LEASED_SHARDS: &str = "nightshift_leased_shards";
pub const RUNNING_JOBS: &str = "nightshift_running_jobs";
pub const WORKERS_SEEN: &str = "nightshift_workers_seen";
pub const ROWS_PER_SECOND: &str = "nightshift_rows_per_second";
pub const ROWS_COMMITTED: &str = "nightshift_rows_committed_total";
pub const SHARDS_COMPLETED: &str = "nightshift_shards_completed_total";
pub const COPIES_RUNNING: &str = "nightshift_speculative_copies";
pub const COPIES_STARTED: &str = "nightshift_speculative_copies_started_total";
pub const COPIES_WON: &str = "nightshift_speculative_copies_won_total";
pub const COPIES_DROPPED: &str = "nightshift_speculative_copies_dropped_total";
pub const LEASE_SECONDS: &str = "nightshift_lease_claim_seconds";
pub const COMMIT_SECONDS: &str = "nightshift_commit_seconds";
pub const API_SECONDS: &str = "nightshift_api_request_seconds";
pub const GPU_BUSY: &str = "nightshift_worker_gpu_busy_ratio";
pub const GPU_MEMORY_USED: &str = "nightshift_worker_gpu_memory_used_bytes";
pub const GPU_MEMORY_TOTAL: &str = "nightshift_worker_gpu_memory_total_bytes";
pub const MODEL_LOADED: &str = "nightshift_worker_model_loaded";
pub const JOB_COST_DOLLARS: &str = "nightshift_job_cost_dollars";
pub const JOB_GPU_SECONDS: &str = "nightshift_job_gpu_seconds";
pub const JOB_MACHINE_SECONDS: &str = "nightshift_job_machine_seconds";
pub const JOB_LOST_SECONDS: &str = "nightshift_job_lost_seconds";

/// What a worker reported last is forgotten after this: the worker went quiet.
const WORKER_REPORT_MAX_AGE: Duration = Duration::from_secs(60);
/// Worker reports are pruned by reports at most this often (readers always prune): pruning
/// looks at every worker, and heartbeats come from every worker every second.
const WORKER_PRUNE_EVERY: Duration = Duration::from_secs(1);
/// The window the rows/s gauge is measured over.
const RATE_WINDOW: Duration = Duration::from_secs(60);

/// What a worker reported with its last heartbeat: its GPUs, the models it holds loaded and
/// its slots.
#[derive(Debug, Default)]
struct WorkerState {
    gpus: Vec<GpuSample>,
    models: Vec<LoadedModel>,
    slots: Option<u32>,
}

/// What the dashboard shows of a worker's last report.
#[derive(Debug, Clone, Default)]
pub struct WorkerReport {
    pub gpus: Vec<GpuSample>,
    pub slots: Option<u32>,
}

const BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// A latency histogram with fixed buckets.
#[derive(Debug, Default)]
pub struct Histogram {
    counts: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    sum_micros: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, d: Duration) {
        let s = d.as_secs_f64();
        for (i, b) in BUCKETS.iter().enumerate() {
            if s <= *b {
                self.counts[i].fetch_add(1, Ordering::Relaxed);
            }
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_micros
            .fetch_add(d.as_micros() as u64, Ordering::Relaxed);
    }

    /// Observations so far, and their total.
    pub fn total(&self) -> (u64, Duration) {
        let micros = self.sum_micros.load(Ordering::Relaxed);
        (
            self.count.load(Ordering::Relaxed),
            Duration::from_micros(micros),
        )
    }

    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        for (i, b) in BUCKETS.iter().enumerate() {
            let _ = writeln!(
                out,
                "{name}_bucket{{{labels}{sep}le=\"{b}\"}} {}",
                self.counts[i].load(Ordering::Relaxed)
            );
        }
        let count = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {count}");
        let braces = if labels.is_empty() {
            String::new()
        } else {
            format!("{{{labels}}}")
        };
        let _ = writeln!(
            out,
            "{name}_sum{braces} {}",
            self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6
        );
        let _ = writeln!(out, "{name}_count{braces} {count}");
    }
}

/// Counters and histograms this replica records.
#[derive(Debug)]
pub struct Metrics {
    pub lease_claims: Histogram,
    /// Commits that published a job, from reading its parts to recording it succeeded.
    pub commits: Histogram,
    api: Mutex<BTreeMap<String, std::sync::Arc<Histogram>>>,
    rows_committed: AtomicU64,
    shards_completed: AtomicU64,
    /// Speculative copies of stragglers this replica started, and races it decided.
    copies_started: AtomicU64,
    copies_won: AtomicU64,
    copies_dropped: AtomicU64,
    /// (when, rows committed) samples for the rows/s gauge, oldest first.
    samples: Mutex<VecDeque<(Instant, u64)>>,
    /// The latest report of each worker that sent one to this replica.
    workers: Mutex<WorkerReports>,
}

/// Workers' latest reports, and when those too old were last dropped.
#[derive(Debug)]
struct WorkerReports {
    latest: BTreeMap<String, (Instant, WorkerState)>,
    pruned_at: Instant,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            lease_claims: Histogram::default(),
            commits: Histogram::default(),
            api: Mutex::new(BTreeMap::new()),
            rows_committed: AtomicU64::new(0),
            shards_completed: AtomicU64::new(0),
            copies_started: AtomicU64::new(0),
            copies_won: AtomicU64::new(0),
            copies_dropped: AtomicU64::new(0),
            samples: Mutex::new(VecDeque::new()),
            workers: Mutex::new(WorkerReports {
                latest: BTreeMap::new(),
                pruned_at: Instant::now(),
            }),
        }
    }
}

impl Metrics {
    pub fn api(&self, route: &str) -> std::sync::Arc<Histogram> {
        self.api
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(route.to_string())
            .or_default()
            .clone()
    }

    pub fn rows_committed(&self, rows: u64) {
        let total = self.rows_committed.fetch_add(rows, Ordering::Relaxed) + rows;
        let mut s = self.samples.lock().unwrap_or_else(|p| p.into_inner());
        add_sample(&mut s, Instant::now(), total);
    }

    /// A worker's latest GPU samples and loaded models (kept until it sends others or goes
    /// quiet).
    pub fn record_worker(
        &self,
        worker: &str,
        gpus: &[GpuSample],
        models: &[LoadedModel],
        slots: Option<u32>,
    ) {
        let mut workers = self.lock_workers(false);
        let state = WorkerState {
            gpus: gpus.to_vec(),
            models: models.to_vec(),
            slots,
        };
        workers
            .latest
            .insert(worker.to_string(), (Instant::now(), state));
    }

    /// The last report of each worker that reported lately.
    pub fn worker_reports(&self) -> BTreeMap<String, WorkerReport> {
        self.fresh_workers()
            .latest
            .iter()
            .map(|(worker, (_, state))| {
                let report = WorkerReport {
                    gpus: state.gpus.clone(),
                    slots: state.slots,
                };
                (worker.clone(), report)
            })
            .collect()
    }

    /// Workers that reported lately, with what they reported.
    fn fresh_workers(&self) -> std::sync::MutexGuard<'_, WorkerReports> {
        self.lock_workers(true)
    }

    /// The workers' reports, those too old dropped first when `prune` or when due.
    fn lock_workers(&self, prune: bool) -> std::sync::MutexGuard<'_, WorkerReports> {
        let mut workers = self.workers.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        if prune || now.duration_since(workers.pruned_at) >= WORKER_PRUNE_EVERY {
            workers
                .latest
                .retain(|_, (at, _)| now.duration_since(*at) <= WORKER_REPORT_MAX_AGE);
            workers.pruned_at = now;
        }
        workers
    }

    /// The workers that hold a session of the model `uri` loaded, and where.
    pub fn model_holders(&self, uri: &str) -> Vec<ModelHolder> {
        self.fresh_workers()
            .latest
            .iter()
            .flat_map(|(worker, (_, state))| {
                state
                    .models
                    .iter()
                    .filter(|m| m.uri == uri)
                    .map(|m| ModelHolder {
                        worker: worker.clone(),
                        device: m.device.clone(),
                    })
            })
            .collect()
    }

    /// GPU gauges per worker and device, and the models each worker holds.
    fn render_workers(&self, out: &mut String) {
        let workers = self.fresh_workers();
        let fresh: Vec<(&String, &GpuSample)> = workers
            .latest
            .iter()
            .flat_map(|(w, (_, state))| state.gpus.iter().map(move |g| (w, g)))
            .collect();
        let series: [GpuSeries; 3] = [
            (
                GPU_BUSY,
                "Share of time a kernel ran on the GPU, as the worker last sampled it.",
                |g| f64::from(g.utilization_percent) / 100.0,
            ),
            (GPU_MEMORY_USED, "GPU memory in use.", |g| {
                g.memory_used_bytes as f64
            }),
            (GPU_MEMORY_TOTAL, "GPU memory.", |g| {
                g.memory_total_bytes as f64
            }),
        ];
        for (name, help, value) in series {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
            for (worker, g) in &fresh {
                let worker = label_value(worker);
                let _ = writeln!(
                    out,
                    "{name}{{worker=\"{worker}\",gpu=\"{}\"}} {}",
                    g.index,
                    value(g)
                );
            }
        }
        let name = MODEL_LOADED;
        let _ = writeln!(
            out,
            "# HELP {name} A model session the worker holds loaded.\n# TYPE {name} gauge"
        );
        for (worker, (_, state)) in workers.latest.iter() {
            for m in &state.models {
                let _ = writeln!(
                    out,
                    "{name}{{worker=\"{}\",model=\"{}\",device=\"{}\"}} 1",
                    label_value(worker),
                    label_value(&m.uri),
                    label_value(&m.device)
                );
            }
        }
    }

    pub fn shard_completed(&self) {
        self.shards_completed.fetch_add(1, Ordering::Relaxed);
    }

    /// Shards completed through this replica since it started.
    pub fn shards_completed(&self) -> u64 {
        self.shards_completed.load(Ordering::Relaxed)
    }

    pub fn copies_started(&self, n: usize) {
        self.copies_started.fetch_add(n as u64, Ordering::Relaxed);
    }

    pub fn copies_resolved(&self, outcome: CopyOutcome) {
        self.copies_won.fetch_add(outcome.won, Ordering::Relaxed);
        self.copies_dropped
            .fetch_add(outcome.dropped, Ordering::Relaxed);
    }

    /// Rows committed per second over the last minute on this replica.
    pub fn rows_per_second(&self) -> f64 {
        let s = self.samples.lock().unwrap_or_else(|p| p.into_inner());
        match (s.front(), s.back()) {
            (Some(a), Some(b)) if b.0 > a.0 => (b.1 - a.1) as f64 / (b.0 - a.0).as_secs_f64(),
            _ => 0.0,
        }
    }

    pub fn render(&self, store: &StoreMetrics) -> String {
        let mut out = String::new();
        let gauge = |out: &mut String, name: &str, help: &str, v: f64| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
        };
        gauge(
            &mut out,
            PENDING_SHARDS,
            "Shards waiting for a worker.",
            store.pending_shards as f64,
        );
        gauge(
            &mut out,
            PENDING_ROWS,
            "Rows in shards waiting for a worker.",
            store.pending_rows as f64,
        );
        gauge(
            &mut out,
            LEASED_SHARDS,
            "Shards leased to workers.",
            store.leased_shards as f64,
        );
        gauge(
            &mut out,
            RUNNING_JOBS,
            "Jobs running.",
            store.running_jobs as f64,
        );
        gauge(
            &mut out,
            WORKERS_SEEN,
            "Workers heard from in the last minute.",
            store.workers_seen as f64,
        );
        gauge(
            &mut out,
            ROWS_PER_SECOND,
            "Rows committed per second on this replica over the last minute.",
            self.rows_per_second(),
        );
        let _ = writeln!(
            out,
            "# HELP {ROWS_COMMITTED} Rows committed through this replica.\n# TYPE {ROWS_COMMITTED} counter\n{ROWS_COMMITTED} {}",
            self.rows_committed.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP {SHARDS_COMPLETED} Shards completed through this replica.\n# TYPE {SHARDS_COMPLETED} counter\n{SHARDS_COMPLETED} {}",
            self.shards_completed.load(Ordering::Relaxed)
        );
        gauge(
            &mut out,
            COPIES_RUNNING,
            "Speculative copies of straggling shards running.",
            store.copies as f64,
        );
        for (name, help, n) in [
            (
                COPIES_STARTED,
                "Speculative copies this replica granted.",
                &self.copies_started,
            ),
            (
                COPIES_WON,
                "Copies that completed before their original.",
                &self.copies_won,
            ),
            (
                COPIES_DROPPED,
                "Copies dropped: the original completed first, or the copy stopped.",
                &self.copies_dropped,
            ),
        ] {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
                n.load(Ordering::Relaxed)
            );
        }
        let _ = writeln!(
            out,
            "# HELP {LEASE_SECONDS} Time to claim shards.\n# TYPE {LEASE_SECONDS} histogram"
        );
        self.lease_claims.render(&mut out, LEASE_SECONDS, "");
        let _ = writeln!(
            out,
            "# HELP {COMMIT_SECONDS} Time to commit a job.\n# TYPE {COMMIT_SECONDS} histogram"
        );
        self.commits.render(&mut out, COMMIT_SECONDS, "");
        let _ = writeln!(
            out,
            "# HELP {API_SECONDS} API request latency by route.\n# TYPE {API_SECONDS} histogram"
        );
        for (route, h) in self.api.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            h.render(
                &mut out,
                API_SECONDS,
                &format!("route=\"{}\"", label_value(route)),
            );
        }
        self.render_workers(&mut out);
        out
    }
}

/// A GPU gauge: its name, its help and how to read it from a sample.
type GpuSeries = (&'static str, &'static str, fn(&GpuSample) -> f64);

/// A Prometheus label value: backslash, quote and newline escaped, as the text exposition
/// format asks. Every label value rendered here passes through it.
fn label_value(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Running jobs' costs so far, one series per job (and per capacity type for machine time).
pub fn render_costs(costs: &[(i64, nightshift_proto::wire::CostView)]) -> String {
    let mut out = String::new();
    let header = |out: &mut String, name: &str, help: &str| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
    };
    header(
        &mut out,
        JOB_GPU_SECONDS,
        "GPU time a running job's leases held.",
    );
    for (job, c) in costs {
        let _ = writeln!(out, "{JOB_GPU_SECONDS}{{job=\"{job}\"}} {}", c.gpu_seconds);
    }
    header(
        &mut out,
        JOB_MACHINE_SECONDS,
        "Machine time a running job's leases held, by capacity type.",
    );
    for (job, c) in costs {
        for (capacity, v) in [
            ("spot", c.spot_seconds),
            ("on-demand", c.on_demand_seconds),
            ("unknown", c.unknown_seconds),
        ] {
            let _ = writeln!(
                out,
                "{JOB_MACHINE_SECONDS}{{job=\"{job}\",capacity=\"{capacity}\"}} {v}"
            );
        }
    }
    header(
        &mut out,
        JOB_LOST_SECONDS,
        "Machine time of a running job whose work was lost.",
    );
    for (job, c) in costs {
        let _ = writeln!(
            out,
            "{JOB_LOST_SECONDS}{{job=\"{job}\"}} {}",
            c.lost_seconds
        );
    }
    header(
        &mut out,
        JOB_COST_DOLLARS,
        "Dollars a running job cost so far (priced machine time).",
    );
    for (job, c) in costs {
        if let Some(d) = c.dollars {
            let _ = writeln!(out, "{JOB_COST_DOLLARS}{{job=\"{job}\"}} {d}");
        }
    }
    out
}

/// Adds a (when, rows committed) sample and drops those that left the window: each request
/// costs O(1), however many samples a minute holds.
fn add_sample(samples: &mut VecDeque<(Instant, u64)>, now: Instant, total: u64) {
    samples.push_back((now, total));
    while samples
        .front()
        .is_some_and(|(t, _)| now.duration_since(*t) > RATE_WINDOW)
    {
        samples.pop_front();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prometheus_text() {
        let m = Metrics::default();
        m.lease_claims.observe(Duration::from_millis(3));
        m.commits.observe(Duration::from_millis(40));
        m.api("submit").observe(Duration::from_millis(30));
        m.rows_committed(100);
        let text = m.render(&StoreMetrics {
            pending_shards: 4,
            ..Default::default()
        });
        assert!(text.contains("nightshift_pending_shards 4"));
        assert!(text.contains("nightshift_lease_claim_seconds_bucket{le=\"0.005\"} 1"));
        assert!(text.contains("nightshift_lease_claim_seconds_bucket{le=\"0.001\"} 0"));
        assert!(text.contains("nightshift_api_request_seconds_count{route=\"submit\"} 1"));
        assert!(text.contains("nightshift_rows_committed_total 100"));
        assert!(text.contains("nightshift_commit_seconds_bucket{le=\"0.05\"} 1"));
        assert!(text.contains("nightshift_commit_seconds_count 1"));
        m.copies_started(2);
        m.copies_resolved(CopyOutcome { won: 1, dropped: 1 });
        let text = m.render(&StoreMetrics {
            copies: 1,
            ..Default::default()
        });
        assert!(text.contains("nightshift_speculative_copies 1\n"));
        assert!(text.contains("nightshift_speculative_copies_started_total 2"));
        assert!(text.contains("nightshift_speculative_copies_won_total 1"));
        assert!(text.contains("nightshift_speculative_copies_dropped_total 1"));
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(label_value("plain"), "plain");
        assert_eq!(label_value("a\\b\"c\nd"), "a\\\\b\\\"c\\nd");
        let m = Metrics::default();
        let sample = GpuSample {
            index: 0,
            utilization_percent: 50,
            memory_used_bytes: 1,
            memory_total_bytes: 2,
        };
        let model = LoadedModel {
            uri: "s3://b/\"odd\"\\name\n.onnx".into(),
            device: "cuda:0".into(),
        };
        m.record_worker("w\\1\n", &[sample], &[model], None);
        m.api("/v1/\"x\"\n").observe(Duration::from_millis(1));
        let text = m.render(&StoreMetrics::default());
        assert!(
            text.contains(
                "nightshift_worker_model_loaded{worker=\"w\\\\1\\n\",\
                 model=\"s3://b/\\\"odd\\\"\\\\name\\n.onnx\",device=\"cuda:0\"} 1"
            ),
            "{text}"
        );
        assert!(
            text.contains("nightshift_worker_gpu_busy_ratio{worker=\"w\\\\1\\n\",gpu=\"0\"} 0.5"),
            "{text}"
        );
        assert!(
            text.contains("nightshift_api_request_seconds_count{route=\"/v1/\\\"x\\\"\\n\"} 1"),
            "{text}"
        );
        // No value breaks a line: every line is a comment or one sample.
        for line in text.lines() {
            assert!(
                line.starts_with("# HELP ")
                    || line.starts_with("# TYPE ")
                    || line.starts_with("nightshift_"),
                "{line:?} in {text}"
            );
        }
    }

    #[test]
    fn gpu_samples_are_gauges_per_worker_and_device() {
        let m = Metrics::default();
        let g = |index, busy| GpuSample {
            index,
            utilization_percent: busy,
            memory_used_bytes: 10,
            memory_total_bytes: 80,
        };
        m.record_worker("w\"1", &[g(0, 97), g(1, 50)], &[], Some(2));
        let text = m.render(&StoreMetrics::default());
        assert!(
            text.contains("nightshift_worker_gpu_busy_ratio{worker=\"w\\\"1\",gpu=\"0\"} 0.97"),
            "{text}"
        );
        assert!(text.contains("nightshift_worker_gpu_busy_ratio{worker=\"w\\\"1\",gpu=\"1\"} 0.5"));
        assert!(
            text.contains(
                "nightshift_worker_gpu_memory_total_bytes{worker=\"w\\\"1\",gpu=\"1\"} 80"
            )
        );
        // The next samples replace the last ones.
        m.record_worker("w\"1", &[g(0, 10)], &[], None);
        let text = m.render(&StoreMetrics::default());
        assert!(!text.contains("gpu=\"1\""), "{text}");
    }

    #[test]
    fn costs_are_one_series_per_job() {
        let cost = nightshift_proto::wire::CostView {
            gpu_seconds: 7.5,
            spot_seconds: 3.0,
            on_demand_seconds: 1.0,
            unknown_seconds: 0.0,
            lost_seconds: 0.5,
            dollars: Some(0.25),
            dollars_per_million_rows: None,
            unpriced_seconds: 0.0,
        };
        let text = render_costs(&[(4, cost)]);
        assert!(
            text.contains("nightshift_job_gpu_seconds{job=\"4\"} 7.5"),
            "{text}"
        );
        assert!(
            text.contains("nightshift_job_machine_seconds{job=\"4\",capacity=\"spot\"} 3"),
            "{text}"
        );
        assert!(
            text.contains("nightshift_job_lost_seconds{job=\"4\"} 0.5"),
            "{text}"
        );
        assert!(
            text.contains("nightshift_job_cost_dollars{job=\"4\"} 0.25"),
            "{text}"
        );
    }

    #[test]
    fn rate_samples_keep_only_the_window() {
        let t0 = Instant::now();
        let mut samples = VecDeque::new();
        add_sample(&mut samples, t0, 100);
        add_sample(&mut samples, t0 + Duration::from_secs(31), 400);
        assert_eq!(samples.len(), 2);
        add_sample(&mut samples, t0 + RATE_WINDOW + Duration::from_secs(1), 700);
        let kept: Vec<u64> = samples.iter().map(|(_, rows)| *rows).collect();
        assert_eq!(kept, [400, 700], "the sample older than the window went");
        let m = Metrics::default();
        *m.samples.lock().unwrap() = samples;
        let rate = m.rows_per_second();
        assert!((rate - 10.0).abs() < 1e-9, "300 rows in 30 s, not {rate}/s");
    }
}
