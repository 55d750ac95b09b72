//! `memory::keep_large_blocks_mapped` against glibc itself, in a process of its own (the
//! counters read here are process-wide, so no other test may allocate meanwhile).
#![cfg(all(target_os = "linux", target_env = "gnu"))]

use std::hint::black_box;

/// Blocks the allocator currently serves from mappings of their own.
fn mapped_blocks() -> usize {
    #[allow(unsafe_code)]
    // SAFETY: mallinfo2 only reads the allocator's statistics.
    unsafe { libc::mallinfo2() }.hblks
}

/// Whether a fresh block of `size` bytes gets a mapping of its own.
fn block_is_mapped(size: usize) -> bool {
    let before = mapped_blocks();
    let block = black_box(vec![1u8; size]);
    let mapped = mapped_blocks() > before;
    drop(black_box(block));
    mapped
}

#[test]
fn large_blocks_stay_mapped_after_larger_ones_were_freed() {
    if std::env::var_os("MALLOC_MMAP_THRESHOLD_").is_some()
        || std::env::var_os("GLIBC_TUNABLES").is_some()
    {
        eprintln!("skipped: the environment tunes glibc's malloc");
        return;
    }
    // glibc's default: a 2 MiB block is mapped, until a freed mapped block raises the
    // threshold above it, as a config load does with hundreds of MB.
    assert!(block_is_mapped(2 << 20), "glibc's default threshold");
    drop(black_box(vec![1u8; 8 << 20]));
    assert!(
        !block_is_mapped(2 << 20),
        "freeing an 8 MiB block raised glibc's threshold (the behaviour this guards against)"
    );

    portcullis::memory::keep_large_blocks_mapped();
    drop(black_box(vec![1u8; 8 << 20]));
    // Larger than what the heap kept free above (the threshold only decides how the
    // heap grows), below the 8 MiB glibc would have raised it to.
    assert!(
        block_is_mapped(4 << 20),
        "with the threshold fixed, a 4 MiB block is mapped, and unmapped when freed"
    );
}
