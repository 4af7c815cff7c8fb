//! The key and the fingerprint: expressions over the parameters, built on the literals' spans so
//! that type errors in them point at what the user wrote.

use proc_macro2::TokenStream;
use quote::{quote, quote_spanned};
use syn::{ItemFn, LitStr};

use crate::attr::Args;
use crate::expand::respan;
use crate::params::{Params, path_expr};
use crate::template::{self, Piece};

/// The key: one value, or a template whose parts are escaped against its literal text, built in
/// one expression (`KeyBuilder::lit` and `part` return `&mut Self`: a statement each would drop
/// that, which `#![deny(unused_results)]` refuses).
pub(crate) fn key_expr(
    key_lit: &LitStr,
    krate: &TokenStream,
    func: &ItemFn,
    params: &Params,
    errors: &mut Vec<syn::Error>,
) -> Option<TokenStream> {
    let pieces = match template::parse(&key_lit.value()) {
        Err(msg) => {
            errors.push(syn::Error::new(key_lit.span(), msg));
            return None;
        }
        Ok(pieces) => pieces,
    };
    let span = key_lit.span();
    let krate = respan(krate.clone(), span);
    if let [Piece::Path(path)] = pieces.as_slice() {
        return match path_expr(path, key_lit, "key", func, params) {
            Ok(e) => {
                Some(quote_spanned!(span=> #krate::Key::new(#krate::__private::key_part(&(#e)))))
            }
            Err(e) => {
                errors.push(e);
                None
            }
        };
    }
    let mut reserved = String::new();
    let mut steps = TokenStream::new();
    for piece in &pieces {
        match piece {
            Piece::Lit(text) => {
                for c in text.chars() {
                    if !reserved.contains(c) {
                        reserved.push(c);
                    }
                }
                steps.extend(quote!(.lit(#text)));
            }
            Piece::Path(path) => match path_expr(path, key_lit, "key", func, params) {
                Ok(e) => steps.extend(quote_spanned!(span=>
                    .part(#krate::__private::key_part(&(#e)))
                )),
                Err(e) => errors.push(e),
            },
        }
    }
    Some(quote!(#krate::KeyBuilder::new(#reserved) #steps .finish()))
}

/// `.fingerprint(..)` on the call, or nothing.
pub(crate) fn fingerprint(
    args: &Args,
    krate: &TokenStream,
    func: &ItemFn,
    params: &Params,
    errors: &mut Vec<syn::Error>,
) -> TokenStream {
    let Some((lit, names)) = &args.fingerprint else {
        return TokenStream::new();
    };
    let mut adds = TokenStream::new();
    for (name, _) in names {
        match template::parse(name) {
            Ok(pieces) if matches!(pieces.as_slice(), [Piece::Path(_)]) => {
                let Piece::Path(path) = &pieces[0] else {
                    unreachable!()
                };
                match path_expr(path, lit, "fingerprint", func, params) {
                    // On the literal, so "`Payload: Serialize` is not satisfied" points there.
                    Ok(e) => adds.extend(quote_spanned!(lit.span()=> .add(&(#e)))),
                    Err(e) => errors.push(e),
                }
            }
            _ => errors.push(syn::Error::new(
                lit.span(),
                format!("`{name}` in `fingerprint` is not a parameter or a field path; list them separated by commas, e.g. fingerprint = \"amount, currency\""),
            )),
        }
    }
    quote!(.fingerprint(#krate::Fingerprint::builder() #adds .finish()))
}
