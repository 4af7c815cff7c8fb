//! Shared by the integration tests that need a server.
#![allow(dead_code, unreachable_pub)]

use std::fmt::Display;

/// Whether we run under CI, where a missing server is a failure, never a skip.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "0" && v != "false")
}

/// A server this test needs is not reachable: fail under CI, skip loudly on a developer's machine.
/// Returns so the caller can `return` from the test.
pub fn server_missing(service: &str, url: &str, err: impl Display) {
    if in_ci() {
        panic!("{service} at {url} is required under CI=true and is not reachable: {err}");
    }
    eprintln!(
        "\n!!!!! SKIPPED: {service} at {url} is not reachable ({err}).\n!!!!! This test did NOT run. Start {service}, or run `bash .ci/run`, which starts it.\n"
    );
}
