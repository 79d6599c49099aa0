//! Builds the lab's gzip'd newc initramfs: busybox, the static agent, KVM modules, /init, and
//! what the linux-guest test boots under gmemctl's microVM (a kernel and its own initramfs).

use std::fs::{self, File};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

use flate2::Compression;
use flate2::write::GzEncoder;
use thiserror::Error;

use crate::cpio::NewcWriter;
use crate::elf;

/// Errors while assembling the initramfs.
#[derive(Debug, Error)]
pub enum InitramfsError {
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "{path} cannot run in the initramfs: it is dynamically linked (build it with RUSTFLAGS='-C target-feature=+crt-static')"
    )]
    Dynamic { path: PathBuf },
    #[error("{path} is not a usable executable")]
    BadElf {
        path: PathBuf,
        #[source]
        source: elf::ElfError,
    },
    #[error("{path}: cannot install as /bin/{name:?} (taken, or not a plain name)")]
    DuplicateBinary { path: PathBuf, name: String },
    #[error("invalid test name {name:?}: {reason}")]
    BadTestName { name: String, reason: &'static str },
    #[error("cannot write the initramfs {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Where the lab guest finds the kernel for a Linux guest of its own (the linux-guest test).
pub const L2_KERNEL: &str = "/lab/vmlinuz";
/// Where the lab guest finds that guest's initramfs: the agent as /init, in its memcheck role.
pub const L2_INITRAMFS: &str = "/lab/memcheck.cpio.gz";

/// What goes into the initramfs.
#[derive(Debug, Clone)]
pub struct Contents {
    pub busybox: PathBuf,
    /// A static `gmem-lab`, installed as /bin/gmem-lab and run as `gmem-lab guest <test>`,
    /// and as /init of [`L2_INITRAMFS`].
    pub agent: PathBuf,
    /// The kernel the lab guest boots, installed as [`L2_KERNEL`] so that gmemctl's microVM
    /// can boot it too.
    pub l2_kernel: PathBuf,
    /// Other executables as (name in /bin, path): a static gmemctl, a kernel selftest, ...
    pub bins: Vec<(String, PathBuf)>,
    /// (module name, decompressed .ko), loaded with insmod in this order. Empty for a kernel
    /// with KVM built in.
    pub modules: Vec<(String, PathBuf)>,
    pub tests: Vec<String>,
}

/// Checks a test name is safe to quote in /init and to embed in a JSON line.
pub fn check_test_name(name: &str) -> Result<(), InitramfsError> {
    let bad = |reason| {
        Err(InitramfsError::BadTestName {
            name: name.to_owned(),
            reason,
        })
    };
    if name.trim().is_empty() {
        return bad("empty");
    }
    if name.chars().any(|c| c.is_control()) {
        return bad("control characters are not allowed");
    }
    if name.contains(['\'', '"', '\\', ',', '`', '$']) {
        return bad("quotes, backslashes, commas, backticks and $ are not allowed");
    }
    Ok(())
}

/// The /init script: mount, load modules, run each test with the agent, power off.
pub fn init_script(tests: &[String]) -> String {
    let quoted: Vec<String> = tests.iter().map(|t| format!("'{t}'")).collect();
    format!(
        r#"#!/bin/sh
# gmem-lab /init: mount, load KVM, run the lab tests, report on the console, power off.
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mount -t tmpfs tmpfs /tmp
read up idle < /proc/uptime
echo "GMEMLAB-BOOT {{\"uptime_s\":$up,\"kernel\":\"$(uname -r)\"}}"
# Keep kernel messages off the console so they cannot split a result line.
dmesg -n 1
for ko in /lib/modules/gmemlab/*.ko; do
    [ -e "$ko" ] || break
    name=${{ko##*/}}; name=${{name#*-}}; name=${{name%.ko}}
    # Module parameters from the kernel command line (kvm_amd.npt=0), as modprobe passes them.
    mod=$(echo "$name" | tr - _); params=
    for arg in $(cat /proc/cmdline); do
        case $arg in "$mod".*=*) params="$params ${{arg#"$mod".}}" ;; esac
    done
    if insmod "$ko" $params; then st=loaded; else st=failed; fi
    echo "GMEMLAB-MODULE {{\"module\":\"$name\",\"status\":\"$st\"}}"
done
# One idle VM for the whole run: KVM's static keys then never flip, so the kernel's text is
# not live-patched under the tests (gmem-lab hold-kvm says why).
[ -e /dev/kvm ] && /bin/gmem-lab hold-kvm &
# After a crash of this kernel the runner boots it again with gmemlab.resume_at=N: the first N
# tests have reported already and are not run twice.
resume_at=0
for arg in $(cat /proc/cmdline); do
    case $arg in gmemlab.resume_at=*) resume_at=${{arg#*=}} ;; esac
done
i=0
for t in {tests}; do
    i=$((i + 1))
    [ "$i" -le "$resume_at" ] && continue
    /bin/gmem-lab guest "$t"
    rc=$?
    [ "$rc" -eq 0 ] || echo "GMEMLAB-EXIT {{\"test\":\"$t\",\"code\":$rc}}"
done
echo "----- guest dmesg -----"
dmesg
echo "----- end of guest dmesg -----"
echo GMEMLAB-DONE
sync
poweroff -f
echo o > /proc/sysrq-trigger
"#,
        tests = quoted.join(" ")
    )
}

fn read(path: &Path) -> Result<Vec<u8>, InitramfsError> {
    fs::read(path).map_err(|source| InitramfsError::Read {
        path: path.to_owned(),
        source,
    })
}

/// A copy of an ELF executable without debug info, if binutils' `strip` is there. Debug
/// info is most of a Rust release binary here (13 MiB of 16), and every byte of the
/// initramfs costs boot time under TCG.
fn strip_debug(path: &Path, data: Vec<u8>) -> Vec<u8> {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let tmp = std::env::temp_dir().join(format!(
        "gmem-lab-strip-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let stripped = Command::new("strip")
        .arg("--strip-debug")
        .arg("-o")
        .arg(&tmp)
        .arg(path)
        .stderr(Stdio::null())
        .status()
        .ok()
        .filter(|s| s.success())
        .and_then(|_| fs::read(&tmp).ok());
    let _ = fs::remove_file(&tmp);
    stripped.unwrap_or(data)
}

/// Reads an executable, insists that an ELF one is static, and drops its debug info.
fn read_static_exe(path: &Path) -> Result<Vec<u8>, InitramfsError> {
    let data = read(path)?;
    if data.starts_with(b"#!") {
        return Ok(data);
    }
    match elf::is_static(&data) {
        Ok(true) => Ok(strip_debug(path, data)),
        Ok(false) => Err(InitramfsError::Dynamic {
            path: path.to_owned(),
        }),
        Err(source) => Err(InitramfsError::BadElf {
            path: path.to_owned(),
            source,
        }),
    }
}

/// The gzip'd newc initramfs of the linux-guest test's Linux guest: `agent` (the static
/// gmem-lab, which runs as /init in its memcheck role), /dev/console, /proc and /tmp.
pub fn memcheck_initramfs(agent: &[u8]) -> io::Result<Vec<u8>> {
    let mut w = NewcWriter::new(GzEncoder::new(Vec::new(), Compression::default()));
    for d in ["dev", "proc", "tmp"] {
        w.dir(d, 0o755)?;
    }
    w.char_dev("dev/console", 0o600, 5, 1)?;
    w.file("init", 0o755, agent)?;
    w.finish()?.finish()
}

/// Writes the initramfs to `out` and returns its size in bytes.
pub fn build(c: &Contents, out: &Path) -> Result<u64, InitramfsError> {
    for t in &c.tests {
        check_test_name(t)?;
    }
    let write_err = |source| InitramfsError::Write {
        path: out.to_owned(),
        source,
    };
    let file = File::create(out).map_err(write_err)?;
    let gz = GzEncoder::new(BufWriter::new(file), Compression::fast());
    let mut w = NewcWriter::new(gz);
    let add = |w: &mut NewcWriter<_>| -> Result<(), InitramfsError> {
        for d in [
            "bin",
            "dev",
            "proc",
            "sys",
            "tmp",
            "run",
            "root",
            "lib",
            "lib/modules",
        ] {
            w.dir(d, 0o755).map_err(write_err)?;
        }
        w.dir("lib/modules/gmemlab", 0o755).map_err(write_err)?;
        w.char_dev("dev/console", 0o600, 5, 1).map_err(write_err)?;
        w.char_dev("dev/null", 0o666, 1, 3).map_err(write_err)?;
        w.file("bin/busybox", 0o755, &read_static_exe(&c.busybox)?)
            .map_err(write_err)?;
        w.symlink("bin/sh", "busybox").map_err(write_err)?;
        let agent = read_static_exe(&c.agent)?;
        w.file("bin/gmem-lab", 0o755, &agent).map_err(write_err)?;
        let mut names = vec!["busybox".to_owned(), "sh".to_owned(), "gmem-lab".to_owned()];
        for (name, bin) in &c.bins {
            if names.contains(name) || name.is_empty() || name.contains('/') {
                return Err(InitramfsError::DuplicateBinary {
                    path: bin.clone(),
                    name: name.clone(),
                });
            }
            w.file(&format!("bin/{name}"), 0o755, &read_static_exe(bin)?)
                .map_err(write_err)?;
            names.push(name.clone());
        }
        w.dir("lab", 0o755).map_err(write_err)?;
        w.file(L2_KERNEL, 0o644, &read(&c.l2_kernel)?)
            .map_err(write_err)?;
        let l2_initramfs = memcheck_initramfs(&agent).map_err(write_err)?;
        w.file(L2_INITRAMFS, 0o644, &l2_initramfs)
            .map_err(write_err)?;
        for (i, (name, ko)) in c.modules.iter().enumerate() {
            let path = format!("lib/modules/gmemlab/{}-{name}.ko", i + 1);
            w.file(&path, 0o644, &read(ko)?).map_err(write_err)?;
        }
        w.file("init", 0o755, init_script(&c.tests).as_bytes())
            .map_err(write_err)?;
        Ok(())
    };
    add(&mut w)?;
    let gz = w.finish().map_err(write_err)?;
    let mut buf = gz.finish().map_err(write_err)?;
    buf.flush().map_err(write_err)?;
    drop(buf);
    Ok(fs::metadata(out).map_err(write_err)?.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_names_are_checked() {
        check_test_name("gmem-stock").unwrap();
        check_test_name("exec:/bin/guest_memfd_test").unwrap();
        check_test_name("exec:/bin/gmemctl selftest --mechanism remap").unwrap();
        for bad in ["", " ", "a'b", "a,b", "a\"b", "a\nb", "$(x)", "a\\b"] {
            assert!(check_test_name(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn init_is_valid_shell() {
        let path = std::env::temp_dir().join(format!("gmem-lab-init-{}", std::process::id()));
        fs::write(
            &path,
            init_script(&["nodes".into(), "exec:/bin/x -v".into()]),
        )
        .unwrap();
        let status = Command::new("sh").arg("-n").arg(&path).status().unwrap();
        fs::remove_file(&path).unwrap();
        assert!(status.success());
    }

    #[test]
    fn memcheck_initramfs_holds_the_agent_as_init_and_a_console() {
        use std::io::Read;
        let gz = memcheck_initramfs(b"\x7fELF agent").unwrap();
        let mut cpio = Vec::new();
        flate2::read::GzDecoder::new(gz.as_slice())
            .read_to_end(&mut cpio)
            .unwrap();
        let entries = crate::cpio::tests::parse(&cpio);
        let find = |name: &str| entries.iter().find(|e| e.0 == name).unwrap();
        assert_eq!(entries.len(), 5);
        for dir in ["dev", "proc", "tmp"] {
            assert_eq!(find(dir).1, 0o040_755);
        }
        let console = find("dev/console");
        assert_eq!((console.1, console.2, console.3), (0o020_600, 5, 1));
        let init = find("init");
        assert_eq!(
            (init.1, init.4.as_slice()),
            (0o100_755, b"\x7fELF agent".as_slice())
        );
    }

    #[test]
    fn init_runs_tests_in_order_and_powers_off() {
        let s = init_script(&["nodes".into(), "exec:/bin/x -v".into()]);
        assert!(s.starts_with("#!/bin/sh\n"));
        assert!(s.contains("for t in 'nodes' 'exec:/bin/x -v'; do"));
        let done = s.find("echo GMEMLAB-DONE").unwrap();
        assert!(s.find("poweroff -f").unwrap() > done);
        assert!(s.find("insmod").unwrap() < s.find("/bin/gmem-lab guest").unwrap());
    }

    /// The test loop of /init, run by sh against a stand-in command line: with
    /// `gmemlab.resume_at=N` the first N tests are skipped.
    fn tests_run_by_init(cmdline: &str) -> Vec<String> {
        let s = init_script(&["nodes".into(), "a".into(), "exec:/bin/x -v".into()]);
        let start = s.find("resume_at=0").unwrap();
        let end = s.find("echo \"----- guest dmesg").unwrap();
        static CALLS: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "gmem-lab-init-{}-{}",
            std::process::id(),
            CALLS.fetch_add(1, Ordering::Relaxed)
        ));
        fs::create_dir_all(&dir).unwrap();
        let file = dir.join("cmdline");
        fs::write(&file, cmdline).unwrap();
        let body = s[start..end]
            .replace("/proc/cmdline", &file.display().to_string())
            .replace("/bin/gmem-lab guest", "echo");
        let out = Command::new("sh").arg("-c").arg(body).output().unwrap();
        let _ = fs::remove_dir_all(&dir);
        assert!(out.status.success());
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_owned)
            .collect()
    }

    #[test]
    fn init_resumes_after_the_tests_that_reported() {
        assert_eq!(
            tests_run_by_init("console=ttyS0 quiet"),
            ["nodes", "a", "exec:/bin/x -v"]
        );
        assert_eq!(
            tests_run_by_init("console=ttyS0 gmemlab.resume_at=1 quiet"),
            ["a", "exec:/bin/x -v"]
        );
        assert!(tests_run_by_init("gmemlab.resume_at=3").is_empty());
    }
}
