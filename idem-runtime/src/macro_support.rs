//! What the code `#[idempotent]` generates calls, beyond the wrapper itself. Not public API
//! (re-exported from `__private`).
//!
//! These items used to be generated in the user's crate, next to each handler; there they carried
//! tool attributes (`#[diagnostic::on_unimplemented]`), which a crate under
//! `#![no_implicit_prelude]` cannot resolve. Here the generated code only names them by absolute
//! paths.

use crate::{Error, Store, StoreHandle};

/// Peels one reference off the `store` expression: a method call autorefs, so `self.idem` (a
/// `MemoryStore`), `store` (a `&MemoryStore`) and `&store` all give `&MemoryStore`, and `self.arc`
/// gives `&Arc<..>`. The generated code imports it as `_` and calls `(store).__idem_deref()`.
pub trait StoreDeref {
    /// `self`, one reference less than the expression it is called on.
    #[inline(always)]
    fn __idem_deref(&self) -> &Self {
        self
    }
}

impl<T: ?Sized> StoreDeref for T {}

/// The check on a `store = "..."` expression, so that a value that is not a store is one error
/// about stores, on the `store` literal (the generated call is spanned there).
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not an idempotency store",
    label = "`store` must be a value that implements `idem_runtime::Store`, or a reference or `Arc` to one",
    note = "give a store such as a `MemoryStore` field (`store = \"self.idem\"`), or leave `store` out to use the store installed with `idem_runtime::install_default_store`"
)]
pub trait IdemStore: StoreHandle {}

// Report the missing trait by this trait's message, not by `StoreHandle`'s impls.
#[diagnostic::do_not_recommend]
impl<S: StoreHandle + ?Sized> IdemStore for S {}

/// A store behind one more reference, as a sized value: `&S` coerces to `dyn DynStore` even when
/// `S` is unsized (`dyn Store`).
trait DynStore {
    fn dyn_store(&self) -> Result<&dyn Store, Error>;
}

impl<S: StoreHandle + ?Sized> DynStore for &S {
    fn dyn_store(&self) -> Result<&dyn Store, Error> {
        StoreHandle::store(*self)
    }
}

/// The store a handler was given, as one type whatever the store: `run_future` then adds no
/// second error to the one `store_ref` reports.
pub struct StoreRef<'a>(&'a (dyn DynStore + Sync + 'a));

impl StoreHandle for StoreRef<'_> {
    fn store(&self) -> Result<&dyn Store, Error> {
        self.0.dyn_store()
    }
}

/// Check that `store` is a store and wrap it. `Sync` (every `Store` is) keeps the handler's future
/// `Send`.
#[inline(always)]
pub fn store_ref<'a, S: IdemStore + Sync + ?Sized>(store: &'a &'a S) -> StoreRef<'a> {
    StoreRef(store)
}

/// Emitted by `#[idempotent]` next to a fn that has no `scope` (nor a receiver or generics, which
/// have their own errors). Its default scope, the module path and the fn name, tells fns apart
/// only when they are module items: two impls of one module (or the instantiations of a generic
/// impl, or the types sharing a default method) would share one key space and replay each other's
/// outputs. An attribute cannot see the item around its fn, so this expands to a `use`, which is
/// an item in a module or a block and refused by rustc in an `impl` or a `trait`. The error is
/// rustc's ("`use` import is not supported in `trait`s or `impl`s"), on the attribute; this
/// macro's name, shown in its note, says what to do.
#[doc(hidden)]
#[macro_export]
macro_rules! __idem_fns_in_impls_and_traits_need_an_explicit_scope {
    () => {
        use $crate as _;
    };
}
