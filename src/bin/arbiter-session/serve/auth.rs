//! Who is calling: `Authorization: Bearer <token>`, matched against the admin and the
//! gateway token.
//!
//! # Invariant: no token leaks, no timing oracle
//! Tokens are compared as SHA-256 digests, in constant time, so neither a token's length
//! nor the position of its first wrong byte shows in the time to answer. A token is never
//! logged, never echoed in an error, and never printed by `Debug`.

use axum::extract::FromRequestParts;
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use sha2::{Digest as _, Sha256};

use super::api::ApiError;
use super::state::AppState;

/// What a caller may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role {
    /// Creates sessions and manages agents.
    Admin,
    /// Uses and checks sessions on an agent's behalf.
    Gateway,
}

/// The two tokens, kept as digests only.
pub(crate) enum Tokens {
    /// Every request must present one of these.
    Required { admin: [u8; 32], gateway: [u8; 32] },
    /// `--no-auth` (loopback only): every caller has every role.
    Disabled,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Tokens::Required { .. } => f.write_str("Tokens::Required(..)"),
            Tokens::Disabled => f.write_str("Tokens::Disabled"),
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
    pub(crate) fn new(admin: &str, gateway: &str) -> Self {
        Tokens::Required {
            admin: digest(admin),
            gateway: digest(gateway),
        }
    }

    /// The roles `presented` (a bearer token) grants; empty for a wrong one.
    fn roles(&self, presented: &str) -> &'static [Role] {
        match self {
            Tokens::Disabled => &[Role::Admin, Role::Gateway],
            Tokens::Required { admin, gateway } => {
                let presented = digest(presented);
                // Both comparisons always run.
                let (is_admin, is_gateway) = (same(admin, &presented), same(gateway, &presented));
                match (is_admin, is_gateway) {
                    (true, true) => &[Role::Admin, Role::Gateway],
                    (true, false) => &[Role::Admin],
                    (false, true) => &[Role::Gateway],
                    (false, false) => &[],
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
    /// Ok if the caller has one of `allowed`; else 403.
    pub(crate) fn require(self, allowed: &[Role]) -> Result<(), ApiError> {
        if self.roles.iter().any(|role| allowed.contains(role)) {
            Ok(())
        } else {
            Err(ApiError::forbidden())
        }
    }
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        if matches!(*state.tokens, Tokens::Disabled) {
            return Ok(Caller {
                roles: state.tokens.roles(""),
            });
        }
        let presented = parts
            .headers
            .get(AUTHORIZATION)
            .and_then(|value| value.to_str().ok())
            .and_then(bearer)
            .ok_or_else(ApiError::unauthorized)?;
        let roles = state.tokens.roles(presented);
        if roles.is_empty() {
            return Err(ApiError::unauthorized());
        }
        Ok(Caller { roles })
    }
}

/// Whether `host` (a `Host` header's value) names this machine's loopback interface:
/// `localhost`, an address in 127.0.0.0/8 or `[::1]`, with or without a port. Under
/// `--no-auth` only these are served: a page a browser loaded from a name that now
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

/// Under `--no-auth`, answers 403 to a request whose `Host` is not a loopback name (see
/// [`is_loopback_host`]); with tokens, lets every request through to them.
pub(crate) async fn loopback_host_only(
    axum::extract::State(state): axum::extract::State<AppState>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::response::IntoResponse as _;
    if matches!(*state.tokens, Tokens::Disabled) {
        let host = request
            .headers()
            .get(axum::http::header::HOST)
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
        let tokens = Tokens::new("admin-secret", "gateway-secret");
        assert_eq!(tokens.roles("admin-secret"), [Role::Admin]);
        assert_eq!(tokens.roles("gateway-secret"), [Role::Gateway]);
        assert!(tokens.roles("gateway-secre").is_empty());
        assert!(tokens.roles("").is_empty());
        assert_eq!(format!("{tokens:?}"), "Tokens::Required(..)");
        assert_eq!(bearer("Bearer abc"), Some("abc"));
        assert_eq!(bearer("bearer  abc "), Some("abc"));
        assert_eq!(bearer("Basic abc"), None);
        assert_eq!(bearer("Bearer"), None);
    }
}
