//! A session's bearer token: what an agent presents where it holds the session itself (the
//! MCP proxy), instead of a gateway vouching for it.
//!
//! # Invariant: the token is shown once, and only its digest is kept
//! A token is `arb_<session id>_<secret>`: the session id (32 hex digits) names the session
//! to load, and the secret (64 hex digits, 244 random bits from the generator `uuid`'s v4
//! ids use) proves the bearer was given it. Only SHA-256 of the secret is stored, in the
//! session's row ([`TaskSession::token_digest`]), so nothing in the database or a cached
//! session authenticates; the token itself exists only in the answer to the create. A
//! presented token is compared by digest in constant time. Its `Debug` never prints it.
//!
//! ```
//! use arbiter_session::{CreateSessionRequest, SessionToken, TokenSecret};
//! # let agent = uuid::Uuid::new_v4();
//! let secret = TokenSecret::generate();
//! let req = CreateSessionRequest::new(agent, ["search"], 10, chrono::Duration::minutes(5))
//!     .with_token(&secret);
//! // … let session = store.create(req).await?;
//! # let session_id = uuid::Uuid::new_v4();
//! let token: SessionToken = secret.token_for(session_id);
//! assert_eq!(SessionToken::session_of(token.as_str()), Some(session_id));
//! ```

use std::fmt;

use sha2::{Digest as _, Sha256};
use uuid::Uuid;

use crate::model::TaskSession;

const PREFIX: &str = "arb_";
const SECRET_BYTES: usize = 32;

/// The secret of a token about to be issued: its digest goes into the create request
/// ([`CreateSessionRequest::with_token`](crate::CreateSessionRequest::with_token)), the
/// token is made once the session has its id ([`Self::token_for`]).
pub struct TokenSecret([u8; SECRET_BYTES]);

/// A session's bearer token, as issued: give it to the agent, and keep no copy.
#[derive(Clone, PartialEq, Eq)]
pub struct SessionToken(String);

impl TokenSecret {
    /// A fresh secret.
    pub fn generate() -> Self {
        let mut secret = [0; SECRET_BYTES];
        // Two v4 ids: 244 bits from uuid's cryptographically secure generator.
        let (first, second) = secret.split_at_mut(16);
        first.copy_from_slice(Uuid::new_v4().as_bytes());
        second.copy_from_slice(Uuid::new_v4().as_bytes());
        TokenSecret(secret)
    }

    /// SHA-256 of the secret: what the session's row keeps.
    pub fn digest(&self) -> [u8; 32] {
        Sha256::digest(self.0).into()
    }

    /// The token of session `session_id` with this secret.
    pub fn token_for(&self, session_id: Uuid) -> SessionToken {
        let mut token = String::with_capacity(PREFIX.len() + 32 + 1 + 2 * SECRET_BYTES);
        token.push_str(PREFIX);
        token.push_str(&session_id.simple().to_string());
        token.push('_');
        for byte in self.0 {
            token.push_str(&format!("{byte:02x}"));
        }
        SessionToken(token)
    }
}

impl SessionToken {
    /// The token's text, for the agent.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The session a presented token names, if it is shaped like a token at all (it may
    /// still not authenticate: see [`Self::authenticates`]).
    pub fn session_of(presented: &str) -> Option<Uuid> {
        parse(presented).map(|(id, _)| id)
    }

    /// Whether `presented` is the token of `session`: it names the session and its secret's
    /// digest is the session's, compared in constant time. A session without a token is
    /// authenticated by none.
    pub fn authenticates(presented: &str, session: &TaskSession) -> bool {
        let (Some((id, secret)), Some(kept)) = (parse(presented), session.token_digest) else {
            return false;
        };
        let digest: [u8; 32] = Sha256::digest(secret).into();
        let differs = digest
            .iter()
            .zip(kept)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b));
        (differs == 0) & (id == session.session_id)
    }
}

/// The session id and secret of `token`, if it is `arb_<32 hex>_<64 hex>`.
fn parse(token: &str) -> Option<(Uuid, [u8; SECRET_BYTES])> {
    let rest = token.trim().strip_prefix(PREFIX)?;
    let (id, secret_hex) = rest.split_once('_')?;
    if id.len() != 32 || secret_hex.len() != 2 * SECRET_BYTES {
        return None;
    }
    let id = Uuid::try_parse(id).ok()?;
    let mut secret = [0; SECRET_BYTES];
    for (byte, pair) in secret.iter_mut().zip(secret_hex.as_bytes().chunks_exact(2)) {
        let pair = std::str::from_utf8(pair).ok()?;
        *byte = u8::from_str_radix(pair, 16).ok()?;
    }
    Some((id, secret))
}

impl fmt::Debug for TokenSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("TokenSecret(..)")
    }
}

impl fmt::Debug for SessionToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SessionToken(..)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::CreateSessionRequest;
    use chrono::Utc;

    fn session_with(secret: &TokenSecret) -> TaskSession {
        let req =
            CreateSessionRequest::new(Uuid::new_v4(), ["search"], 1, chrono::Duration::minutes(1))
                .with_token(secret);
        TaskSession::from_request(Uuid::new_v4(), &req, Utc::now())
    }

    #[test]
    fn a_token_authenticates_its_session_only() {
        let secret = TokenSecret::generate();
        let session = session_with(&secret);
        let token = secret.token_for(session.session_id);
        assert!(SessionToken::authenticates(token.as_str(), &session));
        assert_eq!(
            SessionToken::session_of(token.as_str()),
            Some(session.session_id)
        );
        // Another session with the same digest (impossible but for a copied row): the id
        // must match too.
        let mut other = session.clone();
        other.session_id = Uuid::new_v4();
        assert!(!SessionToken::authenticates(token.as_str(), &other));
        // Another secret, no token, a mangled one.
        let stranger = TokenSecret::generate().token_for(session.session_id);
        assert!(!SessionToken::authenticates(stranger.as_str(), &session));
        let mut tokenless = session.clone();
        tokenless.token_digest = None;
        assert!(!SessionToken::authenticates(token.as_str(), &tokenless));
        for bad in [
            "",
            "arb_",
            &token.as_str()[..token.as_str().len() - 1],
            &token.as_str().replace("arb_", "xyz_"),
            &format!("{}0", token.as_str()),
            &token.as_str().to_uppercase(),
        ] {
            assert!(!SessionToken::authenticates(bad, &session), "{bad}");
        }
        assert_eq!(format!("{token:?}"), "SessionToken(..)");
        assert_ne!(secret.digest(), TokenSecret::generate().digest());
    }
}
