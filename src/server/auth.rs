//! Who is calling: `Authorization: Bearer <token>`, matched against the admin, the gateway
//! and the viewer token. Each token grants one role; the viewer's grants reading only.
//!
//! # Invariant: no token leaks, no timing oracle
//! Tokens are compared as SHA-256 digests, in constant time, so neither a token's length
//! nor the position of its first wrong byte shows in the time to answer. A token is never
//! logged, never echoed in an error, and never printed by `Debug`.

use std::sync::Arc;

use axum::extract::{FromRef, FromRequestParts, Request, State};
use axum::http::header::{AUTHORIZATION, HOST};
use axum::http::request::Parts;
use axum::middleware::Next;
use axum::response::{IntoResponse as _, Response};
use sha2::{Digest as _, Sha256};

use super::api::ApiError;

/// Fewest bytes a token may have (after trimming): 128 bits, if random.
pub const MIN_TOKEN_BYTES: usize = 16;

/// What a caller may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role {
    /// Creates sessions and manages agents.
    Admin,
    /// Uses and checks sessions on an agent's behalf.
    Gateway,
    /// Reads sessions, budgets and reports (the operator's console); changes nothing.
    Viewer,
}

/// The admin, the gateway and (optionally) the viewer token, kept as digests only: the
/// admin's creates sessions and manages agents, the gateway's uses and checks them, the
/// viewer's reads and changes nothing.
pub struct Tokens(Guard);

/// What a [`Tokens`] requires of a request.
enum Guard {
    /// Every request must present one of these.
    Required {
        admin: [u8; 32],
        gateway: [u8; 32],
        viewer: Option<[u8; 32]>,
    },
    /// No token: every caller has every role (loopback `Host` names only).
    Disabled,
}

/// Why two tokens cannot guard a server.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TokenError {
    /// A token has fewer than [`MIN_TOKEN_BYTES`] bytes after trimming.
    #[error("the {role} token is shorter than {MIN_TOKEN_BYTES} bytes")]
    TooShort {
        /// `admin` or `gateway`.
        role: &'static str,
    },
    /// The two tokens are the same, so a gateway could create sessions.
    #[error("the admin and gateway tokens must differ: a gateway could create sessions")]
    Same,
    /// The viewer token is the admin's or the gateway's, so a viewer could change things.
    #[error("the viewer token must differ from the admin and gateway tokens")]
    ViewerSame,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Guard::Required { .. } => f.write_str("Tokens::Required(..)"),
            Guard::Disabled => f.write_str("Tokens::Disabled"),
        }
    }
}

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// Equal in constant time: every byte is looked at whatever differs.
fn same(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl Tokens {
    /// Requires `admin` or `gateway` (each trimmed) as a bearer token: each of at least
    /// [`MIN_TOKEN_BYTES`] bytes, and different.
    pub fn new(admin: &str, gateway: &str) -> Result<Self, TokenError> {
        let (admin, gateway) = (admin.trim(), gateway.trim());
        for (role, token) in [("admin", admin), ("gateway", gateway)] {
            if token.len() < MIN_TOKEN_BYTES {
                return Err(TokenError::TooShort { role });
            }
        }
        if admin == gateway {
            return Err(TokenError::Same);
        }
        Ok(Tokens(Guard::Required {
            admin: digest(admin),
            gateway: digest(gateway),
            viewer: None,
        }))
    }

    /// Also accepts `viewer` (trimmed, at least [`MIN_TOKEN_BYTES`] bytes, and distinct from
    /// the other two), which may read sessions, budgets and reports and change nothing.
    /// Without tokens ([`Self::disabled`]) there is nothing to add.
    ///
    /// # Errors
    /// [`TokenError::TooShort`] or [`TokenError::ViewerSame`].
    pub fn with_viewer(self, viewer: &str) -> Result<Self, TokenError> {
        let Guard::Required { admin, gateway, .. } = self.0 else {
            return Ok(self);
        };
        let viewer = viewer.trim();
        if viewer.len() < MIN_TOKEN_BYTES {
            return Err(TokenError::TooShort { role: "viewer" });
        }
        let viewer = digest(viewer);
        if same(&viewer, &admin) || same(&viewer, &gateway) {
            return Err(TokenError::ViewerSame);
        }
        Ok(Tokens(Guard::Required {
            admin,
            gateway,
            viewer: Some(viewer),
        }))
    }

    /// No token: every caller has every role, and only requests whose `Host` is a loopback
    /// name are served. For a server listening on a loopback address only.
    pub fn disabled() -> Self {
        Tokens(Guard::Disabled)
    }

    /// Whether no token is required.
    pub fn is_disabled(&self) -> bool {
        matches!(self.0, Guard::Disabled)
    }

    /// The roles `presented` (a bearer token) grants; empty for a wrong one.
    fn roles(&self, presented: &str) -> &'static [Role] {
        match &self.0 {
            Guard::Disabled => &[Role::Admin, Role::Gateway, Role::Viewer],
            Guard::Required {
                admin,
                gateway,
                viewer,
            } => {
                let presented = digest(presented);
                // Every comparison always runs; the tokens are distinct, so one matches.
                let is_admin = same(admin, &presented);
                let is_gateway = same(gateway, &presented);
                let is_viewer = viewer.is_some_and(|viewer| same(&viewer, &presented));
                match (is_admin, is_gateway, is_viewer) {
                    (true, _, _) => &[Role::Admin],
                    (false, true, _) => &[Role::Gateway],
                    (false, false, true) => &[Role::Viewer],
                    (false, false, false) => &[],
                }
            }
        }
    }
}

/// The token of an `Authorization: Bearer <token>` value (the scheme is case-insensitive).
fn bearer(value: &str) -> Option<&str> {
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// An authenticated caller: the roles its token grants. Extracting it answers 401 for a
/// missing or wrong token.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Caller {
    roles: &'static [Role],
}

impl Caller {
    /// The caller presenting `authorization` (the value of an `Authorization` header or
    /// gRPC metadata entry, if any); 401 for a missing or wrong token.
    pub(crate) fn presenting(
        tokens: &Tokens,
        authorization: Option<&str>,
    ) -> Result<Self, ApiError> {
        if tokens.is_disabled() {
            return Ok(Caller {
                roles: tokens.roles(""),
            });
        }
        let presented = authorization
            .and_then(bearer)
            .ok_or_else(ApiError::unauthorized)?;
        let roles = tokens.roles(presented);
        if roles.is_empty() {
            return Err(ApiError::unauthorized());
        }
        Ok(Caller { roles })
    }

    /// Ok if the caller has one of `allowed`; else 403.
    pub(crate) fn require(self, allowed: &[Role]) -> Result<(), ApiError> {
        if self.roles.iter().any(|role| allowed.contains(role)) {
            Ok(())
        } else {
            Err(ApiError::forbidden())
        }
    }
}

impl<S> FromRequestParts<S> for Caller
where
    S: Send + Sync,
    Arc<Tokens>: FromRef<S>,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let tokens = Arc::<Tokens>::from_ref(state);
        let authorization = parts
            .headers
            .get(AUTHORIZATION)
            .and_then(|value| value.to_str().ok());
        Caller::presenting(&tokens, authorization)
    }
}

/// Whether `host` (a `Host` header's value) names this machine's loopback interface:
/// `localhost`, an address in 127.0.0.0/8 or `[::1]`, with or without a port. Under
/// [`Tokens::disabled`] only these are served: a page a browser loaded from a name that now
/// resolves to 127.0.0.1 (DNS rebinding) sends its own name.
pub(crate) fn is_loopback_host(host: &str) -> bool {
    let name = match host.strip_prefix('[') {
        // `[v6]` or `[v6]:port`.
        Some(bracketed) => match bracketed.split_once(']') {
            Some((address, rest)) if rest.is_empty() || is_port(rest) => address,
            _ => return false,
        },
        None => match host.rsplit_once(':') {
            Some((name, port)) if is_port(&format!(":{port}")) => name,
            Some(_) => return false,
            None => host,
        },
    };
    name.eq_ignore_ascii_case("localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|address| address.is_loopback())
}

/// Whether `rest` is `:` and a port number.
fn is_port(rest: &str) -> bool {
    rest.strip_prefix(':')
        .is_some_and(|port| port.parse::<u16>().is_ok())
}

/// With [`Tokens::disabled`], answers 403 to a request whose `Host` is not a loopback name
/// (see [`is_loopback_host`]); with tokens, lets every request through to them.
pub(crate) async fn loopback_host_only(
    State(tokens): State<Arc<Tokens>>,
    request: Request,
    next: Next,
) -> Response {
    if tokens.is_disabled() {
        let host = request
            .headers()
            .get(HOST)
            .and_then(|value| value.to_str().ok());
        if !host.is_some_and(is_loopback_host) {
            return ApiError::forbidden().into_response();
        }
    }
    next.run(request).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_hosts_are_loopback_names_only() {
        for host in [
            "localhost",
            "LOCALHOST:8080",
            "127.0.0.1",
            "127.1.2.3:80",
            "[::1]",
            "[::1]:8080",
        ] {
            assert!(is_loopback_host(host), "{host}");
        }
        for host in [
            "",
            "attacker.example",
            "localhost.attacker.example",
            "127.0.0.1.attacker.example:80",
            "10.0.0.1:80",
            "[::2]:80",
            "[::1]x",
            "localhost:http",
            "localhost:99999",
            "::1",
        ] {
            assert!(!is_loopback_host(host), "{host}");
        }
    }

    #[test]
    fn each_token_grants_its_own_role_only() {
        let tokens = Tokens::new(" admin-secret-0001\n", "gateway-secret-01").unwrap();
        assert_eq!(tokens.roles("admin-secret-0001"), [Role::Admin]);
        assert_eq!(tokens.roles("gateway-secret-01"), [Role::Gateway]);
        assert!(tokens.roles("gateway-secret-0").is_empty());
        assert!(tokens.roles("").is_empty());
        assert_eq!(format!("{tokens:?}"), "Tokens::Required(..)");
        assert_eq!(bearer("Bearer abc"), Some("abc"));
        assert_eq!(bearer("bearer  abc "), Some("abc"));
        assert_eq!(bearer("Basic abc"), None);
        assert_eq!(bearer("Bearer"), None);
    }

    #[test]
    fn tokens_are_long_and_distinct() {
        assert_eq!(
            Tokens::new("short", "gateway-secret-01").unwrap_err(),
            TokenError::TooShort { role: "admin" }
        );
        assert_eq!(
            Tokens::new("admin-secret-0001", "  gateway-secret  ").unwrap_err(),
            TokenError::TooShort { role: "gateway" }
        );
        assert_eq!(
            Tokens::new("the-same-secret-1", "the-same-secret-1 ").unwrap_err(),
            TokenError::Same
        );
        assert!(Tokens::disabled().is_disabled());
        let tokens = || Tokens::new("admin-secret-0001", "gateway-secret-01").unwrap();
        for (viewer, refused) in [
            ("viewer", TokenError::TooShort { role: "viewer" }),
            (" admin-secret-0001 ", TokenError::ViewerSame),
            ("gateway-secret-01", TokenError::ViewerSame),
        ] {
            assert_eq!(tokens().with_viewer(viewer).unwrap_err(), refused);
        }
        let with_viewer = tokens().with_viewer("viewer-secret-001").unwrap();
        assert_eq!(with_viewer.roles("viewer-secret-001"), [Role::Viewer]);
        assert_eq!(with_viewer.roles("admin-secret-0001"), [Role::Admin]);
        assert!(tokens().roles("viewer-secret-001").is_empty());
    }
}
