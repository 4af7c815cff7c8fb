use idem_runtime::idempotent;

#[derive(Debug, thiserror::Error)]
enum AppError {
    #[error(transparent)]
    Idem(#[from] idem_runtime::Error),
}

struct Order {
    id: u64,
    line: u32,
}

#[idempotent(key = "{tenant}:{order.id}")]
async fn two_parts(tenant: &str, order: Order) -> Result<u32, AppError> {
    let _ = tenant;
    Ok(order.line)
}

#[idempotent(key = "order-{tenant}/{order.id}#{ order.line }{{literal}}")]
async fn several_parts(tenant: String, order: &Order) -> Result<(), AppError> {
    let _ = (tenant, order);
    Ok(())
}

fn main() {
    let _ = two_parts("acme", Order { id: 1, line: 2 });
    let order = Order { id: 1, line: 2 };
    let _ = several_parts("acme".into(), &order);
}
