//! One spare pool for both copy engines: drained buffers (buffered copy) and empty pipes
//! (splice) wait in a small per-thread list for the next direction that turns readable, so a
//! busy tunnel reuses warm memory without allocating and an idle one holds none.

use std::cell::RefCell;
use std::thread::LocalKey;

/// A per-thread list of spare `T`s; declare it with `thread_local!`.
pub struct Spares<T>(RefCell<Vec<T>>);

impl<T> Spares<T> {
    pub const fn new() -> Self {
        Self(RefCell::new(Vec::new()))
    }

    /// How many wait on this thread.
    pub fn len(&self) -> usize {
        self.0.borrow().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl<T> Default for Spares<T> {
    fn default() -> Self {
        Self::new()
    }
}

/// A spare from this thread's list, if one waits there.
pub fn take<T: 'static>(list: &'static LocalKey<Spares<T>>) -> Option<T> {
    list.try_with(|spare| spare.0.borrow_mut().pop())
        .ok()
        .flatten()
}

/// Keeps `item` for the next taker, unless `keep` already wait (then it is dropped).
pub fn give_back<T: 'static>(list: &'static LocalKey<Spares<T>>, item: T, keep: usize) {
    let _ = list.try_with(|spare| {
        let mut spare = spare.0.borrow_mut();
        if spare.len() < keep {
            spare.push(item);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    thread_local! {
        static NUMBERS: Spares<u32> = const { Spares::new() };
    }

    #[test]
    fn spares_are_reused_and_bounded() {
        assert_eq!(take(&NUMBERS), None);
        for n in 0..5 {
            give_back(&NUMBERS, n, 3);
        }
        assert_eq!(
            NUMBERS.with(Spares::len),
            3,
            "beyond `keep` they are dropped"
        );
        assert_eq!(take(&NUMBERS), Some(2));
    }
}
