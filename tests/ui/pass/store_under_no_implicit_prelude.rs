//! Under `#![no_implicit_prelude]` every form compiles: the generated code names everything by an
//! absolute path and carries no tool attribute (`#[diagnostic::...]` needs the tool prelude).
#![no_implicit_prelude]

use ::idem_runtime::sqlx::{Sqlite, Transaction};
use ::idem_runtime::{MemoryStore, SqliteStore, idempotent};
use ::std::string::String;

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

struct Order {
    id: u64,
    cents: u32,
}

#[idempotent(
    key = "order_id",
    ttl = "10m",
    keep = "1d",
    wait = "5s",
    max_lease = "forever",
    max_output = "64KiB"
)]
async fn plain(order_id: u64) -> Res<u64> {
    ::core::result::Result::Ok(order_id)
}

#[idempotent(
    key = "{tenant}:{order.id}",
    fingerprint = "order.cents, tenant",
    store = "store"
)]
async fn template(store: &MemoryStore, tenant: &str, order: Order) -> Res<u32> {
    let _ = tenant;
    ::core::result::Result::Ok(order.cents)
}

#[idempotent(key = "order_id", tx = "tx", store = "store")]
async fn transactional(
    store: &SqliteStore,
    tx: &mut Transaction<'_, Sqlite>,
    order_id: i64,
) -> Res<i64> {
    let _ = store;
    ::core::result::Result::Ok(order_id)
}

struct Service {
    idem: MemoryStore,
    name: String,
}

impl Service {
    #[idempotent(key = "{self.name}:{id}", store = "self.idem", scope = "tests.method")]
    async fn method(&self, id: u64) -> Res<String> {
        ::core::result::Result::Ok(::std::format!("{}-{id}", self.name))
    }

    #[idempotent(
        key = "id",
        store = "::idem_runtime::DefaultStore",
        scope = "tests.assoc",
        crate = "::idem_runtime"
    )]
    async fn assoc(id: u64) -> Res<u64> {
        ::core::result::Result::Ok(id)
    }
}

fn main() {
    let store = MemoryStore::new();
    let _ = plain(1);
    let _ = template(&store, "acme", Order { id: 1, cents: 5 });
    let svc = Service {
        idem: MemoryStore::new(),
        name: String::new(),
    };
    let _ = svc.method(1);
    let _ = Service::assoc(1);
    let _ = transactional;
}
