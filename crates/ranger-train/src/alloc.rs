//! Allocator tuning for binaries that use mimalloc as their global allocator (feature
//! `mimalloc`). A library never chooses the allocator; `ranger-tune` and the benchmarks do.

/// Keeps freed memory committed for reuse. Training frees and reallocates buffers of hundreds
/// of MB every step (logits, embedding gradients); returning them to the OS makes every step
/// page-fault them back in. Option numbers are mimalloc 2.x's `mi_option_e` (libmimalloc-sys
/// does not name them all; [`purge_delay`] reads one back so a test can check the numbering).
pub fn tune_mimalloc() {
    const MI_OPTION_ARENA_EAGER_COMMIT: i32 = 4;
    const MI_OPTION_ARENA_RESERVE: i32 = 23; // KiB
                                             // Environment variables (MIMALLOC_*) still win: they are what a user sets on purpose.
    let unset = |name: &str| std::env::var_os(name).is_none();
    // SAFETY: setting allocator options has no preconditions.
    unsafe {
        if unset("MIMALLOC_PURGE_DELAY") {
            libmimalloc_sys::mi_option_set(PURGE_DELAY, -1);
        }
        if unset("MIMALLOC_ARENA_EAGER_COMMIT") {
            libmimalloc_sys::mi_option_set(MI_OPTION_ARENA_EAGER_COMMIT, 1);
        }
        if unset("MIMALLOC_ARENA_RESERVE") {
            libmimalloc_sys::mi_option_set(MI_OPTION_ARENA_RESERVE, 8 * 1024 * 1024);
        }
    }
}

/// `mi_option_purge_delay` (15 in mimalloc 2.x; `use_numa_nodes` = 16 is named by the crate).
const PURGE_DELAY: i32 = 15;

/// mimalloc's current purge delay in milliseconds (-1: freed memory is never returned).
pub fn purge_delay() -> i64 {
    const _: () = assert!(PURGE_DELAY + 1 == libmimalloc_sys::mi_option_use_numa_nodes);
    // SAFETY: reading an allocator option has no preconditions.
    unsafe { libmimalloc_sys::mi_option_get(PURGE_DELAY) as i64 }
}
