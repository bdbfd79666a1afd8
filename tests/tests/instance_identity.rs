//! A worker learns the machine it runs on from the instance metadata service (IMDSv2: a session
//! token, then `instance-id`, `instance-type` and `instance-life-cycle`), as the fleet scaler
//! and the cost report need; no service is an error, not a guess.

use nightshift_proto::CapacityType;
use nightshift_tests::imds::{IDENTITY, MetadataServer};
use nightshift_worker::spot::instance_identity;

#[tokio::test]
async fn the_worker_reads_its_instance_from_the_metadata_service() {
    let imds = MetadataServer::start().await;
    let found = instance_identity(&imds.url).await.expect("identity");
    assert_eq!(found.id, IDENTITY[0].1);
    assert_eq!(found.instance_type, IDENTITY[1].1);
    assert_eq!(found.capacity_type, CapacityType::Spot);
}

#[tokio::test]
async fn no_metadata_service_is_an_error() {
    let port = nightshift_tests::process::free_port();
    let e = instance_identity(&format!("http://127.0.0.1:{port}"))
        .await
        .unwrap_err();
    assert!(!e.is_empty());
}
