//! The fleet's side of the API on an in-process coordinator: what workers say about their
//! machines with their claims (checked), `GET /v1/fleet` (jobs' pending rows, shards and
//! deadlines, workers with their machines), `POST /v1/workers/{id}/drain` (the next claim and
//! heartbeat answer `drain`, no shard is granted, and the view shows the worker was told), and
//! a job's cost in its status and in `/metrics`.

use nightshift_coordinator::AllowList;
use nightshift_proto::wire::{LeaseRequest, WorkerView};
use nightshift_proto::{CapacityType, FleetView, InstanceInfo};
use nightshift_tests::api_server::{job, start};
use nightshift_tests::fixtures::Fixture;
use nightshift_worker::client::CoordinatorClient;
use reqwest::StatusCode;

fn claim(worker: &str, instance: Option<InstanceInfo>) -> LeaseRequest {
    LeaseRequest {
        worker_id: worker.into(),
        max: 1,
        instance,
        slots: Some(2),
        gpus: Some(1),
    }
}

fn spot(id: &str) -> InstanceInfo {
    InstanceInfo {
        id: id.into(),
        instance_type: "g5.xlarge".into(),
        capacity_type: CapacityType::Spot,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_fleet_view_shows_demand_and_machines_and_a_drain_reaches_the_worker() {
    let f = Fixture::new();
    let api = start(&f, AllowList::everything(), 30_000).await;
    let toml = job(&f).replacen("name = ", "deadline = \"2h\"\nname = ", 1);
    let (s, submitted) = api.submit(Some("S"), None, &toml).await;
    assert_eq!(s, StatusCode::CREATED, "{submitted}");
    let w1 = CoordinatorClient::new(&api.url, "W").for_worker("w1");
    let lease = w1
        .lease_with(&claim("w1", Some(spot("i-1"))))
        .await
        .unwrap();
    assert_eq!(lease.leases.len(), 1);
    assert!(!lease.drain);

    // Only a submitter reads the fleet.
    assert_eq!(
        api.get(Some("W"), "/v1/fleet").await.0,
        StatusCode::FORBIDDEN
    );
    let (status, text) = api.get(Some("S"), "/v1/fleet").await;
    assert_eq!(status, StatusCode::OK, "{text}");
    let fleet: FleetView = serde_json::from_str(&text).unwrap();
    let demand = &fleet.jobs[0];
    assert_eq!(
        (demand.rows_pending, demand.shards_open),
        (2000, 4),
        "{text}"
    );
    let created = submitted["job"]["created_at_ms"].as_i64().unwrap();
    assert_eq!(demand.deadline_ms, Some(created + 2 * 3600 * 1000));
    let view: &WorkerView = fleet.workers.iter().find(|w| w.id == "w1").expect("w1");
    assert_eq!(view.instance, Some(spot("i-1")));
    // No heartbeat yet: its slots are its claim's.
    assert_eq!(view.slots, Some(2), "{text}");
    assert_eq!(view.leases.len(), 1);
    assert!(!view.draining && !view.drain_told);

    // A drain: unknown workers are 404, workers cannot ask it.
    let drain = |worker: &str, token: &str| {
        api.http
            .post(format!("{}/v1/workers/{worker}/drain", api.url))
            .bearer_auth(token)
            .send()
    };
    assert_eq!(
        drain("nobody", "S").await.unwrap().status(),
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        drain("w1", "W").await.unwrap().status(),
        StatusCode::FORBIDDEN
    );
    assert_eq!(drain("w1", "S").await.unwrap().status(), StatusCode::OK);
    let (_, text) = api.get(Some("S"), "/v1/fleet").await;
    let fleet: FleetView = serde_json::from_str(&text).unwrap();
    let view = fleet.workers.iter().find(|w| w.id == "w1").unwrap();
    assert!(view.draining && !view.drain_told, "{text}");
    // Its heartbeat says so, and its next claim gets nothing but the drain.
    let beat = w1
        .heartbeat(
            "w1",
            vec![lease.leases[0].lease_ref()],
            Vec::new(),
            Vec::new(),
            None,
        )
        .await
        .unwrap();
    assert!(beat.drain);
    let again = w1
        .lease_with(&claim("w1", Some(spot("i-1"))))
        .await
        .unwrap();
    assert!(again.drain && again.leases.is_empty());
    let (_, text) = api.get(Some("S"), "/v1/fleet").await;
    let fleet: FleetView = serde_json::from_str(&text).unwrap();
    assert!(
        fleet
            .workers
            .iter()
            .find(|w| w.id == "w1")
            .unwrap()
            .drain_told,
        "{text}"
    );
    // Another worker is not affected.
    let w2 = CoordinatorClient::new(&api.url, "W").for_worker("w2");
    let other = w2.lease_with(&claim("w2", None)).await.unwrap();
    assert!(!other.drain && other.leases.len() == 1);

    // The job's cost so far: the spot worker's lease, on one of its two slots.
    let (_, text) = api.get(Some("S"), "/v1/jobs/api-job").await;
    let view: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert!(
        view["cost"]["spot_seconds"].as_f64().unwrap() >= 0.0,
        "{view}"
    );
    assert!(view["cost"]["unknown_seconds"].as_f64().is_some(), "{view}");
    let (_, metrics) = api.get(Some("S"), "/metrics").await;
    let id = submitted["job"]["id"].as_i64().unwrap();
    assert!(
        metrics.contains(&format!(
            "nightshift_job_machine_seconds{{job=\"{id}\",capacity=\"spot\"}}"
        )),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn what_a_worker_says_about_its_machine_is_checked() {
    let f = Fixture::new();
    let api = start(&f, AllowList::everything(), 30_000).await;
    let post = |body: serde_json::Value| {
        api.http
            .post(format!("{}/v1/worker/lease", api.url))
            .bearer_auth("W")
            .json(&body)
            .send()
    };
    for (body, field) in [
        (
            serde_json::json!({"worker_id": "w", "max": 1,
                "instance": {"id": "i-".repeat(40), "instance_type": "g5.xlarge", "capacity_type": "spot"}}),
            "instance.id",
        ),
        (
            serde_json::json!({"worker_id": "w", "max": 1,
                "instance": {"id": "i-1", "instance_type": "g5\u{7}", "capacity_type": "spot"}}),
            "instance.instance_type",
        ),
        (
            serde_json::json!({"worker_id": "w", "max": 1,
                "instance": {"id": "i-1", "instance_type": "g5.xlarge", "capacity_type": "reserved"}}),
            "unknown variant `reserved`",
        ),
        (
            serde_json::json!({"worker_id": "w", "max": 1, "gpus": 100000}),
            "gpus",
        ),
        (
            serde_json::json!({"worker_id": "w", "max": 1, "slots": 0}),
            "slots",
        ),
    ] {
        let resp = post(body.clone()).await.unwrap();
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST, "{body}");
        let text = resp.text().await.unwrap();
        assert!(text.contains(field), "{body}: {text}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_bad_deadline_is_refused_naming_the_key() {
    let f = Fixture::new();
    let api = start(&f, AllowList::everything(), 30_000).await;
    let toml = job(&f).replacen("name = ", "deadline = \"by dawn\"\nname = ", 1);
    let (s, answer) = api.submit(Some("S"), None, &toml).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{answer}");
    assert!(
        answer["message"].as_str().unwrap().contains("deadline"),
        "{answer}"
    );
}
