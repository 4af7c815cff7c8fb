use idem_runtime::idempotent;
use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
enum AppError {
    #[error(transparent)]
    Idem(#[from] idem_runtime::Error),
}

struct Message {
    order_id: u64,
    header: Header,
}

struct Header {
    id: String,
}

#[derive(Serialize, Deserialize)]
struct Receipt {
    order_id: u64,
}

#[idempotent(key = "msg.order_id")]
async fn handle(msg: Message) -> Result<Receipt, AppError> {
    Ok(Receipt {
        order_id: msg.order_id,
    })
}

#[idempotent(key = "msg.header.id")]
async fn handle_nested(msg: &Message) -> Result<u64, AppError> {
    Ok(msg.order_id)
}

fn main() {
    let msg = Message {
        order_id: 1,
        header: Header { id: "h".into() },
    };
    let _ = handle_nested(&msg);
    let _ = handle(msg);
}
