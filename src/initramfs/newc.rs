//! The "newc" cpio format (magic `070701`) that Linux unpacks as an
//! initramfs: a small encoder ([`write_newc`]) and a strict decoder
//! ([`read_newc`]), both on uncompressed bytes.
//!
//! Each member is a 110-byte ASCII header (the magic, then 13 fields of 8
//! hex digits: ino, mode, uid, gid, nlink, mtime, filesize, devmajor,
//! devminor, rdevmajor, rdevminor, namesize, check), the NUL-terminated
//! name, zero padding to a multiple of 4, the data (a file's bytes, or a
//! symlink's target), and zero padding to a multiple of 4. The archive ends
//! with a member named `TRAILER!!!`.
//!
//! This file uses only `std`, so tests can include it on its own.

/// File type bits of a mode (`S_IFMT`).
pub const S_IFMT: u32 = 0o170_000;
/// A regular file.
pub const S_IFREG: u32 = 0o100_000;
/// A directory.
pub const S_IFDIR: u32 = 0o040_000;
/// A symbolic link.
pub const S_IFLNK: u32 = 0o120_000;
/// A character device.
pub const S_IFCHR: u32 = 0o020_000;

/// The magic of the newc format (no checksums).
pub const MAGIC: &[u8; 6] = b"070701";
/// The name of the member that ends an archive.
pub const TRAILER: &str = "TRAILER!!!";
/// Length of a member header.
pub const HEADER_LEN: usize = 110;

/// One member of an archive.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// Absolute path in the guest, e.g. `/bin/busybox` (stored in the
    /// archive without the leading `/`).
    pub path: String,
    /// The full `st_mode`: type bits ([`S_IFREG`], [`S_IFDIR`], [`S_IFLNK`],
    /// [`S_IFCHR`]) and permission bits.
    pub mode: u32,
    /// A regular file's contents, or a symlink's target; empty otherwise.
    pub data: Vec<u8>,
    /// Major and minor number of a device node; `(0, 0)` otherwise.
    pub rdev: (u32, u32),
}

impl Entry {
    /// A regular file with permission bits `perm`.
    pub fn file(path: &str, perm: u32, data: Vec<u8>) -> Self {
        Self::new(path, S_IFREG | (perm & 0o7777), data)
    }

    /// A directory with permission bits `perm`.
    pub fn dir(path: &str, perm: u32) -> Self {
        Self::new(path, S_IFDIR | (perm & 0o7777), Vec::new())
    }

    /// A symbolic link at `path` pointing to `target`.
    pub fn symlink(path: &str, target: &str) -> Self {
        Self::new(path, S_IFLNK | 0o777, target.as_bytes().to_vec())
    }

    /// A character device node.
    pub fn char_device(path: &str, perm: u32, major: u32, minor: u32) -> Self {
        let mut entry = Self::new(path, S_IFCHR | (perm & 0o7777), Vec::new());
        entry.rdev = (major, minor);
        entry
    }

    fn new(path: &str, mode: u32, data: Vec<u8>) -> Self {
        Self {
            path: path.to_string(),
            mode,
            data,
            rdev: (0, 0),
        }
    }

    /// The type bits of the mode.
    pub fn kind(&self) -> u32 {
        self.mode & S_IFMT
    }

    /// The permission bits of the mode.
    pub fn perm(&self) -> u32 {
        self.mode & 0o7777
    }
}

fn pad4(out: &mut Vec<u8>) {
    while out.len() % 4 != 0 {
        out.push(0);
    }
}

fn push_header(out: &mut Vec<u8>, fields: [u32; 13]) {
    out.extend_from_slice(MAGIC);
    for field in fields {
        out.extend_from_slice(format!("{field:08X}").as_bytes());
    }
}

/// Encodes `entries`, in order, as a newc archive ending with the trailer.
///
/// Owners are root (uid and gid 0) and mtimes 0, so the same entries
/// always give the same bytes. Each member has an inode number of its own
/// and regular files have a link count of 1 (Linux treats members with a
/// count of 2 or more as hard links). Fails on a path that is not absolute,
/// contains a NUL, or on data larger than the format's 4 GiB limit.
pub fn write_newc(entries: &[Entry]) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    for (index, entry) in entries.iter().enumerate() {
        let name = entry
            .path
            .strip_prefix('/')
            .filter(|name| !name.is_empty())
            .ok_or_else(|| format!("cpio: not an absolute path below /: {:?}", entry.path))?;
        if name.contains('\0') {
            return Err(format!("cpio: NUL in path {:?}", entry.path));
        }
        let size = u32::try_from(entry.data.len())
            .map_err(|_| format!("cpio: {} is larger than 4 GiB", entry.path))?;
        let nlink = if entry.kind() == S_IFDIR { 2 } else { 1 };
        let ino = u32::try_from(index + 1).map_err(|_| "cpio: too many entries".to_string())?;
        push_header(
            &mut out,
            [
                ino,
                entry.mode,
                0,
                0,
                nlink,
                0,
                size,
                0,
                0,
                entry.rdev.0,
                entry.rdev.1,
                name.len() as u32 + 1,
                0,
            ],
        );
        out.extend_from_slice(name.as_bytes());
        out.push(0);
        pad4(&mut out);
        out.extend_from_slice(&entry.data);
        pad4(&mut out);
    }
    push_header(
        &mut out,
        [0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, TRAILER.len() as u32 + 1, 0],
    );
    out.extend_from_slice(TRAILER.as_bytes());
    out.push(0);
    pad4(&mut out);
    Ok(out)
}

fn hex_field(header: &[u8], index: usize, offset: usize) -> Result<u32, String> {
    let start = MAGIC.len() + index * 8;
    let digits = &header[start..start + 8];
    std::str::from_utf8(digits)
        .ok()
        .filter(|text| text.bytes().all(|b| b.is_ascii_hexdigit()))
        .and_then(|text| u32::from_str_radix(text, 16).ok())
        .ok_or_else(|| {
            format!(
                "cpio: bad header field {index} at offset {offset}: {:?}",
                String::from_utf8_lossy(digits)
            )
        })
}

fn align4(n: usize) -> usize {
    n.div_ceil(4) * 4
}

/// Decodes a newc archive (already decompressed) into its members, in
/// archive order, without the trailer.
///
/// Names come back as absolute paths (`bin/sh` and `./bin/sh` both give
/// `/bin/sh`; the root directory, `.`, gives `/`). Fails, saying where, on a
/// bad magic or header field, a name without its NUL, a member running past
/// the end, or a missing trailer. Bytes after the trailer are ignored (tools
/// pad archives to blocks).
pub fn read_newc(bytes: &[u8]) -> Result<Vec<Entry>, String> {
    let mut entries = Vec::new();
    let mut pos = 0;
    loop {
        let header = bytes
            .get(pos..pos + HEADER_LEN)
            .ok_or_else(|| format!("cpio: archive ends at offset {pos} without a trailer"))?;
        if &header[..MAGIC.len()] != MAGIC {
            return Err(format!(
                "cpio: bad magic {:?} at offset {pos} (want 070701)",
                String::from_utf8_lossy(&header[..MAGIC.len()])
            ));
        }
        let mut fields = [0u32; 13];
        for (index, field) in fields.iter_mut().enumerate() {
            *field = hex_field(header, index, pos)?;
        }
        let mode = fields[1];
        let size = fields[6] as usize;
        let rdev = (fields[9], fields[10]);
        let namesize = fields[11] as usize;
        let name_start = pos + HEADER_LEN;
        let raw_name = bytes
            .get(name_start..name_start + namesize)
            .filter(|name| namesize >= 1 && name[namesize - 1] == 0)
            .ok_or_else(|| format!("cpio: bad name (size {namesize}) at offset {pos}"))?;
        let name = std::str::from_utf8(&raw_name[..namesize - 1])
            .map_err(|_| format!("cpio: name at offset {pos} is not UTF-8"))?;
        let data_start = align4(name_start + namesize);
        let data = bytes.get(data_start..data_start + size).ok_or_else(|| {
            format!("cpio: {name:?} at offset {pos} runs past the end of the archive")
        })?;
        if name == TRAILER {
            return Ok(entries);
        }
        let relative = name.trim_start_matches("./").trim_start_matches('/');
        let path = if relative == "." || relative.is_empty() {
            "/".to_string()
        } else {
            format!("/{relative}")
        };
        entries.push(Entry {
            path,
            mode,
            data: data.to_vec(),
            rdev,
        });
        pos = align4(data_start + size);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<Entry> {
        let big: Vec<u8> = (0..1024 * 1024)
            .map(|i: u32| (i * 7 + i / 251) as u8)
            .collect();
        vec![
            Entry::dir("/bin", 0o755),
            Entry::file("/bin/empty", 0o644, Vec::new()),
            Entry::file("/bin/odd", 0o600, b"seven!!".to_vec()),
            Entry::file("/bin/four", 0o755, b"four".to_vec()),
            Entry::file("/big", 0o644, big),
            Entry::symlink("/bin/sh", "busybox"),
            Entry::char_device("/dev/console", 0o600, 5, 1),
        ]
    }

    #[test]
    fn round_trip_keeps_paths_modes_and_data() {
        let entries = sample();
        let bytes = write_newc(&entries).unwrap();
        assert_eq!(bytes.len() % 4, 0);
        assert_eq!(&bytes[..6], MAGIC);
        assert_eq!(read_newc(&bytes).unwrap(), entries);
    }

    #[test]
    fn layout_is_header_name_padding_data_padding() {
        let bytes = write_newc(&[Entry::file("/ab", 0o644, b"xyz".to_vec())]).unwrap();
        // 110-byte header, "ab\0" padded to 116, 3 data bytes padded to 120.
        assert_eq!(&bytes[110..113], b"ab\0");
        assert_eq!(&bytes[113..116], &[0, 0, 0]);
        assert_eq!(&bytes[116..120], b"xyz\0");
        assert_eq!(&bytes[120..126], MAGIC);
        assert_eq!(&bytes[14..22], b"000081A4", "mode field");
        assert_eq!(&bytes[54..62], b"00000003", "filesize field");
        let trailer = &bytes[120 + HEADER_LEN..120 + HEADER_LEN + TRAILER.len()];
        assert_eq!(trailer, TRAILER.as_bytes());
    }

    #[test]
    fn reader_refuses_damage() {
        // The error, without printing megabytes of entries on success.
        let error = |bytes: &[u8]| match read_newc(bytes) {
            Ok(entries) => panic!("refused, not read as {} entries", entries.len()),
            Err(e) => e,
        };
        let bytes = write_newc(&sample()).unwrap();
        let err = error(&bytes[..bytes.len() - 124]);
        assert!(err.contains("without a trailer"), "{err}");
        let err = error(&bytes[..bytes.len() / 2]); // inside /big
        assert!(err.contains("past the end"), "{err}");
        let mut bad = bytes.clone();
        bad[0] = b'1';
        assert!(error(&bad).contains("magic"));
        let mut bad = bytes.clone();
        bad[6] = b'z';
        assert!(error(&bad).contains("field 0"));
        let mut bad = bytes;
        bad[110 + 3] = b'X'; // the NUL ending "bin"
        assert!(error(&bad).contains("bad name"));
        assert!(error(b"").contains("without a trailer"));
    }

    #[test]
    fn writer_refuses_relative_paths() {
        assert!(write_newc(&[Entry::dir("bin", 0o755)]).is_err());
        assert!(write_newc(&[Entry::dir("/", 0o755)]).is_err());
    }
}
