//! The `#[idempotent]` attribute. Depend on `idem-runtime`, which re-exports it and documents it.
//!
//! This crate only forwards to `attr` (argument parsing) and `expand` (code generation), which
//! work on `proc_macro2` so they can be unit-tested without a compiler run.
#![forbid(unsafe_code)]

use proc_macro::TokenStream;

mod async_trait;
mod attr;
mod duration;
mod expand;
mod key;
mod krate;
mod module_item;
mod params;
mod shape;
mod size;
mod store;
mod template;

/// Wrap an async fn in lock-check-execute-mark. Documented in `idem_runtime::idempotent`.
#[proc_macro_attribute]
pub fn idempotent(args: TokenStream, item: TokenStream) -> TokenStream {
    expand::idempotent(args.into(), item.into()).into()
}
