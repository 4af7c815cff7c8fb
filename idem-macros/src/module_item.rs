//! The default scope (module path and fn name) tells fns apart only when they are module items:
//! `run` in two impls of one module, the instantiations of a generic impl, or the types sharing a
//! default method would share one key space and replay each other's outputs. Such a fn must name
//! its scope.
//!
//! An attribute is given its fn alone, never the item around it, so the macro cannot tell an
//! associated fn from a free one. rustc can: next to the fn goes a macro call that expands to a
//! `use`, an item in a module or a block and refused in an `impl` or a `trait`. Methods and generic
//! fns are not checked this way: they have errors of their own, which say more.
//! `std::any::type_name` is no way out: its text may change between compiler versions, and a
//! scope made of it would orphan every stored record on such a change.

use proc_macro2::{Span, TokenStream};
use quote::quote_spanned;

use crate::expand::respan;

/// The check, spanned at the attribute (where `scope = "..."` goes). In an `impl` or a `trait`
/// rustc reports "`use` import is not supported in `trait`s or `impl`s" there, with a note naming
/// the macro, `fns_in_impls_and_traits_need_an_explicit_scope`.
pub(crate) fn check(krate: &TokenStream) -> TokenStream {
    let span = Span::call_site();
    let krate = respan(krate.clone(), span);
    quote_spanned!(span=> #krate::__private::fns_in_impls_and_traits_need_an_explicit_scope!();)
}
