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
    let names = |uris: Vec<String>| -> Vec<String> {
        uris.iter()
            .map(|u| u.rsplit('/').next().unwrap().to_string())
            .collect()
    };
    for uri in [
        format!("s3://{BUCKET}/in/"),
        format!("s3://{BUCKET}/in/*.parquet"),
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
