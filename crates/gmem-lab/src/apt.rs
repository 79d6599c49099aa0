//! Downloads Debian packages through a private apt state directory, never the system's.

use std::collections::HashSet;
use std::fs::{self, File};
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::time::{Duration, SystemTime};

use sha2::{Digest, Sha256};
use thiserror::Error;

use crate::paths::{self, DirLock, PathsError};

/// Suites the private sources.list names. bookworm is there for stable host tools
/// (`busybox-static/bookworm`), bookworm-backports for a QEMU built for this host (10.0),
/// trixie-backports for the 7.3 kernel, sid for the rest.
pub const SUITES: &[&str] = &["trixie-backports", "sid", "bookworm", "bookworm-backports"];

/// Keyring used when the host's source entry names none (or an inline key).
const DEFAULT_KEYRING: &str = "/usr/share/keyrings/debian-archive-keyring.gpg";

/// Debian code names (and aliases) that identify a Debian archive entry in the host's sources.
const DEBIAN_SUITES: &[&str] = &[
    "buster",
    "bullseye",
    "bookworm",
    "trixie",
    "forky",
    "duke",
    "sid",
    "unstable",
    "testing",
    "stable",
    "oldstable",
];

/// The private index is refreshed when it is older than this.
const MAX_INDEX_AGE: Duration = Duration::from_secs(24 * 3600);

/// Errors while resolving, downloading or verifying Debian packages.
#[derive(Debug, Error)]
pub enum AptError {
    #[error(transparent)]
    Paths(#[from] PathsError),
    #[error("cannot read host apt sources {path}")]
    ReadHostSources {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "no Debian mirror found in /etc/apt/sources.list or /etc/apt/sources.list.d \
         (set GMEM_LAB_DEBIAN_MIRROR=http://.../debian)"
    )]
    NoMirror,
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot run {tool} (is apt installed?)")]
    Spawn {
        tool: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("`{command}` failed ({status}): {stderr}")]
    Command {
        command: String,
        status: ExitStatus,
        stderr: String,
    },
    #[error("cannot parse {what} as deb822")]
    Deb822 {
        what: String,
        #[source]
        source: deb822_fast::Error,
    },
    #[error("the apt index has no package matching `{spec}` (suites: {suites})")]
    NotFound { spec: String, suites: String },
    #[error("the apt index entry for `{spec}` lacks the {field} field")]
    MissingField { spec: String, field: &'static str },
    #[error("the apt index entry for `{spec}` has an invalid Size `{value}`")]
    BadSize { spec: String, value: String },
    #[error("{path}: size {actual} bytes, but the apt index says {expected}")]
    SizeMismatch {
        path: PathBuf,
        expected: u64,
        actual: u64,
    },
    #[error("{path}: SHA256 {actual}, but the apt index says {expected}")]
    HashMismatch {
        path: PathBuf,
        expected: String,
        actual: String,
    },
    #[error("apt-get download left no .deb for {package} {version} in {dir}")]
    DownloadMissing {
        package: String,
        version: String,
        dir: PathBuf,
    },
}

/// One deb822 paragraph, as deb822-fast reads it: fields in order, names compared
/// case-insensitively, continuation lines joined with `\n`.
pub type Stanza = deb822_fast::Paragraph;

/// Parses deb822 text (apt Packages indexes, `apt-cache show` output, `.sources` files).
/// `what` names the text for the error.
pub fn parse_deb822(what: &str, text: &str) -> Result<Vec<Stanza>, AptError> {
    let parsed: deb822_fast::Deb822 = text.parse().map_err(|source| AptError::Deb822 {
        what: what.to_owned(),
        source,
    })?;
    Ok(parsed.into_iter().collect())
}

/// What the apt index says about one .deb.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackageRecord {
    pub package: String,
    pub version: String,
    pub architecture: String,
    pub filename: String,
    pub size: u64,
    pub sha256: String,
}

impl PackageRecord {
    /// Reads the fields the lab needs from an index paragraph.
    pub fn from_stanza(spec: &str, s: &Stanza) -> Result<Self, AptError> {
        let field = |name: &'static str| {
            s.get(name)
                .map(|v| v.trim().to_owned())
                .ok_or(AptError::MissingField {
                    spec: spec.to_owned(),
                    field: name,
                })
        };
        let size_text = field("Size")?;
        let size = size_text.parse().map_err(|_| AptError::BadSize {
            spec: spec.to_owned(),
            value: size_text.clone(),
        })?;
        Ok(Self {
            package: field("Package")?,
            version: field("Version")?,
            architecture: field("Architecture")?,
            filename: field("Filename")?,
            size,
            sha256: field("SHA256")?.to_ascii_lowercase(),
        })
    }

    /// The cache file name: `package_version_arch.deb`, with `:` spelled `%3a` as apt does.
    pub fn cache_name(&self) -> String {
        format!(
            "{}_{}_{}.deb",
            self.package,
            self.version.replace(':', "%3a"),
            self.architecture
        )
    }
}

/// The package name in an apt spec such as `name`, `name=version` or `name/suite`.
pub fn spec_package(spec: &str) -> &str {
    spec.split(['=', '/']).next().unwrap_or(spec)
}

/// One entry of the host's apt sources.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostSource {
    pub uri: String,
    pub suites: Vec<String>,
    pub components: Vec<String>,
    pub signed_by: Option<String>,
}

/// Parses one-line-style `sources.list` text (`deb [opts] uri suite component...`).
pub fn parse_sources_list(text: &str) -> Vec<HostSource> {
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or("").trim();
        let Some(rest) = line.strip_prefix("deb ") else {
            continue;
        };
        let mut rest = rest.trim_start();
        let mut signed_by = None;
        if let Some(opts) = rest.strip_prefix('[') {
            let Some((opts, after)) = opts.split_once(']') else {
                continue;
            };
            for opt in opts.split_whitespace() {
                if let Some(v) = opt.strip_prefix("signed-by=") {
                    signed_by = Some(v.to_owned());
                }
            }
            rest = after.trim_start();
        }
        let mut words = rest.split_whitespace();
        let (Some(uri), Some(suite)) = (words.next(), words.next()) else {
            continue;
        };
        out.push(HostSource {
            uri: uri.to_owned(),
            suites: vec![suite.to_owned()],
            components: words.map(str::to_owned).collect(),
            signed_by,
        });
    }
    out
}

/// Parses deb822-style `.sources` text; `what` names it for the error.
pub fn parse_sources_deb822(what: &str, text: &str) -> Result<Vec<HostSource>, AptError> {
    let words = |s: &Stanza, k: &str| -> Vec<String> {
        s.get(k)
            .unwrap_or("")
            .split_whitespace()
            .map(str::to_owned)
            .collect()
    };
    let mut out = Vec::new();
    for s in parse_deb822(what, text)? {
        if !words(&s, "Types").iter().any(|t| t == "deb") {
            continue;
        }
        if s.get("Enabled")
            .is_some_and(|e| e.eq_ignore_ascii_case("no"))
        {
            continue;
        }
        let signed_by = s
            .get("Signed-By")
            .filter(|v| !v.contains('\n') && !v.is_empty())
            .map(str::to_owned);
        for uri in words(&s, "URIs") {
            out.push(HostSource {
                uri,
                suites: words(&s, "Suites"),
                components: words(&s, "Components"),
                signed_by: signed_by.clone(),
            });
        }
    }
    Ok(out)
}

/// The first host entry that is Debian's main archive (not security, not a third party).
pub fn pick_debian_mirror(sources: &[HostSource]) -> Option<&HostSource> {
    sources.iter().find(|s| {
        s.components.iter().any(|c| c == "main")
            && s.suites.iter().any(|suite| {
                !suite.contains("security")
                    && DEBIAN_SUITES.contains(&suite.split('-').next().unwrap_or(""))
            })
    })
}

/// Reads the host's apt sources (read-only) and returns (mirror URI, keyring path).
fn host_mirror() -> Result<(String, String), AptError> {
    if let Some(uri) = std::env::var_os("GMEM_LAB_DEBIAN_MIRROR").filter(|v| !v.is_empty()) {
        return Ok((
            uri.to_string_lossy().into_owned(),
            DEFAULT_KEYRING.to_owned(),
        ));
    }
    let read = |path: &Path| {
        fs::read_to_string(path).map_err(|source| AptError::ReadHostSources {
            path: path.to_owned(),
            source,
        })
    };
    let mut sources = Vec::new();
    let main = Path::new("/etc/apt/sources.list");
    if main.exists() {
        sources.extend(parse_sources_list(&read(main)?));
    }
    let dir = Path::new("/etc/apt/sources.list.d");
    if let Ok(entries) = fs::read_dir(dir) {
        let mut files: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
        files.sort();
        for f in files {
            match f.extension().and_then(|e| e.to_str()) {
                Some("list") => sources.extend(parse_sources_list(&read(&f)?)),
                Some("sources") => {
                    sources.extend(parse_sources_deb822(&f.display().to_string(), &read(&f)?)?)
                }
                _ => {}
            }
        }
    }
    let src = pick_debian_mirror(&sources).ok_or(AptError::NoMirror)?;
    let keyring = src
        .signed_by
        .clone()
        .filter(|k| Path::new(k).is_file())
        .unwrap_or_else(|| DEFAULT_KEYRING.to_owned());
    Ok((src.uri.clone(), keyring))
}

/// The private sources.list for `mirror`.
pub fn private_sources_list(mirror: &str, keyring: &str) -> String {
    let mut s = String::from("# Written by gmem-lab; private to its apt state directory.\n");
    for suite in SUITES {
        s.push_str(&format!(
            "deb [signed-by={keyring}] {mirror} {suite} main\n"
        ));
    }
    s
}

/// The private apt configuration. It is passed with `-c`, which apt reads after the system's
/// apt.conf.d (so proxies configured there still apply), and it clears every hook that would
/// act on the system (appstream, packagekit, dpkg triggers).
pub fn private_apt_conf(root: &Path) -> String {
    let r = root.display();
    format!(
        r#"// Written by gmem-lab: a private apt state that never touches the system's.
Dir::Etc::SourceList "{r}/etc/sources.list";
Dir::Etc::SourceParts "{r}/etc/sources.list.d";
Dir::Etc::Preferences "{r}/etc/preferences";
Dir::Etc::PreferencesParts "{r}/etc/preferences.d";
Dir::State "{r}/state";
Dir::State::status "{r}/state/status";
Dir::Cache "{r}/cache";
// Keep apt's binary package cache (some images disable it): lookups take 50 ms, not 2 s.
Dir::Cache::pkgcache "pkgcache.bin";
Dir::Cache::srcpkgcache "srcpkgcache.bin";
APT::Architecture "amd64";
#clear APT::Architectures;
APT::Architectures {{ "amd64"; }};
Acquire::Languages "none";
APT::Sandbox::User "root";
#clear APT::Update::Pre-Invoke;
#clear APT::Update::Post-Invoke;
#clear APT::Update::Post-Invoke-Success;
#clear DPkg::Pre-Invoke;
#clear DPkg::Post-Invoke;
#clear Acquire::IndexTargets::deb::DEP-11;
#clear Acquire::IndexTargets::deb::DEP-11-icons-small;
#clear Acquire::IndexTargets::deb::DEP-11-icons;
#clear Acquire::IndexTargets::deb::DEP-11-icons-hidpi;
#clear Acquire::IndexTargets::deb::DEP-11-icons-large;
#clear Acquire::IndexTargets::deb::DEP-11-icons-large-hidpi;
"#
    )
}

/// SHA256 (lowercase hex) and size of a file.
pub fn sha256_file(path: &Path) -> Result<(String, u64), AptError> {
    let read_err = |source| AptError::Read {
        path: path.to_owned(),
        source,
    };
    let mut f = File::open(path).map_err(read_err)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = f.read(&mut buf).map_err(read_err)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        size += n as u64;
    }
    let hex = hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    Ok((hex, size))
}

/// Checks a file against its index record.
pub fn verify(path: &Path, rec: &PackageRecord) -> Result<(), AptError> {
    let (hash, size) = sha256_file(path)?;
    if size != rec.size {
        return Err(AptError::SizeMismatch {
            path: path.to_owned(),
            expected: rec.size,
            actual: size,
        });
    }
    if hash != rec.sha256 {
        return Err(AptError::HashMismatch {
            path: path.to_owned(),
            expected: rec.sha256.clone(),
            actual: hash,
        });
    }
    Ok(())
}

/// A private apt state under the lab cache, plus the verified .deb cache beside it.
#[derive(Debug)]
pub struct Fetcher {
    apt_root: PathBuf,
    debs: PathBuf,
    refreshed: bool,
}

impl Fetcher {
    /// Uses `<cache>/apt` for apt's state and `<cache>/debs` for verified downloads.
    pub fn new(cache: &Path) -> Self {
        Self {
            apt_root: cache.join("apt"),
            debs: cache.join("debs"),
            refreshed: false,
        }
    }

    fn conf(&self) -> PathBuf {
        self.apt_root.join("apt.conf")
    }

    /// Writes the private sources.list and apt.conf; returns whether the sources changed.
    fn prepare(&self) -> Result<bool, AptError> {
        for d in [
            "etc/sources.list.d",
            "etc/preferences.d",
            "state/lists/partial",
            "cache/archives/partial",
        ] {
            paths::ensure_dir(&self.apt_root.join(d))?;
        }
        paths::ensure_dir(&self.debs)?;
        let write = |path: PathBuf, text: &str| -> Result<bool, AptError> {
            if fs::read_to_string(&path).is_ok_and(|old| old == text) {
                return Ok(false);
            }
            fs::write(&path, text).map_err(|source| AptError::Write { path, source })?;
            Ok(true)
        };
        let (mirror, keyring) = host_mirror()?;
        let changed = write(
            self.apt_root.join("etc/sources.list"),
            &private_sources_list(&mirror, &keyring),
        )?;
        write(self.conf(), &private_apt_conf(&self.apt_root))?;
        write(self.apt_root.join("etc/preferences"), "")?;
        let status = self.apt_root.join("state/status");
        if !status.exists() {
            write(status, "")?;
        }
        Ok(changed)
    }

    /// Whether the private index is missing or older than [`MAX_INDEX_AGE`].
    fn index_stale(&self) -> bool {
        let lists = self.apt_root.join("state/lists");
        let newest = fs::read_dir(&lists)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().ends_with("InRelease"))
            .filter_map(|e| e.metadata().ok()?.modified().ok())
            .max();
        match newest {
            None => true,
            Some(t) => SystemTime::now()
                .duration_since(t)
                .map_or(true, |age| age > MAX_INDEX_AGE),
        }
    }

    fn apt(
        &self,
        tool: &'static str,
        args: &[&str],
        cwd: Option<&Path>,
    ) -> Result<String, AptError> {
        let conf = self.conf();
        let mut cmd = Command::new(tool);
        cmd.arg("-c").arg(&conf).args(args);
        cmd.env_remove("APT_CONFIG");
        if let Some(dir) = cwd {
            cmd.current_dir(dir);
        }
        let out = cmd
            .output()
            .map_err(|source| AptError::Spawn { tool, source })?;
        if !out.status.success() {
            return Err(AptError::Command {
                command: format!("{tool} -c {} {}", conf.display(), args.join(" ")),
                status: out.status,
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Runs `apt-get update` against the private state.
    pub fn update(&mut self) -> Result<(), AptError> {
        eprintln!(
            "gmem-lab: apt-get update (private state in {})",
            self.apt_root.display()
        );
        self.apt("apt-get", &["-q", "update"], None)?;
        self.refreshed = true;
        Ok(())
    }

    /// The candidate index record for `spec` (`name`, `name=version` or `name/suite`).
    pub fn show(&self, spec: &str) -> Result<PackageRecord, AptError> {
        let not_found = || AptError::NotFound {
            spec: spec.to_owned(),
            suites: SUITES.join(", "),
        };
        let text = match self.apt("apt-cache", &["show", "--no-all-versions", spec], None) {
            Ok(t) => t,
            Err(AptError::Command { stderr, .. })
                if stderr.contains("No packages found")
                    || stderr.contains("Unable to locate")
                    || stderr.contains("not found") =>
            {
                return Err(not_found());
            }
            Err(e) => return Err(e),
        };
        let name = spec_package(spec);
        let stanza = parse_deb822("`apt-cache show` output", &text)?
            .into_iter()
            .find(|s| s.get("Package") == Some(name))
            .ok_or_else(not_found)?;
        PackageRecord::from_stanza(spec, &stanza)
    }

    /// All specs' records from one `apt-cache show` (each call costs ~0.5 s of index
    /// loading), or `None` if any is missing or ambiguous; callers then ask one by one.
    fn show_all(&self, specs: &[String]) -> Option<Vec<PackageRecord>> {
        let mut args = vec!["show", "--no-all-versions"];
        args.extend(specs.iter().map(String::as_str));
        let text = self.apt("apt-cache", &args, None).ok()?;
        let stanzas = parse_deb822("`apt-cache show` output", &text).ok()?;
        specs
            .iter()
            .map(|spec| {
                let name = spec_package(spec);
                let mut hits = stanzas.iter().filter(|s| s.get("Package") == Some(name));
                let (Some(one), None) = (hits.next(), hits.next()) else {
                    return None;
                };
                PackageRecord::from_stanza(spec, one).ok()
            })
            .collect()
    }

    /// Downloads (or reuses from cache) each spec and returns the verified .deb paths, in order.
    /// With `refresh`, the private index is updated first even if it is fresh.
    pub fn fetch(&mut self, specs: &[String], refresh: bool) -> Result<Vec<PathBuf>, AptError> {
        let _lock = DirLock::acquire(&self.lock_path()?)?;
        let sources_changed = self.prepare()?;
        if refresh || sources_changed || self.index_stale() {
            match self.update() {
                Ok(()) => {}
                Err(e) => {
                    eprintln!("gmem-lab: warning: apt-get update failed, using the old index: {e}")
                }
            }
        }
        let batch = self.show_all(specs);
        let mut out = Vec::new();
        for (i, spec) in specs.iter().enumerate() {
            let rec = match batch.as_ref().map(|b| b[i].clone()) {
                Some(rec) => Ok(rec),
                None => match self.show(spec) {
                    Err(AptError::NotFound { .. }) if !self.refreshed => {
                        self.update()?;
                        self.show(spec)
                    }
                    other => other,
                },
            };
            let path = match rec {
                Ok(rec) => self.fetch_record(&rec)?,
                Err(e) => match self.cached_fallback(spec) {
                    Some(p) => {
                        eprintln!(
                            "gmem-lab: warning: {e}; using the cached, verified {}",
                            p.display()
                        );
                        p
                    }
                    None => return Err(e),
                },
            };
            out.push(path);
        }
        Ok(out)
    }

    fn lock_path(&self) -> Result<PathBuf, AptError> {
        paths::ensure_dir(&self.apt_root)?;
        Ok(self.apt_root.join("gmem-lab.lock"))
    }

    /// A cached .deb of the spec's package whose `.sha256` sidecar still matches: used only
    /// when the index cannot name the package (mirror unreachable, or the version left the
    /// archive).
    fn cached_fallback(&self, spec: &str) -> Option<PathBuf> {
        if spec.contains('=') || spec.contains('/') {
            return None;
        }
        let prefix = format!("{}_", spec_package(spec));
        let mut found: Vec<(SystemTime, PathBuf)> = fs::read_dir(&self.debs)
            .ok()?
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                let n = p.file_name().unwrap_or_default().to_string_lossy();
                n.starts_with(&prefix) && n.ends_with(".deb")
            })
            .filter_map(|p| Some((p.metadata().ok()?.modified().ok()?, p)))
            .collect();
        found.sort();
        let (_, path) = found.pop()?;
        let sidecar = fs::read_to_string(sidecar_path(&path)).ok()?;
        let expected = sidecar.split_whitespace().next()?;
        let (actual, _) = sha256_file(&path).ok()?;
        (actual == expected).then_some(path)
    }

    fn fetch_record(&self, rec: &PackageRecord) -> Result<PathBuf, AptError> {
        let dest = self.debs.join(rec.cache_name());
        if dest.exists() {
            match verify(&dest, rec) {
                Ok(()) => return Ok(dest),
                Err(e) => eprintln!("gmem-lab: cached file is bad, downloading again: {e}"),
            }
        }
        let tmp = self.debs.join(format!(".download-{}", std::process::id()));
        let _ = fs::remove_dir_all(&tmp);
        paths::ensure_dir(&tmp)?;
        eprintln!("gmem-lab: downloading {} {}", rec.package, rec.version);
        let spec = format!("{}={}", rec.package, rec.version);
        let result = self
            .apt("apt-get", &["-q", "download", &spec], Some(&tmp))
            .and_then(|_| {
                let got = fs::read_dir(&tmp)
                    .map_err(|source| AptError::Read {
                        path: tmp.clone(),
                        source,
                    })?
                    .flatten()
                    .map(|e| e.path())
                    .find(|p| p.extension().is_some_and(|x| x == "deb"))
                    .ok_or_else(|| AptError::DownloadMissing {
                        package: rec.package.clone(),
                        version: rec.version.clone(),
                        dir: tmp.clone(),
                    })?;
                verify(&got, rec)?;
                fs::rename(&got, &dest).map_err(|source| AptError::Write {
                    path: dest.clone(),
                    source,
                })?;
                let side = sidecar_path(&dest);
                fs::write(&side, format!("{}  {}\n", rec.sha256, rec.cache_name()))
                    .map_err(|source| AptError::Write { path: side, source })
            });
        let _ = fs::remove_dir_all(&tmp);
        result.map(|()| dest)
    }
}

/// `x.deb` -> `x.deb.sha256` (sha256sum format, for `sha256sum -c`).
fn sidecar_path(deb: &Path) -> PathBuf {
    let mut s = deb.as_os_str().to_owned();
    s.push(".sha256");
    PathBuf::from(s)
}

/// Distinct specs, keeping the first occurrence's order.
pub fn dedup(specs: &[String]) -> Vec<String> {
    let mut seen = HashSet::new();
    specs
        .iter()
        .filter(|s| seen.insert(s.as_str()))
        .cloned()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const PACKAGES: &str = "\
Package: linux-binary-7.3.4+deb13-cloud-amd64
Source: linux-signed-amd64 (7.3.4+1~bpo13+1)
Version: 7.3.4-1~bpo13+1
Architecture: amd64
Description: Linux 7.3.4 for x86-64 cloud (kernel image)
 The Linux kernel 7.3.4 and modules for use on
 .
 x86-64 cloud.
Filename: pool/main/l/linux-signed-amd64/linux-binary-7.3.4+deb13-cloud-amd64_7.3.4-1~bpo13+1_amd64.deb
Size: 13604064
SHA256: C4FBC8E404958693B28825474C20742D70594D65CA58AEA7BE6A279C81EB6FA0

Package: busybox-static
Version: 1:1.35.0-4+deb12u1+b1
Architecture: amd64
Filename: pool/main/b/busybox/busybox-static_1.35.0-4+deb12u1+b1_amd64.deb
Size: 928188
SHA256: 3d3fdbe91d4660c873e14b092c213fe81c1da6362daa236eb25d0171eb108744
";

    #[test]
    fn parses_packages_index() {
        let stanzas = parse_deb822("index", PACKAGES).unwrap();
        assert_eq!(stanzas.len(), 2);
        let kernel = PackageRecord::from_stanza("k", &stanzas[0]).unwrap();
        assert_eq!(kernel.version, "7.3.4-1~bpo13+1");
        assert_eq!(kernel.size, 13_604_064);
        assert_eq!(
            kernel.sha256,
            "c4fbc8e404958693b28825474c20742d70594d65ca58aea7be6a279c81eb6fa0"
        );
        assert_eq!(
            stanzas[0].get("description").unwrap(),
            "Linux 7.3.4 for x86-64 cloud (kernel image)\nThe Linux kernel 7.3.4 and modules for use on\n.\nx86-64 cloud."
        );
        let bb = PackageRecord::from_stanza("b", &stanzas[1]).unwrap();
        assert_eq!(
            bb.cache_name(),
            "busybox-static_1%3a1.35.0-4+deb12u1+b1_amd64.deb"
        );
    }

    #[test]
    fn record_needs_hash_and_valid_size() {
        let s = &parse_deb822(
            "index",
            "Package: a\nVersion: 1\nArchitecture: all\nFilename: x\nSize: 1\n",
        )
        .unwrap()[0];
        assert!(matches!(
            PackageRecord::from_stanza("a", s),
            Err(AptError::MissingField {
                field: "SHA256",
                ..
            })
        ));
        let s = &parse_deb822(
            "index",
            "Package: a\nVersion: 1\nArchitecture: all\nFilename: x\nSize: lots\nSHA256: 00\n",
        )
        .unwrap()[0];
        assert!(matches!(
            PackageRecord::from_stanza("a", s),
            Err(AptError::BadSize { .. })
        ));
    }

    #[test]
    fn spec_names() {
        assert_eq!(spec_package("busybox-static/bookworm"), "busybox-static");
        assert_eq!(
            spec_package("linux-source-7.3=7.3.4-1~bpo13+1"),
            "linux-source-7.3"
        );
        assert_eq!(spec_package("linux-source-7.3"), "linux-source-7.3");
    }

    #[test]
    fn finds_mirror_in_deb822_sources() {
        let text = "\
Types: deb
# http://snapshot.mirror.example/archive/debian/20250520T000000Z
URIs: http://mirror.example/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://mirror.example/debian-security
Suites: bookworm-security
Components: main
";
        let sources = parse_sources_deb822("test.sources", text).unwrap();
        assert_eq!(sources.len(), 2);
        let m = pick_debian_mirror(&sources).unwrap();
        assert_eq!(m.uri, "http://mirror.example/debian");
        assert_eq!(
            m.signed_by.as_deref(),
            Some("/usr/share/keyrings/debian-archive-keyring.gpg")
        );
    }

    #[test]
    fn finds_mirror_in_one_line_sources_and_skips_others() {
        let text = "\
deb https://packages.example.com/apt cloud-sdk-bookworm main
deb-src http://mirror.example/debian bookworm main
deb http://security.mirror.example/debian-security bookworm-security main
deb [arch=amd64 signed-by=/k.gpg] http://mirror.example/debian/ trixie main contrib # comment
";
        let sources = parse_sources_list(text);
        assert_eq!(sources.len(), 3);
        let m = pick_debian_mirror(&sources).unwrap();
        assert_eq!(m.uri, "http://mirror.example/debian/");
        assert_eq!(m.signed_by.as_deref(), Some("/k.gpg"));
        assert_eq!(m.components, ["main", "contrib"]);
    }

    #[test]
    fn malformed_sources_name_the_file() {
        let err = parse_sources_deb822("x.sources", " Types: deb\n").unwrap_err();
        assert!(matches!(&err, AptError::Deb822 { what, .. } if what == "x.sources"));
    }

    #[test]
    fn disabled_deb822_entries_are_ignored() {
        let text =
            "Types: deb\nURIs: http://a/debian\nSuites: sid\nComponents: main\nEnabled: no\n";
        assert!(
            parse_sources_deb822("test.sources", text)
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn private_sources_name_every_suite() {
        let s = private_sources_list("http://m/debian", "/k.gpg");
        for suite in SUITES {
            assert!(s.contains(&format!(
                "deb [signed-by=/k.gpg] http://m/debian {suite} main\n"
            )));
        }
    }

    #[test]
    fn verify_checks_size_and_hash() {
        let dir = std::env::temp_dir().join(format!("gmem-lab-verify-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let f = dir.join("x.deb");
        fs::write(&f, b"abc").unwrap();
        let mut rec = PackageRecord {
            package: "x".into(),
            version: "1".into(),
            architecture: "all".into(),
            filename: "x.deb".into(),
            size: 3,
            sha256: "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad".into(),
        };
        verify(&f, &rec).unwrap();
        rec.size = 4;
        assert!(matches!(
            verify(&f, &rec),
            Err(AptError::SizeMismatch { .. })
        ));
        rec.size = 3;
        rec.sha256 = "00".into();
        assert!(matches!(
            verify(&f, &rec),
            Err(AptError::HashMismatch { .. })
        ));
        fs::remove_dir_all(&dir).unwrap();
    }
}
