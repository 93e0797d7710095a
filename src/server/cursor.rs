//! The cursors of the paged routes. A cursor names a position in its listing's order, the
//! key of the last row of the page before, as text: a number (an instant in microseconds
//! since the epoch, or a day counted from 0001-01-01), and a UUID in its simple form or a
//! text in hex.
//!
//! # Invariant: every cursor its pattern admits decodes
//! A position is not a handle or a secret: any one is a place a listing can go on from (one
//! past every row gives an empty page). So each pattern, stated with its route in the
//! OpenAPI document, admits only text that decodes to a position, and a client that trusts
//! the schema is never refused. A text decodes lossily (bytes that are not UTF-8 become
//! U+FFFD, NUL becomes U+0001) so that a hand-made cursor still names a position; a cursor
//! a page answered always round-trips exactly, since no stored name holds NUL.

use chrono::{DateTime, Datelike, NaiveDate, Utc};
use uuid::Uuid;

use super::api::ApiError;

fn bad() -> ApiError {
    ApiError::invalid("the cursor is not one a page answered")
}

/// `<micros>-<uuid simple>`, pattern `^[0-9]{1,18}-[0-9a-f]{32}$`: sessions by creation.
pub(crate) fn instant_id(at: DateTime<Utc>, id: Uuid) -> String {
    format!("{}-{}", at.timestamp_micros(), id.simple())
}

pub(crate) fn parse_instant_id(cursor: &str) -> Result<(DateTime<Utc>, Uuid), ApiError> {
    let (micros, id) = cursor.split_once('-').ok_or_else(bad)?;
    Ok((instant(micros)?, Uuid::try_parse(id).map_err(|_| bad())?))
}

/// `<micros>-<event_id>`, pattern `^[0-9]{1,18}-[0-9]{1,18}$`: a session's events.
pub(crate) fn instant_event(at: DateTime<Utc>, event_id: i64) -> String {
    format!("{}-{event_id}", at.timestamp_micros())
}

pub(crate) fn parse_instant_event(cursor: &str) -> Result<(DateTime<Utc>, i64), ApiError> {
    let (micros, event) = cursor.split_once('-').ok_or_else(bad)?;
    Ok((instant(micros)?, event.parse().map_err(|_| bad())?))
}

/// `<day>-<uuid simple>`, pattern `^[0-9]{1,7}-[0-9a-f]{32}$`: the agents report.
pub(crate) fn day_id(day: NaiveDate, id: Uuid) -> String {
    format!("{}-{}", day.num_days_from_ce(), id.simple())
}

pub(crate) fn parse_day_id(cursor: &str) -> Result<(NaiveDate, Uuid), ApiError> {
    let (day_text, id) = cursor.split_once('-').ok_or_else(bad)?;
    Ok((day(day_text)?, Uuid::try_parse(id).map_err(|_| bad())?))
}

/// `<day>-<text in hex>`, pattern `^[0-9]{1,7}-([0-9a-f]{2}){1,256}$`: the tools and denials
/// reports.
pub(crate) fn day_text(day: NaiveDate, text: &str) -> String {
    format!("{}-{}", day.num_days_from_ce(), hex(text))
}

pub(crate) fn parse_day_text(cursor: &str) -> Result<(NaiveDate, String), ApiError> {
    let (day_text, text) = cursor.split_once('-').ok_or_else(bad)?;
    Ok((day(day_text)?, unhex(text)?))
}

/// `<text in hex>-<micros>`, pattern `^([0-9a-f]{2}){1,128}-[0-9]{1,18}$`: the budgets
/// report.
pub(crate) fn text_instant(text: &str, at: DateTime<Utc>) -> String {
    format!("{}-{}", hex(text), at.timestamp_micros())
}

pub(crate) fn parse_text_instant(cursor: &str) -> Result<(String, DateTime<Utc>), ApiError> {
    let (text, micros) = cursor.split_once('-').ok_or_else(bad)?;
    Ok((unhex(text)?, instant(micros)?))
}

/// 1 to 18 digits: at most 31,688 years after the epoch, within chrono's range.
fn instant(micros: &str) -> Result<DateTime<Utc>, ApiError> {
    let micros: i64 = micros.parse().map_err(|_| bad())?;
    DateTime::<Utc>::from_timestamp_micros(micros).ok_or_else(bad)
}

/// 1 to 7 digits: at most year 27,378, within chrono's range.
fn day(days: &str) -> Result<NaiveDate, ApiError> {
    let days: i32 = days.parse().map_err(|_| bad())?;
    NaiveDate::from_num_days_from_ce_opt(days).ok_or_else(bad)
}

fn hex(text: &str) -> String {
    use std::fmt::Write;
    text.bytes().fold(String::new(), |mut out, byte| {
        let _ = write!(out, "{byte:02x}");
        out
    })
}

fn unhex(hex: &str) -> Result<String, ApiError> {
    if hex.is_empty() || !hex.len().is_multiple_of(2) {
        return Err(bad());
    }
    let bytes = hex
        .as_bytes()
        .chunks(2)
        .map(|pair| {
            let pair = std::str::from_utf8(pair).map_err(|_| bad())?;
            u8::from_str_radix(pair, 16).map_err(|_| bad())
        })
        .collect::<Result<Vec<u8>, ApiError>>()?;
    Ok(String::from_utf8_lossy(&bytes).replace('\0', "\u{1}"))
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn a_page_cursor_round_trips() {
        let at = DateTime::<Utc>::from_timestamp_micros(1_796_000_000_123_456).unwrap();
        let day = NaiveDate::from_ymd_opt(2026, 12, 6).unwrap();
        let id = Uuid::new_v4();
        assert_eq!(parse_instant_id(&instant_id(at, id)).unwrap(), (at, id));
        assert_eq!(
            parse_instant_event(&instant_event(at, 42)).unwrap(),
            (at, 42)
        );
        assert_eq!(parse_day_id(&day_id(day, id)).unwrap(), (day, id));
        let tool = "wr-ïte/file 🙂";
        assert_eq!(
            parse_day_text(&day_text(day, tool)).unwrap(),
            (day, tool.to_owned())
        );
        assert_eq!(
            parse_text_instant(&text_instant("team/a", at)).unwrap(),
            ("team/a".to_owned(), at)
        );
    }

    #[test]
    fn text_that_is_no_cursor_is_refused() {
        for cursor in ["", "-", "12", "x-00", "12-0g", "12-0", "99999999999-00"] {
            assert!(parse_day_text(cursor).is_err(), "{cursor}");
        }
        assert!(parse_instant_id("1-not-a-uuid").is_err());
    }

    proptest! {
        #[test]
        fn every_cursor_a_pattern_admits_decodes(
            instant_id in "[0-9]{1,18}-[0-9a-f]{32}",
            instant_event in "[0-9]{1,18}-[0-9]{1,18}",
            day_id in "[0-9]{1,7}-[0-9a-f]{32}",
            day_text in "[0-9]{1,7}-([0-9a-f]{2}){1,256}",
            text_instant in "([0-9a-f]{2}){1,128}-[0-9]{1,18}",
        ) {
            prop_assert!(parse_instant_id(&instant_id).is_ok());
            prop_assert!(parse_instant_event(&instant_event).is_ok());
            prop_assert!(parse_day_id(&day_id).is_ok());
            let (_, text) = parse_day_text(&day_text).unwrap();
            prop_assert!(!text.contains('\0'));
            prop_assert!(parse_text_instant(&text_instant).is_ok());
        }
    }
}
