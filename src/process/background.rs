//! Work that must not take CPU from the data path (a reload's parse and compile: a third of a
//! second for 10,000 branches) runs on a thread of its own at a lower scheduling priority
//! (nice 10: about a tenth of what a busy async worker gets while the cores are contended, all
//! of an idle core otherwise). On Linux the priority is per thread; elsewhere it is unchanged.

/// How much lower than the process the background thread runs (nice value added).
#[cfg(target_os = "linux")]
const NICENESS: i32 = 10;

/// Runs `work` on a new thread at lower priority, inside the caller's tokio runtime (if any),
/// and waits for it. `None` if the thread could not start or panicked.
pub fn run_in_background<T: Send>(name: &str, work: impl FnOnce() -> T + Send) -> Option<T> {
    let runtime = tokio::runtime::Handle::try_current().ok();
    std::thread::scope(|scope| {
        let thread = std::thread::Builder::new()
            .name(name.to_owned())
            .spawn_scoped(scope, move || {
                let _context = runtime.as_ref().map(|r| r.enter());
                lower_this_threads_priority();
                work()
            })
            .ok()?;
        thread.join().ok()
    })
}

#[cfg(target_os = "linux")]
fn lower_this_threads_priority() {
    let thread = rustix::thread::gettid();
    let now = rustix::process::getpriority_process(Some(thread)).unwrap_or(0);
    // Best effort: a thread that stays at the process's priority still works.
    let _ = rustix::process::setpriority_process(Some(thread), now.saturating_add(NICENESS));
}

#[cfg(not(target_os = "linux"))]
fn lower_this_threads_priority() {}

#[cfg(test)]
mod tests {
    #[cfg(target_os = "linux")]
    #[test]
    fn runs_the_work_at_a_lower_priority_and_leaves_the_caller_as_it_was() {
        let caller = rustix::process::getpriority_process(None).unwrap();
        let inside = super::run_in_background("test", || {
            rustix::process::getpriority_process(Some(rustix::thread::gettid())).unwrap()
        });
        assert_eq!(inside, Some((caller + super::NICENESS).min(19)));
        assert_eq!(rustix::process::getpriority_process(None).unwrap(), caller);
    }

    #[test]
    fn a_panic_is_none() {
        assert_eq!(
            super::run_in_background("test", || -> u8 { panic!("boom") }),
            None
        );
    }
}
