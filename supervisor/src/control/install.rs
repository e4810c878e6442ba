//! `Install(path)`: install a module from its directory or manifest.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::json;

use super::errors;
use crate::varlink::ErrorReply;

/// Parameters of `Install`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Install {
    /// A module directory (containing `module.toml`) or a manifest file,
    /// as seen by the daemon.
    pub path: PathBuf,
    /// The library to load instead of the one the manifest's `entry` names
    /// relative to the manifest (absolute): `emberctl` sets it when it found
    /// a bare `entry` in a cargo target directory ([`crate::entry`]).
    #[serde(default)]
    pub entry: Option<PathBuf>,
}

/// Why an install was refused.
#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    /// The manifest cannot be read, or is refused before it is (not a
    /// regular file, over its cap).
    #[error("cannot read manifest {}", path.display())]
    Unreadable {
        /// The manifest path.
        path: PathBuf,
        /// Why.
        #[source]
        source: crate::input::FileError,
    },
    /// The files could not be opened with the client's rights (emberd is
    /// not root and the client's uid is not emberd's own).
    #[error("cannot open {} for this client", path.display())]
    Rights {
        /// The path given.
        path: PathBuf,
        /// Why.
        #[source]
        source: crate::fscred::SwitchError,
    },
    /// The path is relative (the daemon has no useful working directory).
    #[error("path {} is not absolute", path.display())]
    Relative {
        /// The path given.
        path: PathBuf,
    },
    /// The manifest is not a valid manifest.
    #[error("invalid manifest {}", path.display())]
    Manifest {
        /// The manifest path.
        path: PathBuf,
        /// What is wrong.
        #[source]
        source: crate::manifest::ManifestError,
    },
    /// The artifact named by `entry` is missing.
    #[error("invalid manifest {}: field `entry`: {} not found", path.display(), artifact.display())]
    ArtifactMissing {
        /// The manifest path.
        path: PathBuf,
        /// The artifact path.
        artifact: PathBuf,
    },
    /// The artifact named by `entry` is not an ELF shared object for this
    /// host (or cannot be read).
    #[error("invalid manifest {}: field `entry`", path.display())]
    ArtifactUnloadable {
        /// The manifest path.
        path: PathBuf,
        /// What is wrong with the file (it names it).
        #[source]
        source: module_runtime::elf::ElfError,
    },
    /// The artifact is a slim module this emberd cannot run (it needs
    /// another std or SDK build than the one offered, or none is).
    #[error("invalid manifest {}: field `entry`: {}", path.display(), artifact.display())]
    ArtifactRuntime {
        /// The manifest path.
        path: PathBuf,
        /// The artifact.
        artifact: PathBuf,
        /// What it needs that is not offered.
        #[source]
        source: crate::runtime_libs::RuntimeMismatch,
    },
    /// The artifact named by `entry` is refused before it is read (not a
    /// regular file, over its cap) or cannot be read.
    #[error("invalid manifest {}: field `entry`", path.display())]
    ArtifactRefused {
        /// The manifest path.
        path: PathBuf,
        /// Why.
        #[source]
        source: crate::input::FileError,
    },
    /// Same name already installed.
    #[error("module {name} {version} is already installed; a new version is shipped with `emberctl deploy`")]
    AlreadyInstalled {
        /// Name.
        name: String,
        /// Installed version.
        version: String,
    },
    /// A declared TCP port is taken.
    #[error("port {port} is in use")]
    PortInUse {
        /// The port.
        port: u16,
        /// Details.
        #[source]
        source: crate::listeners::ListenError,
    },
    /// A listener could not be bound otherwise.
    #[error("cannot bind a listener")]
    Listener {
        /// Why.
        #[source]
        source: crate::listeners::ListenError,
    },
    /// Every uid of `[sandbox] uid_range` is taken.
    #[error("no free uid for module {name} in sandbox.uid_range [{}, {}]", range[0], range[1])]
    NoUid {
        /// Name.
        name: String,
        /// The range.
        range: [u32; 2],
    },
    /// The state directory could not take the module.
    #[error("cannot store module {name}")]
    Store {
        /// Name.
        name: String,
        /// Why.
        #[source]
        source: crate::store::StoreError,
    },
}

/// Opens the file a manifest's `entry` names and checks it before anything
/// is installed: a regular file of at most `cap` bytes
/// (`install.max_artifact_bytes`), an ELF shared object for this host (a
/// worker would otherwise only find out at `dlopen`, after the install was
/// accepted), and, for a slim module, one whose shared runtime this emberd
/// offers ([`crate::runtime_libs::check`]). Blocking: run it on the blocking pool. The file returned is
/// the one checked, for the install to copy.
pub fn check_artifact(
    manifest: &Path,
    artifact: &Path,
    cap: u64,
) -> Result<std::fs::File, InstallError> {
    use std::os::unix::fs::FileExt;
    let (file, _) = crate::input::open_regular(artifact, cap, "install.max_artifact_bytes")
        .map_err(|source| {
            if source.is_not_found() {
                InstallError::ArtifactMissing {
                    path: manifest.to_owned(),
                    artifact: artifact.to_owned(),
                }
            } else {
                InstallError::ArtifactRefused {
                    path: manifest.to_owned(),
                    source,
                }
            }
        })?;
    let unloadable = |source| InstallError::ArtifactUnloadable {
        path: manifest.to_owned(),
        source,
    };
    let mut head = [0u8; 64];
    let mut n = 0;
    while n < head.len() {
        match file.read_at(&mut head[n..], n as u64) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(source) => {
                return Err(unloadable(module_runtime::elf::ElfError::Read {
                    path: artifact.to_owned(),
                    source,
                }))
            }
        }
    }
    module_runtime::elf::check_header(artifact, &head[..n]).map_err(unloadable)?;
    crate::runtime_libs::check(&file, artifact).map_err(|source| {
        InstallError::ArtifactRuntime {
            path: manifest.to_owned(),
            artifact: artifact.to_owned(),
            source,
        }
    })?;
    Ok(file)
}

impl From<InstallError> for ErrorReply {
    fn from(e: InstallError) -> Self {
        let reason = crate::error_chain(&e);
        match e {
            InstallError::PortInUse { port, .. } => {
                ErrorReply::new(errors::PORT_IN_USE, json!({ "port": port }))
            }
            InstallError::Unreadable { .. }
            | InstallError::Rights { .. }
            | InstallError::Relative { .. }
            | InstallError::Listener { .. } => {
                ErrorReply::new(errors::INVALID_INPUT, json!({ "reason": reason }))
            }
            InstallError::Manifest { path, .. }
            | InstallError::ArtifactMissing { path, .. }
            | InstallError::ArtifactRefused { path, .. }
            | InstallError::ArtifactRuntime { path, .. }
            | InstallError::ArtifactUnloadable { path, .. } => ErrorReply::new(
                errors::INVALID_MANIFEST,
                json!({ "path": path, "reason": reason }),
            ),
            InstallError::AlreadyInstalled { name, version } => ErrorReply::new(
                errors::ALREADY_INSTALLED,
                json!({ "name": name, "version": version }),
            ),
            InstallError::Store { name, .. } | InstallError::NoUid { name, .. } => ErrorReply::new(
                errors::INSTALL_FAILED,
                json!({ "name": name, "reason": reason }),
            ),
        }
    }
}
