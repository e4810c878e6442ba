//! Records which Rust standard library this build's toolchain ships as a
//! shared object, for slim modules (`src/host/runtime_libs.rs`): its file
//! name (`libstd-<hash>.so`, which is also its soname and what a slim
//! module's `DT_NEEDED` names), the directory it is in and `rustc -V`.

use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=RUSTC");
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let target = std::env::var("TARGET").unwrap_or_default();
    let run = |args: &[&str]| {
        Command::new(&rustc)
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap_or_default()
    };
    let version = run(&["-V"]);
    let libdir = run(&["--print", "target-libdir", "--target", &target]);
    // Exactly one `libstd-*.so` in a toolchain's target libdir; none on
    // targets without a shared std (then slim modules are unavailable).
    let std_name = std::fs::read_dir(&libdir)
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|n| n.starts_with("libstd-") && n.ends_with(".so"))
        .unwrap_or_default();
    println!("cargo:rustc-env=EMBER_RUSTC_VERSION={version}");
    println!("cargo:rustc-env=EMBER_RUST_LIBDIR={libdir}");
    println!("cargo:rustc-env=EMBER_STD_SONAME={std_name}");
}
