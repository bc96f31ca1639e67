//! Work that must not take CPU from the data path (a reload's parse and compile: a third of a
//! second for 10,000 branches) runs on a thread at the lowest scheduling priority (nice 19):
//! while the cores are busy with tunnels it gets about 1.5 % of what an async worker gets, on an
//! idle core all of it. On Linux the priority is per thread; elsewhere nothing changes.

/// How much lower than the process such a thread runs (nice value added).
#[cfg(target_os = "linux")]
const NICENESS: i32 = 19;

/// Lowers the calling thread's priority, for good (raising it back needs privileges the
/// gateway does not have). Best effort: a thread that stays where it was still works.
#[cfg(target_os = "linux")]
pub fn lower_this_threads_priority() {
    let thread = rustix::thread::gettid();
    let now = rustix::process::getpriority_process(Some(thread)).unwrap_or(0);
    let _ = rustix::process::setpriority_process(Some(thread), now.saturating_add(NICENESS));
}

#[cfg(not(target_os = "linux"))]
pub fn lower_this_threads_priority() {}

#[cfg(test)]
mod tests {
    #[cfg(target_os = "linux")]
    #[test]
    fn only_the_calling_thread_runs_lower() {
        let process = rustix::process::getpriority_process(None).unwrap();
        let inside = std::thread::spawn(|| {
            super::lower_this_threads_priority();
            rustix::process::getpriority_process(Some(rustix::thread::gettid())).unwrap()
        })
        .join()
        .unwrap();
        assert_eq!(inside, (process + super::NICENESS).min(19));
        assert_eq!(rustix::process::getpriority_process(None).unwrap(), process);
    }
}
