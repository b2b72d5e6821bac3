//! Memory tuning of the `pulse` process: mimalloc's purge delay and
//! transparent huge pages, set at start for the pipeline's commands.

/// `mi_option_purge_delay` of mimalloc v3 (its `mimalloc.h`; the Rust
/// bindings name no constant for it). Its default in v3's `options.c` is
/// 1000 (ms; the header still says 10).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
const MI_DEFAULT_PURGE_DELAY: std::ffi::c_long = 1000;

/// How long mimalloc keeps freed memory before returning it to the OS, in
/// milliseconds, for the pipeline.
const PIPELINE_PURGE_DELAY_MS: std::ffi::c_long = 100;

/// The pipeline frees multi-megabyte buffers (source chunks, decoded
/// batches, Parquet pages) at a high rate; with mimalloc's default one
/// second purge delay the freed pages stayed resident and the Kafka path's
/// peak RSS was ~110 MB higher. Returning them at once instead cost an
/// `madvise` per free run, a TLB shootdown on the other core and a page
/// fault per page on reuse (~6% of the file path's CPU in perf). 100 ms
/// keeps the buffers of the next few batches: file path 1M events CPU
/// 1.94 -> 1.89 s, peak RSS 188 -> 217 MB, Kafka path's unchanged.
/// `MIMALLOC_PURGE_DELAY` overrides it. Not for `pulse serve`, whose small
/// per-request buffers churn.
pub fn purge_freed_memory_soon() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_some() {
        return;
    }
    // SAFETY: plain reads and writes of mimalloc's option table, which is
    // initialised before main; the index is checked against its default.
    unsafe {
        if libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY) == MI_DEFAULT_PURGE_DELAY {
            libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, PIPELINE_PURGE_DELAY_MS);
        }
    }
}

/// The pipeline's buffers are allocated and freed by the megabyte; with
/// transparent huge pages (mimalloc asks for them on its arenas) every first
/// touch of a freed-and-returned region zeroed a whole 2 MiB page, however
/// little of it the next buffer used, and a partly used huge page stayed
/// resident whole. Small pages: peak RSS of `pulse run` over 1M events
/// ~291 -> ~235 MB, of `pulse bench --kafka` 512-555 -> 394-440 MB. Linux
/// only; `MIMALLOC_ALLOW_THP` (any value) keeps the system's setting.
pub fn small_pages_only() {
    #[cfg(target_os = "linux")]
    if std::env::var_os("MIMALLOC_ALLOW_THP").is_none() {
        // SAFETY: PR_SET_THP_DISABLE takes plain integer arguments and only
        // sets a flag of this process's memory map; a failure changes nothing.
        unsafe {
            let (on, zero): (libc::c_ulong, libc::c_ulong) = (1, 0);
            libc::prctl(libc::PR_SET_THP_DISABLE, on, zero, zero, zero);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[cfg(target_os = "linux")]
    fn huge_pages_are_turned_off_for_the_process() {
        if std::env::var_os("MIMALLOC_ALLOW_THP").is_some() {
            return;
        }
        let zero: libc::c_ulong = 0;
        // SAFETY: PR_GET_THP_DISABLE reads a flag of this process.
        let get = || unsafe { libc::prctl(libc::PR_GET_THP_DISABLE, zero, zero, zero, zero) };
        small_pages_only();
        assert_eq!(get(), 1);
    }

    #[test]
    fn purge_delay_option_is_the_one_set() {
        if std::env::var_os("MIMALLOC_PURGE_DELAY").is_some() {
            return;
        }
        // SAFETY: reads of mimalloc's option table.
        let before = unsafe { libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY) };
        // The index names the purge delay: no other option defaults to 1000.
        assert_eq!(before, MI_DEFAULT_PURGE_DELAY);
        purge_freed_memory_soon();
        let after = unsafe { libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY) };
        assert_eq!(after, PIPELINE_PURGE_DELAY_MS);
    }
}
