//! The operator's console at `/ui/`: one page, one script and one stylesheet
//! (`console/`), embedded in the binary. It is written without a framework or a build
//! step: the pages are tables, bars and a few SVG charts over the read routes
//! (`/v1/overview`, `/v1/sessions`, `/v1/budgets`, `/v1/reports/*`), which plain DOM code
//! draws in under a thousand lines, and nothing has to be fetched to build it.
//!
//! # Invariant: the console asks nothing of any other host
//! Operators run it in air-gapped networks. Every answer here carries a
//! Content-Security-Policy that allows scripts, styles, images and requests from this origin
//! only, and no inline script or style, so an agent's text shown in a page (a tool name, an
//! intent) cannot run as code. The token is kept in the browser's session storage and sent
//! as a bearer header; there is no cookie, so no request forged from another site carries
//! it.

use axum::Router;
use axum::http::{HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

use super::AppState;

/// What a page of the console may load, and from where.
pub(crate) const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; \
     style-src 'self'; img-src 'self' data:; connect-src 'self'; base-uri 'none'; \
     form-action 'none'; frame-ancestors 'none'";

const INDEX: &str = include_str!("console/index.html");
const SCRIPT: &str = include_str!("console/console.js");
const STYLE: &str = include_str!("console/console.css");

/// The console's routes. `/ui` redirects to `ui/` (relative, so a router nested under a
/// prefix keeps it), where the page's relative URLs resolve: `console.js`, `../v1/…`.
pub(crate) fn routes() -> Router<AppState> {
    Router::new()
        .route(
            "/ui",
            get(|| async {
                under_policy((StatusCode::PERMANENT_REDIRECT, [(header::LOCATION, "ui/")]))
            }),
        )
        .route(
            "/ui/",
            get(|| async { asset("text/html; charset=utf-8", INDEX) }),
        )
        .route(
            "/ui/console.js",
            get(|| async { asset("text/javascript; charset=utf-8", SCRIPT) }),
        )
        .route(
            "/ui/console.css",
            get(|| async { asset("text/css; charset=utf-8", STYLE) }),
        )
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    under_policy(([(header::CONTENT_TYPE, content_type)], body))
}

/// `answer` with the policy and the headers every answer here carries.
fn under_policy(answer: impl IntoResponse) -> Response {
    let mut response = answer.into_response();
    let headers = response.headers_mut();
    let fixed: [(HeaderName, &'static str); 5] = [
        (header::CONTENT_SECURITY_POLICY, CONTENT_SECURITY_POLICY),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::REFERRER_POLICY, "no-referrer"),
        (header::X_FRAME_OPTIONS, "DENY"),
        // The assets change with the binary: revalidate rather than keep an old one.
        (header::CACHE_CONTROL, "no-cache"),
    ];
    for (name, value) in fixed {
        headers.insert(name, HeaderValue::from_static(value));
    }
    response
}
