//! `GET /v1/openapi.json`: the API described from its handlers' own annotations
//! (`#[utoipa::path]` on each), their bodies' types (`ToSchema` in the proto crate), the role
//! each route needs (its security scheme), and the error answers of each role.

use std::collections::BTreeMap;

use axum::Json;
use nightshift_proto::ErrorBody;
use utoipa::openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{ContentBuilder, Ref, RefOr, ResponseBuilder, response::Response};
use utoipa::{IntoParams, IntoResponses, Modify, OpenApi};

use crate::{api, dashboard, fleet_api, schedule_api, worker_api};

/// The security scheme of the submit role (people, services, the dashboard's API calls).
pub const SUBMIT_SCHEME: &str = "submit_token";
/// The security scheme of the worker role.
pub const WORKER_SCHEME: &str = "worker_token";
/// The dashboard's login cookie, which `GET` routes of the submit role accept too.
pub const COOKIE_SCHEME: &str = "dashboard_cookie";

#[derive(OpenApi)]
#[openapi(
    info(
        title = "nightshift coordinator",
        description = "Batch inference jobs (submit token), the lease protocol (worker token), \
                       schedules and health. Every error answers `ErrorBody`."
    ),
    paths(
        api::healthz, api::readyz, api::metrics, api::submit, api::list, api::job, api::cancel,
        api::retry, document,
        worker_api::lease, worker_api::heartbeat, worker_api::checkpoint, worker_api::complete,
        worker_api::complete_many, worker_api::fail, worker_api::release, worker_api::spec,
        schedule_api::create, schedule_api::list, schedule_api::show, schedule_api::pause,
        schedule_api::resume, schedule_api::delete,
        dashboard::page, dashboard::asset, dashboard::login, dashboard::logout,
        dashboard::shards, dashboard::throughput, dashboard::workers,
        fleet_api::fleet, fleet_api::drain,
    ),
    components(schemas(ErrorBody)),
    modifiers(&Schemes),
    tags(
        (name = "jobs", description = "Submit, watch, cancel and retry jobs (submit token)"),
        (name = "worker", description = "The lease protocol (worker token)"),
        (name = "schedules", description = "Jobs at cron fire times (submit token)"),
        (name = "health", description = "Liveness, readiness, metrics and this document"),
        (name = "dashboard", description = "The operator page at `/` and its login"),
        (name = "fleet", description = "What the fleet scaler reads, and drains it asks (submit token)"),
    )
)]
struct ApiDoc;

/// The document, built once per request (it is small and changes only with the binary).
pub fn spec() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}

/// This document (no token needed: it holds no data).
#[utoipa::path(get, path = "/v1/openapi.json", tag = "health",
    responses((status = 200, description = "The OpenAPI document", content_type = "application/json")))]
pub(crate) async fn document() -> Json<utoipa::openapi::OpenApi> {
    Json(spec())
}

/// Adds the roles' security schemes.
struct Schemes;

impl Modify for Schemes {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        let bearer = |role: &str| {
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(format!(
                        "A {role} token (`Authorization: Bearer ...`)"
                    )))
                    .build(),
            )
        };
        components.add_security_scheme(SUBMIT_SCHEME, bearer("submit"));
        components.add_security_scheme(WORKER_SCHEME, bearer("worker"));
        components.add_security_scheme(
            COOKIE_SCHEME,
            SecurityScheme::ApiKey(ApiKey::Cookie(ApiKeyValue::with_description(
                crate::dashboard::COOKIE,
                "Set by the dashboard's login form from a submit token; read-only routes only",
            ))),
        );
    }
}

/// An error answer: the `{code, message}` body.
fn error(description: &str) -> RefOr<Response> {
    ResponseBuilder::new()
        .description(description)
        .content(
            "application/json",
            ContentBuilder::new()
                .schema(Some(Ref::from_schema_name("ErrorBody")))
                .build(),
        )
        .into()
}

fn errors(list: &[(u16, &str)]) -> BTreeMap<String, RefOr<Response>> {
    list.iter()
        .map(|(status, why)| (status.to_string(), error(why)))
        .collect()
}

/// What a route of the submit role may answer besides success.
pub(crate) struct SubmitErrors;

impl IntoResponses for SubmitErrors {
    fn responses() -> BTreeMap<String, RefOr<Response>> {
        errors(&[
            (
                400,
                "A malformed request or spec (`bad_request`, `invalid_spec`)",
            ),
            (401, "No token, or an unknown one"),
            (403, "A worker token, or a URI outside the allow-list"),
            (404, "No such job or schedule"),
            (
                409,
                "An idempotency key with another spec, or a transition that no longer applies",
            ),
            (413, "A body over the limit"),
            (
                422,
                "The input, model or output does not fit the spec (`invalid_job`)",
            ),
            (503, "The metastore or object store is away: retry"),
        ])
    }
}

/// What a route of the worker role may answer besides success.
pub(crate) struct WorkerErrors;

impl IntoResponses for WorkerErrors {
    fn responses() -> BTreeMap<String, RefOr<Response>> {
        errors(&[
            (
                400,
                "A malformed body, or a part that is not the lease's own (`invalid_part`)",
            ),
            (401, "No token, or an unknown one"),
            (403, "A submit token"),
            (
                409,
                "The lease is lost (`lease_lost`) or its job no longer runs (`job_not_running`)",
            ),
            (413, "A body over the limit"),
            (503, "The metastore or object store is away: retry"),
        ])
    }
}

/// `{job}`: a job's id or name.
#[derive(IntoParams)]
#[into_params(parameter_in = Path)]
pub(crate) struct JobPath {
    /// The job's id or name.
    #[allow(dead_code)]
    job: String,
}

/// `{name}`: a schedule's name.
#[derive(IntoParams)]
#[into_params(parameter_in = Path)]
pub(crate) struct SchedulePath {
    /// The schedule's name.
    #[allow(dead_code)]
    name: String,
}

/// `{worker}`: a worker's id.
#[derive(IntoParams)]
#[into_params(parameter_in = Path)]
pub(crate) struct WorkerPath {
    /// The worker's id.
    #[allow(dead_code)]
    worker: String,
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use serde_json::Value;

    use super::*;

    /// Routes that need no token.
    const PUBLIC: [&str; 7] = [
        "/healthz",
        "/readyz",
        "/v1/openapi.json",
        "/",
        "/assets/{file}",
        "/ui/login",
        "/ui/logout",
    ];
    const METHODS: [&str; 5] = ["get", "post", "put", "patch", "delete"];

    fn document() -> Value {
        serde_json::to_value(spec()).unwrap()
    }

    /// `(method, path)` of every `.route("PATH", get(..).post(..))` in `source`.
    fn routes_in(source: &str) -> BTreeSet<(String, String)> {
        let mut found = BTreeSet::new();
        for (at, _) in source.match_indices(".route(") {
            let rest = source[at + ".route(".len()..].trim_start();
            let Some(rest) = rest.strip_prefix('"') else {
                continue;
            };
            let Some(end) = rest.find('"') else { continue };
            let path = &rest[..end];
            // The method router runs to the call's closing parenthesis.
            let mut depth = 1;
            let call: String = rest[end..]
                .chars()
                .take_while(|c| {
                    depth += match c {
                        '(' => 1,
                        ')' => -1,
                        _ => 0,
                    };
                    depth > 0
                })
                .collect();
            for method in METHODS {
                let bare =
                    call.contains(&format!(" {method}(")) || call.contains(&format!(",{method}("));
                if bare || call.contains(&format!(".{method}(")) {
                    found.insert((method.to_string(), path.to_string()));
                }
            }
        }
        found
    }

    fn routes_in_sources() -> BTreeSet<(String, String)> {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/src");
        let mut found = BTreeSet::new();
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "rs") {
                let source = std::fs::read_to_string(&path).unwrap();
                // Only what the binary runs: tests name routes of their own.
                let code = source.split("#[cfg(test)]").next().unwrap_or_default();
                found.extend(routes_in(code));
            }
        }
        found
    }

    fn operations(doc: &Value) -> BTreeSet<(String, String)> {
        let mut ops = BTreeSet::new();
        for (path, item) in doc["paths"].as_object().unwrap() {
            for method in METHODS {
                if item.get(method).is_some() {
                    ops.insert((method.to_string(), path.clone()));
                }
            }
        }
        ops
    }

    #[test]
    fn the_route_scanner_reads_one_and_several_methods() {
        let source = r#"Router::new()
            .route("/a", get(a))
            .route("/b/{x}", post(b).get(c))
            .route(
                "/c",
                delete(d),
            )"#;
        let found: Vec<_> = routes_in(source).into_iter().collect();
        let want = [
            ("delete", "/c"),
            ("get", "/a"),
            ("get", "/b/{x}"),
            ("post", "/b/{x}"),
        ];
        let want: Vec<_> = want
            .iter()
            .map(|(m, p)| (m.to_string(), p.to_string()))
            .collect();
        assert_eq!(found, want);
    }

    #[test]
    fn every_route_the_router_serves_is_in_the_document_and_no_other() {
        let served = routes_in_sources();
        let described = operations(&document());
        assert!(served.len() >= 25, "the scan found only {served:?}");
        let missing: Vec<_> = served.difference(&described).collect();
        assert!(
            missing.is_empty(),
            "routes missing from /v1/openapi.json: {missing:?}"
        );
        let extra: Vec<_> = described.difference(&served).collect();
        assert!(extra.is_empty(), "documented but not served: {extra:?}");
    }

    #[test]
    fn every_route_names_its_role_and_its_error_answers() {
        let doc = document();
        let schemes = doc["components"]["securitySchemes"].as_object().unwrap();
        for name in [SUBMIT_SCHEME, WORKER_SCHEME, COOKIE_SCHEME] {
            assert!(schemes.contains_key(name), "{name} is not defined");
        }
        for (method, path) in operations(&doc) {
            let op = &doc["paths"][&path][&method];
            let roles: Vec<&str> = op["security"]
                .as_array()
                .map(|list| {
                    list.iter()
                        .flat_map(|r| r.as_object().unwrap().keys())
                        .map(String::as_str)
                        .collect()
                })
                .unwrap_or_default();
            for role in &roles {
                assert!(
                    schemes.contains_key(*role),
                    "{method} {path}: unknown scheme {role}"
                );
            }
            if PUBLIC.contains(&path.as_str()) {
                assert!(
                    roles.is_empty(),
                    "{method} {path} is public but names {roles:?}"
                );
                continue;
            }
            assert!(!roles.is_empty(), "{method} {path} names no role");
            let cookie = roles.contains(&COOKIE_SCHEME);
            assert!(
                !cookie || (method == "get" && roles.contains(&SUBMIT_SCHEME)),
                "{method} {path}: the cookie opens read-only routes of the submit role only"
            );
            for status in ["400", "401", "403", "503"] {
                let error =
                    &op["responses"][status]["content"]["application/json"]["schema"]["$ref"];
                assert_eq!(
                    error, "#/components/schemas/ErrorBody",
                    "{method} {path} {status}"
                );
            }
        }
    }

    /// Every `$ref` in the document names a schema it defines.
    #[test]
    fn every_reference_resolves() {
        fn refs(v: &Value, out: &mut Vec<String>) {
            match v {
                Value::Object(map) => {
                    if let Some(Value::String(r)) = map.get("$ref") {
                        out.push(r.clone());
                    }
                    map.values().for_each(|v| refs(v, out));
                }
                Value::Array(list) => list.iter().for_each(|v| refs(v, out)),
                _ => {}
            }
        }
        let doc = document();
        let mut all = Vec::new();
        refs(&doc, &mut all);
        assert!(all.len() > 20, "{all:?}");
        for r in all {
            let name = r
                .strip_prefix("#/components/schemas/")
                .unwrap_or_else(|| panic!("{r}"));
            assert!(
                doc["components"]["schemas"].get(name).is_some(),
                "{r} is not defined"
            );
        }
    }
}
