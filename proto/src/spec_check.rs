//! Parsing and checking a spec: every error names the key and, for TOML, the line.

use std::collections::HashSet;
use std::fmt;

use crate::spec::{BatchSize, JobSpec};
use crate::text::{TextError, check_text, excerpt};

/// Every string in `value`, object keys included, passes `check_text`; `at` is the dotted key.
fn check_strings(value: &serde_json::Value, at: &str) -> Result<(), TextError> {
    let child = |k: &str| {
        if at.is_empty() {
            excerpt(k)
        } else {
            format!("{at}.{}", excerpt(k))
        }
    };
    match value {
        serde_json::Value::String(s) => check_text(at, s),
        serde_json::Value::Array(items) => items
            .iter()
            .enumerate()
            .try_for_each(|(i, v)| check_strings(v, &format!("{at}[{i}]"))),
        serde_json::Value::Object(map) => map.iter().try_for_each(|(k, v)| {
            check_text(&child(k), k)?;
            check_strings(v, &child(k))
        }),
        _ => Ok(()),
    }
}

/// A spec that does not parse or breaks a rule. `key` is the dotted key (`batch.size`) and
/// `line` the 1-based line in the TOML source when known.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct SpecError {
    pub key: Option<String>,
    pub line: Option<usize>,
    pub message: String,
}

impl fmt::Display for SpecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("invalid spec")?;
        if let Some(line) = self.line {
            write!(f, ", line {line}")?;
        }
        if let Some(key) = &self.key {
            write!(f, ", key `{key}`")?;
        }
        write!(f, ": {}", self.message)
    }
}

pub const MAX_NAME_LEN: usize = 64;

/// The job id a job reference (`nightshift status X`, `/v1/jobs/X`) names, when it reads as
/// one rather than as a name: so no job may be named so.
pub fn job_id_of(reference: &str) -> Option<i64> {
    reference.parse().ok()
}
pub const MAX_BATCH_SIZE: u64 = 1 << 20;
pub const MAX_SHARD_ROWS: u64 = 1 << 31;
pub const MAX_ATTEMPTS: u32 = 100;
pub const MAX_TARGET_FILE_MB: u64 = 65_536;
/// The longest `text.max_length`.
pub const MAX_TEXT_TOKENS: u32 = 1 << 16;
/// The largest `batch.max_tokens`.
pub const MAX_BATCH_TOKENS: u64 = 1 << 26;

impl JobSpec {
    /// Parses a TOML spec and checks its rules.
    pub fn from_toml(src: &str) -> Result<JobSpec, SpecError> {
        let spec: JobSpec = toml::from_str(src).map_err(|e| toml_error(src, &e))?;
        spec.check().map_err(|mut e| {
            if let Some(key) = &e.key {
                e.line = line_of_key(src, key);
            }
            e
        })?;
        Ok(spec)
    }

    /// Parses a JSON spec (as the HTTP API receives it) and checks its rules.
    pub fn from_json(src: &[u8]) -> Result<JobSpec, SpecError> {
        let spec: JobSpec = serde_json::from_slice(src).map_err(|e| SpecError {
            key: None,
            line: Some(e.line()),
            message: e.to_string(),
        })?;
        spec.check()?;
        Ok(spec)
    }

    /// No string of the spec, key or value, holds a control character (they would reach the
    /// database, paths and logs).
    fn check_text(&self) -> Result<(), SpecError> {
        let value = serde_json::to_value(self).map_err(|e| SpecError {
            key: None,
            line: None,
            message: e.to_string(),
        })?;
        check_strings(&value, "").map_err(|e| SpecError {
            key: Some(e.field.clone()),
            line: None,
            message: format!(
                "holds a control character ({}) at character {}",
                e.found, e.at
            ),
        })
    }

    /// `[notify] url` is a callback URL (`check_callback_url`).
    fn check_notify(&self) -> Result<(), SpecError> {
        let Some(notify) = &self.notify else {
            return Ok(());
        };
        check_callback_url(&notify.url)
            .map(|_| ())
            .map_err(|message| SpecError {
                key: Some("notify.url".into()),
                line: None,
                message,
            })
    }

    /// `[text]` and what depends on it: its keys, the token tensors `[model.inputs]` names, the
    /// pooled outputs and `batch.max_tokens`.
    fn check_text_job(&self) -> Result<(), SpecError> {
        let err = |key: &str, message: String| {
            Err(SpecError {
                key: Some(key.to_string()),
                line: None,
                message,
            })
        };
        if let Some(n) = self.batch.max_tokens
            && !(1..=MAX_BATCH_TOKENS).contains(&n)
        {
            return err(
                "batch.max_tokens",
                format!("must be between 1 and {MAX_BATCH_TOKENS}, got {n}"),
            );
        }
        let Some(text) = &self.text else {
            if self.batch.max_tokens.is_some() {
                return err("batch.max_tokens", "applies to [text] jobs only".into());
            }
            if let Some((name, _)) = self.model.outputs.iter().find(|(_, o)| o.pool().is_some()) {
                return err(
                    &format!("model.outputs.{name}.pool"),
                    "pooling needs a [text] column: it pools over each row's tokens".into(),
                );
            }
            return Ok(());
        };
        if text.column.is_empty() {
            return err("text.column", "must not be empty".into());
        }
        if text.tokenizer.trim().is_empty() {
            return err("text.tokenizer", "must not be empty".into());
        }
        if !(1..=MAX_TEXT_TOKENS).contains(&text.max_length) {
            return err(
                "text.max_length",
                format!(
                    "must be between 1 and {MAX_TEXT_TOKENS}, got {}",
                    text.max_length
                ),
            );
        }
        let prefix = format!("{}.", text.column);
        for (name, col) in &self.model.inputs {
            if col.starts_with(&prefix) && text.field(col).is_none() {
                return err(
                    &format!("model.inputs.{name}"),
                    format!(
                        "`{col}` names no token tensor: use `{0}.input_ids`, `{0}.attention_mask` or `{0}.token_type_ids`",
                        text.column
                    ),
                );
            }
        }
        if !self.model.inputs.values().any(|c| text.field(c).is_some()) {
            return err(
                "model.inputs",
                format!(
                    "map a model input to `{}.input_ids`: [text] is tokenized for the model",
                    text.column
                ),
            );
        }
        Ok(())
    }

    /// The rules a parsed spec must follow beyond its types.
    pub fn check(&self) -> Result<(), SpecError> {
        let err = |key: &str, message: String| {
            Err(SpecError {
                key: Some(key.to_string()),
                line: None,
                message,
            })
        };
        self.check_text()?;
        self.check_notify()?;
        if let Some(Err(m)) = self.deadline.as_deref().map(crate::Deadline::parse) {
            return err("deadline", m);
        }
        if self.name.is_empty() || self.name.len() > MAX_NAME_LEN {
            return err(
                "name",
                format!(
                    "name `{}` must be 1 to {MAX_NAME_LEN} characters long",
                    excerpt(&self.name)
                ),
            );
        }
        if let Some(c) = self
            .name
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || *c == '-' || *c == '_'))
        {
            return err(
                "name",
                format!(
                    "name `{}` may hold only letters, digits, '-' and '_', not {c:?}",
                    excerpt(&self.name)
                ),
            );
        }
        if job_id_of(&self.name).is_some() {
            return err(
                "name",
                format!(
                    "name `{}` reads as a job id (commands take an id or a name); add a letter",
                    self.name
                ),
            );
        }
        for (key, uri) in [
            ("input.uri", &self.input.uri),
            ("model.uri", &self.model.uri),
            ("output.uri", &self.output.uri),
        ] {
            if uri.trim().is_empty() {
                return err(key, "must not be empty".into());
            }
        }
        if self.model.inputs.is_empty() {
            return err(
                "model.inputs",
                "map at least one ONNX input to an input column".into(),
            );
        }
        if self.model.outputs.is_empty() {
            return err(
                "model.outputs",
                "map at least one ONNX output to an output column".into(),
            );
        }
        let inputs = self
            .model
            .inputs
            .iter()
            .map(|(n, c)| ("model.inputs", n, c.as_str()));
        let outputs = (self.model.outputs.iter()).map(|(n, c)| ("model.outputs", n, c.column()));
        for (table, name, col) in inputs.chain(outputs) {
            if col.is_empty() {
                return err(
                    &format!("{table}.{name}"),
                    "column name must not be empty".into(),
                );
            }
        }
        self.check_text_job()?;
        // Sets, not lists: a spec of many columns is checked in linear time.
        let mut out_cols: HashSet<&str> = HashSet::new();
        for (name, target) in &self.model.outputs {
            let col = target.column();
            if !out_cols.insert(col) {
                return err(
                    &format!("model.outputs.{name}"),
                    format!("output column `{col}` is mapped twice"),
                );
            }
        }
        let mut seen: HashSet<&String> = HashSet::new();
        for col in &self.output.passthrough {
            let col_str = col.as_str();
            if !seen.insert(col) {
                return err(
                    "output.passthrough",
                    format!("column `{col}` is listed twice"),
                );
            }
            if out_cols.contains(&col_str) {
                return err(
                    "output.passthrough",
                    format!("column `{col}` is also a model output column"),
                );
            }
        }
        if let BatchSize::Rows(n) = self.batch.size
            && !(1..=MAX_BATCH_SIZE).contains(&n)
        {
            return err(
                "batch.size",
                format!("must be between 1 and {MAX_BATCH_SIZE} or \"auto\", got {n}"),
            );
        }
        if !(1..=MAX_SHARD_ROWS).contains(&self.shards.rows) {
            return err(
                "shards.rows",
                format!(
                    "must be between 1 and {MAX_SHARD_ROWS}, got {}",
                    self.shards.rows
                ),
            );
        }
        if !(1..=MAX_SHARD_ROWS).contains(&self.shards.checkpoint_rows) {
            return err(
                "shards.checkpoint_rows",
                format!(
                    "must be between 1 and {MAX_SHARD_ROWS}, got {}",
                    self.shards.checkpoint_rows
                ),
            );
        }
        if !(1..=MAX_ATTEMPTS).contains(&self.retry.max_attempts) {
            return err(
                "retry.max_attempts",
                format!(
                    "must be between 1 and {MAX_ATTEMPTS}, got {}",
                    self.retry.max_attempts
                ),
            );
        }
        if !(1..=MAX_TARGET_FILE_MB).contains(&self.output.target_file_mb) {
            return err(
                "output.target_file_mb",
                format!(
                    "must be between 1 and {MAX_TARGET_FILE_MB}, got {}",
                    self.output.target_file_mb
                ),
            );
        }
        if let Some(f) = self.errors.max_fraction
            && !(0.0..=1.0).contains(&f)
        {
            return err(
                "errors.max_fraction",
                format!("must be between 0.0 and 1.0, got {f}"),
            );
        }
        Ok(())
    }
}

/// Longest callback URL accepted.
pub const MAX_CALLBACK_URL_LEN: usize = 2048;

/// A completion callback URL: `https://` anywhere, or `http://` to a loopback address (a
/// receiver on the coordinator's own machine); no credentials in it, at most
/// `MAX_CALLBACK_URL_LEN` characters. The error says which rule it breaks.
pub fn check_callback_url(text: &str) -> Result<url::Url, String> {
    if text.len() > MAX_CALLBACK_URL_LEN {
        return Err(format!("must be at most {MAX_CALLBACK_URL_LEN} characters"));
    }
    let url =
        url::Url::parse(text).map_err(|e| format!("`{}` is not a URL: {e}", excerpt(text)))?;
    if !url.username().is_empty() || url.password().is_some() {
        return Err("must not hold credentials; the coordinator signs each POST instead".into());
    }
    let loopback = match url.host() {
        Some(url::Host::Domain(d)) => d == "localhost",
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        None => false,
    };
    match url.scheme() {
        "https" if url.host().is_some() => Ok(url),
        "http" if loopback => Ok(url),
        "http" => Err(format!(
            "`{}` must use https (plain http only to this machine: localhost, 127.0.0.1, ::1)",
            excerpt(text)
        )),
        _ => Err(format!("`{}` must be an https:// URL", excerpt(text))),
    }
}

/// Turns a TOML deserialization error into a SpecError with the line and, where the message
/// names a field, the dotted key.
fn toml_error(src: &str, e: &toml::de::Error) -> SpecError {
    let line = e
        .span()
        .map(|span| src[..span.start.min(src.len())].lines().count().max(1))
        .map(|l| {
            // A span that starts right after a newline belongs to the next line.
            let start = e.span().map(|s| s.start).unwrap_or(0);
            if start > 0 && src.as_bytes().get(start - 1) == Some(&b'\n') {
                l + 1
            } else {
                l
            }
        });
    let message = e.message().trim().to_string();
    let field = message
        .split('`')
        .nth(1)
        .filter(|_| message.starts_with("unknown field") || message.starts_with("missing field"))
        .map(str::to_string);
    let table = line.and_then(|l| table_at_line(src, l));
    // A wrong value is reported on its own line: the key is written there.
    let field = field.or_else(|| {
        let text = src.lines().nth(line? - 1)?;
        let (k, _) = text.split_once('=')?;
        let k = k.trim().trim_matches('"');
        (!k.is_empty() && !k.starts_with('[')).then(|| k.to_string())
    });
    let key = field.map(|f| match &table {
        Some(t) => format!("{t}.{f}"),
        None => f,
    });
    SpecError { key, line, message }
}

/// The `[table]` a 1-based line belongs to, if any.
fn table_at_line(src: &str, line: usize) -> Option<String> {
    src.lines()
        .take(line)
        .filter_map(|l| {
            let t = l.trim();
            t.strip_prefix('[')
                .and_then(|r| r.split(']').next())
                .map(|s| s.trim().to_string())
        })
        .last()
}

/// The 1-based line where a dotted key is written in a TOML source.
fn line_of_key(src: &str, key: &str) -> Option<usize> {
    let doc = toml_edit::Document::parse(src).ok()?;
    let mut item: &toml_edit::Item = doc.as_item();
    for part in key.split('.') {
        item = item.get(part)?;
    }
    let span = item.span()?;
    Some(src[..span.start].matches('\n').count() + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"name = "demo-scores"

[input]
uri = "data/demo/*.parquet"

[model]
uri = "models/mlp.onnx"
device = "auto"

[model.inputs]
x = "features"

[model.outputs]
logits = "logits"

[output]
uri = "out/demo-scores/"
passthrough = ["id"]

[batch]
size = 1024

[shards]
rows = 200000
"#;

    #[test]
    fn a_callback_is_https_or_http_to_this_machine() {
        let with = |url: &str| JobSpec::from_toml(&format!("{GOOD}\n[notify]\nurl = \"{url}\"\n"));
        for good in [
            "https://hooks.example.com/nightshift",
            "http://127.0.0.1:8080/hook",
            "http://localhost/hook",
            "http://[::1]:9/x",
        ] {
            let spec = with(good).unwrap_or_else(|e| panic!("{good}: {e}"));
            assert_eq!(spec.notify.map(|n| n.url).as_deref(), Some(good));
        }
        for (bad, says) in [
            ("http://hooks.example.com/x", "must use https"),
            ("ftp://127.0.0.1/x", "https:// URL"),
            ("https://user:pw@example.com/", "credentials"),
            ("hooks.example.com", "not a URL"),
        ] {
            let e = with(bad).unwrap_err();
            assert_eq!(e.key.as_deref(), Some("notify.url"), "{bad}: {e}");
            assert!(e.message.contains(says), "{bad}: {e}");
            assert!(e.line.is_some(), "{bad}: {e}");
        }
        let unknown = JobSpec::from_toml(&format!("{GOOD}\n[notify]\nuri = \"x\"\n")).unwrap_err();
        assert!(unknown.to_string().contains("uri"), "{unknown}");
        assert!(JobSpec::from_toml(GOOD).unwrap().notify.is_none());
    }

    #[test]
    fn control_characters_anywhere_are_refused_naming_the_key() {
        let nul = GOOD.replace("out/demo-scores/", "out/demo\\u0000/");
        let e = JobSpec::from_toml(&nul).unwrap_err();
        assert_eq!(e.key.as_deref(), Some("output.uri"), "{e}");
        assert!(e.message.contains("control character"), "{e}");
        let newline = GOOD.replace("passthrough = [\"id\"]", "passthrough = [\"id\\nx\"]");
        let e = JobSpec::from_toml(&newline).unwrap_err();
        assert_eq!(e.key.as_deref(), Some("output.passthrough[0]"), "{e}");
        let key = GOOD.replace("x = \"features\"", "\"x\\u0001\" = \"features\"");
        let e = JobSpec::from_toml(&key).unwrap_err();
        assert!(
            e.key.as_deref().unwrap_or("").starts_with("model.inputs."),
            "{e}"
        );
        let long = GOOD.replace("demo-scores\"", &format!("{}\"", "n".repeat(10_000)));
        let e = JobSpec::from_toml(&long).unwrap_err();
        assert!(e.to_string().len() < 300, "{e}");
    }

    const TEXT: &str = r#"name = "embed"

[input]
uri = "data/texts/*.parquet"

[text]
column = "body"
tokenizer = "models/e5/tokenizer.json"

[model]
uri = "models/e5/model.onnx"

[model.inputs]
input_ids = "body.input_ids"
attention_mask = "body.attention_mask"

[model.outputs]
last_hidden_state = { column = "embedding", pool = "mean", normalize = true, dtype = "float16" }

[output]
uri = "out/embeddings/"
passthrough = ["id"]
"#;

    #[test]
    fn a_text_spec_reads_its_tokens_pooling_and_column() {
        let spec = JobSpec::from_toml(TEXT).unwrap();
        let text = spec.text.clone().unwrap();
        assert_eq!(text.max_length, 512);
        assert_eq!(
            text.field("body.attention_mask"),
            Some(crate::TextField::AttentionMask)
        );
        assert_eq!(text.field("bodyx.input_ids"), None);
        assert_eq!(spec.input_columns(), vec!["body", "id"]);
        let out = &spec.model.outputs["last_hidden_state"];
        assert_eq!(out.column(), "embedding");
        assert_eq!(out.pool(), Some(crate::Pool::Mean));
        assert!(out.normalize());
        assert_eq!(out.dtype(), Some(crate::FloatType::Float16));
        // The plain form keeps its meaning, and its JSON (and so the spec hash) is unchanged.
        let plain = JobSpec::from_toml(GOOD).unwrap();
        assert_eq!(
            plain.model.outputs["logits"],
            crate::OutputTarget::Column("logits".into())
        );
        let json = serde_json::to_value(&plain).unwrap();
        assert_eq!(json["model"]["outputs"]["logits"], "logits");
        assert_eq!(
            JobSpec::from_json(&serde_json::to_vec(&spec).unwrap()).unwrap(),
            spec
        );
    }

    #[test]
    fn bad_text_specs_are_refused_naming_the_key() {
        let cases = [
            (
                TEXT.replace("column = \"body\"", "column = \"\""),
                "text.column",
            ),
            (
                TEXT.replace(
                    "tokenizer = \"models/e5/tokenizer.json\"",
                    "tokenizer = \" \"",
                ),
                "text.tokenizer",
            ),
            (
                TEXT.replace("[text]\n", "[text]\nmax_length = 0\n"),
                "text.max_length",
            ),
            (
                TEXT.replace("\"body.attention_mask\"", "\"body.mask\""),
                "model.inputs.attention_mask",
            ),
            (
                TEXT.replace(
                    "input_ids = \"body.input_ids\"\nattention_mask = \"body.attention_mask\"",
                    "x = \"other\"",
                ),
                "model.inputs",
            ),
            (
                format!("{TEXT}\n[batch]\nmax_tokens = 0\n"),
                "batch.max_tokens",
            ),
            (
                GOOD.replace("[batch]\n", "[batch]\nmax_tokens = 4096\n"),
                "batch.max_tokens",
            ),
            (
                GOOD.replace(
                    "logits = \"logits\"",
                    "logits = { column = \"l\", pool = \"mean\" }",
                ),
                "model.outputs.logits.pool",
            ),
        ];
        for (toml, key) in cases {
            let e = JobSpec::from_toml(&toml).unwrap_err();
            assert_eq!(e.key.as_deref(), Some(key), "{e}");
        }
        // Unknown pooling and unknown keys in an output table name what is wrong.
        let e = JobSpec::from_toml(&TEXT.replace("\"mean\"", "\"median\"")).unwrap_err();
        assert!(e.message.contains("median"), "{e}");
        let e =
            JobSpec::from_toml(&TEXT.replace("normalize = true", "normalise = true")).unwrap_err();
        assert!(e.message.contains("normalise"), "{e}");
    }

    #[test]
    fn parses_the_documented_spec() {
        let spec = JobSpec::from_toml(GOOD).unwrap();
        assert_eq!(spec.name, "demo-scores");
        assert_eq!(spec.model.inputs["x"], "features");
        assert_eq!(spec.batch.size, BatchSize::Rows(1024));
        assert_eq!(spec.retry.max_attempts, 5);
        assert_eq!(spec.input_columns(), vec!["features", "id"]);
    }

    #[test]
    fn hash_ignores_formatting_and_defaults() {
        let a = JobSpec::from_toml(GOOD).unwrap();
        let b = JobSpec::from_toml(&GOOD.replace("[batch]\nsize = 1024\n", "")).unwrap();
        assert_eq!(a.hash(), b.hash());
        let c = JobSpec::from_toml(&GOOD.replace("size = 1024", "size = 512")).unwrap();
        assert_ne!(a.hash(), c.hash());
        let json = serde_json::to_vec(&a).unwrap();
        assert_eq!(JobSpec::from_json(&json).unwrap().hash(), a.hash());
    }

    #[test]
    fn unknown_key_names_key_and_line() {
        let src = GOOD.replace("size = 1024", "size = 1024\nsizes = 3");
        let e = JobSpec::from_toml(&src).unwrap_err();
        assert_eq!(e.key.as_deref(), Some("batch.sizes"), "{e}");
        assert_eq!(e.line, Some(22), "{e}");
        assert!(e.to_string().contains("sizes"), "{e}");
    }

    #[test]
    fn missing_key_names_table_and_key() {
        let src = GOOD.replace("uri = \"models/mlp.onnx\"\n", "");
        let e = JobSpec::from_toml(&src).unwrap_err();
        assert!(e.to_string().contains("uri"), "{e}");
        assert_eq!(e.key.as_deref(), Some("model.uri"), "{e}");
        let e = JobSpec::from_toml(&GOOD.replace("name = \"demo-scores\"\n", "")).unwrap_err();
        assert!(e.to_string().contains("missing field `name`"), "{e}");
    }

    #[test]
    fn batch_size_is_rows_or_auto_and_numbers_hash_as_before() {
        let auto = JobSpec::from_toml(&GOOD.replace("size = 1024", "size = \"auto\"")).unwrap();
        assert_eq!(auto.batch.size, BatchSize::Auto);
        assert_eq!(auto.batch.size.start_rows(true), crate::spec::AUTO_GPU_ROWS);
        assert_eq!(
            auto.batch.size.start_rows(false),
            crate::spec::DEFAULT_BATCH_ROWS
        );
        let json = serde_json::to_value(&auto).unwrap();
        assert_eq!(json["batch"]["size"], "auto");
        let numbered = JobSpec::from_toml(GOOD).unwrap();
        assert_eq!(
            serde_json::to_value(&numbered).unwrap()["batch"]["size"],
            1024
        );
        assert_eq!(
            JobSpec::from_json(&serde_json::to_vec(&auto).unwrap()).unwrap(),
            auto
        );
        let e = JobSpec::from_toml(&GOOD.replace("size = 1024", "size = -3")).unwrap_err();
        assert_eq!(e.key.as_deref(), Some("batch.size"), "{e}");
    }

    #[test]
    fn wrong_type_names_line() {
        let e = JobSpec::from_toml(&GOOD.replace("size = 1024", "size = \"big\"")).unwrap_err();
        assert_eq!(e.line, Some(21), "{e}");
        assert_eq!(e.key.as_deref(), Some("batch.size"), "{e}");
        assert!(e.to_string().contains("line 21"), "{e}");
    }

    #[test]
    fn rules_name_the_key_and_line() {
        let cases = [
            ("name = \"demo-scores\"", "name = \"bad name!\"", "name", 1),
            ("size = 1024", "size = 0", "batch.size", 21),
            ("size = 1024", "size = 100000000", "batch.size", 21),
            ("rows = 200000", "rows = 0", "shards.rows", 24),
            ("rows = 200000", "rows = 99999999999999", "shards.rows", 24),
            ("device = \"auto\"", "device = \"tpu\"", "", 8),
        ];
        for (from, to, key, line) in cases {
            let e = JobSpec::from_toml(&GOOD.replace(from, to)).unwrap_err();
            if !key.is_empty() {
                assert_eq!(e.key.as_deref(), Some(key), "{to}: {e}");
            }
            assert_eq!(e.line, Some(line), "{to}: {e}");
        }
        for id in ["42", "007", "-5"] {
            let named = GOOD.replace("demo-scores", id);
            let e = JobSpec::from_toml(&named).unwrap_err();
            assert_eq!(e.key.as_deref(), Some("name"), "{id}: {e}");
            assert!(e.message.contains("reads as a job id"), "{id}: {e}");
        }
        JobSpec::from_toml(&GOOD.replace("demo-scores", "2026-11-28")).unwrap();
        let long = format!("name = \"{}\"", "a".repeat(65));
        let e = JobSpec::from_toml(&GOOD.replace("name = \"demo-scores\"", &long)).unwrap_err();
        assert!(e.message.contains("1 to 64"), "{e}");
    }

    #[test]
    fn passthrough_clash_is_refused() {
        let e = JobSpec::from_toml(&GOOD.replace("[\"id\"]", "[\"id\", \"logits\"]")).unwrap_err();
        assert!(e.message.contains("logits"), "{e}");
    }
}
