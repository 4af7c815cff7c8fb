//! The `store = "..."` expression: checked to be a store on its own literal, and borrowed for the
//! whole call.

use proc_macro2::TokenStream;
use quote::{quote, quote_spanned};

use crate::attr::Args;
use crate::expand::respan;
use crate::params::{Params, mentions};

/// The store (an expression, or the process-wide default), the `use` its check needs, and
/// whether the body may move what it captures.
pub(crate) fn store(
    args: &Args,
    krate: &TokenStream,
    params: &Params,
    sig: &syn::Signature,
    errors: &mut Vec<syn::Error>,
) -> (TokenStream, TokenStream, bool) {
    let Some((lit, expr)) = &args.store else {
        return (quote!(&#krate::DefaultStore), TokenStream::new(), true);
    };
    let tokens = quote!(#expr);
    if params.receiver == Some(false) && mentions(tokens.clone(), "self") {
        errors.push(syn::Error::new(
            lit.span(),
            format!(
                "`store` borrows `self` for the whole call, but `{}` takes `self` by value, which the handler's body owns; take `&self`, or give a store that does not live in `self`",
                sig.ident
            ),
        ));
    }
    // A store borrowed from a by-value parameter must not be moved into the body: capture by
    // reference then (the body can still move other parameters).
    // Likewise a store in `&mut self`: moving the `&mut` into the body would conflict with the
    // store's borrow, while a body that only reads `self` can share it.
    let moves = !(params
        .names
        .iter()
        .any(|n| mentions(tokens.clone(), &n.to_string()))
        || (params.receiver_mut && mentions(tokens.clone(), "self")));
    // The expression may be a store, a reference to one (a parameter `store: &MemoryStore` or
    // `&dyn Store`) or an `Arc`: a method call peels one reference (`StoreDeref`, in scope for
    // the call). `store_ref` checks it with a message about stores, reported on the literal; the
    // handle it returns has one type whatever the store, so `run_future` adds no second error.
    let span = lit.span();
    let krate_lit = respan(krate.clone(), span);
    (
        quote_spanned!(span=> &#krate_lit::__private::store_ref(&(#expr).__idem_deref())),
        quote!(use #krate::__private::StoreDeref as _;),
        moves,
    )
}
