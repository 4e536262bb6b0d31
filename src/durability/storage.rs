//! The file-system seam under the WAL and the checkpoints: one flat directory of files.
//!
//! [`DiskStorage`] is the real one. [`SimStorage`] keeps, for every file, the bytes a
//! process sees (live) apart from the bytes that survive power loss (durable: what the
//! last `sync` covered), and directory entries apart from the last `sync_dir`. A
//! simulated crash throws away what was not made durable, keeping a random prefix of an
//! unsynced append (a torn write). It can also fail the Nth call with EIO or ENOSPC.
//! Tests crash it at every sync point of a workload and check what recovery finds.

use std::collections::{BTreeMap, HashMap};
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use super::arena::{ArenaFile, ArenaOptions, MappedArena, SimArena};

/// A directory of files, as the WAL and checkpoints need it.
pub trait Storage: Send {
    /// Names of the files in the directory (not sorted).
    fn list(&self) -> io::Result<Vec<String>>;
    fn read(&self, name: &str) -> io::Result<Vec<u8>>;
    /// Creates `name` empty, replacing a file of that name.
    fn create(&mut self, name: &str) -> io::Result<()>;
    fn append(&mut self, name: &str, data: &[u8]) -> io::Result<()>;
    /// Makes `name`'s data durable (`fdatasync`). An error is fatal: never retry it.
    fn sync(&mut self, name: &str) -> io::Result<()>;
    /// `append` then `sync`; with `io_uring`, one submission of a write linked to an
    /// `fdatasync`.
    fn append_sync(&mut self, name: &str, data: &[u8]) -> io::Result<()> {
        self.append(name, data)?;
        self.sync(name)
    }
    fn truncate(&mut self, name: &str, len: u64) -> io::Result<()>;
    fn rename(&mut self, from: &str, to: &str) -> io::Result<()>;
    fn remove(&mut self, name: &str) -> io::Result<()>;
    /// Makes creations, renames and removals durable (`fsync` of the directory).
    fn sync_dir(&mut self) -> io::Result<()>;
    /// Where the files are, for messages.
    fn describe(&self, name: &str) -> String;
    /// Opens the state arena `name`: new and empty (replacing a file of that name) when
    /// `len` is `None`, else an existing one whose data is its first `len` bytes.
    fn open_arena(&mut self, name: &str, len: Option<u64>) -> io::Result<Box<dyn ArenaFile>>;
    /// Another handle on the same directory, for a log written by another thread (each
    /// reactor's WAL): it shares no open file and no lock with this one.
    fn handle(&self) -> io::Result<Box<dyn Storage>>;
}

/// How [`DiskStorage`] writes and syncs the WAL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoMode {
    /// `io_uring` when the kernel allows it (a write linked to an `fdatasync` in one
    /// submission), else the blocking calls, after one warning.
    Auto,
    /// `write` and `fdatasync` system calls.
    Blocking,
}

impl IoMode {
    /// `LAMINAR_IO=blocking` turns `io_uring` off; anything else is [`IoMode::Auto`].
    #[must_use]
    pub fn from_env() -> Self {
        match std::env::var("LAMINAR_IO").as_deref() {
            Ok("blocking") => Self::Blocking,
            _ => Self::Auto,
        }
    }
}

/// Files in a directory on disk.
pub struct DiskStorage {
    dir: PathBuf,
    /// Files open for appending.
    open: HashMap<String, File>,
    uring: Option<uring::Ring>,
    arena_options: ArenaOptions,
}

impl DiskStorage {
    /// Opens (creating) `dir`, with `io_uring` when the kernel allows it.
    pub fn open(dir: &Path) -> io::Result<Self> {
        Self::open_with(dir, IoMode::from_env())
    }

    /// Opens (creating) `dir`, writing the WAL as `mode` says.
    pub fn open_with(dir: &Path, mode: IoMode) -> io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let uring = match mode {
            IoMode::Blocking => None,
            IoMode::Auto => uring::Ring::new(),
        };
        Ok(Self {
            dir: dir.to_path_buf(),
            open: HashMap::new(),
            uring,
            arena_options: ArenaOptions::default(),
        })
    }

    /// How state arenas are mapped.
    pub fn set_arena_options(&mut self, options: ArenaOptions) {
        self.arena_options = options;
    }

    /// Whether WAL writes go through `io_uring`.
    #[must_use]
    pub fn uses_io_uring(&self) -> bool {
        self.uring.is_some()
    }

    fn file(&mut self, name: &str) -> io::Result<&mut File> {
        if !self.open.contains_key(name) {
            let file = OpenOptions::new().append(true).open(self.dir.join(name))?;
            self.open.insert(name.to_owned(), file);
        }
        self.open
            .get_mut(name)
            .ok_or_else(|| io::Error::other("file handle vanished"))
    }
}

impl Storage for DiskStorage {
    fn handle(&self) -> io::Result<Box<dyn Storage>> {
        let mode = if self.uring.is_some() {
            IoMode::Auto
        } else {
            IoMode::Blocking
        };
        let mut other = Self::open_with(&self.dir, mode)?;
        other.arena_options = self.arena_options;
        Ok(Box::new(other))
    }

    fn list(&self) -> io::Result<Vec<String>> {
        let mut names = Vec::new();
        for entry in std::fs::read_dir(&self.dir)? {
            let entry = entry?;
            if entry.file_type()?.is_file() {
                names.push(entry.file_name().to_string_lossy().into_owned());
            }
        }
        Ok(names)
    }

    fn read(&self, name: &str) -> io::Result<Vec<u8>> {
        std::fs::read(self.dir.join(name))
    }

    fn create(&mut self, name: &str) -> io::Result<()> {
        self.open.remove(name);
        let path = self.dir.join(name);
        File::create(&path)?;
        let file = OpenOptions::new().append(true).open(&path)?;
        self.open.insert(name.to_owned(), file);
        Ok(())
    }

    fn append(&mut self, name: &str, data: &[u8]) -> io::Result<()> {
        self.file(name)?.write_all(data)
    }

    fn sync(&mut self, name: &str) -> io::Result<()> {
        self.file(name)?.sync_data()
    }

    fn append_sync(&mut self, name: &str, data: &[u8]) -> io::Result<()> {
        if self.uring.is_none() {
            self.append(name, data)?;
            return self.sync(name);
        }
        let file = self.file(name)?.try_clone()?;
        let Some(ring) = &mut self.uring else {
            return Err(io::Error::other("io_uring ring vanished"));
        };
        let written = ring.write_and_datasync(&file, data)?;
        if written < data.len() {
            // A short write (rare for regular files): finish it the blocking way.
            let mut file = file;
            file.write_all(&data[written..])?;
            file.sync_data()?;
        }
        Ok(())
    }

    fn truncate(&mut self, name: &str, len: u64) -> io::Result<()> {
        self.file(name)?.set_len(len)
    }

    fn rename(&mut self, from: &str, to: &str) -> io::Result<()> {
        self.open.remove(from);
        self.open.remove(to);
        std::fs::rename(self.dir.join(from), self.dir.join(to))
    }

    fn remove(&mut self, name: &str) -> io::Result<()> {
        self.open.remove(name);
        match std::fs::remove_file(self.dir.join(name)) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            other => other,
        }
    }

    fn sync_dir(&mut self) -> io::Result<()> {
        File::open(&self.dir)?.sync_all()
    }

    fn describe(&self, name: &str) -> String {
        self.dir.join(name).display().to_string()
    }

    fn open_arena(&mut self, name: &str, len: Option<u64>) -> io::Result<Box<dyn ArenaFile>> {
        Ok(Box::new(MappedArena::open(
            &self.dir.join(name),
            len,
            self.arena_options,
        )?))
    }
}

#[cfg(target_os = "linux")]
mod uring {
    use std::fs::File;
    use std::io;
    use std::os::fd::AsRawFd;

    use io_uring::{IoUring, opcode, squeue, types};

    /// One `io_uring` instance for the WAL's append-and-sync.
    pub struct Ring(IoUring);

    impl Ring {
        /// A ring, or `None` (with one warning) where the kernel or a seccomp profile
        /// refuses `io_uring`.
        pub fn new() -> Option<Self> {
            match IoUring::new(8) {
                Ok(ring) => Some(Self(ring)),
                Err(e) => {
                    tracing::warn!(
                        "io_uring is not available ({e}); the WAL uses blocking write and fdatasync"
                    );
                    None
                }
            }
        }

        /// Appends `data` to `file` (opened for appending) and `fdatasync`s it, as one
        /// submission of two linked operations. Returns the bytes written.
        pub fn write_and_datasync(&mut self, file: &File, data: &[u8]) -> io::Result<usize> {
            let fd = types::Fd(file.as_raw_fd());
            let len = u32::try_from(data.len())
                .map_err(|_| io::Error::other("one WAL write over 4 GiB"))?;
            let write = opcode::Write::new(fd, data.as_ptr(), len)
                .offset(u64::MAX)
                .build()
                .flags(squeue::Flags::IO_LINK)
                .user_data(1);
            let sync = opcode::Fsync::new(fd)
                .flags(types::FsyncFlags::DATASYNC)
                .build()
                .user_data(2);
            // SAFETY: the entries point at `data` and `file`, which outlive this call,
            // and the call waits below for both operations to complete.
            unsafe {
                let mut sq = self.0.submission();
                sq.push(&write)
                    .and_then(|()| sq.push(&sync))
                    .map_err(|_| io::Error::other("io_uring submission queue full"))?;
            }
            self.0.submit_and_wait(2)?;
            let (mut written, mut synced) = (None, None);
            while written.is_none() || synced.is_none() {
                let Some(cqe) = self.0.completion().next() else {
                    self.0.submit_and_wait(1)?;
                    continue;
                };
                match cqe.user_data() {
                    1 => written = Some(cqe.result()),
                    _ => synced = Some(cqe.result()),
                }
            }
            let (written, synced) = (written.unwrap_or(-5), synced.unwrap_or(-5));
            if written < 0 {
                return Err(io::Error::from_raw_os_error(-written));
            }
            let written = written as usize;
            if synced < 0 && written == data.len() {
                return Err(io::Error::from_raw_os_error(-synced));
            }
            // A short write cancels the linked sync: the caller finishes both.
            Ok(written)
        }
    }
}

#[cfg(not(target_os = "linux"))]
mod uring {
    pub struct Ring;
    impl Ring {
        pub fn new() -> Option<Self> {
            None
        }
        pub fn write_and_datasync(
            &mut self,
            _: &std::fs::File,
            _: &[u8],
        ) -> std::io::Result<usize> {
            Err(std::io::Error::other("io_uring is Linux only"))
        }
    }
}

/// What [`SimStorage`] does at a chosen call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The call fails with EIO and changes nothing; a failed sync also loses what it
    /// was to write (see `Inode::lost`).
    Eio,
    /// The call fails with ENOSPC, like `Eio`.
    NoSpace,
    /// The machine loses power instead of making the call: every later call fails until
    /// [`SimStorage::crash`] brings the disk back as it was left.
    Crash,
}

#[derive(Debug, Default, Clone)]
struct Inode {
    live: Vec<u8>,
    durable: Vec<u8>,
    /// Byte ranges a failed sync lost: readable, but never written to the disk (a later
    /// sync that succeeds writes zeros there), as Linux marks the dirty pages clean
    /// after a failed writeback.
    lost: Vec<std::ops::Range<usize>>,
}

#[derive(Debug, Default)]
struct Sim {
    inodes: Vec<Inode>,
    live: BTreeMap<String, usize>,
    durable: BTreeMap<String, usize>,
    /// Mutating calls and sync calls made so far.
    calls: u64,
    syncs: u64,
    /// `(sync number, fault)`: the fault replaces that sync call.
    at_sync: Option<(u64, Fault)>,
    /// `(call number, fault)`: the fault replaces that mutating call.
    at_call: Option<(u64, Fault)>,
    down: bool,
}

/// An in-memory disk with power loss and injected errors; clones share the disk.
#[derive(Debug, Clone, Default)]
pub struct SimStorage(Arc<Mutex<Sim>>);

impl SimStorage {
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    fn sim(&self) -> MutexGuard<'_, Sim> {
        match self.0.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// Replaces sync call number `n` (counted from 1) with `fault`.
    pub fn fail_sync(&self, n: u64, fault: Fault) {
        self.sim().at_sync = Some((n, fault));
    }

    /// Replaces mutating call number `n` (counted from 1) with `fault`.
    pub fn fail_call(&self, n: u64, fault: Fault) {
        self.sim().at_call = Some((n, fault));
    }

    /// Sync calls made so far (`sync` and `sync_dir`).
    #[must_use]
    pub fn syncs(&self) -> u64 {
        self.sim().syncs
    }

    /// Mutating calls made so far.
    #[must_use]
    pub fn calls(&self) -> u64 {
        self.sim().calls
    }

    /// Power comes back: directory entries as of the last `sync_dir`; each file holds its
    /// durable bytes plus, when `tear` picks a length, that much of what was appended
    /// after them (a write that partly reached the disk). Faults are cleared.
    pub fn crash(&self, mut tear: impl FnMut(usize) -> usize) {
        let mut sim = self.sim();
        sim.live = sim.durable.clone();
        for inode in &mut sim.inodes {
            if inode.live.len() >= inode.durable.len() && inode.live.starts_with(&inode.durable) {
                let unsynced = inode.live.len() - inode.durable.len();
                let keep = inode.durable.len() + tear(unsynced).min(unsynced);
                inode.live.truncate(keep);
            } else {
                inode.live.clone_from(&inode.durable);
            }
            inode.durable.clone_from(&inode.live);
            inode.lost.clear();
        }
        sim.down = false;
        sim.at_sync = None;
        sim.at_call = None;
    }

    /// Flips one bit of a file (live and durable), for corruption tests.
    pub fn flip_bit(&self, name: &str, byte: usize, bit: u8) {
        let mut sim = self.sim();
        if let Some(&i) = sim.live.get(name) {
            let inode = &mut sim.inodes[i];
            if byte < inode.live.len() {
                inode.live[byte] ^= 1 << (bit % 8);
            }
            if byte < inode.durable.len() {
                inode.durable[byte] ^= 1 << (bit % 8);
            }
        }
    }

    /// Cuts a file to `len` bytes (live and durable).
    pub fn cut(&self, name: &str, len: usize) {
        let mut sim = self.sim();
        if let Some(&i) = sim.live.get(name) {
            sim.inodes[i].live.truncate(len);
            sim.inodes[i].durable.truncate(len);
        }
    }

    /// Length of a file as the process sees it.
    #[must_use]
    pub fn len(&self, name: &str) -> Option<usize> {
        let sim = self.sim();
        sim.live.get(name).map(|&i| sim.inodes[i].live.len())
    }
}

fn fault_error(fault: Fault) -> io::Error {
    match fault {
        Fault::Eio => io::Error::from_raw_os_error(5),
        Fault::NoSpace => io::Error::from_raw_os_error(28),
        Fault::Crash => io::Error::other("simulated power loss"),
    }
}

impl Sim {
    fn check(&mut self, sync: bool) -> io::Result<()> {
        if self.down {
            return Err(fault_error(Fault::Crash));
        }
        self.calls += 1;
        let mut fault = None;
        if let Some((n, f)) = self.at_call
            && n == self.calls
        {
            fault = Some(f);
        }
        if sync {
            self.syncs += 1;
            if let Some((n, f)) = self.at_sync
                && n == self.syncs
            {
                fault = Some(f);
            }
        }
        match fault {
            None => Ok(()),
            Some(f) => {
                if f == Fault::Crash {
                    self.down = true;
                }
                Err(fault_error(f))
            }
        }
    }

    fn inode(&mut self, name: &str) -> io::Result<&mut Inode> {
        let i = *self
            .live
            .get(name)
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, name.to_owned()))?;
        Ok(&mut self.inodes[i])
    }
}

impl Storage for SimStorage {
    fn handle(&self) -> io::Result<Box<dyn Storage>> {
        Ok(Box::new(self.clone()))
    }

    fn list(&self) -> io::Result<Vec<String>> {
        Ok(self.sim().live.keys().cloned().collect())
    }

    fn read(&self, name: &str) -> io::Result<Vec<u8>> {
        let mut sim = self.sim();
        if sim.down {
            return Err(fault_error(Fault::Crash));
        }
        Ok(sim.inode(name)?.live.clone())
    }

    fn create(&mut self, name: &str) -> io::Result<()> {
        let mut sim = self.sim();
        sim.check(false)?;
        sim.inodes.push(Inode::default());
        let i = sim.inodes.len() - 1;
        sim.live.insert(name.to_owned(), i);
        Ok(())
    }

    fn append(&mut self, name: &str, data: &[u8]) -> io::Result<()> {
        let mut sim = self.sim();
        sim.check(false)?;
        sim.inode(name)?.live.extend_from_slice(data);
        Ok(())
    }

    fn sync(&mut self, name: &str) -> io::Result<()> {
        let mut sim = self.sim();
        if let Err(e) = sim.check(true) {
            if !sim.down
                && let Ok(inode) = sim.inode(name)
            {
                let from = inode.durable.len().min(inode.live.len());
                let to = inode.live.len();
                inode.lost.push(from..to);
            }
            return Err(e);
        }
        let inode = sim.inode(name)?;
        inode.durable.clone_from(&inode.live);
        for range in &inode.lost {
            let end = range.end.min(inode.durable.len());
            if range.start < end {
                inode.durable[range.start..end].fill(0);
            }
        }
        Ok(())
    }

    fn truncate(&mut self, name: &str, len: u64) -> io::Result<()> {
        let mut sim = self.sim();
        sim.check(false)?;
        let inode = sim.inode(name)?;
        inode.live.truncate(len as usize);
        // Shrinking a file is metadata the next sync makes durable; until then a crash
        // may bring the old length back.
        Ok(())
    }

    fn rename(&mut self, from: &str, to: &str) -> io::Result<()> {
        let mut sim = self.sim();
        sim.check(false)?;
        let i = sim
            .live
            .remove(from)
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, from.to_owned()))?;
        sim.live.insert(to.to_owned(), i);
        Ok(())
    }

    fn remove(&mut self, name: &str) -> io::Result<()> {
        let mut sim = self.sim();
        sim.check(false)?;
        sim.live.remove(name);
        Ok(())
    }

    fn sync_dir(&mut self) -> io::Result<()> {
        let mut sim = self.sim();
        sim.check(true)?;
        sim.durable = sim.live.clone();
        Ok(())
    }

    fn describe(&self, name: &str) -> String {
        format!("sim:{name}")
    }

    fn open_arena(&mut self, name: &str, len: Option<u64>) -> io::Result<Box<dyn ArenaFile>> {
        Ok(Box::new(SimArena::open(self.clone(), name, len)?))
    }
}
