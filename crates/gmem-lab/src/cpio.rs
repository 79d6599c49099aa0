//! The lab's initramfs archive: the `cpio` crate's newc entries, written deterministically.

use std::io::{self, Write};

use ::cpio::newc::{self, Builder};

/// File type bits of `st_mode`.
const S_IFDIR: u32 = 0o040_000;
const S_IFREG: u32 = 0o100_000;
const S_IFLNK: u32 = 0o120_000;
const S_IFCHR: u32 = 0o020_000;

/// Writes a newc archive that Linux unpacks as an initramfs. Deterministic: mtime 0, uid/gid
/// 0, inodes numbered in order, so the same inputs give the same bytes.
#[derive(Debug)]
pub struct NewcWriter<W: Write> {
    out: W,
    next_ino: u32,
}

impl<W: Write> NewcWriter<W> {
    pub fn new(out: W) -> Self {
        Self { out, next_ino: 1 }
    }

    /// A directory (`perm` e.g. 0o755).
    pub fn dir(&mut self, path: &str, perm: u32) -> io::Result<()> {
        self.entry(path, S_IFDIR | perm, 2, (0, 0), &[])
    }

    /// A regular file.
    pub fn file(&mut self, path: &str, perm: u32, data: &[u8]) -> io::Result<()> {
        self.entry(path, S_IFREG | perm, 1, (0, 0), data)
    }

    /// A symbolic link to `target`.
    pub fn symlink(&mut self, path: &str, target: &str) -> io::Result<()> {
        self.entry(path, S_IFLNK | 0o777, 1, (0, 0), target.as_bytes())
    }

    /// A character device node, e.g. `/dev/console` = (5, 1).
    pub fn char_dev(&mut self, path: &str, perm: u32, major: u32, minor: u32) -> io::Result<()> {
        self.entry(path, S_IFCHR | perm, 1, (major, minor), &[])
    }

    /// Writes the trailer and returns the inner writer.
    pub fn finish(self) -> io::Result<W> {
        newc::trailer(self.out)
    }

    fn entry(
        &mut self,
        path: &str,
        mode: u32,
        nlink: u32,
        (rdev_major, rdev_minor): (u32, u32),
        data: &[u8],
    ) -> io::Result<()> {
        // The kernel's unpacker takes names relative to its root; a leading `/` would be kept.
        let name = path.trim_start_matches('/');
        if name.is_empty() || name.contains('\0') {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("invalid cpio path {path:?}"),
            ));
        }
        let size = u32::try_from(data.len()).map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{path} is larger than newc's 4 GiB limit"),
            )
        })?;
        let ino = self.next_ino;
        self.next_ino += 1;
        let mut entry = Builder::new(name)
            .ino(ino)
            .mode(mode)
            .nlink(nlink)
            .rdev_major(rdev_major)
            .rdev_minor(rdev_minor)
            .write(&mut self.out, size);
        entry.write_all(data)?;
        entry.finish()?;
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// One parsed entry: (name, mode, rdev major, rdev minor, data).
    pub(crate) type Entry = (String, u32, u32, u32, Vec<u8>);

    /// A minimal newc reader, independent of the writer, checking alignment as it goes.
    pub(crate) fn parse(mut buf: &[u8]) -> Vec<Entry> {
        let total = buf.len();
        let mut out = Vec::new();
        let field = |h: &[u8], i: usize| {
            u32::from_str_radix(std::str::from_utf8(&h[6 + 8 * i..14 + 8 * i]).unwrap(), 16)
                .unwrap()
        };
        loop {
            assert_eq!((total - buf.len()) % 4, 0, "header not 4-aligned");
            let h = &buf[..110];
            assert_eq!(&h[..6], b"070701");
            let (mode, size, rmaj, rmin, namesize) = (
                field(h, 1),
                field(h, 6),
                field(h, 9),
                field(h, 10),
                field(h, 11),
            );
            let name_end = 110 + namesize as usize;
            let name = std::str::from_utf8(&buf[110..name_end - 1])
                .unwrap()
                .to_owned();
            assert_eq!(buf[name_end - 1], 0);
            let data_start = name_end.next_multiple_of(4);
            let data = buf[data_start..data_start + size as usize].to_vec();
            buf = &buf[(data_start + size as usize).next_multiple_of(4)..];
            if name == "TRAILER!!!" {
                assert!(buf.is_empty(), "bytes after the trailer");
                return out;
            }
            out.push((name, mode, rmaj, rmin, data));
        }
    }

    #[test]
    fn round_trips_every_entry_kind() {
        let mut w = NewcWriter::new(Vec::new());
        w.dir("/bin", 0o755).unwrap();
        w.file("/init", 0o755, b"#!/bin/sh\necho hi\n").unwrap();
        w.file("bin/odd", 0o644, b"12345").unwrap();
        w.file("empty", 0o644, b"").unwrap();
        w.symlink("/bin/sh", "busybox").unwrap();
        w.char_dev("/dev/console", 0o600, 5, 1).unwrap();
        let bytes = w.finish().unwrap();
        assert_eq!(bytes.len() % 4, 0);
        let e = parse(&bytes);
        let names: Vec<&str> = e.iter().map(|x| x.0.as_str()).collect();
        assert_eq!(
            names,
            ["bin", "init", "bin/odd", "empty", "bin/sh", "dev/console"]
        );
        assert_eq!(e[0].1, 0o040_755);
        assert_eq!(e[1].1, 0o100_755);
        assert_eq!(e[1].4, b"#!/bin/sh\necho hi\n");
        assert_eq!(e[2].4, b"12345");
        assert!(e[3].4.is_empty());
        assert_eq!(e[4].1, 0o120_777);
        assert_eq!(e[4].4, b"busybox");
        assert_eq!((e[5].1, e[5].2, e[5].3), (0o020_600, 5, 1));
    }

    #[test]
    fn header_layout_matches_newc() {
        let mut w = NewcWriter::new(Vec::new());
        w.file("a", 0o644, b"x").unwrap();
        let bytes = w.finish().unwrap();
        // 110-byte header + "a\0" = 112 (aligned), 1 data byte + 3 pad.
        assert_eq!(
            &bytes[..110],
            b"07070100000001000081a40000000000000000000000010000000000000001000000000000000000000000000000000000000200000000".as_slice()
        );
        assert_eq!(&bytes[110..116], b"a\0x\0\0\0");
    }

    #[test]
    fn rejects_empty_names() {
        let mut w = NewcWriter::new(Vec::new());
        assert!(w.file("/", 0o644, b"").is_err());
    }
}
