//! The process allocator.
//!
//! A forward pass allocates and frees tensors of tens of megabytes by the hundred. glibc and
//! mimalloc's defaults hand such blocks back to the OS soon after they are freed, so the next
//! pass takes page faults and the kernel zeroes the pages again (a fifth of an FD-Align step's
//! CPU time went to `clear_page`). mimalloc told never to purge keeps them for reuse.

/// The allocator the binary and the benchmarks install as `#[global_allocator]`.
pub type Allocator = mimalloc::MiMalloc;

/// mimalloc's `mi_option_purge_delay` (the same index in its v2 and v3 option enums).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Keeps freed memory in the process for reuse (call first thing in `main`).
pub fn keep_freed_memory() {
    // SAFETY: setting an option is thread-safe and takes effect for later frees.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) }
}
