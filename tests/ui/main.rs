//! The trybuild suite of `#[idempotent]`: every mistake in `tests/ui/fail/` must be answered by
//! one error on the user's own code that says what to write instead, and every supported form in
//! `tests/ui/pass/` must compile.
//!
//! Each `tests/ui/fail/*.rs` has its expected compiler output beside it, in a `.stderr` file. After
//! a change to the macro's messages (or a new compiler version), regenerate them with
//!
//! ```text
//! TRYBUILD=overwrite cargo test -p idem-ui
//! ```
//!
//! and read every changed `.stderr` before committing it: a person must check that the message
//! still points at the user's span and helps. Pass cases only need to compile (their `main` is
//! empty).

#[test]
fn ui() {
    // Said outside libtest's capture: the first run builds the cases' dependencies before
    // trybuild prints anything.
    let _ = std::io::Write::write_all(
        &mut std::io::stderr(),
        b"ui: compiling the compile-fail and pass cases with trybuild (the first run also builds their dependencies in target/tests/trybuild)\n",
    );
    let t = trybuild::TestCases::new();
    t.compile_fail("fail/*.rs");
    t.pass("pass/*.rs");
}
