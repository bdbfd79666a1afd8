//! Listing an input on the S3 server: a stream in key order, read a page at a time (no total
//! known up front), and a listing up to a limit that says there is more.

use nightshift_storage::input_listing::{list_inputs_upto, stream_inputs};
use nightshift_tests::S3Server;

const BUCKET: &str = "listing";

#[tokio::test]
async fn an_s3_input_streams_in_key_order() {
    let s3 = S3Server::start().await.unwrap();
    s3.create_bucket(BUCKET).await.unwrap();
    for name in ["c", "a", "e", "b", "d"] {
        s3.put(&format!("s3://{BUCKET}/in/{name}.parquet"), "x")
            .await
            .unwrap();
    }
    s3.put(&format!("s3://{BUCKET}/in/_SUCCESS"), "")
        .await
        .unwrap();
    // What a failed Spark attempt leaves, and the folders an S3 console makes: never input.
    s3.put(&format!("s3://{BUCKET}/in/_temporary/0/f.parquet"), "x")
        .await
        .unwrap();
    for marker in ["in/", "in/2024/"] {
        s3.put_folder_marker(BUCKET, marker).await.unwrap();
    }
    let names = |uris: Vec<String>| -> Vec<String> {
        uris.iter()
            .map(|u| u.rsplit('/').next().unwrap().to_string())
            .collect()
    };
    for uri in [
        format!("s3://{BUCKET}/in/"),
        format!("s3://{BUCKET}/in/*.parquet"),
        format!("s3://{BUCKET}/in/**/*.parquet"),
    ] {
        let stream = stream_inputs(s3.stores(), &uri).await.unwrap();
        assert_eq!(
            stream.total, None,
            "an object store is not listed whole first"
        );
        let listed: Vec<String> = futures::TryStreamExt::try_collect::<Vec<_>>(stream.objects)
            .await
            .unwrap()
            .into_iter()
            .map(|o| o.location.uri())
            .collect();
        let expected: Vec<String> = ["a", "b", "c", "d", "e"]
            .map(|n| format!("{n}.parquet"))
            .into();
        assert_eq!(names(listed), expected, "{uri}");
    }
    let some = list_inputs_upto(s3.stores(), &format!("s3://{BUCKET}/in/"), 2)
        .await
        .unwrap();
    assert!(!some.complete);
    assert_eq!(some.objects.len(), 3);
    let none = stream_inputs(s3.stores(), &format!("s3://{BUCKET}/in/*.csv"))
        .await
        .unwrap();
    let found: Vec<_> = futures::TryStreamExt::try_collect::<Vec<_>>(none.objects)
        .await
        .unwrap();
    assert!(found.is_empty());
}

/// A listing up to a limit asks S3 for pages of that size; pages of hidden or unmatched keys
/// alone do not end it early, and a glob at the bucket's root lists without a prefix.
#[tokio::test]
async fn a_listing_up_to_a_limit_reads_past_pages_it_skips() {
    let s3 = S3Server::start().await.unwrap();
    s3.create_bucket(BUCKET).await.unwrap();
    // `_` sorts before lowercase letters: the first pages of two keys hold nothing kept.
    for name in [
        "_a",
        "_b",
        "_c",
        "a.csv",
        "b.parquet",
        "c.parquet",
        "d.parquet",
    ] {
        s3.put(&format!("s3://{BUCKET}/in/{name}"), "x")
            .await
            .unwrap();
    }
    s3.put(&format!("s3://{BUCKET}/top.parquet"), "x")
        .await
        .unwrap();
    let names = |objects: &[nightshift_storage::InputObject]| -> Vec<String> {
        objects.iter().map(|o| o.location.uri()).collect()
    };
    let glob = format!("s3://{BUCKET}/in/*.parquet");
    let some = list_inputs_upto(s3.stores(), &glob, 1).await.unwrap();
    assert!(!some.complete);
    assert_eq!(
        names(&some.objects),
        [
            format!("s3://{BUCKET}/in/b.parquet"),
            format!("s3://{BUCKET}/in/c.parquet")
        ]
    );
    let all = list_inputs_upto(s3.stores(), &format!("s3://{BUCKET}/in/"), 3)
        .await
        .unwrap();
    assert!(!all.complete, "a.csv, b, c and d are not hidden");
    let whole = list_inputs_upto(s3.stores(), &glob, 3).await.unwrap();
    assert!(whole.complete);
    assert_eq!(whole.objects.len(), 3);
    let root = list_inputs_upto(s3.stores(), &format!("s3://{BUCKET}/*.parquet"), 5)
        .await
        .unwrap();
    assert!(root.complete);
    assert_eq!(names(&root.objects), [format!("s3://{BUCKET}/top.parquet")]);
}
