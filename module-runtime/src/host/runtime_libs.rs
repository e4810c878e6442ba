//! The shared runtime of slim modules: Rust's standard library
//! (`libstd-<hash>.so`, from the toolchain that built this crate) and the
//! SDK (`libember_sdk.so`, the `ember-sdk` dylib in `module-runtime/sdk-shared`).
//!
//! A slim module is a `cdylib` that depends on `ember-sdk`: rustc then
//! links std and the SDK dynamically, and the module's `DT_NEEDED` names
//! their sonames (`libstd-<hash>.so`, `libember_sdk-<hash>.so`). The
//! zygote [`RuntimeLibs::preload`]s both before it forks, so they are
//! mapped and relocated once and every worker shares those pages
//! copy-on-write; a worker's later `dlopen` of the module finds them
//! already loaded by soname and binds to them. See `docs/abi.md` §1.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use crate::elf::{self, DynamicError};

/// `rustc -V` of the compiler that built this crate.
pub const RUSTC_VERSION: &str = env!("EMBER_RUSTC_VERSION");
/// File name and soname of that compiler's shared standard library
/// (`libstd-<hash>.so`); empty if its toolchain has none.
pub const STD_SONAME: &str = env!("EMBER_STD_SONAME");
/// The toolchain's library directory, where [`STD_SONAME`] was found at
/// build time.
pub const TOOLCHAIN_LIBDIR: &str = env!("EMBER_RUST_LIBDIR");
/// The file cargo writes for the `ember-sdk` dylib (its soname carries a
/// hash of its build: `libember_sdk-<hash>.so`).
pub const SDK_FILE: &str = "libember_sdk.so";
/// Prefix of the SDK's soname.
pub const SDK_SONAME_PREFIX: &str = "libember_sdk-";
/// Prefix of a Rust standard library's soname.
pub const STD_SONAME_PREFIX: &str = "libstd-";

/// Environment variables through which a supervisor hands its zygote the
/// libraries to preload ([`RuntimeLibs::to_env`], [`RuntimeLibs::take_from_env`]).
pub const ENV_STD: &str = "EMBER_RUNTIME_STD";
/// See [`ENV_STD`].
pub const ENV_SDK: &str = "EMBER_RUNTIME_SDK";

/// Whether `soname` (a `DT_NEEDED` entry) names a Rust shared standard
/// library or an Ember SDK build: what a slim module needs from its host.
pub fn is_runtime_soname(soname: &str) -> bool {
    soname.ends_with(".so")
        && (soname.starts_with(STD_SONAME_PREFIX) || soname.starts_with(SDK_SONAME_PREFIX))
}

/// The shared runtime could not be found or loaded.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeLibsError {
    /// The toolchain that built this host ships no shared std.
    #[error("the Rust toolchain that built this host ({RUSTC_VERSION}) ships no shared standard library")]
    NoSharedStd,
    /// A library is not where it was looked for.
    #[error("{what} not found (looked for {})", list(looked))]
    NotFound {
        /// "the Rust standard library" or "the Ember SDK".
        what: &'static str,
        /// Paths tried.
        looked: Vec<PathBuf>,
    },
    /// A library is there but this process may not read it (a toolchain
    /// in root's home and an emberd that is not root).
    #[error("cannot read {}", path.display())]
    Unreadable {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// emberd runs as root and a library, or a directory above it, could
    /// be replaced by another user: loading it would hand that user every
    /// worker.
    #[error("refusing {}: {why} (emberd runs as root; whoever can write there could run code in every worker: keep the runtime in root-owned directories no one else may write, e.g. with `[runtime_libs] dir`)", path.display())]
    Untrusted {
        /// The library.
        path: PathBuf,
        /// Which file or directory, and why.
        why: String,
    },
    /// A library's dynamic section could not be read.
    #[error("cannot inspect {}", path.display())]
    Inspect {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: DynamicError,
    },
    /// A library's soname is not what this host expects.
    #[error("{} has soname {}, expected {expected}", path.display(), found.as_deref().unwrap_or("(none)"))]
    Soname {
        /// The file.
        path: PathBuf,
        /// Its soname.
        found: Option<String>,
        /// What was expected.
        expected: String,
    },
    /// The dynamic loader refused a library.
    #[error("dlopen {} failed", path.display())]
    Dlopen {
        /// The file.
        path: PathBuf,
        /// The loader's message.
        #[source]
        source: libloading::Error,
    },
}

fn list(paths: &[PathBuf]) -> String {
    paths
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// The two libraries of the shared runtime, and their sonames.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuntimeLibs {
    /// `libstd-<hash>.so`.
    pub std: PathBuf,
    /// `libember_sdk.so`.
    pub sdk: PathBuf,
    /// The SDK's soname, `libember_sdk-<hash>.so`.
    pub sdk_soname: String,
}

impl RuntimeLibs {
    /// Finds the runtime: the SDK in `dir` when given, otherwise next to
    /// the running executable (or in the parent of its directory when that
    /// is cargo's `deps/`: `target/<profile>/`, where cargo puts
    /// `libember_sdk.so` beside `emberd`); std in the same place, else in
    /// the toolchain's library directory recorded at build time.
    pub fn locate(dir: Option<&Path>) -> Result<Self, RuntimeLibsError> {
        if STD_SONAME.is_empty() {
            return Err(RuntimeLibsError::NoSharedStd);
        }
        let dirs: Vec<PathBuf> = match dir {
            Some(d) => vec![d.to_owned()],
            None => exe_dirs(),
        };
        let find = |what: &'static str, name: &str, extra: &[PathBuf]| {
            let looked: Vec<PathBuf> = dirs.iter().chain(extra).map(|d| d.join(name)).collect();
            let mut denied = None;
            for p in &looked {
                match std::fs::File::open(p).and_then(|f| f.metadata()) {
                    Ok(m) if m.is_file() => return Ok(p.clone()),
                    Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                        denied.get_or_insert((p.clone(), e));
                    }
                    _ => {}
                }
            }
            Err(match denied {
                Some((path, source)) => RuntimeLibsError::Unreadable { path, source },
                None => RuntimeLibsError::NotFound { what, looked },
            })
        };
        let toolchain = if !TOOLCHAIN_LIBDIR.is_empty() {
            vec![PathBuf::from(TOOLCHAIN_LIBDIR)]
        } else {
            Vec::new()
        };
        let std = find("the Rust standard library", STD_SONAME, &toolchain)?;
        let sdk = find("the Ember SDK", SDK_FILE, &[])?;
        let soname = |path: &Path| -> Result<Option<String>, RuntimeLibsError> {
            let f = std::fs::File::open(path).map_err(|source| RuntimeLibsError::Inspect {
                path: path.to_owned(),
                source: DynamicError::Read {
                    path: path.to_owned(),
                    source,
                },
            })?;
            elf::dynamic_info(&f, path)
                .map(|i| i.soname)
                .map_err(|source| RuntimeLibsError::Inspect {
                    path: path.to_owned(),
                    source,
                })
        };
        if nix::unistd::geteuid().is_root() {
            trusted_by_root(&std)?;
            trusted_by_root(&sdk)?;
        }
        let std_soname = soname(&std)?;
        if std_soname.as_deref() != Some(STD_SONAME) {
            return Err(RuntimeLibsError::Soname {
                path: std,
                found: std_soname,
                expected: STD_SONAME.into(),
            });
        }
        let sdk_soname = match soname(&sdk)? {
            Some(s) if s.starts_with(SDK_SONAME_PREFIX) => s,
            found => {
                return Err(RuntimeLibsError::Soname {
                    path: sdk,
                    found,
                    expected: format!("{SDK_SONAME_PREFIX}<hash>.so"),
                })
            }
        };
        Ok(Self {
            std,
            sdk,
            sdk_soname,
        })
    }

    /// `dlopen`s std, then the SDK, into this process for good (never
    /// closed). The zygote calls it once before it forks.
    pub fn preload(&self) -> Result<(), RuntimeLibsError> {
        use libloading::os::unix::{Library, RTLD_LOCAL, RTLD_NOW};
        for path in [&self.std, &self.sdk] {
            // SAFETY: loading runs the library's initializers: std's and
            // the SDK's, which only record the process arguments. Both come
            // from the supervisor's configuration (trusted like plugins).
            let lib =
                unsafe { Library::open(Some(path), RTLD_NOW | RTLD_LOCAL) }.map_err(|source| {
                    RuntimeLibsError::Dlopen {
                        path: path.clone(),
                        source,
                    }
                })?;
            // Never dlclose: workers bind to it.
            std::mem::forget(lib);
        }
        Ok(())
    }

    /// The environment a zygote reads with [`RuntimeLibs::take_from_env`].
    pub fn to_env(&self) -> [(&'static str, OsString); 2] {
        [
            (ENV_STD, self.std.clone().into_os_string()),
            (ENV_SDK, self.sdk.clone().into_os_string()),
        ]
    }

    /// The paths a supervisor set with [`RuntimeLibs::to_env`], removed
    /// from this process's environment so that nothing it starts later
    /// inherits them. Call while the process is single-threaded.
    pub fn take_from_env() -> Option<(PathBuf, PathBuf)> {
        let std = std::env::var_os(ENV_STD);
        let sdk = std::env::var_os(ENV_SDK);
        // The 2021 edition's `remove_var` is safe to call; it is sound here
        // because the caller is single-threaded.
        std::env::remove_var(ENV_STD);
        std::env::remove_var(ENV_SDK);
        Some((std?.into(), sdk?.into()))
    }
}

/// `dlopen`s the two libraries a supervisor passed through the
/// environment ([`RuntimeLibs::take_from_env`]), if it passed any.
pub fn preload_from_env() -> Result<bool, RuntimeLibsError> {
    let Some((std, sdk)) = RuntimeLibs::take_from_env() else {
        return Ok(false);
    };
    RuntimeLibs {
        std,
        sdk,
        sdk_soname: String::new(),
    }
    .preload()
    .map(|()| true)
}

/// The shared runtime libraries the shared object at `at` needs: its
/// `DT_NEEDED` entries naming a Rust standard library or an SDK build
/// (none for a fat artifact, or a file that cannot be read).
pub fn needed_by(at: &Path) -> Vec<String> {
    let Ok(file) = std::fs::File::open(at) else {
        return Vec::new();
    };
    let Ok(info) = elf::dynamic_info(&file, at) else {
        return Vec::new();
    };
    info.needed
        .into_iter()
        .filter(|n| is_runtime_soname(n))
        .collect()
}

/// The libraries of [`needed_by`] that this process has not loaded: why a
/// slim module fails to load in a process whose zygote did not preload
/// them.
pub fn not_loaded(at: &Path) -> Vec<String> {
    needed_by(at)
        .into_iter()
        .filter(|n| {
            // SAFETY: RTLD_NOLOAD loads nothing (no initializer runs): it
            // only finds an object already loaded under that name or soname.
            let found = unsafe {
                libloading::os::unix::Library::open(
                    Some(n.as_str()),
                    libc::RTLD_NOW | libc::RTLD_NOLOAD,
                )
            };
            match found {
                // Already loaded for good; dropping would only undo this
                // lookup's reference, but nothing needs it.
                Ok(lib) => {
                    std::mem::forget(lib);
                    false
                }
                Err(_) => true,
            }
        })
        .collect()
}

/// The running executable's directory, and its parent when that is
/// cargo's `deps/`.
/// For a root emberd: `path` and every directory above it belong to root,
/// or to a user who could already replace this executable (the owner of it
/// or of a directory above it), and no one else may write them (a
/// world-writable directory is allowed only with the sticky bit, which
/// keeps others from replacing its owners' entries): the rule `sshd`'s
/// StrictModes applies, so that loading the runtime gives no one more than
/// they have.
fn trusted_by_root(path: &Path) -> Result<(), RuntimeLibsError> {
    use std::os::unix::fs::MetadataExt;
    let refuse = |why: String| RuntimeLibsError::Untrusted {
        path: path.to_owned(),
        why,
    };
    let mut owners = vec![0u32];
    if let Ok(exe) = std::env::current_exe().and_then(std::fs::canonicalize) {
        owners.extend(
            exe.ancestors()
                .filter_map(|p| Some(std::fs::metadata(p).ok()?.uid())),
        );
    }
    let canonical =
        std::fs::canonicalize(path).map_err(|e| refuse(format!("cannot resolve it: {e}")))?;
    for p in canonical.ancestors() {
        let m = std::fs::metadata(p)
            .map_err(|e| refuse(format!("cannot stat {}: {e}", p.display())))?;
        let sticky_dir = m.is_dir() && m.mode() & 0o1000 != 0;
        if !owners.contains(&m.uid()) {
            return Err(refuse(format!(
                "{} belongs to uid {}, neither root nor the owner of emberd's executable or a directory above it",
                p.display(),
                m.uid()
            )));
        }
        if m.mode() & 0o022 != 0 && !sticky_dir {
            return Err(refuse(format!(
                "{} is writable by group or others (mode {:o})",
                p.display(),
                m.mode() & 0o7777
            )));
        }
    }
    Ok(())
}

fn exe_dirs() -> Vec<PathBuf> {
    let Some(dir) = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(Path::to_owned))
    else {
        return Vec::new();
    };
    let mut dirs = vec![dir.clone()];
    if dir.file_name().is_some_and(|n| n == "deps") {
        if let Some(p) = dir.parent() {
            dirs.insert(0, p.to_owned());
        }
    }
    dirs
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("ember-rtlibs-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn a_library_others_may_replace_is_not_trusted() {
        use std::os::unix::fs::PermissionsExt;
        let d = temp_dir("trust");
        let lib = d.join("libx.so");
        std::fs::write(&lib, b"x").unwrap();
        let mode = |m| std::fs::set_permissions(&d, std::fs::Permissions::from_mode(m)).unwrap();
        // Owned by whoever runs the test, which also owns the test
        // executable's directories (root in CI).
        mode(0o755);
        let ok = trusted_by_root(&lib);
        mode(0o777);
        let open = trusted_by_root(&lib);
        mode(0o755);
        std::fs::remove_dir_all(&d).unwrap();
        ok.unwrap();
        match open {
            Err(RuntimeLibsError::Untrusted { why, .. }) => {
                assert!(
                    why.contains("writable by group or others (mode 777)"),
                    "{why}"
                )
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn build_recorded_the_toolchain() {
        assert!(RUSTC_VERSION.starts_with("rustc "), "{RUSTC_VERSION}");
        assert!(is_runtime_soname(STD_SONAME), "{STD_SONAME}");
        assert!(Path::new(TOOLCHAIN_LIBDIR).join(STD_SONAME).is_file());
    }

    #[test]
    fn runtime_sonames_are_std_and_sdk_builds_only() {
        assert!(is_runtime_soname("libstd-d1237ef7159db0a2.so"));
        assert!(is_runtime_soname("libember_sdk-0123456789abcdef.so"));
        assert!(!is_runtime_soname("libc.so.6"));
        assert!(!is_runtime_soname("libember_sdk.so"));
        assert!(!is_runtime_soname("libstdc++.so.6"));
    }

    #[test]
    fn a_directory_without_the_sdk_names_what_it_looked_for() {
        // std is found in the toolchain; the SDK only in the directory.
        let d = temp_dir("empty");
        match RuntimeLibs::locate(Some(&d)) {
            Err(RuntimeLibsError::NotFound { what, looked }) => {
                assert_eq!(what, "the Ember SDK");
                assert_eq!(looked, [d.join(SDK_FILE)]);
            }
            other => panic!("{other:?}"),
        }
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_library_under_the_wrong_name_is_refused_by_its_soname() {
        let Some(libc) = [
            "/lib/x86_64-linux-gnu/libc.so.6",
            "/usr/lib/x86_64-linux-gnu/libc.so.6",
            "/lib64/libc.so.6",
            "/usr/lib/libc.so.6",
        ]
        .iter()
        .map(Path::new)
        .find(|p| p.exists()) else {
            return;
        };
        let d = temp_dir("soname");
        std::os::unix::fs::symlink(libc, d.join(STD_SONAME)).unwrap();
        std::os::unix::fs::symlink(libc, d.join(SDK_FILE)).unwrap();
        let e = RuntimeLibs::locate(Some(&d)).unwrap_err();
        assert!(
            matches!(&e, RuntimeLibsError::Soname { expected, found: Some(f), .. }
                if expected == STD_SONAME && f.starts_with("libc.so")),
            "{e:?}"
        );
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn environment_hand_over_names_both_libraries() {
        let libs = RuntimeLibs {
            std: "/x/libstd-1.so".into(),
            sdk: "/y/libember_sdk.so".into(),
            sdk_soname: "libember_sdk-2.so".into(),
        };
        let env = libs.to_env();
        assert_eq!(env[0], (ENV_STD, OsString::from("/x/libstd-1.so")));
        assert_eq!(env[1], (ENV_SDK, OsString::from("/y/libember_sdk.so")));
    }
}
