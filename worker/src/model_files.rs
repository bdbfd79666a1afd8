//! Models (and tokenizers) as local files: a local model is used where it lies; a remote one is fetched once
//! into a cache directory keyed by its ETag, so many shards and restarts do not download it
//! again. The signature is read once per model version.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use nightshift_signature::ModelSignature;
use nightshift_storage::{StorageError, Stores, read_all};
use object_store::ObjectStoreExt;
use sha2::{Digest, Sha256};
use tokenizers::Tokenizer;

use crate::shard_error::ShardError;

/// One version of a model, on local disk.
#[derive(Debug, Clone)]
pub struct ModelFile {
    pub uri: String,
    pub path: PathBuf,
    /// Identifies the version: the URI and its ETag.
    pub key: String,
    pub signature: Arc<ModelSignature>,
}

pub struct ModelFiles {
    cache_dir: PathBuf,
    known: Mutex<HashMap<String, ModelFile>>,
    tokenizers: Mutex<HashMap<String, Arc<Tokenizer>>>,
    /// Remote fetches done (not cache hits), for tests and logs.
    downloads: std::sync::atomic::AtomicU64,
}

impl ModelFiles {
    pub fn new(cache_dir: PathBuf) -> Self {
        Self {
            cache_dir,
            known: Mutex::new(HashMap::new()),
            tokenizers: Mutex::new(HashMap::new()),
            downloads: Default::default(),
        }
    }

    pub fn downloads(&self) -> u64 {
        self.downloads.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub async fn get(&self, stores: &Stores, uri: &str) -> Result<ModelFile, ShardError> {
        let (path, key) = self.local_copy(stores, uri, Cached::Model).await?;
        if let Some(m) = self.lock().get(&key) {
            return Ok(m.clone());
        }
        let bytes = read_local(uri, &path)?;
        let signature = ModelSignature::from_onnx_bytes(uri, &bytes).map_err(|e| {
            ShardError::Model(crate::model_session::ModelError::Load {
                uri: uri.to_string(),
                reason: e.to_string(),
            })
        })?;
        let file = ModelFile {
            uri: uri.to_string(),
            path,
            key: key.clone(),
            signature: Arc::new(signature),
        };
        self.lock().insert(key, file.clone());
        Ok(file)
    }

    /// A `[text]` job's tokenizer (`tokenizer.json`), loaded once per version.
    pub async fn tokenizer(
        &self,
        stores: &Stores,
        uri: &str,
    ) -> Result<Arc<Tokenizer>, ShardError> {
        let (path, key) = self.local_copy(stores, uri, Cached::Tokenizer).await?;
        let mut known = self.tokenizers.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(t) = known.get(&key) {
            return Ok(t.clone());
        }
        let tokenizer = Tokenizer::from_file(&path).map_err(|e| {
            ShardError::Model(crate::model_session::ModelError::Load {
                uri: uri.to_string(),
                reason: format!("not a tokenizer.json: {e}"),
            })
        })?;
        let tokenizer = Arc::new(tokenizer);
        known.insert(key, tokenizer.clone());
        Ok(tokenizer)
    }

    /// A local path of `uri`'s current version, and the key naming that version (URI and
    /// ETag): a local file where it lies, a remote one fetched once into the cache.
    async fn local_copy(
        &self,
        stores: &Stores,
        uri: &str,
        kind: Cached,
    ) -> Result<(PathBuf, String), ShardError> {
        let loc = stores.locate(uri)?;
        let meta = loc
            .store()
            .head(loc.path())
            .await
            .map_err(|e| StorageError::from_store(uri, e))?;
        let etag = meta
            .e_tag
            .clone()
            .unwrap_or_else(|| format!("{}-{}", meta.size, meta.last_modified.timestamp_millis()));
        let key = format!("{uri}#{etag}");
        if loc.is_local() {
            return Ok((PathBuf::from(loc.uri()), key));
        }
        let name = format!(
            "{}-{}.{}",
            &hex::encode(Sha256::digest(uri.as_bytes()))[..16],
            &hex::encode(Sha256::digest(etag.as_bytes()))[..16],
            kind.extension()
        );
        let path = self.cache_dir.join(name);
        if !path.is_file() {
            let bytes = read_all(&loc).await?;
            write_atomically(&path, &bytes).map_err(|e| ShardError::Write {
                uri: path.display().to_string(),
                message: e.to_string(),
            })?;
            self.downloads
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let (path, bytes) = (path.display(), bytes.len());
            match kind {
                Cached::Model => tracing::info!(uri, %path, bytes, "model fetched into cache"),
                Cached::Tokenizer => {
                    tracing::info!(uri, %path, bytes, "tokenizer fetched into cache")
                }
            }
        }
        Ok((path, key))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, ModelFile>> {
        self.known.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// What a cached file is: its extension, and what the log calls it.
#[derive(Clone, Copy)]
enum Cached {
    Model,
    Tokenizer,
}

impl Cached {
    fn extension(self) -> &'static str {
        match self {
            Cached::Model => "onnx",
            Cached::Tokenizer => "json",
        }
    }
}

fn read_local(uri: &str, path: &Path) -> Result<Vec<u8>, ShardError> {
    std::fs::read(path).map_err(|e| ShardError::Read {
        uri: uri.to_string(),
        message: e.to_string(),
        class: nightshift_proto::FailureClass::Retryable,
    })
}

fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension(format!("tmp-{}", uuid::Uuid::new_v4()));
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}
