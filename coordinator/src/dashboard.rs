//! The operator dashboard at `/`: one page and its script and style, built into the binary (no
//! CDN: it works offline), and a login form that turns a submit token into an HttpOnly session
//! cookie. The cookie opens the read-only (`GET`) routes of the submit role only, so a page
//! elsewhere cannot make a logged-in browser change anything; it is `SameSite=Strict` besides.
//! It holds the login's time and a MAC of it keyed by the token, never the token: a copied
//! cookie reads for at most `SESSION_MAX_AGE`, and gives no token to act with.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Form;
use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use cookie::{Cookie, SameSite};
use hmac::{Hmac, Mac};
use nightshift_proto::wire::{ShardList, Throughput, WorkerList};
use serde::Deserialize;
use sha2::Sha256;

use crate::api::{ApiState, Role, authorize, authorize_token};
use crate::api_error::ApiError;
use crate::openapi::{JobPath, SubmitErrors};

/// The login cookie's name.
pub const COOKIE: &str = "nightshift_session";
/// The header a TLS-terminating proxy names the client's scheme in.
const FORWARDED_PROTO: &str = "x-forwarded-proto";
/// How long a login lasts (the browser is told, and the coordinator checks).
const SESSION_MAX_AGE: Duration = Duration::from_secs(12 * 3600);
/// A session issued this far ahead of a replica's clock still reads (clocks differ a little).
const CLOCK_SKEW: Duration = Duration::from_secs(60);
/// What a session's MAC covers before its time, so that it proves nothing anywhere else.
const SESSION_CONTEXT: &[u8] = b"nightshift dashboard session ";
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
    let token = form.token.trim();
    if authorize_token(&state, token, Role::Submit).is_err() {
        return redirect(REFUSED, None);
    }
    let max_age = cookie::time::Duration::seconds(SESSION_MAX_AGE.as_secs() as i64);
    let cookie = session_cookie(session_value(token, unix_now()), &headers)
        .max_age(max_age)
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

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The MAC of a session issued at `issued_s` (Unix seconds), keyed by the submit token.
fn session_mac(token: &str, issued_s: u64) -> Hmac<Sha256> {
    let mut mac =
        Hmac::<Sha256>::new_from_slice(token.as_bytes()).expect("HMAC takes a key of any length");
    mac.update(SESSION_CONTEXT);
    mac.update(issued_s.to_string().as_bytes());
    mac
}

/// The session cookie's value for a login with `token` at `issued_s`: `TIME.MAC` in hex.
fn session_value(token: &str, issued_s: u64) -> String {
    let tag = session_mac(token, issued_s).finalize().into_bytes();
    format!("{issued_s}.{}", hex::encode(tag))
}

/// Whether a session cookie's value was issued, within `SESSION_MAX_AGE` of `now_s`, for one
/// of `tokens` (every replica sharing the token reads it; a token removed ends its sessions).
fn session_holds(value: &str, tokens: &[String], now_s: u64) -> bool {
    let Some((issued, tag)) = value.split_once('.') else {
        return false;
    };
    let (Ok(issued_s), Ok(tag)) = (issued.parse::<u64>(), hex::decode(tag)) else {
        return false;
    };
    let fresh = issued_s <= now_s.saturating_add(CLOCK_SKEW.as_secs())
        && now_s.saturating_sub(issued_s) <= SESSION_MAX_AGE.as_secs();
    fresh
        && tokens
            .iter()
            .any(|t| session_mac(t, issued_s).verify_slice(&tag).is_ok())
}

/// The login cookie's value, if the request carries one.
fn session_cookie_value(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(Cookie::split_parse)
        .filter_map(Result::ok)
        .find(|c| c.name() == COOKIE)
        .map(|c| c.value().to_string())
}

/// A read-only route of the submit role: a bearer token, or else a login session that holds.
pub(crate) fn authorize_read(state: &ApiState, headers: &HeaderMap) -> Result<(), ApiError> {
    if headers.contains_key(header::AUTHORIZATION) {
        return authorize(state, headers, Role::Submit);
    }
    let value = session_cookie_value(headers).ok_or(ApiError::Unauthorized)?;
    if session_holds(&value, &state.tokens.submit, unix_now()) {
        Ok(())
    } else {
        Err(ApiError::Unauthorized)
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_session_holds_for_its_token_within_its_age_and_shows_nothing_of_it() {
        let tokens = vec!["other".to_string(), "S3cret-token".to_string()];
        let issued = 1_796_000_000;
        let value = session_value("S3cret-token", issued);
        assert!(!value.contains("S3cret") && !value.contains(&hex::encode("S3cret-token")));
        let max = SESSION_MAX_AGE.as_secs();
        assert!(session_holds(&value, &tokens, issued));
        assert!(session_holds(&value, &tokens, issued + max));
        assert!(!session_holds(&value, &tokens, issued + max + 1), "expired");
        assert!(session_holds(
            &value,
            &tokens,
            issued - CLOCK_SKEW.as_secs()
        ));
        assert!(
            !session_holds(&value, &tokens, issued - CLOCK_SKEW.as_secs() - 1),
            "from the future"
        );
        assert!(
            !session_holds(&value, &tokens[..1], issued),
            "its token was removed"
        );
        let (_, tag) = value.split_once('.').unwrap();
        let later = format!("{}.{tag}", issued + max);
        assert!(
            !session_holds(&later, &tokens, issued + max),
            "its time was changed"
        );
        for garbage in ["", ".", "x.y", "1796000000", &hex::encode("S3cret-token")] {
            assert!(!session_holds(garbage, &tokens, issued), "{garbage}");
        }
    }
}
