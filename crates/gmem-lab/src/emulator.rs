//! The lab's QEMU: the host's own, or Debian's 10.0 from bookworm-backports, unpacked into
//! the cache (`--qemu debian`).
//!
//! The backport is built for bookworm, so it runs on the host's own libraries, which
//! lab/install-host-deps installs with bookworm's QEMU. Neither version is clean under
//! nested paging: lab/README.md says what each was seen to do.

use std::fmt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::str::FromStr;

use sha2::{Digest, Sha256};
use thiserror::Error;

use crate::paths::{self, PathsError};

/// The packages of the lab's default QEMU, all from one suite so their versions agree.
pub const DEBIAN_QEMU_SPECS: &[&str] = &[
    "qemu-system-x86/bookworm-backports",
    "qemu-system-common/bookworm-backports",
    "qemu-system-data/bookworm-backports",
    "seabios/bookworm-backports",
];

/// Errors while unpacking or starting the lab's QEMU.
#[derive(Debug, Error)]
pub enum EmulatorError {
    #[error(transparent)]
    Paths(#[from] PathsError),
    #[error("cannot run {tool}")]
    Spawn {
        tool: String,
        #[source]
        source: std::io::Error,
    },
    #[error("dpkg-deb -x {deb} failed ({status})")]
    Unpack {
        deb: PathBuf,
        status: std::process::ExitStatus,
    },
    #[error("cannot move the unpacked QEMU into {path}")]
    Install {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{qemu} --version failed ({status}): {stderr} (lab/install-host-deps installs the \
         libraries it needs)"
    )]
    Broken {
        qemu: PathBuf,
        status: std::process::ExitStatus,
        stderr: String,
    },
}

/// Which QEMU boots the lab (`--qemu`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QemuChoice {
    /// Debian's QEMU 10 from bookworm-backports, fetched and unpacked by the lab.
    Debian,
    /// A QEMU binary the caller names (a path, or a name looked up in PATH).
    Binary(PathBuf),
}

impl QemuChoice {
    /// The word `--qemu` takes for the default.
    pub const DEBIAN: &'static str = "debian";
}

impl FromStr for QemuChoice {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(if s == Self::DEBIAN {
            QemuChoice::Debian
        } else {
            QemuChoice::Binary(PathBuf::from(s))
        })
    }
}

impl fmt::Display for QemuChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            QemuChoice::Debian => f.write_str(Self::DEBIAN),
            QemuChoice::Binary(p) => write!(f, "{}", p.display()),
        }
    }
}

/// A QEMU ready to start.
#[derive(Debug, Clone)]
pub struct Emulator {
    pub binary: PathBuf,
    /// Firmware directories, searched in order (`-L`).
    pub data_dirs: Vec<PathBuf>,
    /// The first line of `--version`, for the report.
    pub version: String,
}

impl Emulator {
    /// A QEMU binary as given, with its own compiled-in firmware path.
    pub fn binary(binary: PathBuf) -> Result<Self, EmulatorError> {
        let version = version_of(&binary, &[])?;
        Ok(Emulator {
            binary,
            data_dirs: Vec::new(),
            version,
        })
    }

    /// Unpacks the verified `debs` (whole, symlinks included) once into the cache, keyed by
    /// their file names, and returns the QEMU in it.
    pub fn unpack(cache: &Path, debs: &[PathBuf]) -> Result<Self, EmulatorError> {
        let mut key = Sha256::new();
        for deb in debs {
            key.update(deb.file_name().unwrap_or_default().as_encoded_bytes());
            key.update(b"\0");
        }
        let key: String = key.finalize()[..8]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let root = cache.join("qemu").join(key);
        if !root.join(".done").exists() {
            let tmp = root.with_extension(format!("tmp-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&tmp);
            paths::ensure_dir(&tmp)?;
            for deb in debs {
                let status = Command::new("dpkg-deb")
                    .arg("-x")
                    .arg(deb)
                    .arg(&tmp)
                    .status()
                    .map_err(|source| EmulatorError::Spawn {
                        tool: "dpkg-deb".into(),
                        source,
                    })?;
                if !status.success() {
                    let _ = std::fs::remove_dir_all(&tmp);
                    return Err(EmulatorError::Unpack {
                        deb: deb.clone(),
                        status,
                    });
                }
            }
            let install = |source| EmulatorError::Install {
                path: root.clone(),
                source,
            };
            std::fs::write(tmp.join(".done"), b"").map_err(install)?;
            let _ = std::fs::remove_dir_all(&root);
            std::fs::rename(&tmp, &root).map_err(install)?;
        }
        let data_dirs = vec![root.join("usr/share/qemu"), root.join("usr/share/seabios")];
        let binary = root.join("usr/bin/qemu-system-x86_64");
        let version = version_of(&binary, &data_dirs)?;
        Ok(Emulator {
            binary,
            data_dirs,
            version,
        })
    }

    /// The `-L` arguments for the firmware directories.
    pub fn data_args(&self) -> Vec<String> {
        self.data_dirs
            .iter()
            .flat_map(|d| ["-L".to_owned(), d.display().to_string()])
            .collect()
    }
}

/// Runs `qemu --version`: proves the binary starts (its libraries are there) and names it.
fn version_of(qemu: &Path, data_dirs: &[PathBuf]) -> Result<String, EmulatorError> {
    let mut cmd = Command::new(qemu);
    for d in data_dirs {
        cmd.arg("-L").arg(d);
    }
    let out = cmd
        .arg("--version")
        .output()
        .map_err(|source| EmulatorError::Spawn {
            tool: format!(
                "{} (install it with: apt-get install -y qemu-system-x86)",
                qemu.display()
            ),
            source,
        })?;
    if !out.status.success() {
        return Err(EmulatorError::Broken {
            qemu: qemu.to_owned(),
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(first_line(&out.stdout))
}

fn first_line(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes)
        .lines()
        .next()
        .unwrap_or_default()
        .trim()
        .to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qemu_choice_parses_the_default_word_and_paths() {
        assert_eq!("debian".parse::<QemuChoice>().unwrap(), QemuChoice::Debian);
        assert_eq!(
            "/usr/bin/qemu-system-x86_64".parse::<QemuChoice>().unwrap(),
            QemuChoice::Binary("/usr/bin/qemu-system-x86_64".into())
        );
        assert_eq!(QemuChoice::Debian.to_string(), QemuChoice::DEBIAN);
    }

    #[test]
    fn version_line_is_the_first_line() {
        assert_eq!(
            first_line(b"QEMU emulator version 10.0.2 (Debian)\nCopyright\n"),
            "QEMU emulator version 10.0.2 (Debian)"
        );
    }

    #[test]
    fn a_missing_binary_is_named() {
        let err = Emulator::binary("/nonexistent/qemu".into()).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/qemu"), "{err}");
    }
}
