//! What /proc says about another process's guest_memfd: its open gmem files and the VMAs
//! that map them.

use std::fs;
use std::io;

/// How the kernel names a guest_memfd, as an fd link target and as a maps pathname:
/// 6.18 makes it an anonymous inode, 7.x a file of its own pseudo file system that is
/// unlinked from the start.
const GMEM_NAMES: [&str; 2] = ["anon_inode:[kvm-gmem]", "/[kvm-gmem] (deleted)"];

/// Whether a /proc fd link target or maps pathname names a guest_memfd.
pub(crate) fn is_gmem_name(name: &str) -> bool {
    GMEM_NAMES.contains(&name)
}

/// The descriptor numbers of process `pid` whose link target names a guest_memfd, in
/// ascending order. A descriptor closed while the directory is read is left out.
pub(crate) fn gmem_fds(pid: u32) -> io::Result<Vec<i32>> {
    let mut fds = Vec::new();
    for entry in fs::read_dir(format!("/proc/{pid}/fd"))? {
        let entry = entry?;
        let Some(fd) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        match fs::read_link(entry.path()) {
            Ok(target) if target.to_str().is_some_and(is_gmem_name) => fds.push(fd),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    fds.sort_unstable();
    Ok(fds)
}

/// Whether descriptor `fd` of this process names a guest_memfd (checks a duplicate taken
/// from another process: its number there may have been reused after it was listed).
pub(crate) fn own_fd_is_gmem(fd: i32) -> io::Result<bool> {
    let target = fs::read_link(format!("/proc/self/fd/{fd}"))?;
    Ok(target.to_str().is_some_and(is_gmem_name))
}

/// One line of /proc/PID/maps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct MapsLine {
    pub start: u64,
    pub end: u64,
    /// "rw-s" and the like.
    pub perms: String,
    /// File offset of `start`.
    pub offset: u64,
    pub dev_major: u32,
    pub dev_minor: u32,
    pub inode: u64,
    /// Empty for anonymous memory.
    pub pathname: String,
}

/// Parses /proc/PID/maps text; lines it cannot read are skipped (see `NumaMaps::parse`).
pub(crate) fn parse_maps(text: &str) -> Vec<MapsLine> {
    text.lines().filter_map(parse_maps_line).collect()
}

/// "7f66fb38d000-7f670038d000 rw-s 00000000 00:10 83479   anon_inode:[kvm-gmem]"
fn parse_maps_line(line: &str) -> Option<MapsLine> {
    let mut rest = line;
    let mut field = || {
        let trimmed = rest.trim_start();
        let end = trimmed.find(' ').unwrap_or(trimmed.len());
        let (word, tail) = trimmed.split_at(end);
        rest = tail;
        (!word.is_empty()).then_some(word)
    };
    let (start, end) = field()?.split_once('-')?;
    let perms = field()?.to_owned();
    let offset = u64::from_str_radix(field()?, 16).ok()?;
    let (major, minor) = field()?.split_once(':')?;
    let inode = field()?.parse().ok()?;
    Some(MapsLine {
        start: u64::from_str_radix(start, 16).ok()?,
        end: u64::from_str_radix(end, 16).ok()?,
        perms,
        offset,
        dev_major: u32::from_str_radix(major, 16).ok()?,
        dev_minor: u32::from_str_radix(minor, 16).ok()?,
        inode,
        // The pathname may contain spaces ("/[kvm-gmem] (deleted)").
        pathname: rest.trim_start().to_owned(),
    })
}

/// Major and minor device numbers of a `st_dev` (glibc's encoding, which the kernel's
/// stat uses on 64-bit: 12 bits of major and 20 of minor, split around each other).
pub(crate) fn dev_major_minor(st_dev: u64) -> (u32, u32) {
    let major = ((st_dev >> 8) & 0xfff) | ((st_dev >> 32) & 0xffff_f000);
    let minor = (st_dev & 0xff) | ((st_dev >> 12) & 0xffff_ff00);
    (major as u32, minor as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_gmem_lines_of_both_kernels() {
        let maps = parse_maps(
            "55d0c2a00000-55d0c2a02000 r--p 00001000 fe:00 1234   /usr/bin/sleep\n\
             7f66fb38d000-7f670038d000 rw-s 00200000 00:10 83479                      anon_inode:[kvm-gmem]\n\
             7f8a00000000-7f8a00200000 rw-s 00000000 00:1b 33 /[kvm-gmem] (deleted)\n\
             7ffd1c2f0000-7ffd1c311000 rw-p 00000000 00:00 0\n\
             garbage\n",
        );
        assert_eq!(maps.len(), 4);
        assert_eq!(maps[0].offset, 0x1000);
        assert_eq!((maps[0].dev_major, maps[0].dev_minor), (0xfe, 0));
        let gmem_618 = &maps[1];
        assert_eq!(gmem_618.start, 0x7f66fb38d000);
        assert_eq!(gmem_618.end, 0x7f670038d000);
        assert_eq!(gmem_618.perms, "rw-s");
        assert_eq!(gmem_618.offset, 0x200000);
        assert_eq!((gmem_618.dev_major, gmem_618.dev_minor), (0, 0x10));
        assert_eq!(gmem_618.inode, 83479);
        assert!(is_gmem_name(&gmem_618.pathname));
        assert_eq!(maps[2].pathname, "/[kvm-gmem] (deleted)");
        assert!(is_gmem_name(&maps[2].pathname));
        assert_eq!(maps[3].pathname, "");
        assert!(!is_gmem_name("/tmp/[kvm-gmem]") && !is_gmem_name("anon_inode:kvm-vm"));
    }

    #[test]
    fn splits_device_numbers_like_glibc() {
        assert_eq!(dev_major_minor(0x10), (0, 0x10));
        assert_eq!(dev_major_minor(0xfe01), (0xfe, 1));
        // A minor above 255 and a major above 4095 use the high bits.
        let dev = (0x123u64 & 0xff) | (0xabc << 8) | ((0x123u64 & !0xff) << 12) | (0x1000 << 32);
        assert_eq!(dev_major_minor(dev), (0x1abc, 0x123));
    }

    #[test]
    fn finds_no_gmem_in_a_process_without_one() {
        // Not this process: other tests in it may hold a gmem at the time.
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let fds = gmem_fds(child.id());
        child.kill().unwrap();
        child.wait().unwrap();
        assert_eq!(fds.unwrap(), Vec::<i32>::new());
    }
}
