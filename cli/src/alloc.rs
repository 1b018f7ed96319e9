//! Handing a proxy worker's freed memory back to the system when the worker goes idle.
//!
//! jemalloc keeps the pages of freed allocations for up to 10 s (its dirty decay), and only
//! counts that time down while the thread allocates: a worker that served a burst (each
//! request's buffers, hyper's 8 KiB per connection) and then holds thousands of idle
//! keep-alive connections keeps the burst's pages resident. Purging them at once on every
//! free, or from a background thread, costs the 1 MiB case (BENCHMARKS.md); purging once when
//! the worker has nothing to do costs a busy worker nothing.
//!
//! This is the crate's one `unsafe`: jemalloc's controls are reached through its C
//! `mallctl`, which `tikv-jemalloc-ctl` does not wrap for controls that take no value.
#![allow(unsafe_code)]

use std::ffi::{c_void, CStr, CString};

/// Returns the calling thread's cached allocations and its arena's unused pages to the
/// system (`thread.tcache.flush`, then `arena.<its arena>.purge`). Errors are ignored: the
/// memory then stays with the allocator, as it would without this call.
pub fn release_thread_memory() {
    if !control(c"thread.tcache.flush") {
        return;
    }
    let mut arena: u32 = 0;
    let mut len = std::mem::size_of::<u32>();
    // SAFETY: `thread.arena` is an `unsigned` read into `arena`, whose size is passed in
    // `len`; the name is NUL-terminated and nothing is written.
    let read = unsafe {
        tikv_jemalloc_sys::mallctl(
            c"thread.arena".as_ptr(),
            (&mut arena as *mut u32).cast::<c_void>(),
            &mut len,
            std::ptr::null_mut(),
            0,
        )
    };
    if read != 0 {
        return;
    }
    if let Ok(name) = CString::new(format!("arena.{arena}.purge")) {
        control(&name);
    }
}

/// Runs a jemalloc control that neither reads nor writes a value; `true` on success.
fn control(name: &CStr) -> bool {
    // SAFETY: `name` is NUL-terminated; a control that takes no value is given none (all
    // pointers null, length 0), as jemalloc requires.
    let rc = unsafe {
        tikv_jemalloc_sys::mallctl(
            name.as_ptr(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            0,
        )
    };
    rc == 0
}

#[cfg(test)]
mod tests {
    /// The controls exist under these names in the jemalloc this binary links (a renamed
    /// control would make the release a silent no-op).
    #[test]
    fn the_release_controls_exist() {
        let mut keep: Vec<Vec<u8>> = (0..1000).map(|i| vec![i as u8; 4096]).collect();
        keep.truncate(10);
        assert!(super::control(c"thread.tcache.flush"));
        super::release_thread_memory();
        assert_eq!(keep.len(), 10);
    }
}
