//! Desired state on disk: which modules are installed, with their
//! manifests, and their artifacts copied under their content hash.
//!
//! ```text
//! STATE_DIR/desired.json          the list, replaced atomically
//! STATE_DIR/artifacts/SHA256.so   artifacts, named by content (0400, in a
//!                                 0700 directory: emberd's alone)
//! STATE_DIR/logs/NAME.log         module output
//! ```
//!
//! A stored artifact is loaded only through [`Store::load_verified`], which
//! copies it into a sealed memfd and checks the copy's SHA-256 against its
//! name: a file changed on disk is refused, never loaded.
//!
//! Every write goes to a temporary file that is fsynced, renamed over the
//! target, and followed by an fsync of the directory, so a `kill -9` at any
//! moment leaves either the old or the new state.

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use nix::fcntl::{fcntl, FcntlArg, SealFlag};
use nix::sys::memfd::{memfd_create, MFdFlags};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

const DESIRED: &str = "desired.json";
const FORMAT_VERSION: u32 = 1;

/// One installed module.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModuleRecord {
    /// Module name.
    pub name: String,
    /// Module version.
    pub version: String,
    /// SHA-256 of the artifact, hex; the file is `artifacts/HASH.so`.
    pub artifact_sha256: String,
    /// The manifest text as installed.
    pub manifest: String,
    /// Where the module was installed from.
    pub source: PathBuf,
    /// The number of this (the active, committed) revision.
    #[serde(default = "first_revision")]
    pub revision: u64,
    /// The revisions kept, newest first: the active one, a rollout's
    /// target, and the last ones before them (their artifacts are kept).
    /// Empty in state written before revisions existed.
    #[serde(default)]
    pub revisions: Vec<RevisionRecord>,
    /// The module's own uid (and gid) in the sandbox, allocated at its
    /// first install and kept by every revision; absent in state written
    /// before the sandbox existed (one is allocated at restore).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<u32>,
}

fn first_revision() -> u64 {
    1
}

/// One revision of a module.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevisionRecord {
    /// Its number, from 1.
    pub revision: u64,
    /// Module version.
    pub version: String,
    /// SHA-256 of the artifact (a placeholder until stored, as in
    /// [`ModuleRecord`]).
    pub artifact_sha256: String,
    /// The manifest text.
    pub manifest: String,
    /// Where it was deployed from.
    pub source: PathBuf,
    /// When it was deployed, seconds since the Unix epoch.
    pub deployed_at: u64,
    /// What became of it.
    pub outcome: Outcome,
    /// Why it was aborted, rolled back or failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// What became of a revision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    /// The committed revision.
    Active,
    /// A rollout to it is in progress.
    RollingOut,
    /// Replaced by a later revision.
    Superseded,
    /// Failed after taking over; the previous revision was restored.
    RolledBack,
    /// Its rollout was aborted.
    Aborted,
    /// Its artifact could not be stored.
    Failed,
}

impl Outcome {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Active => "active",
            Outcome::RollingOut => "rolling-out",
            Outcome::Superseded => "superseded",
            Outcome::RolledBack => "rolled-back",
            Outcome::Aborted => "aborted",
            Outcome::Failed => "failed",
        }
    }
}

impl ModuleRecord {
    /// This record's own revision, as a history entry.
    pub fn as_revision(&self, deployed_at: u64, outcome: Outcome) -> RevisionRecord {
        RevisionRecord {
            revision: self.revision,
            version: self.version.clone(),
            artifact_sha256: self.artifact_sha256.clone(),
            manifest: self.manifest.clone(),
            source: self.source.clone(),
            deployed_at,
            outcome,
            reason: None,
        }
    }

    /// Every artifact hash the record refers to.
    pub fn hashes(&self) -> impl Iterator<Item = &str> {
        std::iter::once(self.artifact_sha256.as_str())
            .chain(self.revisions.iter().map(|r| r.artifact_sha256.as_str()))
    }
}

/// Everything that must survive a restart.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct DesiredState {
    /// Format version of this file.
    pub format: u32,
    /// Installed modules by name.
    pub modules: BTreeMap<String, ModuleRecord>,
}

/// The state directory could not be used.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A filesystem operation failed.
    #[error("{op} {}", path.display())]
    Io {
        /// What was being done.
        op: &'static str,
        /// On what.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// `desired.json` is not readable state.
    #[error("corrupt state file {}", path.display())]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
    /// A stored artifact's content does not match its hash.
    #[error("stored artifact {} was modified: its SHA-256 is {found}, {expected} expected", path.display())]
    Tampered {
        /// The file.
        path: PathBuf,
        /// The hash it is stored under.
        expected: String,
        /// The hash of its content.
        found: String,
    },
    /// `desired.json` was written by a newer emberd.
    #[error("state file format {found} is newer than this emberd ({FORMAT_VERSION})")]
    NewerFormat {
        /// The format found.
        found: u32,
    },
    /// The state writer thread is gone (emberd is shutting down).
    #[error("the state writer thread is gone")]
    WriterGone,
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> StoreError + use<'a> {
    move |source| StoreError::Io {
        op,
        path: path.to_owned(),
        source,
    }
}

/// An artifact as workers load it: a descriptor whose content cannot change
/// (a sealed memfd copied from the installed file, or the stored copy, which
/// is read-only and private to emberd), and the path it came from, for
/// messages. Modules installed from identical files share one image, so
/// their workers share its pages.
#[derive(Debug, Clone)]
pub struct ArtifactImage {
    /// The descriptor workers receive.
    pub fd: Arc<OwnedFd>,
    /// The file it was made from.
    pub source: PathBuf,
    /// Its size in bytes.
    pub len: u64,
    /// Its SHA-256 once the persister has computed it (shared by every
    /// module using this image).
    pub sha256: Arc<OnceLock<String>>,
}

impl ArtifactImage {
    /// Makes the image for an install of `src`: one of `known` if its
    /// content is byte for byte the same (compared, not trusted from names
    /// or timestamps), else a copy of `src` in a sealed memfd. This is all an
    /// install does with the artifact before launching; the persister
    /// hashes and stores it off the launch path. Sealed against writes,
    /// shrinking and growing, so what workers map is exactly what was
    /// installed, whatever happens to `src` afterwards.
    pub fn snapshot(src: &Path, known: &[ArtifactImage]) -> Result<Self, StoreError> {
        let from = File::open(src).map_err(io_err("open", src))?;
        Self::snapshot_file(from, src, known, u64::MAX)
    }

    /// [`ArtifactImage::snapshot`] of a file already opened (and checked)
    /// from `src`, copying no more than the size `fstat` gives it (and at
    /// most `cap` bytes): a file that grew since is refused.
    pub fn snapshot_file(
        from: File,
        src: &Path,
        known: &[ArtifactImage],
        cap: u64,
    ) -> Result<Self, StoreError> {
        let len = from.metadata().map_err(io_err("stat", src))?.len();
        // One byte over says it grew; nothing further is read.
        let limit = len.min(cap);
        let mut from = from.take(limit + 1);
        let same_size: Vec<&ArtifactImage> = known.iter().filter(|k| k.len == len).collect();
        let mut bytes = None;
        if !same_size.is_empty() {
            let mut mine = Vec::with_capacity(limit as usize + 1);
            from.read_to_end(&mut mine).map_err(io_err("read", src))?;
            for k in same_size {
                let theirs = k
                    .read_all()
                    .map_err(io_err("read the image of", &k.source))?;
                if theirs == mine {
                    return Ok(Self {
                        source: src.to_owned(),
                        ..k.clone()
                    });
                }
            }
            bytes = Some(mine);
        }
        let fd = memfd_create(
            c"ember-artifact",
            MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING,
        )
        .map_err(|e| io_err("memfd_create for", src)(e.into()))?;
        let mut to = File::from(fd);
        match bytes {
            Some(b) => to.write_all(&b).map_err(io_err("copy", src))?,
            // Nothing to compare with: copy in the kernel.
            None => {
                io::copy(&mut from, &mut to).map_err(io_err("copy", src))?;
            }
        }
        let seals = SealFlag::F_SEAL_SHRINK
            | SealFlag::F_SEAL_GROW
            | SealFlag::F_SEAL_WRITE
            | SealFlag::F_SEAL_SEAL;
        fcntl(&to, FcntlArg::F_ADD_SEALS(seals))
            .map_err(|e| io_err("seal a copy of", src)(e.into()))?;
        let len = to
            .metadata()
            .map_err(io_err("stat the copy of", src))?
            .len();
        if len > limit {
            return Err(io_err("copy", src)(io::Error::other(format!(
                "it grew past {limit} bytes while being copied"
            ))));
        }
        Ok(Self {
            fd: Arc::new(to.into()),
            source: src.to_owned(),
            len,
            sha256: Arc::default(),
        })
    }

    /// The image's SHA-256 (hex), computed once and shared by every module
    /// using this image.
    pub fn hash(&self) -> io::Result<String> {
        if let Some(h) = self.sha256.get() {
            return Ok(h.clone());
        }
        let h = hex(&Sha256::digest(self.read_all()?));
        Ok(self.sha256.get_or_init(|| h).clone())
    }

    /// Whether `self` and `other` are the same image (not just equal bytes).
    pub fn same(&self, other: &ArtifactImage) -> bool {
        Arc::ptr_eq(&self.fd, &other.fd)
    }

    /// The whole content, read without moving the shared file offset.
    fn read_all(&self) -> io::Result<Vec<u8>> {
        let f = File::from(self.fd.try_clone()?);
        let len = f.metadata()?.len() as usize;
        let mut bytes = vec![0u8; len];
        f.read_exact_at(&mut bytes, 0)?;
        Ok(bytes)
    }
}

/// Handle on the state directory.
#[derive(Debug, Clone)]
pub struct Store {
    dir: PathBuf,
}

impl Store {
    /// Opens (creating if needed) the state directory and loads the desired
    /// state.
    pub fn open(dir: &Path) -> Result<(Self, DesiredState), StoreError> {
        for d in [dir.to_owned(), dir.join("artifacts"), dir.join("logs")] {
            fs::create_dir_all(&d).map_err(io_err("create", &d))?;
        }
        fs::set_permissions(dir, fs::Permissions::from_mode(0o750))
            .map_err(io_err("chmod", dir))?;
        // Artifacts are emberd's alone: module uids can neither list nor
        // read nor replace them (older state stored them 0444).
        let artifacts = dir.join("artifacts");
        fs::set_permissions(&artifacts, fs::Permissions::from_mode(0o700))
            .map_err(io_err("chmod", &artifacts))?;
        if let Ok(rd) = fs::read_dir(&artifacts) {
            for e in rd.flatten() {
                let _ = fs::set_permissions(e.path(), fs::Permissions::from_mode(0o400));
            }
        }
        let store = Self {
            dir: dir.to_owned(),
        };
        store.remove_temporaries();
        let path = dir.join(DESIRED);
        let state = match fs::read(&path) {
            Ok(bytes) => {
                let s: DesiredState =
                    serde_json::from_slice(&bytes).map_err(|source| StoreError::Corrupt {
                        path: path.clone(),
                        source,
                    })?;
                if s.format > FORMAT_VERSION {
                    return Err(StoreError::NewerFormat { found: s.format });
                }
                s
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => DesiredState {
                format: FORMAT_VERSION,
                ..Default::default()
            },
            Err(e) => return Err(io_err("read", &path)(e)),
        };
        Ok((store, state))
    }

    /// The state directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where an artifact with this hash lives.
    pub fn artifact_path(&self, sha256: &str) -> PathBuf {
        self.dir.join("artifacts").join(format!("{sha256}.so"))
    }

    /// The log file of a module.
    pub fn log_path(&self, name: &str) -> PathBuf {
        self.dir.join("logs").join(format!("{name}.log"))
    }

    fn remove_temporaries(&self) {
        for d in [self.dir.clone(), self.dir.join("artifacts")] {
            let Ok(rd) = fs::read_dir(&d) else { continue };
            for e in rd.flatten() {
                if e.file_name().to_string_lossy().starts_with(".tmp-") {
                    let _ = fs::remove_file(e.path());
                }
            }
        }
    }

    /// Writes the desired state atomically.
    pub fn save(&self, state: &DesiredState) -> Result<(), StoreError> {
        let mut state = state.clone();
        state.format = FORMAT_VERSION;
        let bytes = serde_json::to_vec_pretty(&state).expect("state always serializes");
        write_atomic(&self.dir, DESIRED, &bytes)
    }

    /// Stores an artifact image under its SHA-256, durably, and returns the
    /// hash. Content-addressed: an artifact already stored is not written
    /// again (re-installs and upgrades back to a known version skip the
    /// copy).
    pub fn store_image(&self, image: &ArtifactImage) -> Result<String, StoreError> {
        if let Some(h) = image.sha256.get() {
            if self.artifact_path(h).is_file() {
                return Ok(h.clone());
            }
        }
        let dir = self.dir.join("artifacts");
        let bytes = image.read_all().map_err(io_err("read", &image.source))?;
        let hash = hex(&Sha256::digest(&bytes));
        let _ = image.sha256.set(hash.clone());
        let dst = self.artifact_path(&hash);
        if dst.is_file() {
            return Ok(hash);
        }
        let tmp = dir.join(format!(".tmp-{}-{}", std::process::id(), unique()));
        let result = (|| {
            let mut out = create_private(&tmp)?;
            out.write_all(&bytes).map_err(io_err("write", &tmp))?;
            out.sync_all().map_err(io_err("fsync", &tmp))?;
            fs::set_permissions(&tmp, fs::Permissions::from_mode(0o400))
                .map_err(io_err("chmod", &tmp))?;
            fs::rename(&tmp, &dst).map_err(io_err("rename", &dst))?;
            sync_dir(&dir)?;
            Ok(hash)
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result
    }

    /// The stored artifact with this hash, as workers load it: copied into
    /// a sealed memfd whose SHA-256 is checked against `sha256`. The check
    /// and the load are of the same bytes (the memfd cannot change), so a
    /// file modified on disk is refused ([`StoreError::Tampered`]), and
    /// every launch from the image is as verified as the first. Reads and
    /// hashes the whole file: call it off the actor's thread.
    pub fn load_verified(&self, sha256: &str) -> Result<ArtifactImage, StoreError> {
        let path = self.artifact_path(sha256);
        let image = ArtifactImage::snapshot(&path, &[])?;
        let found = hex(&Sha256::digest(
            image
                .read_all()
                .map_err(io_err("read the copy of", &path))?,
        ));
        if found != sha256 {
            return Err(StoreError::Tampered {
                path,
                expected: sha256.to_owned(),
                found,
            });
        }
        let _ = image.sha256.set(found);
        Ok(image)
    }

    /// Removes artifacts no module of `state` refers to.
    pub fn collect_garbage(&self, state: &DesiredState) {
        let keep: std::collections::HashSet<String> = state
            .modules
            .values()
            .flat_map(ModuleRecord::hashes)
            .map(|h| format!("{h}.so"))
            .collect();
        let Ok(rd) = fs::read_dir(self.dir.join("artifacts")) else {
            return;
        };
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if !keep.contains(&name) && !name.starts_with(".tmp-") {
                let _ = fs::remove_file(e.path());
            }
        }
    }

    /// Removes the logs of modules `state` does not list: left by an
    /// install that a crash cut short before its state was written, or by
    /// an uninstall cut short after. Only at start-up, before any install
    /// can be in progress.
    pub fn remove_stale_logs(&self, state: &DesiredState) {
        let Ok(rd) = fs::read_dir(self.dir.join("logs")) else {
            return;
        };
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let module = name.strip_suffix(".log").unwrap_or(&name);
            if !state.modules.contains_key(module) {
                let _ = fs::remove_file(e.path());
            }
        }
    }
}

fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    // Relaxed: only uniqueness within this process is needed.
    N.fetch_add(1, Ordering::Relaxed)
}

fn create_private(path: &Path) -> Result<File, StoreError> {
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(io_err("create", path))
}

/// A newly installed artifact, not yet hashed: records refer to it by a
/// placeholder until the persister has stored it.
#[derive(Debug, Clone)]
pub struct NewArtifact {
    /// What the records say instead of the hash (see [`placeholder`]).
    pub placeholder: String,
    /// The bytes.
    pub image: ArtifactImage,
}

/// A placeholder for the hash of an artifact being stored; never a valid
/// SHA-256 (it is not hex).
pub fn placeholder(n: u64) -> String {
    format!("{PENDING}{n}")
}

const PENDING: &str = "pending-";

/// What a durable write reports: the hash of the artifact it stored, if it
/// carried one.
pub type Saved = Result<Option<String>, StoreError>;

/// One durable write of the desired state, queued on the [`Persister`].
struct SaveJob {
    state: DesiredState,
    artifact: Option<NewArtifact>,
    /// Remove artifacts the written state does not refer to.
    collect_garbage: bool,
    done: Box<dyn FnOnce(Saved) + Send>,
}

/// Writes desired state on its own thread, in the order it was asked to:
/// hashing and fsync are milliseconds here, so the actor hands the write
/// off and keeps launching, and a later snapshot can never be overtaken by
/// an earlier one.
///
/// A snapshot may name an artifact by placeholder (an install whose hash
/// the actor does not know yet); the persister writes the hash it computed
/// instead, and leaves out a module whose artifact could not be stored (its
/// install fails and is rolled back). Garbage collection runs here too,
/// against the state as written, so it never removes an artifact whose
/// hash only the persister knows yet.
#[derive(Debug, Clone)]
pub struct Persister {
    tx: std::sync::mpsc::Sender<SaveJob>,
}

impl std::fmt::Debug for SaveJob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SaveJob")
            .field("artifact", &self.artifact)
            .field("collect_garbage", &self.collect_garbage)
            .finish()
    }
}

/// Replaces placeholders by the hashes stored; drops modules whose
/// placeholder has none (their artifact could not be stored).
fn resolve(state: &mut DesiredState, stored: &HashMap<String, String>) {
    for r in state.modules.values_mut() {
        for v in &mut r.revisions {
            if let Some(h) = stored.get(&v.artifact_sha256) {
                v.artifact_sha256 = h.clone();
            }
        }
        r.revisions
            .retain(|v| !v.artifact_sha256.starts_with(PENDING));
    }
    state.modules.retain(|_, r| {
        if !r.artifact_sha256.starts_with(PENDING) {
            return true;
        }
        match stored.get(&r.artifact_sha256) {
            Some(h) => {
                r.artifact_sha256 = h.clone();
                true
            }
            None => false,
        }
    });
}

impl Persister {
    /// Starts the writer thread for `store`.
    pub fn start(store: Store) -> Self {
        let (tx, rx) = std::sync::mpsc::channel::<SaveJob>();
        std::thread::Builder::new()
            .name("ember-persist".into())
            .spawn(move || {
                background_priority();
                let mut stored: HashMap<String, String> = HashMap::new();
                for job in rx {
                    let result = (|| {
                        let hash = match &job.artifact {
                            Some(a) => {
                                let h = store.store_image(&a.image)?;
                                stored.insert(a.placeholder.clone(), h.clone());
                                Some(h)
                            }
                            None => None,
                        };
                        let mut state = job.state;
                        resolve(&mut state, &stored);
                        store.save(&state)?;
                        if job.collect_garbage {
                            store.collect_garbage(&state);
                        }
                        Ok(hash)
                    })();
                    (job.done)(result);
                }
            })
            .expect("spawn the state writer thread");
        Self { tx }
    }

    /// Queues a durable write of `state` (after storing `artifact`, which it
    /// refers to by placeholder); the receiver says when it is on disk and
    /// with which hash.
    pub fn save(
        &self,
        state: DesiredState,
        artifact: Option<NewArtifact>,
    ) -> tokio::sync::oneshot::Receiver<Saved> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.enqueue(state, artifact, false, move |r| {
            let _ = tx.send(r);
        });
        rx
    }

    /// Queues a durable write of `state`, then removal of the artifacts it
    /// does not refer to; the receiver says when both are done.
    pub fn save_and_collect(&self, state: DesiredState) -> tokio::sync::oneshot::Receiver<Saved> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.enqueue(state, None, true, move |r| {
            let _ = tx.send(r);
        });
        rx
    }

    /// Writes `state` durably after everything queued before it, then removes
    /// the artifacts it does not refer to, and waits for both, blocking the
    /// calling thread. Tests only: the actor never waits for the disk.
    #[cfg(test)]
    pub fn save_blocking(&self, state: DesiredState) -> Result<(), StoreError> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.enqueue(state, None, true, move |r| {
            let _ = tx.send(r);
        });
        rx.recv().unwrap_or(Err(StoreError::WriterGone)).map(drop)
    }

    fn enqueue(
        &self,
        state: DesiredState,
        artifact: Option<NewArtifact>,
        collect_garbage: bool,
        done: impl FnOnce(Saved) + Send + 'static,
    ) {
        let job = SaveJob {
            state,
            artifact,
            collect_garbage,
            done: Box::new(done),
        };
        if let Err(std::sync::mpsc::SendError(job)) = self.tx.send(job) {
            (job.done)(Err(StoreError::WriterGone));
        }
    }
}

/// Lowers the calling thread's scheduling priority to nice 19. The
/// persister's hashing and copying overlap launches on purpose; on a small
/// machine they would otherwise take the core a just-launched worker needs.
/// Durability is unaffected, only the moment `Install` answers.
fn background_priority() {
    // SAFETY: gettid has no preconditions.
    let tid = unsafe { libc::syscall(libc::SYS_gettid) } as libc::id_t;
    // SAFETY: setpriority on our own thread id with valid constants; on Linux
    // PRIO_PROCESS with a thread id applies to that thread only.
    let rc = unsafe { libc::setpriority(libc::PRIO_PROCESS, tid, 19) };
    if rc != 0 {
        tracing::debug!(
            error = %io::Error::last_os_error(),
            "persister keeps its priority"
        );
    }
}

fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("fsync", dir))
}

/// Writes `name` in `dir` atomically: temp file, fsync, rename, fsync dir.
pub fn write_atomic(dir: &Path, name: &str, bytes: &[u8]) -> Result<(), StoreError> {
    let tmp = dir.join(format!(".tmp-{}-{}-{name}", std::process::id(), unique()));
    let dst = dir.join(name);
    let result = (|| {
        let mut f = create_private(&tmp)?;
        f.write_all(bytes).map_err(io_err("write", &tmp))?;
        f.sync_all().map_err(io_err("fsync", &tmp))?;
        fs::rename(&tmp, &dst).map_err(io_err("rename", &dst))?;
        sync_dir(dir)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn tempdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "ember-store-{tag}-{}-{}",
            std::process::id(),
            unique()
        ));
        fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn round_trip_and_artifacts() {
        let dir = tempdir("rt");
        let (store, mut state) = Store::open(&dir.join("state")).unwrap();
        assert!(state.modules.is_empty());
        let src = dir.join("lib.so");
        fs::write(&src, b"abc").unwrap();
        let image = ArtifactImage::snapshot(&src, &[]).unwrap();
        // The image is a frozen copy: changing the file changes nothing.
        fs::write(&src, b"xyz").unwrap();
        let hash = store.store_image(&image).unwrap();
        assert_eq!(
            hash,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(fs::read(store.artifact_path(&hash)).unwrap(), b"abc");
        // Same content twice is fine.
        assert_eq!(store.store_image(&image).unwrap(), hash);
        let reopened = store.load_verified(&hash).unwrap();
        assert_eq!(reopened.read_all().unwrap(), b"abc");
        // Stored read-only, in a directory only emberd may enter.
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&store.artifact_path(&hash)), 0o400);
        assert_eq!(mode(&dir.join("state/artifacts")), 0o700);
        // A byte changed on disk: refused, naming the file and both hashes.
        let path = store.artifact_path(&hash);
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        fs::write(&path, b"abd").unwrap();
        let e = store.load_verified(&hash).unwrap_err().to_string();
        assert!(e.contains(&path.display().to_string()), "{e}");
        assert!(e.contains(&hash) && e.contains("a52d159f262b2c6d"), "{e}");
        fs::write(&path, b"abc").unwrap();
        state.modules.insert(
            "kv".into(),
            ModuleRecord {
                name: "kv".into(),
                version: "1".into(),
                artifact_sha256: hash.clone(),
                manifest: "name = \"kv\"".into(),
                source: src.clone(),
                revision: 1,
                revisions: Vec::new(),
                uid: Some(1_879_048_192),
            },
        );
        store.save(&state).unwrap();
        // A stray temporary from a killed run is cleaned on open.
        fs::write(dir.join("state/.tmp-1-2-desired.json"), b"half").unwrap();
        let (store2, loaded) = Store::open(&dir.join("state")).unwrap();
        assert_eq!(loaded, state);
        assert!(!dir.join("state/.tmp-1-2-desired.json").exists());
        store2.collect_garbage(&DesiredState::default());
        assert!(!store2.artifact_path(&hash).exists());
        fs::remove_dir_all(&dir).unwrap();
    }

    fn record(name: &str, sha: &str) -> ModuleRecord {
        ModuleRecord {
            name: name.into(),
            version: "1".into(),
            artifact_sha256: sha.into(),
            manifest: format!("name = \"{name}\""),
            source: PathBuf::from("/src/module.toml"),
            revision: 1,
            revisions: Vec::new(),
            uid: None,
        }
    }

    #[test]
    fn logs_of_modules_not_installed_are_removed_at_start() {
        let dir = tempdir("stale-logs");
        let (store, mut state) = Store::open(&dir.join("state")).unwrap();
        state.modules.insert("kv".into(), record("kv", "aa"));
        for n in ["kv", "gone"] {
            fs::write(store.log_path(n), "line\n").unwrap();
        }
        store.remove_stale_logs(&state);
        assert!(store.log_path("kv").exists());
        assert!(!store.log_path("gone").exists());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn garbage_collection_keeps_the_artifacts_of_every_kept_revision() {
        let dir = tempdir("gc-revisions");
        let (store, mut state) = Store::open(&dir.join("state")).unwrap();
        for h in ["aa", "bb", "cc"] {
            fs::write(store.artifact_path(h), h).unwrap();
        }
        let mut r = record("kv", "bb");
        r.revisions = vec![
            r.as_revision(0, Outcome::Active),
            RevisionRecord {
                revision: 0,
                artifact_sha256: "aa".into(),
                ..r.as_revision(0, Outcome::Superseded)
            },
        ];
        state.modules.insert("kv".into(), r);
        store.collect_garbage(&state);
        assert!(store.artifact_path("aa").exists());
        assert!(store.artifact_path("bb").exists());
        assert!(!store.artifact_path("cc").exists());
        // Old state files, without revisions, still load.
        let old = r#"{"format":1,"modules":{"kv":{"name":"kv","version":"1","artifact_sha256":"bb","manifest":"","source":"/m"}}}"#;
        let s: DesiredState = serde_json::from_str(old).unwrap();
        assert_eq!(s.modules["kv"].revision, 1);
        assert!(s.modules["kv"].revisions.is_empty());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn persister_stores_the_artifact_and_resolves_its_placeholder() {
        let dir = tempdir("persist");
        let (store, mut state) = Store::open(&dir.join("state")).unwrap();
        let src = dir.join("lib.so");
        fs::write(&src, b"abc").unwrap();
        let image = ArtifactImage::snapshot(&src, &[]).unwrap();
        let pending = placeholder(1);
        state.modules.insert("kv".into(), record("kv", &pending));
        let persister = Persister::start(store.clone());
        let hash = persister
            .save(
                state.clone(),
                Some(NewArtifact {
                    placeholder: pending.clone(),
                    image,
                }),
            )
            .blocking_recv()
            .unwrap()
            .unwrap()
            .expect("the stored artifact's hash");
        assert_eq!(
            hash,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        // A later snapshot taken before the actor learnt the hash still says
        // `pending-1`; it is written with the hash, garbage collection keeps
        // the artifact, and a module whose artifact was never stored is left
        // out.
        let mut later = state.clone();
        later
            .modules
            .insert("lost".into(), record("lost", &placeholder(2)));
        persister.save_blocking(later).unwrap();
        let (_, loaded) = Store::open(&dir.join("state")).unwrap();
        assert_eq!(loaded.modules["kv"].artifact_sha256, hash);
        assert!(!loaded.modules.contains_key("lost"));
        assert_eq!(fs::read(store.artifact_path(&hash)).unwrap(), b"abc");
        // Once nothing refers to it, it goes.
        persister.save_blocking(DesiredState::default()).unwrap();
        assert!(!store.artifact_path(&hash).exists());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn corrupt_state_is_an_error() {
        let dir = tempdir("corrupt");
        fs::write(dir.join(DESIRED), b"{not json").unwrap();
        let e = Store::open(&dir).unwrap_err();
        assert!(matches!(e, StoreError::Corrupt { .. }));
        fs::remove_dir_all(&dir).unwrap();
    }
}
