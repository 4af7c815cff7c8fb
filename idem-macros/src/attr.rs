//! Parsing `#[idempotent(...)]` arguments. Every error carries the span of what the user wrote.

use proc_macro2::Span;
use syn::ext::IdentExt;
use syn::parse::{Parse, ParseStream};
use syn::{Expr, LitStr, Path, Token};

use crate::duration;

mod kw {
    syn::custom_keyword!(key);
    syn::custom_keyword!(ttl);
    syn::custom_keyword!(keep);
    syn::custom_keyword!(scope);
    syn::custom_keyword!(store);
    syn::custom_keyword!(fingerprint);
    syn::custom_keyword!(wait);
    syn::custom_keyword!(tx);
    syn::custom_keyword!(max_lease);
    syn::custom_keyword!(max_output);
}

const OPTIONS: &str = "`key`, `ttl`, `keep`, `scope`, `store`, `tx`, `fingerprint`, `wait`, `max_lease`, `max_output`, `crate`";

/// Limits on durations: a zero or absurd value is a mistake worth a compile error.
const TTL_MIN_MS: u64 = 100;
const TTL_MAX_MS: u64 = 24 * 3_600_000;
const KEEP_MIN_MS: u64 = 1_000;
const KEEP_MAX_MS: u64 = 400 * 86_400_000;
const WAIT_MAX_MS: u64 = 3_600_000;
const MAX_LEASE_MIN_MS: u64 = 1_000;
const MAX_LEASE_MAX_MS: u64 = 400 * 86_400_000;
/// Outputs are bounded so that a done mark always fits in one statement or command.
const MAX_OUTPUT_MAX: u64 = 256 * 1024 * 1024;

/// A duration and the literal it came from.
pub(crate) struct Dur {
    pub(crate) ms: u64,
    pub(crate) lit: LitStr,
}

/// The parsed arguments. Every field keeps its literal for error spans.
#[derive(Default)]
pub(crate) struct Args {
    pub(crate) key: Option<LitStr>,
    pub(crate) ttl: Option<Dur>,
    pub(crate) keep: Option<Dur>,
    pub(crate) scope: Option<LitStr>,
    pub(crate) store: Option<(LitStr, Expr)>,
    pub(crate) fingerprint: Option<(LitStr, Vec<(String, Span)>)>,
    pub(crate) wait: Option<Dur>,
    /// The transaction parameter of the transactional form.
    pub(crate) tx: Option<LitStr>,
    /// `None` inside: renew forever.
    pub(crate) max_lease: Option<Option<Dur>>,
    pub(crate) max_output: Option<(LitStr, u64)>,
    pub(crate) krate: Option<(LitStr, Path)>,
    /// Mistakes in individual options; the others are still checked against the function.
    pub(crate) errors: Vec<syn::Error>,
}

impl Parse for Args {
    fn parse(input: ParseStream<'_>) -> syn::Result<Self> {
        let mut args = Args::default();
        let mut errors = Vec::new();
        let mut push = |e: syn::Error| errors.push(e);
        while !input.is_empty() {
            let lookahead = input.lookahead1();
            // Each arm: name, `=`, string literal; a duplicate is reported on its second name.
            macro_rules! take {
                ($kw:ty, $name:literal, $field:expr, $conv:expr) => {{
                    let name = input.parse::<$kw>()?;
                    input.parse::<Token![=]>()?;
                    let lit = parse_lit(input, $name)?;
                    if $field.is_some() {
                        push(syn::Error::new(
                            name.span,
                            concat!("`", $name, "` is given twice; keep one"),
                        ));
                    } else {
                        match $conv(lit) {
                            Ok(v) => $field = Some(v),
                            Err(e) => push(e),
                        }
                    }
                }};
            }
            if lookahead.peek(kw::key) {
                // An empty or malformed key is reported by the template parser, on the literal;
                // keeping the literal here avoids a second "missing `key`" error.
                take!(kw::key, "key", args.key, Ok::<LitStr, syn::Error>);
            } else if lookahead.peek(kw::ttl) {
                take!(kw::ttl, "ttl", args.ttl, |l| dur(
                    l,
                    "ttl",
                    TTL_MIN_MS,
                    TTL_MAX_MS,
                    "the lease is renewed while the handler runs, so ttl only bounds how long a crashed holder blocks the key"
                ));
            } else if lookahead.peek(kw::keep) {
                take!(kw::keep, "keep", args.keep, |l| dur(
                    l,
                    "keep",
                    KEEP_MIN_MS,
                    KEEP_MAX_MS,
                    "keep is how long a done key is remembered and its output replayed"
                ));
            } else if lookahead.peek(kw::wait) {
                take!(kw::wait, "wait", args.wait, |l| dur(
                    l,
                    "wait",
                    1,
                    WAIT_MAX_MS,
                    "wait bounds how long an in-flight duplicate waits for the holder's result"
                ));
            } else if lookahead.peek(kw::max_lease) {
                take!(kw::max_lease, "max_lease", args.max_lease, |l: LitStr| {
                    if l.value() == "forever" {
                        return Ok(None);
                    }
                    dur(
                        l,
                        "max_lease",
                        MAX_LEASE_MIN_MS,
                        MAX_LEASE_MAX_MS,
                        "max_lease is how long a running handler's lease is renewed at most (write \"forever\" to renew while it runs)",
                    )
                    .map(Some)
                });
            } else if lookahead.peek(kw::max_output) {
                take!(
                    kw::max_output,
                    "max_output",
                    args.max_output,
                    |l: LitStr| {
                        match crate::size::parse_bytes(&l.value()) {
                            Ok(0) => Err(syn::Error::new(
                                l.span(),
                                "`max_output` must be greater than zero, e.g. max_output = \"256KiB\"",
                            )),
                            Ok(n) if n > MAX_OUTPUT_MAX => Err(syn::Error::new(
                                l.span(),
                                "`max_output` is at most \"256MiB\": a larger output is kept better outside the idempotency record",
                            )),
                            Ok(n) => Ok((l.clone(), n)),
                            Err(e) => Err(syn::Error::new(l.span(), e)),
                        }
                    }
                );
            } else if lookahead.peek(kw::tx) {
                take!(kw::tx, "tx", args.tx, |l: LitStr| {
                    let v = l.value();
                    if syn::parse_str::<syn::Ident>(&v).is_ok() {
                        Ok(l)
                    } else {
                        Err(syn::Error::new(
                            l.span(),
                            "`tx` names the parameter that is the transaction, e.g. tx = \"tx\" for `tx: &mut Transaction<'_, Postgres>`",
                        ))
                    }
                });
            } else if lookahead.peek(kw::scope) {
                take!(kw::scope, "scope", args.scope, |l: LitStr| {
                    if l.value().trim().is_empty() {
                        Err(syn::Error::new(
                            l.span(),
                            "the scope is empty: leave `scope` out to use the module path and function name",
                        ))
                    } else {
                        Ok(l)
                    }
                });
            } else if lookahead.peek(kw::store) {
                take!(kw::store, "store", args.store, |l: LitStr| {
                    l.parse::<Expr>().map(|e| (l.clone(), e)).map_err(|e| {
                        syn::Error::new(
                            l.span(),
                            format!("`store` must be a Rust expression, e.g. store = \"self.idem\" or store = \"STORE\": {e}"),
                        )
                    })
                });
            } else if lookahead.peek(kw::fingerprint) {
                take!(
                    kw::fingerprint,
                    "fingerprint",
                    args.fingerprint,
                    |l: LitStr| { fingerprint_list(&l).map(|v| (l.clone(), v)) }
                );
            } else if lookahead.peek(Token![crate]) {
                let name = input.parse::<Token![crate]>()?;
                input.parse::<Token![=]>()?;
                let lit = parse_lit(input, "crate")?;
                if args.krate.is_some() {
                    push(syn::Error::new(
                        name.span,
                        "`crate` is given twice; keep one",
                    ));
                } else {
                    match lit.parse::<Path>() {
                        Ok(p) => args.krate = Some((lit, p)),
                        Err(_) => push(syn::Error::new(
                            lit.span(),
                            "`crate` must be a path, e.g. crate = \"idem\" for a dependency renamed to `idem`",
                        )),
                    }
                }
            } else if input.peek(syn::Ident::peek_any) {
                let ident = syn::Ident::parse_any(input)?;
                let hint = match ident.to_string().as_str() {
                    "lease" | "timeout" | "expiry" | "ex" | "px" => {
                        " (the in-flight lease is `ttl`)"
                    }
                    "retention" | "ttl_done" | "done_ttl" | "expire" => {
                        " (the done record's lifetime is `keep`)"
                    }
                    "namespace" | "prefix" | "name" => " (the namespace is `scope`)",
                    "on_in_flight" | "in_flight" | "block" => {
                        " (to wait for an in-flight duplicate, use `wait = \"5s\"`)"
                    }
                    "payload" | "hash" | "validate" => " (payload checking is `fingerprint`)",
                    "transaction" | "txn" | "conn" | "connection" => {
                        " (the transaction parameter is `tx`)"
                    }
                    "max_size" | "output_limit" | "limit" => {
                        " (the stored output's bound is `max_output`)"
                    }
                    _ => "",
                };
                push(syn::Error::new(
                    ident.span(),
                    format!("unknown option `{ident}`{hint}; expected one of: {OPTIONS}"),
                ));
                // Skip its value so the rest is still checked.
                if input.parse::<Token![=]>().is_ok() {
                    let _ = input.parse::<Expr>();
                }
            } else {
                return Err(lookahead.error());
            }
            if input.is_empty() {
                break;
            }
            input.parse::<Token![,]>()?;
        }
        args.errors = errors;
        Ok(args)
    }
}

fn parse_lit(input: ParseStream<'_>, name: &str) -> syn::Result<LitStr> {
    if input.peek(LitStr) {
        return input.parse();
    }
    let found: Expr = input.parse()?;
    let example = match name {
        "key" => "key = \"order_id\"",
        "ttl" => "ttl = \"30s\"",
        "keep" => "keep = \"24h\"",
        "wait" => "wait = \"5s\"",
        "scope" => "scope = \"billing::charge\"",
        "store" => "store = \"self.idem\"",
        "fingerprint" => "fingerprint = \"amount, currency\"",
        "tx" => "tx = \"tx\"",
        "max_lease" => "max_lease = \"1h\"",
        "max_output" => "max_output = \"256KiB\"",
        _ => "crate = \"idem\"",
    };
    Err(syn::Error::new_spanned(
        found,
        format!("`{name}` takes a string literal, e.g. {example}"),
    ))
}

fn dur(lit: LitStr, name: &str, min: u64, max: u64, why: &str) -> syn::Result<Dur> {
    let example = match name {
        "keep" => "24h",
        "wait" => "5s",
        "max_lease" => "1h",
        _ => "30s",
    };
    let ms = duration::parse_ms(&lit.value()).map_err(|e| syn::Error::new(lit.span(), e))?;
    if ms == 0 {
        return Err(syn::Error::new(
            lit.span(),
            format!("`{name}` must be greater than zero, e.g. {name} = \"{example}\"; {why}"),
        ));
    }
    if ms < min {
        return Err(syn::Error::new(
            lit.span(),
            format!(
                "`{name}` = \"{}\" is shorter than the minimum: write at least \"{}\"; {why}",
                lit.value(),
                duration::show(min)
            ),
        ));
    }
    if ms > max {
        return Err(syn::Error::new(
            lit.span(),
            format!(
                "`{name}` = \"{}\" is longer than the maximum: write at most \"{}\"; {why}",
                lit.value(),
                duration::show(max)
            ),
        ));
    }
    Ok(Dur { ms, lit })
}

fn fingerprint_list(lit: &LitStr) -> syn::Result<Vec<(String, Span)>> {
    let value = lit.value();
    let names: Vec<(String, Span)> = value
        .split(',')
        .map(|s| (s.trim().to_owned(), lit.span()))
        .collect();
    if names.iter().any(|(n, _)| n.is_empty()) {
        return Err(syn::Error::new(
            lit.span(),
            "`fingerprint` lists parameters (or field paths) separated by commas, e.g. fingerprint = \"amount, currency\"",
        ));
    }
    Ok(names)
}
