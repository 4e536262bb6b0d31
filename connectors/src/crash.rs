//! Named crash points, for crash tests of the commit protocol.
//!
//! `LAMINAR_CRASH_POINT=NAME:N` makes the process abort (as `kill -9` would: no
//! destructors, no flushes) the `N`-th time it passes the point `NAME`. Unset, a point
//! costs one relaxed load. The points are listed in the durability docs.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

struct Armed {
    name: String,
    at: u64,
    hits: AtomicU64,
}

fn armed() -> Option<&'static Armed> {
    static ARMED: OnceLock<Option<Armed>> = OnceLock::new();
    ARMED
        .get_or_init(|| {
            let spec = std::env::var("LAMINAR_CRASH_POINT").ok()?;
            let (name, at) = spec.split_once(':')?;
            Some(Armed {
                name: name.to_owned(),
                at: at.parse().ok()?,
                hits: AtomicU64::new(0),
            })
        })
        .as_ref()
}

/// Whether the process is to crash at `name` now: the caller makes what must be
/// visible at that moment visible (e.g. flushes half an epoch) and calls [`crash`].
#[must_use]
pub fn reached(name: &str) -> bool {
    armed().is_some_and(|a| a.name == name && a.hits.fetch_add(1, Ordering::Relaxed) + 1 == a.at)
}

/// Aborts the process at crash point `name`.
pub fn crash(name: &str) -> ! {
    eprintln!("laminar: crash point {name} reached (LAMINAR_CRASH_POINT); aborting");
    std::process::abort()
}

/// Aborts the process if `name` is the armed crash point and this is its N-th pass.
pub fn point(name: &str) {
    if reached(name) {
        crash(name);
    }
}
