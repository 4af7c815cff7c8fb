//! Duration literals (`"500ms"`, `"30s"`, `"10m"`, `"1h30m"`, `"2d"`), parsed at expansion time.

/// Parse a duration into milliseconds, or say what is wrong (and what to write, when the intent
/// is clear: `"10 minutes"` is answered with `write "10m"`).
pub(crate) fn parse_ms(text: &str) -> Result<u64, String> {
    strict(text).map_err(|e| match suggest(text) {
        Some(fix) => format!(
            "`{}` is not a duration: write \"{fix}\" (a number and a unit, no spaces; units are ms, s, m, h, d)",
            text.trim()
        ),
        None => e,
    })
}

/// The same duration in the accepted syntax, for a text that spells units out or puts spaces
/// in: `"10 minutes"` → `"10m"`, `"1 hour 30 min"` → `"1h30m"`.
fn suggest(text: &str) -> Option<String> {
    let mut out = String::new();
    let mut chars = text.trim().chars().peekable();
    let mut expect_unit = false;
    while let Some(&c) = chars.peek() {
        if c.is_ascii_digit() {
            if expect_unit {
                return None;
            }
            while let Some(d) = chars.next_if(char::is_ascii_digit) {
                out.push(d);
            }
            expect_unit = true;
        } else if c.is_alphabetic() {
            let mut word = String::new();
            while let Some(l) = chars.next_if(|c| c.is_alphabetic()) {
                word.push(l.to_ascii_lowercase());
            }
            let unit = match word.as_str() {
                "and" if !expect_unit => continue,
                "ms" | "msec" | "msecs" | "milli" | "millis" | "millisecond" | "milliseconds" => {
                    "ms"
                }
                "s" | "sec" | "secs" | "second" | "seconds" => "s",
                "m" | "min" | "mins" | "minute" | "minutes" => "m",
                "h" | "hr" | "hrs" | "hour" | "hours" => "h",
                "d" | "day" | "days" => "d",
                _ => return None,
            };
            if !expect_unit {
                return None;
            }
            out.push_str(unit);
            expect_unit = false;
        } else if c.is_whitespace() || c == ',' {
            chars.next();
        } else {
            return None;
        }
    }
    (!expect_unit && strict(&out).is_ok() && out != text).then_some(out)
}

fn strict(text: &str) -> Result<u64, String> {
    const HELP: &str =
        "write a number and a unit, e.g. \"500ms\", \"30s\", \"10m\", \"1h30m\", \"2d\"";
    let text = text.trim();
    if text.is_empty() {
        return Err(format!("empty duration: {HELP}"));
    }
    let mut total: u64 = 0;
    let mut rest = text;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return Err(format!("`{text}` is not a duration: {HELP}"));
        }
        let n: u64 = rest[..digits]
            .parse()
            .map_err(|_| format!("`{text}` is too large a duration"))?;
        rest = &rest[digits..];
        let unit_len = rest.bytes().take_while(u8::is_ascii_alphabetic).count();
        let unit = &rest[..unit_len];
        let scale = match unit {
            "ms" => 1,
            "s" => 1_000,
            "m" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            "" => return Err(format!("`{text}` has a number without a unit: {HELP}")),
            other => {
                return Err(format!(
                    "unknown unit `{other}` in `{text}`: use ms, s, m, h or d ({HELP})"
                ));
            }
        };
        total = n
            .checked_mul(scale)
            .and_then(|v| total.checked_add(v))
            .ok_or_else(|| format!("`{text}` is too large a duration"))?;
        rest = &rest[unit_len..];
    }
    Ok(total)
}

/// Format milliseconds the way users write them, for messages.
pub(crate) fn show(ms: u64) -> String {
    for (unit, scale) in [
        ("d", 86_400_000),
        ("h", 3_600_000),
        ("m", 60_000),
        ("s", 1_000),
    ] {
        if ms >= scale && ms.is_multiple_of(scale) {
            return format!("{}{unit}", ms / scale);
        }
    }
    format!("{ms}ms")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_documented_forms() {
        assert_eq!(parse_ms("500ms"), Ok(500));
        assert_eq!(parse_ms("30s"), Ok(30_000));
        assert_eq!(parse_ms("10m"), Ok(600_000));
        assert_eq!(parse_ms("1h30m"), Ok(5_400_000));
        assert_eq!(parse_ms("2d"), Ok(172_800_000));
    }

    #[test]
    fn refuses_what_is_not_a_duration() {
        for bad in ["", "10", "ten minutes", "10 m", "5x", "m5", "1.5s", "-1s"] {
            assert!(parse_ms(bad).is_err(), "{bad:?} was accepted");
        }
        assert!(parse_ms("99999999999999999999d").is_err());
    }

    #[test]
    fn suggests_the_accepted_spelling() {
        let e = parse_ms("10 minutes").unwrap_err();
        assert!(e.contains("write \"10m\""), "{e}");
        let e = parse_ms("1 hour and 30 min").unwrap_err();
        assert!(e.contains("write \"1h30m\""), "{e}");
        let e = parse_ms("10min").unwrap_err();
        assert!(e.contains("write \"10m\""), "{e}");
        let e = parse_ms("5x").unwrap_err();
        assert!(!e.contains("write \""), "{e}");
        let e = parse_ms("10").unwrap_err();
        assert!(e.contains("without a unit"), "{e}");
    }

    #[test]
    fn shows_round_values() {
        assert_eq!(show(600_000), "10m");
        assert_eq!(show(1500), "1500ms");
        assert_eq!(show(86_400_000), "1d");
    }
}
