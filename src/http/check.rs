//! What a check request asks to decide: the tool calls of an authorization check
//! (Envoy's `ext_authz` over HTTP today; any later check path uses the same rules).
//!
//! # Invariant: the body decides, or nothing does
//! A check may carry a tool in a header (`x-arbiter-tool`) and the request's body (a
//! JSON-RPC message or batch, as an MCP client sends it). The upstream acts on the body,
//! so whenever a body is present it is what is decided:
//! * every `tools/call` in the body is decided, all or nothing (a JSON-RPC batch is one
//!   decision over all its calls);
//! * a header that names another tool than any of those calls is a refusal, never a
//!   tie-break;
//! * a body this check cannot read exactly as an upstream would is refused, header or
//!   not: not JSON, not UTF-8, a key given twice where a call's meaning depends on it
//!   (parsers disagree on which one counts), trailing bytes, or a body the gateway cut
//!   short ([`PARTIAL_BODY_HEADER`]);
//! * without any `tools/call` in the body (or without a body), the header decides, and
//!   without the header there is nothing to decide: refused.
//!
//! Refusals are [`CheckRefusal`]s, answered 400 before the store is asked: nothing is
//! counted or recorded for them.

use std::fmt;

use serde::de::{self, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

/// The header Envoy adds when it forwarded only the first `max_request_bytes` of a body
/// (`allow_partial_message: true`).
pub const PARTIAL_BODY_HEADER: &str = "x-envoy-auth-partial-body";

/// Why a check request cannot be decided. Its `Display` names the problem without echoing
/// the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum CheckRefusal {
    /// No body call and no tool header: nothing to decide.
    NoTool,
    /// The tool header is not visible ASCII text.
    HeaderNotText,
    /// The body is not one JSON value this check reads unambiguously.
    BodyUnreadable,
    /// The gateway forwarded only part of the body.
    BodyTruncated,
    /// A `tools/call` without a string `params.name`.
    CallWithoutName,
    /// The tool header names another tool than a call in the body.
    HeaderDisagrees,
}

impl fmt::Display for CheckRefusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CheckRefusal::NoTool => "no tool: send x-arbiter-tool or a JSON-RPC tools/call body",
            CheckRefusal::HeaderNotText => "the x-arbiter-tool header is not text",
            CheckRefusal::BodyUnreadable => {
                "the request body is not a JSON-RPC message or batch this check can read"
            }
            CheckRefusal::BodyTruncated => {
                "the gateway forwarded part of the body only; forward it whole \
                 (allow_partial_message: false)"
            }
            CheckRefusal::CallWithoutName => "a tools/call has no params.name",
            CheckRefusal::HeaderDisagrees => {
                "the x-arbiter-tool header names another tool than the body's tools/call"
            }
        })
    }
}

impl std::error::Error for CheckRefusal {}

/// The tools to decide for a check, one entry per call, in the body's order.
///
/// `tool_header` is the raw value of `x-arbiter-tool` if present; `body` the forwarded
/// body (empty when none was forwarded); `body_truncated` whether the gateway said it cut
/// the body ([`PARTIAL_BODY_HEADER`]). See the module's invariant for the rules.
///
/// # Errors
/// The [`CheckRefusal`] that makes the request undecidable.
pub fn tools_to_decide(
    tool_header: Option<&[u8]>,
    body: &[u8],
    body_truncated: bool,
) -> Result<Vec<String>, CheckRefusal> {
    if body_truncated {
        return Err(CheckRefusal::BodyTruncated);
    }
    let header = tool_header
        .map(|value| {
            std::str::from_utf8(value)
                .ok()
                .filter(|text| text.bytes().all(|b| b.is_ascii_graphic() || b == b' '))
                .map(str::trim)
                .ok_or(CheckRefusal::HeaderNotText)
        })
        .transpose()?;
    let calls = if body.iter().all(u8::is_ascii_whitespace) {
        Vec::new()
    } else {
        body_calls(body)?
    };
    match (header, calls.is_empty()) {
        (None, true) => Err(CheckRefusal::NoTool),
        (Some(tool), true) => Ok(vec![tool.to_owned()]),
        (Some(tool), false) if calls.iter().any(|call| call != tool) => {
            Err(CheckRefusal::HeaderDisagrees)
        }
        (_, false) => Ok(calls),
    }
}

/// The tools of the `tools/call` messages of a JSON-RPC body (a message or a batch).
fn body_calls(body: &[u8]) -> Result<Vec<String>, CheckRefusal> {
    let parsed: Body = serde_json::from_slice(body).map_err(|_| CheckRefusal::BodyUnreadable)?;
    let messages = match parsed {
        Body::One(message) => vec![message],
        Body::Batch(messages) => messages,
    };
    messages
        .into_iter()
        .filter_map(|message| match message {
            Message::Call(name) => Some(name.ok_or(CheckRefusal::CallWithoutName)),
            Message::Other => None,
        })
        .collect()
}

/// A body as the check reads it.
enum Body {
    One(Message),
    Batch(Vec<Message>),
}

/// One element of a body: a `tools/call` (its `params.name`, if it is a string) or
/// anything else (another method, a notification, a response, a non-object).
enum Message {
    Call(Option<String>),
    Other,
}

/// A key read twice in an object whose meaning depends on it: refused.
fn twice<E: de::Error>(key: &str) -> E {
    E::custom(format_args!("duplicate key {key}"))
}

impl<'de> de::Deserialize<'de> for Body {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct BodyVisitor;
        impl<'de> Visitor<'de> for BodyVisitor {
            type Value = Body;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON-RPC message or batch")
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Body, A::Error> {
                MessageVisitor.visit_map(map).map(Body::One)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Body, A::Error> {
                let mut messages = Vec::new();
                while let Some(message) = seq.next_element::<Message>()? {
                    messages.push(message);
                }
                Ok(Body::Batch(messages))
            }
        }
        deserializer.deserialize_any(BodyVisitor)
    }
}

struct MessageVisitor;

impl<'de> Visitor<'de> for MessageVisitor {
    type Value = Message;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Message, A::Error> {
        let mut method: Option<Option<String>> = None;
        let mut params: Option<Params> = None;
        while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
            match &*key {
                "method" if method.is_some() => return Err(twice("method")),
                "method" => method = Some(map.next_value::<Text>()?.0),
                "params" if params.is_some() => return Err(twice("params")),
                "params" => params = Some(map.next_value()?),
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(match method.flatten().as_deref() {
            Some("tools/call") => Message::Call(params.and_then(|p| p.name)),
            _ => Message::Other,
        })
    }
    // Anything else in a batch is not a call; the upstream answers it with an error.
    fn visit_bool<E>(self, _: bool) -> Result<Message, E> {
        Ok(Message::Other)
    }
    fn visit_i64<E>(self, _: i64) -> Result<Message, E> {
        Ok(Message::Other)
    }
    fn visit_u64<E>(self, _: u64) -> Result<Message, E> {
        Ok(Message::Other)
    }
    fn visit_f64<E>(self, _: f64) -> Result<Message, E> {
        Ok(Message::Other)
    }
    fn visit_str<E>(self, _: &str) -> Result<Message, E> {
        Ok(Message::Other)
    }
    fn visit_unit<E>(self) -> Result<Message, E> {
        Ok(Message::Other)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Message, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Message::Other)
    }
}

impl<'de> de::Deserialize<'de> for Message {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(MessageVisitor)
    }
}

/// A JSON value that is kept only when it is a string.
struct Text(Option<String>);

impl<'de> de::Deserialize<'de> for Text {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct TextVisitor;
        impl<'de> Visitor<'de> for TextVisitor {
            type Value = Text;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON value")
            }
            fn visit_str<E>(self, value: &str) -> Result<Text, E> {
                Ok(Text(Some(value.to_owned())))
            }
            fn visit_string<E>(self, value: String) -> Result<Text, E> {
                Ok(Text(Some(value)))
            }
            fn visit_bool<E>(self, _: bool) -> Result<Text, E> {
                Ok(Text(None))
            }
            fn visit_i64<E>(self, _: i64) -> Result<Text, E> {
                Ok(Text(None))
            }
            fn visit_u64<E>(self, _: u64) -> Result<Text, E> {
                Ok(Text(None))
            }
            fn visit_f64<E>(self, _: f64) -> Result<Text, E> {
                Ok(Text(None))
            }
            fn visit_unit<E>(self) -> Result<Text, E> {
                Ok(Text(None))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Text, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(Text(None))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Text, A::Error> {
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(Text(None))
            }
        }
        deserializer.deserialize_any(TextVisitor)
    }
}

/// The `params` of a message: only its `name` matters, and only once.
struct Params {
    name: Option<String>,
}

impl<'de> de::Deserialize<'de> for Params {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ParamsVisitor;
        impl<'de> Visitor<'de> for ParamsVisitor {
            type Value = Params;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON value")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Params, A::Error> {
                let mut name: Option<Option<String>> = None;
                while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
                    match &*key {
                        "name" if name.is_some() => return Err(twice("name")),
                        "name" => name = Some(map.next_value::<Text>()?.0),
                        _ => {
                            map.next_value::<IgnoredAny>()?;
                        }
                    }
                }
                Ok(Params {
                    name: name.flatten(),
                })
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Params, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(Params { name: None })
            }
            fn visit_bool<E>(self, _: bool) -> Result<Params, E> {
                Ok(Params { name: None })
            }
            fn visit_i64<E>(self, _: i64) -> Result<Params, E> {
                Ok(Params { name: None })
            }
            fn visit_u64<E>(self, _: u64) -> Result<Params, E> {
                Ok(Params { name: None })
            }
            fn visit_f64<E>(self, _: f64) -> Result<Params, E> {
                Ok(Params { name: None })
            }
            fn visit_str<E>(self, _: &str) -> Result<Params, E> {
                Ok(Params { name: None })
            }
            fn visit_unit<E>(self) -> Result<Params, E> {
                Ok(Params { name: None })
            }
        }
        deserializer.deserialize_any(ParamsVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decide(header: Option<&str>, body: &str) -> Result<Vec<String>, CheckRefusal> {
        tools_to_decide(header.map(str::as_bytes), body.as_bytes(), false)
    }

    fn call(tool: &str) -> String {
        format!(
            r#"{{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{{"name":"{tool}","arguments":{{"name":"x"}}}}}}"#
        )
    }

    #[test]
    fn the_body_decides_and_a_disagreeing_header_is_refused() {
        assert_eq!(decide(None, &call("search")), Ok(vec!["search".to_owned()]));
        assert_eq!(
            decide(Some("search"), &call("search")),
            Ok(vec!["search".to_owned()])
        );
        assert_eq!(
            decide(Some("search"), &call("delete_repo")),
            Err(CheckRefusal::HeaderDisagrees)
        );
        // No call in the body: the header decides, and without it nothing does.
        let list = r#"{"jsonrpc":"2.0","id":1,"method":"tools/list"}"#;
        assert_eq!(decide(Some("search"), list), Ok(vec!["search".to_owned()]));
        assert_eq!(decide(None, list), Err(CheckRefusal::NoTool));
        assert_eq!(decide(Some(" search "), ""), Ok(vec!["search".to_owned()]));
        assert_eq!(decide(None, " \n"), Err(CheckRefusal::NoTool));
    }

    #[test]
    fn a_batch_decides_every_call_it_holds() {
        let batch = format!(
            r#"[{}, {{"jsonrpc":"2.0","method":"notifications/progress"}}, 7, {}]"#,
            call("search"),
            call("write_file")
        );
        assert_eq!(
            decide(None, &batch),
            Ok(vec!["search".to_owned(), "write_file".to_owned()])
        );
        assert_eq!(
            decide(Some("search"), &batch),
            Err(CheckRefusal::HeaderDisagrees)
        );
        assert_eq!(decide(None, "[]"), Err(CheckRefusal::NoTool));
    }

    #[test]
    fn a_body_read_otherwise_elsewhere_is_refused() {
        for body in [
            // Cut short, trailing bytes, not JSON.
            r#"{"method":"tools/call","params":{"name":"search"}"#,
            r#"{"method":"tools/call","params":{"name":"search"}} {"method":"x"}"#,
            "name=search",
            // A key of the call given twice: parsers disagree on which one counts.
            r#"{"method":"tools/call","params":{"name":"search","name":"delete_repo"}}"#,
            r#"{"method":"tools/list","method":"tools/call","params":{"name":"delete_repo"}}"#,
            r#"{"method":"tools/call","params":{"name":"search"},"params":{"name":"rm"}}"#,
        ] {
            assert_eq!(
                decide(Some("search"), body),
                Err(CheckRefusal::BodyUnreadable),
                "{body}"
            );
        }
        let utf16: Vec<u8> = call("delete_repo")
            .encode_utf16()
            .flat_map(u16::to_le_bytes)
            .collect();
        assert_eq!(
            tools_to_decide(Some(b"search"), &utf16, false),
            Err(CheckRefusal::BodyUnreadable)
        );
        // A key given twice where nothing depends on it is read as any parser would.
        let arguments =
            r#"{"method":"tools/call","params":{"name":"search","arguments":{"a":1,"a":2}}}"#;
        assert_eq!(decide(None, arguments), Ok(vec!["search".to_owned()]));
    }

    #[test]
    fn calls_without_a_name_bad_headers_and_cut_bodies_are_refused() {
        for body in [
            r#"{"method":"tools/call"}"#,
            r#"{"method":"tools/call","params":{"name":7}}"#,
            r#"{"method":"tools/call","params":["search"]}"#,
        ] {
            assert_eq!(
                decide(Some("search"), body),
                Err(CheckRefusal::CallWithoutName),
                "{body}"
            );
        }
        assert_eq!(
            tools_to_decide(Some(b"se\xffarch"), b"", false),
            Err(CheckRefusal::HeaderNotText)
        );
        assert_eq!(
            tools_to_decide(Some(b"search"), call("search").as_bytes(), true),
            Err(CheckRefusal::BodyTruncated)
        );
        // The refusal never echoes the request.
        assert!(!CheckRefusal::HeaderDisagrees.to_string().contains("delete"));
    }
}
