//! One path to every object: local files and S3 (or an S3-compatible store) behind
//! `object_store`, with the Parquet reader and part writer the planner, worker and finalizer use.

mod error;
pub mod input_listing;
pub mod location;
mod object_reader;
mod open_uploads;
mod part_upload;
mod publish;
pub mod s3;
mod s3_refusal;
mod stamp;

pub use error::StorageError;
pub use input_listing::{InputObject, Listing, list_inputs, list_inputs_upto};
pub use location::{Location, Stores};
pub use object_reader::{ObjectReader, ReadCounter};
pub use object_reader::{read_all, storage_cause};
pub use open_uploads::{OpenUpload, S3Bucket};
pub use part_upload::{PartUpload, sync_local};
pub use publish::publish_object;
pub use stamp::{FooterError, Occupant, occupant, owned_by, read_footer, stamp, stamp_of};
