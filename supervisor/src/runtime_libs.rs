//! The shared runtime this emberd offers slim modules: the Rust standard
//! library and the Ember SDK as shared libraries, which its zygote loads
//! and relocates once before it forks (`module_runtime::host::runtime_libs`).
//!
//! Found at start-up ([`init`]): `libember_sdk.so` in `[runtime_libs] dir`
//! of the configuration when set (emberd refuses to start if it is not
//! there), otherwise next to the `emberd` binary (where cargo writes it);
//! std in the same directory or in the toolchain that built emberd.
//! Without them emberd still runs fat modules and refuses slim ones.
//!
//! At install, [`check`] reads the artifact's dynamic section: a module
//! whose `DT_NEEDED` names a Rust standard library or an SDK build this
//! emberd does not offer, or that needs a Rust symbol the offered
//! libraries do not define, is refused with the library it wanted, what
//! this emberd offers and how to rebuild — instead of failing at `dlopen`
//! in a worker. The dynamic loader stays the authority (a file can claim
//! anything); this is the clear error up front.

use std::collections::HashSet;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use module_runtime::elf::{self, DynamicError, ReadAt};
use module_runtime::host::runtime_libs::{
    self as rt, RuntimeLibs, RuntimeLibsError, RUSTC_VERSION, STD_SONAME,
};
use serde::Serialize;

/// What this emberd offers, decided once by [`init`].
#[derive(Debug)]
enum Offered {
    Yes(Offer),
    No(String),
}

/// The shared runtime this emberd offers.
#[derive(Debug)]
pub struct Offer {
    /// Where the libraries are.
    pub libs: RuntimeLibs,
    /// Hashes of the Rust symbols the two libraries define.
    symbols: HashSet<u64>,
}

static OFFERED: OnceLock<Offered> = OnceLock::new();

/// `[runtime_libs] dir` names a directory without a usable runtime.
#[derive(Debug, thiserror::Error)]
#[error("runtime_libs.dir {}: no usable shared runtime", dir.display())]
pub struct InitError {
    /// The configured directory.
    pub dir: PathBuf,
    /// Why.
    #[source]
    pub source: RuntimeLibsError,
}

/// Finds the runtime (see the module docs) and reads the symbols it
/// defines. Call once at start-up, before the zygote is started. Fails
/// only when `dir` was configured and holds no usable runtime; without a
/// configured directory, a runtime that is not found is only not offered.
pub fn init(dir: Option<&Path>) -> Result<(), InitError> {
    let found = RuntimeLibs::locate(dir).and_then(|libs| {
        let mut symbols = HashSet::new();
        for path in [&libs.std, &libs.sdk] {
            read_symbols(path, |name, defined| {
                if defined && is_rust_symbol(name) {
                    symbols.insert(hash(name));
                }
            })?;
        }
        Ok(Offer { libs, symbols })
    });
    let offered = match (found, dir) {
        (Ok(offer), _) => {
            tracing::info!(
                std = %offer.libs.std.display(),
                sdk = %offer.libs.sdk.display(),
                soname = %offer.libs.sdk_soname,
                "offering slim modules the shared runtime"
            );
            Offered::Yes(offer)
        }
        (Err(source), Some(dir)) => {
            return Err(InitError {
                dir: dir.to_owned(),
                source,
            })
        }
        (Err(e), None) => {
            let why = crate::error_chain(&e);
            tracing::info!("no shared runtime for slim modules (fat modules run): {why}");
            Offered::No(why)
        }
    };
    let _ = OFFERED.set(offered);
    Ok(())
}

fn read_symbols(
    path: &Path,
    mut f: impl FnMut(&[u8], bool),
) -> Result<elf::DynamicInfo, RuntimeLibsError> {
    let inspect = |source| RuntimeLibsError::Inspect {
        path: path.to_owned(),
        source,
    };
    let file = std::fs::File::open(path).map_err(|source| {
        inspect(DynamicError::Read {
            path: path.to_owned(),
            source,
        })
    })?;
    elf::for_each_dynamic_symbol(&file, path, |s| f(s.name, s.defined)).map_err(inspect)
}

/// The runtime this emberd offers, if any.
pub fn offered() -> Option<&'static Offer> {
    match OFFERED.get() {
        Some(Offered::Yes(o)) => Some(o),
        _ => None,
    }
}

/// The environment that makes the zygote preload the runtime (none if
/// nothing is offered).
pub fn zygote_env() -> Vec<(&'static str, OsString)> {
    offered().map_or_else(Vec::new, |o| o.libs.to_env().into())
}

/// What `Health` says about the shared runtime.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RuntimeStatus {
    /// Slim modules can run.
    pub offered: bool,
    /// `rustc -V` of the compiler that built emberd (and must build slim
    /// modules).
    pub rustc: String,
    /// The standard library's soname.
    pub std: String,
    /// The SDK's soname (`libember_sdk-<hash>.so`), when offered.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sdk: Option<String>,
    /// The SDK file the zygote loads, when offered.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sdk_path: Option<PathBuf>,
    /// Why nothing is offered.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// The runtime this emberd offers, for `Health`.
pub fn status() -> RuntimeStatus {
    let (sdk, sdk_path, reason) = match OFFERED.get() {
        Some(Offered::Yes(o)) => (
            Some(o.libs.sdk_soname.clone()),
            Some(o.libs.sdk.clone()),
            None,
        ),
        Some(Offered::No(why)) => (None, None, Some(why.clone())),
        None => (None, None, Some("not initialized".to_owned())),
    };
    RuntimeStatus {
        offered: sdk.is_some(),
        rustc: RUSTC_VERSION.to_owned(),
        std: STD_SONAME.to_owned(),
        sdk,
        sdk_path,
        reason,
    }
}

/// A slim module this emberd cannot run.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeMismatch {
    /// The artifact's dynamic section could not be read.
    #[error("cannot read the module's dynamic section")]
    Inspect(#[source] DynamicError),
    /// The module is slim and this emberd offers no shared runtime.
    #[error(
        "the module is slim (it needs {needed}) but this emberd offers no shared runtime ({reason}); \
         build the module fat (depend on module-runtime instead of ember-sdk) or give emberd its \
         runtime (`[runtime_libs] dir`)"
    )]
    NotOffered {
        /// The library it needs.
        needed: String,
        /// Why nothing is offered.
        reason: String,
    },
    /// Built by another Rust compiler.
    #[error(
        "the module needs {needed}, the standard library of another Rust compiler; this emberd \
         offers {offered} ({rustc}): rebuild the module with that compiler"
    )]
    OtherStd {
        /// What the module needs.
        needed: String,
        /// What this emberd offers.
        offered: String,
        /// `rustc -V` of this emberd's compiler.
        rustc: &'static str,
    },
    /// Linked against another build of the SDK.
    #[error(
        "the module needs {needed}, another build of the Ember SDK; this emberd offers {offered}: \
         rebuild the module against this emberd's SDK (the same sources, compiler and profile; \
         `emberctl health` names it)"
    )]
    OtherSdk {
        /// What the module needs.
        needed: String,
        /// What this emberd offers.
        offered: String,
    },
    /// Needs a Rust symbol the offered libraries lack.
    #[error(
        "the module needs `{symbol}`, which this emberd's {offered} and {std} do not define: it was \
         linked against another build of the SDK (another workspace, features or dependency \
         versions); rebuild it in the workspace whose SDK this emberd offers (`emberctl health`), \
         or give emberd the SDK it was linked against (`[runtime_libs] dir`)"
    )]
    MissingSymbol {
        /// The symbol, demangled.
        symbol: String,
        /// The SDK offered.
        offered: String,
        /// The std offered.
        std: &'static str,
    },
}

/// Whether `artifact` is slim.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Linkage {
    /// Carries its own std and SDK.
    Fat,
    /// Links the shared runtime, which this emberd offers.
    Slim,
}

/// Checks that this emberd can run `file` (the artifact `path`): a fat
/// module always; a slim one if it needs exactly the std and SDK offered
/// and every Rust symbol it imports is defined by them.
pub fn check<R: ReadAt + ?Sized>(file: &R, path: &Path) -> Result<Linkage, RuntimeMismatch> {
    check_against(offered(), file, path)
}

fn check_against<R: ReadAt + ?Sized>(
    offer: Option<&Offer>,
    file: &R,
    path: &Path,
) -> Result<Linkage, RuntimeMismatch> {
    let dynamic = elf::DynamicSection::open(file, path).map_err(RuntimeMismatch::Inspect)?;
    let info = dynamic.info().map_err(RuntimeMismatch::Inspect)?;
    let Some(first) = info.needed.iter().find(|n| rt::is_runtime_soname(n)) else {
        return Ok(Linkage::Fat);
    };
    let Some(offer) = offer else {
        let reason = match OFFERED.get() {
            Some(Offered::No(why)) => why.clone(),
            _ => "not initialized".to_owned(),
        };
        return Err(RuntimeMismatch::NotOffered {
            needed: first.clone(),
            reason,
        });
    };
    for needed in info.needed.iter().filter(|n| rt::is_runtime_soname(n)) {
        if needed.starts_with(rt::STD_SONAME_PREFIX) && needed != STD_SONAME {
            return Err(RuntimeMismatch::OtherStd {
                needed: needed.clone(),
                offered: STD_SONAME.to_owned(),
                rustc: RUSTC_VERSION,
            });
        }
        if needed.starts_with(rt::SDK_SONAME_PREFIX) && *needed != offer.libs.sdk_soname {
            return Err(RuntimeMismatch::OtherSdk {
                needed: needed.clone(),
                offered: offer.libs.sdk_soname.clone(),
            });
        }
    }
    let mut missing = None;
    dynamic
        .symbols(|s| {
            if missing.is_none()
                && !s.defined
                && !s.weak
                && is_rust_symbol(s.name)
                && !offer.symbols.contains(&hash(s.name))
            {
                missing = Some(demangle(s.name));
            }
        })
        .map_err(RuntimeMismatch::Inspect)?;
    match missing {
        Some(symbol) => Err(RuntimeMismatch::MissingSymbol {
            symbol,
            offered: offer.libs.sdk_soname.clone(),
            std: STD_SONAME,
        }),
        None => Ok(Linkage::Slim),
    }
}

/// A Rust symbol: legacy mangling (`_ZN…17h<16 hex>E`, which C++ names
/// do not end with) or v0 (`_R…`).
fn is_rust_symbol(name: &[u8]) -> bool {
    if name.starts_with(b"_R") {
        return true;
    }
    name.starts_with(b"_ZN")
        && name.len() > 23
        && name.ends_with(b"E")
        && name[name.len() - 20..name.len() - 17] == *b"17h"
        && name[name.len() - 17..name.len() - 1]
            .iter()
            .all(u8::is_ascii_hexdigit)
}

/// FNV-1a of a symbol name.
fn hash(name: &[u8]) -> u64 {
    name.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// A legacy-mangled path component with its escapes (`$LT$`, `$u20$`,
/// `..`) turned back into the characters they stand for.
fn unescape(part: &str) -> String {
    const ESCAPES: [(&str, &str); 12] = [
        ("$LT$", "<"),
        ("$GT$", ">"),
        ("$RF$", "&"),
        ("$BP$", "*"),
        ("$SP$", "@"),
        ("$C$", ","),
        ("$LP$", "("),
        ("$RP$", ")"),
        ("$u20$", " "),
        ("$u27$", "'"),
        ("$u7b$", "{"),
        ("$u7d$", "}"),
    ];
    let mut s = part
        .strip_prefix("_$")
        .map_or(part.to_owned(), |r| format!("${r}"));
    for (from, to) in ESCAPES {
        s = s.replace(from, to);
    }
    s.replace("..", "::")
}

/// `a::b::c::h0123…` from a legacy-mangled `_ZN1a1b1c17h0123…E`; anything
/// else as it is.
fn demangle(name: &[u8]) -> String {
    let raw = || String::from_utf8_lossy(name).into_owned();
    let Some(mut rest) = name.strip_prefix(b"_ZN") else {
        return raw();
    };
    let mut parts = Vec::new();
    while let Some(&c) = rest.first() {
        if c == b'E' {
            return parts.join("::");
        }
        let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
        let Some(len) = std::str::from_utf8(&rest[..digits])
            .ok()
            .and_then(|d| d.parse::<usize>().ok())
        else {
            return raw();
        };
        let Some(part) = rest.get(digits..digits + len) else {
            return raw();
        };
        parts.push(unescape(&String::from_utf8_lossy(part)));
        rest = &rest[digits + len..];
    }
    raw()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rust_symbols_are_told_from_c_and_cpp() {
        assert!(is_rust_symbol(
            b"_ZN14module_runtime3sdk5ready17h0123456789abcdefE"
        ));
        assert!(is_rust_symbol(b"_RNvCs1234_7mycrate3foo"));
        assert!(!is_rust_symbol(b"malloc"));
        assert!(!is_rust_symbol(b"_ZNSt6vectorIiSaIiEE9push_backERKi"));
        assert!(!is_rust_symbol(b"_ZN3foo3barE"));
    }

    #[test]
    fn legacy_names_demangle_to_paths() {
        assert_eq!(
            demangle(b"_ZN14module_runtime3sdk5ready17h0123456789abcdefE"),
            "module_runtime::sdk::ready::h0123456789abcdef"
        );
        assert_eq!(
            demangle(b"_ZN42_$LT$$RF$T$u20$as$u20$core..fmt..Debug$GT$3fmt17h3deb23aa4496a3e6E"),
            "<&T as core::fmt::Debug>::fmt::h3deb23aa4496a3e6"
        );
        assert_eq!(demangle(b"_ZN99short"), "_ZN99short");
        assert_eq!(demangle(b"malloc"), "malloc");
    }
}
