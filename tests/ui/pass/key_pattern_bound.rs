use idem_runtime::idempotent;

#[derive(Debug, thiserror::Error)]
enum AppError {
    #[error(transparent)]
    Idem(#[from] idem_runtime::Error),
}

struct Json<T>(T);

struct Order {
    id: u64,
    amount: u32,
}

struct Pair {
    left: u64,
    right: u64,
}

#[idempotent(key = "order.id")]
async fn create(Json(order): Json<Order>) -> Result<u32, AppError> {
    Ok(order.amount)
}

#[idempotent(key = "{left}-{right}")]
async fn destructured(Pair { left, right }: Pair) -> Result<u64, AppError> {
    Ok(left + right)
}

#[idempotent(key = "b")]
async fn tuple_pattern((a, b): (u32, u64)) -> Result<u32, AppError> {
    let _ = b;
    Ok(a)
}

fn main() {
    let _ = create(Json(Order { id: 1, amount: 2 }));
    let _ = destructured(Pair { left: 1, right: 2 });
    let _ = tuple_pattern((1, 2));
}
