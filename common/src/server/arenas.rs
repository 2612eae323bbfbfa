//! The allocator's arenas.
//!
//! glibc's malloc gives each thread that meets contention an arena of its
//! own, up to 8 per core, and memory freed into one arena is not reused by
//! another. A node runs many short-lived threads (DbSync streams, blocking
//! tasks, RocksDB's background jobs, digests), so freed memory piles up
//! across arenas: a master with 10 slaves and 1 GiB of data peaked at
//! 298 MiB RSS with glibc's default and at 193 MiB with 2 arenas
//! (BENCHMARKS.md, "Master memory").

/// Arenas when the environment does not say (`MALLOC_ARENA_MAX`).
pub const MALLOC_ARENAS: i32 = 2;

/// Caps glibc's malloc arenas at [`MALLOC_ARENAS`], unless
/// `MALLOC_ARENA_MAX` is set (glibc has read it then). Call first thing in
/// `main`, before any thread starts. Returns the cap set, if any.
/// Elsewhere than glibc it does nothing.
pub fn limit_malloc_arenas() -> Option<i32> {
    if std::env::var_os("MALLOC_ARENA_MAX").is_some() {
        return None;
    }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only changes a glibc tunable, and no other thread
        // is allocating this early.
        let ok = unsafe { libc::mallopt(libc::M_ARENA_MAX, MALLOC_ARENAS) };
        (ok == 1).then_some(MALLOC_ARENAS)
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    None
}
