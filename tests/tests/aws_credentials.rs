//! Credentials and endpoints the way AWS users expect, against the local S3 server: a named
//! profile (through the official AWS credential chain plugged into object_store), the endpoint
//! override, and plain http only when asked for. One test per process: it sets environment
//! variables before anything else runs.

use nightshift_storage::Stores;
use nightshift_storage::s3::S3Settings;
use nightshift_tests::s3::S3Server;
use object_store::{ObjectStoreExt, PutPayload};

#[tokio::test(flavor = "multi_thread")]
async fn a_named_profile_and_the_endpoint_override_reach_the_store() {
    let s3 = S3Server::start().await.expect("moto");
    s3.create_bucket("profiled").await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let credentials = dir.path().join("credentials");
    let config = dir.path().join("config");
    std::fs::write(
        &credentials,
        "[nightly]\naws_access_key_id = AKIDPROFILE\naws_secret_access_key = profile-secret\n",
    )
    .unwrap();
    std::fs::write(&config, "[profile nightly]\nregion = eu-west-3\n").unwrap();
    // SAFETY: set before any other thread of this process reads the environment (one test per
    // process, and the runtime's workers do not read these variables).
    unsafe {
        for k in [
            "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY",
            "AWS_SESSION_TOKEN",
            "AWS_REGION",
            "AWS_DEFAULT_REGION",
            "AWS_ALLOW_HTTP",
        ] {
            std::env::remove_var(k);
        }
        std::env::set_var("AWS_PROFILE", "nightly");
        std::env::set_var("AWS_SHARED_CREDENTIALS_FILE", &credentials);
        std::env::set_var("AWS_CONFIG_FILE", &config);
        std::env::set_var("AWS_ENDPOINT_URL", s3.endpoint());
        std::env::set_var("AWS_EC2_METADATA_DISABLED", "true");
    }

    // Plain http is refused unless asked for.
    let refused = S3Settings::load().await;
    assert!(!refused.allow_http);
    let stores = Stores::new(refused);
    let loc = stores.locate("s3://profiled/x").unwrap();
    let err = loc
        .store()
        .put(loc.path(), PutPayload::from_static(b"x"))
        .await
        .unwrap_err();
    let text = format!("{err:?}");
    assert!(
        text.to_lowercase().contains("http"),
        "plain http must be asked for: {text}"
    );

    unsafe { std::env::set_var("AWS_ALLOW_HTTP", "true") };
    let settings = S3Settings::load().await;
    assert_eq!(
        settings.region.as_deref(),
        Some("eu-west-3"),
        "the profile's region"
    );
    let provider = settings
        .credentials
        .clone()
        .expect("the profile goes through the AWS credential chain");
    let creds = aws_credential_types::provider::ProvideCredentials::provide_credentials(&provider)
        .await
        .unwrap();
    assert_eq!(creds.access_key_id(), "AKIDPROFILE");
    let stores = Stores::new(settings);
    let loc = stores.locate("s3://profiled/hello.txt").unwrap();
    loc.store()
        .put(loc.path(), PutPayload::from_static(b"hello"))
        .await
        .unwrap();
    let got = loc
        .store()
        .get(loc.path())
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(&got[..], b"hello");
}
