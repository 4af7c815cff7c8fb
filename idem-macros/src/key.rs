//! The key and the fingerprint: expressions over the parameters, built on the literals' spans so
//! that type errors in them point at what the user wrote.

use proc_macro2::TokenStream;
use quote::{quote, quote_spanned};
use syn::{ItemFn, LitStr};

use crate::attr::Args;
use crate::expand::respan;
use crate::params::{Params, path_expr};
use crate::template::{self, Piece};

/// The call's key, as a `Call`: one value, or a template whose parts are escaped against its
/// literal text, built in one expression (`KeyBuilder::lit` and `part` return `&mut Self`: a statement each would drop
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
    // The tiers' traits choose how a value is keyed (see `key_tiers` in idem-runtime): imported
    // as `_` in a block of the key's own, on the literal's span.
    let tiers = quote_spanned!(span=>
        // Only the tier that applies is used.
        #[allow(unused_imports)]
        use #krate::__private::key_tiers::{
            MaybeAny as _, MaybeOption as _, PartDisplay as _, PartFloat as _, PartKeyPart as _,
            PartOther as _,
        };
    );
    let part = |value: TokenStream| {
        quote_spanned!(span=>
            #krate::__private::key_part(
                (&&&&#krate::__private::key_tiers::KeyTag::new(#value)).__idem_part()
            )
        )
    };
    if let [Piece::Path(path)] = pieces.as_slice() {
        return match path_expr(path, key_lit, "key", func, params) {
            Ok(e) => {
                // An optional key (`Option` of an `OptionalKey` type) that is `None` makes a call
                // without a key (a plain call).
                let part = part(quote!(__idem_key));
                // `map_or_else`, not a `match`: clippy's `option_if_let_else` would report that
                // on the user's literal.
                Some(quote_spanned!(span=> {
                    #tiers
                    (&&#krate::__private::key_tiers::KeyTag::new(&(#e)))
                        .__idem_maybe()
                        .map_or_else(#krate::Call::unkeyed, |__idem_key| {
                            #krate::Call::from_key(#krate::Key::new(#part))
                        })
                }))
            }
            Err(e) => {
                errors.push(e);
                None
            }
        };
    }
    let mut reserved = String::new();
    let mut steps = TokenStream::new();
    // Each part is looked at first: an optional one (`Option<IdempotencyKey>`) that is `None`
    // makes the call one without a key.
    let mut maybes = TokenStream::new();
    let mut somes = TokenStream::new();
    let mut parts = 0usize;
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
                Ok(e) => {
                    let name = quote::format_ident!("__idem_part_{}", parts);
                    parts += 1;
                    maybes.extend(quote_spanned!(span=>
                        (&&#krate::__private::key_tiers::KeyTag::new(&(#e))).__idem_maybe(),
                    ));
                    somes.extend(quote_spanned!(span=> ::core::option::Option::Some(#name),));
                    let part = part(quote!(#name));
                    steps.extend(quote_spanned!(span=> .part(#part)));
                }
                Err(e) => errors.push(e),
            },
        }
    }
    Some(quote_spanned!(span=> {
        #tiers
        match (#maybes) {
            (#somes) => #krate::Call::from_key(#krate::KeyBuilder::new(#reserved) #steps .finish()),
            _ => #krate::Call::unkeyed(),
        }
    }))
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
