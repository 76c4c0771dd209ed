//! Wall-clock time for the host: now in Unix milliseconds, and RFC 3339 times to and from
//! Unix milliseconds (with [jiff](https://docs.rs/jiff), which refuses impossible dates).

/// Current wall-clock time in Unix milliseconds.
pub fn now_ms() -> i64 {
    jiff::Timestamp::now().as_millisecond()
}

/// `YYYY-MM-DDTHH:MM:SS.mmmZ` for Unix milliseconds (clamped to what RFC 3339 can write).
pub fn format_rfc3339_ms(ms: i64) -> String {
    let t = jiff::Timestamp::from_millisecond(ms).unwrap_or(if ms < 0 {
        jiff::Timestamp::MIN
    } else {
        jiff::Timestamp::MAX
    });
    t.strftime("%Y-%m-%dT%H:%M:%S%.3fZ").to_string()
}

/// Unix milliseconds of an RFC 3339 time such as `2024-01-15T10:30:45Z` or
/// `2024-01-15T10:30:45.5+01:00`. The error says what is wrong with it, e.g. an impossible
/// date such as February 31.
pub fn parse_rfc3339_ms(s: &str) -> Result<i64, String> {
    s.parse::<jiff::Timestamp>()
        .map(|t| t.as_millisecond())
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_format_and_parse_back() {
        assert_eq!(format_rfc3339_ms(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(
            format_rfc3339_ms(1_705_314_645_123),
            "2024-01-15T10:30:45.123Z"
        );
        assert_eq!(
            format_rfc3339_ms(951_868_800_000),
            "2000-03-01T00:00:00.000Z"
        );
        for ms in [0, 1_705_314_645_123, 951_868_800_000, -86_400_001] {
            assert_eq!(parse_rfc3339_ms(&format_rfc3339_ms(ms)), Ok(ms));
        }
        assert_eq!(
            parse_rfc3339_ms("2024-01-15T10:30:45+01:00"),
            Ok(1_705_311_045_000)
        );
    }

    #[test]
    fn impossible_dates_and_garbage_are_refused_not_panicked_on() {
        for bad in [
            "2024-02-31T00:00:00Z",
            "2023-02-29T00:00:00Z",
            "2024-13-01T00:00:00Z",
            "2024-01-15T24:00:01Z",
            "2024-01-15T10:30:45+0é00",
            "2024-01-15T10:30:45é",
            "é024-01-15T10:30:45Z",
            "2024-01-15T10:30:45",
            "",
        ] {
            let e = parse_rfc3339_ms(bad).expect_err(bad);
            assert!(!e.is_empty(), "{bad}");
        }
        assert!(
            parse_rfc3339_ms("2024-02-29T00:00:00Z").is_ok(),
            "a leap day"
        );
    }
}
