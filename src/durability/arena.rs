//! The state store's arena: an append-only file that is read through memory.
//!
//! [`MappedArena`] maps the file with `mmap` (shared, so the page cache is the only copy
//! and the kernel may write cold pages back and drop them: state larger than RAM pages
//! out instead of getting the process killed). Space is preallocated with
//! `posix_fallocate` before the mapping grows over it, so a full disk is an `ENOSPC` from
//! [`ArenaFile::append`], never a `SIGBUS` on a later write to a hole. [`SimArena`] is the
//! same file on a [`super::storage::SimStorage`], for crash tests.
//!
//! Nothing below the arena's length is ever written again: a checkpoint that records a
//! length `L` sees the same bytes `[0, L)` however many appends follow. That is the
//! checkpoint's isolation (copy-on-write by construction: new versions of a key are
//! appended, never written over the old one), and it lets [`ArenaFile::syncer`] make
//! `[0, L)` durable on another thread while the reactor keeps appending.

use std::fs::{File, OpenOptions};
use std::io;
use std::path::Path;

use memmap2::{Advice, MmapMut, MmapOptions};

/// The mapping grows to at least this many bytes, in multiples of it, and at least
/// doubles each time, up to [`ARENA_GROW_MAX`] at once.
pub const ARENA_GROW_MIN: u64 = 1 << 20;
/// The most one growth step allocates on disk (`posix_fallocate` reserves real blocks).
pub const ARENA_GROW_MAX: u64 = 1 << 30;

/// How the arena is about to be read, for `madvise`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// A scan from start to end (recovery, compaction): read ahead aggressively.
    Sequential,
    /// Point lookups (the steady state): no read-ahead.
    Random,
}

/// Makes the bytes written so far durable; runs on a checkpoint thread.
pub type Syncer = Box<dyn FnOnce() -> io::Result<()> + Send>;

/// An append-only file read through memory.
pub trait ArenaFile: Send {
    /// The bytes written so far: `[0, len)`.
    fn bytes(&self) -> &[u8];
    /// Appends `data` (growing the file first; a full disk is an error here).
    fn append(&mut self, data: &[u8]) -> io::Result<()>;
    /// A job that makes `[0, len)` as of now durable (`fdatasync`), to run on another
    /// thread while appends go on.
    fn syncer(&self) -> io::Result<Syncer>;
    /// Tells the kernel how the arena is about to be read.
    fn advise(&self, access: Access);
    /// A read-only view of `[0, len)` that another thread may read while this arena is
    /// appended to (those bytes are never written again). Its `append` fails.
    fn snapshot(&self, len: u64) -> io::Result<Box<dyn ArenaFile>>;
    /// Allocates (and maps) the room the next growth would, now, so that appends soon
    /// after do not pay for it.
    fn reserve(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A read-only arena: a second mapping of a [`MappedArena`]'s file, or bytes in memory.
pub struct SnapshotArena {
    map: Option<memmap2::Mmap>,
    copy: Vec<u8>,
}

impl SnapshotArena {
    /// An arena of these bytes, in memory.
    #[must_use]
    pub fn of_bytes(bytes: Vec<u8>) -> Self {
        Self {
            map: None,
            copy: bytes,
        }
    }
}

impl ArenaFile for SnapshotArena {
    fn bytes(&self) -> &[u8] {
        self.map.as_deref().unwrap_or(&self.copy)
    }

    fn append(&mut self, _: &[u8]) -> io::Result<()> {
        Err(io::Error::other(
            "a snapshot of the state arena is read-only",
        ))
    }

    fn syncer(&self) -> io::Result<Syncer> {
        Ok(Box::new(|| Ok(())))
    }

    fn advise(&self, access: Access) {
        if let Some(map) = &self.map {
            let _ = map.advise(advice(access));
        }
    }

    fn snapshot(&self, len: u64) -> io::Result<Box<dyn ArenaFile>> {
        Ok(Box::new(Self::of_bytes(
            self.bytes()[..len as usize].to_vec(),
        )))
    }
}

/// Options of a [`MappedArena`].
#[derive(Debug, Clone, Copy, Default)]
pub struct ArenaOptions {
    /// Ask for transparent huge pages on the mapping (`MADV_HUGEPAGE`): fewer TLB misses
    /// on large state where the kernel and file system support it.
    pub huge_pages: bool,
}

/// An arena file mapped into memory.
pub struct MappedArena {
    path: std::path::PathBuf,
    file: File,
    /// `None` while the file is empty (a zero-length mapping is an error).
    map: Option<MmapMut>,
    /// Bytes of data: `[0, len)`.
    len: u64,
    /// Bytes allocated in the file and mapped.
    cap: u64,
    options: ArenaOptions,
    /// The last `madvise` access pattern, applied again to a new mapping.
    access: std::cell::Cell<Option<Access>>,
}

impl MappedArena {
    /// Opens the arena at `path`: a new empty one (replacing any file there) when `len`
    /// is `None`, else an existing one whose first `len` bytes are its data (anything
    /// after them is garbage of a run that never checkpointed it, and is written over).
    pub fn open(path: &Path, len: Option<u64>, options: ArenaOptions) -> io::Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(len.is_none())
            .truncate(len.is_none())
            .open(path)?;
        let cap = file.metadata()?.len();
        let len = len.unwrap_or(0);
        if cap < len {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "{} holds {cap} bytes, the checkpoint needs {len}",
                    path.display()
                ),
            ));
        }
        let mut arena = Self {
            path: path.to_path_buf(),
            file,
            map: None,
            len,
            cap,
            options,
            access: std::cell::Cell::new(None),
        };
        if cap > 0 {
            arena.map = Some(arena.map_file(cap)?);
        }
        Ok(arena)
    }

    /// A new mapping of the file's first `cap` bytes.
    fn map_file(&self, cap: u64) -> io::Result<MmapMut> {
        // SAFETY: the file is ours alone: the state directory's LOCK keeps every other
        // laminar process out, and nothing else writes it. The mapping never outlives
        // `self`, and slices into it borrow `self`, so replacing it (which needs
        // `&mut self`) cannot leave one dangling.
        let map = unsafe { MmapOptions::new().len(cap as usize).map_mut(&self.file)? };
        if self.options.huge_pages
            && let Err(e) = map.advise(Advice::HugePage)
        {
            tracing::warn!("the kernel refused huge pages for the state arena: {e}");
        }
        if let Some(access) = self.access.get() {
            let _ = map.advise(advice(access));
        }
        Ok(map)
    }

    /// Preallocates and maps at least `needed` bytes.
    fn grow(&mut self, needed: u64) -> io::Result<()> {
        let cap = needed
            .max(self.cap + self.cap.min(ARENA_GROW_MAX))
            .max(ARENA_GROW_MIN)
            .next_multiple_of(ARENA_GROW_MIN);
        let path = self.path.display().to_string();
        let with_path =
            |e: io::Error| io::Error::new(e.kind(), format!("{path}: growing to {cap} bytes: {e}"));
        fallocate(&self.file, self.cap, cap - self.cap).map_err(with_path)?;
        // The new mapping first: if it fails, the old one (and the data) stays.
        let map = self.map_file(cap).map_err(with_path)?;
        self.map = Some(map);
        self.cap = cap;
        Ok(())
    }
}

#[cfg(target_os = "linux")]
fn fallocate(file: &File, offset: u64, len: u64) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: a plain system call on a file descriptor we own; no memory is shared.
    let rc = unsafe { libc::posix_fallocate(file.as_raw_fd(), offset as i64, len as i64) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::from_raw_os_error(rc))
    }
}

#[cfg(not(target_os = "linux"))]
fn fallocate(file: &File, offset: u64, len: u64) -> io::Result<()> {
    // Without posix_fallocate, write zeros: the blocks exist before the mapping covers
    // them, so a full disk is an error here too.
    use std::io::{Seek, SeekFrom, Write};
    let mut f = file;
    f.seek(SeekFrom::Start(offset))?;
    let zeros = vec![0u8; 1 << 20];
    let mut left = len;
    while left > 0 {
        let n = left.min(zeros.len() as u64) as usize;
        f.write_all(&zeros[..n])?;
        left -= n as u64;
    }
    Ok(())
}

impl ArenaFile for MappedArena {
    fn bytes(&self) -> &[u8] {
        match &self.map {
            Some(map) => &map[..self.len as usize],
            None => &[],
        }
    }

    fn append(&mut self, data: &[u8]) -> io::Result<()> {
        let end = self.len + data.len() as u64;
        if end > self.cap {
            self.grow(end)?;
        }
        let Some(map) = &mut self.map else {
            return Err(io::Error::other("state arena is not mapped"));
        };
        map[self.len as usize..end as usize].copy_from_slice(data);
        self.len = end;
        Ok(())
    }

    fn syncer(&self) -> io::Result<Syncer> {
        // On Linux the page cache is one: `fdatasync` on the file writes back the pages
        // dirtied through the shared mapping (as `msync(MS_SYNC)` would) and the
        // allocation made by `posix_fallocate`. Elsewhere POSIX asks for `msync` first.
        #[cfg(not(target_os = "linux"))]
        if let Some(map) = &self.map {
            map.flush()?;
        }
        let file = self.file.try_clone()?;
        Ok(Box::new(move || file.sync_data()))
    }

    fn advise(&self, access: Access) {
        self.access.set(Some(access));
        if let Some(map) = &self.map {
            // A hint: a kernel that ignores it costs only speed.
            let _ = map.advise(advice(access));
        }
    }

    fn reserve(&mut self) -> io::Result<()> {
        self.grow(self.cap + 1)
    }

    fn snapshot(&self, len: u64) -> io::Result<Box<dyn ArenaFile>> {
        assert!(len <= self.len, "a snapshot past the arena's end");
        if len == 0 {
            return Ok(Box::new(SnapshotArena::of_bytes(Vec::new())));
        }
        let file = File::open(&self.path)?;
        // SAFETY: as in `map_file`; the bytes `[0, len)` are never written again (the
        // arena only appends), so this read-only mapping sees fixed data while the
        // writable one grows past it.
        let map = unsafe { MmapOptions::new().len(len as usize).map(&file)? };
        Ok(Box::new(SnapshotArena {
            map: Some(map),
            copy: Vec::new(),
        }))
    }
}

fn advice(access: Access) -> Advice {
    match access {
        Access::Sequential => Advice::Sequential,
        Access::Random => Advice::Random,
    }
}

/// An arena on a simulated disk: every append goes through the [`super::storage::Storage`]
/// seam, so a simulated crash loses what was not synced.
pub struct SimArena {
    storage: super::storage::SimStorage,
    name: String,
    data: Vec<u8>,
}

impl SimArena {
    /// Opens `name` like [`MappedArena::open`].
    pub fn open(
        mut storage: super::storage::SimStorage,
        name: &str,
        len: Option<u64>,
    ) -> io::Result<Self> {
        use super::storage::Storage;
        let data = match len {
            None => {
                storage.create(name)?;
                Vec::new()
            }
            Some(len) => {
                let mut data = storage.read(name)?;
                if (data.len() as u64) < len {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!(
                            "sim:{name} holds {} bytes, the checkpoint needs {len}",
                            data.len()
                        ),
                    ));
                }
                data.truncate(len as usize);
                storage.truncate(name, len)?;
                data
            }
        };
        Ok(Self {
            storage,
            name: name.to_owned(),
            data,
        })
    }
}

impl ArenaFile for SimArena {
    fn bytes(&self) -> &[u8] {
        &self.data
    }

    fn append(&mut self, data: &[u8]) -> io::Result<()> {
        use super::storage::Storage;
        self.storage.append(&self.name, data)?;
        self.data.extend_from_slice(data);
        Ok(())
    }

    fn syncer(&self) -> io::Result<Syncer> {
        use super::storage::Storage;
        let mut storage = self.storage.clone();
        let name = self.name.clone();
        Ok(Box::new(move || storage.sync(&name)))
    }

    fn advise(&self, _: Access) {}

    fn snapshot(&self, len: u64) -> io::Result<Box<dyn ArenaFile>> {
        Ok(Box::new(SnapshotArena::of_bytes(
            self.data[..len as usize].to_vec(),
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mapped_arena_grows_and_reopens_at_a_length() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("arena");
        let mut arena = MappedArena::open(&path, None, ArenaOptions::default()).unwrap();
        assert!(arena.bytes().is_empty());
        let chunk = vec![7u8; 3 << 20];
        for _ in 0..4 {
            arena.append(&chunk).unwrap();
        }
        assert_eq!(arena.bytes().len(), 12 << 20);
        arena.syncer().unwrap()().unwrap();
        drop(arena);
        let mut arena =
            MappedArena::open(&path, Some(5 << 20), ArenaOptions { huge_pages: true }).unwrap();
        assert_eq!(arena.bytes().len(), 5 << 20);
        arena.append(b"tail").unwrap();
        assert_eq!(&arena.bytes()[5 << 20..], b"tail");
        assert!(MappedArena::open(&path, Some(1 << 40), ArenaOptions::default()).is_err());
    }
}
