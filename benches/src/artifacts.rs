//! Building and locating what a benchmark or the demo runs: the example
//! `cdylib`s, `emberd`, and temporary module directories.
//!
//! Like `module-runtime/tests/common`, this runs a nested `cargo build` with
//! the caller's own target directory and profile, so a fresh clone needs
//! nothing built beforehand.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

/// Building or staging an artifact failed.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// `cargo` could not be run.
    #[error("cannot run cargo")]
    Spawn(#[source] std::io::Error),
    /// `cargo build` failed.
    #[error("`cargo build {args}` failed ({status})")]
    Failed {
        /// The arguments after `build`.
        args: String,
        /// Its exit status.
        status: std::process::ExitStatus,
    },
    /// A module directory could not be written.
    #[error("cannot stage module directory {}", path.display())]
    Stage {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A manifest is not valid TOML.
    #[error("invalid manifest {}", path.display())]
    Manifest {
        /// The manifest.
        path: PathBuf,
        /// Why.
        #[source]
        source: toml::de::Error,
    },
}

/// The workspace root (this crate's parent directory).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("benches/ has a parent")
        .to_owned()
}

/// `target/<profile>` of the running executable: its directory, or the
/// parent of `deps/` for tests and benchmarks.
pub fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current executable");
    let dir = exe.parent().expect("executable has a directory").to_owned();
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.parent().expect("deps/ has a parent").to_owned()
    } else {
        dir
    }
}

/// Runs `cargo build -p PACKAGE…` into the running executable's target
/// directory and profile (`--release` for `release`, which `cargo bench`
/// also uses). Returns that profile directory.
pub fn build(packages: &[&str], quiet: bool) -> Result<PathBuf, BuildError> {
    let profile = profile_dir();
    let target = profile.parent().expect("profile dir has a parent");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| env!("CARGO").into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(workspace_root())
        .arg("build")
        .arg("--target-dir")
        .arg(target)
        .stdin(Stdio::null());
    if quiet {
        cmd.arg("--quiet");
    }
    if profile.file_name().is_some_and(|n| n == "release") {
        cmd.arg("--release");
    }
    for p in packages {
        cmd.arg("-p").arg(p);
    }
    let status = cmd.status().map_err(BuildError::Spawn)?;
    if !status.success() {
        return Err(BuildError::Failed {
            args: packages
                .iter()
                .map(|p| format!("-p {p}"))
                .collect::<Vec<_>>()
                .join(" "),
            status,
        });
    }
    Ok(profile)
}

/// `lib<crate>.so` in `profile`.
pub fn cdylib(profile: &Path, crate_name: &str) -> PathBuf {
    profile.join(format!("lib{}.so", crate_name.replace('-', "_")))
}

/// Text of `examples/<dir>/module.toml`.
pub fn example_manifest(dir: &str) -> PathBuf {
    workspace_root()
        .join("examples")
        .join(dir)
        .join("module.toml")
}

/// How to adapt an example manifest for a staged copy.
#[derive(Debug, Clone, Default)]
pub struct Stage {
    /// New module name.
    pub name: Option<String>,
    /// New replica count.
    pub replicas: Option<u32>,
    /// New address for every `[[listeners]]` entry (e.g. `127.0.0.1:0`).
    pub listen: Option<String>,
}

/// Writes `dir/module.toml` (the example manifest `manifest`, edited per
/// `stage`, `entry` pointing at a copy of `artifact` in `dir`) and returns
/// the manifest text.
pub fn stage_module(
    dir: &Path,
    manifest: &Path,
    artifact: &Path,
    stage: &Stage,
) -> Result<String, BuildError> {
    let err = |source| BuildError::Stage {
        path: dir.to_owned(),
        source,
    };
    let text = std::fs::read_to_string(manifest).map_err(err)?;
    let mut t: toml::Table = toml::from_str(&text).map_err(|source| BuildError::Manifest {
        path: manifest.to_owned(),
        source,
    })?;
    if let Some(n) = &stage.name {
        t.insert("name".into(), n.clone().into());
    }
    if let Some(r) = stage.replicas {
        t.insert("replicas".into(), i64::from(r).into());
    }
    if let (Some(addr), Some(toml::Value::Array(ls))) = (&stage.listen, t.get_mut("listeners")) {
        for l in ls.iter_mut().filter_map(toml::Value::as_table_mut) {
            l.insert("address".into(), addr.clone().into());
        }
    }
    let file = artifact
        .file_name()
        .expect("artifact has a file name")
        .to_owned();
    t.insert("entry".into(), file.to_string_lossy().into_owned().into());
    std::fs::create_dir_all(dir).map_err(err)?;
    let dest = dir.join(&file);
    if !dest.exists() {
        std::fs::hard_link(artifact, &dest)
            .or_else(|_| std::fs::copy(artifact, &dest).map(drop))
            .map_err(err)?;
    }
    let out = toml::to_string(&t).expect("a TOML table serializes");
    std::fs::write(dir.join("module.toml"), &out).map_err(err)?;
    Ok(out)
}

/// Writes `dir/module.toml`: the manifest `manifest` (e.g. an example's),
/// `entry` made the absolute path `artifact` (nothing is copied), then
/// `edit` applied. Returns the directory, which `Install`/`Deploy` take.
pub fn write_manifest(
    dir: &Path,
    manifest: &Path,
    artifact: &Path,
    edit: impl FnOnce(&mut toml::Table),
) -> Result<PathBuf, BuildError> {
    let err = |source| BuildError::Stage {
        path: dir.to_owned(),
        source,
    };
    let text = std::fs::read_to_string(manifest).map_err(err)?;
    let mut t: toml::Table = toml::from_str(&text).map_err(|source| BuildError::Manifest {
        path: manifest.to_owned(),
        source,
    })?;
    t.insert(
        "entry".into(),
        artifact.to_string_lossy().into_owned().into(),
    );
    edit(&mut t);
    std::fs::create_dir_all(dir).map_err(err)?;
    let out = toml::to_string(&t).expect("a TOML table serializes");
    std::fs::write(dir.join("module.toml"), out).map_err(err)?;
    Ok(dir.to_owned())
}

/// A unique temporary directory, removed with everything in it on drop.
#[derive(Debug)]
pub struct TempDir(PathBuf);

impl TempDir {
    /// Creates `$TMPDIR/<prefix>-<pid>-<n>`.
    pub fn new(prefix: &str) -> std::io::Result<Self> {
        static N: AtomicU32 = AtomicU32::new(0);
        let p = std::env::temp_dir().join(format!(
            "{prefix}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&p)?;
        Ok(Self(p))
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn staged_manifest_is_edited() {
        let d = TempDir::new("ember-bench-stage").unwrap();
        let art = d.path().join("libx.so");
        std::fs::write(&art, b"x").unwrap();
        let text = stage_module(
            &d.path().join("m"),
            &example_manifest("greeter"),
            &art,
            &Stage {
                name: Some("g7".into()),
                replicas: Some(1),
                listen: Some("127.0.0.1:0".into()),
            },
        )
        .unwrap();
        let t: toml::Table = toml::from_str(&text).unwrap();
        assert_eq!(t["name"].as_str(), Some("g7"));
        assert_eq!(t["replicas"].as_integer(), Some(1));
        assert_eq!(t["entry"].as_str(), Some("libx.so"));
        assert_eq!(t["listeners"][0]["address"].as_str(), Some("127.0.0.1:0"));
        assert!(d.path().join("m/libx.so").exists());
    }

    #[test]
    fn written_manifest_has_an_absolute_entry_and_edits() {
        let d = TempDir::new("ember-bench-manifest").unwrap();
        let dir = write_manifest(
            &d.path().join("g"),
            &example_manifest("greeter"),
            Path::new("/abs/libgreeter.so"),
            |t| {
                t.insert("version".into(), "0.2.0".into());
            },
        )
        .unwrap();
        let t: toml::Table =
            toml::from_str(&std::fs::read_to_string(dir.join("module.toml")).unwrap()).unwrap();
        assert_eq!(t["entry"].as_str(), Some("/abs/libgreeter.so"));
        assert_eq!(t["version"].as_str(), Some("0.2.0"));
        assert_eq!(t["name"].as_str(), Some("greeter"));
    }
}
