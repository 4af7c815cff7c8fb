//! This process's id, read from the kernel at each call (`getpid`, 0.1-0.2 µs in a virtual
//! machine).
//!
//! It was cached once, and reset in a child of `fork` by a `pthread_atfork` hook. That hook does
//! not run in every child: `_Fork` (POSIX.1-2024, glibc 2.34+), `clone` by system call, and
//! whatever a runtime or sandbox uses in their place copy the memory without it. Such a child
//! kept the parent's id: it issued the parent's very tokens (one lease, two owners: both run),
//! and looked up the parent's watchdog, whose thread does not exist in the child, so its leases
//! lapsed under running handlers and duplicates ran again (`tests/fork_no_hooks.rs`). glibc
//! itself stopped caching the id in `getpid` (2.25) for the same reason. The token nonce and the
//! watchdog are tied to this id: it must be the kernel's.

/// This process's id.
#[inline]
pub(crate) fn current() -> u32 {
    std::process::id()
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_id_is_this_processs() {
        assert_eq!(super::current(), std::process::id());
    }
}
