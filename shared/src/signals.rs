//! Signal handling that keeps the output guarantees under SIGTERM, SIGINT,
//! SIGHUP (Slurm's scancel and time limit send SIGTERM) and SIGBUS.
//!
//! - Named temporaries (only where `O_TMPFILE` is unavailable, and for the
//!   instant between linking an unnamed output and renaming it) are listed
//!   here; a terminating signal removes them, then the process dies of the
//!   signal as it would have (exit status 128+N).
//! - Memory-mapped inputs are listed with their names: a SIGBUS inside one
//!   (the file was truncated while mapped, e.g. a client upload overwritten
//!   in place) prints one line naming that file, removes the temporaries and
//!   exits 2. A SIGBUS anywhere else keeps its default action.
//!
//! The handlers only read fixed-size tables of atomics and call
//! async-signal-safe functions (`unlink`, `write`, `_exit`, `raise`): no
//! allocation, no locks. Strings handed to the tables are leaked on purpose,
//! so a handler running on another thread never reads freed memory.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicPtr, AtomicUsize, Ordering};
use std::sync::Once;

const TEMPS: usize = 256;
const MAPS: usize = 1 << 14;

static TEMP: [AtomicPtr<libc::c_char>; TEMPS] =
    [const { AtomicPtr::new(std::ptr::null_mut()) }; TEMPS];
static MAP_START: [AtomicUsize; MAPS] = [const { AtomicUsize::new(0) }; MAPS];
static MAP_LEN: [AtomicUsize; MAPS] = [const { AtomicUsize::new(0) }; MAPS];
static MAP_NAME: [AtomicPtr<u8>; MAPS] = [const { AtomicPtr::new(std::ptr::null_mut()) }; MAPS];
static MAP_NAME_LEN: [AtomicUsize; MAPS] = [const { AtomicUsize::new(0) }; MAPS];
static MAP_NEXT: AtomicUsize = AtomicUsize::new(0);
static TOOL: AtomicPtr<u8> = AtomicPtr::new(std::ptr::null_mut());
static TOOL_LEN: AtomicUsize = AtomicUsize::new(0);

static TERM_ONCE: Once = Once::new();
static BUS_ONCE: Once = Once::new();

/// A slot number that refers to nothing (tables full).
pub const NO_SLOT: usize = usize::MAX;

/// The tool name used in messages printed from signal handlers.
pub fn set_tool_name(name: &'static str) {
    TOOL_LEN.store(name.len(), Ordering::Relaxed);
    TOOL.store(name.as_ptr() as *mut u8, Ordering::Release);
}

/// List a named temporary for removal on a terminating signal.
pub fn register_temp(path: &Path) -> usize {
    install_term();
    let Ok(c) = CString::new(path.as_os_str().as_bytes()) else {
        return NO_SLOT;
    };
    let p = c.into_raw();
    for (i, slot) in TEMP.iter().enumerate() {
        if slot
            .compare_exchange(std::ptr::null_mut(), p, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
        {
            return i;
        }
    }
    NO_SLOT
}

/// The temporary is gone or renamed: stop listing it.
pub fn release_temp(slot: usize) {
    if slot < TEMPS {
        TEMP[slot].store(std::ptr::null_mut(), Ordering::Release);
    }
}

/// List a mapped input range so a SIGBUS in it names the file.
pub fn register_mapping(start: usize, len: usize, name: &str) -> usize {
    if len == 0 {
        return NO_SLOT;
    }
    install_bus();
    let name: &'static mut [u8] = Box::leak(name.as_bytes().to_vec().into_boxed_slice());
    let first = MAP_NEXT.fetch_add(1, Ordering::Relaxed);
    for k in 0..MAPS {
        let i = (first + k) % MAPS;
        if MAP_START[i]
            .compare_exchange(0, usize::MAX, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
        {
            MAP_NAME[i].store(name.as_mut_ptr(), Ordering::Relaxed);
            MAP_NAME_LEN[i].store(name.len(), Ordering::Relaxed);
            MAP_LEN[i].store(len, Ordering::Relaxed);
            MAP_START[i].store(start, Ordering::Release);
            return i;
        }
    }
    NO_SLOT
}

/// The mapping is gone: stop listing it.
pub fn release_mapping(slot: usize) {
    if slot < MAPS {
        MAP_LEN[slot].store(0, Ordering::Relaxed);
        MAP_START[slot].store(0, Ordering::Release);
    }
}

fn install_term() {
    TERM_ONCE.call_once(|| {
        for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
            // SAFETY: the handler is async-signal-safe (see module docs); we
            // only replace the default disposition, never a caller's handler.
            unsafe {
                let mut old: libc::sigaction = std::mem::zeroed();
                if libc::sigaction(sig, std::ptr::null(), &mut old) != 0
                    || old.sa_sigaction != libc::SIG_DFL
                {
                    continue;
                }
                let mut sa: libc::sigaction = std::mem::zeroed();
                sa.sa_sigaction = on_term as *const () as usize;
                libc::sigemptyset(&mut sa.sa_mask);
                sa.sa_flags = 0;
                libc::sigaction(sig, &sa, std::ptr::null_mut());
            }
        }
    });
}

/// The SIGBUS action before ours (Rust's runtime installs one for stack
/// overflow detection): faults outside our mappings go back to it.
static OLD_BUS: std::sync::OnceLock<libc::sigaction> = std::sync::OnceLock::new();

fn install_bus() {
    BUS_ONCE.call_once(|| {
        // SAFETY: as for install_term; SA_SIGINFO gives the faulting address.
        // The previous action is kept and restored for faults not ours.
        unsafe {
            let mut old: libc::sigaction = std::mem::zeroed();
            if libc::sigaction(libc::SIGBUS, std::ptr::null(), &mut old) != 0 {
                return;
            }
            let _ = OLD_BUS.set(old);
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_bus as *const () as usize;
            libc::sigemptyset(&mut sa.sa_mask);
            sa.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
            libc::sigaction(libc::SIGBUS, &sa, std::ptr::null_mut());
        }
    });
}

fn unlink_temps() {
    for slot in TEMP.iter() {
        let p = slot.load(Ordering::Acquire);
        if !p.is_null() {
            // SAFETY: registered strings are leaked C strings, never freed.
            unsafe { libc::unlink(p) };
        }
    }
}

fn write_err(b: &[u8]) {
    // SAFETY: write(2) on stderr with a valid buffer.
    unsafe { libc::write(2, b.as_ptr().cast(), b.len()) };
}

extern "C" fn on_term(sig: libc::c_int) {
    unlink_temps();
    // SAFETY: restore the default action and re-raise, so the process ends
    // the way the sender expects (status 128+sig).
    unsafe {
        libc::signal(sig, libc::SIG_DFL);
        libc::raise(sig);
    }
}

extern "C" fn on_bus(sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for SA_SIGINFO handlers.
    let addr = unsafe { (*info).si_addr() } as usize;
    for i in 0..MAPS {
        let start = MAP_START[i].load(Ordering::Acquire);
        let len = MAP_LEN[i].load(Ordering::Relaxed);
        if start == 0 || start == usize::MAX || addr < start || addr >= start + len {
            continue;
        }
        let tool = TOOL.load(Ordering::Acquire);
        if !tool.is_null() {
            // SAFETY: set from a &'static str.
            write_err(unsafe {
                std::slice::from_raw_parts(tool, TOOL_LEN.load(Ordering::Relaxed))
            });
            write_err(b": ");
        }
        write_err(b"error: ");
        let name = MAP_NAME[i].load(Ordering::Relaxed);
        // SAFETY: leaked name bytes of the recorded length.
        write_err(unsafe {
            std::slice::from_raw_parts(name, MAP_NAME_LEN[i].load(Ordering::Relaxed))
        });
        write_err(b": the file shrank while it was being read (truncated or overwritten in place); write uploads under a temporary name and rename them into place, then rerun\n");
        unlink_temps();
        // SAFETY: _exit is async-signal-safe.
        unsafe { libc::_exit(2) };
    }
    // Not one of ours: hand the fault back to the previous action (or the
    // default, which kills the process) by restoring it; returning re-runs
    // the faulting access.
    // SAFETY: sigaction/signal are async-signal-safe.
    unsafe {
        match OLD_BUS.get() {
            Some(old) => {
                libc::sigaction(sig, old, std::ptr::null_mut());
            }
            None => {
                libc::signal(sig, libc::SIG_DFL);
            }
        }
    }
}
