//! Duration literals (`"500ms"`, `"30s"`, `"10m"`, `"1h30m"`, `"2d"`), parsed at expansion time.

/// Parse a duration into milliseconds, or say what is wrong.
pub(crate) fn parse_ms(text: &str) -> Result<u64, String> {
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
        if ms >= scale && ms % scale == 0 {
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
    fn shows_round_values() {
        assert_eq!(show(600_000), "10m");
        assert_eq!(show(1500), "1500ms");
        assert_eq!(show(86_400_000), "1d");
    }
}
