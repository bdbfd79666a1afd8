//! The storage crate against a real S3-compatible server (moto), directly and through a proxy
//! that injects faults: round trips, create-only uploads, ranged Parquet reads, the errors a
//! user sees, and retries that still deliver exact bytes.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use nightshift_coordinator::finalizer::{Garbage, collect_garbage};
use nightshift_storage::{
    FooterError, ObjectReader, PartUpload, ReadCounter, StorageError, Stores,
};
use nightshift_tests::fault_proxy::{Fault, FaultPlan, FaultProxy};
use nightshift_tests::python::run_script;
use nightshift_tests::s3::{self, S3Server};
use object_store::{ObjectStoreExt, PutMode, PutOptions, PutPayload};
use parquet::arrow::ProjectionMask;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::async_reader::{AsyncFileReader, ParquetRecordBatchStreamBuilder};
use parquet::arrow::async_writer::AsyncFileWriter;

/// A test that runs longer than this has hung.
const LIMIT: Duration = Duration::from_secs(60);

async fn bounded<F: Future<Output = ()>>(f: F) {
    tokio::time::timeout(LIMIT, f)
        .await
        .expect("test ran past its limit");
}

/// Bytes that differ at every offset, so a misplaced range shows.
fn pattern(len: usize, salt: u8) -> Bytes {
    (0..len)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[1] ^ salt)
        .collect::<Vec<u8>>()
        .into()
}

async fn started() -> S3Server {
    S3Server::start().await.expect("start moto")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_trip_put_get_list_delete() {
    bounded(async {
        let s3 = started().await;
        s3.create_bucket("round-trip").await.unwrap();
        let data = pattern(100_000, 1);
        s3.put("s3://round-trip/a/one.bin", data.clone())
            .await
            .unwrap();
        s3.put("s3://round-trip/a/b/two.bin", Bytes::from_static(b"two"))
            .await
            .unwrap();
        s3.put("s3://round-trip/other.bin", Bytes::from_static(b"x"))
            .await
            .unwrap();
        assert_eq!(s3.get("s3://round-trip/a/one.bin").await.unwrap(), data);
        assert_eq!(
            s3.list("s3://round-trip/a/").await.unwrap(),
            ["s3://round-trip/a/b/two.bin", "s3://round-trip/a/one.bin"]
        );
        s3.delete("s3://round-trip/a/one.bin").await.unwrap();
        assert_eq!(
            s3.list("s3://round-trip").await.unwrap(),
            ["s3://round-trip/a/b/two.bin", "s3://round-trip/other.bin"]
        );

        // A directory of files, relative paths kept.
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("sub")).unwrap();
        std::fs::write(dir.path().join("x.txt"), b"x").unwrap();
        std::fs::write(dir.path().join("sub/y.txt"), b"yy").unwrap();
        let uris = s3
            .upload_dir(dir.path(), "s3://round-trip/up/")
            .await
            .unwrap();
        assert_eq!(
            uris,
            ["s3://round-trip/up/sub/y.txt", "s3://round-trip/up/x.txt"]
        );
        assert_eq!(
            s3.get("s3://round-trip/up/sub/y.txt").await.unwrap(),
            &b"yy"[..]
        );

        // What a child process gets, and an in-process client built from it.
        let env = s3.env();
        let get = |k: &str| env.iter().find(|(n, _)| *n == k).map(|(_, v)| v.clone());
        assert_eq!(get("AWS_ENDPOINT_URL"), Some(s3.endpoint()));
        assert_eq!(get("AWS_ALLOW_HTTP").as_deref(), Some("true"));
        let other = Stores::new(s3.settings());
        let loc = other.locate("s3://round-trip/other.bin").unwrap();
        let got = nightshift_storage::read_all(&loc).await.unwrap();
        assert_eq!(got, &b"x"[..]);
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn part_upload_single_put_and_multipart() {
    bounded(async {
        let s3 = started().await;
        s3.create_bucket("parts").await.unwrap();

        // Small: one create-only PUT; a second upload to the same key is refused.
        let loc = s3.locate("s3://parts/small.bin").unwrap();
        let mut up = PartUpload::new(loc.clone());
        up.write(Bytes::from_static(b"hello ")).await.unwrap();
        up.write(Bytes::from_static(b"world")).await.unwrap();
        up.complete().await.unwrap();
        assert_eq!(s3.get("s3://parts/small.bin").await.unwrap(), &b"hello world"[..]);
        let mut again = PartUpload::new(loc);
        again.write(Bytes::from_static(b"other")).await.unwrap();
        let e = again.complete().await.unwrap_err();
        let cause = nightshift_storage::storage_cause(&e);
        assert!(
            matches!(cause, Some(StorageError::AlreadyExists { uri }) if uri == "s3://parts/small.bin"),
            "{e:?}"
        );
        assert_eq!(s3.get("s3://parts/small.bin").await.unwrap(), &b"hello world"[..]);

        // Large: past 16 MiB it streams as a multipart upload of 8 MiB parts.
        let data = pattern(21 * 1024 * 1024 + 12_345, 2);
        let loc = s3.locate("s3://parts/big.bin").unwrap();
        let mut up = PartUpload::new(loc.clone());
        for chunk in data.chunks(1024 * 1024 + 7) {
            up.write(Bytes::copy_from_slice(chunk)).await.unwrap();
        }
        up.complete().await.unwrap();
        let meta = loc.store().head(loc.path()).await.unwrap();
        assert_eq!(meta.size, data.len() as u64);
        // A multipart ETag names its part count: `"<md5>-3"`.
        let etag = meta.e_tag.unwrap_or_default();
        assert!(etag.trim_matches('"').ends_with("-3"), "{etag}");
        assert!(s3.get("s3://parts/big.bin").await.unwrap() == data);

        // An aborted multipart upload leaves nothing behind.
        let loc = s3.locate("s3://parts/aborted.bin").unwrap();
        let mut up = PartUpload::new(loc);
        up.write(data.slice(..17 * 1024 * 1024)).await.unwrap();
        up.abort().await;
        assert_eq!(
            s3.list("s3://parts").await.unwrap(),
            ["s3://parts/big.bin", "s3://parts/small.bin"]
        );
        let root = s3.locate("s3://parts/").unwrap();
        let open = s3.stores().open_uploads(&root).await.unwrap();
        assert!(open.is_empty(), "uploads left open: {open:?}");

        // A multipart upload that an object reached meanwhile is refused before it completes:
        // the object stays, the upload is aborted.
        let loc = s3.locate("s3://parts/raced.bin").unwrap();
        let mut up = PartUpload::new(loc.clone());
        up.write(data.slice(..17 * 1024 * 1024)).await.unwrap();
        let theirs = PutPayload::from_static(b"another's");
        loc.store().put(loc.path(), theirs).await.unwrap();
        let e = up.complete().await.unwrap_err();
        let cause = nightshift_storage::storage_cause(&e);
        assert!(
            matches!(cause, Some(StorageError::AlreadyExists { uri }) if uri == "s3://parts/raced.bin"),
            "{e:?}"
        );
        assert_eq!(s3.get("s3://parts/raced.bin").await.unwrap(), &b"another's"[..]);
        let open = s3.stores().open_uploads(&root).await.unwrap();
        assert!(open.is_empty(), "uploads left open: {open:?}");
    })
    .await
}

/// Begins a multipart upload at `uri`, uploads one part and walks away, as a writer killed
/// mid-part does.
async fn left_open(s3: &S3Server, uri: &str) {
    let loc = s3.locate(uri).unwrap();
    let mut upload = loc.store().put_multipart(loc.path()).await.unwrap();
    upload
        .put_part(PutPayload::from(pattern(5 * 1024 * 1024, 3)))
        .await
        .unwrap();
    drop(upload);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_left_open_by_dead_writers_are_aborted_with_the_jobs_garbage() {
    bounded(async {
        let s3 = started().await;
        s3.create_bucket("dead").await.unwrap();
        left_open(&s3, "s3://dead/out/_parts/job1/s1-t1-r0.parquet").await;
        left_open(&s3, "s3://dead/out/_parts/job1/s2-t3-r4000.parquet").await;
        left_open(&s3, "s3://dead/out/_parts/job2/s1-t1-r0.parquet").await;
        // Merge work writes in place: a dead one left an upload at one of the job's output
        // names; another output name is not the job's to clear.
        left_open(&s3, "s3://dead/out/part-00001.parquet").await;
        left_open(&s3, "s3://dead/out/part-00007.parquet").await;
        s3.put(
            "s3://dead/out/_parts/job1/s3-t1-r0.parquet",
            Bytes::from_static(b"part"),
        )
        .await
        .unwrap();
        let job1 = s3.locate("s3://dead/out/_parts/job1").unwrap();
        let job2 = s3.locate("s3://dead/out/_parts/job2").unwrap();
        let mut keys: Vec<String> = s3
            .stores()
            .open_uploads(&job1)
            .await
            .unwrap()
            .into_iter()
            .map(|u| u.key)
            .collect();
        keys.sort();
        assert_eq!(
            keys,
            [
                "out/_parts/job1/s1-t1-r0.parquet",
                "out/_parts/job1/s2-t3-r4000.parquet"
            ]
        );

        let names = [
            "part-00000.parquet".to_string(),
            "part-00001.parquet".into(),
        ];
        let garbage = collect_garbage(s3.stores(), "s3://dead/out", "job1", &names)
            .await
            .unwrap();
        assert_eq!(
            garbage,
            Garbage {
                objects: 1,
                uploads: 3
            }
        );
        let out = s3.locate("s3://dead/out").unwrap();
        let left: Vec<String> = s3
            .stores()
            .open_uploads(&out)
            .await
            .unwrap()
            .into_iter()
            .map(|u| u.key)
            .filter(|k| !k.contains("/_parts/"))
            .collect();
        assert_eq!(left, ["out/part-00007.parquet"]);
        let open = s3.stores().open_uploads(&job1).await.unwrap();
        assert!(open.is_empty(), "uploads left open: {open:?}");
        // Another job's uploads are not this job's garbage.
        assert_eq!(s3.stores().open_uploads(&job2).await.unwrap().len(), 1);
        // Local outputs have no multipart uploads to abort.
        let dir = tempfile::tempdir().unwrap();
        let local = s3.stores().locate(dir.path().to_str().unwrap()).unwrap();
        assert_eq!(s3.stores().abort_open_uploads(&local).await.unwrap(), 0);
        // Locally a dead writer leaves a staging file (`NAME#N`) beside the output name.
        std::fs::write(dir.path().join("part-00001.parquet#3"), b"half").unwrap();
        std::fs::write(dir.path().join("part-00007.parquet#4"), b"other").unwrap();
        std::fs::write(dir.path().join("part-00001.parquet#x"), b"not staging").unwrap();
        assert_eq!(
            s3.stores().clear_unfinished(&local, &names).await.unwrap(),
            1
        );
        let mut kept: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        kept.sort();
        assert_eq!(kept, ["part-00001.parquet#x", "part-00007.parquet#4"]);
    })
    .await
}

/// moto checks no signature by default; this one does, so the request nightshift signs itself
/// (ListMultipartUploads) is checked as S3 would check it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_uploads_are_listed_with_a_signature_a_strict_server_accepts() {
    bounded(async {
        let s3 = S3Server::start_checking_signatures(&["strict"])
            .await
            .unwrap();
        left_open(&s3, "s3://strict/out/_parts/j/s1-t1-r0.parquet").await;
        let prefix = s3.locate("s3://strict/out/_parts/j").unwrap();
        assert_eq!(s3.stores().open_uploads(&prefix).await.unwrap().len(), 1);
        assert_eq!(s3.stores().abort_open_uploads(&prefix).await.unwrap(), 1);
        assert!(s3.stores().open_uploads(&prefix).await.unwrap().is_empty());

        // The same request with a wrong secret is refused: the server does check.
        let mut settings = s3.settings();
        if let Some(keys) = settings.static_keys.as_mut() {
            keys.secret_key.push('x');
        }
        let wrong = Stores::new(settings);
        let prefix = wrong.locate("s3://strict/out/_parts/j").unwrap();
        let e = wrong.open_uploads(&prefix).await.unwrap_err().to_string();
        assert!(e.contains("SignatureDoesNotMatch"), "{e}");
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listing_open_uploads_retries_throttling_and_resets() {
    bounded(async {
        let s3 = started().await;
        s3.create_bucket("flaky-uploads").await.unwrap();
        left_open(&s3, "s3://flaky-uploads/out/_parts/j/s1-t1-r0.parquet").await;
        // Every request faults until four have: 503 SlowDown, 500, and resets.
        let plan = FaultPlan::new(7, 1.0)
            .with_kinds(&[Fault::SlowDown, Fault::InternalError, Fault::Reset])
            .with_max_faults(4);
        let proxy = FaultProxy::start(s3.addr(), plan).unwrap();
        let stores = via(&proxy);
        let prefix = stores.locate("s3://flaky-uploads/out/_parts/j").unwrap();
        assert_eq!(stores.open_uploads(&prefix).await.unwrap().len(), 1);
        assert_eq!(proxy.stats().total_faults(), 4);
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listing_open_uploads_of_a_missing_bucket_names_it() {
    bounded(async {
        let s3 = started().await;
        let loc = s3.locate("s3://no-such-bucket/out/_parts/j").unwrap();
        let e = s3
            .stores()
            .open_uploads(&loc)
            .await
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("s3://no-such-bucket/out/_parts/j") && e.contains("404"),
            "{e}"
        );
    })
    .await
}

/// Writes a Parquet file of 10 row groups with the project's generator and uploads it;
/// its URI and its bytes.
async fn parquet_input(s3: &S3Server, bucket: &str, dir: &std::path::Path) -> (String, Vec<u8>) {
    let out = dir.join("data");
    let out_s = out.to_string_lossy().into_owned();
    tokio::task::spawn_blocking(move || {
        let args = ["--out", &out_s, "--rows", "20000", "--files", "1"];
        run_script(
            "gen_data.py",
            &[&args[..], &["--row-group-rows", "2000"]].concat(),
        )
    })
    .await
    .unwrap();
    s3.create_bucket(bucket).await.unwrap();
    let uris = s3
        .upload_dir(&out, &format!("s3://{bucket}/input/"))
        .await
        .unwrap();
    assert_eq!(uris.len(), 1, "{uris:?}");
    let local = std::fs::read(out.join("part-000.parquet")).unwrap();
    (uris[0].clone(), local)
}

/// Reads row groups `groups` of columns `columns` (by name) through `ObjectReader`, and the
/// same from the local copy; asserts they agree and returns the rows read.
async fn read_and_compare(
    stores: &Stores,
    uri: &str,
    local: &[u8],
    groups: &[usize],
    columns: &[&str],
    counter: &ReadCounter,
) -> usize {
    let loc = stores.locate(uri).unwrap();
    let meta = loc.store().head(loc.path()).await.unwrap();
    let mut reader =
        ObjectReader::new(loc, meta.size, meta.e_tag.clone()).with_counter(counter.clone());
    let footer = reader.footer().await.unwrap();
    let schema = footer.file_metadata().schema_descr();
    let roots: Vec<usize> = columns
        .iter()
        .map(|c| {
            (0..schema.root_schema().get_fields().len())
                .find(|i| schema.root_schema().get_fields()[*i].name() == *c)
                .unwrap()
        })
        .collect();
    let mask = ProjectionMask::roots(schema, roots.clone());
    let mut stream = ParquetRecordBatchStreamBuilder::new(reader)
        .await
        .unwrap()
        .with_projection(mask)
        .with_row_groups(groups.to_vec())
        .with_batch_size(1000)
        .build()
        .unwrap();
    let mut remote = Vec::new();
    while let Some(b) = stream.next().await {
        remote.push(b.unwrap());
    }
    let local_builder =
        ParquetRecordBatchReaderBuilder::try_new(Bytes::copy_from_slice(local)).unwrap();
    let mask = ProjectionMask::roots(local_builder.parquet_schema(), roots);
    let expected: Vec<_> = local_builder
        .with_projection(mask)
        .with_row_groups(groups.to_vec())
        .with_batch_size(1000)
        .build()
        .unwrap()
        .map(|b| b.unwrap())
        .collect();
    assert_eq!(remote, expected);
    remote.iter().map(|b| b.num_rows()).sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn object_reader_reads_ranges_of_parquet() {
    bounded(async {
        let s3 = started().await;
        let dir = tempfile::tempdir().unwrap();
        let (uri, local) = parquet_input(&s3, "parquet-in", dir.path()).await;
        let counter = ReadCounter::default();
        let rows = read_and_compare(s3.stores(), &uri, &local, &[1, 4, 5], &["id"], &counter).await;
        assert_eq!(rows, 6000);
        // Only the footer and one small column of three row groups came over the wire.
        assert!(
            counter.bytes() * 4 < local.len() as u64,
            "read {} of {} bytes",
            counter.bytes(),
            local.len()
        );
        assert!(counter.requests() <= 4, "{} requests", counter.requests());

        // Ranged reads of exact bytes, directly.
        let loc = s3.locate(&uri).unwrap();
        let mut reader = ObjectReader::new(loc, local.len() as u64, None);
        let got = reader.get_bytes(1000..5000).await.unwrap();
        assert_eq!(&got[..], &local[1000..5000]);
        let ranges = vec![
            0..4,
            70_000..70_100,
            (local.len() as u64 - 8)..local.len() as u64,
        ];
        let got = reader.get_byte_ranges(ranges.clone()).await.unwrap();
        for (r, b) in ranges.iter().zip(got) {
            assert_eq!(&b[..], &local[r.start as usize..r.end as usize]);
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_name_what_is_missing() {
    bounded(async {
        let s3 = started().await;
        s3.create_bucket("present").await.unwrap();
        s3.put("s3://present/there.bin", Bytes::from_static(b"here"))
            .await
            .unwrap();
        let stores = s3.stores();
        let read = |uri: &'static str| async move {
            let loc = stores.locate(uri).unwrap();
            nightshift_storage::read_all(&loc).await.unwrap_err()
        };

        // A missing bucket, read, listed, written, and statted.
        let uri = "s3://absent-bucket/some/key.bin";
        let e = read(uri).await;
        assert!(
            matches!(&e, StorageError::NoSuchBucket { uri: u } if u == uri),
            "{e:?}"
        );
        assert!(e.to_string().contains(uri), "{e}");
        let loc = stores.locate("s3://absent-bucket/some/").unwrap();
        let e = nightshift_storage::list_inputs(stores, "s3://absent-bucket/some/")
            .await
            .unwrap_err();
        assert!(
            matches!(&e, StorageError::NoSuchBucket { .. }),
            "list: {e:?}"
        );
        // A single input file in a missing bucket: HEAD answers a bare 404 (no body to name
        // the bucket), so listing tells the two apart.
        let e = nightshift_storage::list_inputs(stores, "s3://absent-bucket/in.parquet")
            .await
            .unwrap_err();
        assert!(
            matches!(&e, StorageError::NoSuchBucket { uri } if uri == "s3://absent-bucket/in.parquet"),
            "list one file: {e:?}"
        );
        let head = loc.store().head(loc.join("x").path()).await.unwrap_err();
        let e = StorageError::from_store("s3://absent-bucket/some/x", head);
        assert!(matches!(&e, StorageError::NotFound { .. }), "head: {e:?}");
        let put = loc
            .store()
            .put(loc.join("x").path(), PutPayload::from_static(b"x"))
            .await
            .unwrap_err();
        let e = StorageError::from_store("s3://absent-bucket/some/x", put);
        assert!(
            matches!(&e, StorageError::NoSuchBucket { .. }),
            "put: {e:?}"
        );

        // A missing key in a present bucket.
        let uri = "s3://present/missing.bin";
        let e = read(uri).await;
        assert!(
            matches!(&e, StorageError::NotFound { uri: u } if u == uri),
            "{e:?}"
        );
        assert!(e.to_string().contains(uri), "{e}");
        let loc = stores.locate(uri).unwrap();
        let head = loc.store().head(loc.path()).await.unwrap_err();
        let e = StorageError::from_store(uri, head);
        assert!(matches!(&e, StorageError::NotFound { .. }), "head: {e:?}");

        // Create-only on an existing key.
        let loc = stores.locate("s3://present/there.bin").unwrap();
        let opts = PutOptions {
            mode: PutMode::Create,
            ..Default::default()
        };
        let e = loc
            .store()
            .put_opts(loc.path(), PutPayload::from_static(b"again"), opts)
            .await
            .unwrap_err();
        let e = StorageError::from_store("s3://present/there.bin", e);
        assert!(
            matches!(&e, StorageError::AlreadyExists { uri } if uri == "s3://present/there.bin"),
            "{e:?}"
        );
        assert_eq!(
            s3.get("s3://present/there.bin").await.unwrap(),
            &b"here"[..]
        );
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changed_object_is_refused_by_etag() {
    bounded(async {
        let s3 = started().await;
        s3.create_bucket("changing").await.unwrap();
        let uri = "s3://changing/input.bin";
        let first = pattern(64 * 1024, 3);
        s3.put(uri, first.clone()).await.unwrap();
        let loc = s3.locate(uri).unwrap();
        let meta = loc.store().head(loc.path()).await.unwrap();
        let old = meta.e_tag.clone().expect("moto returns ETags");

        // Pinned to the ETag seen first: reads work while the object is unchanged.
        let mut reader = ObjectReader::new(loc.clone(), meta.size, Some(old.clone()));
        let got = reader.get_bytes(10..20).await.unwrap();
        assert_eq!(&got[..], &first[10..20]);

        s3.put(uri, pattern(64 * 1024, 4)).await.unwrap();
        let new = loc.store().head(loc.path()).await.unwrap().e_tag;
        assert_ne!(new.as_deref(), Some(old.as_str()));
        let e = reader.get_bytes(10..20).await.unwrap_err();
        let cause = nightshift_storage::storage_cause(&e);
        assert!(
            matches!(cause, Some(StorageError::InputChanged { uri: u, .. }) if u == uri),
            "{e:?}"
        );
        let e = reader
            .get_byte_ranges(vec![0..5, 100..200])
            .await
            .unwrap_err();
        assert!(
            matches!(
                nightshift_storage::storage_cause(&e),
                Some(StorageError::InputChanged { .. })
            ),
            "{e:?}"
        );
    })
    .await
}

/// Stores that go through `proxy`.
fn via(proxy: &FaultProxy) -> Stores {
    Stores::new(s3::settings(&proxy.endpoint()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operations_survive_injected_faults() {
    bounded(async {
        let s3 = started().await;
        s3.create_bucket("faulty").await.unwrap();
        let dir = tempfile::tempdir().unwrap();
        let (uri, local) = parquet_input(&s3, "faulty-in", dir.path()).await;
        // Seed 34 draws every safe kind at least four times in the first 100-140 requests.
        let mut plan = FaultPlan::new(34, 0.15);
        plan.delay = Duration::from_millis(100);
        let proxy = FaultProxy::start(s3.addr(), plan).unwrap();
        let stores = Arc::new(via(&proxy));

        // Concurrent create-only PUTs of varied sizes, then exact reads (whole and ranged).
        let mut tasks = Vec::new();
        for i in 0..32usize {
            let stores = stores.clone();
            tasks.push(tokio::spawn(async move {
                let key = format!("s3://faulty/obj-{i:02}.bin");
                let data = pattern(1000 + i * 29_000, i as u8);
                let loc = stores.locate(&key).unwrap();
                let opts = PutOptions {
                    mode: PutMode::Create,
                    ..Default::default()
                };
                loc.store()
                    .put_opts(loc.path(), PutPayload::from(data.clone()), opts)
                    .await
                    .unwrap_or_else(|e| panic!("put {key}: {e}"));
                let got = nightshift_storage::read_all(&loc).await.unwrap();
                assert!(got == data, "{key} differs");
                let r = (data.len() / 3) as u64..(data.len() / 2) as u64;
                let part = loc.store().get_range(loc.path(), r.clone()).await.unwrap();
                assert_eq!(&part[..], &data[r.start as usize..r.end as usize]);
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let listed: Vec<_> = nightshift_storage::list_inputs(&stores, "s3://faulty/")
            .await
            .unwrap()
            .into_iter()
            .collect();
        assert_eq!(listed.len(), 32);

        // A multipart upload through the faults.
        let big = pattern(18 * 1024 * 1024, 9);
        let loc = stores.locate("s3://faulty/big.bin").unwrap();
        let mut up = PartUpload::new(loc.clone());
        for chunk in big.chunks(2 * 1024 * 1024) {
            up.write(Bytes::copy_from_slice(chunk)).await.unwrap();
        }
        up.complete().await.unwrap();
        assert!(s3.get("s3://faulty/big.bin").await.unwrap() == big);

        // Parquet through the faults, twice (different row groups and columns).
        let counter = ReadCounter::default();
        read_and_compare(&stores, &uri, &local, &[0, 2], &["id", "group"], &counter).await;
        read_and_compare(&stores, &uri, &local, &[9], &["features"], &counter).await;

        let stats = proxy.stats();
        eprintln!("fault proxy: {stats:?}");
        assert!(stats.requests >= 100, "{stats:?}");
        let share = stats.total_faults() as f64 / stats.requests as f64;
        assert!(
            share >= 0.05,
            "only {share:.3} of requests faulted: {stats:?}"
        );
        for kind in Fault::SAFE {
            assert!(stats.count(kind) > 0, "no {kind:?} injected: {stats:?}");
        }
        assert_eq!(stats.upstream_errors, 0, "{stats:?}");
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_before_and_after_forwarding() {
    bounded(async {
        let s3 = started().await;
        s3.create_bucket("retries").await.unwrap();
        let create = PutOptions {
            mode: PutMode::Create,
            ..Default::default()
        };

        // Before forwarding: the server never saw the request, so the retried create-only
        // PUT is the first it sees, and it wins.
        let proxy = FaultProxy::start(
            s3.addr(),
            FaultPlan::new(1, 1.0)
                .with_kinds(&[Fault::Reset, Fault::SlowDown, Fault::InternalError])
                .with_max_faults(3),
        )
        .unwrap();
        let stores = via(&proxy);
        let loc = stores.locate("s3://retries/a.bin").unwrap();
        loc.store()
            .put_opts(loc.path(), PutPayload::from_static(b"a"), create.clone())
            .await
            .unwrap();
        let stats = proxy.stats();
        assert_eq!(stats.total_faults(), 3, "{stats:?}");
        assert_eq!(stats.forwarded, 1, "{stats:?}");
        drop(proxy);

        // Cut mid-request (opt-in): a GET is retried.
        let proxy = FaultProxy::start(
            s3.addr(),
            FaultPlan::new(2, 1.0)
                .with_kinds(&[Fault::CutRequest])
                .with_max_faults(2),
        )
        .unwrap();
        let stores = via(&proxy);
        let got = nightshift_storage::read_all(&stores.locate("s3://retries/a.bin").unwrap())
            .await
            .unwrap();
        assert_eq!(got, &b"a"[..]);
        assert_eq!(proxy.stats().count(Fault::CutRequest), 2);
        drop(proxy);

        // After forwarding (opt-in): the server stored the object but its answer was lost;
        // the retry meets the object it wrote itself and reads as "already exists".
        let proxy = FaultProxy::start(
            s3.addr(),
            FaultPlan::new(3, 1.0)
                .with_kinds(&[Fault::DropResponse])
                .with_max_faults(1),
        )
        .unwrap();
        let stores = via(&proxy);
        let loc = stores.locate("s3://retries/b.bin").unwrap();
        let e = loc
            .store()
            .put_opts(loc.path(), PutPayload::from_static(b"b"), create)
            .await
            .unwrap_err();
        let e = StorageError::from_store("s3://retries/b.bin", e);
        assert!(matches!(e, StorageError::AlreadyExists { .. }), "{e:?}");
        assert_eq!(s3.get("s3://retries/b.bin").await.unwrap(), &b"b"[..]);
        let stats = proxy.stats();
        assert_eq!(stats.count(Fault::DropResponse), 1, "{stats:?}");
        assert_eq!(stats.forwarded, 2, "{stats:?}");
    })
    .await
}

/// Reads one response from a raw connection: status, headers (lowercased names), body.
async fn raw_response<R: tokio::io::AsyncBufRead + Unpin>(
    r: &mut R,
    head_request: bool,
) -> (u16, Vec<(String, String)>, Vec<u8>) {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt};
    let mut line = String::new();
    r.read_line(&mut line).await.unwrap();
    let status = line.split(' ').nth(1).unwrap().parse().unwrap();
    let mut headers = Vec::new();
    loop {
        line.clear();
        r.read_line(&mut line).await.unwrap();
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        let (n, v) = l.split_once(':').unwrap();
        headers.push((n.trim().to_ascii_lowercase(), v.trim().to_string()));
    }
    let len: usize = headers
        .iter()
        .find(|(n, _)| n == "content-length")
        .map(|(_, v)| v.parse().unwrap())
        .expect("the proxy frames every response with Content-Length");
    let mut body = vec![0; if head_request { 0 } else { len }];
    r.read_exact(&mut body).await.unwrap();
    (status, headers, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_keeps_connections_and_forwards_chunked_bodies() {
    use tokio::io::{AsyncWriteExt, BufReader};
    bounded(async {
        let s3 = started().await;
        s3.create_bucket("raw-proxy").await.unwrap();
        let data = pattern(300_000, 5);
        s3.put("s3://raw-proxy/ranged.bin", data.clone())
            .await
            .unwrap();
        let proxy = FaultProxy::start(s3.addr(), FaultPlan::none()).unwrap();
        let conn = tokio::net::TcpStream::connect(proxy.addr()).await.unwrap();
        let (read, mut write) = conn.into_split();
        let mut read = BufReader::new(read);
        let host = proxy.addr().to_string();

        // A chunked PUT (moto takes unsigned writes), sent in odd-sized chunks.
        let body = pattern(70_001, 6);
        let mut req = format!(
            "PUT /raw-proxy/chunked.bin HTTP/1.1\r\nHost: {host}\r\n\
             Content-Type: application/octet-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        .into_bytes();
        for chunk in body.chunks(9_999) {
            req.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
            req.extend_from_slice(chunk);
            req.extend_from_slice(b"\r\n");
        }
        req.extend_from_slice(b"0\r\n\r\n");
        write.write_all(&req).await.unwrap();
        let (status, _, _) = raw_response(&mut read, false).await;
        assert_eq!(status, 200);

        // HEAD on the same connection keeps the object's length, without a body.
        let req = format!("HEAD /raw-proxy/chunked.bin HTTP/1.1\r\nHost: {host}\r\n\r\n");
        write.write_all(req.as_bytes()).await.unwrap();
        let (status, headers, _) = raw_response(&mut read, true).await;
        assert_eq!(status, 403, "moto refuses unsigned reads: {headers:?}");

        // A signed ranged read of what went through, and a ranged read through the proxy.
        assert!(s3.get("s3://raw-proxy/chunked.bin").await.unwrap() == body);
        let stores = via(&proxy);
        let loc = stores.locate("s3://raw-proxy/ranged.bin").unwrap();
        let meta = loc.store().head(loc.path()).await.unwrap();
        assert_eq!(meta.size, data.len() as u64);
        let part = loc
            .store()
            .get_range(loc.path(), 123_456..234_567)
            .await
            .unwrap();
        assert_eq!(&part[..], &data[123_456..234_567]);
        for _ in 0..10 {
            loc.store().head(loc.path()).await.unwrap();
        }
        let stats = proxy.stats();
        assert_eq!(stats.requests, 14, "{stats:?}");
        // The raw connection carried two requests, and the client reused its connections.
        assert!(stats.connections <= 4, "{stats:?}");
    })
    .await
}

/// A footer the store fails to serve is a storage error of its class, never "not a Parquet
/// file": the commit and planning try again instead of failing the job for good, and the
/// output-name check does not take the file for another job's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_footer_the_store_fails_to_serve_is_a_retryable_storage_error() {
    bounded(async {
        let s3 = started().await;
        let dir = tempfile::tempdir().unwrap();
        let (uri, local) = parquet_input(&s3, "footers", dir.path()).await;
        let mut plan = FaultPlan::new(1, 1.0).with_kinds(&[Fault::InternalError]);
        plan.delay = Duration::ZERO;
        let proxy = FaultProxy::start(s3.addr(), plan).unwrap();
        let mut settings = s3::settings(&proxy.endpoint());
        settings.retry = Some(object_store::RetryConfig {
            max_retries: 1,
            retry_timeout: Duration::from_secs(5),
            backoff: object_store::BackoffConfig::default(),
        });
        let stores = Stores::new(settings);
        let loc = stores.locate(&uri).unwrap();
        let err = nightshift_storage::stamp(&loc, local.len() as u64)
            .await
            .expect_err("every request fails");
        match err {
            FooterError::Storage(e) => {
                assert_eq!(e.class(), nightshift_proto::FailureClass::Retryable, "{e}")
            }
            other => panic!("taken for a file that is not Parquet: {other}"),
        }
        // Through the direct store the same file reads as Parquet.
        let direct = s3.locate(&uri).unwrap();
        let (owner, rows) = nightshift_storage::stamp(&direct, local.len() as u64)
            .await
            .unwrap();
        assert_eq!((owner, rows), (None, 20_000));
    })
    .await
}
