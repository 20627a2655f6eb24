//! Atomic replacement of a file: write a temporary file beside it, fsync it, rename it over the
//! old one, fsync the directory. A crash or an I/O error at any point leaves either the old file
//! or the complete new one, never a mix.
//!
//! The file-system calls go through [`SaveTarget`], so tests can make any of them fail.

use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::{Error, Result};

/// The file-system operations an atomic save uses. [`StdFs`] is the real one; a test double
/// can fail any call, or a write after some number of bytes.
pub trait SaveTarget {
    /// An open file being written.
    type File: Write;
    /// Creates `path`, which must not exist yet.
    fn create_new(&self, path: &Path) -> io::Result<Self::File>;
    /// Flushes the file's data and metadata to the disk (`fsync`).
    fn sync_file(&self, file: &mut Self::File) -> io::Result<()>;
    /// Renames `from` to `to`, replacing `to` atomically.
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    /// Flushes the directory `dir` (so a rename in it survives a power loss).
    fn sync_dir(&self, dir: &Path) -> io::Result<()>;
    /// Removes a file (a failed save's temporary file).
    fn remove_file(&self, path: &Path) -> io::Result<()>;
    /// Asks the system to start writing `len` bytes at `offset` of `file` to the disk now,
    /// without waiting (a hint, so the final sync has less left to do). The default does
    /// nothing.
    fn start_writeback(&self, _file: &mut Self::File, _offset: u64, _len: u64) {}
}

/// The real file system.
#[derive(Debug, Clone, Copy, Default)]
pub struct StdFs;

impl SaveTarget for StdFs {
    type File = File;
    fn create_new(&self, path: &Path) -> io::Result<File> {
        OpenOptions::new().write(true).create_new(true).open(path)
    }
    fn sync_file(&self, file: &mut File) -> io::Result<()> {
        file.sync_all()
    }
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        std::fs::rename(from, to)
    }
    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        #[cfg(unix)]
        {
            File::open(dir)?.sync_all()
        }
        #[cfg(not(unix))]
        {
            // Directories cannot be opened for syncing here; the rename is still atomic.
            let _ = dir;
            Ok(())
        }
    }
    fn remove_file(&self, path: &Path) -> io::Result<()> {
        std::fs::remove_file(path)
    }
    #[cfg(target_os = "linux")]
    fn start_writeback(&self, file: &mut File, offset: u64, len: u64) {
        use std::os::fd::AsRawFd;
        let (Ok(offset), Ok(len)) = (i64::try_from(offset), i64::try_from(len)) else {
            return;
        };
        // SAFETY: `sync_file_range` only takes integers; the descriptor belongs to `file`,
        // which is open for the whole call. Its result is ignored: it is a hint, and the
        // save's `fsync` reports any write error.
        unsafe {
            libc::sync_file_range(file.as_raw_fd(), offset, len, libc::SYNC_FILE_RANGE_WRITE);
        }
    }
}

/// Bytes written between two [`SaveTarget::start_writeback`] hints.
const WRITEBACK_STEP: u64 = 64 << 20;

/// A writer that hints the system to start writing back each [`WRITEBACK_STEP`] bytes as soon
/// as they are written, so the disk works while the rest is produced and the closing `fsync`
/// waits only for the tail (Linux's `sync_file_range`; elsewhere a no-op).
struct Streaming<'a, S: SaveTarget> {
    target: &'a S,
    file: &'a mut S::File,
    written: u64,
    hinted: u64,
}

impl<S: SaveTarget> Write for Streaming<'_, S> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.file.write(buf)?;
        self.written += n as u64;
        if self.written - self.hinted >= WRITEBACK_STEP {
            self.target
                .start_writeback(self.file, self.hinted, self.written - self.hinted);
            self.hinted = self.written;
        }
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

static NEXT_TEMP: AtomicU64 = AtomicU64::new(0);

/// The temporary file a save of `path` writes first: hidden, in the same directory (so the
/// rename stays on one file system), unique per process and call.
///
/// Refuses, before anything is written, a path that cannot be the file saved: one that ends
/// in a path separator (`Path` would otherwise drop the separator and the save would write the
/// whole temporary file before failing at the rename) or that names an existing directory.
pub fn temp_path(path: &Path) -> Result<PathBuf> {
    let text = path.as_os_str().to_string_lossy();
    if text.ends_with('/') || text.ends_with(std::path::MAIN_SEPARATOR) {
        return Err(Error::bad_path(
            io::ErrorKind::InvalidInput,
            format!("cannot save to `{}`", path.display()),
            "it ends in a path separator, so it names a directory, not a file",
        ));
    }
    if path.is_dir() {
        return Err(Error::bad_path(
            io::ErrorKind::IsADirectory,
            format!("cannot save to `{}`", path.display()),
            "it is a directory",
        ));
    }
    let name = path.file_name().ok_or_else(|| {
        Error::bad_path(
            io::ErrorKind::InvalidInput,
            format!("cannot save to `{}`", path.display()),
            "it does not name a file",
        )
    })?;
    let unique = NEXT_TEMP.fetch_add(1, Ordering::Relaxed);
    let mut tmp = std::ffi::OsString::from(".");
    tmp.push(name);
    tmp.push(format!(".{}.{unique}.tmp", std::process::id()));
    Ok(path.with_file_name(tmp))
}

/// Temporary files that earlier saves of `path` left behind because their process died
/// mid-save (killed, or a power loss): `.<name>.<pid>.<n>.tmp` beside `path` whose process is
/// no longer running. The previous checkpoint is intact in that case; these files are only
/// wasted space, and every successful [`write_atomic`] of `path` removes them.
///
/// A file is reported only when its process is known to be gone: on Linux, when
/// `/proc/<pid>` does not exist. Elsewhere, and for this process's own files (another
/// thread may be saving), nothing is reported. A reused pid keeps its file until that process
/// ends too. Processes in another pid namespace (another container saving to the same shared
/// directory) look dead from here: if two such processes save the same checkpoint at once, one
/// may remove the other's temporary file, whose save then fails at its rename with an error and
/// leaves the checkpoint as it was; saving one path from two places at once is a race anyway
/// (the last rename wins).
pub fn stale_temp_files(path: &Path) -> Vec<PathBuf> {
    let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
        return Vec::new();
    };
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let prefix = format!(".{name}.");
    entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let file = e.file_name().into_string().ok()?;
            let middle = file.strip_prefix(&prefix)?.strip_suffix(".tmp")?;
            let (pid, unique) = middle.split_once('.')?;
            let pid: u32 = pid.parse().ok()?;
            unique.parse::<u64>().ok()?;
            (!process_may_be_running(pid)).then(|| dir.join(file))
        })
        .collect()
}

/// False only when process `pid` is known not to exist.
fn process_may_be_running(pid: u32) -> bool {
    if pid == std::process::id() {
        return true;
    }
    if cfg!(target_os = "linux") {
        Path::new("/proc").join(pid.to_string()).exists()
    } else {
        true
    }
}

fn io_error(what: &str, path: &Path, e: io::Error) -> Error {
    Error::io(format!("{what} `{}`", path.display()), e)
}

/// Writes `path` atomically through `target`: `write` fills a buffered writer over a temporary
/// file, which is then synced and renamed over `path`, and the directory synced. On any error
/// before the rename the temporary file is removed and `path` is untouched. After a successful
/// rename, the temporary files of earlier saves of `path` whose process died mid-save
/// ([`stale_temp_files`]) are removed too. Returns what `write` returned.
pub fn write_atomic<S: SaveTarget>(
    target: &S,
    path: &Path,
    write: impl FnOnce(&mut dyn Write) -> Result<u64>,
) -> Result<u64> {
    let tmp = temp_path(path)?;
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let mut file = target
        .create_new(&tmp)
        .map_err(|e| io_error("creating", &tmp, e))?;
    let written = (|| {
        let streaming = Streaming {
            target,
            file: &mut file,
            written: 0,
            hinted: 0,
        };
        let mut w = BufWriter::with_capacity(1 << 20, streaming);
        let n = write(&mut w)?;
        w.flush().map_err(|e| io_error("writing", &tmp, e))?;
        drop(w);
        target
            .sync_file(&mut file)
            .map_err(|e| io_error("syncing", &tmp, e))?;
        Ok(n)
    })();
    drop(file);
    let n = match written {
        Ok(n) => n,
        Err(e) => {
            let _ = target.remove_file(&tmp);
            return Err(e);
        }
    };
    if let Err(e) = target.rename(&tmp, path) {
        let _ = target.remove_file(&tmp);
        return Err(io_error("renaming the new checkpoint over", path, e));
    }
    // The new file is complete and in place: clear what crashed saves left (best effort; a
    // file that cannot be removed is only wasted space).
    for stale in stale_temp_files(path) {
        let _ = target.remove_file(&stale);
    }
    // A failure here only means the rename might not survive a power loss yet.
    target
        .sync_dir(&dir)
        .map_err(|e| io_error("syncing the directory", &dir, e))?;
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;

    /// A target whose files go nowhere and which records the writeback hints.
    #[derive(Default)]
    struct Hints(RefCell<Vec<(u64, u64)>>);

    impl SaveTarget for Hints {
        type File = io::Sink;
        fn create_new(&self, _: &Path) -> io::Result<io::Sink> {
            Ok(io::sink())
        }
        fn sync_file(&self, _: &mut io::Sink) -> io::Result<()> {
            Ok(())
        }
        fn rename(&self, _: &Path, _: &Path) -> io::Result<()> {
            Ok(())
        }
        fn sync_dir(&self, _: &Path) -> io::Result<()> {
            Ok(())
        }
        fn remove_file(&self, _: &Path) -> io::Result<()> {
            Ok(())
        }
        fn start_writeback(&self, _: &mut io::Sink, offset: u64, len: u64) {
            self.0.borrow_mut().push((offset, len));
        }
    }

    #[test]
    fn writeback_hints_cover_the_file_in_order_without_gaps() {
        let target = Hints::default();
        let chunk = vec![7u8; 3 << 20];
        let total = 2 * WRITEBACK_STEP + 5 * (3 << 20) + 11;
        let n = write_atomic(&target, Path::new("x.safetensors"), |w| {
            let mut left = total;
            while left > 0 {
                let k = left.min(chunk.len() as u64) as usize;
                w.write_all(&chunk[..k])
                    .map_err(|e| Error::io("writing", e))?;
                left -= k as u64;
            }
            Ok(total)
        })
        .unwrap();
        assert_eq!(n, total);
        let hints = target.0.into_inner();
        assert!(hints.len() >= 2, "{hints:?}");
        let mut at = 0;
        for &(offset, len) in &hints {
            assert_eq!(offset, at, "{hints:?}");
            assert!(len >= WRITEBACK_STEP, "{hints:?}");
            at += len;
        }
        assert!(at <= total && total - at < WRITEBACK_STEP, "{hints:?}");
    }
}
