//! What makes two requests "the same payload": method, path and query, the headers the
//! application names, and the body (JSON in a canonical form).

use crate::layer::Config;
use http::request::Parts;
use idem_runtime::{Error, Fingerprint};

pub(crate) fn of(cfg: &Config, parts: &Parts, body: &[u8]) -> Result<Fingerprint, Error> {
    let mut fp = Fingerprint::builder().add(parts.method.as_str()).add(
        original_uri(parts)
            .path_and_query()
            .map_or("/", |p| p.as_str()),
    );
    for name in &cfg.fingerprint_headers {
        // Every value, in order: a header sent twice is not the same as one sent once.
        let values: Vec<&[u8]> = parts
            .headers
            .get_all(name)
            .iter()
            .map(|v| v.as_bytes())
            .collect();
        fp = fp.add(name.as_str()).add(&values);
    }
    fp = match is_json(parts).then(|| canonical_json(body)).flatten() {
        // Fields sorted by name, numbers as written: `{"a":1,"b":2}` and `{ "b": 2, "a": 1 }`
        // are one payload, `1` and `1.0` two.
        Some(json) => fp.add("json").add_bytes(&json),
        None => fp.add("bytes").add_bytes(body),
    };
    fp.finish()
}

/// The URI the client sent: under axum's `Router::nest` the request's own URI has the nested
/// prefix stripped (`/accounts/1/transfers` seen as `/transfers`), and two accounts' transfers
/// would be one payload.
fn original_uri(parts: &Parts) -> &http::Uri {
    #[cfg(feature = "axum")]
    if let Some(original) = parts.extensions.get::<axum::extract::OriginalUri>() {
        return &original.0;
    }
    &parts.uri
}

/// Whether the body says it is JSON.
fn is_json(parts: &Parts) -> bool {
    let Some(kind) = parts
        .headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|k| k.to_str().ok())
    else {
        return false;
    };
    let essence = kind
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    essence == "application/json"
        || (essence.starts_with("application/") && essence.ends_with("+json"))
}

/// A canonical form of a JSON text: no insignificant whitespace, object members sorted by
/// name, strings with one escaping, numbers exactly as written (parsing them would round
/// amounts past `f64` precision into one another). `None` for a text that is not JSON, nests
/// deeper than 128, or repeats a member name (which of the two counts is the parser's
/// choice): such a body is compared byte for byte.
fn canonical_json(text: &[u8]) -> Option<Vec<u8>> {
    let mut p = Json { text, at: 0 };
    let mut out = Vec::with_capacity(text.len());
    p.value(&mut out, 0)?;
    p.space();
    (p.at == text.len()).then_some(out)
}

struct Json<'a> {
    text: &'a [u8],
    at: usize,
}

impl Json<'_> {
    fn space(&mut self) {
        while matches!(self.text.get(self.at), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.at += 1;
        }
    }

    fn eat(&mut self, b: u8) -> Option<()> {
        self.space();
        (self.text.get(self.at) == Some(&b)).then(|| self.at += 1)
    }

    fn value(&mut self, out: &mut Vec<u8>, depth: usize) -> Option<()> {
        if depth > 128 {
            return None;
        }
        self.space();
        match *self.text.get(self.at)? {
            b'{' => {
                self.at += 1;
                let mut members = std::collections::BTreeMap::new();
                if self.eat(b'}').is_none() {
                    loop {
                        self.space();
                        let name = self.string()?;
                        self.eat(b':')?;
                        let mut value = Vec::new();
                        self.value(&mut value, depth + 1)?;
                        if members.insert(name, value).is_some() {
                            return None;
                        }
                        if self.eat(b',').is_none() {
                            self.eat(b'}')?;
                            break;
                        }
                    }
                }
                out.push(b'{');
                for (i, (name, value)) in members.iter().enumerate() {
                    if i > 0 {
                        out.push(b',');
                    }
                    out.extend_from_slice(serde_json::to_string(name).ok()?.as_bytes());
                    out.push(b':');
                    out.extend_from_slice(value);
                }
                out.push(b'}');
            }
            b'[' => {
                self.at += 1;
                out.push(b'[');
                if self.eat(b']').is_none() {
                    loop {
                        self.value(out, depth + 1)?;
                        if self.eat(b',').is_none() {
                            self.eat(b']')?;
                            break;
                        }
                        out.push(b',');
                    }
                }
                out.push(b']');
            }
            b'"' => {
                let s = self.string()?;
                out.extend_from_slice(serde_json::to_string(&s).ok()?.as_bytes());
            }
            b't' => self.literal(out, b"true")?,
            b'f' => self.literal(out, b"false")?,
            b'n' => self.literal(out, b"null")?,
            _ => self.number(out)?,
        }
        Some(())
    }

    fn literal(&mut self, out: &mut Vec<u8>, word: &[u8]) -> Option<()> {
        self.text.get(self.at..)?.starts_with(word).then_some(())?;
        self.at += word.len();
        out.extend_from_slice(word);
        Some(())
    }

    /// A string token, unescaped (serde_json checks the escapes and the UTF-8).
    fn string(&mut self) -> Option<String> {
        let start = self.at;
        (self.text.get(self.at) == Some(&b'"')).then_some(())?;
        self.at += 1;
        loop {
            match *self.text.get(self.at)? {
                b'"' => break,
                b'\\' => self.at += 2,
                _ => self.at += 1,
            }
        }
        self.at += 1;
        serde_json::from_slice(self.text.get(start..self.at)?).ok()
    }

    /// A number token, checked against JSON's grammar and kept as written.
    fn number(&mut self, out: &mut Vec<u8>) -> Option<()> {
        let start = self.at;
        let digits = |p: &mut Self| {
            let from = p.at;
            while p.text.get(p.at).is_some_and(u8::is_ascii_digit) {
                p.at += 1;
            }
            (p.at > from).then_some(())
        };
        if self.text.get(self.at) == Some(&b'-') {
            self.at += 1;
        }
        if self.text.get(self.at) == Some(&b'0') {
            self.at += 1;
        } else {
            digits(self)?;
        }
        if self.text.get(self.at) == Some(&b'.') {
            self.at += 1;
            digits(self)?;
        }
        if matches!(self.text.get(self.at), Some(b'e' | b'E')) {
            self.at += 1;
            if matches!(self.text.get(self.at), Some(b'+' | b'-')) {
                self.at += 1;
            }
            digits(self)?;
        }
        out.extend_from_slice(&self.text[start..self.at]);
        Some(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::IdempotencyLayer;
    use idem_runtime::MemoryStore;

    fn fp(method: &str, uri: &str, kind: Option<&str>, body: &str) -> Fingerprint {
        let layer = IdempotencyLayer::new(MemoryStore::new(), "t");
        let mut req = http::Request::builder().method(method).uri(uri);
        if let Some(kind) = kind {
            req = req.header("content-type", kind);
        }
        let (parts, ()) = req.body(()).unwrap().into_parts();
        of(&layer.cfg, &parts, body.as_bytes()).unwrap()
    }

    #[test]
    fn reordered_json_fields_are_one_payload() {
        let json = Some("application/json; charset=utf-8");
        assert_eq!(
            fp("POST", "/p", json, r#"{"a":1,"b":{"c":2,"d":3}}"#).0,
            fp("POST", "/p", json, r#"{ "b": {"d":3, "c":2}, "a": 1 }"#).0
        );
        assert_ne!(
            fp("POST", "/p", json, r#"{"a":1}"#).0,
            fp("POST", "/p", json, r#"{"a":2}"#).0
        );
    }

    #[test]
    fn numbers_are_compared_as_written() {
        let json = Some("application/json");
        let one = |body| fp("POST", "/p", json, body).0;
        assert_ne!(
            one(r#"{"a":100000000000000000001}"#),
            one(r#"{"a":100000000000000000000}"#)
        );
        assert_ne!(one(r#"{"a":0.10000000000000001}"#), one(r#"{"a":0.1}"#));
        assert_ne!(one(r#"{"a":1}"#), one(r#"{"a":1.0}"#));
        // One string, two escapings.
        assert_eq!(one(r#"{"a":"\u00e9"}"#), one(r#"{"a":"é"}"#));
    }

    #[test]
    fn canonical_forms() {
        let c = |t: &str| canonical_json(t.as_bytes()).map(|v| String::from_utf8(v).unwrap());
        assert_eq!(
            c(r#" { "b" : [1, {"d":null,"c":true}], "a":"x" } "#).as_deref(),
            Some(r#"{"a":"x","b":[1,{"c":true,"d":null}]}"#)
        );
        assert_eq!(c("-0.5e+10").as_deref(), Some("-0.5e+10"));
        for bad in [
            r#"{"a":1,"a":2}"#,
            "01",
            "1.",
            "[1,]",
            "{",
            r#""\x""#,
            "tru",
            "1 2",
            "-",
        ] {
            assert_eq!(c(bad), None, "{bad}");
        }
        assert_eq!(c(&"[".repeat(200)), None);
    }

    #[test]
    fn method_path_and_raw_bodies_count() {
        let base = fp("POST", "/p", None, "x").0;
        assert_ne!(base, fp("PATCH", "/p", None, "x").0);
        assert_ne!(base, fp("POST", "/q", None, "x").0);
        assert_ne!(base, fp("POST", "/p?x=1", None, "x").0);
        assert_ne!(base, fp("POST", "/p", None, "y").0);
        // Not JSON: byte for byte.
        assert_ne!(
            fp("POST", "/p", Some("text/plain"), r#"{"a":1,"b":2}"#).0,
            fp("POST", "/p", Some("text/plain"), r#"{"b":2,"a":1}"#).0
        );
    }
}
