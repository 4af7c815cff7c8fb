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

/// What a key expression is keyed by, chosen by method resolution on the expression's type
/// (autoref specialisation: each tier's method takes one reference less than the one above, so
/// the first tier whose bounds hold wins). The generated code imports these traits as `_` and
/// calls `(&&KeyTag::new(&e)).__idem_maybe()`, then `(&&&&KeyTag::new(k)).__idem_part()`.
///
/// - `__idem_maybe` (the whole key, and each part of a template): an `Option` of
///   an [`OptionalKey`](crate::OptionalKey) type gives `None` for a call without a key (a
///   request without its optional `Idempotency-Key`), which runs as a plain call; any other
///   value is `Some` of itself (so an `Option<u64>` is refused below, by name).
/// - `__idem_part`: a [`KeyPart`](crate::KeyPart) is itself; a float is itself, so that
///   `key_part` refuses it by name (its `Display` is not a key: `0.1 + 0.2`); a type of another
///   crate that has `Display` (another version of `uuid`, say) is keyed by its text; anything
///   else is itself, for `key_part` to refuse by name.
pub mod key_tiers {
    use crate::{DisplayKey, KeyPart};
    use std::fmt::Display;

    /// A key expression's value, borrowed; see the module's docs.
    pub struct KeyTag<'a, T: ?Sized>(DisplayKey<'a, T>);

    impl<'a, T: ?Sized> KeyTag<'a, T> {
        /// Tag `value`.
        #[inline(always)]
        pub fn new(value: &'a T) -> KeyTag<'a, T> {
            KeyTag(DisplayKey(value))
        }
    }

    /// An optional key, of an [`OptionalKey`](crate::OptionalKey) type: `None` runs the call
    /// without one. An `Option` of another type is no key (a field that is `None` by accident
    /// must not turn deduplication off).
    pub trait MaybeOption<'a, K> {
        /// The key, if there is one.
        fn __idem_maybe(&self) -> Option<&'a K>;
    }
    impl<'a, K: crate::OptionalKey> MaybeOption<'a, K> for &KeyTag<'a, Option<K>> {
        #[inline(always)]
        fn __idem_maybe(&self) -> Option<&'a K> {
            self.0.0.as_ref()
        }
    }
    impl<'a, K: crate::OptionalKey> MaybeOption<'a, K> for &KeyTag<'a, &Option<K>> {
        #[inline(always)]
        fn __idem_maybe(&self) -> Option<&'a K> {
            self.0.0.as_ref()
        }
    }

    /// Any other key or part: always there.
    pub trait MaybeAny<'a, T: ?Sized> {
        /// The key itself.
        fn __idem_maybe(&self) -> Option<&'a T>;
    }
    impl<'a, T: ?Sized> MaybeAny<'a, T> for KeyTag<'a, T> {
        #[inline(always)]
        fn __idem_maybe(&self) -> Option<&'a T> {
            Some(self.0.0)
        }
    }

    /// A [`KeyPart`]: itself.
    pub trait PartKeyPart<'a, T: ?Sized> {
        /// The part.
        fn __idem_part(&self) -> &'a T;
    }
    impl<'a, T: KeyPart + ?Sized> PartKeyPart<'a, T> for &&&KeyTag<'a, T> {
        #[inline(always)]
        fn __idem_part(&self) -> &'a T {
            self.0.0
        }
    }

    /// A float: itself, refused by `key_part` before `Display` could key it.
    pub trait PartFloat<'a, T: ?Sized> {
        /// The float.
        fn __idem_part(&self) -> &'a T;
    }
    macro_rules! floats {
        ($($t:ty),*) => {$(
            impl<'a, 'b> PartFloat<'a, $t> for &&KeyTag<'a, $t> {
                #[inline(always)]
                fn __idem_part(&self) -> &'a $t {
                    self.0.0
                }
            }
        )*};
    }
    // Also behind the pointers a parameter may have (a generic `T: Display` called with a float
    // is keyed by `Display`: documented at `DisplayKey`).
    floats!(
        f32,
        f64,
        &'b f32,
        &'b f64,
        &'b &'b f32,
        &'b &'b f64,
        &'b mut f32,
        &'b mut f64,
        Box<f32>,
        Box<f64>,
        std::sync::Arc<f32>,
        std::sync::Arc<f64>,
        std::rc::Rc<f32>,
        std::rc::Rc<f64>
    );

    /// Another crate's type with `Display`: its text.
    pub trait PartDisplay<'a, T: ?Sized> {
        /// The value, keyed by its text.
        fn __idem_part(&self) -> &DisplayKey<'a, T>;
    }
    impl<'a, T: Display + ?Sized> PartDisplay<'a, T> for &KeyTag<'a, T> {
        #[inline(always)]
        fn __idem_part(&self) -> &DisplayKey<'a, T> {
            &self.0
        }
    }

    /// Anything else: itself, refused by `key_part` with the type's name.
    pub trait PartOther<'a, T: ?Sized> {
        /// The value.
        fn __idem_part(&self) -> &'a T;
    }
    impl<'a, T: ?Sized> PartOther<'a, T> for KeyTag<'a, T> {
        #[inline(always)]
        fn __idem_part(&self) -> &'a T {
            self.0.0
        }
    }
}
