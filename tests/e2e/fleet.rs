//! The fleet scaler against moto's EC2 emulation: a job arrives and `nightshift scaler` buys
//! spot instances from a launch template made from `deploy/ec2/user-data.sh`; local worker
//! processes stand in for the instances (started when an instance appears, told its id, type
//! and capacity type); one instance is reclaimed mid-job (its worker killed, the instance
//! terminated, as EC2 does) while spot capacity runs out, and the scaler replaces it with an
//! on-demand instance; when the queue is empty the scaler drains the workers and terminates
//! their instances. Every row is done once, and the job's cost splits spot and on-demand time.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Once;
use std::time::{Duration, Instant};

use aws_config::{BehaviorVersion, Region};
use nightshift_fleet::{Ec2Config, Ec2Provider, Instance, LaunchTemplate, Provider};
use nightshift_proto::wire::JobView;
use nightshift_proto::{CapacityType, JobState};
use nightshift_tests::S3Server;
use nightshift_tests::cluster::{CoordinatorProc, SUBMIT_TOKEN, WorkerProc, submit};
use nightshift_tests::ec2_proxy::SpotRefusal;
use nightshift_tests::fixtures::Fixture;
use nightshift_tests::process::{ChildGuard, free_port, nightshift};
use nightshift_tests::s3::{ACCESS_KEY_ID, REGION, SECRET_ACCESS_KEY};
use nightshift_tests::verify::verify_output;

const BIN: &str = env!("CARGO_BIN_EXE_nightshift");
const FLEET: &str = "e2e-fleet";
const TEMPLATE: &str = "nightshift-e2e-workers";
const INSTANCE_TYPES: [&str; 2] = ["g5.xlarge", "g4dn.xlarge"];
const ROWS: u64 = 48_000;
const MAX_WORKERS: usize = 3;
/// Each model call sleeps this long in the stand-in workers, so the job lasts long enough to
/// be watched (and a worker's speed is known).
const CALL_DELAY: &str = "model-run-delay=sleep(150)";
/// The whole scenario must end within this.
const LIMIT: Duration = Duration::from_secs(180);

/// The provider reads credentials from the usual AWS chain: set them once, before any thread
/// of this test process reads the environment.
fn aws_env() {
    static ENV: Once = Once::new();
    ENV.call_once(|| {
        // SAFETY: called first in the only test of this binary, before it starts threads.
        unsafe {
            std::env::set_var("AWS_ACCESS_KEY_ID", ACCESS_KEY_ID);
            std::env::set_var("AWS_SECRET_ACCESS_KEY", SECRET_ACCESS_KEY);
            std::env::set_var("AWS_EC2_METADATA_DISABLED", "true");
        }
    });
}

/// An AMI moto knows (CreateFleet refuses unknown ones).
async fn moto_ami(endpoint: &str) -> String {
    let sdk = aws_config::defaults(BehaviorVersion::latest())
        .region(Region::new(REGION))
        .endpoint_url(endpoint)
        .load()
        .await;
    let images = aws_sdk_ec2::Client::new(&sdk)
        .describe_images()
        .owners("amazon")
        .send()
        .await
        .expect("DescribeImages");
    images.images()[0]
        .image_id()
        .expect("an image id")
        .to_string()
}

/// The local worker processes standing in for the fleet's instances.
struct StandIns {
    workers: BTreeMap<String, WorkerProc>,
    seen: BTreeMap<String, Instance>,
}

impl StandIns {
    /// Starts a worker for each instance that appeared; stops (SIGTERM, as a shutdown does)
    /// the worker of each instance that went away and is still running.
    fn sync(&mut self, instances: &[Instance], f: &Fixture, coordinator: &str) {
        for i in instances {
            if self.seen.contains_key(&i.id) {
                continue;
            }
            self.seen.insert(i.id.clone(), i.clone());
            let worker = WorkerProc::start(
                Path::new(BIN),
                f.dir.path(),
                &i.id,
                coordinator,
                &[
                    "--instance-id",
                    &i.id,
                    "--instance-type",
                    &i.instance_type,
                    "--capacity-type",
                    i.capacity_type.as_str(),
                    "--spot-metadata",
                    "off",
                    "--drain-timeout",
                    "20s",
                ],
                &[
                    ("FAILPOINTS".to_string(), CALL_DELAY.to_string()),
                    (
                        "RUST_LOG".to_string(),
                        "warn,nightshift_worker=info".to_string(),
                    ),
                ],
            );
            self.workers.insert(i.id.clone(), worker);
        }
        for (id, w) in &mut self.workers {
            if !instances.iter().any(|i| &i.id == id) && w.child.running() {
                w.child.signal("TERM");
            }
        }
    }
}

fn job_view(c: &CoordinatorProc, name: &str) -> Option<JobView> {
    let mut cmd = nightshift(Path::new(BIN));
    cmd.args([
        "status",
        name,
        "--json",
        "--coordinator",
        &c.url(),
        "--token",
        SUBMIT_TOKEN,
    ]);
    let out = nightshift_tests::process::run(cmd, Duration::from_secs(30));
    serde_json::from_slice(&out.stdout).ok()
}

fn scaler_metrics(port: u16) -> String {
    let url = format!("http://127.0.0.1:{port}/metrics");
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async { reqwest::get(&url).await.ok()?.text().await.ok() })
        .unwrap_or_default()
}

/// The value of one series in Prometheus text, 0 when absent.
fn series(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or(0.0)
}

#[test]
fn the_scaler_buys_spot_replaces_a_reclaim_on_demand_and_drains_the_fleet_away() {
    aws_env();
    let f = Fixture::new();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let moto = rt.block_on(S3Server::start()).expect("moto starts");
    let proxy = SpotRefusal::start(moto.addr()).expect("proxy starts");
    let ami = rt.block_on(moto_ami(&moto.endpoint()));
    let job = f.job(
        "fleet",
        &[
            "--rows",
            &ROWS.to_string(),
            "--files",
            "4",
            "--row-group-rows",
            "1000",
        ],
        &[],
        "[batch]\nsize = 200\n[shards]\nrows = 2000\ncheckpoint_rows = 1000\n",
    );
    let prices = f.spec(
        "prices.toml",
        "[prices.\"g5.xlarge\"]\nspot = 0.36\non-demand = 1.006\n\
         [prices.\"g4dn.xlarge\"]\nspot = 0.16\non-demand = 0.526\n",
    );
    let c = CoordinatorProc::start(
        Path::new(BIN),
        f.dir.path(),
        "coord",
        &f.path("coord.db").display().to_string(),
        &[
            "--allow-uri",
            &f.allow_uri(),
            "--lease-ttl",
            "3s",
            "--price-table",
            &prices.display().to_string(),
        ],
        &[],
    );
    let metrics_port = free_port();
    let user_data = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/ec2/user-data.sh");
    let mut scaler_cmd = nightshift(Path::new(BIN));
    scaler_cmd.args([
        "scaler",
        "--coordinator",
        &c.url(),
        "--token",
        SUBMIT_TOKEN,
        "--provider",
        "ec2",
        "--fleet-name",
        FLEET,
        "--min-workers",
        "0",
        "--max-workers",
        &MAX_WORKERS.to_string(),
        "--stabilization",
        "4s",
        "--target-drain",
        "10s",
        "--boot-time",
        "2s",
        "--default-rows-per-s",
        "500",
        "--lost-after",
        "8s",
        "--launch-backoff",
        "2s",
        "--launch-backoff-max",
        "8s",
        "--interval",
        "500ms",
        "--listen",
        &format!("127.0.0.1:{metrics_port}"),
        "--region",
        REGION,
        "--ec2-endpoint",
        &proxy.endpoint(),
        "--launch-template",
        TEMPLATE,
        "--image-id",
        &ami,
        "--user-data",
        &user_data.display().to_string(),
        "--instance-type",
        INSTANCE_TYPES[0],
        "--instance-type",
        INSTANCE_TYPES[1],
    ]);
    scaler_cmd.env("RUST_LOG", "info");
    let scaler_log = f.path("scaler.log");
    let mut scaler = ChildGuard::spawn_logged(scaler_cmd, &scaler_log);
    let read_scaler = || std::fs::read_to_string(&scaler_log).unwrap_or_default();

    // What the test sees of the fleet: straight from moto, not through the refusing proxy.
    let watch = || {
        rt.block_on(Ec2Provider::connect(Ec2Config {
            fleet_name: FLEET.into(),
            region: REGION.into(),
            endpoint: Some(moto.endpoint()),
            launch_template: LaunchTemplate::Existing {
                name: TEMPLATE.into(),
            },
            instance_types: INSTANCE_TYPES.iter().map(|t| t.to_string()).collect(),
            subnets: Vec::new(),
            on_demand_fallback: true,
        }))
        .ok()
    };
    let ec2 = watch();
    let out = submit(
        Path::new(BIN),
        f.dir.path(),
        &c.url(),
        &job.spec,
        &["--token", SUBMIT_TOKEN],
        &[],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let mut stand_ins = StandIns {
        workers: BTreeMap::new(),
        seen: BTreeMap::new(),
    };
    let mut ec2 = ec2;
    let started = Instant::now();
    let mut first_wave: Vec<Instance> = Vec::new();
    let mut interrupted: Option<String> = None;
    let mut replacement: Option<Instance> = None;
    let mut succeeded = false;
    loop {
        assert!(
            started.elapsed() < LIMIT,
            "the fleet did not scale up, replace and drain away in time;\nscaler: {}",
            read_scaler()
        );
        assert!(
            scaler.try_wait().is_none(),
            "the scaler exited: {}",
            read_scaler()
        );
        // The template exists once the scaler started; connect then.
        if ec2.is_none() {
            ec2 = watch();
            std::thread::sleep(Duration::from_millis(250));
            continue;
        }
        let provider = ec2.as_ref().unwrap();
        let instances = rt.block_on(provider.list()).expect("list the fleet");
        stand_ins.sync(&instances, &f, &c.url());
        let view = job_view(&c, "fleet");
        let rows_done = view.as_ref().map_or(0, |v| v.rows_done);
        if first_wave.is_empty() && instances.len() == MAX_WORKERS {
            first_wave = instances.clone();
        }
        // A reclaim mid-job, while spot capacity is short: the worker dies with its instance.
        if interrupted.is_none() && !first_wave.is_empty() && rows_done >= ROWS / 5 {
            let victim = first_wave[0].id.clone();
            proxy.set_refusing(true);
            stand_ins.workers.get_mut(&victim).unwrap().child.kill();
            rt.block_on(provider.terminate(std::slice::from_ref(&victim)))
                .unwrap();
            interrupted = Some(victim);
        }
        if interrupted.is_some() && replacement.is_none() {
            replacement = instances
                .iter()
                .find(|i| !first_wave.iter().any(|w| w.id == i.id))
                .cloned();
            if replacement.is_some() {
                proxy.set_refusing(false);
            }
        }
        succeeded |= view
            .as_ref()
            .is_some_and(|v| v.state == JobState::Succeeded);
        let all_exited = stand_ins.workers.values_mut().all(|w| !w.child.running());
        if succeeded && replacement.is_some() && instances.is_empty() && all_exited {
            break;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    let took = started.elapsed();
    let metrics = scaler_metrics(metrics_port);
    scaler.signal("TERM");
    let _ = scaler.wait_for(Duration::from_secs(10));
    let log = read_scaler();

    // Scale-up: the first wave is spot, of the configured types.
    assert_eq!(first_wave.len(), MAX_WORKERS, "{log}");
    for i in &first_wave {
        assert_eq!(i.capacity_type, CapacityType::Spot, "{i:?}");
        assert!(INSTANCE_TYPES.contains(&i.instance_type.as_str()), "{i:?}");
    }
    assert!(
        log.contains("reason=\"backlog\"") || log.contains("reason=backlog"),
        "{log}"
    );
    // The reclaim was replaced on demand, because spot was refused.
    let replacement = replacement.unwrap();
    assert_eq!(
        replacement.capacity_type,
        CapacityType::OnDemand,
        "{replacement:?}"
    );
    assert!(proxy.refused() >= 1, "the proxy refused no spot request");
    assert!(
        series(&metrics, "nightshift_scaler_spot_refusals_total ") >= 1.0,
        "{metrics}"
    );
    assert!(
        series(
            &metrics,
            "nightshift_scaler_launched_total{capacity_type=\"on-demand\"}"
        ) >= 1.0,
        "{metrics}"
    );
    // Scale-down: the surviving workers were asked to drain, exited cleanly, and their
    // instances were terminated only then.
    let drained: Vec<String> = stand_ins
        .workers
        .keys()
        .filter(|id| Some(*id) != interrupted.as_ref())
        .cloned()
        .collect();
    assert!(
        drained.len() >= MAX_WORKERS,
        "{:?}",
        stand_ins.workers.keys()
    );
    for id in &drained {
        let w = stand_ins.workers.get_mut(id).unwrap();
        let text = w.log_text();
        assert!(
            text.contains("the coordinator asked this worker to drain"),
            "{id}: {text}"
        );
        assert!(w.child.try_wait().unwrap().success(), "{id}: {text}");
    }
    assert!(
        series(
            &metrics,
            "nightshift_scaler_terminated_total{reason=\"drained\"}"
        ) >= MAX_WORKERS as f64,
        "{metrics}"
    );
    // Every row once, and the cost of both kinds of capacity.
    verify_output(job.out.to_str().unwrap(), &job.input, &job.model, 1000, &[]).assert_exact(&[]);
    let view = job_view(&c, "fleet").expect("the job's status");
    let cost = view.cost.expect("a cost in the status");
    assert!(
        cost.spot_seconds > 0.0 && cost.on_demand_seconds > 0.0,
        "{cost:?}"
    );
    assert!(cost.dollars.is_some_and(|d| d > 0.0), "{cost:?}");
    assert!(
        cost.dollars_per_million_rows.is_some_and(|d| d > 0.0),
        "{cost:?}"
    );
    assert_eq!(cost.unknown_seconds, 0.0, "{cost:?}");
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(job.out.join("_manifest.json")).unwrap()).unwrap();
    assert!(
        manifest["cost"]["spot_seconds"]
            .as_f64()
            .is_some_and(|s| s > 0.0),
        "{manifest}"
    );
    eprintln!(
        "fleet: {} spot + 1 on-demand instance, every worker drained and terminated in {took:?}; cost {cost}",
        first_wave.len()
    );
}
