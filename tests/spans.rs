//! Every call has an `idem.call` span, with its scope, its redacted key, and its outcome and fence
//! once known. A binary of its own: the subscriber is process-wide here, so no other test's calls
//! (without a subscriber) can make tracing cache the span's callsite as disabled.

use std::sync::{Arc, Mutex};

use idem_runtime::{Error, MemoryStore, idempotent};

#[idempotent(key = "order", store = "store", scope = "spans.charge")]
async fn charge(store: &MemoryStore, order: u64) -> Result<u32, Error> {
    let _ = order;
    Ok(5)
}

/// A closed span: its name and its recorded fields.
type Closed = (String, Vec<(String, String)>);

/// The spans a subscriber saw close.
#[derive(Clone, Default)]
struct Spans(Arc<Mutex<Vec<Closed>>>);

struct Fields(Vec<(String, String)>);

impl tracing::field::Visit for Fields {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        self.0.push((field.name().to_owned(), format!("{value:?}")));
    }
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        self.0.push((field.name().to_owned(), value.to_owned()));
    }
}

impl<S> tracing_subscriber::Layer<S> for Spans
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    fn on_new_span(
        &self,
        attrs: &tracing::span::Attributes<'_>,
        id: &tracing::span::Id,
        ctx: tracing_subscriber::layer::Context<'_, S>,
    ) {
        let mut fields = Fields(Vec::new());
        attrs.record(&mut fields);
        ctx.span(id).unwrap().extensions_mut().insert(fields);
    }
    fn on_record(
        &self,
        id: &tracing::span::Id,
        values: &tracing::span::Record<'_>,
        ctx: tracing_subscriber::layer::Context<'_, S>,
    ) {
        let span = ctx.span(id).unwrap();
        let mut ext = span.extensions_mut();
        values.record(ext.get_mut::<Fields>().unwrap());
    }
    fn on_close(&self, id: tracing::span::Id, ctx: tracing_subscriber::layer::Context<'_, S>) {
        let span = ctx.span(&id).unwrap();
        let fields = span.extensions_mut().remove::<Fields>().unwrap();
        self.0
            .lock()
            .unwrap()
            .push((span.name().to_owned(), fields.0));
    }
}

#[test]
fn every_call_has_a_span_with_its_outcome_fence_and_redacted_key() {
    use tracing_subscriber::layer::SubscriberExt;
    let spans = Spans::default();
    let subscriber = tracing_subscriber::registry().with(spans.clone());
    tracing::subscriber::set_global_default(subscriber).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let store = MemoryStore::new();
        charge(&store, 77).await.unwrap();
        charge(&store, 77).await.unwrap();
    });
    let seen = spans.0.lock().unwrap().clone();
    let calls: Vec<_> = seen.iter().filter(|(n, _)| n == "idem.call").collect();
    assert_eq!(calls.len(), 2, "{seen:?}");
    let field = |i: usize, name: &str| {
        calls[i]
            .1
            .iter()
            .rev()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
    };
    assert_eq!(field(0, "outcome").as_deref(), Some("executed"));
    assert_eq!(field(1, "outcome").as_deref(), Some("replayed"));
    assert_eq!(field(0, "scope").as_deref(), Some("spans.charge"));
    assert!(field(0, "fence").is_some(), "{:?}", calls[0]);
    assert!(field(1, "fence").is_none(), "a replay holds no lease");
    let key = field(0, "key").unwrap();
    assert!(key.starts_with("redacted:") && key.len() == 21, "{key}");
}
