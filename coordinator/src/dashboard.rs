//! The operator dashboard at `/`: one page and its script and style, built into the binary (no
//! CDN: it works offline), and a login form that turns a submit token into an HttpOnly cookie.
//! The cookie opens the read-only (`GET`) routes of the submit role only, so a page elsewhere
//! cannot make a logged-in browser change anything; it is `SameSite=Strict` besides.

use axum::Form;
use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use cookie::{Cookie, SameSite};
use nightshift_proto::wire::{ShardList, Throughput, WorkerList};
use serde::Deserialize;

use crate::api::{ApiState, Role, authorize, authorize_token};
use crate::api_error::ApiError;
use crate::openapi::{JobPath, SubmitErrors};

/// The login cookie's name.
pub const COOKIE: &str = "nightshift_session";
/// The header a TLS-terminating proxy names the client's scheme in.
const FORWARDED_PROTO: &str = "x-forwarded-proto";
/// How long a login lasts.
const SESSION_MAX_AGE: cookie::time::Duration = cookie::time::Duration::hours(12);
/// Where a refused login lands: the page shows "wrong token".
const REFUSED: &str = "/?login=refused";

const INDEX_HTML: &str = include_str!("../assets/index.html");
const APP_JS: &str = include_str!("../assets/app.js");
const APP_CSS: &str = include_str!("../assets/app.css");

/// The page allows only its own script and style, and no framing.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
     connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

pub fn routes() -> Router<ApiState> {
    Router::new()
        .route("/", get(page))
        .route("/assets/{file}", get(asset))
        .route("/ui/login", post(login))
        .route("/ui/logout", post(logout))
        .route("/v1/jobs/{job}/shards", get(shards))
        .route("/v1/jobs/{job}/throughput", get(throughput))
        .route("/v1/workers", get(workers))
}

/// The dashboard (no token needed to load it; its data needs one).
#[utoipa::path(get, path = "/", tag = "dashboard",
    responses((status = 200, body = String, content_type = "text/html")))]
pub(crate) async fn page() -> Response {
    served(INDEX_HTML, "text/html; charset=utf-8")
}

/// The dashboard's script and style.
#[utoipa::path(get, path = "/assets/{file}", tag = "dashboard",
    params(("file" = String, Path, description = "`app.js` or `app.css`")),
    responses((status = 200, body = String, content_type = "text/javascript"),
        (status = 404, body = nightshift_proto::ErrorBody)))]
pub(crate) async fn asset(Path(file): Path<String>) -> Result<Response, ApiError> {
    match file.as_str() {
        "app.js" => Ok(served(APP_JS, "text/javascript; charset=utf-8")),
        "app.css" => Ok(served(APP_CSS, "text/css; charset=utf-8")),
        _ => Err(ApiError::NotFound("no such asset".into())),
    }
}

fn served(body: &'static str, content_type: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CONTENT_SECURITY_POLICY, CSP),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::REFERRER_POLICY, "no-referrer"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

#[derive(Deserialize, utoipa::ToSchema)]
pub(crate) struct Login {
    /// A submit token.
    token: String,
}

/// Checks a submit token; sets the login cookie and goes to `/`, or goes to `/?login=refused`.
#[utoipa::path(post, path = "/ui/login", tag = "dashboard",
    request_body(content = Login, content_type = "application/x-www-form-urlencoded"),
    responses((status = 303, description = "To `/` with the cookie set, or to `/?login=refused`")))]
pub(crate) async fn login(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Form(form): Form<Login>,
) -> Response {
    if authorize_token(&state, form.token.trim(), Role::Submit).is_err() {
        return redirect(REFUSED, None);
    }
    let cookie = session_cookie(hex::encode(form.token.trim()), &headers)
        .max_age(SESSION_MAX_AGE)
        .build();
    redirect("/", Some(cookie))
}

/// Clears the login cookie.
#[utoipa::path(post, path = "/ui/logout", tag = "dashboard",
    responses((status = 303, description = "To `/`, the cookie cleared")))]
pub(crate) async fn logout(headers: HeaderMap) -> Response {
    let cookie = session_cookie(String::new(), &headers)
        .max_age(cookie::time::Duration::ZERO)
        .build();
    redirect("/", Some(cookie))
}

/// The login cookie holding `value`: HttpOnly, SameSite=Strict, and `Secure` when the request
/// came over HTTPS through a proxy that terminates TLS (`X-Forwarded-Proto: https`), so a
/// browser never sends it, and the token in it, over plain HTTP. A coordinator reached over
/// plain HTTP (a laptop, a private network) still gets a cookie its browser keeps.
fn session_cookie(value: String, headers: &HeaderMap) -> cookie::CookieBuilder<'static> {
    let https = headers
        .get(FORWARDED_PROTO)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(',').next())
        .is_some_and(|proto| proto.trim().eq_ignore_ascii_case("https"));
    Cookie::build((COOKIE, value))
        .http_only(true)
        .same_site(SameSite::Strict)
        .secure(https)
        .path("/")
}

fn redirect(to: &'static str, cookie: Option<Cookie<'static>>) -> Response {
    let mut resp = (StatusCode::SEE_OTHER, [(header::LOCATION, to)]).into_response();
    if let Some(value) = cookie.and_then(|c| HeaderValue::from_str(&c.to_string()).ok()) {
        resp.headers_mut().insert(header::SET_COOKIE, value);
    }
    resp
}

/// The token in the login cookie, if the request carries one.
fn cookie_token(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(Cookie::split_parse)
        .filter_map(Result::ok)
        .find(|c| c.name() == COOKIE)
        .and_then(|c| hex::decode(c.value()).ok())
        .and_then(|bytes| String::from_utf8(bytes).ok())
}

/// A read-only route of the submit role: a bearer token, or else the login cookie.
pub(crate) fn authorize_read(state: &ApiState, headers: &HeaderMap) -> Result<(), ApiError> {
    if headers.contains_key(header::AUTHORIZATION) {
        return authorize(state, headers, Role::Submit);
    }
    let token = cookie_token(headers).ok_or(ApiError::Unauthorized)?;
    authorize_token(state, &token, Role::Submit)
}

/// A job's shards in row order.
#[utoipa::path(get, path = "/v1/jobs/{job}/shards", tag = "jobs", params(JobPath),
    responses((status = 200, body = ShardList), SubmitErrors),
    security(("submit_token" = []), ("dashboard_cookie" = [])))]
pub(crate) async fn shards(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Path(job): Path<String>,
) -> Result<axum::Json<ShardList>, ApiError> {
    authorize_read(&state, &headers)?;
    Ok(axum::Json(state.service.shard_list(&job).await?))
}

/// Rows a job committed over time.
#[utoipa::path(get, path = "/v1/jobs/{job}/throughput", tag = "jobs", params(JobPath),
    responses((status = 200, body = Throughput), SubmitErrors),
    security(("submit_token" = []), ("dashboard_cookie" = [])))]
pub(crate) async fn throughput(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Path(job): Path<String>,
) -> Result<axum::Json<Throughput>, ApiError> {
    authorize_read(&state, &headers)?;
    Ok(axum::Json(state.service.throughput(&job).await?))
}

/// Workers that claimed in the last minute or hold a lease, with what they hold.
#[utoipa::path(get, path = "/v1/workers", tag = "jobs",
    responses((status = 200, body = WorkerList), SubmitErrors),
    security(("submit_token" = []), ("dashboard_cookie" = [])))]
pub(crate) async fn workers(
    State(state): State<ApiState>,
    headers: HeaderMap,
) -> Result<axum::Json<WorkerList>, ApiError> {
    authorize_read(&state, &headers)?;
    Ok(axum::Json(state.service.workers().await?))
}
