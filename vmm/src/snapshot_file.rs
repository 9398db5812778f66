//! The snapshot state file: a versioned, checksummed container for a VM's state, written
//! atomically. The layout and the version rules are in docs/snapshot-format.md.
//!
//! ```text
//! offset  size  field
//!      0     8  magic: "TERNSNAP" with the architecture in the last byte (see [`magic`])
//!      8     4  format version (little-endian u32)
//!     12     4  flags, 0
//!     16     8  payload length N (little-endian u64)
//!     24     N  payload: the state, serde + postcard
//!   24+N     8  CRC-64/XZ of bytes [0, 24+N) (little-endian)
//! ```

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::Serialize;
use serde::de::DeserializeOwned;

/// The format version this build writes and reads (history in docs/snapshot-format.md).
pub const FORMAT_VERSION: u32 = 6;
/// Header size.
pub const HEADER_LEN: usize = 24;
/// Checksum size.
pub const CRC_LEN: usize = 8;
/// Largest payload tern accepts (a VM's state is kilobytes; the memory is a separate file).
pub const MAX_PAYLOAD: u64 = 256 << 20;

const CRC: crc::Crc<u64> = crc::Crc::<u64>::new(&crc::CRC_64_XZ);

/// The architectures a snapshot can belong to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnapshotArch {
    /// x86_64.
    X86_64,
    /// ARM64.
    Aarch64,
}

impl SnapshotArch {
    /// The architecture of this build.
    pub fn native() -> Self {
        if cfg!(target_arch = "aarch64") {
            SnapshotArch::Aarch64
        } else {
            SnapshotArch::X86_64
        }
    }

    fn name(self) -> &'static str {
        match self {
            SnapshotArch::X86_64 => "x86_64",
            SnapshotArch::Aarch64 => "aarch64",
        }
    }
}

/// The magic number of `arch`'s snapshots: "TERNSNA" and an architecture byte.
pub fn magic(arch: SnapshotArch) -> [u8; 8] {
    let last = match arch {
        SnapshotArch::X86_64 => b'x',
        SnapshotArch::Aarch64 => b'a',
    };
    [b'T', b'E', b'R', b'N', b'S', b'N', b'A', last]
}

/// Why a state file cannot be read or written. Each says what is wrong with which file.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotFileError {
    /// The file could not be opened, read, written or renamed.
    #[error("snapshot file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Shorter than its header and checksum say.
    #[error(
        "snapshot file {path} is truncated: {len} bytes, expected {expected} (an interrupted copy or write?)"
    )]
    Truncated {
        /// The file.
        path: PathBuf,
        /// Its length.
        len: u64,
        /// The length its header implies.
        expected: u64,
    },
    /// Longer than its header says.
    #[error(
        "snapshot file {path} has {extra} bytes after its checksum: not a tern snapshot, or damaged"
    )]
    TrailingBytes {
        /// The file.
        path: PathBuf,
        /// How many.
        extra: u64,
    },
    /// Not a tern snapshot at all.
    #[error("snapshot file {path} is not a tern snapshot (magic {found:02x?})")]
    NotASnapshot {
        /// The file.
        path: PathBuf,
        /// The first 8 bytes.
        found: [u8; 8],
    },
    /// A snapshot of another architecture.
    #[error("snapshot file {path} is an {found} snapshot; this tern runs {native} guests")]
    WrongArch {
        /// The file.
        path: PathBuf,
        /// Its architecture.
        found: &'static str,
        /// This build's.
        native: &'static str,
    },
    /// A format version this build does not read.
    #[error(
        "snapshot file {path} has format version {found}; this tern reads version {supported} (take the snapshot again with this tern, or restore with the tern that made it)"
    )]
    Version {
        /// The file.
        path: PathBuf,
        /// Its version.
        found: u32,
        /// The version this build reads.
        supported: u32,
    },
    /// Flags this build does not know.
    #[error("snapshot file {path} has unknown flags {flags:#x}")]
    Flags {
        /// The file.
        path: PathBuf,
        /// The flags.
        flags: u32,
    },
    /// The checksum does not match: some byte changed since it was written.
    #[error(
        "snapshot file {path} is corrupt: CRC-64 {computed:#018x} does not match the stored {stored:#018x}"
    )]
    Checksum {
        /// The file.
        path: PathBuf,
        /// What the file says.
        stored: u64,
        /// What its bytes give.
        computed: u64,
    },
    /// The payload length is beyond what tern accepts.
    #[error(
        "snapshot file {path} claims a {len}-byte state, more than the {MAX_PAYLOAD} tern accepts"
    )]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// The claimed length.
        len: u64,
    },
    /// The checksum matched but the state does not decode (a bug, or a forged file).
    #[error("snapshot file {path}: the state does not decode: {reason}")]
    Decode {
        /// The file.
        path: PathBuf,
        /// The decoder's message.
        reason: String,
    },
    /// The state could not be encoded.
    #[error("cannot encode the VM state: {0}")]
    Encode(String),
}

/// Encodes `state` into the file format for `arch`.
pub fn encode<T: Serialize>(state: &T, arch: SnapshotArch) -> Result<Vec<u8>, SnapshotFileError> {
    let payload =
        postcard::to_stdvec(state).map_err(|e| SnapshotFileError::Encode(e.to_string()))?;
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len() + CRC_LEN);
    out.extend_from_slice(&magic(arch));
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(&payload);
    let crc = CRC.checksum(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    Ok(out)
}

/// Decodes a state file's bytes (`path` names it in errors), checking magic, version, length
/// and checksum before the state is decoded.
pub fn decode<T: DeserializeOwned>(bytes: &[u8], path: &Path) -> Result<T, SnapshotFileError> {
    let p = || path.to_path_buf();
    let len = bytes.len() as u64;
    let min = (HEADER_LEN + CRC_LEN) as u64;
    if bytes.len() < 8 {
        return Err(SnapshotFileError::Truncated {
            path: p(),
            len,
            expected: min,
        });
    }
    let mut found = [0u8; 8];
    found.copy_from_slice(&bytes[..8]);
    let native = SnapshotArch::native();
    if found != magic(native) {
        for other in [SnapshotArch::X86_64, SnapshotArch::Aarch64] {
            if found == magic(other) {
                return Err(SnapshotFileError::WrongArch {
                    path: p(),
                    found: other.name(),
                    native: native.name(),
                });
            }
        }
        return Err(SnapshotFileError::NotASnapshot { path: p(), found });
    }
    if len < min {
        return Err(SnapshotFileError::Truncated {
            path: p(),
            len,
            expected: min,
        });
    }
    let u32_at =
        |o: usize| u32::from_le_bytes([bytes[o], bytes[o + 1], bytes[o + 2], bytes[o + 3]]);
    let u64_at = |o: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&bytes[o..o + 8]);
        u64::from_le_bytes(b)
    };
    let version = u32_at(8);
    if version != FORMAT_VERSION {
        return Err(SnapshotFileError::Version {
            path: p(),
            found: version,
            supported: FORMAT_VERSION,
        });
    }
    let flags = u32_at(12);
    if flags != 0 {
        return Err(SnapshotFileError::Flags { path: p(), flags });
    }
    let payload_len = u64_at(16);
    if payload_len > MAX_PAYLOAD {
        return Err(SnapshotFileError::TooLarge {
            path: p(),
            len: payload_len,
        });
    }
    let expected = min + payload_len;
    if len < expected {
        return Err(SnapshotFileError::Truncated {
            path: p(),
            len,
            expected,
        });
    }
    if len > expected {
        return Err(SnapshotFileError::TrailingBytes {
            path: p(),
            extra: len - expected,
        });
    }
    let body_end = HEADER_LEN + payload_len as usize;
    let stored = u64_at(body_end);
    let computed = CRC.checksum(&bytes[..body_end]);
    if stored != computed {
        return Err(SnapshotFileError::Checksum {
            path: p(),
            stored,
            computed,
        });
    }
    postcard::from_bytes(&bytes[HEADER_LEN..body_end]).map_err(|e| SnapshotFileError::Decode {
        path: p(),
        reason: e.to_string(),
    })
}

/// Writes `bytes` to `path` atomically: a temporary file in the same directory, fsync, rename,
/// fsync of the directory. On any error nothing is left under `path` (nor the temporary).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), SnapshotFileError> {
    write_atomic_with(path, |f| f.write_all(bytes)).map_err(|source| SnapshotFileError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// [`write_atomic`] with `fill` writing the contents (the memory file goes region by region).
pub fn write_atomic_with(
    path: &Path,
    fill: impl FnOnce(&mut std::fs::File) -> std::io::Result<()>,
) -> std::io::Result<()> {
    write_pending(path, fill)?.commit()
}

/// A file written and fsync'd under a temporary name beside `path`, waiting to be renamed into
/// place by [`PendingFile::commit`]; dropped uncommitted, the temporary is removed.
pub struct PendingFile {
    tmp: PathBuf,
    path: PathBuf,
    dir: PathBuf,
    committed: bool,
}

/// Writes a [`PendingFile`] for `path` with `fill`. The temporary's name is unique to this
/// process and call, and only a temporary this call created is ever removed.
pub fn write_pending(
    path: &Path,
    fill: impl FnOnce(&mut std::fs::File) -> std::io::Result<()>,
) -> std::io::Result<PendingFile> {
    static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| std::io::Error::other("the path names no file"))?;
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let tmp = dir.join(format!(
        ".{}.tmp-{}-{nanos:x}-{}",
        name.to_string_lossy(),
        std::process::id(),
        SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&tmp)?;
    // From here on the temporary is ours: dropping `pending` removes it.
    let pending = PendingFile {
        tmp,
        path: path.to_path_buf(),
        dir,
        committed: false,
    };
    fill(&mut f)?;
    f.flush()?;
    f.sync_all()?;
    Ok(pending)
}

impl PendingFile {
    /// Renames the file into place and syncs the directory. A failed directory sync after the
    /// rename is only logged: the file is in place.
    pub fn commit(mut self) -> std::io::Result<()> {
        std::fs::rename(&self.tmp, &self.path)?;
        self.committed = true;
        if let Err(e) = std::fs::File::open(&self.dir).and_then(|d| d.sync_all()) {
            log::warn!("cannot sync directory {}: {e}", self.dir.display());
        }
        Ok(())
    }
}

impl Drop for PendingFile {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// Reads and decodes the state file at `path`.
pub fn read<T: DeserializeOwned>(path: &Path) -> Result<T, SnapshotFileError> {
    let io = |source| SnapshotFileError::Io {
        path: path.to_path_buf(),
        source,
    };
    let meta = std::fs::metadata(path).map_err(io)?;
    if !meta.is_file() {
        return Err(io(std::io::Error::other(
            "not a regular file (a state file is a regular file)",
        )));
    }
    let limit = MAX_PAYLOAD + (HEADER_LEN + CRC_LEN) as u64;
    if meta.len() > limit {
        return Err(SnapshotFileError::TooLarge {
            path: path.to_path_buf(),
            len: meta.len(),
        });
    }
    // Bounded even if the file grows meanwhile.
    let mut bytes = Vec::new();
    std::io::Read::read_to_end(
        &mut std::io::Read::take(std::fs::File::open(path).map_err(io)?, limit + 1),
        &mut bytes,
    )
    .map_err(io)?;
    decode(&bytes, path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::tempdir::TempDir;

    #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    struct State {
        regs: Vec<u64>,
        name: String,
        on: bool,
    }

    fn state() -> State {
        State {
            regs: (0..40).map(|i| i * 0x1111).collect(),
            name: "vcpu0".into(),
            on: true,
        }
    }

    fn good() -> Vec<u8> {
        encode(&state(), SnapshotArch::native()).unwrap()
    }

    #[test]
    fn round_trip() {
        let b = good();
        assert_eq!(&b[..8], &magic(SnapshotArch::native()));
        assert_eq!(decode::<State>(&b, Path::new("s")).unwrap(), state());
    }

    #[test]
    fn every_truncation_is_refused() {
        let b = good();
        for n in 0..b.len() {
            let e = decode::<State>(&b[..n], Path::new("s")).unwrap_err();
            assert!(
                matches!(e, SnapshotFileError::Truncated { .. }),
                "length {n}: {e}"
            );
            assert!(e.to_string().contains("truncated"), "{e}");
        }
        let mut longer = b.clone();
        longer.push(0);
        assert!(matches!(
            decode::<State>(&longer, Path::new("s")),
            Err(SnapshotFileError::TrailingBytes { extra: 1, .. })
        ));
    }

    #[test]
    fn every_flipped_byte_is_refused_with_a_reason() {
        let b = good();
        for i in 0..b.len() {
            for bit in [0x01u8, 0x80] {
                let mut c = b.clone();
                c[i] ^= bit;
                let e = decode::<State>(&c, Path::new("state.snap")).unwrap_err();
                let msg = e.to_string();
                assert!(msg.contains("state.snap"), "byte {i}: {msg}");
                let expected = match i {
                    0..8 => matches!(
                        e,
                        SnapshotFileError::NotASnapshot { .. }
                            | SnapshotFileError::WrongArch { .. }
                    ),
                    8..12 => matches!(e, SnapshotFileError::Version { .. }),
                    12..16 => matches!(e, SnapshotFileError::Flags { .. }),
                    16..24 => matches!(
                        e,
                        SnapshotFileError::Truncated { .. }
                            | SnapshotFileError::TrailingBytes { .. }
                            | SnapshotFileError::TooLarge { .. }
                    ),
                    _ => matches!(e, SnapshotFileError::Checksum { .. }),
                };
                assert!(expected, "byte {i} bit {bit:#x}: {msg}");
            }
        }
    }

    #[test]
    fn other_architecture_and_version_are_named() {
        let other = match SnapshotArch::native() {
            SnapshotArch::X86_64 => SnapshotArch::Aarch64,
            SnapshotArch::Aarch64 => SnapshotArch::X86_64,
        };
        let b = encode(&state(), other).unwrap();
        let e = decode::<State>(&b, Path::new("s")).unwrap_err().to_string();
        assert!(e.contains(other.name()) && e.contains("snapshot"), "{e}");
        let mut v = good();
        v[8..12].copy_from_slice(&7u32.to_le_bytes());
        let e = decode::<State>(&v, Path::new("s")).unwrap_err().to_string();
        assert!(
            e.contains("version 7") && e.contains(&format!("reads version {FORMAT_VERSION}")),
            "{e}"
        );
    }

    #[test]
    fn a_valid_checksum_over_garbage_is_a_decode_error_not_a_panic() {
        let mut b = Vec::new();
        b.extend_from_slice(&magic(SnapshotArch::native()));
        b.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        b.extend_from_slice(&0u32.to_le_bytes());
        b.extend_from_slice(&3u64.to_le_bytes());
        b.extend_from_slice(&[0xff, 0xff, 0xff]);
        let crc = CRC.checksum(&b);
        b.extend_from_slice(&crc.to_le_bytes());
        assert!(matches!(
            decode::<State>(&b, Path::new("s")),
            Err(SnapshotFileError::Decode { .. })
        ));
    }

    #[test]
    fn atomic_write_replaces_whole_files_and_leaves_nothing_on_failure() {
        let dir = TempDir::new().unwrap();
        let path = dir.as_path().join("vm.snap");
        write_atomic(&path, &good()).unwrap();
        assert_eq!(read::<State>(&path).unwrap(), state());
        write_atomic(&path, b"second").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"second");
        let names: Vec<_> = std::fs::read_dir(dir.as_path()).unwrap().collect();
        assert_eq!(names.len(), 1, "no temporary left behind");
        // A pending file that is never committed leaves nothing either.
        let p = write_pending(&dir.as_path().join("never"), |f| f.write_all(b"x")).unwrap();
        drop(p);
        assert_eq!(std::fs::read_dir(dir.as_path()).unwrap().count(), 1);
        // Not a regular file.
        let e = read::<State>(dir.as_path()).unwrap_err().to_string();
        assert!(e.contains("not a regular file"), "{e}");
        let missing = dir.as_path().join("no/such/dir/vm.snap");
        let e = write_atomic(&missing, b"x").unwrap_err();
        assert!(e.to_string().contains("no/such/dir"), "{e}");
        assert!(!missing.exists());
        assert!(matches!(
            read::<State>(&dir.as_path().join("absent")),
            Err(SnapshotFileError::Io { .. })
        ));
    }
}
