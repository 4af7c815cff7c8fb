//! Review rev1: the text a key is stored under must not change across an upgrade (a changed
//! text orphans every stored record, and duplicates run again after a deploy). Pins the text of
//! every key type that worked before the key tiers (autoref specialisation) were added, through
//! the attribute, and checks that a type with both `KeyPart` and `Display` is keyed by `KeyPart`
//! in every form of handler.
//!
//! The expansion must not trip lints on the user's key literal: `cargo clippy -p idem-tests
//! --test key_texts` fails while the single-key form expands to a `match` that
//! `clippy::option_if_let_else` (nursery) reports on the literal.
#![deny(clippy::option_if_let_else)]
use std::borrow::Cow;
use std::fmt;
use std::num::NonZeroU64;
use std::sync::Arc;

use idem_runtime::{KeyPart, MemoryStore, idempotent, observe};

#[derive(Debug, thiserror::Error)]
enum AppError {
    #[error(transparent)]
    Idem(#[from] idem_runtime::Error),
}

/// A user type with a `KeyPart` and a `Display` that differ: the key is the `KeyPart` text.
struct Dual(u32);

impl KeyPart for Dual {
    fn write_key(&self, out: &mut String) {
        out.push_str("kp-");
        self.0.write_key(out);
    }
}

/// `Option<Dual>` is an optional key.
impl idem_runtime::OptionalKey for Dual {}

impl fmt::Display for Dual {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "display-{}", self.0)
    }
}

macro_rules! handlers {
    ($($name:ident: $t:ty;)*) => {$(
        #[idempotent(key = "k", store = "store", scope = "texts")]
        async fn $name(store: &MemoryStore, k: $t) -> Result<(), AppError> {
            let _ = &k;
            Ok(())
        }
    )*};
}

handlers! {
    k_u64: u64;
    k_i64: i64;
    k_u128: u128;
    k_u8: u8;
    k_char: char;
    k_bool: bool;
    k_string: String;
    k_str: &str;
    k_str_ref_ref: &&str;
    k_arc_str: Arc<str>;
    k_box_str: Box<str>;
    k_cow: Cow<'_, str>;
    k_bytes: [u8; 16];
    k_bytes_ref: &[u8; 16];
    k_nonzero: NonZeroU64;
    k_dual: Dual;
    k_dual_ref: &Dual;
    k_dual_box: Box<Dual>;
    k_dual_arc: Arc<Dual>;
    k_dual_option: Option<Dual>;
}

#[idempotent(key = "k", store = "store", scope = "texts")]
async fn k_generic_key_part<T: KeyPart + Send + Sync>(
    store: &MemoryStore,
    k: T,
) -> Result<(), AppError> {
    let _ = &k;
    Ok(())
}

#[idempotent(key = "k", store = "store", scope = "texts")]
async fn k_generic_both<T: KeyPart + fmt::Display + Send + Sync>(
    store: &MemoryStore,
    k: T,
) -> Result<(), AppError> {
    let _ = &k;
    Ok(())
}

/// A generic handler bounded by `Display` only, called with a `KeyPart` type.
#[idempotent(key = "k", store = "store", scope = "texts")]
async fn k_generic_display<T: fmt::Display + Send + Sync>(
    store: &MemoryStore,
    k: T,
) -> Result<(), AppError> {
    let _ = &k;
    Ok(())
}

#[idempotent(key = "{a}/{b}", store = "store", scope = "texts")]
async fn k_template(store: &MemoryStore, a: Dual, b: &str) -> Result<(), AppError> {
    let _ = (&a, b);
    Ok(())
}

async fn text<F: std::future::Future<Output = Result<(), AppError>>>(fut: F) -> String {
    let (out, report) = observe(fut).await;
    out.unwrap();
    let report = report.expect("an idempotent call was made");
    report.key.expect("the call has a key").as_str().to_owned()
}

const ID: [u8; 16] = [
    0x67, 0xe5, 0x50, 0x44, 0x10, 0xb1, 0x42, 0x6f, 0x92, 0x47, 0xbb, 0x68, 0x0e, 0x5f, 0xe0, 0xc8,
];
const ID_TEXT: &str = "67e55044-10b1-426f-9247-bb680e5fe0c8";

#[tokio::test]
async fn key_texts_of_the_types_that_were_keys_before_are_unchanged() {
    let s = MemoryStore::new();
    assert_eq!(text(k_u64(&s, 42)).await, "42");
    assert_eq!(text(k_i64(&s, -42)).await, "-42");
    assert_eq!(text(k_u128(&s, u128::MAX)).await, u128::MAX.to_string());
    assert_eq!(text(k_u8(&s, 7)).await, "7");
    assert_eq!(text(k_char(&s, 'x')).await, "x");
    assert_eq!(text(k_bool(&s, true)).await, "true");
    assert_eq!(text(k_string(&s, "order-1".into())).await, "order-1");
    assert_eq!(text(k_str(&s, "order-2")).await, "order-2");
    assert_eq!(text(k_str_ref_ref(&s, &"order-3")).await, "order-3");
    assert_eq!(text(k_arc_str(&s, Arc::from("order-4"))).await, "order-4");
    assert_eq!(text(k_box_str(&s, Box::from("order-5"))).await, "order-5");
    assert_eq!(text(k_cow(&s, Cow::Borrowed("order-6"))).await, "order-6");
    assert_eq!(text(k_bytes(&s, ID)).await, ID_TEXT);
    assert_eq!(text(k_bytes_ref(&s, &ID)).await, ID_TEXT);
    assert_eq!(text(k_nonzero(&s, NonZeroU64::new(9).unwrap())).await, "9");
}

#[tokio::test]
async fn a_type_with_key_part_and_display_is_keyed_by_key_part_concretely() {
    let s = MemoryStore::new();
    assert_eq!(text(k_dual(&s, Dual(1))).await, "kp-1");
    assert_eq!(text(k_dual_ref(&s, &Dual(2))).await, "kp-2");
    assert_eq!(text(k_dual_box(&s, Box::new(Dual(3)))).await, "kp-3");
    assert_eq!(text(k_dual_arc(&s, Arc::new(Dual(4)))).await, "kp-4");
    assert_eq!(text(k_dual_option(&s, Some(Dual(5)))).await, "kp-5");
    assert_eq!(text(k_template(&s, Dual(6), "x")).await, "kp-6/x");
    assert_eq!(text(k_generic_key_part(&s, Dual(7))).await, "kp-7");
    assert_eq!(text(k_generic_both(&s, Dual(8))).await, "kp-8");
}

/// Decided, and documented at `DisplayKey`: a generic handler bounded by `Display` only can use
/// nothing but `Display`, so a `KeyPart` type whose texts differ is keyed by its `Display` text
/// there (bound the parameter by `KeyPart` to key it by that). No key that compiled before the
/// tiers changes: such a handler did not compile.
#[tokio::test]
async fn a_display_generic_handler_keys_by_display_as_documented() {
    let s = MemoryStore::new();
    assert_eq!(text(k_generic_display(&s, Dual(9))).await, "display-9");
}

#[cfg(feature = "uuid")]
#[idempotent(key = "k", store = "store", scope = "texts")]
async fn k_uuid(store: &MemoryStore, k: uuid::Uuid) -> Result<(), AppError> {
    let _ = &k;
    Ok(())
}

#[cfg(feature = "uuid")]
#[tokio::test]
async fn uuid_key_text_is_unchanged() {
    let s = MemoryStore::new();
    assert_eq!(text(k_uuid(&s, uuid::Uuid::from_bytes(ID))).await, ID_TEXT);
}

/// A call without a key holds no lease of its own: `current_lease()` there is the enclosing
/// call's, if any (documented at `Call::unkeyed`). It is not hidden, since transactional calls
/// nested under it need the enclosing call's lease (their claims and marks go with its savepoint).
#[idempotent(key = "request", store = "store", scope = "texts.inner")]
async fn inner(store: &MemoryStore, request: Option<Dual>) -> Result<Option<String>, AppError> {
    Ok(idem_runtime::current_lease().map(|l| l.scope().to_owned()))
}

#[idempotent(key = "order", store = "store", scope = "texts.outer")]
async fn outer(store: &MemoryStore, order: u64) -> Result<Option<String>, AppError> {
    inner(store, None).await
}

#[tokio::test]
async fn an_unkeyed_call_holds_no_lease_of_its_own() {
    let s = MemoryStore::new();
    assert_eq!(inner(&s, None).await.unwrap(), None);
    assert_eq!(outer(&s, 1).await.unwrap().as_deref(), Some("texts.outer"));
}

/// A foreign `Display` type whose text is empty or long.
struct Shown(String);

impl fmt::Display for Shown {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[idempotent(key = "k", store = "store", scope = "texts.shown")]
async fn k_shown(store: &MemoryStore, k: Shown) -> Result<(), AppError> {
    let _ = &k;
    Ok(())
}

#[tokio::test]
async fn an_empty_display_is_an_invalid_key_and_a_long_one_is_hashed() {
    let s = MemoryStore::new();
    let out = k_shown(&s, Shown(String::new())).await;
    assert!(
        matches!(
            out,
            Err(AppError::Idem(idem_runtime::Error::InvalidKey { .. }))
        ),
        "{out:?}"
    );
    let long = "x".repeat(idem_runtime::MAX_KEY_LEN + 1);
    let t = text(k_shown(&s, Shown(long))).await;
    assert!(t.starts_with("sha256:"), "{t}");
    let t = text(k_shown(&s, Shown("a\0b".into()))).await;
    assert!(t.starts_with("sha256:"), "{t}");
}
