//! The sealed trait behind [`Backend`](super::Backend) and the types its methods take. They are
//! `pub` because they appear in a public bound, but this module is private: no user can name or
//! implement them.
#![allow(unreachable_pub)]

use std::sync::Arc;
use std::time::Duration;

use sqlx::Pool;

use super::{DONE, FORGOTTEN, FREE, IN_FLIGHT, InvalidTableName, MAX_TABLE_NAME_LEN, token_of};
use crate::store::{Begin, Token};
use crate::{PgTransaction, StoreError};

/// A PostgreSQL transaction of `library` given to a store on another database.
pub fn not_postgres<DB: Ops>(library: &str) -> StoreError {
    StoreError::Unsupported(format!(
        "the transaction is a PostgreSQL transaction of {library}, but the store is on {}: \
         a transaction of another library reaches only a SqlStore<Postgres>",
        <DB as sqlx::Database>::NAME
    ))
}

/// A validated table name.
#[derive(Debug, Clone)]
pub struct Table {
    /// As given: `name` or `schema.name`.
    pub qualified: String,
    /// The schema with its dot (`"schema."`), or empty.
    pub schema_prefix: String,
    /// The name without its schema.
    pub name: String,
    /// What the table is to the database, whatever its spelling (PostgreSQL: its OID), once
    /// looked up: two stores that spell one table differently take the same advisory locks.
    pub identity: Arc<std::sync::OnceLock<String>>,
}

impl Table {
    pub fn parse(table: &str) -> Result<Table, InvalidTableName> {
        let invalid = || InvalidTableName(table.to_owned());
        let ident = |s: &str| {
            let mut chars = s.chars();
            matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
                && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        };
        if table.len() > MAX_TABLE_NAME_LEN {
            return Err(invalid());
        }
        let (schema, name) = match table.split_once('.') {
            Some((s, n)) => (Some(s), n),
            None => (None, table),
        };
        if !ident(name) || schema.is_some_and(|s| !ident(s)) {
            return Err(invalid());
        }
        Ok(Table {
            qualified: table.to_owned(),
            schema_prefix: schema.map_or(String::new(), |s| format!("{s}.")),
            name: name.to_owned(),
            identity: Arc::default(),
        })
    }

    /// Fill the placeholders of a statement template: `{table}` (as given), `{name}` (without the
    /// schema), `{schema}` (`schema.` or empty) and `{now}` (the database's clock in µs).
    pub fn fill(&self, template: &str, now: &str) -> sqlx::SqlStr {
        use sqlx::SqlSafeStr;
        let sql = template
            .replace("{table}", &self.qualified)
            .replace("{name}", &self.name)
            .replace("{schema}", &self.schema_prefix)
            .replace("{now}", now);
        // Safe: the table name was validated as plain identifiers; everything else is ours.
        sqlx::AssertSqlSafe(Arc::<str>::from(sql)).into_sql_str()
    }
}

/// The row a call addresses.
pub struct At<'a> {
    pub scope: &'a str,
    pub key: &'a str,
}

/// What `begin` asks for, in the table's terms.
pub struct Claim<'a> {
    pub at: At<'a>,
    pub token: Token,
    pub ttl_us: i64,
    pub fingerprint: Option<[u8; 16]>,
    /// Wait at most briefly for a row lock, and answer "in flight" then: the claim is made for a
    /// transaction (on another connection) that may hold that lock itself.
    pub brief_lock_wait: bool,
    /// Who takes the lease (`host:pid`), kept with it for `inspect`.
    pub holder: &'a str,
}

impl Claim<'_> {
    /// The lease this claim takes, with the row's fence.
    pub fn lease(&self, fence: u64) -> crate::store::Lease {
        crate::store::Lease {
            token: self.token,
            fence,
            fingerprint: self.fingerprint.map(crate::Fingerprint),
        }
    }

    /// How long a duplicate should wait before trying again, when a transaction holds the key (its
    /// end is unknown): the lease's ttl, at most a second.
    pub fn retry_hint(&self) -> Duration {
        Duration::from_micros(self.ttl_us.unsigned_abs()).min(Duration::from_secs(1))
    }
}

/// What `complete` writes.
pub struct Mark<'a> {
    pub at: At<'a>,
    pub token: Token,
    /// The lease's fingerprint, kept when the mark has to create the row again.
    pub fingerprint: Option<[u8; 16]>,
    pub output: &'a [u8],
    pub keep_us: i64,
    /// The claim was made in the transaction this mark is written in: its row must be there,
    /// in flight with this token. Where it is not, the transaction was ended under the call (a
    /// handler that rolled it back itself): the mark must not fall back to writing a new row,
    /// which would commit on its own (autocommit) for writes that are gone.
    pub in_tx: bool,
}

/// A row as read back, with its remaining time by the database's clock.
pub struct Current {
    pub state: i16,
    pub token: Vec<u8>,
    pub remaining_us: i64,
    pub fingerprint: Option<Vec<u8>>,
    pub output: Option<Vec<u8>>,
}

/// What a read row tells `begin`.
pub enum Seen {
    /// The answer: done (replay or mismatch) or held by another live lease.
    Answer(Begin),
    /// Free, expired, or held by this very token: claim it.
    Claimable,
}

impl Current {
    pub fn judge(self, claim: &Claim<'_>) -> Result<Seen, StoreError> {
        if self.remaining_us <= 0 || self.state == FREE || self.state == FORGOTTEN {
            return Ok(Seen::Claimable);
        }
        match self.state {
            IN_FLIGHT if token_of(&self.token)? == claim.token => Ok(Seen::Claimable),
            IN_FLIGHT => Ok(Seen::Answer(Begin::InFlight {
                retry_after: Duration::from_micros(self.remaining_us.unsigned_abs()),
            })),
            DONE => {
                if let (Some(stored), Some(asked)) = (&self.fingerprint, &claim.fingerprint)
                    && stored.as_slice() != asked.as_slice()
                {
                    return Ok(Seen::Answer(Begin::Mismatch));
                }
                let fingerprint = match self.fingerprint {
                    None => None,
                    Some(f) => Some(crate::Fingerprint(f.as_slice().try_into().map_err(
                        |_| StoreError::Corrupt(format!("fingerprint of {} bytes", f.len())),
                    )?)),
                };
                match self.output {
                    Some(output) => Ok(Seen::Answer(Begin::Completed {
                        output,
                        fingerprint,
                    })),
                    None => Err(StoreError::Corrupt("done record without output".into())),
                }
            }
            other => Err(StoreError::Corrupt(format!("unknown row state {other}"))),
        }
    }
}

/// The migrations the crate ships for one database: (version, name, SQL). Statements are
/// separated by `;` at the end of a line; placeholders as in [`Table::fill`].
pub type Migrations = &'static [(i64, &'static str, &'static str)];

/// The SQL of one database. Not public API.
#[async_trait::async_trait]
pub trait Ops: sqlx::Database + Sized {
    /// The statements, prepared for one table.
    type Sql: Send + Sync + 'static;
    /// The migrations this crate ships.
    const MIGRATIONS: Migrations;
    /// The statement creating `{table}_migrations`, where applied versions are recorded.
    const MIGRATIONS_TABLE: &'static str;
    /// The database's clock in µs, for `{now}`.
    const NOW: &'static str;

    /// Whether the transactional form claims in the caller's transaction (see `run/tx.rs`).
    const CLAIMS_IN_TX: bool;
    /// Whether that claim holds the whole database's write lock until the transaction ends, even
    /// when the key was in flight (so the transaction must not wait for the key).
    const CLAIM_LOCKS_DATABASE: bool;
    fn prepare(table: &Table) -> Self::Sql;
    /// A small pool with the same settings as `pool`, connecting lazily, for the watchdog's
    /// thread; `None` where it must share `pool` (an in-memory SQLite database).
    fn watchdog_pool(pool: &Pool<Self>) -> Option<Pool<Self>>;
    async fn migrate(pool: &Pool<Self>, table: &Table) -> Result<(), sqlx::Error>;
    async fn begin(
        conn: &mut Self::Connection,
        sql: &Self::Sql,
        claim: &Claim<'_>,
    ) -> Result<Begin, StoreError>;
    /// Claim in the caller's transaction on `conn` (when [`Self::CLAIMS_IN_TX`]).
    async fn begin_in(
        conn: &mut Self::Connection,
        sql: &Self::Sql,
        table: &Table,
        claim: &Claim<'_>,
    ) -> Result<Begin, StoreError>;
    /// [`Self::begin_in`] on a PostgreSQL transaction of another library. Only PostgreSQL runs
    /// it; the others are refused before (see `sql/tx.rs`).
    async fn begin_in_foreign(
        tx: &mut (dyn PgTransaction + '_),
        sql: &Self::Sql,
        table: &Table,
        claim: &Claim<'_>,
    ) -> Result<Begin, StoreError> {
        let _ = (sql, table, claim);
        Err(not_postgres::<Self>(tx.library()))
    }
    /// [`Self::complete`] on a PostgreSQL transaction of another library (as `begin_in_foreign`).
    async fn complete_foreign(
        tx: &mut (dyn PgTransaction + '_),
        sql: &Self::Sql,
        mark: &Mark<'_>,
    ) -> Result<(), StoreError> {
        let _ = (sql, mark);
        Err(not_postgres::<Self>(tx.library()))
    }
    /// The key's row as committed, by a plain read that never waits for a lock (`None`: absent).
    async fn peek(
        conn: &mut Self::Connection,
        sql: &Self::Sql,
        at: &At<'_>,
    ) -> Result<Option<Current>, StoreError>;
    /// A pool for the work the transactional form does outside the caller's transaction (see
    /// `SqlStore::side`); `None` where another pool would reach another database (SQLite not in
    /// a file).
    fn side_pool(pool: &Pool<Self>) -> Option<Pool<Self>>;
    /// Whether the connection is in a transaction, as the server sees it (`None`: it cannot say,
    /// or would refuse a savepoint outside one anyway).
    async fn in_transaction(conn: &mut Self::Connection) -> Result<Option<bool>, StoreError>;
    /// Run one statement of ours that takes no parameters (the savepoints; their names are the
    /// wrapper's own, checked before they get here).
    async fn raw(conn: &mut Self::Connection, sql: String) -> Result<(), sqlx::Error>;
    async fn complete(
        conn: &mut Self::Connection,
        sql: &Self::Sql,
        mark: &Mark<'_>,
    ) -> Result<(), StoreError>;
    async fn release(
        conn: &mut Self::Connection,
        sql: &Self::Sql,
        at: &At<'_>,
        token: Token,
    ) -> Result<(), StoreError>;
    async fn extend(
        conn: &mut Self::Connection,
        sql: &Self::Sql,
        at: &At<'_>,
        token: Token,
        ttl_us: i64,
    ) -> Result<(), StoreError>;
    async fn purge_batch(
        conn: &mut Self::Connection,
        sql: &Self::Sql,
        limit: i64,
    ) -> Result<u64, StoreError>;
}
