// An `Option` key of an `OptionalKey` type (an optional `Idempotency-Key` header) and a key of a type that is not a
// `KeyPart` but has `Display` (another crate's id, e.g. an older `uuid`).
use idem_runtime::idempotent;

#[derive(Debug, thiserror::Error)]
enum AppError {
    #[error(transparent)]
    Idem(#[from] idem_runtime::Error),
}

/// Stands for a type of another crate: it has `Display`, and cannot implement `KeyPart` there.
pub struct ForeignUuid(u128);

impl std::fmt::Display for ForeignUuid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

pub struct Article {
    pub id: ForeignUuid,
}

#[idempotent(key = "key")]
async fn optional(key: Option<RequestId>) -> Result<u32, AppError> {
    let _ = key;
    Ok(1)
}

#[idempotent(key = "key")]
async fn optional_borrowed(key: &Option<RequestId>) -> Result<u32, AppError> {
    let _ = key;
    Ok(1)
}

#[idempotent(key = "id")]
async fn foreign(id: ForeignUuid) -> Result<u32, AppError> {
    let _ = id;
    Ok(1)
}

#[idempotent(key = "article.id")]
async fn foreign_field(article: &Article) -> Result<u32, AppError> {
    let _ = article;
    Ok(1)
}

#[idempotent(key = "{tenant}:{id}")]
async fn foreign_in_template(tenant: &str, id: ForeignUuid) -> Result<u32, AppError> {
    let _ = (tenant, id);
    Ok(1)
}


/// A header the client may leave out: optional in a template too.
pub struct RequestId(String);

impl idem_runtime::KeyPart for RequestId {
    fn write_key(&self, out: &mut String) {
        self.0.write_key(out)
    }
}

impl idem_runtime::OptionalKey for RequestId {}

#[idempotent(key = "{user}/{request}")]
async fn optional_in_template(user: ForeignUuid, request: Option<RequestId>) -> Result<u32, AppError> {
    let _ = (user, request);
    Ok(1)
}

fn main() {
    let _ = optional_in_template(ForeignUuid(1), None);
    let _ = optional(None);
    let _ = optional_borrowed(&None);
    let _ = foreign(ForeignUuid(1));
    let _ = foreign_field;
    let _ = foreign_in_template("t", ForeignUuid(1));
}
