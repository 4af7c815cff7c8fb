//! Shadow mode (see [`set_shadow`]): adopt idem without changing behaviour yet.

use std::sync::atomic::{AtomicU8, Ordering};

/// The environment variable that turns shadow mode on at start-up (`1` or `true`), unless
/// [`set_shadow`] was called first.
pub const SHADOW_ENV: &str = "IDEM_SHADOW";

/// 0: not decided yet (the environment decides on first use); 1: off; 2: on.
static SHADOW: AtomicU8 = AtomicU8::new(0);

/// Turn shadow mode on or off for the whole process; it takes effect for calls that begin after
/// it. Shadow mode is for adopting idem without changing behaviour yet: calls are claimed and
/// marked as usual, but nothing is refused or replayed. Where idem would have replayed a done
/// key, refused an in-flight one or a mismatched payload, or failed closed because the store did
/// not answer, the handler runs anyway, and the call is reported as
/// [`CallOutcome::Shadowed`](crate::CallOutcome::Shadowed) with what idem would have done (and
/// counted: `idem_shadow_total{scope, would}` with the `metrics` feature). Watch those numbers,
/// then turn it off: from then on duplicates are suppressed. [`SHADOW_ENV`] (`IDEM_SHADOW=1`)
/// turns it on at start-up.
///
/// ```
/// idem_runtime::set_shadow(true);
/// assert!(idem_runtime::shadow());
/// idem_runtime::set_shadow(false);
/// assert!(!idem_runtime::shadow());
/// ```
pub fn set_shadow(on: bool) {
    SHADOW.store(if on { 2 } else { 1 }, Ordering::Relaxed);
}

/// Whether shadow mode is on.
pub fn shadow() -> bool {
    match SHADOW.load(Ordering::Relaxed) {
        0 => {
            let on = std::env::var(SHADOW_ENV)
                .is_ok_and(|v| matches!(v.trim(), "1" | "true" | "yes" | "on"));
            // A concurrent `set_shadow` wins.
            let _ = SHADOW.compare_exchange(
                0,
                if on { 2 } else { 1 },
                Ordering::Relaxed,
                Ordering::Relaxed,
            );
            SHADOW.load(Ordering::Relaxed) == 2
        }
        v => v == 2,
    }
}
