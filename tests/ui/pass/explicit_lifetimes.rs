use idem_runtime::idempotent;

#[derive(Debug, thiserror::Error)]
enum AppError {
    #[error(transparent)]
    Idem(#[from] idem_runtime::Error),
}

struct Message<'a> {
    id: &'a str,
    body: &'a [u8],
}

#[idempotent(key = "msg.id")]
async fn handle<'a, 'b: 'a>(msg: &'a Message<'b>, tag: &'b str) -> Result<usize, AppError> {
    Ok(msg.body.len() + tag.len())
}

#[idempotent(key = "{tenant}:{msg.id}")]
async fn elided(tenant: &str, msg: Message<'_>) -> Result<(), AppError> {
    let _ = (tenant, msg.body);
    Ok(())
}

fn main() {
    let msg = Message {
        id: "m-1",
        body: b"x",
    };
    let _ = handle(&msg, "t");
    let _ = elided("acme", msg);
}
