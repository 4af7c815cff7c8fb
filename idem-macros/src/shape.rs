//! Output shapes a web handler returns that are not serde types themselves, but wrap one: axum's
//! `Json<T>` and `(StatusCode, Json<T>)`. The wrapper stores the `T` (and the status as a
//! number) and builds the wrapper type again around what it runs or replays, so such a handler
//! takes `#[idempotent]` as it is. Recognised by their written names (the last path segment),
//! as a macro only can.

use proc_macro2::TokenStream;
use quote::quote;
use syn::{GenericArgument, PathArguments, Type};

pub(crate) enum Shape {
    /// `Ok` is stored as it is.
    Plain,
    /// `Ok` is `Json<T>` (the path as written, without its arguments): `T` is stored.
    Json(TokenStream),
    /// `Ok` is `(StatusCode, Json<T>)`: `(u16, T)` is stored.
    StatusJson {
        status: TokenStream,
        json: TokenStream,
    },
}

impl Shape {
    /// The shape of `ret`, a `Result<Ok, ..>` (or an alias `Result<Ok>`).
    pub(crate) fn of(ret: &Type) -> Shape {
        let Some(ok) = first_arg_of(ret, "Result") else {
            return Shape::Plain;
        };
        if let Some(json) = json_path(ok) {
            return Shape::Json(json);
        }
        if let Type::Tuple(t) = ok
            && t.elems.len() == 2
            && let (Some(status), Some(json)) =
                (named(&t.elems[0], "StatusCode"), json_path(&t.elems[1]))
        {
            return Shape::StatusJson { status, json };
        }
        Shape::Plain
    }

    /// `out`, the handler's own `Result`, as the `Result` that is stored.
    pub(crate) fn unwrap_stored(&self, out: TokenStream) -> TokenStream {
        match self {
            Shape::Plain => out,
            Shape::Json(json) => quote!(#out.map(|#json(__idem_v)| __idem_v)),
            Shape::StatusJson { json, .. } => {
                quote!(#out.map(|(__idem_s, #json(__idem_v))| (__idem_s.as_u16(), __idem_v)))
            }
        }
    }

    /// `stored`, the wrapper's `Result` of what is stored, as the handler's own `Result`.
    pub(crate) fn rewrap(&self, stored: TokenStream) -> TokenStream {
        match self {
            Shape::Plain => stored,
            Shape::Json(json) => quote!(#stored.map(#json)),
            // A status that was stored is valid; one that is not (a record not written by this
            // wrapper) is answered as the server error it is.
            Shape::StatusJson { status, json } => quote!(#stored.map(|(__idem_s, __idem_v)| (
                #status::from_u16(__idem_s).unwrap_or(#status::INTERNAL_SERVER_ERROR),
                #json(__idem_v),
            ))),
        }
    }
}

/// The first type argument of `ty` if `ty` is a path whose last segment is `name`.
fn first_arg_of<'a>(ty: &'a Type, name: &str) -> Option<&'a Type> {
    let Type::Path(p) = ty else { return None };
    let last = p.path.segments.last()?;
    if last.ident != name {
        return None;
    }
    let PathArguments::AngleBracketed(args) = &last.arguments else {
        return None;
    };
    args.args.iter().find_map(|a| match a {
        GenericArgument::Type(t) => Some(t),
        _ => None,
    })
}

/// `Json<T>`'s path without its arguments (`Json`, `axum::Json`), if `ty` is one.
fn json_path(ty: &Type) -> Option<TokenStream> {
    first_arg_of(ty, "Json")?;
    named(ty, "Json")
}

/// The path of `ty` without the last segment's arguments, if its last segment is `name`.
fn named(ty: &Type, name: &str) -> Option<TokenStream> {
    let Type::Path(p) = ty else { return None };
    if p.qself.is_some() || p.path.segments.last()?.ident != name {
        return None;
    }
    let mut path = p.path.clone();
    path.segments.last_mut()?.arguments = PathArguments::None;
    Some(quote!(#path))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(ty: &str) -> &'static str {
        match Shape::of(&syn::parse_str(ty).unwrap()) {
            Shape::Plain => "plain",
            Shape::Json(_) => "json",
            Shape::StatusJson { .. } => "status-json",
        }
    }

    #[test]
    fn shapes_by_their_written_names() {
        assert_eq!(shape("Result<Json<Payment>, AppError>"), "json");
        assert_eq!(shape("Result<axum::Json<Vec<u8>>, E>"), "json");
        assert_eq!(shape("anyhow::Result<Json<P>>"), "json");
        assert_eq!(shape("Result<(StatusCode, Json<P>), E>"), "status-json");
        assert_eq!(
            shape("Result<(http::StatusCode, axum::Json<P>), E>"),
            "status-json"
        );
        assert_eq!(shape("Result<P, E>"), "plain");
        assert_eq!(shape("Result<(u16, Json<P>), E>"), "plain");
        assert_eq!(shape("Result<Json, E>"), "plain");
        assert_eq!(shape("Option<Json<P>>"), "plain");
    }
}
