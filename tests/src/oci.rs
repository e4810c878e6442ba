//! Module images for the Kubernetes tests: OCI image archives that
//! `ctr images import` accepts, holding a module directory (`module.toml`
//! plus its library) as the image's one layer.
//!
//! The layout is the one `emberctl pack` writes (docs/kubernetes.md): an
//! uncompressed layer, the annotation `io.containerd.image.name` naming the
//! image, `dev.ember.module = "module.toml"` on the manifest and as a label
//! of the config. Module images are made by `emberctl pack` itself ([`pack`]);
//! the pause image, which holds no module, by this crate's writer.

use std::path::{Path, PathBuf};

use serde_json::json;
use sha2::{Digest, Sha256};

/// Digests of an image written by [`pack`] (`sha256:…`).
#[derive(Debug, Clone)]
pub struct Image {
    /// The reference it imports as (`ember.local/NAME:VERSION`).
    pub reference: String,
    /// The archive.
    pub archive: PathBuf,
    /// The image manifest's digest.
    pub manifest: String,
    /// The image config's digest: the image id CRI reports.
    pub config: String,
}

/// Packs the module directory `dir` as an OCI image archive `out` named
/// `reference`, and reads its digests back from the archive.
pub fn pack(dir: &Path, reference: &str, out: &Path) -> Image {
    // What a user runs: `emberctl pack DIR -o OUT --name REF`.
    let done = std::process::Command::new(crate::daemon::emberctl())
        .arg("pack")
        .arg(dir)
        .arg("-o")
        .arg(out)
        .args(["--name", reference])
        .output()
        .expect("run emberctl pack");
    assert!(
        done.status.success(),
        "emberctl pack {}: {}",
        dir.display(),
        String::from_utf8_lossy(&done.stderr)
    );
    read_image(out)
}

/// The reference and digests of the (first) image in an OCI archive.
pub fn read_image(archive: &Path) -> Image {
    let files = untar(&std::fs::read(archive).unwrap());
    let get = |name: &str| -> serde_json::Value {
        let data = files
            .iter()
            .find(|(n, _)| n == name)
            .unwrap_or_else(|| panic!("{} has no {name}", archive.display()));
        serde_json::from_slice(&data.1).unwrap_or_else(|e| panic!("{name}: {e}"))
    };
    let blob = |d: &str| format!("blobs/sha256/{}", d.trim_start_matches("sha256:"));
    let index = get("index.json");
    let m = &index["manifests"][0];
    let manifest = m["digest"].as_str().expect("a manifest digest").to_owned();
    let config = get(&blob(&manifest))["config"]["digest"]
        .as_str()
        .expect("a config digest")
        .to_owned();
    Image {
        reference: m["annotations"]["io.containerd.image.name"]
            .as_str()
            .expect("io.containerd.image.name")
            .to_owned(),
        archive: archive.to_owned(),
        manifest,
        config,
    }
}

/// The regular files of a ustar archive: (name, content).
pub fn untar(mut data: &[u8]) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    while data.len() >= 512 && data[..512].iter().any(|&b| b != 0) {
        let h = &data[..512];
        let field = |at: usize, len: usize| {
            let f = &h[at..at + len];
            let end = f.iter().position(|&b| b == 0).unwrap_or(len);
            String::from_utf8_lossy(&f[..end]).trim().to_owned()
        };
        let mut name = field(0, 100);
        let prefix = field(345, 155);
        if !prefix.is_empty() {
            name = format!("{prefix}/{name}");
        }
        let size = usize::from_str_radix(&field(124, 12), 8).expect("tar size field");
        let body = &data[512..512 + size];
        if matches!(h[156], b'0' | 0) {
            out.push((name, body.to_vec()));
        }
        data = &data[(512 + size.div_ceil(512) * 512).min(data.len())..];
    }
    out
}

/// A pause image for the pod sandbox: Ember's shim runs no process for it,
/// so its layer holds one text file and its entrypoint names nothing that
/// exists (CRI only requires one to be set).
pub fn pause(reference: &str, out: &Path) -> Image {
    let note = b"The ember shim runs no process for a pod sandbox.\n".to_vec();
    let layer = tar(&[("EMBER-PAUSE".to_owned(), note, 0o644)]);
    image_archive(reference, &layer, &["/pause"], out)
}

fn image_archive(reference: &str, layer: &[u8], entrypoint: &[&str], out: &Path) -> Image {
    let tag = reference
        .rsplit_once(':')
        .filter(|(_, t)| !t.contains('/'))
        .map_or("latest", |(_, t)| t);
    let layer_digest = digest(layer);
    let config = serde_json::to_vec(&json!({
        "architecture": oci_arch(),
        "os": "linux",
        "config": {
            "Entrypoint": entrypoint,
            "Labels": { "dev.ember.module": "module.toml" },
        },
        "rootfs": { "type": "layers", "diff_ids": [layer_digest] },
    }))
    .unwrap();
    let config_digest = digest(&config);
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": config_digest,
            "size": config.len(),
        },
        "layers": [{
            "mediaType": "application/vnd.oci.image.layer.v1.tar",
            "digest": layer_digest,
            "size": layer.len(),
        }],
        "annotations": { "dev.ember.module": "module.toml" },
    }))
    .unwrap();
    let manifest_digest = digest(&manifest);
    let index = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": manifest_digest,
            "size": manifest.len(),
            "platform": { "architecture": oci_arch(), "os": "linux" },
            "annotations": {
                "io.containerd.image.name": reference,
                "org.opencontainers.image.ref.name": tag,
            },
        }],
    }))
    .unwrap();
    let blob = |d: &str| format!("blobs/sha256/{}", d.trim_start_matches("sha256:"));
    let entries = vec![
        (
            "oci-layout".to_owned(),
            br#"{"imageLayoutVersion":"1.0.0"}"#.to_vec(),
            0o644,
        ),
        ("index.json".to_owned(), index, 0o644),
        (blob(&layer_digest), layer.to_vec(), 0o644),
        (blob(&config_digest), config, 0o644),
        (blob(&manifest_digest), manifest, 0o644),
    ];
    std::fs::write(out, tar(&entries)).unwrap();
    Image {
        reference: reference.to_owned(),
        archive: out.to_owned(),
        manifest: manifest_digest,
        config: config_digest,
    }
}

/// The running machine's architecture in OCI's words.
fn oci_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

/// `sha256:<hex>` of `data`.
pub fn digest(data: &[u8]) -> String {
    let hash = Sha256::digest(data);
    let mut s = String::from("sha256:");
    for b in hash {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

/// A deterministic ustar archive of regular files (mtime 0, uid/gid 0).
pub fn tar(files: &[(String, Vec<u8>, u32)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, data, mode) in files {
        assert!(name.len() < 100, "tar name too long: {name}");
        let mut h = [0u8; 512];
        let put = |h: &mut [u8; 512], at: usize, len: usize, v: &[u8]| {
            h[at..at + v.len().min(len)].copy_from_slice(&v[..v.len().min(len)]);
        };
        let octal = |v: u64, width: usize| format!("{v:0w$o}\0", w = width - 1).into_bytes();
        put(&mut h, 0, 100, name.as_bytes());
        put(&mut h, 100, 8, &octal(u64::from(*mode), 8));
        put(&mut h, 108, 8, &octal(0, 8));
        put(&mut h, 116, 8, &octal(0, 8));
        put(&mut h, 124, 12, &octal(data.len() as u64, 12));
        put(&mut h, 136, 12, &octal(0, 12));
        h[148..156].fill(b' ');
        h[156] = b'0';
        put(&mut h, 257, 6, b"ustar\0");
        put(&mut h, 263, 2, b"00");
        let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
        put(&mut h, 148, 8, format!("{sum:06o}\0 ").as_bytes());
        out.extend_from_slice(&h);
        out.extend_from_slice(data);
        out.resize(out.len().div_ceil(512) * 512, 0);
    }
    out.resize(out.len() + 1024, 0);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tar_headers_carry_a_valid_checksum_and_pad_to_blocks() {
        let t = tar(&[("a.txt".to_owned(), b"hello".to_vec(), 0o644)]);
        assert_eq!(t.len(), 512 + 512 + 1024);
        let h = &t[..512];
        let stored = u32::from_str_radix(
            std::str::from_utf8(&h[148..154])
                .unwrap()
                .trim_matches(['\0', ' ']),
            8,
        )
        .unwrap();
        let mut blank = h.to_vec();
        blank[148..156].fill(b' ');
        assert_eq!(stored, blank.iter().map(|&b| u32::from(b)).sum::<u32>());
        assert_eq!(&t[512..517], b"hello");
        assert_eq!(untar(&t), [("a.txt".to_owned(), b"hello".to_vec())]);
    }
}
