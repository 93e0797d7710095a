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

#[cfg(test)]
mod tests {
    use super::*;

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
