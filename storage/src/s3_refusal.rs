//! S3's reason for refusing a request, read from the `<Code>` of its error body before
//! object_store sees the answer. object_store keeps the status and body of a failed request in
//! a type it does not export, and answers a listing's failure as `Error::Generic`, so neither a
//! missing bucket (a 404 like a missing key) nor a refused listing can be told apart from its
//! errors except by their text. The S3 clients are built with `S3RefusalConnector`, which turns
//! such an answer into an `S3Refusal` inside the error object_store returns, where
//! `StorageError::from_store` finds it by type.

use async_trait::async_trait;
use http::StatusCode;
use object_store::ClientOptions;
use object_store::client::{
    HttpClient, HttpConnector, HttpError, HttpErrorKind, HttpRequest, HttpResponse, HttpService,
    ReqwestConnector,
};
use serde::Deserialize;

/// The S3 error code of a request for a bucket that does not exist.
const NO_SUCH_BUCKET: &str = "NoSuchBucket";
/// 403 codes that a clock sync or a credential refresh fixes, so that trying again helps:
/// the request's time is too far from the server's, or its temporary credentials expired.
const PASSING_403: [&str; 4] = [
    "RequestTimeTooSkewed",
    "RequestExpired",
    "ExpiredToken",
    "TokenRefreshRequired",
];

/// Why S3 refused a request, where that decides what the user is told.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum S3Refusal {
    /// A 404 whose code is `NoSuchBucket`.
    #[error("S3 answered {NO_SUCH_BUCKET}")]
    NoSuchBucket,
    /// A 403, with S3's code and message (`AccessDenied`, `InvalidAccessKeyId`, ...).
    #[error("S3 answered 403 {code}: {message}")]
    Denied { code: String, message: String },
    /// A 403 that passes (`PASSING_403`): a skewed clock or expired temporary credentials.
    #[error("S3 answered 403 {code}: {message}")]
    Passing { code: String, message: String },
}

/// The fields of S3's `<Error>` body that matter here.
#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct ErrorBody {
    code: String,
    #[serde(default)]
    message: String,
}

impl S3Refusal {
    /// The refusal an answer carries, if it is one: only a 404 or 403 whose body is an S3
    /// error. Anything else (a missing key, a bare 404 to a HEAD, an answer from the instance
    /// metadata service) is left to object_store.
    pub fn read(status: StatusCode, body: &[u8]) -> Option<Self> {
        let error = || quick_xml::de::from_reader::<_, ErrorBody>(body).ok();
        match status {
            StatusCode::NOT_FOUND => error()
                .filter(|e| e.code == NO_SUCH_BUCKET)
                .map(|_| S3Refusal::NoSuchBucket),
            StatusCode::FORBIDDEN => {
                error().map(|e| match PASSING_403.contains(&e.code.as_str()) {
                    true => S3Refusal::Passing {
                        code: e.code,
                        message: e.message,
                    },
                    false => S3Refusal::Denied {
                        code: e.code,
                        message: e.message,
                    },
                })
            }
            _ => None,
        }
    }

    /// The refusal among the causes of an object_store error.
    pub fn find(e: &object_store::Error) -> Option<&Self> {
        let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(e);
        while let Some(c) = cause {
            if let Some(refusal) = c.downcast_ref::<S3Refusal>() {
                return Some(refusal);
            }
            cause = c.source();
        }
        None
    }
}

/// Builds object_store's usual HTTP client, wrapped to read S3's refusals.
#[derive(Debug)]
pub struct S3RefusalConnector;

impl HttpConnector for S3RefusalConnector {
    fn connect(&self, options: &ClientOptions) -> object_store::Result<HttpClient> {
        let inner = ReqwestConnector::default().connect(options)?;
        Ok(HttpClient::new(RefusalReader(inner)))
    }
}

#[derive(Debug)]
struct RefusalReader(HttpClient);

#[async_trait]
impl HttpService for RefusalReader {
    async fn call(&self, request: HttpRequest) -> Result<HttpResponse, HttpError> {
        let answer = self.0.execute(request).await?;
        let status = answer.status();
        if !matches!(status, StatusCode::NOT_FOUND | StatusCode::FORBIDDEN) {
            return Ok(answer);
        }
        let (parts, body) = answer.into_parts();
        let body = body.bytes().await?;
        match S3Refusal::read(status, &body) {
            // Not retried: object_store retries only transport errors of other kinds.
            Some(refusal) => Err(HttpError::new(HttpErrorKind::Unknown, refusal)),
            None => Ok(HttpResponse::from_parts(parts, body.into())),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use futures::TryStreamExt;
    use object_store::path::Path;
    use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;
    use crate::StorageError;
    use crate::s3::{S3Settings, StaticKeys};

    fn error_body(code: &str, message: &str) -> String {
        format!(
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>{code}</Code>\
             <Message>{message}</Message><RequestId>r1</RequestId></Error>"
        )
    }

    #[test]
    fn reads_the_code_not_the_text() {
        let missing_bucket = error_body("NoSuchBucket", "The specified bucket does not exist");
        assert_eq!(
            S3Refusal::read(StatusCode::NOT_FOUND, missing_bucket.as_bytes()),
            Some(S3Refusal::NoSuchBucket)
        );
        // A missing key whose message names a bucket is still a missing key.
        let missing_key = error_body("NoSuchKey", "NoSuchBucket? no: the key");
        assert_eq!(
            S3Refusal::read(StatusCode::NOT_FOUND, missing_key.as_bytes()),
            None
        );
        assert_eq!(
            S3Refusal::read(
                StatusCode::FORBIDDEN,
                error_body("SignatureDoesNotMatch", "bad signature").as_bytes()
            ),
            Some(S3Refusal::Denied {
                code: "SignatureDoesNotMatch".into(),
                message: "bad signature".into()
            })
        );
        // A bare 404 (HEAD), a body that is no S3 error, another status.
        assert_eq!(S3Refusal::read(StatusCode::NOT_FOUND, b""), None);
        assert_eq!(
            S3Refusal::read(StatusCode::FORBIDDEN, b"<html>no</html>"),
            None
        );
        assert_eq!(
            S3Refusal::read(StatusCode::CONFLICT, missing_bucket.as_bytes()),
            None
        );
    }

    #[test]
    fn from_store_decides_by_type_never_by_text() {
        let generic =
            |source: Box<dyn std::error::Error + Send + Sync>| object_store::Error::Generic {
                store: "S3",
                source,
            };
        let refused = |r: S3Refusal| generic(Box::new(HttpError::new(HttpErrorKind::Unknown, r)));
        let e = StorageError::from_store("s3://b/k", refused(S3Refusal::NoSuchBucket));
        assert!(
            matches!(&e, StorageError::NoSuchBucket { uri } if uri == "s3://b/k"),
            "{e:?}"
        );
        let denied = S3Refusal::Denied {
            code: "AccessDenied".into(),
            message: "Access Denied".into(),
        };
        let e = StorageError::from_store("s3://b/k", refused(denied));
        assert_eq!(
            e.to_string(),
            "access to `s3://b/k` denied: S3 answered 403 AccessDenied: Access Denied"
        );
        // Text that once decided it decides nothing now.
        let e = StorageError::from_store(
            "s3://b/k",
            object_store::Error::NotFound {
                path: "k".into(),
                source: "NoSuchBucket".into(),
            },
        );
        assert!(matches!(e, StorageError::NotFound { .. }), "{e:?}");
        let e = StorageError::from_store(
            "s3://b/k",
            generic("403 Forbidden: <Code>AccessDenied</Code> NoSuchBucket".into()),
        );
        assert!(matches!(e, StorageError::Io { .. }), "{e:?}");
    }

    #[test]
    fn a_skewed_clock_or_expired_credentials_are_tried_again_a_denial_is_not() {
        let generic = |r: S3Refusal| object_store::Error::Generic {
            store: "S3",
            source: Box::new(HttpError::new(HttpErrorKind::Unknown, r)),
        };
        for code in PASSING_403 {
            let body = error_body(code, "try later");
            let refusal = S3Refusal::read(StatusCode::FORBIDDEN, body.as_bytes()).unwrap();
            assert!(matches!(refusal, S3Refusal::Passing { .. }), "{code}");
            let e = StorageError::from_store("s3://b/k", generic(refusal));
            assert_eq!(e.class(), nightshift_proto::FailureClass::Retryable, "{e}");
            assert!(e.to_string().contains(code), "{e}");
        }
        let body = error_body("AccessDenied", "no");
        let refusal = S3Refusal::read(StatusCode::FORBIDDEN, body.as_bytes()).unwrap();
        let e = StorageError::from_store("s3://b/k", generic(refusal));
        assert_eq!(e.class(), nightshift_proto::FailureClass::Permanent, "{e}");
    }

    /// An S3 endpoint that answers every request with the given status and body.
    async fn refusing(status: &'static str, body: String) -> Arc<dyn ObjectStore> {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                let body = body.clone();
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut byte = [0u8];
                    while !head.ends_with(b"\r\n\r\n") {
                        if conn.read(&mut byte).await.unwrap_or(0) == 0 {
                            return;
                        }
                        head.push(byte[0]);
                    }
                    // Read a PUT's body too: closing on unread bytes resets the connection.
                    let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
                    let length = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .and_then(|n| n.trim().parse::<usize>().ok())
                        .unwrap_or(0);
                    let mut request_body = vec![0u8; length];
                    if conn.read_exact(&mut request_body).await.is_err() {
                        return;
                    }
                    let answer = format!(
                        "HTTP/1.1 {status}\r\nContent-Type: application/xml\r\n\
                         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = conn.write_all(answer.as_bytes()).await;
                    let _ = conn.shutdown().await;
                });
            }
        });
        let settings = S3Settings {
            allow_http: true,
            region: Some("us-east-1".into()),
            endpoint: Some(endpoint),
            static_keys: Some(StaticKeys {
                key_id: "key".into(),
                secret_key: "secret".into(),
            }),
            // An answer this server gives is final: no retries to wait through.
            retry: Some(object_store::RetryConfig {
                max_retries: 0,
                ..Default::default()
            }),
            ..Default::default()
        };
        settings.build("b").unwrap().store()
    }

    #[tokio::test]
    async fn s3_answers_become_typed_errors() {
        let store = refusing("404 Not Found", error_body("NoSuchBucket", "gone")).await;
        let key = Path::from("k");
        let get = store.get(&key).await.unwrap_err();
        let e = StorageError::from_store("s3://b/k", get);
        assert!(matches!(e, StorageError::NoSuchBucket { .. }), "get: {e:?}");
        let put = store
            .put(&key, PutPayload::from_static(b"x"))
            .await
            .unwrap_err();
        let e = StorageError::from_store("s3://b/k", put);
        assert!(matches!(e, StorageError::NoSuchBucket { .. }), "put: {e:?}");
        let list = store.list(None).try_collect::<Vec<_>>().await.unwrap_err();
        let e = StorageError::from_store("s3://b/", list);
        assert!(
            matches!(e, StorageError::NoSuchBucket { .. }),
            "list: {e:?}"
        );

        let store = refusing("404 Not Found", error_body("NoSuchKey", "no key")).await;
        let get = store.get(&key).await.unwrap_err();
        assert!(
            matches!(get, object_store::Error::NotFound { .. }),
            "{get:?}"
        );
        let e = StorageError::from_store("s3://b/k", get);
        assert!(matches!(e, StorageError::NotFound { .. }), "{e:?}");

        let store = refusing("403 Forbidden", error_body("AccessDenied", "Access Denied")).await;
        let list = store.list(None).try_collect::<Vec<_>>().await.unwrap_err();
        let e = StorageError::from_store("s3://b/", list);
        let StorageError::AccessDenied { message, .. } = &e else {
            panic!("list: {e:?}");
        };
        assert_eq!(message, "S3 answered 403 AccessDenied: Access Denied");
        let get = store.get(&key).await.unwrap_err();
        let e = StorageError::from_store("s3://b/k", get);
        assert!(matches!(e, StorageError::AccessDenied { .. }), "get: {e:?}");
    }
}
