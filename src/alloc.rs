//! The binary's global allocator: mimalloc, called the way Rust's own `System` allocator
//! calls malloc.
//!
//! The `mimalloc` crate sends every allocation to `mi_malloc_aligned`, whatever its
//! alignment. In mimalloc 3, that call's fast path covers only blocks up to 1 KiB; a larger
//! block with an ordinary alignment (hyper's 8 KiB read buffer, the ~5 KiB boxed request
//! future, a response's header table) falls to the generic path, which over-allocates by
//! the alignment and moves some blocks to the next size class. Three such blocks per
//! proxied request cost about 2 % of the proxy's instructions (README → Performance).
//! mimalloc already returns every block of 16 bytes or more aligned to 16, and smaller ones
//! aligned to their size, so plain `mi_malloc` is exact for any alignment up to 16 that
//! does not exceed the size. This is the rule `std::alloc::System` applies to malloc.
//! Larger alignments (tokio's 128-byte task cells) still go to `mi_malloc_aligned`.

#![allow(unsafe_code)] // a global allocator cannot be written without it

use std::alloc::{GlobalAlloc, Layout};
use std::ffi::c_void;

use libmimalloc_sys as mi;

/// The alignment mimalloc guarantees for every block of at least this size (its
/// `MI_MAX_ALIGN_SIZE`), and that smaller blocks get up to their size.
const MALLOC_ALIGN: usize = 16;

/// mimalloc as the global allocator; see the module docs for why not `mimalloc::MiMalloc`.
pub struct Mimalloc;

/// Whether plain (unaligned) mimalloc calls give a block this layout can use.
#[inline]
fn plain(align: usize, size: usize) -> bool {
    align <= MALLOC_ALIGN && align <= size
}

// SAFETY: every pointer handed out comes from mimalloc, whose free and realloc accept a
// block from any of its allocation calls, aligned or not; `plain` admits only layouts that
// mimalloc's natural alignment satisfies (see the module docs).
unsafe impl GlobalAlloc for Mimalloc {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: mimalloc's allocation calls have no preconditions beyond a power-of-two
        // alignment, which `Layout` guarantees.
        unsafe {
            if plain(layout.align(), layout.size()) {
                mi::mi_malloc(layout.size()).cast()
            } else {
                mi::mi_malloc_aligned(layout.size(), layout.align()).cast()
            }
        }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as in `alloc`.
        unsafe {
            if plain(layout.align(), layout.size()) {
                mi::mi_zalloc(layout.size()).cast()
            } else {
                mi::mi_zalloc_aligned(layout.size(), layout.align()).cast()
            }
        }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, _layout: Layout) {
        // SAFETY: the caller passes a block this allocator returned.
        unsafe { mi::mi_free(ptr.cast::<c_void>()) }
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: the caller passes a block this allocator returned, with its layout; the
        // new block keeps that alignment (checked against the new size, as in `alloc`).
        unsafe {
            if plain(layout.align(), new_size) {
                mi::mi_realloc(ptr.cast::<c_void>(), new_size).cast()
            } else {
                mi::mi_realloc_aligned(ptr.cast::<c_void>(), new_size, layout.align()).cast()
            }
        }
    }
}

/// `mi_option_purge_delay`'s place in mimalloc's `mi_option_e` (v2 and v3 alike; the
/// `libmimalloc-sys` bindings do not name it). A test checks it against its default.
const MI_OPTION_PURGE_DELAY: std::ffi::c_int = 15;

extern "C" {
    fn mi_option_get(option: std::ffi::c_int) -> std::ffi::c_long;
    fn mi_option_set_default(option: std::ffi::c_int, value: std::ffi::c_long);
}

/// How long mimalloc keeps memory it no longer uses before giving it back to the system,
/// in ms. Its own default is a second, and it gives memory back only from inside later
/// allocations: after a burst (a thousand clients connecting at once, then going quiet
/// and parked, `proxy::keepalive`), the buffers they had used stayed resident for good.
/// At 10 ms, RSS with 1,000 idle connections fell from 29 to 24 MB; request rates with a
/// new connection per request and with keep-alive were unchanged (README → Performance).
const PURGE_DELAY_MS: std::ffi::c_long = 10;

/// Sets the allocator's options, before the first thread starts. `MIMALLOC_PURGE_DELAY` in
/// the environment still wins.
pub fn configure() {
    // SAFETY: plain option setters of the linked mimalloc; no memory is touched.
    unsafe { mi_option_set_default(MI_OPTION_PURGE_DELAY, PURGE_DELAY_MS) }
}

/// The purge delay mimalloc uses, in ms.
pub fn purge_delay_ms() -> std::ffi::c_long {
    // SAFETY: as in `configure`.
    unsafe { mi_option_get(MI_OPTION_PURGE_DELAY) }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::expect_used)]
    use super::*;

    /// The option index is mimalloc's purge delay: before `configure` it reads mimalloc's
    /// default for that option (1,000 ms in v3, 10 in v2), after it the value set.
    #[test]
    fn the_purge_delay_option_is_the_one_set() {
        assert!(
            std::env::var_os("MIMALLOC_PURGE_DELAY").is_none(),
            "MIMALLOC_PURGE_DELAY is set: it overrides the default this test checks; unset it"
        );
        let before = purge_delay_ms();
        assert!(
            before == 1000 || before == 10,
            "option {MI_OPTION_PURGE_DELAY} reads {before}"
        );
        configure();
        assert_eq!(purge_delay_ms(), PURGE_DELAY_MS);
    }

    /// Every layout a program can ask for comes back aligned as asked, usable to its full
    /// size, and survives growing and shrinking with its contents intact: sizes on both
    /// sides of mimalloc's 1 KiB small-block limit and of the 16-byte plain-call rule.
    #[test]
    fn blocks_are_aligned_usable_and_keep_their_contents() {
        let a = Mimalloc;
        let sizes = [1, 7, 8, 12, 16, 24, 48, 100, 1024, 1025, 5464, 8192, 70_000];
        for align in [1, 2, 4, 8, 16, 32, 64, 128, 4096] {
            for &size in &sizes {
                let Ok(layout) = Layout::from_size_align(size, align) else {
                    continue;
                };
                // SAFETY: non-zero-size layouts; each block is freed once, with the layout
                // it has at that point.
                unsafe {
                    let mut p = a.alloc(layout);
                    assert!(!p.is_null());
                    assert_eq!(p as usize % align, 0, "alloc size {size} align {align}");
                    std::ptr::write_bytes(p, 0xa5, size);
                    for new in [size / 2 + 1, size * 3] {
                        let q = a.realloc(p, layout, new);
                        assert!(!q.is_null());
                        assert_eq!(q as usize % align, 0, "realloc {size}->{new} align {align}");
                        let kept = size.min(new);
                        assert!(std::slice::from_raw_parts(q, kept)
                            .iter()
                            .all(|&b| b == 0xa5));
                        a.dealloc(q, Layout::from_size_align(new, align).expect("valid"));
                        p = a.alloc(layout);
                        std::ptr::write_bytes(p, 0xa5, size);
                    }
                    a.dealloc(p, layout);
                    let z = a.alloc_zeroed(layout);
                    assert_eq!(
                        z as usize % align,
                        0,
                        "alloc_zeroed size {size} align {align}"
                    );
                    assert!(std::slice::from_raw_parts(z, size).iter().all(|&b| b == 0));
                    a.dealloc(z, layout);
                }
            }
        }
    }
}
