//! Module images: `emberctl pack DIR` writes a module (its `module.toml`
//! and its library) as an OCI image archive that `ctr images import`
//! takes, for the containerd shim to run (docs/kubernetes.md).
//!
//! The archive is a plain tar in the OCI image layout: `oci-layout`,
//! `index.json` (one manifest, named by the annotation
//! `io.containerd.image.name`, which is what names the image on import) and
//! `blobs/sha256/` holding one uncompressed layer (the image's files:
//! `module.toml` and the library at the root, the manifest's `entry`
//! rewritten to the library's file name), the image config and the image
//! manifest. The config's label and the manifest's annotation
//! `dev.ember.module = "module.toml"` say where the module's manifest is in
//! the image. Every tar entry has mode 0644 or 0755, owner 0 and time 0, and
//! the JSON is written with sorted keys: the same module gives the same
//! bytes and digests.

use std::path::{Path, PathBuf};

use serde_json::json;
use sha2::{Digest, Sha256};

/// The annotation (and config label) naming the module's manifest in the
/// image.
pub const MODULE_ANNOTATION: &str = "dev.ember.module";

/// The image's entrypoint: never run (the shim hands the image to emberd),
/// but the CRI refuses a container without a command.
pub const ENTRYPOINT: &str = "/ember-module";

/// Why a module could not be packed.
#[derive(Debug, thiserror::Error)]
pub enum PackError {
    /// A file could not be read.
    #[error("cannot read {}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The manifest is not a valid manifest.
    #[error("invalid manifest {}", path.display())]
    Manifest {
        /// The manifest.
        path: PathBuf,
        /// What is wrong.
        #[source]
        source: crate::manifest::ManifestError,
    },
    /// The image name is unusable.
    #[error("image name {0:?} is not a reference like ember.local/NAME:TAG")]
    Name(String),
    /// A file is too large for a tar entry.
    #[error("{0} is too large for the archive")]
    TooLarge(String),
}

/// A packed image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Packed {
    /// The archive's bytes.
    pub archive: Vec<u8>,
    /// The image name (`io.containerd.image.name`).
    pub name: String,
    /// The image manifest's digest (`sha256:…`).
    pub digest: String,
}

/// The OCI architecture name of this host.
pub fn architecture() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "powerpc64" => "ppc64le",
        other => other,
    }
}

/// The default image name of a module: `ember.local/NAME:VERSION` (a
/// `+` of the version, not allowed in a tag, becomes `_`).
pub fn default_name(name: &str, version: &str) -> String {
    format!("ember.local/{name}:{}", version.replace('+', "_"))
}

/// The tag of a reference (`0.1.0` of `ember.local/greeter:0.1.0`), or
/// `latest`.
fn tag(reference: &str) -> &str {
    let last = reference.rsplit('/').next().unwrap_or(reference);
    match last.rsplit_once(':') {
        Some((_, t)) if !t.is_empty() => t,
        _ => "latest",
    }
}

fn check_name(reference: &str) -> Result<(), PackError> {
    let ok = !reference.is_empty()
        && reference.len() <= 255
        && !reference.starts_with(['/', ':', '.', '-'])
        && !reference.ends_with([':', '/'])
        && reference.bytes().all(|b| {
            b.is_ascii_lowercase()
                || b.is_ascii_digit()
                || matches!(b, b'.' | b'-' | b'_' | b'/' | b':')
                || (b.is_ascii_uppercase() && reference.contains(':'))
        });
    if ok {
        Ok(())
    } else {
        Err(PackError::Name(reference.to_owned()))
    }
}

/// Packs the module whose manifest is at `manifest` with its library at
/// `library` (where `entry` was found: see [`crate::entry::resolve`]), as
/// the image `name` (default [`default_name`]).
pub fn pack(manifest: &Path, library: &Path, name: Option<&str>) -> Result<Packed, PackError> {
    let read = |p: &Path| {
        std::fs::read(p).map_err(|source| PackError::Read {
            path: p.to_owned(),
            source,
        })
    };
    let text = String::from_utf8(read(manifest)?).map_err(|e| PackError::Read {
        path: manifest.to_owned(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
    })?;
    let summary = crate::manifest::parse(&text).map_err(|source| PackError::Manifest {
        path: manifest.to_owned(),
        source,
    })?;
    let lib = read(library)?;
    let file = library
        .file_name()
        .and_then(|f| f.to_str())
        .filter(|f| *f != "module.toml")
        .map_or_else(|| format!("lib{}.so", summary.name), str::to_owned);
    let text = with_entry(&text, &file).map_err(|source| PackError::Manifest {
        path: manifest.to_owned(),
        source,
    })?;
    let reference = name.map_or_else(
        || default_name(&summary.name, &summary.version),
        str::to_owned,
    );
    check_name(&reference)?;
    build(&reference, &text, &file, &lib)
}

/// The manifest with `entry = file`: unchanged if it says so already.
fn with_entry(text: &str, file: &str) -> Result<String, crate::manifest::ManifestError> {
    let mut doc: toml::Table =
        toml::from_str(text).map_err(|e| crate::manifest::ManifestError::Field {
            field: "entry".into(),
            reason: e.to_string(),
        })?;
    if doc.get("entry").and_then(|v| v.as_str()) == Some(file) {
        return Ok(text.to_owned());
    }
    doc.insert("entry".into(), toml::Value::String(file.to_owned()));
    toml::to_string(&doc).map_err(|e| crate::manifest::ManifestError::Field {
        field: "entry".into(),
        reason: e.to_string(),
    })
}

fn sha256(b: &[u8]) -> String {
    let d = Sha256::digest(b);
    d.iter().map(|x| format!("{x:02x}")).collect()
}

fn build(reference: &str, manifest: &str, file: &str, lib: &[u8]) -> Result<Packed, PackError> {
    let mut files: Vec<(&str, &[u8], u32)> = vec![
        ("module.toml", manifest.as_bytes(), 0o644),
        (file, lib, 0o755),
    ];
    files.sort_by(|a, b| a.0.cmp(b.0));
    let layer = tar(&files)?;
    let layer_hex = sha256(&layer);
    let arch = architecture();
    let config = serde_json::to_vec(&json!({
        "architecture": arch,
        "os": "linux",
        "config": {
            "Entrypoint": [ENTRYPOINT],
            "Labels": { MODULE_ANNOTATION: "module.toml" },
        },
        "rootfs": { "type": "layers", "diff_ids": [format!("sha256:{layer_hex}")] },
    }))
    .expect("json");
    let config_hex = sha256(&config);
    let image_manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": format!("sha256:{config_hex}"),
            "size": config.len(),
        },
        "layers": [{
            "mediaType": "application/vnd.oci.image.layer.v1.tar",
            "digest": format!("sha256:{layer_hex}"),
            "size": layer.len(),
        }],
        "annotations": { MODULE_ANNOTATION: "module.toml" },
    }))
    .expect("json");
    let manifest_hex = sha256(&image_manifest);
    let index = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": format!("sha256:{manifest_hex}"),
            "size": image_manifest.len(),
            "platform": { "architecture": arch, "os": "linux" },
            "annotations": {
                "io.containerd.image.name": reference,
                "org.opencontainers.image.ref.name": tag(reference),
            },
        }],
    }))
    .expect("json");
    let layout = br#"{"imageLayoutVersion":"1.0.0"}"#;
    let blob = |h: &str| format!("blobs/sha256/{h}");
    let (c, l, m) = (blob(&config_hex), blob(&layer_hex), blob(&manifest_hex));
    let mut outer: Vec<(&str, &[u8], u32)> = vec![
        ("oci-layout", layout, 0o644),
        ("index.json", &index, 0o644),
        (&c, &config, 0o644),
        (&l, &layer, 0o644),
        (&m, &image_manifest, 0o644),
    ];
    outer[2..].sort_by(|a, b| a.0.cmp(b.0));
    Ok(Packed {
        archive: tar(&outer)?,
        name: reference.to_owned(),
        digest: format!("sha256:{manifest_hex}"),
    })
}

/// A ustar archive of regular files (name, bytes, mode), owner 0, time 0.
fn tar(files: &[(&str, &[u8], u32)]) -> Result<Vec<u8>, PackError> {
    let mut out = Vec::new();
    for (name, data, mode) in files {
        if name.len() > 100 {
            return Err(PackError::TooLarge(format!("the name {name}")));
        }
        if data.len() as u64 >= 1 << 33 {
            return Err(PackError::TooLarge((*name).to_owned()));
        }
        out.extend_from_slice(&header(name, data.len() as u64, *mode));
        out.extend_from_slice(data);
        out.resize(out.len().div_ceil(512) * 512, 0);
    }
    out.resize(out.len() + 1024, 0);
    Ok(out)
}

fn header(name: &str, size: u64, mode: u32) -> [u8; 512] {
    let mut h = [0u8; 512];
    let put = |h: &mut [u8; 512], at: usize, s: &[u8]| h[at..at + s.len()].copy_from_slice(s);
    put(&mut h, 0, name.as_bytes());
    put(&mut h, 100, format!("{mode:07o}\0").as_bytes());
    put(&mut h, 108, b"0000000\0"); // uid
    put(&mut h, 116, b"0000000\0"); // gid
    put(&mut h, 124, format!("{size:011o}\0").as_bytes());
    put(&mut h, 136, b"00000000000\0"); // mtime
    put(&mut h, 148, b"        "); // checksum, as spaces while summed
    h[156] = b'0'; // regular file
    put(&mut h, 257, b"ustar\0");
    put(&mut h, 263, b"00");
    put(&mut h, 265, b"root");
    put(&mut h, 297, b"root");
    let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
    put(&mut h, 148, format!("{sum:06o}\0 ").as_bytes());
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reads a ustar archive back: (name, mode, data).
    fn untar(b: &[u8]) -> Vec<(String, u32, Vec<u8>)> {
        let mut out = Vec::new();
        let mut at = 0;
        while at + 512 <= b.len() && b[at] != 0 {
            let h = &b[at..at + 512];
            let field = |r: std::ops::Range<usize>| {
                String::from_utf8_lossy(&h[r])
                    .trim_end_matches(['\0', ' '])
                    .to_owned()
            };
            let sum: u32 = h
                .iter()
                .enumerate()
                .map(|(i, &x)| {
                    if (148..156).contains(&i) {
                        32
                    } else {
                        u32::from(x)
                    }
                })
                .sum();
            assert_eq!(u32::from_str_radix(&field(148..154), 8).unwrap(), sum);
            assert_eq!(&h[257..263], b"ustar\0");
            let size = usize::from_str_radix(&field(124..135), 8).unwrap();
            let mode = u32::from_str_radix(&field(100..107), 8).unwrap();
            let data = b[at + 512..at + 512 + size].to_vec();
            out.push((field(0..100), mode, data));
            at += 512 + size.div_ceil(512) * 512;
        }
        assert!(b[at..].iter().all(|&x| x == 0) && b.len() - at >= 1024);
        out
    }

    fn packed() -> Packed {
        let manifest = "name = \"greeter\"\nversion = \"0.1.0+abc\"\nentry = \"../target/libgreeter.so\"\n[config]\ngreeting = \"hi\"\n";
        let text = with_entry(manifest, "libgreeter.so").unwrap();
        build(
            &default_name("greeter", "0.1.0+abc"),
            &text,
            "libgreeter.so",
            b"\x7fELF fake",
        )
        .unwrap()
    }

    #[test]
    fn an_archive_is_an_oci_layout_with_consistent_digests() {
        let p = packed();
        assert_eq!(p.name, "ember.local/greeter:0.1.0_abc");
        let files = untar(&p.archive);
        let names: Vec<&str> = files.iter().map(|f| f.0.as_str()).collect();
        assert_eq!(&names[..2], ["oci-layout", "index.json"]);
        let blob = |d: &str| {
            let hex = d.strip_prefix("sha256:").unwrap();
            let f = files
                .iter()
                .find(|f| f.0 == format!("blobs/sha256/{hex}"))
                .unwrap_or_else(|| panic!("no blob {d}"));
            assert_eq!(sha256(&f.2), hex, "digest of {}", f.0);
            f.2.clone()
        };
        let index: serde_json::Value = serde_json::from_slice(&files[1].2).unwrap();
        let entry = &index["manifests"][0];
        assert_eq!(
            entry["annotations"]["io.containerd.image.name"],
            "ember.local/greeter:0.1.0_abc"
        );
        assert_eq!(
            entry["annotations"]["org.opencontainers.image.ref.name"],
            "0.1.0_abc"
        );
        assert_eq!(entry["platform"]["architecture"], architecture());
        assert_eq!(entry["digest"], p.digest);
        let m: serde_json::Value = serde_json::from_slice(&blob(p.digest.as_str())).unwrap();
        assert_eq!(m["annotations"][MODULE_ANNOTATION], "module.toml");
        let config: serde_json::Value =
            serde_json::from_slice(&blob(m["config"]["digest"].as_str().unwrap())).unwrap();
        assert_eq!(config["config"]["Labels"][MODULE_ANNOTATION], "module.toml");
        assert_eq!(config["config"]["Entrypoint"][0], ENTRYPOINT);
        let layer_digest = m["layers"][0]["digest"].as_str().unwrap();
        assert_eq!(config["rootfs"]["diff_ids"][0], layer_digest);
        let layer = untar(&blob(layer_digest));
        assert_eq!(layer.len(), 2);
        assert_eq!(layer[0].0, "libgreeter.so");
        assert_eq!(layer[0].1, 0o755);
        assert_eq!(layer[0].2, b"\x7fELF fake");
        assert_eq!(layer[1].0, "module.toml");
        let text = String::from_utf8(layer[1].2.clone()).unwrap();
        let s = crate::manifest::parse(&text).unwrap();
        assert_eq!(s.entry, Path::new("libgreeter.so"));
        assert!(text.contains("greeting = \"hi\""), "{text}");
    }

    #[test]
    fn packing_is_deterministic() {
        assert_eq!(packed(), packed());
    }

    #[test]
    fn an_entry_already_in_place_keeps_the_manifest_as_written() {
        let m = "# comment\nname = \"a\"\nversion = \"1.0.0\"\nentry = \"liba.so\"\n";
        assert_eq!(with_entry(m, "liba.so").unwrap(), m);
    }

    #[test]
    fn names_are_checked() {
        assert!(check_name("ember.local/greeter:0.1.0").is_ok());
        assert!(check_name("registry.example.com:5000/team/greeter:v1").is_ok());
        assert!(check_name("").is_err());
        assert!(check_name("has space:1").is_err());
        assert!(check_name("ember.local/greeter:").is_err());
        assert_eq!(tag("ember.local/greeter"), "latest");
        assert_eq!(tag("host:5000/greeter"), "latest");
        assert_eq!(tag("host:5000/greeter:v2"), "v2");
    }
}
