//! Desired state on disk: which modules are installed, with their
//! manifests, and their artifacts copied under their content hash.
//!
//! ```text
//! STATE_DIR/desired.json          the list, replaced atomically
//! STATE_DIR/artifacts/SHA256.so   artifacts, named by content
//! STATE_DIR/logs/NAME.log         module output
//! ```
//!
//! Every write goes to a temporary file that is fsynced, renamed over the
//! target, and followed by an fsync of the directory, so a `kill -9` at any
//! moment leaves either the old or the new state.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

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

    /// Copies an artifact into the store under its SHA-256 and returns the
    /// hash, *without* making it durable: a launch can use it at once, and
    /// [`Persister::save`] syncs it before the desired state that refers to
    /// it. (An artifact no saved state refers to is removed at start-up.)
    pub fn place_artifact(&self, src: &Path) -> Result<String, StoreError> {
        self.copy_artifact(src, false)
    }

    /// Copies an artifact into the store under its SHA-256, durably; returns
    /// the hash.
    pub fn add_artifact(&self, src: &Path) -> Result<String, StoreError> {
        self.copy_artifact(src, true)
    }

    fn copy_artifact(&self, src: &Path, durable: bool) -> Result<String, StoreError> {
        let dir = self.dir.join("artifacts");
        // One read of the whole file (artifacts are kilobytes to a few
        // megabytes): hashed in memory, written from memory if new.
        let bytes = fs::read(src).map_err(io_err("read", src))?;
        let hash = hex(&Sha256::digest(&bytes));
        let dst = self.artifact_path(&hash);
        // Content-addressed: an artifact already stored is not written again
        // (re-installs and upgrades back to a known version skip the copy).
        if dst.is_file() {
            return Ok(hash);
        }
        let tmp = dir.join(format!(".tmp-{}-{}", std::process::id(), unique()));
        let result = (|| {
            let mut out = create_private(&tmp)?;
            out.write_all(&bytes).map_err(io_err("write", &tmp))?;
            if durable {
                out.sync_all().map_err(io_err("fsync", &tmp))?;
            }
            fs::set_permissions(&tmp, fs::Permissions::from_mode(0o444))
                .map_err(io_err("chmod", &tmp))?;
            fs::rename(&tmp, &dst).map_err(io_err("rename", &dst))?;
            if durable {
                sync_dir(&dir)?;
            }
            Ok(hash)
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result
    }

    /// Removes artifacts no module of `state` refers to.
    pub fn collect_garbage(&self, state: &DesiredState) {
        let keep: std::collections::HashSet<String> = state
            .modules
            .values()
            .map(|m| format!("{}.so", m.artifact_sha256))
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

/// One durable write of the desired state, queued on the [`Persister`].
struct SaveJob {
    state: DesiredState,
    artifact: Option<PathBuf>,
    done: Box<dyn FnOnce(Result<(), StoreError>) + Send>,
}

/// Writes desired state on its own thread, in the order it was asked to:
/// fsync is milliseconds here, so the actor hands the write off and keeps
/// launching, and a later snapshot can never be overtaken by an earlier one.
#[derive(Debug, Clone)]
pub struct Persister {
    tx: std::sync::mpsc::Sender<SaveJob>,
}

impl std::fmt::Debug for SaveJob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SaveJob")
            .field("artifact", &self.artifact)
            .finish()
    }
}

impl Persister {
    /// Starts the writer thread for `store`.
    pub fn start(store: Store) -> Self {
        let (tx, rx) = std::sync::mpsc::channel::<SaveJob>();
        std::thread::Builder::new()
            .name("ember-persist".into())
            .spawn(move || {
                for job in rx {
                    let result = (|| {
                        if let Some(a) = &job.artifact {
                            File::open(a)
                                .and_then(|f| f.sync_all())
                                .map_err(io_err("fsync", a))?;
                            sync_dir(&store.dir.join("artifacts"))?;
                        }
                        store.save(&job.state)
                    })();
                    (job.done)(result);
                }
            })
            .expect("spawn the state writer thread");
        Self { tx }
    }

    /// Queues a durable write of `state` (after syncing `artifact`, which it
    /// refers to); the receiver says when it is on disk.
    pub fn save(
        &self,
        state: DesiredState,
        artifact: Option<PathBuf>,
    ) -> tokio::sync::oneshot::Receiver<Result<(), StoreError>> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.enqueue(state, artifact, move |r| {
            let _ = tx.send(r);
        });
        rx
    }

    /// Writes `state` durably after everything queued before it, and waits
    /// (blocking the calling thread, as a synchronous write would).
    pub fn save_blocking(&self, state: DesiredState) -> Result<(), StoreError> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.enqueue(state, None, move |r| {
            let _ = tx.send(r);
        });
        rx.recv().unwrap_or(Err(StoreError::WriterGone))
    }

    fn enqueue(
        &self,
        state: DesiredState,
        artifact: Option<PathBuf>,
        done: impl FnOnce(Result<(), StoreError>) + Send + 'static,
    ) {
        let job = SaveJob {
            state,
            artifact,
            done: Box::new(done),
        };
        if let Err(std::sync::mpsc::SendError(job)) = self.tx.send(job) {
            (job.done)(Err(StoreError::WriterGone));
        }
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
        let hash = store.add_artifact(&src).unwrap();
        assert_eq!(
            hash,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(fs::read(store.artifact_path(&hash)).unwrap(), b"abc");
        // Same content twice is fine.
        assert_eq!(store.add_artifact(&src).unwrap(), hash);
        state.modules.insert(
            "kv".into(),
            ModuleRecord {
                name: "kv".into(),
                version: "1".into(),
                artifact_sha256: hash.clone(),
                manifest: "name = \"kv\"".into(),
                source: src.clone(),
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

    #[test]
    fn corrupt_state_is_an_error() {
        let dir = tempdir("corrupt");
        fs::write(dir.join(DESIRED), b"{not json").unwrap();
        let e = Store::open(&dir).unwrap_err();
        assert!(matches!(e, StoreError::Corrupt { .. }));
        fs::remove_dir_all(&dir).unwrap();
    }
}
