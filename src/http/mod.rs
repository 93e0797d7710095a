//! What a gateway needs to answer over HTTP: the status for each [`SessionError`], and the
//! header that carries a session id.
//!
//! The `Display` of a [`SessionError`] is safe to send as the body (see
//! [`crate::error`]'s opacity invariant); the status says which kind of denial it was.
//! [`check`] reads what an authorization check asks to decide; [`status`] is what an allowed
//! answer tells the agent of what is left.

pub mod check;
pub mod status;

use uuid::Uuid;

use crate::error::SessionError;

/// HTTP status a gateway should answer with for `err`.
///
/// 404 not found, 408 expired, 429 budget (the session's or a shared one) / rate / too many
/// sessions, 403 tool or agent,
/// 410 closed, 503 storage, 400 invalid request, 404 unknown reservation, 409 reservation
/// already settled.
pub fn status_code_for_error(err: &SessionError) -> u16 {
    match err {
        SessionError::NotFound(_) => 404,
        SessionError::Expired(_) => 408,
        SessionError::BudgetExceeded { .. }
        | SessionError::SharedBudgetExceeded { .. }
        | SessionError::RateLimited { .. }
        | SessionError::TooManySessions { .. } => 429,
        SessionError::ToolNotAuthorized { .. } | SessionError::AgentMismatch { .. } => 403,
        SessionError::AlreadyClosed(_) => 410,
        SessionError::StorageWriteThrough { .. } | SessionError::StorageRead { .. } => 503,
        SessionError::InvalidRequest { .. } => 400,
        SessionError::ReservationNotFound(_) => 404,
        SessionError::ReservationSettled(_) => 409,
    }
}

/// A stable, machine-readable code for `err`: its variant in snake_case
/// (`budget_exceeded`, `tool_not_authorized`, `storage_write_through`, …), for an error
/// body beside the opaque `Display`.
pub fn error_code(err: &SessionError) -> &'static str {
    match err {
        SessionError::NotFound(_) => "not_found",
        SessionError::Expired(_) => "expired",
        SessionError::BudgetExceeded { .. } | SessionError::SharedBudgetExceeded { .. } => {
            "budget_exceeded"
        }
        SessionError::ToolNotAuthorized { .. } => "tool_not_authorized",
        SessionError::AlreadyClosed(_) => "already_closed",
        SessionError::RateLimited { .. } => "rate_limited",
        SessionError::AgentMismatch { .. } => "agent_mismatch",
        SessionError::StorageWriteThrough { .. } => "storage_write_through",
        SessionError::TooManySessions { .. } => "too_many_sessions",
        SessionError::StorageRead { .. } => "storage_read",
        SessionError::InvalidRequest { .. } => "invalid_request",
        SessionError::ReservationNotFound(_) => "reservation_not_found",
        SessionError::ReservationSettled(_) => "reservation_settled",
    }
}

/// Name of the HTTP header that carries a session id.
pub const SESSION_HEADER: &str = "X-Arbiter-Session";

/// Parses the value of the [`SESSION_HEADER`] header: a UUID, optionally surrounded by
/// whitespace. Anything else is `None`.
pub fn parse_session_header(value: &str) -> Option<Uuid> {
    let trimmed = value.trim();
    // `Uuid::parse_str` also accepts braced and URN forms; a header carries the plain
    // hyphenated or simple form only.
    if trimmed.len() != 36 && trimmed.len() != 32 {
        return None;
    }
    Uuid::parse_str(trimmed).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_accepts_uuid_with_surrounding_whitespace() {
        let id = Uuid::new_v4();
        assert_eq!(parse_session_header(&format!("  {id}\t")), Some(id));
        assert_eq!(parse_session_header(&id.simple().to_string()), Some(id));
    }

    #[test]
    fn header_rejects_anything_else() {
        let id = Uuid::new_v4();
        for bad in [
            String::new(),
            "   ".to_owned(),
            "not-a-uuid".to_owned(),
            format!("{{{id}}}"),
            format!("urn:uuid:{id}"),
            format!("{id} extra"),
            format!("{id}{id}"),
        ] {
            assert_eq!(parse_session_header(&bad), None, "{bad:?}");
        }
    }
}
