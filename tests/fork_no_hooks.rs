//! A child made without the fork hooks running: `_Fork` (POSIX.1-2024, glibc 2.34+: a fork that
//! is async-signal-safe and runs no `pthread_atfork` handlers), as `libc::syscall(SYS_clone)`
//! does too. The process id is not cached across such a child: it must make tokens of its own
//! and start a watchdog of its own, as a child of `fork` does (`tests/fork.rs`). Before the pid
//! was cached, every token and watchdog lookup read `getpid`, which is right in any child.
//!
//! Its own test binary without libtest's harness, so that no test threads run beside the fork.
#![allow(unsafe_code)] // _Fork and libc::_exit
#![cfg_attr(
    not(all(target_os = "linux", target_env = "gnu")),
    allow(dead_code, unused)
)]

use std::collections::HashSet;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use idem_runtime::{Call, Error, MemoryStore, Options, Token, run};

#[cfg(all(target_os = "linux", target_env = "gnu"))]
unsafe extern "C" {
    /// glibc 2.34+: fork without the atfork handlers.
    fn _Fork() -> libc::pid_t;
}

const TOKENS: usize = 2000;

fn tokens() -> Vec<String> {
    (0..TOKENS).map(|_| Token::generate().to_hex()).collect()
}

/// In the child: a lease that must be renewed (the handler outlives three ttls) by the child's own
/// watchdog, checked with a duplicate meanwhile. Reports how many times the handler ran.
fn child_watchdog_works() -> (bool, u32) {
    static RAN: AtomicU32 = AtomicU32::new(0);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let store = MemoryStore::new();
        let opts = Options::new("fork::child").ttl(Duration::from_millis(150));
        let (started_tx, started_rx) = tokio::sync::oneshot::channel();
        let slow = run(&store, &opts, Call::new("k"), || async {
            RAN.fetch_add(1, Ordering::SeqCst);
            let _ = started_tx.send(());
            tokio::time::sleep(Duration::from_millis(600)).await;
            Ok::<_, Error>(1u8)
        });
        let dup = async {
            started_rx.await.unwrap();
            tokio::time::sleep(Duration::from_millis(450)).await;
            run(&store, &opts, Call::new("k"), || async {
                RAN.fetch_add(1, Ordering::SeqCst);
                Ok::<_, Error>(2u8)
            })
            .await
        };
        let (slow, dup) = tokio::join!(slow, dup);
        (
            slow.is_ok() && matches!(dup, Err(Error::InFlight { .. })),
            RAN.load(Ordering::SeqCst),
        )
    })
}

/// `_Fork` is glibc's (2.34+).
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn main() {
    println!("_Fork: not on this platform");
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
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
    // SAFETY: as in tests/fork.rs; the only other thread is idem's idle watchdog.
    let pid = unsafe { _Fork() };
    assert!(pid >= 0, "_Fork failed");
    if pid == 0 {
        let mut out = child_end;
        for t in tokens() {
            writeln!(out, "{t}").unwrap();
        }
        let (ok, ran) = child_watchdog_works();
        writeln!(out, "watchdog {ok} {ran}").unwrap();
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
            Some(ok) => child_watchdog = Some(ok.to_owned()),
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
    assert!(
        shared == 0 && child_watchdog.as_deref() == Some("true 1"),
        "{shared} tokens issued in both parent and child; the child's watchdog (\"renewed, runs of the handler\"): {child_watchdog:?}"
    );
    println!(
        "_Fork: parent and child issued distinct tokens; the child's watchdog renewed its lease"
    );
}
