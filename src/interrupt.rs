//! Ctrl-C, SIGTERM and SIGHUP. Every output is written through [`crate::io::write_atomic`] (a temporary
//! file renamed into place) while holding [`writing`]; the handler takes the same lock, so it
//! waits for a write in progress to finish and no temporary file is left behind: each output is
//! whole or absent. Then it removes the folder given to [`remove_on_interrupt`] (`clipft demo`
//! without `--dir`), if any, and exits with the signal's status: 128 + its number (130 for
//! Ctrl-C, 143 for SIGTERM).
//!
//! The handler runs on its own thread while the command's threads keep going, so removing the
//! folder races with files they are creating in it (`create_dir_all` of a subfolder recreates
//! the removed folder). Writes into such a folder therefore hold [`writing`] too; the handler
//! keeps the lock until the process ends, so no write starts after the removal. A command that
//! fails because its folder vanished under it ([`finish`]) waits for the handler's exit instead
//! of reporting that failure.

use std::cell::Cell;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard};

static REQUESTED: AtomicBool = AtomicBool::new(false);
static GATE: Mutex<()> = Mutex::new(());
/// The folder an interrupt removes.
static REMOVE: Mutex<Option<PathBuf>> = Mutex::new(None);
/// A file an interrupt removes (a lock file).
static REMOVE_FILE: Mutex<Option<PathBuf>> = Mutex::new(None);
/// What an interrupt says before the exit (how to continue), and the file that must exist for
/// it to hold.
static HINT: Mutex<Option<(&'static str, PathBuf)>> = Mutex::new(None);
/// Folders this run made, removed by an interrupt while empty (deepest first).
static MADE: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

thread_local! {
    /// How many [`Writing`]s this thread holds: nested writes (a generator that writes through
    /// [`crate::io::write_atomic`]) take the lock once.
    static HELD: Cell<usize> = const { Cell::new(0) };
}

/// Proof that no interrupt handler is removing files: see [`writing`].
pub struct Writing {
    _guard: Option<MutexGuard<'static, ()>>,
}

impl Drop for Writing {
    fn drop(&mut self) {
        HELD.with(|h| h.set(h.get() - 1));
    }
}

/// Hold while creating files or folders in a folder given to [`remove_on_interrupt`]. Nests on
/// one thread; other threads wait for it, so do not hold it across parallel work that writes
/// (a rayon task calling [`crate::io::write_atomic`] would wait for its own caller).
pub fn writing() -> Writing {
    if HELD.with(|h| h.get()) > 0 {
        HELD.with(|h| h.set(h.get() + 1));
        return Writing { _guard: None };
    }
    // A panic while writing poisons nothing that matters here: the lock guards no data.
    let guard = GATE.lock().unwrap_or_else(|e| e.into_inner());
    HELD.with(|h| h.set(1));
    Writing {
        _guard: Some(guard),
    }
}

/// Installs the Ctrl-C / SIGTERM / SIGHUP handler described in the module docs, once per
/// process (later calls do nothing). A handler a library caller set before stays called.
pub fn install() {
    static INSTALLED: std::sync::Once = std::sync::Once::new();
    INSTALLED.call_once(listen);
}

/// What the handler does, on its own thread, once the first signal arrives: waits for a write
/// in progress, removes what it was given, says the hint, and exits with `128 + signal` (130
/// for Ctrl-C, 143 for SIGTERM, 129 for SIGHUP: what a shell reports for a process the signal
/// ended, so scripts can tell an interrupt from a failure).
fn on_signal(status: i32) -> ! {
    REQUESTED.store(true, Ordering::SeqCst);
    let _held = GATE.lock();
    let dir = REMOVE.lock().unwrap_or_else(|e| e.into_inner()).take();
    if let Some(dir) = dir {
        let _ = std::fs::remove_dir_all(&dir);
    }
    if let Some(file) = REMOVE_FILE.lock().unwrap_or_else(|e| e.into_inner()).take() {
        let _ = std::fs::remove_file(file);
    }
    crate::io::remove_empty_folders(&MADE.lock().unwrap_or_else(|e| e.into_inner()));
    if let Some((hint, needs)) = &*HINT.lock().unwrap_or_else(|e| e.into_inner()) {
        if needs.exists() {
            crate::say!("{hint}");
        }
    }
    std::process::exit(status);
}

#[cfg(unix)]
fn listen() {
    // A signal the parent set to be ignored stays ignored (`nohup`, a shell's background job).
    let signals: Vec<i32> = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP]
        .into_iter()
        .filter(|&sig| !ignored(sig))
        .collect();
    if signals.is_empty() {
        return;
    }
    // signal-hook's handler only writes the signal's number to a pipe; this thread reads it.
    let Ok(mut signals) = signal_hook::iterator::Signals::new(&signals) else {
        return;
    };
    let _ = std::thread::Builder::new()
        .name("clipft-signals".into())
        .spawn(move || {
            if let Some(sig) = signals.forever().next() {
                on_signal(128 + sig);
            }
        });
}

/// ctrlc's handler does not say which signal came: every interrupt exits 130.
#[cfg(not(unix))]
fn listen() {
    let _ = ctrlc::set_handler(|| on_signal(130));
}

/// Whether this process ignores `sig` (set by its parent).
#[cfg(unix)]
fn ignored(sig: i32) -> bool {
    // SAFETY: a query (no new action) into a zeroed struct of the right type.
    unsafe {
        let mut old: libc::sigaction = std::mem::zeroed();
        libc::sigaction(sig, std::ptr::null(), &mut old) == 0 && old.sa_sigaction == libc::SIG_IGN
    }
}

/// On Ctrl-C or SIGTERM: removes `dir` (after any write in progress under [`writing`]), then
/// exits with the signal's status (installing the handler if it is not yet).
pub fn remove_on_interrupt(dir: &Path) {
    *REMOVE.lock().unwrap_or_else(|e| e.into_inner()) = Some(dir.to_path_buf());
    install();
}

/// Turns a bus error into a message. Model weights are read through a memory map (as Python's
/// safetensors reads them): a weight file truncated or rewritten while mapped raises SIGBUS on
/// the next read of it, which would otherwise end the process with only "Bus error".
pub fn explain_bus_errors() {
    #[cfg(unix)]
    {
        extern "C" fn on_bus_error(_: libc::c_int) {
            const MSG: &[u8] = b"error: a file clipft was reading through a memory map (a \
model's weights) was truncated or rewritten while in use (bus error); do not replace a model's \
files while clipft runs on them\n";
            // SAFETY: write(2) and _exit(2) are async-signal-safe.
            unsafe {
                libc::write(2, MSG.as_ptr().cast(), MSG.len());
                libc::_exit(135);
            }
        }
        // SAFETY: installs a handler that makes only async-signal-safe calls.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_bus_error as extern "C" fn(libc::c_int) as usize;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(libc::SIGBUS, &action, std::ptr::null_mut());
        }
    }
}

/// On Ctrl-C or SIGTERM: removes `file` (a lock file) before exiting; `None` forgets it (the
/// run removed it itself, and the path may be another run's by now).
pub fn remove_on_interrupt_file(file: Option<&Path>) {
    *REMOVE_FILE.lock().unwrap_or_else(|e| e.into_inner()) = file.map(Path::to_path_buf);
    install();
}

/// On Ctrl-C or SIGTERM, says `hint` (how to continue) before exiting, if file `needs` exists
/// by then (a resume state: an interrupt before the first one is written has nothing to
/// continue from).
pub fn say_on_interrupt(hint: &'static str, needs: &Path) {
    *HINT.lock().unwrap_or_else(|e| e.into_inner()) = Some((hint, needs.to_path_buf()));
    install();
}

/// On Ctrl-C or SIGTERM, removes the folders `made` (those this run created, as
/// [`crate::io::missing_folders`] lists them) where they are still empty, after any lock file.
pub fn remove_empty_on_interrupt(made: &[PathBuf]) {
    *MADE.lock().unwrap_or_else(|e| e.into_inner()) = made.to_vec();
    install();
}

/// Called by the binary once a command has returned: after an interrupt, its result (most often
/// an error about files that were just removed) is not the outcome, the handler's exit is.
pub fn finish() {
    // Set by the handler, which is removing the folder and will exit.
    if REQUESTED.load(Ordering::SeqCst) {
        loop {
            std::thread::park();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writing_nests_on_one_thread_and_excludes_others() {
        let outer = writing();
        let inner = writing();
        // Another thread cannot take the lock while this one holds it, nested or not.
        assert!(std::thread::spawn(|| GATE.try_lock().is_err())
            .join()
            .unwrap());
        drop(inner);
        assert!(std::thread::spawn(|| GATE.try_lock().is_err())
            .join()
            .unwrap());
        drop(outer);
        // The count went back to zero: the next one takes the lock again.
        assert!(writing()._guard.is_some());
    }
}
