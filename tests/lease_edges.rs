//! The lease at its edges, on the real memory store (and the layered store over two): from the
//! moment the store grants it until the mark or the release is written, whatever the caller's
//! thread does; claims whose answer never comes; releases that fail; outputs that cannot be
//! encoded. Where a test needs the store to misbehave once (an answer read late, a reply lost, a
//! release refused), a thin wrapper around the memory store does that one thing. Each test is
//! named after what broke (second outside review).

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use idem_runtime::{
    Begin, BeginRequest, Call, Error, Key, LayeredStore, Lease, MemoryStore, Options, Store,
    StoreError, run,
};

fn counted(runs: &AtomicU32) -> u32 {
    runs.fetch_add(1, Ordering::SeqCst) + 1
}

/// What the wrapper does to the memory store's answers.
#[derive(Default)]
struct Faults {
    /// `begin`, once it granted a lease, blocks the caller's thread this long (a neighbour that
    /// blocked the worker between the store's reply and the wrapper reading it). Once.
    late_grant: Option<Duration>,
    /// `complete` blocks the caller's thread this long before it is sent (a neighbour that blocked
    /// the worker after the handler returned). Once.
    late_mark: Option<Duration>,
    /// `begin` claims, then answers with an error (a reply that timed out). Once.
    grant_then_fail: bool,
    /// `begin` claims, then never answers (the caller gives up). Once.
    grant_then_hang: bool,
    /// The first `release` of the caller fails as a store that dropped its clients would.
    fail_first_release: bool,
    /// Told when `late_grant` blocks the thread (the lease is granted by then).
    on_late_grant: Option<std::sync::mpsc::Sender<()>>,
}

#[derive(Clone)]
struct Faulty {
    store: MemoryStore,
    faults: Arc<std::sync::Mutex<Faults>>,
    /// The watchdog's copy: the same records, no faults.
    clean: bool,
    begins: Arc<AtomicU32>,
}

impl Faulty {
    fn new(store: &MemoryStore, faults: Faults) -> Faulty {
        Faulty {
            store: store.clone(),
            faults: Arc::new(std::sync::Mutex::new(faults)),
            clean: false,
            begins: Arc::default(),
        }
    }

    fn take<T>(&self, f: impl FnOnce(&mut Faults) -> T) -> Option<T> {
        (!self.clean).then(|| f(&mut self.faults.lock().unwrap()))
    }
}

#[async_trait::async_trait]
impl Store for Faulty {
    async fn begin(&self, req: &BeginRequest<'_>) -> Result<Begin, StoreError> {
        self.begins.fetch_add(1, Ordering::SeqCst);
        let answer = self.store.begin(req).await?;
        if matches!(answer, Begin::Acquired(_)) {
            if let Some(Some(d)) = self.take(|f| f.late_grant.take()) {
                if let Some(Some(told)) = self.take(|f| f.on_late_grant.take()) {
                    let _ = told.send(());
                }
                std::thread::sleep(d);
            }
            if self.take(|f| std::mem::take(&mut f.grant_then_fail)) == Some(true) {
                return Err(StoreError::unavailable("the reply timed out"));
            }
            if self.take(|f| std::mem::take(&mut f.grant_then_hang)) == Some(true) {
                std::future::pending::<()>().await;
            }
        }
        Ok(answer)
    }
    async fn complete(
        &self,
        scope: &str,
        key: &Key,
        lease: &Lease,
        output: &[u8],
        keep: Duration,
    ) -> Result<(), StoreError> {
        if let Some(Some(d)) = self.take(|f| f.late_mark.take()) {
            std::thread::sleep(d);
        }
        self.store.complete(scope, key, lease, output, keep).await
    }
    async fn release(&self, scope: &str, key: &Key, lease: &Lease) -> Result<(), StoreError> {
        if self.take(|f| std::mem::take(&mut f.fail_first_release)) == Some(true) {
            return Err(StoreError::unavailable("connection reset by peer"));
        }
        self.store.release(scope, key, lease).await
    }
    async fn extend(
        &self,
        scope: &str,
        key: &Key,
        lease: &Lease,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        self.store.extend(scope, key, lease, ttl).await
    }
    async fn wait(&self, scope: &str, key: &Key, max: Duration) {
        self.store.wait(scope, key, max).await
    }
    fn for_watchdog(&self) -> Arc<dyn Store> {
        Arc::new(Faulty {
            clean: true,
            ..self.clone()
        })
    }
}

/// Duplicates of `key` delivered every 20 ms from another thread (its own runtime, so that a
/// blocked worker of the test's runtime does not hold them up), until `stop`: each counts a run
/// in `runs` if it gets to run the handler.
fn duplicates(
    store: MemoryStore,
    opts: Options,
    key: &'static str,
    runs: Arc<AtomicU32>,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<Vec<String>> {
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let mut seen = Vec::new();
            while !stop.load(Ordering::SeqCst) {
                let out: Result<u32, Error> = run(&store, &opts, Call::new(key), || async {
                    Ok(counted(&runs) + 100)
                })
                .await;
                seen.push(match out {
                    Ok(v) => format!("ok {v}"),
                    Err(Error::InFlight { .. }) => "in flight".to_owned(),
                    Err(e) => format!("{e}"),
                });
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            seen
        })
    })
}

/// Review finding (real brokers, 2 % of handler runs blocking their thread): a claim granted by
/// the store was read by the wrapper 3.5 s later, after its lease had lapsed and a duplicate had
/// taken the key; the first run still ran its effect. A grant read after half its ttl is now
/// renewed (token-checked) before the handler starts, and never run on if it was taken over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grant_read_late_is_confirmed_before_the_handler_runs() {
    let ttl = Duration::from_millis(300);
    let memory = MemoryStore::new();
    let (granted_tx, granted_rx) = std::sync::mpsc::channel();
    let store = Faulty::new(
        &memory,
        Faults {
            late_grant: Some(4 * ttl),
            on_late_grant: Some(granted_tx),
            ..Faults::default()
        },
    );
    let opts = Options::new("edges::late_grant").ttl(ttl);
    let runs = Arc::new(AtomicU32::new(0));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    // The duplicates start once the first call holds the key.
    let dups = {
        let (memory, opts, runs, stop) = (memory.clone(), opts.clone(), runs.clone(), stop.clone());
        std::thread::spawn(move || {
            granted_rx.recv().unwrap();
            duplicates(memory, opts, "order-1", runs, stop)
                .join()
                .unwrap()
        })
    };
    let first: Result<u32, Error> = run(&store, &opts, Call::new("order-1"), || async {
        Ok(counted(&runs))
    })
    .await;
    stop.store(true, Ordering::SeqCst);
    let seen = dups.join().unwrap();
    assert_eq!(
        runs.load(Ordering::SeqCst),
        1,
        "the effect ran twice: the first call ran on a lease that had lapsed (it returned {first:?}; the duplicates saw {seen:?})"
    );
    // The first call found the key taken over by a duplicate: it replays that one's output (or
    // is told the key is in flight, if it asked while the duplicate ran).
    assert!(
        matches!(first, Ok(101) | Err(Error::InFlight { .. })),
        "{first:?}"
    );
}

/// Review finding: the handler wrote its effect, then its done mark waited 3.5 s behind a
/// blocked neighbour while renewal had already stopped (before the mark), so the lease lapsed
/// and a duplicate ran. The lease is now renewed until the mark is written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lease_is_renewed_until_the_mark_is_written() {
    let ttl = Duration::from_millis(300);
    let memory = MemoryStore::new();
    let store = Faulty::new(
        &memory,
        Faults {
            late_mark: Some(4 * ttl),
            ..Faults::default()
        },
    );
    let opts = Options::new("edges::late_mark").ttl(ttl);
    let runs = Arc::new(AtomicU32::new(0));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (started_tx, started_rx) = std::sync::mpsc::channel();
    let dups = {
        let (memory, opts, runs, stop) = (memory.clone(), opts.clone(), runs.clone(), stop.clone());
        std::thread::spawn(move || {
            started_rx.recv().unwrap();
            duplicates(memory, opts, "order-1", runs, stop)
                .join()
                .unwrap()
        })
    };
    let first: Result<u32, Error> = run(&store, &opts, Call::new("order-1"), || async {
        started_tx.send(()).unwrap();
        Ok(counted(&runs))
    })
    .await;
    stop.store(true, Ordering::SeqCst);
    let seen = dups.join().unwrap();
    assert_eq!(first.unwrap(), 1);
    assert_eq!(
        runs.load(Ordering::SeqCst),
        1,
        "a duplicate ran while the mark was on its way: {seen:?}"
    );
}

/// Neither `Serialize` nor `Deserialize` in working order: its `Serialize` panics.
#[derive(Debug, PartialEq)]
struct Bomb(u32);

impl serde::Serialize for Bomb {
    fn serialize<S: serde::Serializer>(&self, _: S) -> Result<S::Ok, S::Error> {
        panic!("Serialize of Bomb panicked");
    }
}

impl<'de> serde::Deserialize<'de> for Bomb {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        u32::deserialize(d).map(Bomb)
    }
}

/// Review finding: an output whose `Serialize` panics after a successful handler unwound
/// through the wrapper before the call was marked as marking, so the key was released and the
/// next delivery ran the effect again. The key is now marked done without an output.
#[tokio::test]
async fn an_output_whose_serialize_panics_keeps_the_key_done() {
    let store = MemoryStore::new();
    let opts = Options::new("edges::serialize_panics");
    let runs = Arc::new(AtomicU32::new(0));
    let first = {
        let (store, opts, runs) = (store.clone(), opts.clone(), runs.clone());
        tokio::spawn(async move {
            run(&store, &opts, Call::new("order-1"), || async {
                Ok::<_, Error>(Bomb(counted(&runs)))
            })
            .await
        })
        .await
    };
    let again: Result<Bomb, Error> = run(&store, &opts, Call::new("order-1"), || async {
        Ok(Bomb(counted(&runs)))
    })
    .await;
    assert_eq!(
        runs.load(Ordering::SeqCst),
        1,
        "the effect ran again after the output's Serialize panicked"
    );
    assert_eq!(
        first
            .expect("the panic of Serialize reached the caller")
            .unwrap(),
        Bomb(1)
    );
    assert!(
        matches!(again, Err(Error::Unreplayable { .. })),
        "{again:?}"
    );
}

/// Review finding: the release after `Err` was tried once; if that one request failed (the
/// server dropped its clients while the handler ran), the key stayed claimed until its lease
/// ended although the store had reconnected. It is now retried in the background.
#[tokio::test]
async fn a_release_that_fails_is_retried() {
    let memory = MemoryStore::new();
    let store = Faulty::new(
        &memory,
        Faults {
            fail_first_release: true,
            ..Faults::default()
        },
    );
    let opts = Options::new("edges::release_retry").ttl(Duration::from_secs(60));
    let failed: Result<u32, Error> = run(&store, &opts, Call::new("order-1"), || async {
        Err(Error::InvalidKey {
            reason: "on purpose",
        })
    })
    .await;
    assert!(
        matches!(failed, Err(Error::InvalidKey { .. })),
        "{failed:?}"
    );
    let runs = AtomicU32::new(0);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    loop {
        let out: Result<u32, Error> = run(&store, &opts, Call::new("order-1"), || async {
            Ok(counted(&runs))
        })
        .await;
        match out {
            Ok(v) => break assert_eq!(v, 1),
            Err(Error::InFlight { .. }) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            other => panic!("the key is still held after its release failed once: {other:?}"),
        }
    }
}

/// Review finding (Redis, and any store whose reply can be lost): a claim whose answer is an
/// error (the reply timed out) may have been made anyway, and kept the key for the whole ttl,
/// held by no one: the redelivery got `InFlight` for ~600 s while nothing ran. Its token is now
/// given back. The same when the caller is cancelled while the claim is in flight.
#[tokio::test]
async fn a_claim_whose_answer_never_comes_is_given_back() {
    for (what, faults) in [
        (
            "an error",
            Faults {
                grant_then_fail: true,
                ..Faults::default()
            },
        ),
        (
            "no answer (cancelled)",
            Faults {
                grant_then_hang: true,
                ..Faults::default()
            },
        ),
    ] {
        let memory = MemoryStore::new();
        let store = Faulty::new(&memory, faults);
        let opts = Options::new("edges::lost_reply").ttl(Duration::from_secs(600));
        let first = tokio::time::timeout(
            Duration::from_millis(200),
            run(&store, &opts, Call::new("order-1"), || async {
                Ok::<u32, Error>(0)
            }),
        )
        .await;
        match (&first, what) {
            (Ok(Err(Error::Unavailable { .. })), "an error") | (Err(_), _) => {}
            other => panic!("{what}: {other:?}"),
        }
        let runs = AtomicU32::new(0);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
        loop {
            let out: Result<u32, Error> = run(&store, &opts, Call::new("order-1"), || async {
                Ok(counted(&runs))
            })
            .await;
            match out {
                Ok(v) => break assert_eq!(v, 1),
                Err(Error::InFlight { .. }) if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(50)).await
                }
                other => panic!("{what}: the key is held by no one: {other:?}"),
            }
        }
    }
}

/// Review finding: a layered store with a memory front spun while it waited on a key held only
/// in the durable store: each round claimed the front, was told "in flight" by the durable
/// store, released the front, and the front's `wait` returned at once; one second of `wait` made
/// 220,000-250,000 durable calls.
#[tokio::test]
async fn waiting_on_a_key_held_only_in_the_durable_store_does_not_spin() {
    let durable_records = MemoryStore::new();
    let durable = Faulty::new(&durable_records, Faults::default());
    let begins = durable.begins.clone();
    // Held in the durable store only (claimed there while the front was down, say).
    let key = Key::new("order-1").unwrap();
    let holder = BeginRequest {
        scope: "edges::spin",
        key: &key,
        token: idem_runtime::Token::generate(),
        ttl: Duration::from_secs(30),
        fingerprint: None,
    };
    assert!(matches!(
        durable_records.begin(&holder).await.unwrap(),
        Begin::Acquired(_)
    ));
    let store = LayeredStore::new(MemoryStore::new(), durable);
    let opts = Options::new("edges::spin").wait(Duration::from_secs(1));
    let out: Result<u32, Error> =
        run(&store, &opts, Call::new("order-1"), || async { Ok(1) }).await;
    assert!(matches!(out, Err(Error::InFlight { .. })), "{out:?}");
    let calls = begins.load(Ordering::SeqCst);
    assert!(
        calls <= 30,
        "one second of waiting made {calls} calls to the durable store"
    );
}
