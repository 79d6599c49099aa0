//! What a stop of a VMM's threads cannot make safe: its guest memory reachable by another
//! process, or by kernel workers and devices that do not stop with its threads.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

use crate::memory::AttachedGmem;
use crate::memory::gmem_procfs::{dev_major_minor, is_gmem_name, parse_maps};

/// The misc device major number (drivers/char/misc.c).
const MISC_MAJOR: u32 = 10;
/// Misc minors fixed in include/linux/miscdevice.h, known even where the driver is not
/// loaded (/proc/misc lists only registered devices).
const FIXED_MISC_MINORS: [(u32, &str); 3] =
    [(238, "vhost-net"), (241, "vhost-vsock"), (196, "vfio")];

/// How another process reaches the gmem.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reach {
    /// It has the gmem open at this descriptor.
    Open {
        /// Its descriptor number.
        fd: i32,
    },
    /// It maps the gmem at this address.
    Mapped {
        /// First address of the mapping, in that process.
        start: u64,
    },
}

/// One reason a stop of the VMM's threads cannot keep its guest memory still.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hazard {
    /// Another process can read and write the gmem (a vhost-user backend gets guest memory
    /// this way), and stopping the VMM does not stop it.
    SharedGmem {
        /// The VMM.
        pid: u32,
        /// The VMM's descriptor of the gmem.
        fd: i32,
        /// The other process.
        other_pid: u32,
        /// Its command name.
        other_comm: String,
        /// How it reaches the gmem.
        reach: Reach,
    },
    /// The VMM has a vhost device open: vhost's kernel workers read and write guest memory
    /// on their own.
    Vhost {
        /// The VMM.
        pid: u32,
        /// Its descriptor of the device.
        fd: i32,
        /// The device, e.g. "vhost-net".
        device: String,
    },
    /// The VMM has a VFIO device (or its container or IOMMU) open: the device's DMA
    /// reaches guest memory whatever the VMM's threads do.
    Vfio {
        /// The VMM.
        pid: u32,
        /// Its descriptor of the device.
        fd: i32,
        /// The device, e.g. "vfio" or "/dev/vfio/12".
        device: String,
    },
}

/// One sentence per hazard, for the refusal.
impl std::fmt::Display for Hazard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Hazard::SharedGmem {
                pid,
                fd,
                other_pid,
                other_comm,
                reach,
            } => write!(
                f,
                "refusing to stop process {pid}: the guest_memfd at its fd {fd} is also {} \
                 process {other_pid} ({other_comm}), which stopping {pid} does not stop, so \
                 guest memory could change or be read while a batch of it is out",
                match reach {
                    Reach::Open { fd } => format!("open (fd {fd}) in"),
                    Reach::Mapped { start } => format!("mapped (at {start:#x}) by"),
                }
            ),
            Hazard::Vhost { pid, fd, device } => write!(
                f,
                "refusing to stop process {pid}: it has the vhost device {device} open (fd \
                 {fd}), and vhost's kernel workers go on reading and writing guest memory \
                 while its threads are stopped"
            ),
            Hazard::Vfio { pid, fd, device } => write!(
                f,
                "refusing to stop process {pid}: it has the VFIO device {device} open (fd \
                 {fd}), and device DMA goes on reading and writing guest memory while its \
                 threads are stopped"
            ),
        }
    }
}

/// Every hazard of stopping process `pid` to move `gmems`: other processes that have one
/// of them open or mapped, and vhost or VFIO devices the VMM has open. Processes that exit
/// or cannot be read while they are looked at are passed over.
pub fn hazards(pid: u32, gmems: &[&AttachedGmem]) -> io::Result<Vec<Hazard>> {
    let files: BTreeMap<(u64, u64), i32> = gmems
        .iter()
        .map(|g| ((g.dev(), g.inode()), g.fds()[0]))
        .collect();
    let mut found = devices_of(pid)?;
    let me = std::process::id();
    for entry in fs::read_dir("/proc")? {
        let Some(other) = entry?
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        if other == pid || other == me {
            continue;
        }
        found.extend(shared_by(pid, other, &files));
    }
    Ok(found)
}

/// The vhost and VFIO devices process `pid` has open.
fn devices_of(pid: u32) -> io::Result<Vec<Hazard>> {
    let names = DeviceNames::read();
    let mut found = Vec::new();
    for (fd, target, meta) in open_files(pid)? {
        let Some(device) = names.classify(&target, meta.as_ref()) else {
            continue;
        };
        found.push(match device {
            Device::Vhost(device) => Hazard::Vhost { pid, fd, device },
            Device::Vfio(device) => Hazard::Vfio { pid, fd, device },
        });
    }
    Ok(found)
}

/// How process `other` reaches any of `files` ((dev, inode) -> the VMM's fd).
fn shared_by(pid: u32, other: u32, files: &BTreeMap<(u64, u64), i32>) -> Vec<Hazard> {
    let comm = fs::read_to_string(format!("/proc/{other}/comm"))
        .map(|c| c.trim().to_owned())
        .unwrap_or_default();
    let hazard = |fd: i32, reach: Reach| Hazard::SharedGmem {
        pid,
        fd,
        other_pid: other,
        other_comm: comm.clone(),
        reach,
    };
    let mut found = Vec::new();
    for (other_fd, target, meta) in open_files(other).unwrap_or_default() {
        let Some(meta) = meta.filter(|_| is_gmem_name(&target)) else {
            continue;
        };
        if let Some(&fd) = files.get(&(meta.dev(), meta.ino())) {
            found.push(hazard(fd, Reach::Open { fd: other_fd }));
        }
    }
    if let Ok(maps) = fs::read_to_string(format!("/proc/{other}/maps")) {
        found.extend(
            mapped_in(&maps, files)
                .into_iter()
                .map(|(fd, start)| hazard(fd, Reach::Mapped { start })),
        );
    }
    found
}

/// The (VMM fd, start address) of each VMA in `maps` text that maps one of `files`.
fn mapped_in(maps: &str, files: &BTreeMap<(u64, u64), i32>) -> Vec<(i32, u64)> {
    let by_numbers: BTreeMap<(u32, u32, u64), i32> = files
        .iter()
        .map(|(&(dev, inode), &fd)| {
            let (major, minor) = dev_major_minor(dev);
            ((major, minor, inode), fd)
        })
        .collect();
    parse_maps(maps)
        .into_iter()
        .filter(|line| is_gmem_name(&line.pathname))
        .filter_map(|line| {
            by_numbers
                .get(&(line.dev_major, line.dev_minor, line.inode))
                .map(|&fd| (fd, line.start))
        })
        .collect()
}

/// Every descriptor of process `pid`: number, link target, and what the target's stat
/// says (`None` if it could not be taken). Descriptors closed meanwhile are left out.
fn open_files(pid: u32) -> io::Result<Vec<(i32, String, Option<fs::Metadata>)>> {
    let mut files = Vec::new();
    for entry in fs::read_dir(format!("/proc/{pid}/fd"))? {
        let entry = entry?;
        let Some(fd) = entry.file_name().to_str().and_then(|n| n.parse().ok()) else {
            continue;
        };
        let Ok(target) = fs::read_link(entry.path()) else {
            continue;
        };
        files.push((
            fd,
            target.to_string_lossy().into_owned(),
            fs::metadata(entry.path()).ok(),
        ));
    }
    Ok(files)
}

/// A device a stop cannot make safe.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Device {
    Vhost(String),
    Vfio(String),
}

/// Names of character devices by number: /proc/misc (major 10) and /proc/devices.
#[derive(Debug, Default)]
struct DeviceNames {
    misc: BTreeMap<u32, String>,
    majors: BTreeMap<u32, String>,
}

impl DeviceNames {
    fn read() -> Self {
        let read = |path: &str| fs::read_to_string(path).unwrap_or_default();
        Self::parse(&read("/proc/misc"), &read("/proc/devices"))
    }

    /// From the text of /proc/misc ("238 vhost-net") and /proc/devices.
    fn parse(misc_text: &str, devices: &str) -> Self {
        let number_and_name = |line: &str| {
            let (number, name) = line.trim().split_once(' ')?;
            Some((number.parse().ok()?, name.trim().to_owned()))
        };
        let mut misc: BTreeMap<u32, String> = FIXED_MISC_MINORS
            .iter()
            .map(|&(minor, name)| (minor, name.to_owned()))
            .collect();
        misc.extend(misc_text.lines().filter_map(number_and_name));
        let majors = devices
            .lines()
            .skip_while(|l| !l.starts_with("Character devices"))
            .skip(1)
            .take_while(|l| !l.trim().is_empty() && !l.starts_with("Block devices"))
            .filter_map(number_and_name)
            .collect();
        DeviceNames { misc, majors }
    }

    /// Whether an open file is a vhost or VFIO device: by its device number's name (which
    /// holds in a jail, where the path does not say /dev), else by its path.
    fn classify(&self, target: &str, meta: Option<&fs::Metadata>) -> Option<Device> {
        let by_number = meta
            .filter(|m| m.file_type().is_char_device())
            .and_then(|m| {
                let (major, minor) = dev_major_minor(m.rdev());
                if major == MISC_MAJOR {
                    self.misc.get(&minor)
                } else {
                    self.majors.get(&major)
                }
            });
        let name = by_number.map(String::as_str).unwrap_or("");
        if name.starts_with("vhost") || target.starts_with("/dev/vhost-") {
            Some(Device::Vhost(device_name(name, target)))
        } else if name.starts_with("vfio")
            || name == "iommu"
            || target.starts_with("/dev/vfio/")
            || target == "/dev/iommu"
            || target.starts_with("anon_inode:[vfio")
        {
            Some(Device::Vfio(device_name(name, target)))
        } else {
            None
        }
    }
}

/// "vhost-net (/dev/vhost-net)", or whichever of the two is known.
fn device_name(name: &str, target: &str) -> String {
    match (name.is_empty(), Path::new(target).is_absolute()) {
        (false, true) => format!("{name} ({target})"),
        (false, false) => name.to_owned(),
        (true, _) => target.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_devices_by_number_and_by_path() {
        let names = DeviceNames::parse(
            "200 tun\n232 kvm\n124 iommu\n",
            "Character devices:\n  1 mem\n 10 misc\n239 vfio\n240 vhost-vdpa\n\nBlock devices:\n  7 loop\n",
        );
        assert_eq!(names.misc.get(&238).map(String::as_str), Some("vhost-net"));
        assert_eq!(names.misc.get(&232).map(String::as_str), Some("kvm"));
        assert_eq!(names.majors.get(&239).map(String::as_str), Some("vfio"));
        assert!(!names.majors.contains_key(&7), "a block major leaked in");
        // By path alone (no stat), as for a descriptor whose target cannot be stat'ed.
        assert_eq!(
            names.classify("/dev/vhost-vsock", None),
            Some(Device::Vhost("/dev/vhost-vsock".into()))
        );
        assert_eq!(
            names.classify("/dev/vfio/12", None),
            Some(Device::Vfio("/dev/vfio/12".into()))
        );
        assert_eq!(
            names.classify("/dev/iommu", None),
            Some(Device::Vfio("/dev/iommu".into()))
        );
        assert_eq!(
            names.classify("anon_inode:[vfio-device]", None),
            Some(Device::Vfio("anon_inode:[vfio-device]".into()))
        );
        assert_eq!(names.classify("/dev/kvm", None), None);
        assert_eq!(names.classify("anon_inode:[kvm-gmem]", None), None);
        assert_eq!(names.classify("/dev/net/tun", None), None);
    }

    #[test]
    fn finds_mappings_of_the_gmem_by_device_and_inode() {
        let files = BTreeMap::from([((0x10, 83479), 5), ((0x10, 90000), 7)]);
        let maps = "7f66fb38d000-7f670038d000 rw-s 00000000 00:10 83479   anon_inode:[kvm-gmem]\n\
                    7f7000000000-7f7000200000 rw-s 00000000 00:10 11111   anon_inode:[kvm-gmem]\n\
                    7f8000000000-7f8000001000 r--p 00000000 00:10 90000   /tmp/not-gmem\n\
                    7f9000000000-7f9000200000 rw-s 00200000 00:10 90000   anon_inode:[kvm-gmem]\n";
        assert_eq!(
            mapped_in(maps, &files),
            vec![(5, 0x7f66fb38d000), (7, 0x7f9000000000)]
        );
    }

    #[test]
    fn sentences_name_the_process_the_descriptor_and_why() {
        let shared = Hazard::SharedGmem {
            pid: 10,
            fd: 5,
            other_pid: 20,
            other_comm: "vhost-user-blk".into(),
            reach: Reach::Mapped { start: 0x7f00 },
        };
        let text = shared.to_string();
        assert!(text.starts_with("refusing to stop process 10: "), "{text}");
        assert!(
            text.contains("mapped (at 0x7f00) by process 20 (vhost-user-blk)"),
            "{text}"
        );
        let vhost = Hazard::Vhost {
            pid: 10,
            fd: 9,
            device: "vhost-net".into(),
        };
        assert!(vhost.to_string().contains("kernel workers"));
        assert!(!vhost.to_string().contains('\n'));
    }
}
