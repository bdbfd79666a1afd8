//! S3 clients configured the way AWS users expect: the standard environment variables
//! (`AWS_ACCESS_KEY_ID`, `AWS_REGION`, `AWS_ENDPOINT_URL`, `AWS_WEB_IDENTITY_TOKEN_FILE`, ...),
//! instance metadata, and named profiles (SSO included) through the official AWS credential
//! chain, plugged into object_store as its credential provider. Plain http only when
//! `AWS_ALLOW_HTTP=true`.

use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use aws_credential_types::provider::{ProvideCredentials, SharedCredentialsProvider};
use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey, AwsCredential};
use object_store::{ClientOptions, CredentialProvider, RetryConfig, StaticCredentialProvider};
use tokio::sync::Mutex;

use crate::open_uploads::S3Bucket;
use crate::s3_refusal::S3RefusalConnector;

/// How S3 clients are built. Read once from the environment (and AWS profile files).
#[derive(Clone, Default)]
pub struct S3Settings {
    /// Allow `http://` endpoints (S3-compatible servers without TLS).
    pub allow_http: bool,
    /// Region from the environment or the profile; object_store's default otherwise.
    pub region: Option<String>,
    /// Credentials from the AWS SDK chain (profiles, SSO); None leaves object_store's own
    /// chain (environment, web identity, container, instance metadata).
    pub credentials: Option<SharedCredentialsProvider>,
    /// Retries on throttling, 5xx, timeouts and resets.
    pub retry: Option<RetryConfig>,
    /// Per-request timeout.
    pub timeout: Option<Duration>,
    /// Endpoint of an S3-compatible server (`http://127.0.0.1:9000`); None leaves
    /// `AWS_ENDPOINT_URL` from the environment, or AWS itself.
    pub endpoint: Option<String>,
    /// Fixed keys used instead of every credential chain (a local server in tests); None
    /// leaves the chains above.
    pub static_keys: Option<StaticKeys>,
}

/// An access key and its secret, without a session token.
#[derive(Clone)]
pub struct StaticKeys {
    pub key_id: String,
    pub secret_key: String,
}

impl std::fmt::Debug for StaticKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StaticKeys")
            .field("key_id", &self.key_id)
            .finish_non_exhaustive()
    }
}

impl S3Settings {
    /// Settings from environment variables only (no profile files read).
    pub fn from_env() -> Self {
        Self {
            allow_http: env_flag("AWS_ALLOW_HTTP"),
            region: std::env::var("AWS_REGION")
                .or_else(|_| std::env::var("AWS_DEFAULT_REGION"))
                .ok(),
            credentials: None,
            retry: None,
            timeout: None,
            endpoint: None,
            static_keys: None,
        }
    }

    /// Environment plus, when a profile is named (`AWS_PROFILE`) and no static keys are set,
    /// the AWS SDK's credential chain and the profile's region.
    pub async fn load() -> Self {
        let mut s = Self::from_env();
        let static_keys = std::env::var_os("AWS_ACCESS_KEY_ID").is_some();
        if !static_keys && std::env::var_os("AWS_PROFILE").is_some() {
            let config = aws_config::load_defaults(aws_config::BehaviorVersion::latest()).await;
            if s.region.is_none() {
                s.region = config.region().map(|r| r.to_string());
            }
            s.credentials = config.credentials_provider();
        }
        s
    }

    /// An S3 client for one bucket.
    pub fn build(&self, bucket: &str) -> object_store::Result<S3Bucket> {
        // Client options replace every client setting, allow_http included: set them first.
        let client = ClientOptions::new()
            .with_allow_http(self.allow_http)
            .with_timeout(self.timeout.unwrap_or(Duration::from_secs(60)))
            .with_connect_timeout(Duration::from_secs(5));
        let mut b = AmazonS3Builder::from_env()
            .with_client_options(client)
            .with_allow_http(self.allow_http)
            .with_bucket_name(bucket)
            .with_retry(self.retry.clone().unwrap_or_else(default_retry))
            .with_http_connector(S3RefusalConnector);
        if let Some(region) = &self.region {
            b = b.with_region(region);
        }
        if let Some(endpoint) = &self.endpoint {
            b = b.with_endpoint(endpoint);
        }
        if let Some(keys) = &self.static_keys {
            b = b.with_credentials(Arc::new(StaticCredentialProvider::new(AwsCredential {
                key_id: keys.key_id.clone(),
                secret_key: keys.secret_key.clone(),
                token: None,
            })));
        } else if let Some(provider) = &self.credentials {
            b = b.with_credentials(Arc::new(SdkCredentials {
                provider: provider.clone(),
                cached: Mutex::new(None),
            }));
        }
        // What a hand-made request to the bucket needs (`open_uploads`), as object_store
        // itself derives it.
        let region = b
            .get_config_value(&AmazonS3ConfigKey::Region)
            .unwrap_or_else(|| "us-east-1".to_string());
        let virtual_hosted = b
            .get_config_value(&AmazonS3ConfigKey::VirtualHostedStyleRequest)
            .is_some_and(|v| v.eq_ignore_ascii_case("true"));
        let url = match (
            b.get_config_value(&AmazonS3ConfigKey::Endpoint),
            virtual_hosted,
        ) {
            (Some(endpoint), true) => endpoint,
            (Some(endpoint), false) => format!("{}/{bucket}", endpoint.trim_end_matches('/')),
            (None, true) => format!("https://{bucket}.s3.{region}.amazonaws.com"),
            (None, false) => format!("https://s3.{region}.amazonaws.com/{bucket}"),
        };
        Ok(S3Bucket {
            store: Arc::new(b.build()?),
            url,
            region,
            name: bucket.to_string(),
            timeout: self.timeout.unwrap_or(Duration::from_secs(60)),
            http: OnceLock::new(),
        })
    }
}

/// Retries for throttling (503 SlowDown), 5xx, timeouts and resets, with backoff.
pub fn default_retry() -> RetryConfig {
    RetryConfig {
        max_retries: 10,
        retry_timeout: Duration::from_secs(180),
        backoff: object_store::BackoffConfig {
            init_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_secs(5),
            base: 2.0,
        },
    }
}

fn env_flag(name: &str) -> bool {
    std::env::var(name)
        .map(|v| matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "yes"))
        .unwrap_or(false)
}

/// The AWS SDK's credential chain as an object_store credential provider, cached until
/// five minutes before expiry.
#[derive(Debug)]
struct SdkCredentials {
    provider: SharedCredentialsProvider,
    cached: Mutex<Option<(Arc<AwsCredential>, Option<SystemTime>)>>,
}

#[async_trait]
impl CredentialProvider for SdkCredentials {
    type Credential = AwsCredential;

    async fn get_credential(&self) -> object_store::Result<Arc<AwsCredential>> {
        let mut cached = self.cached.lock().await;
        if let Some((cred, expiry)) = cached.as_ref() {
            let fresh = expiry
                .map(|e| e > SystemTime::now() + Duration::from_secs(300))
                .unwrap_or(true);
            if fresh {
                return Ok(cred.clone());
            }
        }
        let creds = self.provider.provide_credentials().await.map_err(|e| {
            object_store::Error::Generic {
                store: "S3",
                source: format!("AWS credential chain: {e}").into(),
            }
        })?;
        let cred = Arc::new(AwsCredential {
            key_id: creds.access_key_id().to_string(),
            secret_key: creds.secret_access_key().to_string(),
            token: creds.session_token().map(str::to_string),
        });
        *cached = Some((cred.clone(), creds.expiry()));
        Ok(cred)
    }
}
