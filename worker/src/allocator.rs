//! The pipeline allocates and frees buffers of a few hundred KiB per batch. glibc serves those
//! with mmap and unmaps them on free, so every batch pays page faults to zero fresh pages
//! (about a tenth of the pipeline's CPU time in profiles). Raising the thresholds keeps them on
//! the heap, where batch buffers reuse memory. Binaries call `tune` first thing in `main`.

/// Keeps allocations up to 64 MiB on the heap and trims it only past 256 MiB of free space.
pub fn tune() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only adjusts allocator thresholds; it is called before other threads start.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 64 * 1024 * 1024);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 256 * 1024 * 1024);
    }
}
