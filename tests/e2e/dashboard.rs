//! The dashboard in a real headless browser (Debian's `chromium`, driven over WebDriver by
//! `chromedriver`; nothing downloads a browser): a wrong token is refused, the right one opens
//! the pages, the overview lists the job, the worker and the schedule, and a running job's
//! progress advances on its page by itself. Screenshots go to `target/tmp/dashboard/`.
//! Real processes: a coordinator, a worker, chromedriver and chromium.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator};
use hyper_util::client::legacy::connect::HttpConnector;
use nightshift_tests::cluster::{self, CoordinatorProc, SUBMIT_TOKEN, WorkerProc, paced};
use nightshift_tests::fixtures::{Fixture, spec_toml};
use nightshift_tests::process::{ChildGuard, free_port, output_text};
use serde_json::json;

const BIN: &str = env!("CARGO_BIN_EXE_nightshift");
/// Rows of the job the pages watch: enough that it runs for the whole test.
const ROWS: u64 = 1_000_000;
/// How long the page may take to show what the test waits for.
const PAGE_LIMIT: Duration = Duration::from_secs(90);
const POLL: Duration = Duration::from_millis(250);

/// The browser and its driver, found on `PATH` unless `CHROMIUM` / `CHROMEDRIVER` name them.
fn program(env: &str, name: &str) -> PathBuf {
    if let Ok(p) = std::env::var(env) {
        return PathBuf::from(p);
    }
    std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|dir| dir.join(name))
                .find(|p| p.is_file())
        })
        .unwrap_or_else(|| {
            panic!(
                "`{name}` is not installed: apt-get install chromium chromium-driver (.ci/run does)"
            )
        })
}

/// chromedriver on a free port, and a headless chromium session through it.
async fn browser(dir: &Path) -> (ChildGuard, Client) {
    let port = free_port();
    let mut cmd = std::process::Command::new(program("CHROMEDRIVER", "chromedriver"));
    cmd.arg(format!("--port={port}"));
    let driver = ChildGuard::spawn_logged(cmd, &dir.join("chromedriver.log"));
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = format!("http://127.0.0.1:{port}/status");
    while !reqwest::get(&status)
        .await
        .is_ok_and(|r| r.status().is_success())
    {
        assert!(Instant::now() < deadline, "chromedriver did not start");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let profile = dir.join("chromium-profile");
    let caps = json!({
        "browserName": "chrome",
        "goog:chromeOptions": {
            "binary": program("CHROMIUM", "chromium"),
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1280,900", "--lang=en-US",
                     format!("--user-data-dir={}", profile.display())],
        }
    });
    let client = ClientBuilder::new(HttpConnector::new())
        .capabilities(caps.as_object().unwrap().clone())
        .connect(&format!("http://127.0.0.1:{port}"))
        .await
        .expect("a chromium session");
    (driver, client)
}

async fn shows(client: &Client, css: &str) -> bool {
    match client.find(Locator::Css(css)).await {
        Ok(e) => e.is_displayed().await.unwrap_or(false),
        Err(_) => false,
    }
}

/// Waits until `css` is displayed.
async fn wait_shown(client: &Client, css: &str) {
    let deadline = Instant::now() + PAGE_LIMIT;
    while !shows(client, css).await {
        assert!(Instant::now() < deadline, "{css} never showed");
        tokio::time::sleep(POLL).await;
    }
}

async fn text(client: &Client, css: &str) -> String {
    client
        .find(Locator::Css(css))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

async fn rows_done(client: &Client) -> u64 {
    let progress = client.find(Locator::Css("#job-progress")).await.unwrap();
    let value = progress.attr("data-rows-done").await.unwrap();
    value.unwrap_or_default().parse().unwrap_or(0)
}

async fn screenshot(client: &Client, name: &str) {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard");
    std::fs::create_dir_all(&dir).unwrap();
    let png = client.screenshot().await.unwrap();
    assert!(png.starts_with(b"\x89PNG"), "{name} is not a PNG");
    std::fs::write(dir.join(format!("{name}.png")), png).unwrap();
}

async fn log_in(client: &Client, base: &str, token: &str) {
    client.goto(&format!("{base}/")).await.unwrap();
    wait_shown(client, "#login-section").await;
    let field = client.find(Locator::Css("#token")).await.unwrap();
    field.send_keys(token).await.unwrap();
    client
        .find(Locator::Css("#login-submit"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
}

/// The job, submitted; and a nightly schedule, so the overview has one to show.
async fn submit_work(f: &Fixture, c: &CoordinatorProc) -> String {
    let model = f.model("m.onnx", &["--dim", "8", "--hidden", "256"]);
    let rows = ROWS.to_string();
    let data = f.data(
        "in",
        &[
            "--rows",
            &rows,
            "--files",
            "4",
            "--row-group-rows",
            "25000",
            "--dim",
            "8",
        ],
    );
    let input = format!("{}/*.parquet", data.display());
    let extra = "[batch]\nsize = 1024\n[shards]\nrows = 50000\ncheckpoint_rows = 5000\n";
    let toml = spec_toml("watched", &input, &model, &f.path("out"), extra);
    let spec = f.spec("watched.toml", &toml);
    let out = cluster::submit(
        Path::new(BIN),
        f.dir.path(),
        &c.url(),
        &spec,
        &["--token", SUBMIT_TOKEN],
        &[],
    );
    assert!(out.status.success(), "{}", output_text(&out));
    let nightly = toml
        .replace("/out\"", "/nightly/{{ date }}/\"")
        .replace("\"watched\"", "\"nightly\"");
    let resp = reqwest::Client::new()
        .post(format!("{}/v1/schedules", c.url()))
        .bearer_auth(SUBMIT_TOKEN)
        .json(&json!({"name": "nightly", "cron": "0 2 * * *", "timezone": "Europe/Berlin", "spec": nightly}))
        .send()
        .await
        .unwrap();
    assert_eq!(
        resp.status().as_u16(),
        201,
        "{}",
        resp.text().await.unwrap()
    );
    "1".into()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_dashboard_logs_in_shows_the_work_and_refreshes_itself() {
    let started = Instant::now();
    let f = Fixture::new();
    let db = format!("sqlite://{}", f.path("state/nightshift.db").display());
    let allow = f.allow_uri();
    let c = CoordinatorProc::start(
        Path::new(BIN),
        f.dir.path(),
        "coordinator",
        &db,
        &["--allow-uri", &allow],
        &[],
    );
    let job = submit_work(&f, &c).await;
    let _worker = WorkerProc::start(
        Path::new(BIN),
        f.dir.path(),
        "w1",
        &c.url(),
        &["--slots", "1", "--threads", "1"],
        // At most 5,120 rows/s (200 ms a 1,024-row batch): the job outlasts the browser's
        // work (about a minute under load), whatever the machine, and is cancelled at the end.
        &[paced(200)],
    );
    let (_driver, client) = browser(f.dir.path()).await;
    let base = c.url();

    // A wrong token is refused, and the data stays closed.
    log_in(&client, &base, "not-the-token").await;
    wait_shown(&client, "#login-error").await;
    assert!(
        client
            .current_url()
            .await
            .unwrap()
            .as_str()
            .ends_with("/?login=refused")
    );
    assert!(
        !shows(&client, "#app").await,
        "the app shows after a refused login"
    );
    screenshot(&client, "login-refused").await;
    // A worker token is no login either.
    log_in(&client, &base, nightshift_tests::cluster::WORKER_TOKEN).await;
    wait_shown(&client, "#login-error").await;

    // The right one opens the overview: the job, the worker and the schedule.
    log_in(&client, &base, SUBMIT_TOKEN).await;
    wait_shown(&client, &format!("#jobs tr[data-job-id='{job}']")).await;
    wait_shown(&client, "#workers tr[data-worker-id='w1']").await;
    wait_shown(&client, "#schedules tr[data-schedule='nightly']").await;
    let cookies = client
        .execute("return document.cookie", vec![])
        .await
        .unwrap();
    assert!(
        !cookies.to_string().contains("nightshift_session"),
        "the login cookie is readable by scripts: {cookies}"
    );
    let row = text(&client, &format!("#jobs tr[data-job-id='{job}']")).await;
    assert!(row.contains("watched"), "{row}");
    screenshot(&client, "overview").await;

    // The job's page: its progress advances with no reload.
    client.goto(&format!("{base}/#/jobs/{job}")).await.unwrap();
    wait_shown(&client, "#job-page").await;
    let deadline = Instant::now() + PAGE_LIMIT;
    let first = loop {
        let done = rows_done(&client).await;
        if done > 0 {
            break done;
        }
        assert!(
            Instant::now() < deadline,
            "the job page never showed rows done"
        );
        tokio::time::sleep(POLL).await;
    };
    eprintln!(
        "dashboard: {first} rows done when the job page first showed them, {:.1} s in",
        started.elapsed().as_secs_f64()
    );
    let later = loop {
        let done = rows_done(&client).await;
        if done > first {
            break done;
        }
        assert!(Instant::now() < deadline, "progress stayed at {first} rows");
        tokio::time::sleep(POLL).await;
    };
    assert!(later <= ROWS, "{later}");
    eprintln!(
        "dashboard: then {later}, {:.1} s in",
        started.elapsed().as_secs_f64()
    );
    let segments = client
        .find_all(Locator::Css("#shard-strip [data-shard-id]"))
        .await
        .unwrap();
    assert_eq!(
        segments.len() as u64,
        ROWS / 50_000,
        "one strip segment per shard"
    );
    wait_shown(&client, "#throughput rect").await;
    assert!(text(&client, "#job-progress").await.contains('/'));
    screenshot(&client, "job").await;

    // Logging out closes the data again.
    client.goto(&format!("{base}/")).await.unwrap();
    wait_shown(&client, "#logout").await;
    client
        .find(Locator::Css("#logout"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    wait_shown(&client, "#login-section").await;
    client.close().await.unwrap();
    let status = reqwest::Client::new()
        .post(format!("{base}/v1/jobs/{job}/cancel"))
        .bearer_auth(SUBMIT_TOKEN)
        .send()
        .await
        .unwrap()
        .status();
    assert!(status.is_success(), "{status}");
}
