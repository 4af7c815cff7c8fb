//! A process that forks after making tokens must not issue the same tokens in parent and child:
//! both would pass for the owner of one lease, and both would run. It used to (a per-process
//! nonce and counter, copied by `fork`). The child also needs a watchdog of its own: the parent's
//! thread does not survive `fork`.
//!
//! Its own test binary without libtest's harness, so that no test threads run beside the fork.
#![allow(unsafe_code)] // libc::fork and libc::_exit

use std::collections::HashSet;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use idem_runtime::{Call, Error, MemoryStore, Options, Token, run};

const TOKENS: usize = 2000;

fn tokens() -> Vec<String> {
    (0..TOKENS).map(|_| Token::generate().to_hex()).collect()
}

/// In the child: a lease that must be renewed (the handler outlives three ttls) by the child's own
/// watchdog, checked with a duplicate meanwhile.
fn child_watchdog_works() -> bool {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let store = MemoryStore::new();
        let opts = Options::new("fork::child").ttl(Duration::from_millis(150));
        let (started_tx, started_rx) = tokio::sync::oneshot::channel();
        let slow = run(&store, &opts, Call::new("k"), || async {
            let _ = started_tx.send(());
            tokio::time::sleep(Duration::from_millis(600)).await;
            Ok::<_, Error>(1u8)
        });
        let dup = async {
            started_rx.await.unwrap();
            tokio::time::sleep(Duration::from_millis(450)).await;
            run(&store, &opts, Call::new("k"), || async {
                Ok::<_, Error>(2u8)
            })
            .await
        };
        let (slow, dup) = tokio::join!(slow, dup);
        slow.is_ok() && matches!(dup, Err(Error::InFlight { .. }))
    })
}

fn main() {
    // The parent makes tokens, and starts its watchdog, before it forks.
    let before = tokens();
    let warm: Result<u8, Error> = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(run(
            &MemoryStore::new(),
            &Options::new("fork::parent"),
            Call::new("warm"),
            || async { Ok(0) },
        ));
    warm.unwrap();

    let (mut parent_end, child_end) = UnixStream::pair().unwrap();
    // SAFETY: the only other thread is idem's watchdog, idle (no lease is registered), which the
    // child never touches: it starts a watchdog of its own. The child uses the allocator, which
    // glibc's fork keeps usable, and ends with `_exit`.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork failed");
    if pid == 0 {
        let mut out = child_end;
        for t in tokens() {
            writeln!(out, "{t}").unwrap();
        }
        writeln!(out, "watchdog {}", child_watchdog_works()).unwrap();
        drop(out);
        // SAFETY: the child ends here without running the parent's destructors twice.
        unsafe { libc::_exit(0) };
    }
    drop(child_end);
    let after = tokens();
    let mut child_tokens = HashSet::new();
    let mut child_watchdog = None;
    for line in BufReader::new(&mut parent_end).lines() {
        let line = line.unwrap();
        match line.strip_prefix("watchdog ") {
            Some(ok) => child_watchdog = Some(ok == "true"),
            None => {
                child_tokens.insert(line);
            }
        }
    }
    let mut status = 0;
    // SAFETY: waiting for our own child.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    assert_eq!(child_tokens.len(), TOKENS, "the child's tokens repeat");
    let parent: HashSet<String> = before.into_iter().chain(after).collect();
    let shared = parent.intersection(&child_tokens).count();
    assert_eq!(shared, 0, "{shared} tokens issued in both parent and child");
    assert_eq!(
        child_watchdog,
        Some(true),
        "the child's leases were not renewed"
    );
    println!(
        "fork: parent and child issued {TOKENS} tokens each, none shared; the child's watchdog renewed its lease"
    );
}
