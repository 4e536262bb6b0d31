//! Named crash points, for crash tests of the commit protocol.
//!
//! `LAMINAR_CRASH_POINT=NAME:N` makes the process abort (as `kill -9` would: no
//! destructors, no flushes) the `N`-th time it passes the point `NAME`. Unset, a point
//! costs one relaxed load. The points are listed in the durability docs.
//!
//! `LAMINAR_PAUSE_POINT=NAME:MS` makes the process sleep `MS` milliseconds each time it
//! passes the pause point `NAME` (`recovery`: before the state directory is recovered),
//! so that tests can look at it in the middle (is `/ready` still 503?).

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

/// Sleeps at pause point `name` when `LAMINAR_PAUSE_POINT=NAME:MS` names it.
pub fn pause(name: &str) {
    static PAUSE: OnceLock<Option<(String, u64)>> = OnceLock::new();
    let armed = PAUSE.get_or_init(|| {
        let spec = std::env::var("LAMINAR_PAUSE_POINT").ok()?;
        let (point, ms) = spec.split_once(':')?;
        Some((point.to_owned(), ms.parse().ok()?))
    });
    if let Some((point, ms)) = armed
        && point == name
    {
        eprintln!("laminar: pause point {name} reached (LAMINAR_PAUSE_POINT); sleeping {ms} ms");
        std::thread::sleep(std::time::Duration::from_millis(*ms));
    }
}
