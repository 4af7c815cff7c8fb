//! Keys are often personal data (an e-mail, an account number): idem's errors and logs show a
//! hash of the key, not the key, unless the application opts in with `reveal_keys(true)`. A test
//! binary of its own, because the switch and the log subscriber are process-wide.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use idem_runtime::{Call, Error, MemoryStore, Options, current_lease, reveal_keys, run};

const KEY: &str = "ann.smith@example.com";

/// Everything logged, from every thread (the watchdog's included).
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_are_redacted_in_errors_and_logs_unless_revealed() {
    let logs = Captured::default();
    let writer = logs.clone();
    tracing_subscriber::fmt()
        .with_max_level(tracing::Level::DEBUG)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .init();

    let store = MemoryStore::new();
    // A handler that outlives its max_lease: the watchdog logs a warning about its key.
    let opts = Options::new("redaction::charge")
        .ttl(Duration::from_millis(200))
        .max_lease(Duration::from_millis(300));
    let (held_tx, held_rx) = tokio::sync::oneshot::channel();
    let (finish_tx, finish_rx) = tokio::sync::oneshot::channel::<()>();
    let holder = {
        let (store, opts) = (store.clone(), opts.clone());
        tokio::spawn(async move {
            run(&store, &opts, Call::new(KEY), || async move {
                let _ = held_tx.send(());
                current_lease().unwrap().lost().await;
                let _ = finish_rx.await;
                Ok::<_, Error>(1u8)
            })
            .await
        })
    };
    held_rx.await.unwrap();
    // A duplicate while the key is in flight: an error that names the key.
    let dup: Result<u8, Error> = run(&store, &opts, Call::new(KEY), || async { Ok(2) }).await;
    let err = dup.unwrap_err();
    assert!(matches!(err, Error::InFlight { .. }), "{err:?}");
    let (shown, debugged) = (err.to_string(), format!("{err:?}"));
    assert!(
        !shown.contains("ann") && !debugged.contains("ann"),
        "{shown} / {debugged}"
    );
    assert!(shown.contains("redacted:"), "{shown}");
    // The key is still there for the program.
    assert_eq!(err.key().unwrap().as_str(), KEY);

    finish_tx.send(()).unwrap();
    let _ = holder.await.unwrap();
    let logged = logs.text();
    assert!(
        logged.contains("max_lease"),
        "the watchdog's warning was not logged: {logged}"
    );
    assert!(!logged.contains("ann"), "a key reached the logs: {logged}");
    assert!(logged.contains("redacted:"), "{logged}");

    // Opted in: the key itself.
    reveal_keys(true);
    assert!(err.to_string().contains(KEY));
    reveal_keys(false);
    assert!(!err.to_string().contains(KEY));
}

/// The redacted form of a six-digit order number, as an `InFlight` error shows it.
fn redacted(order: u32) -> String {
    let err = Error::InFlight {
        scope: "orders".into(),
        key: idem_runtime::Key::new(&order).unwrap(),
        retry_after: Duration::from_secs(1),
    };
    let text = err.to_string();
    let start = text.find("redacted:").expect("redacted") + "redacted:".len();
    text[start..start + 12].to_owned()
}

/// Review finding: the redacted form was 48 bits of an unsalted SHA-256 of the key; order ids
/// are small, guessable spaces, and hashing every six-digit candidate recovered the key from an
/// `InFlight` error's text in seconds. It is now a keyed hash (HMAC-SHA-256 under a secret the
/// deployment sets, or a random one per process).
#[test]
fn redacted_keys_cannot_be_recovered_by_hashing_candidates() {
    use sha2::{Digest, Sha256};
    let shown = redacted(424_242);
    let hex = |bytes: &[u8]| bytes.iter().map(|b| format!("{b:02x}")).collect::<String>();
    let recovered = (100_000..1_000_000u32)
        .find(|candidate| hex(&Sha256::digest(candidate.to_string().as_bytes())[..6]) == shown);
    assert_eq!(recovered, None, "the key was recovered from {shown}");
}

/// The same secret in every process of a deployment (`IDEM_REDACTION_KEY`) gives a key the same
/// redacted form in all of their logs; another secret, another form.
#[test]
fn redaction_is_the_same_across_processes_with_one_secret() {
    if let Ok(order) = std::env::var("IDEM_REDACTION_CHILD") {
        println!("REDACTED {}", redacted(order.parse().unwrap()));
        return;
    }
    let child = |secret: &str| {
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "redaction_is_the_same_across_processes_with_one_secret",
                "--nocapture",
            ])
            .env("IDEM_REDACTION_CHILD", "424242")
            .env(idem_runtime::REDACTION_KEY_ENV, secret)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        stdout
            .lines()
            .find_map(|l| l.split_once("REDACTED ").map(|(_, r)| r[..12].to_owned()))
            .unwrap_or_else(|| panic!("no answer from the child: {stdout}"))
    };
    let (a, b, other) = (child("s3cret"), child("s3cret"), child("another"));
    assert_eq!(a, b, "one secret, two processes, two forms");
    assert_ne!(a, other, "two secrets, one form");
}
