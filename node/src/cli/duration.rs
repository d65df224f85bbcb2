//! Parsing of human durations on the command line (`8h`, `30m`, `1h30m`, `1500ms`, or bare
//! milliseconds) into milliseconds.
//!
//! This file only parses; it must not apply defaults or limits (the server enforces those).

/// Parses `"8h"`, `"30m"`, `"45s"`, `"250ms"`, `"2d"`, compounds such as `"1h30m"`, or a bare
/// number of milliseconds. Used as a clap `value_parser`.
pub fn parse_ms(text: &str) -> Result<u64, String> {
    let text = text.trim();
    if text.is_empty() {
        return Err("empty duration; use e.g. 8h, 30m, 90s, 1500ms or a number of milliseconds".into());
    }
    if text.bytes().all(|b| b.is_ascii_digit()) {
        return text.parse::<u64>().map_err(|_| format!("duration {text:?} is too large"));
    }
    let mut total_ms: u64 = 0;
    let mut rest = text;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return Err(format!("bad duration {text:?}: expected a number at {rest:?}"));
        }
        let (number, after) = rest.split_at(digits);
        let unit_len = after.bytes().take_while(u8::is_ascii_alphabetic).count();
        let (unit, after) = after.split_at(unit_len);
        let unit_ms: u64 = match unit {
            "ms" => 1,
            "s" => 1_000,
            "m" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            "" => return Err(format!("bad duration {text:?}: {number} needs a unit (ms, s, m, h, d)")),
            other => {
                return Err(format!("bad duration {text:?}: unknown unit {other:?} (use ms, s, m, h, d)"))
            }
        };
        let value: u64 = number.parse().map_err(|_| format!("duration {text:?} is too large"))?;
        total_ms = value
            .checked_mul(unit_ms)
            .and_then(|ms| total_ms.checked_add(ms))
            .ok_or_else(|| format!("duration {text:?} is too large"))?;
        rest = after;
    }
    Ok(total_ms)
}

#[cfg(test)]
mod tests {
    use super::parse_ms;

    /// The `--ttl` and `--idle` examples in the help text must parse to what they say.
    #[test]
    fn parses_units_compounds_and_bare_ms() {
        for (text, ms) in [
            ("8h", 8 * 3_600_000),
            ("30m", 1_800_000),
            ("90s", 90_000),
            ("1500ms", 1_500),
            ("1500", 1_500),
            ("2d", 172_800_000),
            ("1h30m", 5_400_000),
            ("0", 0),
        ] {
            assert_eq!(parse_ms(text), Ok(ms), "{text}");
        }
    }

    #[test]
    fn refuses_garbage() {
        for text in ["", "h", "8x", "8 h", "-1h", "1h-", "1h30", "99999999999999999999"] {
            assert!(parse_ms(text).is_err(), "{text}");
        }
        assert!(parse_ms("999999999999999d").is_err());
    }
}
