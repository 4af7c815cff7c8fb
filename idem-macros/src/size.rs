//! Size literals (`"65536"`, `"64KiB"`, `"1MiB"`), parsed at expansion time.

/// Parse a size into bytes, or say what to write.
pub(crate) fn parse_bytes(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let digits = t.bytes().take_while(u8::is_ascii_digit).count();
    let (number, unit) = t.split_at(digits);
    let wrong = || {
        format!(
            "`{text}` is not a size: write a number of bytes with an optional unit, e.g. \"65536\", \"64KiB\" or \"1MiB\" (units: B, KiB, MiB, GiB)"
        )
    };
    let n: u64 = number.parse().map_err(|_| wrong())?;
    let factor: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "KB" | "kB" | "MB" | "GB" | "K" | "M" | "G" | "k" | "kb" | "mb" => {
            return Err(format!(
                "`{text}`: write binary units, which say exactly what they mean: \"{n}KiB\" (1024 bytes) or \"{n}MiB\" (1024 KiB)"
            ));
        }
        _ => return Err(wrong()),
    };
    n.checked_mul(factor).ok_or_else(wrong)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_bytes("65536"), Ok(65536));
        assert_eq!(parse_bytes("64KiB"), Ok(64 * 1024));
        assert_eq!(parse_bytes("1MiB"), Ok(1 << 20));
        assert_eq!(parse_bytes("2 MiB"), Ok(2 << 20));
        for bad in ["", "MiB", "1.5MiB", "1MB", "lots", "-1"] {
            assert!(parse_bytes(bad).is_err(), "{bad:?}");
        }
    }
}
