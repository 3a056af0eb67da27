//! Memory the process freed, given back to the system where the allocator keeps it.

/// Gives freed heap memory back to the system: glibc keeps small freed blocks in its heaps,
/// so a burst of small allocations (the records of cut request heads, a journal's records
/// read at start) would otherwise stay resident for the life of the process.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub fn return_freed_memory() {
    // SAFETY: releases free heap memory; no other effect.
    unsafe { libc::malloc_trim(0) };
}

/// Elsewhere the allocator decides.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn return_freed_memory() {}
