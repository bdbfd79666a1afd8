//! The EC2 provider against moto's EC2 (one `moto_server` per test, stopped when the test
//! ends): launch templates, instant spot fleets, tags, listing, termination, and, through the
//! `SpotRefusal` proxy, the on-demand fallback when spot capacity is short.
//!
//! moto 5.2.5 quirks these tests live with: its instances are `running` at once (never
//! `pending`); an instant fleet that is not `diversified` puts every instance on its first
//! override (the "cheapest" of overrides without prices), so only the first instance type and
//! subnet are ever used; it never refuses spot capacity (hence the proxy).

use std::collections::BTreeSet;
use std::sync::Once;
use std::time::{SystemTime, UNIX_EPOCH};

use aws_config::{BehaviorVersion, Region};
use aws_sdk_ec2::types::{Filter, InstanceLifecycleType, InstanceStateName};
use nightshift_fleet::{
    Ec2Config, Ec2Provider, InstanceState, LaunchRequest, LaunchTemplate, Provider, ProviderError,
};
use nightshift_proto::CapacityType;
use nightshift_tests::S3Server;
use nightshift_tests::ec2_proxy::{REFUSAL_CODE, SpotRefusal};
use nightshift_tests::s3::{ACCESS_KEY_ID, REGION, SECRET_ACCESS_KEY};

const TEMPLATE: &str = "nightshift-workers";
const USER_DATA: &str = "#!/bin/bash\nexec nightshift worker --coordinator http://10.0.0.5:8080 \
                         --token-file /etc/nightshift/token\n";
const INSTANCE_TYPES: [&str; 2] = ["m5.large", "c5.large"];

/// The provider takes its credentials from the usual AWS chain: the environment here (moto
/// accepts any keys). Set once, before any test reads the environment.
fn aws_env() {
    static ENV: Once = Once::new();
    ENV.call_once(|| {
        // SAFETY: every test calls this first, and `Once` makes the others wait until it is
        // done, so no thread of this process reads the environment while it changes.
        unsafe {
            std::env::set_var("AWS_ACCESS_KEY_ID", ACCESS_KEY_ID);
            std::env::set_var("AWS_SECRET_ACCESS_KEY", SECRET_ACCESS_KEY);
            std::env::set_var("AWS_EC2_METADATA_DISABLED", "true");
            std::env::remove_var("AWS_SESSION_TOKEN");
            std::env::remove_var("AWS_PROFILE");
        }
    });
}

/// A moto server, an SDK client of its own for checking what the provider did, an AMI moto
/// knows and two subnets of its default VPC.
struct Moto {
    server: S3Server,
    ec2: aws_sdk_ec2::Client,
    ami: String,
    subnets: Vec<String>,
}

impl Moto {
    async fn start() -> Moto {
        aws_env();
        let server = S3Server::start().await.expect("moto starts");
        let sdk = aws_config::defaults(BehaviorVersion::latest())
            .region(Region::new(REGION))
            .endpoint_url(server.endpoint())
            .load()
            .await;
        let ec2 = aws_sdk_ec2::Client::new(&sdk);
        let images = ec2
            .describe_images()
            .owners("amazon")
            .send()
            .await
            .expect("DescribeImages");
        let ami = images.images()[0].image_id().unwrap().to_string();
        let subnets = ec2
            .describe_subnets()
            .filters(filter("default-for-az", "true"))
            .send()
            .await
            .expect("DescribeSubnets");
        let mut subnets: Vec<String> = subnets
            .subnets()
            .iter()
            .map(|s| s.subnet_id().unwrap().to_string())
            .collect();
        subnets.sort();
        subnets.truncate(2);
        assert_eq!(subnets.len(), 2, "moto's default VPC has subnets");
        Moto {
            server,
            ec2,
            ami,
            subnets,
        }
    }

    fn ensure(&self) -> LaunchTemplate {
        LaunchTemplate::Ensure {
            name: TEMPLATE.to_string(),
            image_id: self.ami.clone(),
            user_data: USER_DATA.to_string(),
        }
    }

    /// A fleet's configuration against `endpoint` (moto or a proxy in front of it).
    fn config(&self, endpoint: &str, fleet: &str) -> Ec2Config {
        Ec2Config {
            fleet_name: fleet.to_string(),
            region: REGION.to_string(),
            endpoint: Some(endpoint.to_string()),
            launch_template: self.ensure(),
            instance_types: INSTANCE_TYPES.iter().map(|t| t.to_string()).collect(),
            subnets: self.subnets.clone(),
            on_demand_fallback: true,
        }
    }

    async fn provider(&self, fleet: &str) -> Ec2Provider {
        Ec2Provider::connect(self.config(&self.server.endpoint(), fleet))
            .await
            .expect("connect")
    }

    /// The instances with these ids, as moto describes them.
    async fn describe(&self, ids: &[String]) -> Vec<aws_sdk_ec2::types::Instance> {
        let out = self
            .ec2
            .describe_instances()
            .set_instance_ids(Some(ids.to_vec()))
            .send()
            .await
            .expect("DescribeInstances");
        out.reservations()
            .iter()
            .flat_map(|r| r.instances().iter().cloned())
            .collect()
    }
}

fn filter(name: &str, value: &str) -> Filter {
    Filter::builder().name(name).values(value).build()
}

fn tag(instance: &aws_sdk_ec2::types::Instance, key: &str) -> Option<String> {
    instance
        .tags()
        .iter()
        .find(|t| t.key() == Some(key))
        .and_then(|t| t.value().map(str::to_string))
}

fn ids<'a>(
    instances: impl IntoIterator<Item = &'a nightshift_fleet::Instance>,
) -> BTreeSet<String> {
    instances.into_iter().map(|i| i.id.clone()).collect()
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

fn request(count: u32, job_ids: &[i64]) -> LaunchRequest {
    LaunchRequest {
        count,
        job_ids: job_ids.to_vec(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ensure_creates_the_template_once_and_existing_must_exist() {
    let moto = Moto::start().await;
    moto.provider("alpha").await;

    let versions = moto
        .ec2
        .describe_launch_template_versions()
        .launch_template_name(TEMPLATE)
        .versions("$Latest")
        .send()
        .await
        .expect("DescribeLaunchTemplateVersions");
    let [version] = versions.launch_template_versions() else {
        panic!("one version: {versions:?}");
    };
    let data = version.launch_template_data().expect("template data");
    assert_eq!(data.image_id(), Some(moto.ami.as_str()));
    let user_data = aws_smithy_types::base64::decode(data.user_data().expect("user data"))
        .expect("user data is base64");
    assert_eq!(String::from_utf8(user_data).unwrap(), USER_DATA);

    // A second scaler (another user-data even) reuses the template as it is.
    let mut again = moto.config(&moto.server.endpoint(), "alpha");
    again.launch_template = LaunchTemplate::Ensure {
        name: TEMPLATE.to_string(),
        image_id: moto.ami.clone(),
        user_data: "#!/bin/sh\necho other\n".to_string(),
    };
    Ec2Provider::connect(again).await.expect("second connect");
    let templates = moto
        .ec2
        .describe_launch_templates()
        .send()
        .await
        .expect("DescribeLaunchTemplates");
    let [template] = templates.launch_templates() else {
        panic!("one template: {templates:?}");
    };
    assert_eq!(template.launch_template_name(), Some(TEMPLATE));
    assert_eq!(template.latest_version_number(), Some(1));

    let mut existing = moto.config(&moto.server.endpoint(), "alpha");
    existing.launch_template = LaunchTemplate::Existing {
        name: TEMPLATE.to_string(),
    };
    Ec2Provider::connect(existing.clone())
        .await
        .expect("an existing template is found");

    existing.launch_template = LaunchTemplate::Existing {
        name: "no-such-template".to_string(),
    };
    match Ec2Provider::connect(existing.clone()).await {
        Err(ProviderError::Config(message)) => {
            assert!(message.contains("no-such-template"), "{message}")
        }
        other => panic!("a missing template is refused: {other:?}"),
    }

    existing.launch_template = moto.ensure();
    existing.instance_types.clear();
    assert!(matches!(
        Ec2Provider::connect(existing).await,
        Err(ProviderError::Config(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_endpoint_is_a_transport_error() {
    aws_env();
    let moto_less = Ec2Config {
        fleet_name: "alpha".to_string(),
        region: REGION.to_string(),
        endpoint: Some(format!(
            "http://127.0.0.1:{}",
            nightshift_tests::process::free_port()
        )),
        launch_template: LaunchTemplate::Existing {
            name: TEMPLATE.to_string(),
        },
        instance_types: vec![INSTANCE_TYPES[0].to_string()],
        subnets: Vec::new(),
        on_demand_fallback: true,
    };
    match Ec2Provider::connect(moto_less).await {
        Err(ProviderError::Transport { operation, .. }) => {
            assert_eq!(operation, "DescribeLaunchTemplates")
        }
        other => panic!("no server is a transport error: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn launch_lists_and_terminates_spot_instances() {
    let moto = Moto::start().await;
    let provider = moto.provider("alpha").await;
    let before = now_ms();

    let launched = provider
        .launch(&request(3, &[11, 12]))
        .await
        .expect("launch");
    assert_eq!(launched.instances.len(), 3, "{launched:?}");
    assert!(!launched.spot_refused);
    assert!(launched.errors.is_empty(), "{:?}", launched.errors);
    for i in &launched.instances {
        assert_eq!(i.capacity_type, CapacityType::Spot, "{i:?}");
        assert_eq!(i.state, InstanceState::Pending);
        assert!(INSTANCE_TYPES.contains(&i.instance_type.as_str()), "{i:?}");
        assert!(
            i.launched_ms >= before && i.launched_ms <= now_ms(),
            "{i:?}"
        );
    }
    let launched_ids = ids(&launched.instances);
    assert_eq!(launched_ids.len(), 3);

    let ids_vec: Vec<String> = launched_ids.iter().cloned().collect();
    let described = moto.describe(&ids_vec).await;
    assert_eq!(described.len(), 3);
    for i in &described {
        assert_eq!(tag(i, "nightshift:fleet").as_deref(), Some("alpha"));
        assert_eq!(tag(i, "nightshift:jobs").as_deref(), Some("11,12"));
        assert_eq!(tag(i, "Name").as_deref(), Some("nightshift-worker-alpha"));
        assert_eq!(i.instance_lifecycle(), Some(&InstanceLifecycleType::Spot));
        assert_eq!(i.image_id(), Some(moto.ami.as_str()));
        let subnet = i.subnet_id().unwrap_or_default().to_string();
        assert!(moto.subnets.contains(&subnet), "{subnet}");
    }

    let listed = provider.list().await.expect("list");
    assert_eq!(ids(&listed), launched_ids);
    for i in &listed {
        assert_eq!(i.capacity_type, CapacityType::Spot, "{i:?}");
        assert_eq!(
            i.state,
            InstanceState::Running,
            "moto runs instances at once"
        );
        assert!(INSTANCE_TYPES.contains(&i.instance_type.as_str()), "{i:?}");
        // LaunchTime has whole seconds.
        assert!((i.launched_ms - before).abs() < 60_000, "{i:?}");
    }

    provider.terminate(&[]).await.expect("terminating nothing");
    provider.terminate(&ids_vec).await.expect("terminate");
    assert!(provider.list().await.expect("list").is_empty());
    for i in moto.describe(&ids_vec).await {
        let state = i.state().and_then(|s| s.name()).cloned();
        assert!(
            matches!(
                state,
                Some(InstanceStateName::Terminated | InstanceStateName::ShuttingDown)
            ),
            "{state:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_spot_falls_back_to_on_demand() {
    let moto = Moto::start().await;
    let proxy = SpotRefusal::start(moto.server.addr()).expect("proxy starts");
    let provider = Ec2Provider::connect(moto.config(&proxy.endpoint(), "alpha"))
        .await
        .expect("connect through the proxy");
    assert!(
        proxy.forwarded() > 0,
        "the template check went through the proxy"
    );
    proxy.set_refusing(true);

    let launched = provider.launch(&request(2, &[7])).await.expect("launch");
    assert_eq!(proxy.refused(), 1);
    assert!(launched.spot_refused);
    assert_eq!(launched.instances.len(), 2, "{launched:?}");
    assert!(
        launched
            .instances
            .iter()
            .all(|i| i.capacity_type == CapacityType::OnDemand),
        "{launched:?}"
    );
    // One refusal per override: two instance types in two subnets.
    assert_eq!(launched.errors, vec![REFUSAL_CODE.to_string(); 4]);

    let on_demand: Vec<String> = ids(&launched.instances).into_iter().collect();
    for i in moto.describe(&on_demand).await {
        assert_eq!(i.instance_lifecycle(), None, "on demand has no lifecycle");
        assert_eq!(tag(&i, "nightshift:fleet").as_deref(), Some("alpha"));
        assert_eq!(tag(&i, "nightshift:jobs").as_deref(), Some("7"));
    }
    let listed = provider.list().await.expect("list");
    assert_eq!(ids(&listed), ids(&launched.instances));
    assert!(
        listed
            .iter()
            .all(|i| i.capacity_type == CapacityType::OnDemand)
    );

    let mut strict = moto.config(&proxy.endpoint(), "beta");
    strict.on_demand_fallback = false;
    let strict = Ec2Provider::connect(strict).await.expect("connect");
    let refused = strict.launch(&request(2, &[8])).await.expect("launch");
    assert_eq!(proxy.refused(), 2);
    assert!(refused.spot_refused);
    assert!(refused.instances.is_empty(), "{refused:?}");
    assert!(
        refused.errors.iter().any(|c| c == REFUSAL_CODE),
        "{refused:?}"
    );
    assert!(strict.list().await.expect("list").is_empty());

    // Spot again once capacity is back: the proxy passes spot fleets on to moto.
    proxy.set_refusing(false);
    let spot = strict.launch(&request(1, &[8])).await.expect("launch");
    assert_eq!(proxy.refused(), 2);
    assert!(!spot.spot_refused);
    assert_eq!(spot.instances.len(), 1);
    assert_eq!(spot.instances[0].capacity_type, CapacityType::Spot);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_ignores_instances_of_other_fleets() {
    let moto = Moto::start().await;
    let alpha = moto.provider("alpha").await;
    let beta = moto.provider("beta").await;

    let a = alpha.launch(&request(2, &[1])).await.expect("launch alpha");
    let b = beta.launch(&request(1, &[2])).await.expect("launch beta");
    // An instance of no fleet at all, in the same account.
    moto.ec2
        .run_instances()
        .image_id(&moto.ami)
        .instance_type(aws_sdk_ec2::types::InstanceType::T3Micro)
        .min_count(1)
        .max_count(1)
        .send()
        .await
        .expect("RunInstances");

    assert_eq!(
        ids(&alpha.list().await.expect("list alpha")),
        ids(&a.instances)
    );
    assert_eq!(
        ids(&beta.list().await.expect("list beta")),
        ids(&b.instances)
    );

    let gone = a.instances[0].id.clone();
    alpha
        .terminate(std::slice::from_ref(&gone))
        .await
        .expect("terminate");
    let left = ids(&alpha.list().await.expect("list alpha"));
    assert_eq!(left, ids(&a.instances[1..]));
    assert_eq!(
        ids(&beta.list().await.expect("list beta")),
        ids(&b.instances)
    );
}
