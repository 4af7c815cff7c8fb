//! "Every call has a span `idem.call`": also a call refused before the store is asked (an empty
//! key, no store, a connection that is not a transaction). Those are recorded on whatever span
//! is current instead: nested in another idempotent call, on the *outer* call's span, whose
//! `outcome` then reads `invalid_key` before its own. (Process-wide subscriber: a binary of its
//! own.)

use std::sync::{Arc, Mutex};

use idem_runtime::{Error, MemoryStore, idempotent};

#[idempotent(key = "code", store = "store", scope = "spans_refused.inner")]
async fn inner(store: &MemoryStore, code: &str) -> Result<u32, Error> {
    let _ = code;
    Ok(2)
}

#[idempotent(key = "order", store = "store", scope = "spans_refused.outer")]
async fn outer(store: &MemoryStore, order: u64) -> Result<u32, Error> {
    let _ = order;
    // A nested call with an empty key: refused (InvalidKey); the outer call goes on.
    assert!(inner(store, "").await.is_err());
    Ok(1)
}

type Closed = (String, Vec<(String, String)>);

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
fn a_refused_nested_call_has_a_span_of_its_own_and_leaves_the_outer_calls_outcome_alone() {
    use tracing_subscriber::layer::SubscriberExt;
    let spans = Spans::default();
    tracing::subscriber::set_global_default(tracing_subscriber::registry().with(spans.clone()))
        .unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let store = MemoryStore::new();
        assert_eq!(outer(&store, 1).await.unwrap(), 1);
    });
    let seen = spans.0.lock().unwrap().clone();
    // Each idem.call span: its scope and every outcome recorded on it.
    let calls: Vec<(String, Vec<String>)> = seen
        .iter()
        .filter(|(n, _)| n == "idem.call")
        .map(|(_, f)| {
            let scope = f
                .iter()
                .find(|(n, _)| n == "scope")
                .map(|(_, v)| v.clone())
                .unwrap_or_default();
            let outcomes = f
                .iter()
                .filter(|(n, _)| n == "outcome")
                .map(|(_, v)| v.clone())
                .collect();
            (scope, outcomes)
        })
        .collect();
    assert_eq!(
        calls,
        [
            (
                "spans_refused.inner".to_owned(),
                vec!["invalid_key".to_owned()]
            ),
            (
                "spans_refused.outer".to_owned(),
                vec!["executed".to_owned()]
            ),
        ],
        "the idem.call spans and the outcomes recorded on them"
    );
}
