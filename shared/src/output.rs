//! Every output file ftk writes goes through [`Output`]: the one place that
//! decides how a path is written.
//!
//! - A regular file (existing or not) is written into an unnamed file in its
//!   directory (Linux `O_TMPFILE`) and linked into place only when complete,
//!   so a killed process (kill -9, SIGTERM, Ctrl-C) leaves nothing behind.
//!   Where `O_TMPFILE` is not supported, a named `.ftk-tmp.<host>.<pid>.<n>`
//!   file is used instead: it is removed on error, on SIGTERM/SIGINT/SIGHUP,
//!   and by the next ftk run writing to that directory once its owner
//!   process is gone.
//! - A symlink is followed: its target is replaced, the link stays.
//! - `/dev/null`, FIFOs, other character devices and `/dev/stdout` (or any
//!   `/dev/fd/N`) are written through, never replaced.
//! - Anything else that is not a regular file (a directory, a socket, a block
//!   device) is refused.
//! - An output that is the same file (device and inode) as an input this
//!   process opened is refused, unless the caller allowed that one path to be
//!   replaced in place (fed-aggregate's `--global` and `--state`).
//! - A new file gets mode 0666 minus the umask; a replaced file keeps its mode.
//!
//! Callers open every output before the work ([`Output::create`]), fill them,
//! [`Output::finish`] them (fsync), and [`Ready::commit`] them last, so an
//! error anywhere before the commits leaves every destination untouched.

use crate::error::{Error, Result};
use crate::signals;
use std::collections::BTreeMap;
use std::ffi::{CString, OsStr};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Seek, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// An output opened for writing; see the module docs.
pub struct Output {
    /// The path as the user gave it, for messages.
    shown: PathBuf,
    /// Symlinks resolved: the file that will be replaced.
    target: PathBuf,
    sink: Sink,
    /// The inode the caller allows this output to replace in place.
    allowed: Option<(u64, u64)>,
    /// Entry in the registry of open outputs (regular files only).
    key: Option<PathBuf>,
    committed: bool,
}

enum Sink {
    /// Unnamed file in the target's directory, linked in at commit.
    Unnamed { file: File },
    /// Named temporary beside the target (no `O_TMPFILE` here).
    Named {
        file: File,
        tmp: PathBuf,
        slot: usize,
    },
    /// Written through: FIFO, character device, stdout. `spool` holds
    /// positional writes until [`Output::finish`] copies them out in order.
    Stream { file: File, spool: Option<File> },
}

/// A complete, fsynced output waiting for [`Ready::commit`].
pub struct Ready {
    out: Output,
}

/// Files opened as inputs by this process: (device, inode) -> (name, a
/// path that reaches it, to tell a deleted input's reused inode apart).
static INPUTS: Mutex<BTreeMap<(u64, u64), (String, PathBuf)>> = Mutex::new(BTreeMap::new());
/// Regular-file targets opened as outputs by this process.
static OUTPUTS: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());
/// Directories already swept for stale temporaries.
static SWEPT: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());
static TEMP_SEQ: AtomicU64 = AtomicU64::new(0);

/// Remember an opened input (`path` reaches it; `name` is for messages) so
/// that no output may replace it.
pub fn register_input(file: &File, path: &Path, name: &str) {
    if let Ok(m) = file.metadata() {
        if m.file_type().is_file() {
            if let Ok(mut v) = INPUTS.lock() {
                v.insert((m.dev(), m.ino()), (name.to_string(), path.to_path_buf()));
            }
        }
    }
}

fn input_named(dev: u64, ino: u64) -> Option<String> {
    let (name, path) = INPUTS.lock().ok()?.get(&(dev, ino)).cloned()?;
    // Still that file? (An input deleted since may have passed its inode on.)
    let m = fs::metadata(&path).ok()?;
    (m.dev() == dev && m.ino() == ino).then_some(name)
}

/// What `path` names, after following symlinks.
enum Found {
    Missing,
    Regular(fs::Metadata),
    Stream,
    Refused(&'static str),
}

/// Follow `path` through symlinks (relative links resolve against the link's
/// directory); the result may not exist yet.
fn resolve(path: &Path) -> Result<PathBuf> {
    let mut p = path.to_path_buf();
    for _ in 0..40 {
        match fs::symlink_metadata(&p) {
            Ok(m) if m.file_type().is_symlink() => {
                let link = fs::read_link(&p).map_err(|e| Error::io("cannot read link", &p, e))?;
                p = if link.is_absolute() {
                    link
                } else {
                    parent_of(&p).join(link)
                };
            }
            _ => return Ok(p),
        }
    }
    Err(Error::input(format!(
        "{}: too many levels of symbolic links",
        path.display()
    )))
}

fn parent_of(p: &Path) -> PathBuf {
    match p.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

fn classify(target: &Path) -> Result<Found> {
    match fs::metadata(target) {
        Ok(m) => {
            let t = m.file_type();
            Ok(if t.is_file() {
                Found::Regular(m)
            } else if t.is_fifo() || t.is_char_device() {
                Found::Stream
            } else if t.is_dir() {
                Found::Refused("is a directory")
            } else if t.is_block_device() {
                Found::Refused("is a block device")
            } else if t.is_socket() {
                Found::Refused("is a socket")
            } else {
                Found::Refused("is not a regular file")
            })
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Found::Missing),
        Err(e) => Err(Error::io("cannot inspect output", target, e)),
    }
}

/// `/dev/stdout`, `/dev/stderr`, `/dev/fd/N`, `/proc/self/fd/N`: the fd number.
fn fd_alias(path: &Path) -> Option<i32> {
    let s = path.to_str()?;
    match s {
        "/dev/stdout" => return Some(1),
        "/dev/stderr" => return Some(2),
        _ => {}
    }
    let n = s
        .strip_prefix("/dev/fd/")
        .or_else(|| s.strip_prefix("/proc/self/fd/"))?;
    n.parse().ok()
}

fn dup_fd(fd: i32, shown: &Path) -> Result<File> {
    // SAFETY: F_DUPFD_CLOEXEC on any integer is safe; it fails with EBADF
    // when `fd` is not open, and the new descriptor is owned by the File.
    let n = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 3) };
    if n < 0 {
        return Err(Error::io(
            "cannot write to",
            shown,
            io::Error::last_os_error(),
        ));
    }
    // SAFETY: `n` is a fresh descriptor nobody else owns.
    Ok(unsafe { <File as std::os::unix::io::FromRawFd>::from_raw_fd(n) })
}

impl Output {
    /// Check `path` and open it for writing (see the module docs).
    pub fn create(path: &Path) -> Result<Output> {
        Self::create_in_place(path, None)
    }

    /// As [`Output::create`], but `input` (an input of this run) may be the
    /// very file replaced: the documented in-place update of fed-aggregate's
    /// `--global`/`--state`. The input stays readable through its open map.
    pub fn create_in_place(path: &Path, input: Option<&Path>) -> Result<Output> {
        let shown = path.to_path_buf();
        let allowed = input
            .and_then(|p| fs::metadata(p).ok())
            .map(|m| (m.dev(), m.ino()));
        if let Some(fd) = fd_alias(path) {
            return Ok(Output {
                target: shown.clone(),
                sink: Sink::Stream {
                    file: dup_fd(fd, &shown)?,
                    spool: None,
                },
                shown,
                allowed,
                key: None,
                committed: false,
            });
        }
        if path.as_os_str().is_empty() {
            return Err(Error::input("an output path is empty"));
        }
        let target = resolve(path)?;
        let existing = match classify(&target)? {
            Found::Refused(what) => {
                return Err(Error::input(format!(
                    "{}: {what}; ftk writes regular files, FIFOs and character devices only; give a file path",
                    shown.display()
                )))
            }
            Found::Stream => {
                let file = OpenOptions::new()
                    .write(true)
                    .open(&target)
                    .map_err(|e| Error::io("cannot open for writing", &shown, e))?;
                return Ok(Output {
                    shown,
                    target,
                    sink: Sink::Stream { file, spool: None },
                    allowed,
                    key: None,
                    committed: false,
                });
            }
            Found::Regular(m) => Some(m),
            Found::Missing => None,
        };
        if let Some(m) = &existing {
            check_not_input(&shown, m.dev(), m.ino(), allowed)?;
        }
        let key = fs::canonicalize(parent_of(&target))
            .unwrap_or_else(|_| parent_of(&target))
            .join(target.file_name().unwrap_or(OsStr::new("")));
        if OUTPUTS.lock().map(|o| o.contains(&key)).unwrap_or(false) {
            return Err(Error::input(format!(
                "{}: named twice as an output of this run; give each output its own path",
                shown.display()
            )));
        }
        let dir = parent_of(&target);
        sweep_stale(&dir);
        let sink = match open_unnamed(&dir) {
            Ok(file) => Sink::Unnamed { file },
            Err(e) if unnamed_unsupported(&e) => {
                let (file, tmp) = create_named(&dir)?;
                let slot = signals::register_temp(&tmp);
                Sink::Named { file, tmp, slot }
            }
            Err(e) => return Err(Error::io("cannot create a file in", &dir, e)),
        };
        if let Ok(mut o) = OUTPUTS.lock() {
            o.push(key.clone());
        }
        let out = Output {
            shown,
            target,
            sink,
            allowed,
            key: Some(key),
            committed: false,
        };
        if let Some(m) = &existing {
            // Keep the replaced file's permission bits (not setuid/setgid).
            out.file()
                .set_permissions(fs::Permissions::from_mode(m.permissions().mode() & 0o1777))
                .map_err(|e| Error::io("cannot set the mode of", &out.shown, e))?;
        }
        Ok(out)
    }

    /// The path as given, for messages.
    pub fn path(&self) -> &Path {
        &self.shown
    }

    /// True when the destination is written through (FIFO, device, stdout).
    pub fn is_stream(&self) -> bool {
        matches!(self.sink, Sink::Stream { .. })
    }

    /// The file sequential writes go to.
    pub fn file(&self) -> &File {
        match &self.sink {
            Sink::Unnamed { file, .. } | Sink::Named { file, .. } => file,
            Sink::Stream { spool: Some(s), .. } => s,
            Sink::Stream { file, .. } => file,
        }
    }

    /// A file that takes positional writes (`write_at`, `set_len`): the
    /// output itself, or, for a stream, an unnamed spool copied out at
    /// [`Output::finish`].
    pub fn seekable(&mut self) -> Result<&File> {
        if let Sink::Stream { spool, .. } = &mut self.sink {
            if spool.is_none() {
                *spool =
                    Some(tempfile::tempfile().map_err(|e| {
                        Error::io("cannot create a spool file for", &self.shown, e)
                    })?);
            }
        }
        Ok(self.file())
    }

    /// Flush to stable storage (or copy a spool out to its stream).
    pub fn finish(mut self) -> Result<Ready> {
        let shown = self.shown.clone();
        match &mut self.sink {
            Sink::Unnamed { file, .. } | Sink::Named { file, .. } => {
                file.sync_all()
                    .map_err(|e| Error::io("syncing", &shown, e))?;
            }
            Sink::Stream { file, spool } => {
                if let Some(s) = spool {
                    s.rewind().map_err(|e| Error::io("spooling", &shown, e))?;
                    io::copy(s, file).map_err(|e| Error::io("writing", &shown, e))?;
                }
                file.flush().map_err(|e| Error::io("writing", &shown, e))?;
            }
        }
        Ok(Ready { out: self })
    }

    /// Write the whole output sequentially through a buffer and finish it.
    pub fn fill(self, fill: impl FnOnce(&mut dyn Write) -> Result<()>) -> Result<Ready> {
        {
            let mut w = io::BufWriter::with_capacity(1 << 20, self.file());
            fill(&mut w)?;
            w.flush()
                .map_err(|e| Error::io("writing", &self.shown, e))?;
        }
        self.finish()
    }
}

fn check_not_input(shown: &Path, dev: u64, ino: u64, allowed: Option<(u64, u64)>) -> Result<()> {
    if allowed == Some((dev, ino)) {
        return Ok(());
    }
    if let Some(name) = input_named(dev, ino) {
        return Err(Error::input(format!(
            "output {} is the input {name} (same file); writing it would destroy the input: give another output path",
            shown.display()
        )));
    }
    Ok(())
}

impl Ready {
    /// The written file (for a digest of what was written).
    pub fn file(&self) -> &File {
        self.out.file()
    }

    /// Put the output in place: link the unnamed file (or rename the named
    /// temporary) over the target, then fsync the directory.
    pub fn commit(self) -> Result<()> {
        let mut o = self.out;
        if let Sink::Stream { .. } = o.sink {
            o.committed = true;
            return Ok(());
        }
        // The inputs are all open by now: check again before replacing.
        if let Ok(m) = fs::metadata(&o.target) {
            check_not_input(&o.shown, m.dev(), m.ino(), o.allowed)?;
        }
        let dir = parent_of(&o.target);
        match &o.sink {
            Sink::Unnamed { file, .. } => {
                let (tmp, slot) = link_unnamed(file, &dir, &o.shown)?;
                let r = fs::rename(&tmp, &o.target);
                if r.is_err() {
                    let _ = fs::remove_file(&tmp);
                }
                signals::release_temp(slot);
                r.map_err(|e| Error::io("renaming the output onto", &o.shown, e))?;
            }
            Sink::Named { tmp, slot, .. } => {
                fs::rename(tmp, &o.target)
                    .map_err(|e| Error::io("renaming the output onto", &o.shown, e))?;
                signals::release_temp(*slot);
            }
            Sink::Stream { .. } => {}
        }
        o.committed = true;
        if let Ok(d) = File::open(&dir) {
            let _ = d.sync_all();
        }
        Ok(())
    }
}

impl Drop for Output {
    fn drop(&mut self) {
        if let Sink::Named { tmp, slot, .. } = &self.sink {
            if !self.committed {
                let _ = fs::remove_file(tmp);
            }
            signals::release_temp(*slot);
        }
        if let Some(k) = &self.key {
            if let Ok(mut outs) = OUTPUTS.lock() {
                outs.retain(|p| p != k);
            }
        }
    }
}

/// Commit several ready outputs, in order (see the crash window note in the
/// callers that write files belonging together).
pub fn commit_all(ready: Vec<Ready>) -> Result<()> {
    for r in ready {
        r.commit()?;
    }
    Ok(())
}

fn open_unnamed(dir: &Path) -> io::Result<File> {
    // The kernel applies the umask to 0o666, as for any new file.
    OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_TMPFILE)
        .mode(0o666)
        .open(dir)
}

fn unnamed_unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EOPNOTSUPP) | Some(libc::EISDIR) | Some(libc::EINVAL) | Some(libc::ENOSYS)
    )
}

fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname NUL-terminates
    // or truncates within it.
    let r = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len() - 1) };
    if r != 0 {
        return "host".into();
    }
    let n = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..n])
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// `.ftk-tmp.<host>.<pid>.<n>`: the host and pid say whose it is.
fn temp_name(dir: &Path) -> PathBuf {
    let n = TEMP_SEQ.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    dir.join(format!(
        ".ftk-tmp.{}.{}.{n}{nanos:08x}",
        hostname(),
        std::process::id()
    ))
}

fn create_named(dir: &Path) -> Result<(File, PathBuf)> {
    for _ in 0..16 {
        let tmp = temp_name(dir);
        match OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o666)
            .open(&tmp)
        {
            Ok(f) => return Ok((f, tmp)),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(Error::io("cannot create a temporary file in", dir, e)),
        }
    }
    Err(Error::input(format!(
        "cannot create a temporary file in {}: names keep colliding",
        dir.display()
    )))
}

/// Give the unnamed `file` a temporary name in `dir` (registered for signal
/// cleanup until the caller renames it).
fn link_unnamed(file: &File, dir: &Path, shown: &Path) -> Result<(PathBuf, usize)> {
    let src = CString::new(format!("/proc/self/fd/{}", file.as_raw_fd()))
        .map_err(|_| Error::internal("/proc/self/fd path with a NUL byte"))?;
    for _ in 0..16 {
        let tmp = temp_name(dir);
        let dst = CString::new(tmp.as_os_str().as_bytes())
            .map_err(|_| Error::input(format!("{}: path contains a NUL byte", shown.display())))?;
        let slot = signals::register_temp(&tmp);
        // SAFETY: both paths are NUL-terminated C strings that outlive the call.
        let r = unsafe {
            libc::linkat(
                libc::AT_FDCWD,
                src.as_ptr(),
                libc::AT_FDCWD,
                dst.as_ptr(),
                libc::AT_SYMLINK_FOLLOW,
            )
        };
        if r == 0 {
            return Ok((tmp, slot));
        }
        signals::release_temp(slot);
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::AlreadyExists {
            return Err(Error::io("cannot link the output into", dir, e));
        }
    }
    Err(Error::input(format!(
        "cannot name the output in {}: names keep colliding",
        dir.display()
    )))
}

/// Remove `.ftk-tmp.<this host>.<pid>.*` files in `dir` whose process is gone
/// (left by a kill -9 where `O_TMPFILE` was unavailable). Once per directory.
fn sweep_stale(dir: &Path) {
    let key = fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    {
        let Ok(mut s) = SWEPT.lock() else { return };
        if s.contains(&key) {
            return;
        }
        s.push(key);
    }
    let Ok(rd) = fs::read_dir(dir) else { return };
    let host = hostname();
    for e in rd.flatten() {
        let name = e.file_name();
        let Some(rest) = name.to_str().and_then(|n| n.strip_prefix(".ftk-tmp.")) else {
            continue;
        };
        let mut parts = rest.rsplitn(3, '.');
        let (_seq, pid, h) = (parts.next(), parts.next(), parts.next());
        let (Some(pid), Some(h)) = (pid.and_then(|p| p.parse::<i32>().ok()), h) else {
            continue;
        };
        if h != host || pid <= 0 {
            continue;
        }
        // SAFETY: signal 0 only checks whether the process exists.
        let gone = unsafe { libc::kill(pid, 0) } != 0
            && io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH);
        if gone {
            let _ = fs::remove_file(e.path());
        }
    }
}

/// Make sure `dir` exists (creating it) and takes new files, before the
/// work whose results go there.
pub fn probe_dir(dir: &Path) -> Result<()> {
    fs::create_dir_all(dir).map_err(|e| Error::io("cannot create directory", dir, e))?;
    match open_unnamed(dir) {
        Ok(_) => Ok(()),
        Err(e) if unnamed_unsupported(&e) => {
            let (f, tmp) = create_named(dir)?;
            drop(f);
            let _ = fs::remove_file(tmp);
            Ok(())
        }
        Err(e) => Err(Error::io("cannot create files in", dir, e)),
    }
}

/// Make room for `n` more open outputs: a run that stages many files to
/// commit them together (diffuse-synth's PNGs) holds one descriptor each,
/// beyond the common soft limit of 1024. Raises the soft limit toward the
/// hard one; where that is not enough, opening fails with an ordinary error.
pub fn reserve_fds(n: usize) {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: get/setrlimit on a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) != 0 {
            return;
        }
        let want = (n as libc::rlim_t).saturating_add(256);
        if r.rlim_cur < want {
            r.rlim_cur = want.min(r.rlim_max);
            libc::setrlimit(libc::RLIMIT_NOFILE, &r);
        }
    }
}

/// Write `path` through an [`Output`] in one go (open, fill, fsync, commit).
pub fn write_file(path: &Path, fill: impl FnOnce(&mut dyn Write) -> Result<()>) -> Result<()> {
    Output::create(path)?.fill(fill)?.commit()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn count_entries(d: &Path) -> usize {
        fs::read_dir(d).unwrap().count()
    }

    #[test]
    fn new_file_honours_umask_and_replaced_file_keeps_mode() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a");
        write_file(&p, |w| {
            w.write_all(b"one").unwrap();
            Ok(())
        })
        .unwrap();
        // SAFETY: reading the umask needs setting it; restored at once.
        let um = unsafe {
            let u = libc::umask(0o022);
            libc::umask(u);
            u
        };
        assert_eq!(
            fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o666 & !(um as u32)
        );
        fs::set_permissions(&p, fs::Permissions::from_mode(0o640)).unwrap();
        write_file(&p, |w| {
            w.write_all(b"two").unwrap();
            Ok(())
        })
        .unwrap();
        assert_eq!(
            fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o640
        );
        assert_eq!(fs::read(&p).unwrap(), b"two");
        assert_eq!(count_entries(dir.path()), 1);
    }

    #[test]
    fn symlink_target_is_replaced_not_the_link() {
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().join("real");
        fs::write(&real, b"old").unwrap();
        let link = dir.path().join("link");
        symlink("real", &link).unwrap();
        write_file(&link, |w| {
            w.write_all(b"new").unwrap();
            Ok(())
        })
        .unwrap();
        assert!(fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink());
        assert_eq!(fs::read(&real).unwrap(), b"new");
    }

    #[test]
    fn dev_null_and_fifo_are_written_through_and_dirs_refused() {
        write_file(Path::new("/dev/null"), |w| {
            w.write_all(b"x").unwrap();
            Ok(())
        })
        .unwrap();
        assert!(fs::metadata("/dev/null")
            .unwrap()
            .file_type()
            .is_char_device());
        let dir = tempfile::tempdir().unwrap();
        let e = Output::create(dir.path()).err().unwrap().to_string();
        assert!(e.contains("is a directory"), "{e}");
        let fifo = dir.path().join("f");
        let c = CString::new(fifo.as_os_str().as_bytes()).unwrap();
        // SAFETY: valid C string.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let reader = {
            let fifo = fifo.clone();
            std::thread::spawn(move || fs::read(fifo).unwrap())
        };
        let mut o = Output::create(&fifo).unwrap();
        use std::os::unix::fs::FileExt;
        o.seekable().unwrap().write_all_at(b"world", 5).unwrap();
        o.seekable().unwrap().write_all_at(b"hello", 0).unwrap();
        o.finish().unwrap().commit().unwrap();
        assert_eq!(reader.join().unwrap(), b"helloworld");
        assert!(fs::metadata(&fifo).unwrap().file_type().is_fifo());
    }

    #[test]
    fn output_equal_to_an_input_is_refused_unless_allowed() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("in");
        fs::write(&p, b"input").unwrap();
        let f = File::open(&p).unwrap();
        register_input(&f, &p, "in");
        let link = dir.path().join("alias");
        symlink(&p, &link).unwrap();
        let e = Output::create(&link).err().unwrap().to_string();
        assert!(e.contains("is the input"), "{e}");
        write_file(&p, |_| Ok(())).err().unwrap();
        let o = Output::create_in_place(&p, Some(&p)).unwrap();
        o.fill(|w| {
            w.write_all(b"new").unwrap();
            Ok(())
        })
        .unwrap()
        .commit()
        .unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"new");
    }

    #[test]
    fn dropped_output_leaves_nothing_and_stale_temps_are_swept() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("o");
        let o = Output::create(&p).unwrap();
        o.file().write_all_at_end(b"partial");
        drop(o);
        assert_eq!(count_entries(dir.path()), 0);
        // A temp of a dead process on this host, and one of a live process,
        // in a directory this process has not written to (swept once).
        let sub = dir.path().join("sub");
        fs::create_dir(&sub).unwrap();
        let dead = sub.join(format!(".ftk-tmp.{}.{}.1", hostname(), i32::MAX - 1));
        let live = sub.join(format!(".ftk-tmp.{}.{}.1", hostname(), std::process::id()));
        fs::write(&dead, b"x").unwrap();
        fs::write(&live, b"x").unwrap();
        write_file(&sub.join("o"), |_| Ok(())).unwrap();
        assert!(!dead.exists());
        assert!(live.exists());
    }

    trait AtEnd {
        fn write_all_at_end(&self, b: &[u8]);
    }
    impl AtEnd for File {
        fn write_all_at_end(&self, b: &[u8]) {
            let mut f: &File = self;
            f.write_all(b).unwrap();
        }
    }
}
