//! A thread-local setting changed for the length of one call: the per-thread switches
//! the exactness tests turn fusions off with, and the int8 ops' thread count inside an
//! int8 engine's run.

use std::cell::Cell;
use std::thread::LocalKey;

/// Runs `f` with `key` set to `value` on this thread, and sets it back to what it was
/// after, also when `f` panics.
pub(crate) fn with_local<T: Copy + 'static, R>(
    key: &'static LocalKey<Cell<T>>,
    value: T,
    f: impl FnOnce() -> R,
) -> R {
    struct Restore<T: Copy + 'static>(&'static LocalKey<Cell<T>>, T);
    impl<T: Copy + 'static> Drop for Restore<T> {
        fn drop(&mut self) {
            self.0.set(self.1);
        }
    }
    let _restore = Restore(key, key.replace(value));
    f()
}

#[cfg(test)]
mod tests {
    use super::*;

    thread_local! {
        static SETTING: Cell<u32> = const { Cell::new(1) };
    }

    #[test]
    fn the_setting_holds_inside_and_comes_back_after_a_panic_too() {
        assert_eq!(with_local(&SETTING, 2, || SETTING.get()), 2);
        assert_eq!(SETTING.get(), 1);
        let nested = with_local(&SETTING, 3, || {
            with_local(&SETTING, 4, || SETTING.get()) + SETTING.get()
        });
        assert_eq!((nested, SETTING.get()), (7, 1));
        let panicked = std::panic::catch_unwind(|| with_local(&SETTING, 5, || panic!("inside")));
        assert!(panicked.is_err());
        assert_eq!(SETTING.get(), 1);
    }
}
