//! Gives the system back the memory a config load used and freed. Parsing a large config
//! (10,000 branches: a 1.5 MB file) peaks at several times what the loaded config keeps, and
//! glibc returns freed memory only from the top of its heap: without this the process stays
//! resident at the load's peak (about 2 KiB per branch) until it exits.

/// Asks glibc to return the free pages of every arena (`malloc_trim(0)`). It walks each arena
/// under its lock, so it runs only after a load, off the async workers. Elsewhere (musl,
/// Windows) it does nothing: those allocators return memory themselves or have no such call.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
pub fn release_freed() {
    // SAFETY: malloc_trim takes no pointers and glibc serialises it with every other
    // allocator call; it has no precondition on the caller.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn release_freed() {}

/// Calls [`release_freed`] when dropped, on a blocking thread of the runtime (or here outside
/// one): the last field of something large, so that it runs once the rest is freed. One trim
/// per reload: it walks every allocator arena (tens of milliseconds with 10,000 branches).
pub struct ReleaseOnDrop;

impl Drop for ReleaseOnDrop {
    fn drop(&mut self) {
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => drop(runtime.spawn_blocking(release_freed)),
            Err(_) => release_freed(),
        }
    }
}
