//! Giving freed memory back to the operating system after a config load.
//!
//! Loading a large config allocates far more than it keeps: the YAML event list, the
//! parsed documents and the merged resource set are garbage once the snapshot is
//! published. glibc's allocator keeps those pages mapped, so with 100k consumers the
//! process stayed at 1.1 GiB RSS for 0.5 GiB of live data (docs/benchmarks.md).
//! `malloc_trim` walks the arenas and returns every free page. It is called only
//! after whole-file loads and after a new router is published (Admin and etcd
//! writes to routes), which are rare, never on the request path.
//!
//! Trimming returns only whole free pages. Parsing a config on the thread that then
//! builds the store interleaves the parser's garbage with the store's long-lived
//! allocations, leaving pages partly used (16 MiB of them at 100k consumers), so a
//! whole-file parse runs on a thread of its own: [`in_own_arena`].

use std::sync::atomic::{AtomicBool, Ordering};

/// glibc's default mmap threshold for large blocks, fixed by [`keep_large_blocks_mapped`].
const MMAP_THRESHOLD: i32 = 128 * 1024;

/// Serves every block of 128 KiB or more from its own mapping, for the life of the
/// process, unless the operator tuned it (`MALLOC_MMAP_THRESHOLD_`, `GLIBC_TUNABLES`).
///
/// glibc starts there but raises the threshold each time a mapped block is freed, up
/// to 32 MiB, and its trim threshold with it. Loading the config frees hundreds of
/// MB of such blocks, so afterwards the large blocks of every rebuild (a router's
/// tables, a resized index) came from the heap and, freed between long-lived
/// allocations, stayed resident: +3 MiB after 20 Admin writes at 100k consumers
/// (docs/benchmarks.md, scale). No Check allocates a block that large.
pub fn keep_large_blocks_mapped() {
    let tuned = std::env::var_os("MALLOC_MMAP_THRESHOLD_").is_some()
        || std::env::var("GLIBC_TUNABLES").is_ok_and(|t| t.contains("mmap_threshold"));
    if tuned {
        return;
    }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[allow(unsafe_code)]
    // SAFETY: mallopt sets one allocator parameter under the allocator's lock; it has
    // no preconditions, and a fixed M_MMAP_THRESHOLD in glibc's range is always valid.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
    }
}

/// Returns free heap pages to the OS (glibc); a no-op with other allocators.
pub fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[allow(unsafe_code)]
    // SAFETY: malloc_trim only inspects and unmaps the allocator's own free pages; it
    // is thread-safe (it takes each arena's lock) and has no preconditions.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// [`release_free_memory`] on a blocking thread, after a write replaced a large
/// structure (the router of 10k routes is ~2.5 MiB): freed after the new one was
/// allocated, the old one leaves holes that 10 route writes grew into +9 MiB of RSS
/// (docs/benchmarks.md). Writes in a burst share one pending trim. Not used for the
/// first load, which trims once, after everything is built (`server::serve`).
pub fn release_free_memory_soon() {
    static PENDING: AtomicBool = AtomicBool::new(false);
    if PENDING.swap(true, Ordering::AcqRel) {
        return;
    }
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        PENDING.store(false, Ordering::Release);
        return;
    };
    runtime.spawn_blocking(|| {
        // Cleared first: a publish while this trim runs schedules the next one.
        PENDING.store(false, Ordering::Release);
        let started = std::time::Instant::now();
        release_free_memory();
        tracing::debug!(elapsed = ?started.elapsed(), "returned free heap pages");
    });
}

/// Runs `f` on a thread of its own and returns its result (a panic in `f` is resumed
/// here). glibc gives a new thread its own malloc arena, so what `f` allocates — a
/// config parse's YAML events and parsed documents, hundreds of MB at 100k consumers —
/// never shares pages with what the caller allocates meanwhile, and once freed is
/// returned whole by [`release_free_memory`].
pub fn in_own_arena<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| match s.spawn(f).join() {
        Ok(value) => value,
        Err(panic) => std::panic::resume_unwind(panic),
    })
}
