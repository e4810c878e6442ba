//! ELF header check done before `dlopen`, so that a file that is not a
//! shared object, or one built for another architecture, is a clear error
//! instead of whatever the dynamic loader makes of it.

use std::io::Read;
use std::path::{Path, PathBuf};

/// Why a file cannot be loaded as a module or plugin.
#[derive(Debug, thiserror::Error)]
pub enum ElfError {
    /// The file could not be read.
    #[error("cannot read {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// No ELF magic (or too short).
    #[error("{path} is not an ELF file")]
    NotElf {
        /// The file.
        path: PathBuf,
    },
    /// ELF, but not `ET_DYN`.
    #[error("{path} is not a shared object (ELF type {e_type})")]
    NotSharedObject {
        /// The file.
        path: PathBuf,
        /// The `e_type` found.
        e_type: u16,
    },
    /// 32/64-bit or endianness differ from the host.
    #[error("{path} has the wrong ELF class or byte order ({found}, host is {expected})")]
    WrongClass {
        /// The file.
        path: PathBuf,
        /// What the file is.
        found: &'static str,
        /// What the host is.
        expected: &'static str,
    },
    /// Built for another machine.
    #[error("{path} is built for {found}, host is {expected}")]
    WrongArchitecture {
        /// The file.
        path: PathBuf,
        /// Machine named in the file.
        found: String,
        /// Host machine.
        expected: String,
    },
}

const ET_DYN: u16 = 3;

fn host_machine() -> u16 {
    if cfg!(target_arch = "x86_64") {
        62
    } else if cfg!(target_arch = "aarch64") {
        183
    } else if cfg!(target_arch = "riscv64") {
        243
    } else if cfg!(target_arch = "x86") {
        3
    } else if cfg!(target_arch = "arm") {
        40
    } else {
        0
    }
}

fn machine_name(m: u16) -> String {
    match m {
        3 => "x86".into(),
        40 => "arm".into(),
        62 => "x86_64".into(),
        183 => "aarch64".into(),
        243 => "riscv".into(),
        other => format!("ELF machine {other}"),
    }
}

fn class_name(class: u8, data: u8) -> &'static str {
    match (class, data) {
        (1, 1) => "32-bit little-endian",
        (1, 2) => "32-bit big-endian",
        (2, 1) => "64-bit little-endian",
        (2, 2) => "64-bit big-endian",
        _ => "unknown class",
    }
}

/// Checks that the first bytes of an ELF file describe a shared object for
/// this host. Pure function over the header bytes.
pub fn check_header(path: &Path, head: &[u8]) -> Result<(), ElfError> {
    if head.len() < 20 || head[..4] != *b"\x7fELF" {
        return Err(ElfError::NotElf {
            path: path.to_owned(),
        });
    }
    let (class, data) = (head[4], head[5]);
    let host_class = if cfg!(target_pointer_width = "64") {
        2
    } else {
        1
    };
    let host_data = if cfg!(target_endian = "little") { 1 } else { 2 };
    if (class, data) != (host_class, host_data) {
        return Err(ElfError::WrongClass {
            path: path.to_owned(),
            found: class_name(class, data),
            expected: class_name(host_class, host_data),
        });
    }
    let u16_at = |i: usize| {
        let b = [head[i], head[i + 1]];
        if data == 1 {
            u16::from_le_bytes(b)
        } else {
            u16::from_be_bytes(b)
        }
    };
    let e_type = u16_at(16);
    if e_type != ET_DYN {
        return Err(ElfError::NotSharedObject {
            path: path.to_owned(),
            e_type,
        });
    }
    let machine = u16_at(18);
    if machine != host_machine() {
        return Err(ElfError::WrongArchitecture {
            path: path.to_owned(),
            found: machine_name(machine),
            expected: machine_name(host_machine()),
        });
    }
    Ok(())
}

/// Reads the header of `path` and runs [`check_header`].
pub fn check_file(path: &Path) -> Result<(), ElfError> {
    check_file_as(path, path)
}

/// [`check_file`] of the file at `open`, with errors naming it `name` (for
/// a file opened through `/proc/self/fd`).
pub fn check_file_as(open: &Path, name: &Path) -> Result<(), ElfError> {
    let path = name;
    let read = |source| ElfError::Read {
        path: path.to_owned(),
        source,
    };
    let mut f = std::fs::File::open(open).map_err(read)?;
    let mut head = [0u8; 64];
    let mut n = 0;
    while n < head.len() {
        match f.read(&mut head[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(read(e)),
        }
    }
    check_header(path, &head[..n])
}

/// What the dynamic section of a shared object says about linking: the
/// libraries it needs (`DT_NEEDED`, in order) and its own `DT_SONAME`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DynamicInfo {
    /// `DT_NEEDED` entries, in order.
    pub needed: Vec<String>,
    /// `DT_SONAME`, if any.
    pub soname: Option<String>,
}

/// One dynamic symbol ([`for_each_dynamic_symbol`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DynamicSymbol<'a> {
    /// Its name.
    pub name: &'a [u8],
    /// Defined in this object (`st_shndx != SHN_UNDEF`), else needed from
    /// another.
    pub defined: bool,
    /// A weak symbol (`STB_WEAK`): the loader tolerates it missing.
    pub weak: bool,
}

/// Why the dynamic section of a file could not be read.
#[derive(Debug, thiserror::Error)]
pub enum DynamicError {
    /// The file could not be read.
    #[error("cannot read {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A header, table or string points outside the file or is malformed.
    #[error("{path}: malformed ELF dynamic section ({what})")]
    Malformed {
        /// The file.
        path: PathBuf,
        /// What was wrong.
        what: &'static str,
    },
}

/// Something the dynamic-section reader reads from: a file (`pread`) or
/// bytes in memory (tests).
pub trait ReadAt {
    /// Size in bytes.
    fn size(&self) -> std::io::Result<u64>;
    /// Fills `buf` from `offset`; fails at the end of the data.
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()>;
}

impl ReadAt for std::fs::File {
    fn size(&self) -> std::io::Result<u64> {
        Ok(self.metadata()?.len())
    }
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        std::os::unix::fs::FileExt::read_exact_at(self, buf, offset)
    }
}

impl ReadAt for [u8] {
    fn size(&self) -> std::io::Result<u64> {
        Ok(self.len() as u64)
    }
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        let end = offset
            .checked_add(buf.len() as u64)
            .filter(|&e| e <= self.len() as u64)
            .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::UnexpectedEof))?;
        buf.copy_from_slice(&self[offset as usize..end as usize]);
        Ok(())
    }
}

const PT_LOAD: u32 = 1;
const PT_DYNAMIC: u32 = 2;
const DT_NULL: u64 = 0;
const DT_NEEDED: u64 = 1;
const DT_HASH: u64 = 4;
const DT_STRTAB: u64 = 5;
const DT_SYMTAB: u64 = 6;
const DT_STRSZ: u64 = 10;
const DT_SONAME: u64 = 14;
const DT_GNU_HASH: u64 = 0x6fff_fef5;
const SYM_SIZE: u64 = 24;

/// The dynamic section of a 64-bit little-endian ELF shared object: what
/// the dynamic loader links by, found the way it finds it (program
/// headers, `PT_DYNAMIC`, then virtual addresses translated through
/// `PT_LOAD`). Every offset and size is checked against the file; nothing
/// in it is trusted.
pub struct DynamicSection<'a, R: ?Sized> {
    file: &'a R,
    path: &'a Path,
    len: u64,
    loads: Vec<(u64, u64, u64)>,
    entries: Vec<(u64, u64)>,
    strtab: Vec<u8>,
}

impl<'a, R: ReadAt + ?Sized> DynamicSection<'a, R> {
    fn malformed(&self, what: &'static str) -> DynamicError {
        DynamicError::Malformed {
            path: self.path.to_owned(),
            what,
        }
    }

    fn read(&self, offset: u64, len: u64, what: &'static str) -> Result<Vec<u8>, DynamicError> {
        if offset.checked_add(len).is_none_or(|end| end > self.len) {
            return Err(self.malformed(what));
        }
        let mut buf = vec![0u8; len as usize];
        self.file
            .read_exact_at(&mut buf, offset)
            .map_err(|source| DynamicError::Read {
                path: self.path.to_owned(),
                source,
            })?;
        Ok(buf)
    }

    /// Reads the headers, the dynamic entries and the string table of the
    /// shared object in `file` (errors name it `path`).
    pub fn open(file: &'a R, path: &'a Path) -> Result<Self, DynamicError> {
        let len = file.size().map_err(|source| DynamicError::Read {
            path: path.to_owned(),
            source,
        })?;
        let mut d = Self {
            file,
            path,
            len,
            loads: Vec::new(),
            entries: Vec::new(),
            strtab: Vec::new(),
        };
        let head = d.read(0, 64, "ELF header")?;
        check_header(path, &head).map_err(|_| d.malformed("not an ELF shared object"))?;
        if head[4] != 2 || head[5] != 1 {
            return Err(d.malformed("not 64-bit little-endian"));
        }
        let phoff = u64_at(&head, 0x20);
        let phentsize = u64::from(u16_at(&head, 0x36));
        let phnum = u64::from(u16_at(&head, 0x38));
        if phentsize < 56 {
            return Err(d.malformed("program header size"));
        }
        let phdrs = d.read(phoff, phentsize * phnum, "program headers")?;
        let mut dynamic = None;
        for ph in phdrs.chunks_exact(phentsize as usize) {
            let (ty, offset, vaddr, filesz) =
                (u32_at(ph, 0), u64_at(ph, 8), u64_at(ph, 16), u64_at(ph, 32));
            match ty {
                PT_LOAD => d.loads.push((vaddr, filesz, offset)),
                PT_DYNAMIC => dynamic = Some((offset, filesz)),
                _ => {}
            }
        }
        let (offset, size) = dynamic.ok_or_else(|| d.malformed("no PT_DYNAMIC"))?;
        let raw = d.read(offset, size - size % 16, "PT_DYNAMIC")?;
        for e in raw.chunks_exact(16) {
            let (tag, val) = (u64_at(e, 0), u64_at(e, 8));
            if tag == DT_NULL {
                break;
            }
            d.entries.push((tag, val));
        }
        let strtab = d.offset_of(
            d.tag(DT_STRTAB)
                .ok_or_else(|| d.malformed("no DT_STRTAB"))?,
        )?;
        let strsz = d.tag(DT_STRSZ).ok_or_else(|| d.malformed("no DT_STRSZ"))?;
        d.strtab = d.read(strtab, strsz, "DT_STRTAB")?;
        Ok(d)
    }

    fn tag(&self, tag: u64) -> Option<u64> {
        self.entries.iter().find(|e| e.0 == tag).map(|e| e.1)
    }

    /// File offset of virtual address `addr`.
    fn offset_of(&self, addr: u64) -> Result<u64, DynamicError> {
        self.loads
            .iter()
            .find(|(vaddr, filesz, _)| addr >= *vaddr && addr - vaddr < *filesz)
            .and_then(|(vaddr, _, offset)| (addr - vaddr).checked_add(*offset))
            .ok_or_else(|| self.malformed("address outside every PT_LOAD"))
    }

    fn string(&self, at: u64) -> Result<&[u8], DynamicError> {
        let s = self
            .strtab
            .get(usize::try_from(at).unwrap_or(usize::MAX)..)
            .ok_or_else(|| self.malformed("string outside DT_STRTAB"))?;
        let end = s
            .iter()
            .position(|&b| b == 0)
            .ok_or_else(|| self.malformed("unterminated string"))?;
        Ok(&s[..end])
    }

    /// Its `DT_NEEDED` entries and `DT_SONAME`.
    pub fn info(&self) -> Result<DynamicInfo, DynamicError> {
        let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        let mut info = DynamicInfo::default();
        for &(tag, val) in &self.entries {
            match tag {
                DT_NEEDED => info.needed.push(text(self.string(val)?)),
                DT_SONAME => info.soname = Some(text(self.string(val)?)),
                _ => {}
            }
        }
        Ok(info)
    }

    /// Number of entries in the dynamic symbol table, from `DT_HASH`'s
    /// chain count or by walking `DT_GNU_HASH` to its last chain.
    fn symbol_count(&self) -> Result<u64, DynamicError> {
        let cap = self.len / SYM_SIZE;
        if let Some(hash) = self.tag(DT_HASH) {
            let h = self.read(self.offset_of(hash)?, 8, "DT_HASH")?;
            return Ok(u64::from(u32_at(&h, 4)).min(cap));
        }
        let Some(gnu) = self.tag(DT_GNU_HASH) else {
            return Ok(0);
        };
        let at = self.offset_of(gnu)?;
        let h = self.read(at, 16, "DT_GNU_HASH")?;
        let (nbuckets, symoffset, bloom) = (
            u64::from(u32_at(&h, 0)),
            u64::from(u32_at(&h, 4)),
            u64::from(u32_at(&h, 8)),
        );
        let buckets_at = at + 16 + bloom * 8;
        if nbuckets > cap {
            return Err(self.malformed("DT_GNU_HASH bucket count"));
        }
        let buckets = self.read(buckets_at, nbuckets * 4, "DT_GNU_HASH buckets")?;
        let last = buckets
            .chunks_exact(4)
            .map(|b| u64::from(u32_at(b, 0)))
            .max()
            .unwrap_or(0);
        if last < symoffset {
            return Ok(symoffset.min(cap));
        }
        // Walk the last bucket's chain to its end (the entry with bit 0 set).
        let chains_at = buckets_at + nbuckets * 4;
        let mut i = last;
        loop {
            if i >= cap {
                return Err(self.malformed("DT_GNU_HASH chain"));
            }
            let c = self.read(chains_at + (i - symoffset) * 4, 4, "DT_GNU_HASH chain")?;
            if u32_at(&c, 0) & 1 == 1 {
                return Ok(i + 1);
            }
            i += 1;
        }
    }

    /// Calls `f` for every named entry of its dynamic symbol table.
    pub fn symbols(&self, mut f: impl FnMut(DynamicSymbol<'_>)) -> Result<(), DynamicError> {
        let Some(symtab) = self.tag(DT_SYMTAB) else {
            return Ok(());
        };
        let n = self.symbol_count()?;
        let table = self.read(self.offset_of(symtab)?, n * SYM_SIZE, "DT_SYMTAB")?;
        // Entry 0 is the reserved null symbol.
        for sym in table.chunks_exact(SYM_SIZE as usize).skip(1) {
            let name = self.string(u64::from(u32_at(sym, 0)))?;
            if name.is_empty() {
                continue;
            }
            f(DynamicSymbol {
                name,
                defined: u16_at(sym, 6) != 0,
                weak: sym[4] >> 4 == 2,
            });
        }
        Ok(())
    }
}

fn u16_at(b: &[u8], i: usize) -> u16 {
    u16::from_le_bytes([b[i], b[i + 1]])
}

fn u32_at(b: &[u8], i: usize) -> u32 {
    u32::from_le_bytes(b[i..i + 4].try_into().expect("4 bytes"))
}

fn u64_at(b: &[u8], i: usize) -> u64 {
    u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"))
}

/// Reads `DT_NEEDED` and `DT_SONAME` of the shared object in `file`
/// (errors name it `path`). 64-bit little-endian objects only.
pub fn dynamic_info<R: ReadAt + ?Sized>(
    file: &R,
    path: &Path,
) -> Result<DynamicInfo, DynamicError> {
    DynamicSection::open(file, path)?.info()
}

/// Calls `f` for every named entry of the dynamic symbol table of the
/// shared object in `file` (what the dynamic loader binds by), and
/// returns its [`DynamicInfo`].
pub fn for_each_dynamic_symbol<R: ReadAt + ?Sized>(
    file: &R,
    path: &Path,
    f: impl FnMut(DynamicSymbol<'_>),
) -> Result<DynamicInfo, DynamicError> {
    let d = DynamicSection::open(file, path)?;
    d.symbols(f)?;
    d.info()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(class: u8, e_type: u16, machine: u16) -> Vec<u8> {
        let mut h = vec![0u8; 64];
        h[..4].copy_from_slice(b"\x7fELF");
        h[4] = class;
        h[5] = 1;
        h[16..18].copy_from_slice(&e_type.to_le_bytes());
        h[18..20].copy_from_slice(&machine.to_le_bytes());
        h
    }

    #[test]
    fn accepts_host_shared_object() {
        check_header(Path::new("x"), &header(2, ET_DYN, host_machine())).unwrap();
    }

    #[test]
    fn rejects_text_and_short_files() {
        assert!(matches!(
            check_header(Path::new("x"), b"hello world, not elf at all"),
            Err(ElfError::NotElf { .. })
        ));
        assert!(matches!(
            check_header(Path::new("x"), b"\x7fELF"),
            Err(ElfError::NotElf { .. })
        ));
    }

    #[test]
    fn rejects_executables_and_foreign_machines() {
        let e = check_header(Path::new("x"), &header(2, 2, host_machine())).unwrap_err();
        assert!(matches!(e, ElfError::NotSharedObject { e_type: 2, .. }));
        let other = if host_machine() == 62 { 183 } else { 62 };
        let e = check_header(Path::new("lib.so"), &header(2, ET_DYN, other)).unwrap_err();
        assert!(e.to_string().contains("is built for"), "{e}");
        let e = check_header(Path::new("x"), &header(1, ET_DYN, host_machine())).unwrap_err();
        assert!(matches!(e, ElfError::WrongClass { .. }));
    }

    #[test]
    fn own_test_binary_is_not_a_shared_object_or_is_pie() {
        // A PIE executable is ET_DYN too; the symbol check catches those.
        let exe = std::env::current_exe().unwrap();
        let r = check_file(&exe);
        assert!(r.is_ok() || matches!(r, Err(ElfError::NotSharedObject { .. })));
    }

    /// A minimal ELF64 shared object: one `PT_LOAD` mapping the whole file
    /// at address 0, a `PT_DYNAMIC`, a string table and a symbol table
    /// (undefined symbols first, as linkers order them), hashed with
    /// `DT_GNU_HASH` or `DT_HASH`.
    fn build(
        needed: &[&str],
        soname: Option<&str>,
        syms: &[(&str, bool, bool)],
        gnu: bool,
    ) -> Vec<u8> {
        let mut strtab = vec![0u8];
        let mut add = |s: &str| {
            let at = strtab.len() as u64;
            strtab.extend_from_slice(s.as_bytes());
            strtab.push(0);
            at
        };
        let needed: Vec<u64> = needed.iter().map(|n| add(n)).collect();
        let soname = soname.map(&mut add);
        let mut sorted: Vec<_> = syms.to_vec();
        sorted.sort_by_key(|s| s.1);
        let names: Vec<u64> = sorted.iter().map(|s| add(s.0)).collect();
        let align = |n: usize| n.div_ceil(8) * 8;
        let strtab_at = 64 + 2 * 56;
        let symtab_at = align(strtab_at + strtab.len());
        let nsyms = 1 + sorted.len();
        let hash_at = symtab_at + nsyms * 24;
        let undefined = sorted.iter().filter(|s| !s.1).count() as u32;
        let defined = sorted.len() as u32 - undefined;
        let mut hash = Vec::new();
        let word = |v: &mut Vec<u8>, x: u32| v.extend_from_slice(&x.to_le_bytes());
        if gnu {
            let symoffset = 1 + undefined;
            for x in [1, symoffset, 1, 6] {
                word(&mut hash, x);
            }
            hash.extend_from_slice(&u64::MAX.to_le_bytes());
            word(&mut hash, if defined > 0 { symoffset } else { 0 });
            for i in 0..defined {
                word(&mut hash, if i + 1 == defined { 1 } else { 0 });
            }
        } else {
            for x in [1, nsyms as u32, 0] {
                word(&mut hash, x);
            }
            for _ in 0..nsyms {
                word(&mut hash, 0);
            }
        }
        let dynamic_at = align(hash_at + hash.len());
        let mut dynamic: Vec<(u64, u64)> = needed.iter().map(|&n| (DT_NEEDED, n)).collect();
        if let Some(s) = soname {
            dynamic.push((DT_SONAME, s));
        }
        dynamic.extend([
            (DT_STRTAB, strtab_at as u64),
            (DT_STRSZ, strtab.len() as u64),
            (DT_SYMTAB, symtab_at as u64),
            (if gnu { DT_GNU_HASH } else { DT_HASH }, hash_at as u64),
            (DT_NULL, 0),
        ]);
        let total = dynamic_at + dynamic.len() * 16;
        let mut f = header(2, ET_DYN, host_machine());
        f[0x20..0x28].copy_from_slice(&64u64.to_le_bytes());
        f[0x36..0x38].copy_from_slice(&56u16.to_le_bytes());
        f[0x38..0x3a].copy_from_slice(&2u16.to_le_bytes());
        let phdr = |ty: u32, offset: usize, size: usize| {
            let mut p = vec![0u8; 56];
            p[0..4].copy_from_slice(&ty.to_le_bytes());
            p[8..16].copy_from_slice(&(offset as u64).to_le_bytes());
            p[16..24].copy_from_slice(&(offset as u64).to_le_bytes());
            p[32..40].copy_from_slice(&(size as u64).to_le_bytes());
            p[40..48].copy_from_slice(&(size as u64).to_le_bytes());
            p
        };
        f.extend(phdr(PT_LOAD, 0, total));
        f.extend(phdr(PT_DYNAMIC, dynamic_at, dynamic.len() * 16));
        f.extend_from_slice(&strtab);
        f.resize(symtab_at + 24, 0);
        for (s, name) in sorted.iter().zip(&names) {
            let mut e = vec![0u8; 24];
            e[0..4].copy_from_slice(&(*name as u32).to_le_bytes());
            e[4] = (if s.2 { 2 } else { 1 }) << 4;
            e[6..8].copy_from_slice(&(if s.1 { 7u16 } else { 0 }).to_le_bytes());
            f.extend(e);
        }
        f.extend(hash);
        f.resize(dynamic_at, 0);
        for (tag, val) in dynamic {
            f.extend_from_slice(&tag.to_le_bytes());
            f.extend_from_slice(&val.to_le_bytes());
        }
        f
    }

    fn symbols_of(file: &[u8]) -> Vec<(String, bool, bool)> {
        let mut out = Vec::new();
        for_each_dynamic_symbol(file, Path::new("x.so"), |s| {
            out.push((
                String::from_utf8_lossy(s.name).into_owned(),
                s.defined,
                s.weak,
            ))
        })
        .unwrap();
        out.sort();
        out
    }

    #[test]
    fn dynamic_section_is_read_with_either_hash_table() {
        let syms = [
            ("_ZN3std2io5stdio6_print17h0123456789abcdefE", false, false),
            ("ember_module_descriptor", true, false),
            ("__cxa_finalize", false, true),
            ("helper", true, false),
        ];
        for gnu in [true, false] {
            let f = build(
                &["libember_sdk-00ff.so", "libc.so.6"],
                Some("libhello.so"),
                &syms,
                gnu,
            );
            let info = dynamic_info(&f[..], Path::new("x.so")).unwrap();
            assert_eq!(info.needed, ["libember_sdk-00ff.so", "libc.so.6"]);
            assert_eq!(info.soname.as_deref(), Some("libhello.so"));
            let mut want: Vec<_> = syms
                .iter()
                .map(|(n, d, w)| (n.to_string(), *d, *w))
                .collect();
            want.sort();
            assert_eq!(symbols_of(&f), want, "gnu hash: {gnu}");
        }
        let none = build(&[], None, &[], true);
        assert_eq!(
            dynamic_info(&none[..], Path::new("x.so")).unwrap(),
            DynamicInfo::default()
        );
        assert!(symbols_of(&none).is_empty());
    }

    #[test]
    fn out_of_bounds_tables_are_errors_not_panics() {
        let f = build(&["libc.so.6"], None, &[("a", true, false)], true);
        for cut in [10, 64, 100, 200, f.len() - 1] {
            assert!(
                matches!(
                    dynamic_info(&f[..cut], Path::new("x.so")),
                    Err(DynamicError::Malformed { .. })
                ),
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn real_executable_names_its_libraries() {
        // This test binary is a PIE executable (ET_DYN) linked against libc.
        let exe = std::env::current_exe().unwrap();
        let f = std::fs::File::open(&exe).unwrap();
        if check_file(&exe).is_err() {
            return;
        }
        let info = dynamic_info(&f, &exe).unwrap();
        assert!(
            info.needed.iter().any(|n| n.starts_with("libc.so")),
            "{info:?}"
        );
        let mut undefined = 0;
        for_each_dynamic_symbol(&f, &exe, |s| undefined += usize::from(!s.defined)).unwrap();
        assert!(undefined > 0);
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(512))]
        /// Whatever a file says, reading its dynamic section returns, without
        /// panicking or reading past the file.
        #[test]
        fn any_corruption_is_survived(
            flips in proptest::collection::vec((0usize..1024, proptest::prelude::any::<u8>()), 1..8),
            gnu in proptest::prelude::any::<bool>(),
        ) {
            let mut f = build(
                &["libstd-0123.so"],
                Some("libx.so"),
                &[("a", false, false), ("b", true, false), ("c", true, true)],
                gnu,
            );
            for (at, byte) in flips {
                let n = f.len();
                f[at % n] = byte;
            }
            let _ = dynamic_info(&f[..], Path::new("x.so"));
            let _ = for_each_dynamic_symbol(&f[..], Path::new("x.so"), |_| {});
        }
    }
}
