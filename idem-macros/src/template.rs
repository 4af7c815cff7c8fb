//! Key templates: `"order_id"`, `"msg.order_id"`, `"{tenant}:{order.id}"`.

/// One piece of a key.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Piece {
    /// Literal text between placeholders.
    Lit(String),
    /// A parameter and a field path into it: `order.id` is `["order", "id"]`.
    Path(Vec<String>),
}

/// Parse a key or template into pieces.
pub(crate) fn parse(text: &str) -> Result<Vec<Piece>, String> {
    if text.is_empty() {
        return Err("the key is empty: name the parameter that identifies the message, e.g. key = \"order_id\"".into());
    }
    if !text.contains(['{', '}']) {
        return Ok(vec![Piece::Path(parse_path(text)?)]);
    }
    let mut pieces = Vec::new();
    let mut lit = String::new();
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '{' if chars.peek() == Some(&'{') => {
                chars.next();
                lit.push('{');
            }
            '}' if chars.peek() == Some(&'}') => {
                chars.next();
                lit.push('}');
            }
            '{' => {
                let mut inner = String::new();
                loop {
                    match chars.next() {
                        Some('}') => break,
                        Some('{') | None => {
                            return Err(format!(
                                "unclosed `{{` in key template `{text}`: write `{{name}}`, or `{{{{` for a literal brace"
                            ));
                        }
                        Some(c) => inner.push(c),
                    }
                }
                if !lit.is_empty() {
                    pieces.push(Piece::Lit(std::mem::take(&mut lit)));
                }
                pieces.push(Piece::Path(parse_path(inner.trim())?));
            }
            '}' => {
                return Err(format!(
                    "unmatched `}}` in key template `{text}`: write `}}}}` for a literal brace"
                ));
            }
            c => lit.push(c),
        }
    }
    if !lit.is_empty() {
        pieces.push(Piece::Lit(lit));
    }
    if !pieces.iter().any(|p| matches!(p, Piece::Path(_))) {
        return Err(format!(
            "key template `{text}` has no `{{parameter}}`, so every call would share one key: `{{{{` is a literal brace; write `{{order_id}}` to put a parameter in the key"
        ));
    }
    Ok(pieces)
}

fn parse_path(text: &str) -> Result<Vec<String>, String> {
    if text.is_empty() {
        return Err("empty `{}` in key template: name a parameter, e.g. `{order_id}`".into());
    }
    let parts: Vec<String> = text.split('.').map(str::to_owned).collect();
    for (i, p) in parts.iter().enumerate() {
        let ok = if i == 0 {
            is_ident(p)
        } else {
            is_ident(p) || (!p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
        };
        if !ok {
            return Err(format!(
                "`{text}` is not a parameter or a field path: write `order_id`, `msg.order_id`, or a template such as `{{tenant}}:{{order.id}}`"
            ));
        }
    }
    Ok(parts)
}

fn is_ident(s: &str) -> bool {
    let mut b = s.bytes();
    matches!(b.next(), Some(c) if c == b'_' || c.is_ascii_alphabetic())
        && b.all(|c| c == b'_' || c.is_ascii_alphanumeric())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn path(p: &[&str]) -> Piece {
        Piece::Path(p.iter().map(|s| s.to_string()).collect())
    }

    #[test]
    fn plain_and_field_paths() {
        assert_eq!(parse("order_id").unwrap(), vec![path(&["order_id"])]);
        assert_eq!(
            parse("msg.order_id").unwrap(),
            vec![path(&["msg", "order_id"])]
        );
        assert_eq!(parse("pair.0").unwrap(), vec![path(&["pair", "0"])]);
    }

    #[test]
    fn templates() {
        assert_eq!(
            parse("{tenant}:{order.id}").unwrap(),
            vec![
                path(&["tenant"]),
                Piece::Lit(":".into()),
                path(&["order", "id"])
            ]
        );
        assert_eq!(
            parse("o-{ id }{{x}}").unwrap(),
            vec![
                Piece::Lit("o-".into()),
                path(&["id"]),
                Piece::Lit("{x}".into())
            ]
        );
    }

    #[test]
    fn errors() {
        for bad in [
            "", "order-id", "{a", "a}", "{}", "{x}{", "1abc", "a..b", "{{lit}}",
        ] {
            assert!(parse(bad).is_err(), "{bad:?} was accepted");
        }
    }
}
