//! Where a manifest's `entry` is, as `emberctl install` and `deploy` find it
//! (format: `docs/module-manifest.md`, "Where `entry` is looked for").
//!
//! A packaged module ships its library next to its manifest (or names it by
//! a path relative to the manifest, or an absolute one): that file is the
//! entry, and nothing else is looked at. A module still in its cargo
//! package names the bare file (`entry = "libhello.so"`) that cargo writes
//! into its target directory: when no such file is next to the manifest,
//! the entry is looked for in `release/` and `debug/` of the package's
//! target directory (`CARGO_TARGET_DIR`, else `CARGO_BUILD_TARGET_DIR`, of
//! the caller if set, else `build.target-dir` of a `.cargo/config.toml` at
//! or above the workspace root, else `target/` of the cargo workspace root
//! above the manifest): the build of
//! emberctl's own profile if there is one, else the other. This runs in `emberctl`, with the user's
//! own rights; emberd receives the path picked and opens it with the same
//! rights ([`crate::fscred`]), checking it as it checks any entry.

use std::path::{Component, Path, PathBuf};
use std::time::SystemTime;

/// The cargo profiles whose output is looked at, in the order listed.
pub const PROFILES: [&str; 2] = ["release", "debug"];

/// Cargo manifests read while looking for the workspace root are at most
/// this big (a larger one is taken for a manifest without `[workspace]`).
const MAX_CARGO_TOML_BYTES: u64 = 1 << 20;

/// Where an entry was found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resolved {
    /// Where the manifest says (next to it, relative to it, or absolute).
    AsWritten(PathBuf),
    /// In a cargo target directory: a build the manifest's `entry` names.
    Cargo(CargoPick),
}

impl Resolved {
    /// The library's path.
    pub fn path(&self) -> &Path {
        match self {
            Resolved::AsWritten(p) => p,
            Resolved::Cargo(c) => &c.path,
        }
    }
}

/// A library picked among the builds of cargo's profiles.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CargoPick {
    /// The library picked: the build of the preferred profile if there is
    /// one, else the other.
    pub path: PathBuf,
    /// Its profile (`release` or `debug`).
    pub profile: &'static str,
    /// Whether that is the profile asked for.
    pub preferred: bool,
    /// The other profile's build, if there is one, and whether it is newer
    /// than the one picked.
    pub other: Option<(&'static str, PathBuf, bool)>,
    /// Where the target directory came from.
    pub target_from: TargetFrom,
}

impl std::fmt::Display for CargoPick {
    /// `/…/target/debug/libhello.so (debug build, as emberctl's; the
    /// release build is newer; target dir of the cargo workspace /…)`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({} build", self.path.display(), self.profile)?;
        if self.preferred {
            write!(f, ", as emberctl's")?;
        } else {
            write!(f, ", the only one")?;
        }
        if let Some((profile, _, true)) = &self.other {
            write!(f, "; the {profile} build is newer")?;
        }
        write!(f, "; {})", self.target_from)
    }
}

/// Which target directory was searched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetFrom {
    /// This environment variable of the caller (`CARGO_TARGET_DIR` or
    /// `CARGO_BUILD_TARGET_DIR`).
    Env(&'static str),
    /// `build.target-dir` of this cargo configuration file.
    Config(PathBuf),
    /// `target/` of the cargo workspace (or lone package) at this root.
    Workspace(PathBuf),
}

impl std::fmt::Display for TargetFrom {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TargetFrom::Env(var) => write!(f, "from {var}"),
            TargetFrom::Config(file) => write!(f, "build.target-dir of {}", file.display()),
            TargetFrom::Workspace(root) => {
                write!(f, "target dir of the cargo workspace {}", root.display())
            }
        }
    }
}

/// The entry is nowhere it was looked for.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid manifest {}: field `entry`: {} not found; looked for {}{}",
    manifest.display(),
    entry.display(),
    list(looked),
    note.as_deref().map(|n| format!(" ({n})")).unwrap_or_default()
)]
pub struct NotFound {
    /// The manifest.
    pub manifest: PathBuf,
    /// Its `entry`, as written.
    pub entry: PathBuf,
    /// Every path looked at, in order.
    pub looked: Vec<PathBuf>,
    /// Why no cargo target directory was searched, when none was.
    pub note: Option<String>,
}

fn list(paths: &[PathBuf]) -> String {
    paths
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Finds the library the manifest at `manifest` (a file path) names in
/// `entry`. `target_dir` is the caller's `CARGO_TARGET_DIR` (or
/// `CARGO_BUILD_TARGET_DIR`), made absolute, with the variable's name;
/// `prefer` the profile whose build is taken when both profiles have one
/// (`emberctl` passes its own: emberd, emberctl and the examples are built
/// by one `cargo build [--release]`, and a slim module runs only on the SDK
/// build of its own profile, the one emberd offers).
pub fn resolve(
    manifest: &Path,
    entry: &Path,
    target_dir: Option<(&Path, &'static str)>,
    prefer: &str,
) -> Result<Resolved, NotFound> {
    let dir = manifest.parent().unwrap_or(Path::new("/"));
    let written = dir.join(entry);
    if written.exists() {
        return Ok(Resolved::AsWritten(written));
    }
    let mut looked = vec![written];
    let not_found = |looked, note: Option<String>| NotFound {
        manifest: manifest.to_owned(),
        entry: entry.to_owned(),
        looked,
        note,
    };
    if !is_bare_file_name(entry) {
        return Err(not_found(looked, None));
    }
    let (target, target_from) = match target_dir {
        Some((t, var)) => (t.to_owned(), TargetFrom::Env(var)),
        None => match workspace_root(dir) {
            Some(root) => match config_target_dir(&root) {
                Some((t, file)) => (t, TargetFrom::Config(file)),
                None => (root.join("target"), TargetFrom::Workspace(root)),
            },
            None => {
                return Err(not_found(
                    looked,
                    Some(format!(
                        "no Cargo.toml in {} or above it, so no cargo build was looked for",
                        dir.display()
                    )),
                ))
            }
        },
    };
    let mut found: Vec<(&'static str, PathBuf, SystemTime)> = Vec::new();
    for profile in PROFILES {
        let candidate = target.join(profile).join(entry);
        if let Ok(meta) = std::fs::metadata(&candidate) {
            if meta.is_file() {
                let modified = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
                found.push((profile, candidate.clone(), modified));
            }
        }
        looked.push(candidate);
    }
    let Some(at) = found
        .iter()
        .position(|(p, ..)| *p == prefer)
        .or((!found.is_empty()).then_some(0))
    else {
        return Err(not_found(looked, None));
    };
    let (profile, path, modified) = found.remove(at);
    Ok(Resolved::Cargo(CargoPick {
        path,
        profile,
        preferred: profile == prefer,
        other: found.pop().map(|(p, path, m)| (p, path, m > modified)),
        target_from,
    }))
}

/// A single normal component: `libhello.so`, not `./libhello.so`,
/// `lib/libhello.so` or `/opt/libhello.so`.
fn is_bare_file_name(entry: &Path) -> bool {
    let mut c = entry.components();
    matches!((c.next(), c.next()), (Some(Component::Normal(_)), None))
}

/// The root of the cargo workspace that the package holding `dir` belongs
/// to, as cargo finds it: the nearest directory at or above `dir` with a
/// `Cargo.toml` is the package; its `package.workspace` names the root if
/// set; else the root is the nearest directory at or above the package
/// whose `Cargo.toml` has a `[workspace]` table that does not `exclude`
/// the package; else the package is its own root. `None` without any
/// `Cargo.toml` at or above `dir`.
pub fn workspace_root(dir: &Path) -> Option<PathBuf> {
    let package = dir
        .ancestors()
        .find(|a| a.join("Cargo.toml").is_file())?
        .to_owned();
    let own = read_cargo_toml(&package);
    if let Some(ws) = own
        .as_ref()
        .and_then(|t| t.get("package")?.get("workspace")?.as_str())
    {
        return Some(normalize(&package.join(ws)));
    }
    for a in package.ancestors() {
        let Some(t) = read_cargo_toml(a) else {
            continue;
        };
        let Some(ws) = t.get("workspace") else {
            continue;
        };
        let excluded = ws
            .get("exclude")
            .and_then(|e| e.as_array())
            .into_iter()
            .flatten()
            .filter_map(|e| e.as_str())
            .any(|e| package.starts_with(normalize(&a.join(e))));
        if !excluded {
            return Some(a.to_owned());
        }
    }
    Some(package)
}

/// `build.target-dir` as cargo reads it for a build run in `root`: from the
/// nearest `.cargo/config.toml` (or legacy `.cargo/config`) at or above
/// `root` that sets it, then `$CARGO_HOME/config.toml` (`~/.cargo`); a
/// relative path is taken from the directory holding that `.cargo`. With
/// the file it came from.
pub fn config_target_dir(root: &Path) -> Option<(PathBuf, PathBuf)> {
    let home = std::env::var_os("CARGO_HOME")
        .filter(|h| !h.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cargo")));
    let dirs = root.ancestors().map(|a| a.join(".cargo"));
    for cargo_dir in dirs.chain(home) {
        for name in ["config.toml", "config"] {
            let file = cargo_dir.join(name);
            let Some(t) = read_toml(&file) else {
                continue;
            };
            if let Some(dir) = t
                .get("build")
                .and_then(|b| b.get("target-dir"))
                .and_then(|d| d.as_str())
            {
                let base = cargo_dir.parent().unwrap_or(Path::new("/"));
                return Some((normalize(&base.join(dir)), file));
            }
            // cargo reads `config` only when there is no `config.toml`.
            break;
        }
    }
    None
}

/// `dir/Cargo.toml` parsed, if it is a readable regular file of TOML
/// under [`MAX_CARGO_TOML_BYTES`].
fn read_cargo_toml(dir: &Path) -> Option<toml::Table> {
    read_toml(&dir.join("Cargo.toml"))
}

/// A TOML file parsed, if it is a readable regular file under
/// [`MAX_CARGO_TOML_BYTES`].
fn read_toml(path: &Path) -> Option<toml::Table> {
    let meta = std::fs::metadata(path).ok()?;
    if !meta.is_file() || meta.len() > MAX_CARGO_TOML_BYTES {
        return None;
    }
    std::fs::read_to_string(path).ok()?.parse().ok()
}

/// `path` without `.` components and with each `..` applied to what comes
/// before it (lexically: cargo's paths in `Cargo.toml` are lexical too).
fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::time::Duration;

    struct Tmp(PathBuf);
    impl Tmp {
        fn new(tag: &str) -> Self {
            let p = std::env::temp_dir().join(format!(
                "ember-entry-{tag}-{}-{:?}",
                std::process::id(),
                std::thread::current().id()
            ));
            let _ = fs::remove_dir_all(&p);
            fs::create_dir_all(&p).unwrap();
            Self(p)
        }
    }
    impl Drop for Tmp {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn write(path: &Path, text: &str) {
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, text).unwrap();
    }

    fn built(path: &Path, age_s: u64) {
        write(path, "\x7fELF");
        let f = fs::File::options().write(true).open(path).unwrap();
        f.set_modified(SystemTime::now() - Duration::from_secs(age_s))
            .unwrap();
    }

    /// A workspace `ws` with a member package `ws/examples/m` whose
    /// manifest names `libm.so`.
    fn workspace(t: &Tmp) -> (PathBuf, PathBuf) {
        let ws = t.0.join("ws");
        write(
            &ws.join("Cargo.toml"),
            "[workspace]\nmembers = [\"examples/m\"]\nexclude = [\"outside\"]\n",
        );
        let m = ws.join("examples/m");
        write(&m.join("Cargo.toml"), "[package]\nname = \"m\"\n");
        write(&m.join("module.toml"), "entry = \"libm.so\"\n");
        (ws, m.join("module.toml"))
    }

    #[test]
    fn a_packaged_entry_next_to_its_manifest_wins() {
        let t = Tmp::new("packaged");
        let (ws, manifest) = workspace(&t);
        built(&ws.join("target/release/libm.so"), 0);
        built(&manifest.with_file_name("libm.so"), 100);
        let r = resolve(&manifest, Path::new("libm.so"), None, "release").unwrap();
        assert_eq!(r, Resolved::AsWritten(manifest.with_file_name("libm.so")));
    }

    #[test]
    fn the_preferred_profile_is_picked_and_a_newer_other_build_named() {
        let t = Tmp::new("prefer");
        let (ws, manifest) = workspace(&t);
        built(&ws.join("target/release/libm.so"), 100);
        built(&ws.join("target/debug/libm.so"), 0);
        let entry = Path::new("libm.so");
        let Resolved::Cargo(c) = resolve(&manifest, entry, None, "release").unwrap() else {
            panic!("not a cargo pick")
        };
        assert_eq!(c.path, ws.join("target/release/libm.so"));
        assert_eq!((c.profile, c.preferred), ("release", true));
        assert_eq!(
            c.other,
            Some(("debug", ws.join("target/debug/libm.so"), true))
        );
        assert_eq!(c.target_from, TargetFrom::Workspace(ws.clone()));
        let line = c.to_string();
        assert!(
            line.contains("release build, as emberctl's; the debug build is newer"),
            "{line}"
        );
        let Resolved::Cargo(c) = resolve(&manifest, entry, None, "debug").unwrap() else {
            panic!("not a cargo pick")
        };
        assert_eq!(c.path, ws.join("target/debug/libm.so"));
        assert_eq!(c.other.as_ref().map(|o| o.2), Some(false));
        assert!(!c.to_string().contains("newer"), "{c}");
        // Only the other profile built: that one.
        std::fs::remove_file(ws.join("target/debug/libm.so")).unwrap();
        let Resolved::Cargo(c) = resolve(&manifest, entry, None, "debug").unwrap() else {
            panic!("not a cargo pick")
        };
        assert_eq!(
            (c.profile, c.preferred, c.other.is_none()),
            ("release", false, true)
        );
        assert!(c.to_string().contains("release build, the only one"), "{c}");
    }

    #[test]
    fn cargo_target_dir_replaces_the_workspace_target() {
        let t = Tmp::new("env");
        let (ws, manifest) = workspace(&t);
        built(&ws.join("target/debug/libm.so"), 0);
        let elsewhere = t.0.join("elsewhere");
        built(&elsewhere.join("debug/libm.so"), 100);
        let Resolved::Cargo(c) = resolve(
            &manifest,
            Path::new("libm.so"),
            Some((&elsewhere, "CARGO_TARGET_DIR")),
            "debug",
        )
        .unwrap() else {
            panic!("not a cargo pick")
        };
        assert_eq!(c.path, elsewhere.join("debug/libm.so"));
        assert_eq!(c.target_from, TargetFrom::Env("CARGO_TARGET_DIR"));
        assert!(c.to_string().ends_with("; from CARGO_TARGET_DIR)"), "{c}");
    }

    #[test]
    fn a_config_target_dir_replaces_the_workspace_target() {
        let t = Tmp::new("cfg");
        let (ws, manifest) = workspace(&t);
        built(&ws.join("target/debug/libm.so"), 0);
        built(&t.0.join("out/debug/libm.so"), 100);
        // Above the workspace, relative to the directory holding `.cargo`;
        // a `config` beside a `config.toml` is not read.
        write(
            &t.0.join(".cargo/config.toml"),
            "[build]\ntarget-dir = \"out\"\n",
        );
        write(&ws.join(".cargo/config.toml"), "[net]\nretry = 1\n");
        write(
            &ws.join(".cargo/config"),
            "[build]\ntarget-dir = \"nope\"\n",
        );
        let Resolved::Cargo(c) = resolve(&manifest, Path::new("libm.so"), None, "debug").unwrap()
        else {
            panic!("not a cargo pick")
        };
        assert_eq!(c.path, t.0.join("out/debug/libm.so"));
        let file = t.0.join(".cargo/config.toml");
        assert_eq!(c.target_from, TargetFrom::Config(file.clone()));
        assert!(
            c.to_string()
                .ends_with(&format!("; build.target-dir of {})", file.display())),
            "{c}"
        );
        // The nearest file that sets it wins.
        write(
            &ws.join(".cargo/config.toml"),
            "[build]\ntarget-dir = \"/abs/t\"\n",
        );
        assert_eq!(
            config_target_dir(&ws),
            Some((PathBuf::from("/abs/t"), ws.join(".cargo/config.toml")))
        );
    }

    #[test]
    fn a_missing_entry_lists_every_place_looked() {
        let t = Tmp::new("missing");
        let (ws, manifest) = workspace(&t);
        let e = resolve(&manifest, Path::new("libm.so"), None, "debug").unwrap_err();
        assert_eq!(
            e.looked,
            vec![
                manifest.with_file_name("libm.so"),
                ws.join("target/release/libm.so"),
                ws.join("target/debug/libm.so"),
            ]
        );
        let msg = e.to_string();
        for p in &e.looked {
            assert!(msg.contains(&p.display().to_string()), "{msg}");
        }
        // A path with directories is only looked for where it says.
        let e = resolve(&manifest, Path::new("lib/libm.so"), None, "debug").unwrap_err();
        assert_eq!(e.looked, vec![manifest.with_file_name("lib/libm.so")]);
        // No cargo package around the manifest: said so.
        let lone = t.0.join("lone/module.toml");
        write(&lone, "");
        let e = resolve(&lone, Path::new("libm.so"), None, "debug").unwrap_err();
        assert_eq!(e.looked, vec![lone.with_file_name("libm.so")]);
        assert!(e.to_string().contains("no Cargo.toml"), "{e}");
    }

    #[test]
    fn the_workspace_root_is_found_as_cargo_finds_it() {
        let t = Tmp::new("root");
        let (ws, manifest) = workspace(&t);
        assert_eq!(workspace_root(manifest.parent().unwrap()), Some(ws.clone()));
        // A directory below the package (src/) belongs to it.
        let src = manifest.parent().unwrap().join("src");
        fs::create_dir_all(&src).unwrap();
        assert_eq!(workspace_root(&src), Some(ws.clone()));
        // Excluded from the workspace: its own root.
        let outside = ws.join("outside");
        write(&outside.join("Cargo.toml"), "[package]\nname = \"o\"\n");
        assert_eq!(workspace_root(&outside), Some(outside.clone()));
        // `package.workspace` names the root.
        let far = t.0.join("far");
        write(
            &far.join("Cargo.toml"),
            "[package]\nname = \"f\"\nworkspace = \"../ws\"\n",
        );
        assert_eq!(workspace_root(&far), Some(ws));
        // A lone package is its own root.
        let lone = t.0.join("lone");
        write(&lone.join("Cargo.toml"), "[package]\nname = \"l\"\n");
        assert_eq!(workspace_root(&lone), Some(lone.clone()));
    }
}
