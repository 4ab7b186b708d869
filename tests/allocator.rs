//! The allocator tuning of ranger-tune sets the options it means to (mimalloc's option numbers
//! are not all named by libmimalloc-sys, so this checks one of them reads back).

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[test]
fn mimalloc_keeps_freed_memory() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_some() {
        return; // the user's setting wins, by design
    }
    ranger_train::alloc::tune_mimalloc();
    assert_eq!(ranger_train::alloc::purge_delay(), -1);
}
