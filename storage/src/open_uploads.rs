//! Multipart uploads left open under a prefix, found and aborted. A worker killed in the middle
//! of a part (SIGKILL, a lost machine) leaves its multipart upload open, and S3 bills the
//! uploaded parts until the upload is aborted; no object listing shows them. The finalizer
//! aborts its job's after commit. object_store aborts an upload whose id it is given but does
//! not list them, so the listing (S3's ListMultipartUploads) is signed here with object_store's
//! own SigV4 signer and credentials.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use object_store::ObjectStore;
use object_store::aws::{AmazonS3, AwsAuthorizer};
use object_store::client::{HttpRequest, HttpRequestBody};
use object_store::multipart::MultipartStore;
use object_store::path::Path;
use serde::Deserialize;

use crate::error::StorageError;

/// Tries of one listing request before it fails.
const ATTEMPTS: u32 = 5;

/// One S3 bucket: its client and what a hand-made request to it needs.
#[derive(Debug)]
pub struct S3Bucket {
    pub(crate) store: Arc<AmazonS3>,
    /// `https://s3.<region>.amazonaws.com/<bucket>`, or the endpoint's equivalent.
    pub(crate) url: String,
    pub(crate) region: String,
    pub(crate) name: String,
    pub(crate) timeout: Duration,
    /// Made on first use: only the finalizer lists uploads.
    pub(crate) http: OnceLock<reqwest::Client>,
}

/// An upload begun and neither completed nor aborted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenUpload {
    pub key: String,
    pub upload_id: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct ListResult {
    #[serde(default)]
    is_truncated: bool,
    #[serde(default)]
    next_key_marker: Option<String>,
    #[serde(default)]
    next_upload_id_marker: Option<String>,
    #[serde(default, rename = "Upload")]
    uploads: Vec<UploadEntry>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct UploadEntry {
    key: String,
    upload_id: String,
}

impl S3Bucket {
    pub fn store(&self) -> Arc<dyn ObjectStore> {
        self.store.clone()
    }

    fn uri(&self, prefix: &Path) -> String {
        format!("s3://{}/{}", self.name, prefix)
    }

    /// Every open upload whose key starts with `prefix/`.
    pub async fn open_uploads(&self, prefix: &Path) -> Result<Vec<OpenUpload>, StorageError> {
        let uri = self.uri(prefix);
        let fail = |message: String| StorageError::Request {
            uri: uri.clone(),
            message,
        };
        let key_prefix = if prefix.as_ref().is_empty() {
            String::new()
        } else {
            format!("{prefix}/")
        };
        let mut found = Vec::new();
        let mut markers: Option<(String, String)> = None;
        loop {
            let mut url = url::Url::parse(&self.url).map_err(|e| fail(e.to_string()))?;
            {
                let mut q = url.query_pairs_mut();
                q.append_pair("uploads", "");
                q.append_pair("prefix", &key_prefix);
                if let Some((key, upload)) = &markers {
                    q.append_pair("key-marker", key);
                    q.append_pair("upload-id-marker", upload);
                }
            }
            let body = self.signed_get(&url).await.map_err(fail)?;
            let page: ListResult = quick_xml::de::from_str(&body)
                .map_err(|e| fail(format!("unreadable ListMultipartUploads answer: {e}")))?;
            found.extend(page.uploads.into_iter().map(|u| OpenUpload {
                key: u.key,
                upload_id: u.upload_id,
            }));
            let next = match (page.next_key_marker, page.next_upload_id_marker) {
                (Some(key), Some(upload)) if page.is_truncated => Some((key, upload)),
                _ => None,
            };
            // A page that does not move the markers on ends the listing rather than loop.
            if next.is_none() || next == markers {
                return Ok(found);
            }
            markers = next;
        }
    }

    /// Aborts every open upload under `prefix` whose key `which` picks; answers how many.
    pub async fn abort_open_uploads(
        &self,
        prefix: &Path,
        which: impl Fn(&str) -> bool,
    ) -> Result<usize, StorageError> {
        let uploads = self.open_uploads(prefix).await?;
        let mut aborted = 0;
        for u in uploads.iter().filter(|u| which(&u.key)) {
            let path = Path::parse(&u.key).map_err(|e| StorageError::Request {
                uri: self.uri(prefix),
                message: format!("upload key `{}`: {e}", u.key),
            })?;
            self.store
                .abort_multipart(&path, &u.upload_id)
                .await
                .map_err(|e| StorageError::from_store(&self.uri(&path), e))?;
            aborted += 1;
        }
        Ok(aborted)
    }

    /// A signed GET, retried with backoff on throttling, 5xx and failed connections.
    async fn signed_get(&self, url: &url::Url) -> Result<String, String> {
        let mut delay = Duration::from_millis(100);
        for attempt in 1.. {
            match self.signed_get_once(url).await {
                Err((e, true)) if attempt < ATTEMPTS => {
                    tracing::debug!(%url, error = %e, attempt, "ListMultipartUploads retried");
                    tokio::time::sleep(delay).await;
                    delay *= 2;
                }
                answer => return answer.map_err(|(e, _)| e),
            }
        }
        unreachable!("the loop returns by its last attempt")
    }

    /// One signed GET: the body, or the error and whether trying again may help.
    async fn signed_get_once(&self, url: &url::Url) -> Result<String, (String, bool)> {
        let credential = self
            .store
            .credentials()
            .get_credential()
            .await
            .map_err(|e| (format!("credentials: {e}"), false))?;
        let mut request: HttpRequest = http::Request::builder()
            .method(http::Method::GET)
            .uri(url.as_str())
            .body(HttpRequestBody::from(Vec::new()))
            .map_err(|e| (e.to_string(), false))?;
        AwsAuthorizer::new(&credential, "s3", &self.region)
            .try_authorize(&mut request, None)
            .map_err(|e| (format!("signing: {e}"), false))?;
        let http = match self.http.get() {
            Some(http) => http,
            None => {
                let built = reqwest::Client::builder()
                    .timeout(self.timeout)
                    .connect_timeout(Duration::from_secs(5))
                    .build()
                    .map_err(|e| (format!("HTTP client: {e}"), false))?;
                self.http.get_or_init(|| built)
            }
        };
        let mut get = http.get(url.as_str());
        for (name, value) in request.headers() {
            get = get.header(name, value);
        }
        let answer = get.send().await.map_err(|e| (e.to_string(), true))?;
        let status = answer.status();
        let text = answer.text().await.map_err(|e| (e.to_string(), true))?;
        if !status.is_success() {
            let again = status.is_server_error() || status.as_u16() == 429;
            return Err((
                format!("ListMultipartUploads answered {status}: {text}"),
                again,
            ));
        }
        Ok(text)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;
    use crate::s3::{S3Settings, StaticKeys};

    fn page(uploads: &[(&str, &str)], next: Option<(&str, &str)>) -> String {
        let mut xml = String::from(
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\
             <ListMultipartUploadsResult xmlns=\"http://s3.amazonaws.com/doc/2006-03-01/\">\
             <Bucket>pages</Bucket>",
        );
        match next {
            Some((key, id)) => xml.push_str(&format!(
                "<IsTruncated>true</IsTruncated><NextKeyMarker>{key}</NextKeyMarker>\
                 <NextUploadIdMarker>{id}</NextUploadIdMarker>"
            )),
            None => xml.push_str("<IsTruncated>false</IsTruncated>"),
        }
        for (key, id) in uploads {
            xml.push_str(&format!(
                "<Upload><Key>{key}</Key><UploadId>{id}</UploadId>\
                 <Initiated>2026-11-28T00:00:00.000Z</Initiated></Upload>"
            ));
        }
        xml + "</ListMultipartUploadsResult>"
    }

    /// S3 answers ListMultipartUploads a page at a time (moto, the test server, does not page),
    /// so this endpoint serves the given pages in turn and records each request line.
    async fn serve(pages: Vec<String>) -> (String, Arc<Mutex<Vec<String>>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        tokio::spawn(async move {
            for body in pages {
                let (mut conn, _) = listener.accept().await.unwrap();
                let mut head = Vec::new();
                while !head.ends_with(b"\r\n\r\n") {
                    let mut byte = [0u8];
                    if conn.read(&mut byte).await.unwrap() == 0 {
                        break;
                    }
                    head.push(byte[0]);
                }
                let head = String::from_utf8_lossy(&head).to_string();
                assert!(head.contains("authorization: AWS4-HMAC-SHA256"), "{head}");
                log.lock()
                    .unwrap()
                    .push(head.lines().next().unwrap().to_string());
                let answer = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: application/xml\r\nContent-Length: {}\r\n\
                     Connection: close\r\n\r\n{body}",
                    body.len()
                );
                conn.write_all(answer.as_bytes()).await.unwrap();
            }
        });
        (endpoint, seen)
    }

    #[tokio::test]
    async fn a_truncated_listing_is_followed_page_by_page() {
        let (endpoint, seen) = serve(vec![
            page(
                &[("out/_parts/j/a", "u1"), ("out/_parts/j/b", "u2")],
                Some(("out/_parts/j/b", "u2")),
            ),
            page(&[("out/_parts/j/c", "u3")], None),
        ])
        .await;
        let settings = S3Settings {
            allow_http: true,
            region: Some("us-east-1".into()),
            endpoint: Some(endpoint),
            static_keys: Some(StaticKeys {
                key_id: "key".into(),
                secret_key: "secret".into(),
            }),
            ..Default::default()
        };
        let bucket = settings.build("pages").unwrap();
        let found = bucket
            .open_uploads(&Path::from("out/_parts/j"))
            .await
            .unwrap();
        let ids: Vec<&str> = found.iter().map(|u| u.upload_id.as_str()).collect();
        assert_eq!(ids, ["u1", "u2", "u3"]);
        let seen = seen.lock().unwrap().clone();
        assert_eq!(seen.len(), 2, "{seen:?}");
        assert!(
            seen[0].starts_with("GET /pages?uploads=&prefix=out%2F_parts%2Fj%2F "),
            "{seen:?}"
        );
        assert!(
            seen[1].contains("key-marker=out%2F_parts%2Fj%2Fb&upload-id-marker=u2"),
            "{seen:?}"
        );
    }
}
