//! What makes two requests "the same payload": method, path and query, the headers the
//! application names, and the body (JSON in a canonical form).

use crate::layer::Config;
use http::request::Parts;
use idem_runtime::{Error, Fingerprint};

pub(crate) fn of(cfg: &Config, parts: &Parts, body: &[u8]) -> Result<Fingerprint, Error> {
    let mut fp = Fingerprint::builder()
        .add(parts.method.as_str())
        .add(parts.uri.path_and_query().map_or("/", |p| p.as_str()));
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
    fp = match json(parts, body) {
        // Fields sorted by name, numbers and strings as parsed: `{"a":1,"b":2}` and
        // `{ "b": 2, "a": 1 }` are one payload.
        Some(value) => fp.add("json").add(&value),
        None => fp.add("bytes").add_bytes(body),
    };
    fp.finish()
}

/// The body as JSON, if it says it is JSON and parses as such.
fn json(parts: &Parts, body: &[u8]) -> Option<serde_json::Value> {
    let kind = parts
        .headers
        .get(http::header::CONTENT_TYPE)?
        .to_str()
        .ok()?;
    let essence = kind.split(';').next()?.trim().to_ascii_lowercase();
    let is_json = essence == "application/json"
        || (essence.starts_with("application/") && essence.ends_with("+json"));
    if !is_json {
        return None;
    }
    serde_json::from_slice(body).ok()
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
