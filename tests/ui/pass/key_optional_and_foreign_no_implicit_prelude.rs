//! Review rev1: the new key forms under `#![no_implicit_prelude]`.
#![no_implicit_prelude]

use ::idem_runtime::{MemoryStore, idempotent};

#[derive(Debug)]
enum AppError {
    Idem(::idem_runtime::Error),
}

impl ::core::convert::From<::idem_runtime::Error> for AppError {
    fn from(e: ::idem_runtime::Error) -> Self {
        AppError::Idem(e)
    }
}

type Res<T> = ::core::result::Result<T, AppError>;

struct ForeignId(u128);

impl ::core::fmt::Display for ForeignId {
    fn fmt(&self, f: &mut ::core::fmt::Formatter<'_>) -> ::core::fmt::Result {
        ::core::write!(f, "{:032x}", self.0)
    }
}

struct RequestId(::std::string::String);

impl ::idem_runtime::KeyPart for RequestId {
    fn write_key(&self, out: &mut ::std::string::String) {
        ::idem_runtime::KeyPart::write_key(&self.0, out)
    }
}

impl ::idem_runtime::OptionalKey for RequestId {}

#[idempotent(key = "key")]
async fn optional(key: ::core::option::Option<RequestId>) -> Res<u32> {
    let _ = key;
    ::core::result::Result::Ok(1)
}

#[idempotent(key = "{tenant}:{id}", store = "store")]
async fn template(store: &MemoryStore, tenant: &str, id: ForeignId) -> Res<u32> {
    let _ = (tenant, id);
    ::core::result::Result::Ok(1)
}

fn main() {
    let _ = optional(::core::option::Option::None);
    let _ = template;
}
