use idem_runtime::{KeyPart, idempotent};

#[derive(Debug, thiserror::Error)]
enum AppError {
    #[error(transparent)]
    Idem(#[from] idem_runtime::Error),
}

struct OrderId(u64);

impl KeyPart for OrderId {
    fn write_key(&self, out: &mut String) {
        out.push_str("order-");
        self.0.write_key(out);
    }
}

struct Order {
    id: OrderId,
}

#[idempotent(key = "id")]
async fn by_id(id: OrderId) -> Result<u64, AppError> {
    Ok(id.0)
}

#[idempotent(key = "{order.id}/{n}")]
async fn in_template(order: &Order, n: u8) -> Result<(), AppError> {
    let _ = (order, n);
    Ok(())
}

fn main() {
    let _ = by_id(OrderId(1));
    let order = Order { id: OrderId(1) };
    let _ = in_template(&order, 1);
}
