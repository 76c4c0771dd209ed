//! The typed user-activity event (the schema of the seed systems) and its tolerant parser.
//!
//! Only `user_id` and `event_type` are required: everything else is optional, so events from
//! older producers (the student-activity system's `login` / `quiz_submission` / `logout`) and
//! partial events parse too. Unknown fields are ignored; unknown event types are kept as
//! [`EventType::Other`] so a plugin can count or skip them.
//!
//! The text fields borrow from the payload (`Cow::Borrowed`) unless JSON escapes make that
//! impossible: every plugin parses every event, so a parse that allocates a `String` per
//! field costs more than the plugin's own work. Read them as `&str` (`&*a.user_id`,
//! `a.page_url.as_deref()`); `Display` and comparisons with `&str` work as for `String`.

use serde::{Deserialize, Deserializer};
use std::borrow::Cow;
use std::fmt;

/// One user-activity event, borrowing its text from the payload it was parsed from.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Activity<'a> {
    #[serde(default, borrow, deserialize_with = "text")]
    pub event_id: Option<Cow<'a, str>>,
    /// RFC 3339 time, e.g. `2024-01-15T10:30:45.123Z`. See [`Activity::time_ms`].
    #[serde(default, borrow, deserialize_with = "text")]
    pub timestamp: Option<Cow<'a, str>>,
    #[serde(deserialize_with = "id_string", borrow)]
    pub user_id: Cow<'a, str>,
    #[serde(default, borrow, deserialize_with = "text")]
    pub session_id: Option<Cow<'a, str>>,
    pub event_type: EventType,
    #[serde(default, borrow, deserialize_with = "text")]
    pub page_url: Option<Cow<'a, str>>,
    #[serde(default, borrow, deserialize_with = "text")]
    pub referrer: Option<Cow<'a, str>>,
    #[serde(default, borrow, deserialize_with = "text")]
    pub user_agent: Option<Cow<'a, str>>,
    #[serde(default, borrow, deserialize_with = "text")]
    pub ip_address: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    pub properties: Properties<'a>,
    #[serde(default, borrow)]
    pub device: Option<Device<'a>>,
    #[serde(default, borrow)]
    pub location: Option<Location<'a>>,
}

/// Event-specific details. Which ones are present depends on the event type.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct Properties<'a> {
    #[serde(default, borrow, deserialize_with = "text")]
    pub product_id: Option<Cow<'a, str>>,
    #[serde(default, borrow, deserialize_with = "text")]
    pub product_name: Option<Cow<'a, str>>,
    #[serde(default)]
    pub price: Option<f64>,
    #[serde(default)]
    pub quantity: Option<u32>,
    #[serde(default, borrow, deserialize_with = "text")]
    pub category: Option<Cow<'a, str>>,
    #[serde(default, borrow, deserialize_with = "text")]
    pub search_query: Option<Cow<'a, str>>,
    #[serde(default)]
    pub cart_value: Option<f64>,
    /// Student-activity events: the quiz and its score.
    #[serde(default, borrow, deserialize_with = "text")]
    pub quiz_id: Option<Cow<'a, str>>,
    #[serde(default)]
    pub score: Option<f64>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct Device<'a> {
    #[serde(default, rename = "type", borrow, deserialize_with = "text")]
    pub kind: Option<Cow<'a, str>>,
    #[serde(default, borrow, deserialize_with = "text")]
    pub os: Option<Cow<'a, str>>,
    #[serde(default, borrow, deserialize_with = "text")]
    pub browser: Option<Cow<'a, str>>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct Location<'a> {
    #[serde(default, borrow, deserialize_with = "text")]
    pub country: Option<Cow<'a, str>>,
    #[serde(default, borrow, deserialize_with = "text")]
    pub city: Option<Cow<'a, str>>,
    #[serde(default, borrow, deserialize_with = "text")]
    pub timezone: Option<Cow<'a, str>>,
}

/// The kinds of activity. Seed 002's five e-commerce kinds, seed 000's student kinds, and
/// anything else as `Other`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum EventType {
    PageView,
    Click,
    Search,
    AddToCart,
    Purchase,
    Login,
    Logout,
    QuizSubmission,
    Other(String),
}

impl EventType {
    pub fn as_str(&self) -> &str {
        match self {
            EventType::PageView => "page_view",
            EventType::Click => "click",
            EventType::Search => "search",
            EventType::AddToCart => "add_to_cart",
            EventType::Purchase => "purchase",
            EventType::Login => "login",
            EventType::Logout => "logout",
            EventType::QuizSubmission => "quiz_submission",
            EventType::Other(s) => s,
        }
    }

    pub fn parse(s: &str) -> EventType {
        match s {
            "page_view" => EventType::PageView,
            "click" => EventType::Click,
            "search" => EventType::Search,
            "add_to_cart" => EventType::AddToCart,
            "purchase" => EventType::Purchase,
            "login" => EventType::Login,
            "logout" => EventType::Logout,
            // Seed 000 calls it "quiz submission" in prose and `quiz_submission` on the wire.
            "quiz_submission" | "quiz_submitted" | "quiz" => EventType::QuizSubmission,
            other => EventType::Other(other.to_string()),
        }
    }
}

impl fmt::Display for EventType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for EventType {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // A visitor, not `Cow<str>`: serde's `Cow` always copies, and the known types need
        // no copy at all.
        struct TypeVisitor;
        impl serde::de::Visitor<'_> for TypeVisitor {
            type Value = EventType;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("`event_type` as a non-empty string")
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<EventType, E> {
                if s.is_empty() {
                    return Err(E::custom("event_type is empty"));
                }
                Ok(EventType::parse(s))
            }
        }
        d.deserialize_str(TypeVisitor)
    }
}

/// An optional text field, borrowed from the payload when it has no escapes. serde's own
/// `Cow` support borrows only for a bare `Cow` field, not inside an `Option`.
fn text<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Cow<'de, str>>, D::Error> {
    struct TextVisitor;
    impl<'de> serde::de::Visitor<'de> for TextVisitor {
        type Value = Option<Cow<'de, str>>;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a string or null")
        }
        fn visit_borrowed_str<E: serde::de::Error>(self, s: &'de str) -> Result<Self::Value, E> {
            Ok(Some(Cow::Borrowed(s)))
        }
        fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<Self::Value, E> {
            Ok(Some(Cow::Owned(s.to_string())))
        }
        fn visit_none<E: serde::de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_unit<E: serde::de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
            d.deserialize_str(self)
        }
    }
    d.deserialize_option(TextVisitor)
}

/// Accepts `"user-1"` and, from producers that use numeric ids, `1`. A visitor rather than an
/// untagged enum, so a wrong value is reported as such ("invalid type: null, expected `user_id`
/// as …") instead of "data did not match any variant", and is never buffered.
fn id_string<'de, D: Deserializer<'de>>(d: D) -> Result<Cow<'de, str>, D::Error> {
    struct IdVisitor;
    impl<'de> serde::de::Visitor<'de> for IdVisitor {
        type Value = Cow<'de, str>;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("`user_id` as a non-empty string or an integer")
        }
        fn visit_borrowed_str<E: serde::de::Error>(self, s: &'de str) -> Result<Self::Value, E> {
            if s.is_empty() {
                return Err(E::custom("user_id is empty"));
            }
            Ok(Cow::Borrowed(s))
        }
        fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<Self::Value, E> {
            if s.is_empty() {
                return Err(E::custom("user_id is empty"));
            }
            Ok(Cow::Owned(s.to_string()))
        }
        fn visit_i64<E: serde::de::Error>(self, n: i64) -> Result<Self::Value, E> {
            Ok(Cow::Owned(n.to_string()))
        }
        fn visit_u64<E: serde::de::Error>(self, n: u64) -> Result<Self::Value, E> {
            Ok(Cow::Owned(n.to_string()))
        }
    }
    d.deserialize_any(IdVisitor)
}

/// Why a payload is not an activity event. The message names the problem (and, for JSON
/// errors, the line and column), ready to be a dead-letter reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseError(pub String);

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ParseError {}

impl<'a> Activity<'a> {
    /// Parses a JSON payload. Never panics, whatever the bytes.
    pub fn from_json(payload: &'a [u8]) -> Result<Activity<'a>, ParseError> {
        if payload.is_empty() {
            return Err(ParseError("empty payload".into()));
        }
        // serde accepts a JSON array as a struct, field by field in order: an event is an
        // object, so refuse arrays before serde sees them.
        let first = payload
            .iter()
            .find(|b| !matches!(b, b' ' | b'\t' | b'\n' | b'\r'));
        if first == Some(&b'[') {
            return Err(ParseError(
                "not an activity event: a JSON array, expected an object".into(),
            ));
        }
        // UTF-8 checked once for the whole payload (ASCII a word at a time), not string by
        // string: the fields a plugin never reads are then skipped without a check.
        // Text in another encoding is named on the error paths only (UTF-16 and UTF-32 of
        // ASCII are valid UTF-8, and serde would call them a syntax error at line 1).
        let text = std::str::from_utf8(payload).map_err(|e| {
            ParseError(other_encoding(payload).unwrap_or_else(|| {
                format!(
                    "not an activity event: not UTF-8 (invalid byte at offset {})",
                    e.valid_up_to()
                )
            }))
        })?;
        let activity: Activity = serde_json::from_str(text).map_err(|e| {
            ParseError(
                other_encoding(payload).unwrap_or_else(|| format!("not an activity event: {e}")),
            )
        })?;
        // Each number is finite, but their product may not be: an infinite amount would end
        // up as `null` in outputs and state (e.g. wiping analytics' revenue sum).
        if activity.amount().is_some_and(|x| !x.is_finite()) {
            return Err(ParseError(
                "not an activity event: properties.price × properties.quantity overflows".into(),
            ));
        }
        Ok(activity)
    }

    /// The event's own time in milliseconds since the Unix epoch, if `timestamp` is a valid
    /// RFC 3339 UTC time.
    pub fn time_ms(&self) -> Option<i64> {
        self.timestamp.as_deref().and_then(parse_rfc3339_ms)
    }

    /// `YYYY-MM-DDTHH` of the event's timestamp: the bucket for per-hour aggregates.
    pub fn hour(&self) -> Option<&str> {
        let ts = self.timestamp.as_deref()?;
        // `get`, not `[..13]`: byte 13 may fall inside a multi-byte character.
        ts.get(..13).filter(|h| h.as_bytes()[10] == b'T')
    }

    /// The money this event moves: a purchase's price (times quantity), else the cart value.
    pub fn amount(&self) -> Option<f64> {
        let p = &self.properties;
        match (p.price, p.cart_value) {
            (Some(price), _) => Some(price * f64::from(p.quantity.unwrap_or(1).max(1))),
            (None, Some(cart)) => Some(cart),
            _ => None,
        }
    }

    pub fn country(&self) -> Option<&str> {
        self.location.as_ref()?.country.as_deref()
    }
}

/// Parses `YYYY-MM-DDTHH:MM:SS[.fff…](Z|±HH:MM)` into Unix milliseconds.
pub fn parse_rfc3339_ms(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't' | b' ') {
        return None;
    }
    if b[13] != b':' || b[16] != b':' {
        return None;
    }
    let num =
        |r: std::ops::Range<usize>| -> Option<i64> { s.get(r)?.parse::<u32>().ok().map(i64::from) };
    let (year, month, day) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hour, min, sec) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || hour > 23 || min > 59 || sec > 60 {
        return None;
    }
    let mut i = 19;
    let mut millis = 0i64;
    if b.get(i) == Some(&b'.') {
        i += 1;
        let start = i;
        while i < b.len() && b[i].is_ascii_digit() {
            if i - start < 3 {
                millis = millis * 10 + i64::from(b[i] - b'0');
            }
            i += 1;
        }
        if i == start {
            return None;
        }
        for _ in (i - start)..3 {
            millis *= 10;
        }
    }
    let offset_min = match b.get(i)? {
        b'Z' | b'z' if i + 1 == b.len() => 0,
        sign @ (b'+' | b'-') if i + 6 == b.len() && b[i + 3] == b':' => {
            let off = num(i + 1..i + 3)? * 60 + num(i + 4..i + 6)?;
            if *sign == b'+' { off } else { -off }
        }
        _ => return None,
    };
    let days = days_from_civil(year, month, day);
    let secs = days * 86_400 + hour * 3600 + min * 60 + sec - offset_min * 60;
    Some(secs * 1000 + millis)
}

/// The reason for a payload that is JSON text in an encoding other than UTF-8 (told by its
/// byte-order mark, or by the NUL bytes around its first ASCII character, as RFC 4627 §3
/// does), or that starts with a UTF-8 byte-order mark; `None` for anything else.
fn other_encoding(payload: &[u8]) -> Option<String> {
    let named = match payload {
        [0xEF, 0xBB, 0xBF, ..] => {
            return Some(
                "not an activity event: starts with a UTF-8 byte-order mark, which JSON forbids"
                    .into(),
            );
        }
        [0x00, 0x00, 0xFE, 0xFF, ..] | [0x00, 0x00, 0x00, 1..=0xFF, ..] => "UTF-32 (big-endian)",
        [0xFF, 0xFE, 0x00, 0x00, ..] | [1..=0xFF, 0x00, 0x00, 0x00, ..] => "UTF-32 (little-endian)",
        [0xFE, 0xFF, ..] | [0x00, 1..=0xFF, ..] => "UTF-16 (big-endian)",
        [0xFF, 0xFE, ..] | [1..=0xFF, 0x00, ..] => "UTF-16 (little-endian)",
        _ => return None,
    };
    Some(format!(
        "not an activity event: {named} text, expected UTF-8 JSON"
    ))
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    const FULL: &str = r#"{"event_id":"e1","timestamp":"2024-01-15T10:30:45.123Z","user_id":"user-12345",
        "session_id":"sess-abc123","event_type":"purchase","page_url":"/products/laptop",
        "ip_address":"192.168.1.1","properties":{"product_id":"PROD-001","price":999.99,"quantity":2},
        "device":{"type":"desktop","os":"Windows","browser":"Chrome"},
        "location":{"country":"US","city":"New York","timezone":"America/New_York"}}"#;

    #[test]
    fn parses_the_seed_schema() {
        let a = Activity::from_json(FULL.as_bytes()).unwrap();
        assert_eq!(a.event_type, EventType::Purchase);
        assert_eq!(a.user_id, "user-12345");
        assert_eq!(a.amount(), Some(999.99 * 2.0));
        assert_eq!(a.country(), Some("US"));
        assert_eq!(a.hour(), Some("2024-01-15T10"));
        assert_eq!(a.device.as_ref().unwrap().kind.as_deref(), Some("desktop"));
        assert_eq!(a.time_ms(), Some(1_705_314_645_123));
    }

    #[test]
    fn text_borrows_from_the_payload_unless_it_has_escapes() {
        let a = Activity::from_json(FULL.as_bytes()).unwrap();
        assert!(matches!(a.user_id, Cow::Borrowed(_)));
        assert!(matches!(a.page_url, Some(Cow::Borrowed(_))));
        let country = &a.location.as_ref().unwrap().country;
        assert!(matches!(country, Some(Cow::Borrowed(_))));
        let a = Activity::from_json(
            br#"{"user_id":"u\u00e9","event_type":"click","page_url":"/a\/b","referrer":null}"#,
        )
        .unwrap();
        assert_eq!(
            (&*a.user_id, a.page_url.as_deref()),
            ("u\u{e9}", Some("/a/b"))
        );
        assert!(matches!(a.user_id, Cow::Owned(_)));
        assert_eq!(a.referrer, None);
        let err = Activity::from_json(br#"{"user_id":"u","event_type":"click","page_url":7}"#);
        assert!(err.unwrap_err().0.contains("a string or null"));
    }

    #[test]
    fn tolerates_minimal_and_student_events() {
        let a = Activity::from_json(
            br#"{"user_id":42,"event_type":"quiz_submission","properties":{"score":9}}"#,
        )
        .unwrap();
        assert_eq!(a.user_id, "42");
        assert_eq!(a.event_type, EventType::QuizSubmission);
        assert_eq!(a.properties.score, Some(9.0));
        assert_eq!(a.amount(), None);
        let b = Activity::from_json(br#"{"user_id":"u","event_type":"logout","extra":{"x":1}}"#)
            .unwrap();
        assert_eq!(b.event_type, EventType::Logout);
        let c = Activity::from_json(br#"{"user_id":"u","event_type":"wishlist"}"#).unwrap();
        assert_eq!(c.event_type, EventType::Other("wishlist".into()));
    }

    /// A payload in another encoding gets a reason naming the encoding, not a JSON syntax
    /// error at line 1 column 1.
    #[test]
    fn text_in_another_encoding_is_named_as_such() {
        let event = r#"{"user_id":"u","event_type":"click"}"#;
        let utf16 = |big: bool| -> Vec<u8> {
            event
                .encode_utf16()
                .flat_map(|u| {
                    if big {
                        u.to_be_bytes()
                    } else {
                        u.to_le_bytes()
                    }
                })
                .collect()
        };
        let utf32 = |big: bool| -> Vec<u8> {
            event
                .chars()
                .flat_map(|c| {
                    let c = c as u32;
                    if big {
                        c.to_be_bytes()
                    } else {
                        c.to_le_bytes()
                    }
                })
                .collect()
        };
        let with = |prefix: &[u8], rest: Vec<u8>| [prefix, &rest].concat();
        let latin1 = b"{\"user_id\":\"Jos\xe9\",\"event_type\":\"click\"}".to_vec();
        let cases: Vec<(&str, Vec<u8>, &str)> = vec![
            ("UTF-16LE", utf16(false), "UTF-16"),
            ("UTF-16BE", utf16(true), "UTF-16"),
            (
                "UTF-16LE with BOM",
                with(&[0xFF, 0xFE], utf16(false)),
                "UTF-16",
            ),
            (
                "UTF-16BE with BOM",
                with(&[0xFE, 0xFF], utf16(true)),
                "UTF-16",
            ),
            ("UTF-32LE", utf32(false), "UTF-32"),
            ("UTF-32BE", utf32(true), "UTF-32"),
            ("Latin-1", latin1, "not UTF-8"),
            (
                "gzip",
                vec![0x1f, 0x8b, 0x08, 0x00, 0x00, 0x00],
                "not UTF-8",
            ),
            (
                "UTF-8 BOM",
                with(&[0xEF, 0xBB, 0xBF], event.into()),
                "byte-order mark",
            ),
        ];
        for (name, payload, says) in cases {
            let reason = Activity::from_json(&payload).unwrap_err().0;
            assert!(
                reason.contains(says) && !reason.contains("expected value"),
                "{name}: {reason}"
            );
        }
    }

    #[test]
    fn malformed_payloads_are_errors_not_panics() {
        for bad in [
            &b""[..],
            b"not json",
            b"\xff\xfe\x00",
            b"[1,2,3]",
            br#"{"event_type":"click"}"#,
            br#"{"user_id":"u"}"#,
            br#"{"user_id":"","event_type":"click"}"#,
            br#"{"user_id":"u","event_type":""}"#,
            br#"{"user_id":"u","event_type":"click","properties":{"price":"cheap"}}"#,
            br#"{"user_id":"u","event_type":7}"#,
            br#" [null,null,"u",null,"click"]"#,
            br#"{"user_id":"u","event_type":"purchase","properties":{"price":1e308,"quantity":2}}"#,
        ] {
            let err = Activity::from_json(bad).unwrap_err();
            assert!(!err.0.is_empty());
        }
    }

    #[test]
    fn a_wrong_user_id_is_named_in_the_error() {
        for bad in ["null", "1.5", "{}", "[]", "true", "18446744073709551616"] {
            let payload = format!(r#"{{"user_id":{bad},"event_type":"click"}}"#);
            let err = Activity::from_json(payload.as_bytes()).unwrap_err();
            assert!(err.0.contains("`user_id` as a non-empty string"), "{err}");
        }
        let a = Activity::from_json(br#"{"user_id":18446744073709551615,"event_type":"click"}"#);
        assert_eq!(a.unwrap().user_id, "18446744073709551615");
        let a = Activity::from_json(br#"{"user_id":-3,"event_type":"click"}"#);
        assert_eq!(a.unwrap().user_id, "-3");
    }

    #[test]
    fn hour_of_a_timestamp_with_multibyte_text_does_not_panic() {
        let a = Activity::from_json(
            r#"{"user_id":"u","event_type":"purchase","timestamp":"2024-01-15T1é:00:00Z"}"#
                .as_bytes(),
        )
        .unwrap();
        assert_eq!(a.hour(), None);
        assert_eq!(a.time_ms(), None);
        let a = Activity::from_json(
            r#"{"user_id":"u","event_type":"click","timestamp":"2024-01-15T10é"}"#.as_bytes(),
        )
        .unwrap();
        assert_eq!(a.hour(), Some("2024-01-15T10"));
    }

    #[test]
    fn rfc3339_parsing() {
        assert_eq!(parse_rfc3339_ms("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(parse_rfc3339_ms("1970-01-01T00:00:01.5Z"), Some(1500));
        assert_eq!(parse_rfc3339_ms("1970-01-01T01:00:00+01:00"), Some(0));
        assert_eq!(
            parse_rfc3339_ms("2000-03-01T00:00:00Z"),
            Some(951_868_800_000)
        );
        assert_eq!(parse_rfc3339_ms("2024-13-01T00:00:00Z"), None);
        assert_eq!(parse_rfc3339_ms("2024-01-01T00:00:00"), None);
        assert_eq!(parse_rfc3339_ms("garbage"), None);
        assert_eq!(parse_rfc3339_ms("2024-01-01T00:00:00.Z"), None);
    }
}
