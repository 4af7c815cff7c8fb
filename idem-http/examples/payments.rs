//! An axum payment service whose `POST` routes are idempotent by their `Idempotency-Key` header.
//!
//! ```text
//! cargo run -p idem-http --example payments
//! curl -i -X POST localhost:3000/payments -H 'Idempotency-Key: k-1' \
//!      -H 'Content-Type: application/json' -d '{"amount": 1200, "currency": "EUR"}'
//! ```
//!
//! Settings, from the environment:
//! - `IDEM_STORE`: unset for the embedded SQLite file `target/idem-payments.sqlite`; `memory`;
//!   a `redis://` URL; a `postgres://` URL.
//! - `PAYMENTS_ADDR`: where to listen (default `127.0.0.1:3000`; port 0 picks a free one). The
//!   address is printed as `listening on <addr>` once the server accepts connections.
//! - `PAYMENTS_LEDGER`: a file each payment made appends one line to (the effect, as a bank
//!   would see it).
//! - `PAYMENTS_TTL_MS`: the lease of a request in flight (default 60 000): how long the key of a
//!   request whose server was killed stays blocked.

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::routing::post;
use axum::{Json, Router};
use idem_http::IdempotencyLayer;
use idem_runtime::{MemoryStore, PgStore, RedisStore, SqliteStore, Store, Token};
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

#[derive(Deserialize)]
struct NewPayment {
    amount: u64,
    currency: String,
    /// How long the payment takes (to see a 409 for a request in flight).
    #[serde(default)]
    delay_ms: u64,
    /// Make the bank fail (a 502, not stored: the retry runs).
    #[serde(default)]
    fail: bool,
}

#[derive(Serialize)]
struct Payment {
    id: String,
    amount: u64,
    currency: String,
    status: &'static str,
}

#[derive(Clone)]
struct App {
    ledger: Option<Arc<std::path::PathBuf>>,
}

type Answer = (StatusCode, [(header::HeaderName, String); 1], Json<Payment>);
type Refusal = (StatusCode, Json<serde_json::Value>);

async fn pay(State(app): State<App>, Json(p): Json<NewPayment>) -> Result<Answer, Refusal> {
    if p.currency.len() != 3 {
        let error = serde_json::json!({"error": "currency must be an ISO 4217 code"});
        return Err((StatusCode::BAD_REQUEST, Json(error)));
    }
    tokio::time::sleep(Duration::from_millis(p.delay_ms)).await;
    if p.fail {
        let error = serde_json::json!({"error": "the bank did not answer"});
        return Err((StatusCode::BAD_GATEWAY, Json(error)));
    }
    let id = format!("pay_{}", &Token::generate().to_hex()[..16]);
    if let Some(ledger) = &app.ledger {
        // The effect: one line per payment made, whichever process made it.
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&**ledger)
            .expect("the ledger opens");
        writeln!(file, "{id} {} {}", p.amount, p.currency).expect("the ledger is written");
    }
    let location = [(header::LOCATION, format!("/payments/{id}"))];
    let payment = Payment {
        id,
        amount: p.amount,
        currency: p.currency,
        status: "succeeded",
    };
    Ok((StatusCode::CREATED, location, Json(payment)))
}

async fn store() -> Result<Arc<dyn Store>, Box<dyn std::error::Error>> {
    Ok(match std::env::var("IDEM_STORE").ok().as_deref() {
        None | Some("" | "sqlite") => {
            std::fs::create_dir_all("target")?;
            Arc::new(SqliteStore::open("target/idem-payments.sqlite").await?)
        }
        Some("memory") => Arc::new(MemoryStore::new()),
        Some(url) if url.starts_with("redis://") => Arc::new(RedisStore::from_url(url).await?),
        Some(url) if url.starts_with("postgres://") => {
            let store = PgStore::new(idem_runtime::sqlx::PgPool::connect(url).await?);
            store.migrate().await?;
            Arc::new(store)
        }
        Some(other) => return Err(format!("IDEM_STORE={other}: not a store").into()),
    })
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let ttl = std::env::var("PAYMENTS_TTL_MS")
        .ok()
        .map(|ms| ms.parse().map(Duration::from_millis))
        .transpose()?
        .unwrap_or(Duration::from_secs(60));
    let layer = IdempotencyLayer::new(store().await?, "payments")
        // One key space per account: two accounts that pick the same key never meet.
        .caller(|req| {
            let account = req.headers.get("x-account")?;
            account.to_str().ok().map(str::to_owned)
        })
        .ttl(ttl);
    let app = App {
        ledger: std::env::var_os("PAYMENTS_LEDGER").map(|p| Arc::new(p.into())),
    };
    let router = Router::new()
        .route("/payments", post(pay))
        .route("/refunds", post(pay))
        .layer(layer)
        .with_state(app);
    let addr = std::env::var("PAYMENTS_ADDR").unwrap_or_else(|_| "127.0.0.1:3000".into());
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    println!("listening on {}", listener.local_addr()?);
    axum::serve(listener, router).await?;
    Ok(())
}
