//! The job spec: what a user writes in a TOML file (or posts as JSON). Unknown keys are errors.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha2::{Digest, Sha256};

/// A whole job spec, defaults filled in.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct JobSpec {
    /// Letters, digits, '-' and '_'; at most 64 characters.
    pub name: String,
    pub input: InputSpec,
    pub model: ModelSpec,
    pub output: OutputSpec,
    #[serde(default)]
    pub batch: BatchSpec,
    #[serde(default)]
    pub shards: ShardSpec,
    #[serde(default)]
    pub retry: RetrySpec,
    #[serde(default)]
    pub errors: ErrorSpec,
    /// Higher runs first.
    #[serde(default)]
    pub priority: i32,
    /// Where the job's final status is posted when it ends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notify: Option<NotifySpec>,
    /// A string column the worker tokenizes into the model's token inputs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<TextSpec>,
    /// When the job should be done: a duration after submission (`"6h"`) or an RFC 3339
    /// time. The fleet scaler sizes the fleet to meet it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline: Option<String>,
}

/// `[text]`: a string column tokenized in the worker with a Hugging Face `tokenizer.json`.
/// Model inputs name its token tensors as `<column>.input_ids`, `<column>.attention_mask` and
/// `<column>.token_type_ids`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TextSpec {
    /// A Utf8 or LargeUtf8 input column.
    pub column: String,
    /// A `tokenizer.json`, local or `s3://`.
    pub tokenizer: String,
    /// Longer texts are truncated to this many tokens (counted in the job's status).
    #[serde(default = "default_max_length")]
    pub max_length: u32,
}

/// A token tensor of a `[text]` column, as `[model.inputs]` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TextField {
    InputIds,
    AttentionMask,
    TokenTypeIds,
}

impl TextField {
    pub const ALL: [TextField; 3] = [Self::InputIds, Self::AttentionMask, Self::TokenTypeIds];

    pub fn suffix(self) -> &'static str {
        match self {
            Self::InputIds => "input_ids",
            Self::AttentionMask => "attention_mask",
            Self::TokenTypeIds => "token_type_ids",
        }
    }
}

impl TextSpec {
    /// The token tensor `mapped` names (`body.input_ids`), if it names one of this column's.
    pub fn field(&self, mapped: &str) -> Option<TextField> {
        let suffix = mapped
            .strip_prefix(self.column.as_str())?
            .strip_prefix('.')?;
        TextField::ALL.into_iter().find(|f| f.suffix() == suffix)
    }

    /// The column name a token tensor is carried in between the worker's stages.
    pub fn carrier(&self, field: TextField) -> String {
        format!("{}.{}", self.column, field.suffix())
    }
}

/// `[model.outputs]` values: a column name, or a table that also pools, normalises and stores
/// the output as another float type.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(untagged)]
pub enum OutputTarget {
    Column(String),
    Shaped(OutputColumn),
}

/// `name = { column = "embedding", pool = "mean", normalize = true, dtype = "float16" }`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct OutputColumn {
    pub column: String,
    /// `[batch, seq, hidden]` outputs become one vector per row, over the row's real tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<Pool>,
    /// L2-normalise each row's vector.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub normalize: bool,
    /// The stored float type (the model's own when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dtype: Option<FloatType>,
}

/// How a `[batch, seq, hidden]` output becomes `[batch, hidden]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Pool {
    /// The mean over the row's real tokens (the attention mask).
    Mean,
    /// The first token's vector.
    Cls,
    /// The largest value over the row's real tokens.
    Max,
}

/// A stored float type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum FloatType {
    Float32,
    Float16,
}

impl OutputTarget {
    pub fn column(&self) -> &str {
        match self {
            Self::Column(c) => c,
            Self::Shaped(s) => &s.column,
        }
    }

    pub fn pool(&self) -> Option<Pool> {
        match self {
            Self::Column(_) => None,
            Self::Shaped(s) => s.pool,
        }
    }

    pub fn normalize(&self) -> bool {
        matches!(self, Self::Shaped(s) if s.normalize)
    }

    pub fn dtype(&self) -> Option<FloatType> {
        match self {
            Self::Column(_) => None,
            Self::Shaped(s) => s.dtype,
        }
    }
}

/// A string, or a table read as `OutputColumn` (whose errors name the bad key).
impl<'de> Deserialize<'de> for OutputTarget {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = OutputTarget;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(
                    "a column name, or a table with `column` (and `pool`, `normalize`, `dtype`)",
                )
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<OutputTarget, E> {
                Ok(OutputTarget::Column(v.to_string()))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<OutputTarget, A::Error> {
                let de = serde::de::value::MapAccessDeserializer::new(map);
                OutputColumn::deserialize(de).map(OutputTarget::Shaped)
            }
        }
        d.deserialize_any(Visitor)
    }
}

/// `[notify]`: a completion callback.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NotifySpec {
    /// `https://...`, or `http://` to this machine (see `spec_check::check_callback_url`).
    pub url: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct InputSpec {
    /// A Parquet file, a directory of them, or a glob; local path or `s3://bucket/...`.
    pub uri: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    pub uri: String,
    #[serde(default)]
    pub device: Device,
    /// ONNX input name -> input column.
    pub inputs: BTreeMap<String, String>,
    /// ONNX output name -> output column (or a table: column, pool, normalize, dtype).
    pub outputs: BTreeMap<String, OutputTarget>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct OutputSpec {
    /// A directory (local or `s3://bucket/prefix/`).
    pub uri: String,
    /// Input columns copied unchanged into every output row.
    #[serde(default)]
    pub passthrough: Vec<String>,
    /// Output files are sized toward this many MiB.
    #[serde(default = "default_target_file_mb")]
    pub target_file_mb: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BatchSpec {
    /// Rows per model call, or `"auto"`.
    #[serde(default)]
    pub size: BatchSize,
    /// Text jobs: padded tokens per model call at most (rows x the call's longest row).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u64>,
}

/// `batch.size`: a number of rows, or `"auto"`: as large as the device holds. A worker starts
/// an `auto` job's GPU calls at `AUTO_GPU_ROWS` and halves them on each out-of-memory error
/// until they fit; on the CPU, where memory is not the limit, `auto` is `DEFAULT_BATCH_ROWS`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BatchSize {
    Rows(u64),
    Auto,
}

/// Rows per model call unless the spec says otherwise.
pub const DEFAULT_BATCH_ROWS: u64 = 1024;
/// Where an `auto` batch starts on a GPU.
pub const AUTO_GPU_ROWS: u64 = 16_384;

impl Default for BatchSize {
    fn default() -> Self {
        BatchSize::Rows(DEFAULT_BATCH_ROWS)
    }
}

impl BatchSize {
    /// Rows per call to start with, on a GPU or not.
    pub fn start_rows(&self, on_gpu: bool) -> u64 {
        match self {
            BatchSize::Rows(n) => *n,
            BatchSize::Auto if on_gpu => AUTO_GPU_ROWS,
            BatchSize::Auto => DEFAULT_BATCH_ROWS,
        }
    }
}

impl fmt::Display for BatchSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BatchSize::Rows(n) => write!(f, "{n}"),
            BatchSize::Auto => f.write_str("auto"),
        }
    }
}

/// A number stays a number, so the hashes of specs with numeric sizes do not change.
impl Serialize for BatchSize {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            BatchSize::Rows(n) => s.serialize_u64(*n),
            BatchSize::Auto => s.serialize_str("auto"),
        }
    }
}

impl<'de> Deserialize<'de> for BatchSize {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = BatchSize;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a number of rows or \"auto\"")
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<BatchSize, E> {
                Ok(BatchSize::Rows(v))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<BatchSize, E> {
                u64::try_from(v)
                    .map(BatchSize::Rows)
                    .map_err(|_| E::invalid_value(serde::de::Unexpected::Signed(v), &self))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<BatchSize, E> {
                match v {
                    "auto" => Ok(BatchSize::Auto),
                    other => Err(E::invalid_type(serde::de::Unexpected::Str(other), &self)),
                }
            }
        }
        d.deserialize_any(Visitor)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ShardSpec {
    /// Target rows per shard, rounded to whole row groups.
    #[serde(default = "default_shard_rows")]
    pub rows: u64,
    /// Rows per output part: the most work a killed worker can lose.
    #[serde(default = "default_checkpoint_rows")]
    pub checkpoint_rows: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RetrySpec {
    /// Grants of one shard before it is dead (a drained release does not count).
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ErrorSpec {
    /// Poison rows tolerated before the job fails (default 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_rows: Option<u64>,
    /// Fraction of input rows tolerated as poison rows (0.0 - 1.0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_fraction: Option<f64>,
}

fn default_target_file_mb() -> u64 {
    256
}
fn default_shard_rows() -> u64 {
    200_000
}
fn default_checkpoint_rows() -> u64 {
    65_536
}
fn default_max_attempts() -> u32 {
    5
}
fn default_max_length() -> u32 {
    512
}

impl Default for ShardSpec {
    fn default() -> Self {
        Self {
            rows: default_shard_rows(),
            checkpoint_rows: default_checkpoint_rows(),
        }
    }
}
impl Default for RetrySpec {
    fn default() -> Self {
        Self {
            max_attempts: default_max_attempts(),
        }
    }
}

impl ErrorSpec {
    /// The most poison rows a job of `rows_total` input rows may have and still succeed.
    pub fn allowed_rows(&self, rows_total: u64) -> u64 {
        let by_rows = self.max_rows;
        let by_fraction = self
            .max_fraction
            .map(|f| (f * rows_total as f64).floor() as u64);
        match (by_rows, by_fraction) {
            (None, None) => 0,
            (Some(a), None) => a,
            (None, Some(b)) => b,
            (Some(a), Some(b)) => a.min(b),
        }
    }
}

/// A spec as stored: the JSON `serde_json::to_string` wrote.
impl TryFrom<String> for JobSpec {
    type Error = serde_json::Error;

    fn try_from(json: String) -> Result<Self, Self::Error> {
        serde_json::from_str(&json)
    }
}

impl JobSpec {
    /// A stable hash of the spec with its defaults filled in: the same spec always hashes the
    /// same, whatever its formatting, key order or omitted defaults.
    pub fn hash(&self) -> String {
        let canonical = serde_json::to_vec(self).unwrap_or_default();
        hex::encode(Sha256::digest(&canonical))
    }

    /// Every input column the job reads: model inputs (a `[text]` column for its token
    /// tensors), then passthrough, without repeats.
    pub fn input_columns(&self) -> Vec<String> {
        let text = |c: &String| match &self.text {
            Some(t) if t.field(c).is_some() => t.column.clone(),
            _ => c.clone(),
        };
        let mut seen = std::collections::HashSet::new();
        (self.model.inputs.values().map(text))
            .chain(self.output.passthrough.iter().cloned())
            .filter(|c| seen.insert(c.clone()))
            .collect()
    }
}

/// Where the model runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Device {
    /// CUDA when a usable CUDA provider is present, else CPU; the worker says which it chose.
    #[default]
    Auto,
    Cpu,
    /// CUDA device N; refused (never a silent CPU fallback) when CUDA is not usable.
    Cuda(u32),
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Auto => f.write_str("auto"),
            Device::Cpu => f.write_str("cpu"),
            Device::Cuda(0) => f.write_str("cuda"),
            Device::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl FromStr for Device {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(Device::Auto),
            "cpu" => Ok(Device::Cpu),
            "cuda" => Ok(Device::Cuda(0)),
            other => other
                .strip_prefix("cuda:")
                .and_then(|n| n.parse::<u32>().ok())
                .map(Device::Cuda)
                .ok_or_else(|| {
                    format!("unknown device `{other}`: expected auto, cpu, cuda or cuda:N")
                }),
        }
    }
}

impl Serialize for Device {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Device {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_round_trips() {
        for s in ["auto", "cpu", "cuda", "cuda:3"] {
            let d: Device = s.parse().unwrap();
            assert_eq!(d.to_string(), s);
        }
        assert!("gpu".parse::<Device>().unwrap_err().contains("gpu"));
        assert!("cuda:x".parse::<Device>().is_err());
    }

    #[test]
    fn allowed_rows_takes_the_stricter_limit() {
        let e = ErrorSpec {
            max_rows: Some(10),
            max_fraction: Some(0.001),
        };
        assert_eq!(e.allowed_rows(1_000), 1);
        assert_eq!(e.allowed_rows(1_000_000), 10);
        assert_eq!(ErrorSpec::default().allowed_rows(1_000_000), 0);
    }
}
