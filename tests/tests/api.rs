//! The HTTP API of an in-process coordinator (real HTTP on 127.0.0.1, a real SQLite store):
//! idempotent submission, roles and tokens, the allow-list, cancel, readiness and metrics, and
//! stale fencing tokens refused on every lease write, and one S3 output spelled two ways owned once.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nightshift_coordinator::AllowList;
use nightshift_metastore::Metastore;
use nightshift_metastore::sqlite::SqliteStore;
use nightshift_proto::layout::{JOB_UID_KEY, OUTPUT_FILE_STEM, data_file};
use nightshift_proto::wire::{LeaseRef, PartRecord, ShardLease};
use nightshift_storage::Stores;
use nightshift_tests::api_server::{job, start, start_with};
use nightshift_tests::fixtures::{Fixture, spec_toml};
use nightshift_tests::parts::{part_path, write_part};
use nightshift_tests::s3::{S3Server, settings};
use nightshift_worker::client::{ClientError, CoordinatorClient};
use parquet::file::reader::{FileReader, SerializedFileReader};
use reqwest::StatusCode;

#[tokio::test(flavor = "multi_thread")]
async fn submission_is_idempotent_and_another_spec_with_the_key_is_a_conflict() {
    let f = Fixture::new();
    let api = start(&f, AllowList::everything(), 30_000).await;
    let toml = job(&f);
    let (s1, a) = api
        .submit(Some("S"), Some("nightly-2026-11-28"), &toml)
        .await;
    assert_eq!(s1, StatusCode::CREATED, "{a}");
    assert_eq!(a["created"], true);
    let (s2, b) = api
        .submit(Some("S"), Some("nightly-2026-11-28"), &toml)
        .await;
    assert_eq!(s2, StatusCode::OK, "{b}");
    assert_eq!(b["created"], false);
    assert_eq!(a["job"]["id"], b["job"]["id"]);
    // JSON body, same spec: still the same job.
    let spec = nightshift_proto::JobSpec::from_toml(&toml).unwrap();
    let resp = api
        .http
        .post(format!("{}/v1/jobs", api.url))
        .bearer_auth("S")
        .header("idempotency-key", "nightly-2026-11-28")
        .json(&spec)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let (s3, c) = api
        .submit(
            Some("S"),
            Some("nightly-2026-11-28"),
            &toml.replace("rows = 500", "rows = 1000"),
        )
        .await;
    assert_eq!(s3, StatusCode::CONFLICT, "{c}");
    assert_eq!(c["code"], "conflict");
    assert!(
        c["message"]
            .as_str()
            .unwrap()
            .contains("nightly-2026-11-28"),
        "{c}"
    );
    // The keys of schedules' jobs are theirs: a submitter can neither take nor block a fire.
    let (s, e) = api
        .submit(Some("S"), Some("schedule:nightly:1796000000000"), &toml)
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{e}");
    assert!(
        e["message"].as_str().unwrap().contains("`schedule:`"),
        "{e}"
    );
    // Without a key, every submission is a new job.
    let (s4, d) = api
        .submit(
            Some("S"),
            None,
            &toml
                .replace("api-job", "api-job-2")
                .replace("/out", "/out2"),
        )
        .await;
    assert_eq!(s4, StatusCode::CREATED, "{d}");
    assert_ne!(d["job"]["id"], a["job"]["id"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn every_endpoint_but_health_needs_the_right_role() {
    let f = Fixture::new();
    let api = start(&f, AllowList::everything(), 30_000).await;
    let toml = job(&f);
    assert_eq!(api.get(None, "/healthz").await.0, StatusCode::OK);
    assert_eq!(api.get(None, "/readyz").await.0, StatusCode::OK);
    // People's endpoints.
    assert_eq!(
        api.submit(None, None, &toml).await.0,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        api.submit(Some("nope"), None, &toml).await.0,
        StatusCode::UNAUTHORIZED
    );
    let (s, body) = api.submit(Some("W"), None, &toml).await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    assert_eq!(body["code"], "forbidden");
    for path in ["/v1/jobs", "/v1/jobs/1", "/metrics"] {
        assert_eq!(
            api.get(None, path).await.0,
            StatusCode::UNAUTHORIZED,
            "{path}"
        );
    }
    assert_eq!(
        api.get(Some("W"), "/v1/jobs").await.0,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        api.submit(Some("S"), None, &toml).await.0,
        StatusCode::CREATED
    );
    assert_eq!(
        api.get(Some("S"), "/v1/jobs/api-job").await.0,
        StatusCode::OK
    );
    assert_eq!(
        api.get(Some("S"), "/v1/jobs/404").await.0,
        StatusCode::NOT_FOUND
    );
    // Workers' endpoints.
    let body = serde_json::json!({"worker_id": "w", "max": 1});
    let lease = |token: Option<&'static str>| {
        let mut r = api
            .http
            .post(format!("{}/v1/worker/lease", api.url))
            .json(&body);
        if let Some(t) = token {
            r = r.bearer_auth(t);
        }
        r.send()
    };
    assert_eq!(
        lease(None).await.unwrap().status(),
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        lease(Some("S")).await.unwrap().status(),
        StatusCode::FORBIDDEN
    );
    assert_eq!(lease(Some("W")).await.unwrap().status(), StatusCode::OK);
    // Metrics in Prometheus text, for either role.
    let (s, text) = api.get(Some("W"), "/metrics").await;
    assert_eq!(s, StatusCode::OK);
    for name in [
        "nightshift_pending_shards",
        "nightshift_pending_rows",
        "nightshift_leased_shards 1",
        "nightshift_workers_seen 1",
        "nightshift_lease_claim_seconds_bucket",
        "nightshift_api_request_seconds_count{route=\"/v1/worker/lease\"}",
    ] {
        assert!(text.contains(name), "{name} missing from:\n{text}");
    }
    assert!(!text.contains("W\n") && !text.contains("Bearer"));
}

#[tokio::test(flavor = "multi_thread")]
async fn uris_outside_the_allow_list_are_refused() {
    let f = Fixture::new();
    let toml = job(&f);
    let api = start(&f, AllowList::default(), 30_000).await;
    let (s, body) = api.submit(Some("S"), None, &toml).await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{body}");
    assert_eq!(body["code"], "uri_not_allowed");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("local paths are not allowed"),
        "{body}"
    );
    drop(api);
    let allowed = f.path("in").display().to_string();
    let api = start(&f, AllowList::new(vec![allowed]), 30_000).await;
    let (s, body) = api.submit(Some("S"), None, &toml).await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{body}");
    assert!(
        body["message"].as_str().unwrap().contains("model.uri"),
        "the model lies outside the list: {body}"
    );
    let sneaky = toml.replace(
        &format!("{}/*.parquet", f.path("in").display()),
        &format!("{}/../m.onnx", f.path("in").display()),
    );
    let (s, body) = api.submit(Some("S"), None, &sneaky).await;
    assert_eq!(
        s,
        StatusCode::FORBIDDEN,
        "`..` does not escape the list: {body}"
    );
    // A schedule's jobs pass the same list: refused when it is made, not at every fire.
    let out = f.path("out").display().to_string();
    let template = toml.replace(&out, &format!("{out}/{{{{ date }}}}"));
    let schedule = serde_json::json!({"name": "nightly", "cron": "0 2 * * *", "spec": template});
    let made = api
        .http
        .post(format!("{}/v1/schedules", api.url))
        .bearer_auth("S")
        .json(&schedule)
        .send()
        .await
        .unwrap();
    assert_eq!(made.status(), StatusCode::FORBIDDEN);
    let body: serde_json::Value = made.json().await.unwrap();
    assert!(
        body["message"].as_str().unwrap().contains("model.uri"),
        "{body}"
    );
    let relative = toml.replace(&f.path("in").display().to_string(), "in");
    let (s, body) = api.submit(Some("S"), None, &relative).await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{body}");
    assert!(
        body["message"].as_str().unwrap().contains("absolute"),
        "{body}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn stale_tokens_are_refused_on_every_lease_write_and_cancel_reaches_heartbeats() {
    let f = Fixture::new();
    let api = start(&f, AllowList::everything(), 300).await;
    let (s, _) = api.submit(Some("S"), None, &job(&f)).await;
    assert_eq!(s, StatusCode::CREATED);
    let old = CoordinatorClient::new(&api.url, "W").for_worker("slow");
    let first = old.lease("slow", 1).await.unwrap().leases.remove(0);
    let stale = first.lease_ref();
    // One heartbeat: the coordinator now remembers the grant (`lease_check::Grants`), so the
    // refusals below must come from the store's guarded writes, not from reading it afresh.
    let hb = old
        .heartbeat("slow", vec![stale], Vec::new(), Vec::new(), None)
        .await
        .unwrap();
    assert_eq!(hb.leases[0].state, nightshift_proto::LeaseState::Held);
    // No more heartbeats: the lease expires, the reaper returns it, another worker gets it.
    let new = CoordinatorClient::new(&api.url, "W").for_worker("fast");
    let mut second = None;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let got = new.lease("fast", 10).await.unwrap().leases;
        if let Some(l) = got.into_iter().find(|l| l.shard_id == first.shard_id) {
            second = Some(l);
            break;
        }
    }
    let second = second.expect("expired shard granted again");
    assert!(second.token > first.token);
    let part = write_part(&second, 0, 10);
    let lost = |r: Result<(), ClientError>| matches!(r, Err(ClientError::LeaseLost(_)));
    assert!(lost(
        old.checkpoint(stale, write_part(&first, 0, 10), None).await
    ));
    assert!(lost(old.complete(stale).await));
    assert!(lost(old.release(stale).await));
    assert!(lost(
        old.fail(stale, nightshift_proto::FailureClass::Retryable, "x".into())
            .await
    ));
    let hb = old
        .heartbeat("slow", vec![stale], Vec::new(), Vec::new(), None)
        .await
        .unwrap();
    assert_eq!(hb.leases[0].state, nightshift_proto::LeaseState::Lost);
    // The current holder's writes go through; a cancel shows up in its next heartbeat, even
    // right after a heartbeat that extended the lease (so the coordinator would otherwise
    // answer from memory, `lease_check::renew_every`).
    let current = second.lease_ref();
    new.checkpoint(current, part, Some(500)).await.unwrap();
    let hb = new
        .heartbeat("fast", vec![current], Vec::new(), Vec::new(), None)
        .await
        .unwrap();
    assert_eq!(hb.leases[0].state, nightshift_proto::LeaseState::Held);
    let cancel = api
        .http
        .post(format!("{}/v1/jobs/api-job/cancel", api.url))
        .bearer_auth("S")
        .send()
        .await
        .unwrap();
    assert_eq!(cancel.status(), StatusCode::OK);
    let hb = new
        .heartbeat("fast", vec![current], Vec::new(), Vec::new(), None)
        .await
        .unwrap();
    assert_eq!(hb.leases[0].state, nightshift_proto::LeaseState::Cancelled);
    // A write for a job that stopped is told so by its code, not by the message's wording.
    let stopped = new
        .checkpoint(current, write_part(&second, 10, 10), None)
        .await;
    assert!(
        matches!(stopped, Err(ClientError::JobNotRunning(_))),
        "{stopped:?}"
    );
    assert!(
        new.lease("fast", 10).await.unwrap().leases.is_empty(),
        "a cancelled job grants nothing"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn complete_many_answers_each_lease_in_order() {
    let f = Fixture::new();
    let api = start(&f, AllowList::everything(), 30_000).await;
    // Shards of one row group each; checkpoint all but the last before completing.
    let (s, _) = api.submit(Some("S"), None, &job(&f)).await;
    assert_eq!(s, StatusCode::CREATED);
    let w = CoordinatorClient::new(&api.url, "W").for_worker("batch");
    let leases = w.lease("batch", 10).await.unwrap().leases;
    assert_eq!(leases.len(), 4);
    let refs: Vec<LeaseRef> = leases.iter().map(|l| l.lease_ref()).collect();
    for (l, r) in leases.iter().zip(&refs).take(3) {
        w.checkpoint(*r, write_part(l, 0, l.plan.rows), None)
            .await
            .unwrap();
    }
    let stale = LeaseRef {
        token: refs[0].token - 1,
        ..refs[0]
    };
    let answers = w
        .complete_many(vec![refs[0], refs[1], refs[3], stale, refs[2]])
        .await
        .unwrap();
    assert!(
        answers[0].is_ok() && answers[1].is_ok() && answers[4].is_ok(),
        "{answers:?}"
    );
    assert!(
        matches!(&answers[2], Err(ClientError::Refused { status: 409, message, .. }) if message.contains("cannot complete")),
        "{answers:?}"
    );
    assert!(
        matches!(answers[3], Err(ClientError::LeaseLost(_))),
        "{answers:?}"
    );
    let too_many = api
        .http
        .post(format!("{}/v1/worker/complete-many", api.url))
        .bearer_auth("W")
        .json(&serde_json::json!({"worker_id": "batch", "leases": vec![refs[0]; 257]}))
        .send()
        .await
        .unwrap();
    assert_eq!(too_many.status(), StatusCode::BAD_REQUEST);
}

#[tokio::test(flavor = "multi_thread")]
async fn status_and_metrics_show_which_worker_holds_the_jobs_model() {
    use nightshift_proto::wire::LoadedModel;
    let f = Fixture::new();
    let api = start(&f, AllowList::everything(), 30_000).await;
    let (s, submitted) = api.submit(Some("S"), None, &job(&f)).await;
    assert_eq!(s, StatusCode::CREATED);
    let model_uri = f.path("m.onnx").display().to_string();
    let w1 = CoordinatorClient::new(&api.url, "W").for_worker("w1");
    let lease = w1.lease("w1", 1).await.unwrap().leases.remove(0);
    let loaded = |uri: &str, device: &str| LoadedModel {
        uri: uri.into(),
        device: device.into(),
    };
    let models = vec![
        loaded(&model_uri, "cuda:1"),
        loaded("s3://other/model.onnx", "cpu"),
    ];
    w1.heartbeat(
        "w1",
        vec![lease.lease_ref()],
        Vec::new(),
        models.clone(),
        None,
    )
    .await
    .unwrap();
    // A worker that holds none of the leases it names is not remembered: else any number of
    // made-up worker ids would each keep a report in the coordinator's memory.
    let stranger = CoordinatorClient::new(&api.url, "W").for_worker("stranger");
    let beat = stranger
        .heartbeat(
            "stranger",
            vec![lease.lease_ref()],
            Vec::new(),
            models,
            None,
        )
        .await
        .unwrap();
    assert_eq!(beat.leases[0].state, nightshift_proto::LeaseState::Lost);
    let (_, text) = api.get(Some("S"), "/v1/jobs/api-job").await;
    let view: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(
        view["model_held_by"],
        serde_json::json!([{"worker": "w1", "device": "cuda:1"}]),
        "only the job's own model: {view}"
    );
    assert!(submitted["job"].get("model_held_by").is_none());
    let (_, metrics) = api.get(Some("W"), "/metrics").await;
    let line = format!(
        "nightshift_worker_model_loaded{{worker=\"w1\",model=\"{model_uri}\",device=\"cuda:1\"}} 1"
    );
    assert!(metrics.contains(&line), "{metrics}");
    assert!(!metrics.contains("stranger"), "{metrics}");
    // What a worker reports is checked like everything else it sends.
    for (bad, why) in [
        (loaded(&model_uri, "auto"), "device `auto`"),
        (loaded("", "cpu"), "model URI must be"),
        (loaded("m\u{1b}[2J.onnx", "cpu"), "models.uri"),
    ] {
        let err = w1
            .heartbeat("w1", vec![lease.lease_ref()], Vec::new(), vec![bad], None)
            .await
            .unwrap_err();
        match err {
            ClientError::Refused {
                status, message, ..
            } => {
                assert_eq!(status, 400, "{message}");
                assert!(message.contains(why), "{message}");
            }
            other => panic!("{other}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn jobs_are_listed_by_page_and_filter_and_bad_filters_are_refused() {
    let f = Fixture::new();
    let api = start(&f, AllowList::everything(), 30_000).await;
    let spec = job(&f);
    for (i, name) in ["alpha-1", "alpha-2", "beta-1"].iter().enumerate() {
        let toml = spec
            .replace("api-job", name)
            .replace("/out\"", &format!("/out{i}\""));
        let (s, body) = api.submit(Some("S"), None, &toml).await;
        assert_eq!(s, StatusCode::CREATED, "{body}");
    }
    let list = |query: &str| {
        let api = &api;
        let query = query.to_string();
        async move {
            let (s, text) = api.get(Some("S"), &format!("/v1/jobs?{query}")).await;
            (s, serde_json::from_str::<serde_json::Value>(&text).unwrap())
        }
    };
    let names = |v: &serde_json::Value| -> Vec<String> {
        v["jobs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|j| j["name"].as_str().unwrap().to_string())
            .collect()
    };
    let (_, page) = list("limit=2").await;
    assert_eq!(names(&page), ["beta-1", "alpha-2"]);
    let before = page["next_before"]
        .as_i64()
        .expect("a full page names the next");
    let (_, rest) = list(&format!("limit=2&before={before}")).await;
    assert_eq!(names(&rest), ["alpha-1"]);
    assert!(rest.get("next_before").is_none(), "{rest}");
    let (_, alpha) = list("name_prefix=alpha-&state=running").await;
    assert_eq!(names(&alpha), ["alpha-2", "alpha-1"]);
    let (_, none) = list("state=succeeded").await;
    assert!(names(&none).is_empty());
    for bad in [
        "state=sleeping",
        "limit=many",
        "colour=red",
        "limit=0",
        "limit=1001",
    ] {
        let (s, body) = list(bad).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{bad}: {body}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn past_max_running_jobs_a_job_waits_queued_and_starts_when_one_ends() {
    let f = Fixture::new();
    let sqlite = nightshift_metastore::sqlite::SqliteStore::open(&f.path("state/db.sqlite"))
        .await
        .unwrap();
    nightshift_metastore::Metastore::migrate(&sqlite)
        .await
        .unwrap();
    let mut config = nightshift_tests::api_server::config(AllowList::everything(), 30_000);
    config.max_running_jobs = Some(1);
    let api = nightshift_tests::api_server::serve(
        config,
        std::sync::Arc::new(sqlite),
        std::sync::Arc::new(nightshift_storage::Stores::default()),
    )
    .await;
    let spec = job(&f);
    for (i, name) in ["first", "second"].iter().enumerate() {
        let toml = spec
            .replace("api-job", name)
            .replace("/out\"", &format!("/out{i}\""));
        let (s, body) = api.submit(Some("S"), None, &toml).await;
        assert_eq!(s, StatusCode::CREATED, "{body}");
    }
    let state = |name: &'static str| {
        let api = &api;
        async move {
            let (_, text) = api.get(Some("S"), &format!("/v1/jobs/{name}")).await;
            let view: serde_json::Value = serde_json::from_str(&text).unwrap();
            view["state"].as_str().unwrap().to_string()
        }
    };
    let wait_for = |name: &'static str, want: &'static str| {
        let state = &state;
        async move {
            for _ in 0..100 {
                if state(name).await == want {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            panic!("{name} never became {want}: {}", state(name).await);
        }
    };
    wait_for("first", "running").await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(state("second").await, "queued", "one job runs at a time");
    let (_, text) = api.get(Some("S"), "/v1/jobs?state=queued").await;
    assert!(
        text.contains("\"second\"") && !text.contains("\"first\""),
        "{text}"
    );
    let cancel = api
        .http
        .post(format!("{}/v1/jobs/first/cancel", api.url))
        .bearer_auth("S")
        .send()
        .await
        .unwrap();
    assert_eq!(cancel.status(), StatusCode::OK);
    wait_for("second", "running").await;
    // A retried job counts against the limit like a new one.
    let (s, body) = api.post("S", "/v1/jobs/first/retry").await;
    assert_eq!(s, StatusCode::OK, "{body}");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(state("first").await, "queued", "one job runs at a time");
}

/// The dashboard's login: only a submit token makes a cookie, and the cookie opens only the
/// read-only routes of the submit role (a page elsewhere cannot cancel a job through it).
#[tokio::test(flavor = "multi_thread")]
async fn the_dashboard_cookie_opens_reads_only() {
    let f = Fixture::new();
    let api = start(&f, AllowList::everything(), 30_000).await;
    let (s, _) = api.submit(Some("S"), None, &job(&f)).await;
    assert_eq!(s, StatusCode::CREATED);
    let no_redirects = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let login = |token: &'static str| {
        no_redirects
            .post(format!("{}/ui/login", api.url))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(format!("token={token}"))
            .send()
    };
    for wrong in ["nope", "W"] {
        let resp = login(wrong).await.unwrap();
        assert_eq!(resp.status(), StatusCode::SEE_OTHER);
        assert_eq!(resp.headers()["location"], "/?login=refused");
        assert!(resp.headers().get("set-cookie").is_none(), "{wrong}");
    }
    let resp = login("S").await.unwrap();
    assert_eq!(resp.status(), StatusCode::SEE_OTHER);
    assert_eq!(resp.headers()["location"], "/");
    let set = resp.headers()["set-cookie"].to_str().unwrap().to_string();
    for attr in ["HttpOnly", "SameSite=Strict", "Path=/"] {
        assert!(set.contains(attr), "{set}");
    }
    // Over plain HTTP the browser must still keep it; behind an HTTPS proxy it is Secure.
    assert!(!set.contains("Secure"), "{set}");
    let proxied = no_redirects
        .post(format!("{}/ui/login", api.url))
        .header("content-type", "application/x-www-form-urlencoded")
        .header("x-forwarded-proto", "https")
        .body("token=S")
        .send()
        .await
        .unwrap();
    let secure = proxied.headers()["set-cookie"].to_str().unwrap();
    assert!(secure.contains("; Secure"), "{secure}");
    let cookie = set.split(';').next().unwrap().to_string();
    let with_cookie = |method: reqwest::Method, path: &str| {
        api.http
            .request(method, format!("{}{path}", api.url))
            .header("cookie", &cookie)
            .send()
    };
    for path in [
        "/v1/jobs",
        "/v1/jobs/1",
        "/v1/jobs/1/shards",
        "/v1/jobs/1/throughput",
        "/v1/workers",
        "/v1/schedules",
    ] {
        let status = with_cookie(reqwest::Method::GET, path)
            .await
            .unwrap()
            .status();
        assert_eq!(status, StatusCode::OK, "{path}");
    }
    for path in ["/v1/jobs/1/cancel", "/v1/jobs/1/retry", "/v1/jobs"] {
        let status = with_cookie(reqwest::Method::POST, path)
            .await
            .unwrap()
            .status();
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{path}");
    }
    assert_eq!(
        with_cookie(reqwest::Method::GET, "/metrics")
            .await
            .unwrap()
            .status(),
        StatusCode::UNAUTHORIZED
    );
    // The cookie holds no token; a forged one (a token as cookies once held it, a session
    // time moved on, or garbage) opens nothing.
    let value = cookie.split_once('=').unwrap().1;
    let (issued, tag) = value.split_once('.').expect("TIME.MAC");
    let moved = format!(
        "nightshift_session={}.{tag}",
        issued.parse::<u64>().unwrap() + 1
    );
    for forged in [
        format!("nightshift_session={}", hex::encode("S")),
        format!("nightshift_session={}", hex::encode("W")),
        moved,
        "nightshift_session=zz".into(),
    ] {
        let resp = api
            .http
            .get(format!("{}/v1/jobs", api.url))
            .header("cookie", forged.as_str())
            .send()
            .await
            .unwrap();
        assert_ne!(resp.status(), StatusCode::OK, "{forged}");
    }
    // The page itself loads without a token, and allows only its own script.
    let page = api.http.get(format!("{}/", api.url)).send().await.unwrap();
    assert_eq!(page.status(), StatusCode::OK);
    let csp = page.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(csp.contains("script-src 'self'"), "{csp}");
    assert!(page.text().await.unwrap().contains("/assets/app.js"));
    let logout = no_redirects
        .post(format!("{}/ui/logout", api.url))
        .send()
        .await
        .unwrap();
    assert!(
        logout.headers()["set-cookie"]
            .to_str()
            .unwrap()
            .contains("Max-Age=0")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_heartbeat_with_no_slots_or_too_many_is_refused() {
    let f = Fixture::new();
    let api = start(&f, AllowList::everything(), 30_000).await;
    for slots in [0, 1_000_000] {
        let body = serde_json::json!({"worker_id": "w", "leases": [], "slots": slots});
        let resp = api
            .http
            .post(format!("{}/v1/worker/heartbeat", api.url))
            .bearer_auth("W")
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
        let body: serde_json::Value = resp.json().await.unwrap();
        assert!(
            body["message"].as_str().unwrap().contains("slots"),
            "{body}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn specs_are_served_to_workers_by_hash_and_only_for_jobs_that_run() {
    let f = Fixture::new();
    let api = start(&f, AllowList::everything(), 30_000).await;
    let (s, submitted) = api.submit(Some("S"), None, &job(&f)).await;
    assert_eq!(s, StatusCode::CREATED);
    let hash = submitted["job"]["spec_hash"].as_str().unwrap().to_string();
    let get = |path: String, token: &'static str| {
        api.http
            .get(format!("{}{path}", api.url))
            .bearer_auth(token)
            .send()
    };
    let resp = get(format!("/v1/worker/specs/{hash}"), "W").await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let spec: nightshift_proto::JobSpec = resp.json().await.unwrap();
    assert_eq!(spec.hash(), hash);
    let cases = [
        (
            format!("/v1/worker/specs/{hash}"),
            "S",
            StatusCode::FORBIDDEN,
        ),
        (
            "/v1/worker/specs/not-a-hash".to_string(),
            "W",
            StatusCode::BAD_REQUEST,
        ),
        (
            format!("/v1/worker/specs/{}", "0".repeat(64)),
            "W",
            StatusCode::NOT_FOUND,
        ),
    ];
    for (path, token, want) in cases {
        assert_eq!(
            get(path.clone(), token).await.unwrap().status(),
            want,
            "{path}"
        );
    }
    // A cancelled job's spec is no longer served.
    let cancelled = api
        .http
        .post(format!(
            "{}/v1/jobs/{}/cancel",
            api.url, submitted["job"]["id"]
        ))
        .bearer_auth("S")
        .send()
        .await
        .unwrap();
    assert!(cancelled.status().is_success());
    let resp = get(format!("/v1/worker/specs/{hash}"), "W").await.unwrap();
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
}

/// A real Parquet part of `rows` rows (one `id` column) at `path`, its footer naming the
/// lease's job as workers' files do; its record, from `row_start`.
fn stamped_part(lease: &ShardLease, path: &Path, row_start: u64, rows: u64) -> PartRecord {
    use parquet::data_type::Int64Type;
    use parquet::file::metadata::KeyValue;
    use parquet::file::properties::WriterProperties;
    use parquet::file::writer::SerializedFileWriter;

    let schema =
        parquet::schema::parser::parse_message_type("message part { required int64 id; }").unwrap();
    let stamp = KeyValue::new(JOB_UID_KEY.to_string(), lease.job_uid.clone());
    let props = WriterProperties::builder()
        .set_key_value_metadata(Some(vec![stamp]))
        .build();
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let file = std::fs::File::create(path).unwrap();
    let mut writer = SerializedFileWriter::new(file, schema.into(), props.into()).unwrap();
    let mut group = writer.next_row_group().unwrap();
    let mut column = group.next_column().unwrap().unwrap();
    let ids: Vec<i64> = (0..rows as i64).collect();
    column
        .typed::<Int64Type>()
        .write_batch(&ids, None, None)
        .unwrap();
    column.close().unwrap();
    group.close().unwrap();
    writer.close().unwrap();
    PartRecord {
        uri: path.display().to_string(),
        row_start,
        rows,
        bytes: std::fs::metadata(path).unwrap().len(),
        error_rows: 0,
        error_uri: None,
        error_bytes: 0,
        tokens: None,
    }
}

/// A worker older than output names for merge work (`MergeFiles`) ignores them and writes
/// its merged file under the lease's own part name, as merge work did before them. While a
/// fleet is upgraded, its checkpoint is taken, and the commit publishes the file.
#[tokio::test(flavor = "multi_thread")]
async fn merge_work_of_a_worker_that_predates_output_names_is_committed_from_its_part_name() {
    let f = Fixture::new();
    let api = start(&f, AllowList::everything(), 30_000).await;
    let (s, body) = api.submit(Some("S"), None, &job(&f)).await;
    assert_eq!(s, StatusCode::CREATED, "{body}");
    let w = CoordinatorClient::new(&api.url, "W").for_worker("old");
    let leases = w.lease("old", 10).await.unwrap().leases;
    assert_eq!(leases.len(), 4, "the row shards");
    for l in &leases {
        let part = stamped_part(l, &part_path(l, 0, false), 0, l.plan.rows);
        w.checkpoint(l.lease_ref(), part, None).await.unwrap();
    }
    let refs = leases.iter().map(|l| l.lease_ref()).collect();
    let done = w.complete_many(refs).await.unwrap();
    assert!(done.iter().all(Result::is_ok), "{done:?}");
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut merged = 0;
    loop {
        let (_, view) = api.get(Some("S"), "/v1/jobs/api-job").await;
        if view.contains("\"state\":\"succeeded\"") {
            break;
        }
        assert!(Instant::now() < deadline, "the job did not commit: {view}");
        for l in w.lease("old", 10).await.unwrap().leases {
            let files = l.merge_files.expect("merge work, with output names");
            assert!(files.output.is_some(), "{files:?}");
            // As the old worker: the merged file under the lease's part name.
            let rows = l
                .merge
                .as_ref()
                .expect("its parts")
                .iter()
                .map(|p| p.rows)
                .sum();
            let part = stamped_part(&l, &part_path(&l, 0, false), 0, rows);
            w.checkpoint(l.lease_ref(), part, None).await.unwrap();
            w.complete(l.lease_ref()).await.unwrap();
            merged += 1;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(merged > 0, "no merge work was granted");
    let out = f.path("out");
    let published: i64 = (0..merged)
        .map(|i| {
            let path = out.join(data_file(OUTPUT_FILE_STEM, i));
            let file =
                std::fs::File::open(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            let reader = SerializedFileReader::new(file).unwrap();
            let meta = reader.metadata().file_metadata();
            let owner = meta
                .key_value_metadata()
                .unwrap()
                .iter()
                .find(|kv| kv.key == JOB_UID_KEY);
            assert_eq!(
                owner.and_then(|kv| kv.value.as_deref()),
                Some(leases[0].job_uid.as_str())
            );
            meta.num_rows()
        })
        .sum();
    assert_eq!(published, 2000, "every row, in the files the merges made");
}

#[tokio::test(flavor = "multi_thread")]
async fn one_s3_output_spelled_two_ways_is_owned_by_one_job() {
    let f = Fixture::new();
    let s3 = S3Server::start().await.expect("moto");
    s3.create_bucket("lake").await.unwrap();
    let data = f.data("in", &["--rows", "1000", "--files", "1"]);
    s3.upload_dir(&data, "s3://lake/in/").await.unwrap();
    let model = f.model("m.onnx", &[]);
    s3.put("s3://lake/m.onnx", std::fs::read(&model).unwrap())
        .await
        .unwrap();
    let sqlite = SqliteStore::open(&f.path("state/db.sqlite")).await.unwrap();
    sqlite.migrate().await.unwrap();
    let stores = Arc::new(Stores::new(settings(&s3.endpoint())));
    let api = start_with(Arc::new(sqlite), AllowList::everything(), 30_000, stores).await;
    let spec = |name: &str, out: &str| {
        let model = Path::new("s3://lake/m.onnx");
        spec_toml(name, "s3://lake/in/*.parquet", model, Path::new(out), "")
    };
    let (s, first) = api
        .submit(Some("S"), None, &spec("first", "s3a://lake/out/a/"))
        .await;
    assert_eq!(s, StatusCode::CREATED, "{first}");
    assert_eq!(first["job"]["output_uri"], "s3://lake/out/a", "{first}");
    // The same place in other spellings: the output is taken.
    for (i, out) in ["s3://lake/out/a", "s3://lake//out/a", "s3a://lake/out/a/b"]
        .into_iter()
        .enumerate()
    {
        let (s, body) = api
            .submit(Some("S"), None, &spec(&format!("second-{i}"), out))
            .await;
        assert_eq!(s, StatusCode::CONFLICT, "{out}: {body}");
        assert!(
            body["message"].as_str().unwrap().contains("overlaps"),
            "{out}: {body}"
        );
    }
}

/// Resuming a schedule that is not paused keeps a fire time that is due but not yet fired: no
/// scheduler runs here (the coordinator is built, not served), as after every replica was down.
#[tokio::test(flavor = "multi_thread")]
async fn resuming_a_schedule_that_is_not_paused_keeps_its_due_fire() {
    let f = Fixture::new();
    let sqlite = SqliteStore::open(&f.path("state/db.sqlite")).await.unwrap();
    sqlite.migrate().await.unwrap();
    let config = nightshift_tests::api_server::config(AllowList::everything(), 30_000);
    let coordinator =
        nightshift_coordinator::Coordinator::new(config, Arc::new(sqlite), Default::default());
    let service = coordinator.service();
    let out = f.path("out").display().to_string();
    let template = job(&f).replace(&out, &format!("{out}/{{{{ datetime }}}}"));
    let made = service
        .create_schedule(nightshift_proto::wire::ScheduleRequest {
            name: "often".into(),
            cron: "* * * * * *".into(),
            timezone: None,
            catch_up: Default::default(),
            spec: template,
        })
        .await
        .unwrap();
    let due = made.next_fire_at_ms.unwrap();
    // Past the fire time, and not fired: no scheduler runs.
    let now = || std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
    while (now().unwrap().as_millis() as i64) <= due + 100 {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let resumed = service.pause_schedule("often", false).await.unwrap();
    assert_eq!(
        resumed.next_fire_at_ms,
        Some(due),
        "the due fire time was skipped"
    );
    // A paused schedule resumes from its next fire time after now, as before.
    let paused = service.pause_schedule("often", true).await.unwrap();
    assert_eq!(paused.next_fire_at_ms, None);
    let resumed = service.pause_schedule("often", false).await.unwrap();
    assert!(resumed.next_fire_at_ms.unwrap() > due, "{resumed:?}");
}
