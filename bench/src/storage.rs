//! Object storage, against a local S3-compatible server (moto, started here through the test
//! harness):
//!
//!   cargo run --release -p nightshift-bench -- storage
//!
//! (a) Read amplification: a multi-row-group Parquet file is uploaded, then subsets of its row
//! groups and columns are read the way the worker reads them (`ObjectReader` under parquet's
//! `ParquetRecordBatchStreamBuilder`). Bytes fetched are divided by the bytes the read needs:
//! the compressed column chunks of the selected row groups and columns (from the footer) plus
//! the footer itself. 1.0 means nothing was fetched that was not needed.
//!
//! (b) Upload throughput: `PartUpload` of the same bytes in 8 MiB writes (one PUT below
//! 16 MiB, a multipart upload above) over one plain `put` of all the bytes, in this process,
//! against the same server; and over object_store's own `WriteMultipart` with PartUpload's
//! part size and concurrency, which separates what multipart costs on the server from what
//! PartUpload adds.

use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use futures::StreamExt;
use nightshift_storage::{ObjectReader, PartUpload, ReadCounter};
use nightshift_tests::S3Server;
use nightshift_tests::python::run_script;
use object_store::{ObjectStoreExt, PutPayload, WriteMultipart};
use parquet::arrow::ProjectionMask;
use parquet::arrow::arrow_reader::{ArrowReaderMetadata, ArrowReaderOptions};
use parquet::arrow::async_reader::ParquetRecordBatchStreamBuilder;
use parquet::arrow::async_writer::AsyncFileWriter;
use parquet::file::metadata::ParquetMetaData;

const BUCKET: &str = "bench-storage";
const MIB: usize = 1024 * 1024;

#[derive(clap::Args)]
pub struct Args {
    /// Rows of the generated Parquet file.
    #[arg(long, default_value_t = 400_000)]
    rows: usize,
    /// Rows per row group.
    #[arg(long, default_value_t = 20_000)]
    row_group_rows: usize,
    /// Row groups read, `start..end` (a shard's range).
    #[arg(long, default_value = "5..10")]
    groups: String,
    /// MiB uploaded per measurement.
    #[arg(long, default_value_t = 128)]
    upload_mib: usize,
    /// Measurements of each upload side; the median is reported.
    #[arg(long, default_value_t = 3)]
    repeat: usize,
}

pub async fn run(a: Args) -> Result<()> {
    let s3 = S3Server::start().await?;
    s3.create_bucket(BUCKET).await?;
    println!("storage bench against moto at {}", s3.endpoint());
    read_amplification(&s3, &a).await?;
    upload_throughput(&s3, &a).await?;
    Ok(())
}

async fn read_amplification(s3: &S3Server, a: &Args) -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let out = tmp.path().join("data");
    let out_s = out.to_string_lossy().into_owned();
    let (rows, rg) = (a.rows.to_string(), a.row_group_rows.to_string());
    let args = [
        "--out",
        &out_s,
        "--rows",
        &rows,
        "--files",
        "1",
        "--row-group-rows",
        &rg,
    ];
    run_script("gen_data.py", &args);
    let local = out.join("part-000.parquet");
    let size = std::fs::metadata(&local)?.len();
    let footer_len = footer_len(&local)?;
    let uris = s3
        .upload_dir(&out, &format!("s3://{BUCKET}/input/"))
        .await?;
    let uri = uris.first().context("nothing uploaded")?;
    let loc = s3.locate(uri)?;

    let mut probe = ObjectReader::new(loc.clone(), size, None);
    let footer = probe.footer().await?;
    let groups = parse_groups(&a.groups, footer.num_row_groups())?;
    println!(
        "\n(a) read amplification: {} rows in {} row groups, {} bytes (footer {} bytes); \
         reading row groups {}..{}",
        a.rows,
        footer.num_row_groups(),
        size,
        footer_len,
        groups.start,
        groups.end
    );
    println!(
        "  {:<22} {:>12} {:>12} {:>8} {:>9}",
        "columns", "needed B", "fetched B", "ratio", "requests"
    );
    let cases: [&[&str]; 4] = [
        &["features"],
        &["id"],
        &["id", "group"],
        &["id", "features", "group"],
    ];
    for columns in cases {
        let counter = ReadCounter::default();
        let meta = loc.store().head(loc.path()).await?;
        let mut reader =
            ObjectReader::new(loc.clone(), meta.size, meta.e_tag).with_counter(counter.clone());
        // As the worker does: footer first, then the stream over the parsed metadata.
        let footer = reader.footer().await?;
        let metadata = ArrowReaderMetadata::try_new(footer.clone(), ArrowReaderOptions::new())?;
        let roots = root_indices(&footer, columns)?;
        let mask = ProjectionMask::roots(footer.file_metadata().schema_descr(), roots.clone());
        let mut stream = ParquetRecordBatchStreamBuilder::new_with_metadata(reader, metadata)
            .with_projection(mask)
            .with_row_groups(groups.clone().collect())
            .with_batch_size(8192)
            .build()?;
        let mut read_rows = 0;
        while let Some(batch) = stream.next().await {
            read_rows += batch?.num_rows();
        }
        let expected: i64 = groups.clone().map(|g| footer.row_group(g).num_rows()).sum();
        if read_rows as i64 != expected {
            bail!("read {read_rows} rows, expected {expected}");
        }
        let needed = needed_bytes(&footer, groups.clone(), &roots) + footer_len;
        println!(
            "  {:<22} {:>12} {:>12} {:>8.3} {:>9}",
            columns.join(","),
            needed,
            counter.bytes(),
            counter.bytes() as f64 / needed as f64,
            counter.requests()
        );
    }
    Ok(())
}

async fn upload_throughput(s3: &S3Server, a: &Args) -> Result<()> {
    let len = a.upload_mib * MIB;
    // Incompressible-looking bytes (nothing here compresses, but keep them honest).
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let data: Bytes = (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect::<Vec<u8>>()
        .into();
    println!(
        "\n(b) upload throughput: {} MiB, PartUpload in 8 MiB writes vs one put",
        a.upload_mib
    );
    let mut plain = Vec::new();
    let mut raw = Vec::new();
    let mut parts = Vec::new();
    for i in 0..a.repeat.max(1) {
        let uri = format!("s3://{BUCKET}/upload/put-{i}.bin");
        let loc = s3.locate(&uri)?;
        let t = Instant::now();
        loc.store()
            .put(loc.path(), PutPayload::from(data.clone()))
            .await
            .with_context(|| format!("put {uri}"))?;
        plain.push(len as f64 / MIB as f64 / t.elapsed().as_secs_f64());
        check_size(s3, &uri, len).await?;
        s3.delete(&uri).await?;

        // object_store's own multipart writer with PartUpload's part size and concurrency:
        // what a multipart upload costs on this server, apart from PartUpload.
        let uri = format!("s3://{BUCKET}/upload/multipart-{i}.bin");
        let loc = s3.locate(&uri)?;
        let t = Instant::now();
        let upload = loc.store().put_multipart(loc.path()).await?;
        let mut w = WriteMultipart::new_with_chunk_size(upload, 8 * MIB);
        let mut off = 0;
        while off < len {
            let end = (off + 8 * MIB).min(len);
            w.wait_for_capacity(4).await?;
            w.put(data.slice(off..end));
            off = end;
        }
        w.finish().await?;
        raw.push(len as f64 / MIB as f64 / t.elapsed().as_secs_f64());
        check_size(s3, &uri, len).await?;
        s3.delete(&uri).await?;

        let uri = format!("s3://{BUCKET}/upload/part-{i}.bin");
        let loc = s3.locate(&uri)?;
        let t = Instant::now();
        let mut up = PartUpload::new(loc);
        let mut off = 0;
        while off < len {
            let end = (off + 8 * MIB).min(len);
            up.write(data.slice(off..end)).await?;
            off = end;
        }
        up.complete().await?;
        parts.push(len as f64 / MIB as f64 / t.elapsed().as_secs_f64());
        check_size(s3, &uri, len).await?;
        s3.delete(&uri).await?;
        println!(
            "  run {}: put {:>7.1} MiB/s   WriteMultipart {:>7.1} MiB/s   PartUpload {:>7.1} MiB/s",
            i + 1,
            plain[i],
            raw[i],
            parts[i]
        );
    }
    let n = plain.len();
    let (p, r, u) = (median(&mut plain), median(&mut raw), median(&mut parts));
    println!("  single put                        : {p:>7.1} MiB/s (median of {n})");
    println!("  object_store WriteMultipart       : {r:>7.1} MiB/s (median of {n})");
    println!("  PartUpload                        : {u:>7.1} MiB/s (median of {n})");
    println!("  ratio PartUpload / put            : {:.3}", u / p);
    println!("  ratio PartUpload / WriteMultipart : {:.3}", u / r);
    Ok(())
}

async fn check_size(s3: &S3Server, uri: &str, len: usize) -> Result<()> {
    let loc = s3.locate(uri)?;
    let meta = loc.store().head(loc.path()).await?;
    if meta.size != len as u64 {
        bail!("{uri} holds {} bytes, expected {len}", meta.size);
    }
    Ok(())
}

/// Bytes of the footer: the metadata, its 4-byte length and the 4-byte magic.
fn footer_len(file: &Path) -> Result<u64> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(file)?;
    f.seek(SeekFrom::End(-8))?;
    let mut tail = [0u8; 8];
    f.read_exact(&mut tail)?;
    if &tail[4..] != b"PAR1" {
        bail!("{} is not a Parquet file", file.display());
    }
    Ok(u64::from(u32::from_le_bytes([tail[0], tail[1], tail[2], tail[3]])) + 8)
}

/// Compressed bytes of the column chunks under `roots` in row groups `groups`.
fn needed_bytes(meta: &ParquetMetaData, groups: std::ops::Range<usize>, roots: &[usize]) -> u64 {
    let schema = meta.file_metadata().schema_descr();
    groups
        .map(|g| {
            meta.row_group(g)
                .columns()
                .iter()
                .enumerate()
                .filter(|(leaf, _)| roots.contains(&schema.get_column_root_idx(*leaf)))
                .map(|(_, c)| c.byte_range().1)
                .sum::<u64>()
        })
        .sum()
}

fn root_indices(meta: &ParquetMetaData, columns: &[&str]) -> Result<Vec<usize>> {
    let fields = meta
        .file_metadata()
        .schema_descr()
        .root_schema()
        .get_fields();
    columns
        .iter()
        .map(|c| {
            fields
                .iter()
                .position(|f| f.name() == *c)
                .with_context(|| format!("no column `{c}`"))
        })
        .collect()
}

fn parse_groups(s: &str, count: usize) -> Result<std::ops::Range<usize>> {
    let (a, b) = s
        .split_once("..")
        .with_context(|| format!("--groups `{s}`: expected start..end"))?;
    let (a, b): (usize, usize) = (a.trim().parse()?, b.trim().parse()?);
    if a >= b || b > count {
        bail!("--groups {a}..{b}: the file has {count} row groups");
    }
    Ok(a..b)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}
