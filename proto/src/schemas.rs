//! OpenAPI schemas of the types whose JSON form is written by hand (a custom `Serialize`), so
//! the API's description says what the wire carries.

use utoipa::openapi::RefOr;
use utoipa::openapi::schema::{ObjectBuilder, OneOfBuilder, Schema, Type};
use utoipa::{PartialSchema, ToSchema};

use crate::spec::{BatchSize, Device};
use crate::wire::LeaseSecret;

fn string_matching(pattern: &str, description: &str) -> RefOr<Schema> {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .pattern(Some(pattern))
        .description(Some(description))
        .into()
}

/// `batch.size`: rows per model call, or `"auto"`.
impl PartialSchema for BatchSize {
    fn schema() -> RefOr<Schema> {
        OneOfBuilder::new()
            .item(
                ObjectBuilder::new()
                    .schema_type(Type::Integer)
                    .minimum(Some(1)),
            )
            .item(
                ObjectBuilder::new()
                    .schema_type(Type::String)
                    .enum_values(Some(["auto"])),
            )
            .description(Some("Rows per model call, or \"auto\""))
            .into()
    }
}
impl ToSchema for BatchSize {}

/// `model.device`: `auto`, `cpu`, `cuda` or `cuda:N`.
impl PartialSchema for Device {
    fn schema() -> RefOr<Schema> {
        string_matching(
            "^(auto|cpu|cuda(:[0-9]+)?)$",
            "Where the model runs: auto, cpu, cuda or cuda:N",
        )
    }
}
impl ToSchema for Device {}

/// A lease's secret: 32 hex digits.
impl PartialSchema for LeaseSecret {
    fn schema() -> RefOr<Schema> {
        string_matching("^[0-9a-fA-F]{32}$", "The grant's secret: 32 hex digits")
    }
}
impl ToSchema for LeaseSecret {}
