//! Everything checked before a job is queued: the input exists and is Parquet, the mapped
//! columns exist with types the model accepts, the model is ONNX and its inputs and outputs
//! match the mapping, and the output can be written and holds no other job's output. Every
//! failure is one message naming the culprit; nothing is created until all checks pass.

use std::sync::Arc;

use arrow_schema::SchemaRef;
use futures::{StreamExt, TryStreamExt};
use nightshift_proto::JobSpec;
use nightshift_proto::wire::{InputFile, JobPlan, Manifest};
use nightshift_signature::{ModelSignature, plan_tensors};
use nightshift_storage::input_listing::input_base;
use nightshift_storage::location::canonical_uri;
use nightshift_storage::{
    FooterError, InputObject, ObjectReader, StorageError, Stores, list_inputs_upto, read_all,
};
use object_store::{ObjectStoreExt, PutMode, PutOptions, PutPayload};
use parquet::arrow::arrow_reader::{ArrowReaderMetadata, ArrowReaderOptions};

use crate::planner::plan_file;
use nightshift_metastore::output_key;

/// Footers read at once while planning.
const FOOTER_CONCURRENCY: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum JobCheckError {
    #[error("input: {0}")]
    Input(StorageError),
    #[error("input `{uri}` is not a Parquet file: {reason}")]
    NotParquet { uri: String, reason: String },
    #[error("input `{uri}` cannot be read: {reason}")]
    InputUnreadable { uri: String, reason: String },
    #[error("input `{uri}` has no rows")]
    EmptyInput { uri: String },
    #[error("model: {0}")]
    Model(StorageError),
    #[error("model: {0}")]
    NotOnnx(String),
    #[error("{0}")]
    Mapping(String),
    #[error("text.tokenizer: {0}")]
    TokenizerUnreadable(StorageError),
    #[error("text.tokenizer `{uri}` is not a tokenizer.json: {reason}")]
    NotTokenizer { uri: String, reason: String },
    #[error(
        "input files disagree on column `{column}`: `{first}` has {first_type}, `{other}` has {other_type}"
    )]
    SchemaMismatch {
        column: String,
        first: String,
        first_type: String,
        other: String,
        other_type: String,
    },
    #[error(
        "output `{uri}` already holds the committed output of job `{job}`; choose another output or remove it"
    )]
    OutputTaken { uri: String, job: String },
    #[error("output `{uri}` is not writable: {reason}")]
    OutputNotWritable { uri: String, reason: String },
    #[error(
        "output `{output}` overlaps the input `{input}`: a job never writes where it reads \
         (the same place, one inside the other, or a file the input matches)"
    )]
    OutputOverlapsInput { output: String, input: String },
}

/// Whether one of two locations lies inside the other (or they are the same).
fn overlap(a: &str, b: &str) -> bool {
    // In one spelling each: `s3a://b//data/` is the place `s3://b/data` names.
    let (a, b) = (output_key(&canonical_uri(a)), output_key(&canonical_uri(b)));
    a.starts_with(&b) || b.starts_with(&a)
}

/// The output is neither the input's place, nor inside it, nor around it.
fn check_apart(spec: &JobSpec) -> Result<(), JobCheckError> {
    let base = input_base(&spec.input.uri);
    if !base.is_empty() && overlap(base, &spec.output.uri) {
        return Err(JobCheckError::OutputOverlapsInput {
            output: spec.output.uri.clone(),
            input: spec.input.uri.clone(),
        });
    }
    Ok(())
}

/// A `[text]` job's tokenizer loads.
async fn check_tokenizer(stores: &Stores, spec: &JobSpec) -> Result<(), JobCheckError> {
    let Some(text) = &spec.text else {
        return Ok(());
    };
    let loc = stores
        .locate(&text.tokenizer)
        .map_err(JobCheckError::TokenizerUnreadable)?;
    let bytes = read_all(&loc)
        .await
        .map_err(JobCheckError::TokenizerUnreadable)?;
    tokenizers::Tokenizer::from_bytes(&bytes).map_err(|e| JobCheckError::NotTokenizer {
        uri: text.tokenizer.clone(),
        reason: e.to_string(),
    })?;
    Ok(())
}

/// What planning learns once per job and checks every input file against: the model's
/// signature, and the output schema of the first file planned.
pub struct Planner<'a> {
    stores: &'a Stores,
    spec: &'a JobSpec,
    signature: Arc<ModelSignature>,
    output_schema: Option<(SchemaRef, String)>,
}

impl<'a> Planner<'a> {
    /// Checks the model, the tokenizer, and that the output lies apart from the input.
    pub async fn new(stores: &'a Stores, spec: &'a JobSpec) -> Result<Self, JobCheckError> {
        let model_loc = stores
            .locate(&spec.model.uri)
            .map_err(JobCheckError::Model)?;
        let model_bytes = read_all(&model_loc).await.map_err(JobCheckError::Model)?;
        let signature = Arc::new(
            ModelSignature::from_onnx_bytes(&spec.model.uri, &model_bytes)
                .map_err(|e| JobCheckError::NotOnnx(e.to_string()))?,
        );
        drop(model_bytes);
        check_tokenizer(stores, spec).await?;
        check_apart(spec)?;
        Ok(Planner {
            stores,
            spec,
            signature,
            output_schema: None,
        })
    }

    /// Reads the footers of `objects`, the job's input files from index `first` on, checks
    /// each against the model and the files before it, and cuts their shards.
    pub async fn plan(
        &mut self,
        objects: &[InputObject],
        first: u32,
    ) -> Result<JobPlan, JobCheckError> {
        if let Some(inside) = objects
            .iter()
            .find(|o| overlap(&o.location.uri(), &self.spec.output.uri))
        {
            return Err(JobCheckError::OutputOverlapsInput {
                output: self.spec.output.uri.clone(),
                input: inside.location.uri(),
            });
        }
        let footers: Vec<ArrowReaderMetadata> = futures::stream::iter(objects)
            .map(read_footer)
            .buffered(FOOTER_CONCURRENCY)
            .try_collect()
            .await?;
        let mut plan = JobPlan {
            files: Vec::with_capacity(objects.len()),
            shards: Vec::new(),
            rows_total: 0,
        };
        for (index, (object, meta)) in (first..).zip(objects.iter().zip(&footers)) {
            let uri = object.location.uri();
            self.check_file(&uri, meta)?;
            let groups: Vec<u64> = meta
                .metadata()
                .row_groups()
                .iter()
                .map(|g| g.num_rows().max(0) as u64)
                .collect();
            plan.rows_total += groups.iter().sum::<u64>();
            plan.shards
                .extend(plan_file(index, &groups, self.spec.shards.rows));
            plan.files.push(InputFile {
                uri,
                size: object.meta.size,
                etag: object.meta.e_tag.clone(),
            });
        }
        Ok(plan)
    }

    /// One file's columns map onto the model, with the output types of the first file.
    fn check_file(&mut self, uri: &str, meta: &ArrowReaderMetadata) -> Result<(), JobCheckError> {
        let tensors = plan_tensors(self.spec, &self.signature, meta.schema(), uri)
            .map_err(|e| JobCheckError::Mapping(e.to_string()))?;
        let Some((first, first_uri)) = &self.output_schema else {
            self.output_schema = Some((tensors.output_schema.clone(), uri.to_string()));
            return Ok(());
        };
        for (a, b) in first.fields().iter().zip(tensors.output_schema.fields()) {
            if a.data_type() != b.data_type() {
                return Err(JobCheckError::SchemaMismatch {
                    column: a.name().clone(),
                    first: first_uri.clone(),
                    first_type: a.data_type().to_string(),
                    other: uri.to_string(),
                    other_type: b.data_type().to_string(),
                });
            }
        }
        Ok(())
    }

    /// The output holds no other job's committed output and can be written.
    pub async fn check_output(&self) -> Result<(), JobCheckError> {
        check_output(self.stores, self.spec).await
    }
}

/// An input file's Parquet footer (no row data is read).
async fn read_footer(object: &InputObject) -> Result<ArrowReaderMetadata, JobCheckError> {
    let not_parquet = |reason: String| JobCheckError::NotParquet {
        uri: object.location.uri(),
        reason,
    };
    let mut reader = ObjectReader::new(object.location.clone(), object.meta.size, None);
    let footer = reader
        .footer()
        .await
        .map_err(|e| match FooterError::from(e) {
            FooterError::Storage(e) => JobCheckError::Input(e),
            FooterError::NotParquet(reason) => not_parquet(reason),
        })?;
    ArrowReaderMetadata::try_new(footer, ArrowReaderOptions::new())
        .map_err(|e| not_parquet(e.to_string()))
}

/// What the checks before a job is accepted decided.
#[derive(Debug)]
pub enum Checked {
    /// An input of few files, planned whole.
    Planned(JobPlan),
    /// An input of many files: checked on one of them (`sample`), the rest to be planned in
    /// the background.
    Sampled { sample: String },
}

/// Checks a spec against its model, output and input. An input of at most `inline_files`
/// files is planned whole; a larger one is checked on one file (the first the store lists).
pub async fn check_job(
    stores: &Stores,
    spec: &JobSpec,
    inline_files: usize,
) -> Result<Checked, JobCheckError> {
    let mut planner = Planner::new(stores, spec).await?;
    let listing = list_inputs_upto(stores, &spec.input.uri, inline_files)
        .await
        .map_err(JobCheckError::Input)?;
    if !listing.complete {
        let sample = &listing.objects[..1];
        planner.plan(sample, 0).await?;
        planner.check_output().await?;
        return Ok(Checked::Sampled {
            sample: sample[0].location.uri(),
        });
    }
    let plan = planner.plan(&listing.objects, 0).await?;
    if plan.rows_total == 0 {
        return Err(JobCheckError::EmptyInput {
            uri: spec.input.uri.clone(),
        });
    }
    planner.check_output().await?;
    Ok(Checked::Planned(plan))
}

/// The output holds no committed output of another job, and a probe object can be written.
pub async fn check_output(stores: &Stores, spec: &JobSpec) -> Result<(), JobCheckError> {
    let uri = spec.output.uri.clone();
    let not_writable = |reason: String| JobCheckError::OutputNotWritable {
        uri: uri.clone(),
        reason,
    };
    let out = stores
        .locate(&uri)
        .map_err(|e| not_writable(e.to_string()))?;
    if out.is_local() {
        let p = std::path::Path::new(&out.uri()).to_path_buf();
        if p.exists() && !p.is_dir() {
            return Err(not_writable("it is a file, not a directory".into()));
        }
    }
    let manifest = out.join("_manifest.json");
    match read_all(&manifest).await {
        Ok(bytes) => {
            let job = serde_json::from_slice::<Manifest>(&bytes)
                .map(|m| m.job)
                .unwrap_or_else(|_| "unknown".into());
            return Err(JobCheckError::OutputTaken { uri, job });
        }
        Err(StorageError::NotFound { .. }) => {}
        Err(e) => return Err(not_writable(e.to_string())),
    }
    let probe = out.join(&format!("_parts/.probe-{}", uuid::Uuid::new_v4().simple()));
    let put = probe
        .store()
        .put_opts(
            probe.path(),
            PutPayload::from_static(b"nightshift"),
            PutOptions {
                mode: PutMode::Create,
                ..Default::default()
            },
        )
        .await;
    if let Err(e) = put {
        return Err(not_writable(
            StorageError::from_store(&probe.uri(), e).to_string(),
        ));
    }
    let _ = probe.store().delete(probe.path()).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(input: &str, output: &str) -> JobSpec {
        JobSpec::from_toml(&format!(
            "name = \"j\"\n[input]\nuri = \"{input}\"\n[model]\nuri = \"s3://m/m.onnx\"\n\
             [model.inputs]\nx = \"f\"\n[model.outputs]\ny = \"y\"\n[output]\nuri = \"{output}\"\n"
        ))
        .unwrap()
    }

    #[test]
    fn an_output_inside_its_input_is_refused_however_either_is_spelled() {
        for input in [
            "s3://b/data/",
            "s3a://b/data/*.parquet",
            "s3://b//data/",
            "s3://b/data",
        ] {
            let err = check_apart(&spec(input, "s3://b/data/scores/")).unwrap_err();
            assert!(
                matches!(err, JobCheckError::OutputOverlapsInput { .. }),
                "{input}: {err}"
            );
        }
        assert!(check_apart(&spec("s3a://b/data/", "s3://b/data-scores/")).is_ok());
        assert!(overlap("s3a://b/data/x.parquet", "s3://b/data"));
    }
}
