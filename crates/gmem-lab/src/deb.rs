//! Pulls the lab's files (vmlinuz, KVM modules, busybox) out of verified .deb packages.

use std::fs;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use thiserror::Error;

use crate::paths::{self, PathsError};

/// Kernel modules the lab loads, in load order (kvm needs irqbypass; kvm-amd needs kvm).
pub const LAB_MODULES: &[&str] = &["irqbypass", "kvm", "kvm-amd"];

/// Errors while extracting files from Debian packages.
#[derive(Debug, Error)]
pub enum DebError {
    #[error(transparent)]
    Paths(#[from] PathsError),
    #[error("cannot run dpkg-deb on {deb}")]
    Spawn {
        deb: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot read the data archive of {deb}")]
    ReadArchive {
        deb: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("dpkg-deb --fsys-tarfile {deb} failed ({status})")]
    DpkgDeb {
        deb: PathBuf,
        status: std::process::ExitStatus,
    },
    #[error("{deb} contains no {what}")]
    Missing { deb: PathBuf, what: String },
    #[error("cannot decompress {name}: {reason}")]
    Decompress { name: String, reason: String },
    #[error("{name}: unsupported module compression (expected .ko, .ko.xz or .ko.gz)")]
    UnsupportedCompression { name: String },
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Reads every regular file of the .deb's data archive for which `want` returns true.
/// Paths are given without the leading `./`.
pub fn extract_files(
    deb: &Path,
    mut want: impl FnMut(&str) -> bool,
) -> Result<Vec<(String, Vec<u8>)>, DebError> {
    let mut child = Command::new("dpkg-deb")
        .arg("--fsys-tarfile")
        .arg(deb)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|source| DebError::Spawn {
            deb: deb.to_owned(),
            source,
        })?;
    let read_err = |source| DebError::ReadArchive {
        deb: deb.to_owned(),
        source,
    };
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| read_err(io::Error::new(io::ErrorKind::BrokenPipe, "no stdout pipe")))?;
    let mut archive = tar::Archive::new(stdout);
    let mut out = Vec::new();
    let result = (|| -> Result<(), DebError> {
        for entry in archive.entries().map_err(read_err)? {
            let mut entry = entry.map_err(read_err)?;
            if !entry.header().entry_type().is_file() {
                continue;
            }
            let path = entry.path().map_err(read_err)?;
            let path = path.to_string_lossy();
            let path = path.trim_start_matches("./").to_owned();
            if want(&path) {
                let mut data = Vec::new();
                entry.read_to_end(&mut data).map_err(read_err)?;
                out.push((path, data));
            }
        }
        Ok(())
    })();
    // Drain and reap dpkg-deb whatever happened, so it never lingers.
    drop(archive);
    let status = child.wait().map_err(read_err)?;
    result?;
    if !status.success() {
        return Err(DebError::DpkgDeb {
            deb: deb.to_owned(),
            status,
        });
    }
    Ok(out)
}

/// The file name of a path inside a package.
fn base_name(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

/// If `file` is one of `modules` (plain or compressed), the module's name.
pub fn module_name<'a>(file: &str, modules: &[&'a str]) -> Option<&'a str> {
    let stem = file
        .strip_suffix(".ko")
        .or_else(|| file.strip_suffix(".ko.xz"))
        .or_else(|| file.strip_suffix(".ko.zst"))
        .or_else(|| file.strip_suffix(".ko.gz"))?;
    modules.iter().copied().find(|m| *m == stem)
}

/// Decompresses a module by its file name's suffix.
pub fn decompress_module(name: &str, data: &[u8]) -> Result<Vec<u8>, DebError> {
    let mut out = Vec::new();
    if name.ends_with(".ko") {
        out.extend_from_slice(data);
    } else if name.ends_with(".ko.xz") {
        lzma_rs::xz_decompress(&mut io::BufReader::new(data), &mut out).map_err(|e| {
            DebError::Decompress {
                name: name.to_owned(),
                reason: e.to_string(),
            }
        })?;
    } else if name.ends_with(".ko.gz") {
        flate2::read::GzDecoder::new(data)
            .read_to_end(&mut out)
            .map_err(|e| DebError::Decompress {
                name: name.to_owned(),
                reason: e.to_string(),
            })?;
    } else {
        return Err(DebError::UnsupportedCompression {
            name: name.to_owned(),
        });
    }
    Ok(out)
}

/// Debian's kernel image and the lab's modules, extracted once per package version.
#[derive(Debug, Clone)]
pub struct DebianKernel {
    pub vmlinuz: PathBuf,
    /// (module name, decompressed .ko path), in load order.
    pub modules: Vec<(String, PathBuf)>,
}

fn write_file(path: &Path, data: &[u8]) -> Result<(), DebError> {
    fs::write(path, data).map_err(|source| DebError::Write {
        path: path.to_owned(),
        source,
    })
}

/// Extracts vmlinuz from `binary_deb` and the [`LAB_MODULES`] from `modules_deb` (if given)
/// into `<cache>/extract/<deb names>/`, reusing an earlier complete extraction.
pub fn debian_kernel(
    cache: &Path,
    binary_deb: &Path,
    modules_deb: Option<&Path>,
) -> Result<DebianKernel, DebError> {
    let stem = |p: &Path| {
        p.file_stem()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned()
    };
    let key = match modules_deb {
        Some(m) => format!("{}+{}", stem(binary_deb), stem(m)),
        None => stem(binary_deb),
    };
    let dir = cache.join("extract").join(key);
    let done = dir.join(".complete");
    let vmlinuz = dir.join("vmlinuz");
    let module_path = |m: &str| dir.join(format!("{m}.ko"));
    let mut kernel = DebianKernel {
        vmlinuz: vmlinuz.clone(),
        modules: Vec::new(),
    };
    if modules_deb.is_some() {
        kernel.modules = LAB_MODULES
            .iter()
            .map(|m| ((*m).to_owned(), module_path(m)))
            .collect();
    }
    if done.exists() {
        return Ok(kernel);
    }
    let _ = fs::remove_dir_all(&dir);
    paths::ensure_dir(&dir)?;

    let images = extract_files(binary_deb, |p| {
        (p.starts_with("usr/lib/modules/") || p.starts_with("lib/modules/"))
            && p.ends_with("/vmlinuz")
            || p.starts_with("boot/vmlinuz-")
    })?;
    let (_, image) = images.into_iter().next().ok_or_else(|| DebError::Missing {
        deb: binary_deb.to_owned(),
        what: "vmlinuz".into(),
    })?;
    write_file(&vmlinuz, &image)?;

    if let Some(mdeb) = modules_deb {
        let found = extract_files(mdeb, |p| module_name(base_name(p), LAB_MODULES).is_some())?;
        for m in LAB_MODULES {
            let (path, data) = found
                .iter()
                .find(|(p, _)| module_name(base_name(p), LAB_MODULES) == Some(m))
                .ok_or_else(|| DebError::Missing {
                    deb: mdeb.to_owned(),
                    what: format!("{m}.ko*"),
                })?;
            let raw = decompress_module(base_name(path), data)?;
            write_file(&module_path(m), &raw)?;
        }
    }
    write_file(&done, b"")?;
    Ok(kernel)
}

/// Extracts the static busybox binary from a busybox-static .deb into the cache.
pub fn busybox(cache: &Path, deb: &Path) -> Result<PathBuf, DebError> {
    let stem = deb.file_stem().unwrap_or_default().to_string_lossy();
    let dir = cache.join("extract").join(stem.as_ref());
    let bin = dir.join("busybox");
    if bin.exists() {
        return Ok(bin);
    }
    paths::ensure_dir(&dir)?;
    let found = extract_files(deb, |p| p == "bin/busybox" || p == "usr/bin/busybox")?;
    let (_, data) = found.into_iter().next().ok_or_else(|| DebError::Missing {
        deb: deb.to_owned(),
        what: "bin/busybox".into(),
    })?;
    let tmp = dir.join("busybox.tmp");
    write_file(&tmp, &data)?;
    fs::rename(&tmp, &bin).map_err(|source| DebError::Write {
        path: bin.clone(),
        source,
    })?;
    Ok(bin)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn module_names_match_exactly() {
        assert_eq!(module_name("kvm.ko.xz", LAB_MODULES), Some("kvm"));
        assert_eq!(module_name("kvm-amd.ko.xz", LAB_MODULES), Some("kvm-amd"));
        assert_eq!(module_name("irqbypass.ko", LAB_MODULES), Some("irqbypass"));
        assert_eq!(module_name("kvm-intel.ko.xz", LAB_MODULES), None);
        assert_eq!(module_name("ptp_kvm.ko.xz", LAB_MODULES), None);
        assert_eq!(module_name("kvm.ko.bz2", LAB_MODULES), None);
    }

    #[test]
    fn decompresses_gzip_and_plain() {
        use std::io::Write;
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        enc.write_all(b"\x7fELF module").unwrap();
        let gz = enc.finish().unwrap();
        assert_eq!(
            decompress_module("kvm.ko.gz", &gz).unwrap(),
            b"\x7fELF module"
        );
        assert_eq!(decompress_module("kvm.ko", b"abc").unwrap(), b"abc");
        assert!(matches!(
            decompress_module("kvm.ko.zst", b"abc"),
            Err(DebError::UnsupportedCompression { .. })
        ));
        assert!(matches!(
            decompress_module("kvm.ko.xz", b"not xz"),
            Err(DebError::Decompress { .. })
        ));
    }
}
