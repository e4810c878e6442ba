//! Gives the SDK's shared library a soname that names its build:
//! `libember_sdk-<16 hex digits>.so`, a hash of the SDK's sources
//! (module-runtime and shm-ipc), the compiler, the target and the profile.
//! A slim module's `DT_NEEDED` records that soname, so emberd can tell at
//! install whether the module was linked against the SDK it offers (the
//! file cargo writes stays `libember_sdk.so`).

use std::path::{Path, PathBuf};
use std::process::Command;

/// FNV-1a, 64 bits: stable across Rust releases, unlike `DefaultHasher`.
struct Fnv(u64);

impl Fnv {
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
        // A separator, so that ("ab", "c") and ("a", "bc") differ.
        self.0 ^= 0xff;
        self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
    }
}

fn files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        let p = e.path();
        if p.is_dir() {
            files(&p, out);
        } else {
            out.push(p);
        }
    }
}

fn main() {
    let here = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let runtime = here.join("..");
    let shm = here.join("../../shm-ipc");
    let inputs = [
        here.join("Cargo.toml"),
        here.join("src"),
        runtime.join("Cargo.toml"),
        runtime.join("build.rs"),
        runtime.join("src"),
        shm.join("Cargo.toml"),
        shm.join("src"),
    ];
    let mut all = Vec::new();
    for i in &inputs {
        println!("cargo:rerun-if-changed={}", i.display());
        if i.is_dir() {
            files(i, &mut all);
        } else {
            all.push(i.clone());
        }
    }
    all.sort();
    let mut h = Fnv(0xcbf2_9ce4_8422_2325);
    for f in &all {
        let rel = f.strip_prefix(&here).unwrap_or(f);
        h.write(rel.to_string_lossy().as_bytes());
        h.write(&std::fs::read(f).unwrap_or_default());
    }
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let version = Command::new(&rustc)
        .arg("-vV")
        .output()
        .map(|o| o.stdout)
        .unwrap_or_default();
    h.write(&version);
    for var in ["TARGET", "PROFILE", "OPT_LEVEL", "DEBUG"] {
        h.write(std::env::var(var).unwrap_or_default().as_bytes());
    }
    let soname = format!("libember_sdk-{:016x}.so", h.0);
    println!("cargo:rustc-link-arg=-Wl,-soname,{soname}");
    println!("cargo:rustc-env=EMBER_SDK_SONAME={soname}");
}
