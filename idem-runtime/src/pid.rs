//! This process's id without a system call per call: `getpid` costs 0.1-0.2 µs in a virtual
//! machine, more than the rest of a cached duplicate. It is read once, and again in a child made
//! by `fork`, where a fork hook has reset it (the child has none of the parent's threads, the
//! watchdog's included, and must make tokens of its own).

use std::sync::atomic::{AtomicU32, Ordering};

/// The cached id; 0 until read, and again in a forked child.
static PID: AtomicU32 = AtomicU32::new(0);

/// This process's id.
pub(crate) fn current() -> u32 {
    match PID.load(Ordering::Relaxed) {
        0 => refresh(),
        pid => pid,
    }
}

#[cold]
fn refresh() -> u32 {
    let pid = std::process::id();
    // Cached only once the hook that resets it in a forked child is in place. A fork between
    // the two stores below and the hook's run in the child leaves 0 there: the child reads its
    // own id.
    if hook::installed() {
        PID.store(pid, Ordering::Relaxed);
    }
    pid
}

#[cfg(unix)]
#[allow(unsafe_code)]
mod hook {
    use std::sync::OnceLock;

    /// Runs in the child after `fork`, on its only thread: an atomic store (async-signal-safe).
    extern "C" fn in_child() {
        super::PID.store(0, std::sync::atomic::Ordering::Relaxed);
    }

    pub(super) fn installed() -> bool {
        static INSTALLED: OnceLock<bool> = OnceLock::new();
        // SAFETY: `in_child` is an `extern "C" fn()` that lives as long as the program and
        // only stores to an atomic, which is allowed in a forked child of a threaded process.
        *INSTALLED.get_or_init(|| unsafe { libc::pthread_atfork(None, None, Some(in_child)) } == 0)
    }
}

#[cfg(not(unix))]
mod hook {
    /// No `fork` here: the id never changes.
    pub(super) fn installed() -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_cached_id_is_this_processs() {
        assert_eq!(super::current(), std::process::id());
        assert_eq!(super::current(), std::process::id());
    }
}
