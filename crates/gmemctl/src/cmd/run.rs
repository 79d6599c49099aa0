//! `gmemctl run`: start the built-in guest (or a Linux kernel) and serve the VM's control
//! API until SIGINT or SIGTERM, the guest's reset, or a guest failure.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use signal_hook::consts::{SIGINT, SIGTERM};
use vmm::api::ApiServer;
use vmm::{LinuxBoot, Vm, VmConfig, VmState};

use crate::error::CliError;
use crate::table::mib;
use crate::units::parse_size;

/// How often the main thread looks at the signal flag and the guest.
const WATCH_PERIOD: Duration = Duration::from_millis(50);
/// How long a VM whose guest reset mid-migration keeps serving the API, so that the client
/// of the migration reads the job's final report (it polls every 100 ms).
const RESET_REPORT_GRACE: Duration = Duration::from_millis(500);

/// Options of `gmemctl run`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Guest RAM, a multiple of 2 MiB, e.g. 256M or 1G [default: 256M].
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    mem: Option<u64>,
    /// vCPUs, each writing and verifying its own slice of RAM [default: 2].
    #[arg(long, value_name = "N")]
    vcpus: Option<u32>,
    /// Bytes per memslot chunk, the unit the remap mechanism moves [default: 2M].
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    chunk_size: Option<u64>,
    /// Spare chunk-sized room in the guest_memfd for remapping into [default: 8].
    #[arg(long, value_name = "N")]
    spare_chunks: Option<u64>,
    /// Unix socket to serve the control API on (created with mode 0600)
    /// [default: gmemctl-PID.sock in the temporary directory].
    #[arg(long, value_name = "PATH")]
    api_sock: Option<PathBuf>,
    /// VM configuration as JSON: the "config" object of `GET /vm` (mem_size, vcpus,
    /// chunk_size, spare_chunks, linux; unknown fields are refused). Flags override it.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Boot this Linux kernel instead of the built-in guest: a bzImage, or an ELF vmlinux
    /// with a PVH note. (Under PVM hosts Linux does not get through boot; nested KVM does.)
    #[arg(long, value_name = "PATH", help_heading = "Linux guest")]
    kernel: Option<PathBuf>,
    /// The Linux guest's initramfs.
    #[arg(
        long,
        value_name = "PATH",
        requires = "kernel",
        help_heading = "Linux guest"
    )]
    initramfs: Option<PathBuf>,
    /// The Linux guest's command line [default: "console=ttyS0 reboot=k panic=-1 pci=off
    /// nomodules i8042.noaux i8042.nomux i8042.dumbkbd"].
    #[arg(
        long,
        value_name = "TEXT",
        requires = "kernel",
        help_heading = "Linux guest"
    )]
    cmdline: Option<String>,
    /// Append the Linux guest's serial console to this file [default: stdout].
    #[arg(
        long,
        value_name = "PATH",
        requires = "kernel",
        help_heading = "Linux guest"
    )]
    console: Option<PathBuf>,
}

/// Reads a `VmConfig` from a JSON file.
fn read_config(path: &Path) -> Result<VmConfig, CliError> {
    let text = std::fs::read_to_string(path).map_err(|source| CliError::ReadConfig {
        path: path.to_owned(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|source| CliError::ParseConfig {
        path: path.to_owned(),
        source,
    })
}

/// The configuration: the file's (or the defaults), then the flags.
fn config(args: &Args) -> Result<VmConfig, CliError> {
    let mut config = match &args.config {
        Some(path) => read_config(path)?,
        None => VmConfig::default(),
    };
    if let Some(mem) = args.mem {
        config.mem_size = mem;
    }
    if let Some(vcpus) = args.vcpus {
        config.vcpus = vcpus;
    }
    if let Some(chunk_size) = args.chunk_size {
        config.chunk_size = chunk_size;
    }
    if let Some(spare_chunks) = args.spare_chunks {
        config.spare_chunks = spare_chunks;
    }
    // The Linux flags need --kernel, and override the file's `linux` section field by field.
    if let Some(kernel) = &args.kernel {
        let linux = config.linux.get_or_insert_with(|| LinuxBoot {
            kernel: kernel.clone(),
            initramfs: None,
            cmdline: None,
            console: None,
        });
        linux.kernel = kernel.clone();
        if let Some(initramfs) = &args.initramfs {
            linux.initramfs = Some(initramfs.clone());
        }
        if let Some(cmdline) = &args.cmdline {
            linux.cmdline = Some(cmdline.clone());
        }
        if let Some(console) = &args.console {
            linux.console = Some(console.clone());
        }
    }
    config.validate().map_err(|reason| {
        CliError::InvalidArgument(format!("invalid VM configuration: {reason}"))
    })?;
    Ok(config)
}

/// Starts the VM and serves its API until a signal or a guest failure.
pub fn run(kvm_device: &Path, args: Args) -> Result<(), CliError> {
    // The device's own reason (missing, no permission) before anything else is set up.
    gmem::sys::kvm::open(kvm_device)?;
    let config = config(&args)?;
    // The first SIGINT or SIGTERM asks for a clean shutdown; a second one exits at once.
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [SIGINT, SIGTERM] {
        signal_hook::flag::register_conditional_shutdown(signal, 1, Arc::clone(&stop))
            .and_then(|_| signal_hook::flag::register(signal, Arc::clone(&stop)))
            .map_err(CliError::InstallSignalHandler)?;
    }
    let path = args.api_sock.unwrap_or_else(|| {
        std::env::temp_dir().join(format!("gmemctl-{}.sock", std::process::id()))
    });
    let vm = Arc::new(Vm::start_on(kvm_device, config.clone())?);
    let mut server = ApiServer::start(Arc::clone(&vm), &path)?;
    println!("pid: {}", std::process::id());
    println!("api-sock: {}", path.display());
    let _ = std::io::stdout().flush();
    eprintln!(
        "gmemctl run: {} of guest RAM in {} chunks of {} ({} spare), {} vCPU(s); serving the \
         API until SIGINT or SIGTERM",
        mib(config.mem_size),
        config.chunks(),
        mib(config.chunk_size),
        config.spare_chunks,
        config.vcpus
    );

    if let Some(linux) = vm.linux_summary() {
        eprintln!(
            "gmemctl run: Linux ({}) kernel at {:#x}..{:#x}{}",
            linux.protocol,
            linux.kernel.0,
            linux.kernel.1,
            linux
                .initramfs
                .map(|(start, end)| format!(", initramfs at {start:#x}..{end:#x}"))
                .unwrap_or_default()
        );
    }

    let outcome = loop {
        if stop.load(Ordering::Relaxed) {
            break Ok(());
        }
        let state = vm.state();
        // Only a guest's reset stops the VM while this loop runs.
        if state == VmState::Stopped {
            break judge_reset(&server, vm.metrics().guest_reset);
        }
        if state == VmState::Failed {
            let failures: Vec<String> = vm
                .metrics()
                .vcpus
                .iter()
                .filter_map(|v| v.failure.as_ref().map(|f| format!("vCPU {}: {f}", v.index)))
                .collect();
            break Err(CliError::CheckFailed(format!(
                "the guest failed ({}); stopping",
                failures.join("; ")
            )));
        }
        if !server.is_serving() {
            break Err(CliError::CheckFailed(
                "the API server stopped unexpectedly; stopping".into(),
            ));
        }
        std::thread::sleep(WATCH_PERIOD);
    };
    // Stop serving (waiting for a running migration), remove the socket, stop the vCPUs.
    let served = server.shutdown();
    let stopped = vm.shutdown();
    outcome?;
    served?;
    stopped?;
    let metrics = vm.metrics();
    if let Some(linux) = vm.linux_summary() {
        eprintln!(
            "gmemctl run: stopped after {} ms; {} port accesses reached no device",
            metrics.uptime_ms, linux.unclaimed_port_accesses
        );
        return Ok(());
    }
    eprintln!(
        "gmemctl run: stopped after {} ms; the guest verified {} in {} sweeps with {} \
         mismatches",
        metrics.uptime_ms,
        mib(metrics.bytes_verified),
        metrics.sweeps,
        metrics.mismatches
    );
    if metrics.mismatches > 0 {
        return Err(CliError::CheckFailed(format!(
            "the guest found {} wrong words in its memory",
            metrics.mismatches
        )));
    }
    Ok(())
}

/// What a guest's reset means for `gmemctl run`: a reboot the guest asked for (the i8042
/// reset line) ends it cleanly; a triple fault is a crash, and a reset while a migration runs
/// loses the guest's memory mid-move: both are failures, never a clean exit.
fn judge_reset(server: &ApiServer, reset: Option<vmm::GuestReset>) -> Result<(), CliError> {
    let Some(reset) = reset else {
        return Err(CliError::CheckFailed(
            "the VM stopped without a recorded reason; stopping".into(),
        ));
    };
    if reset.during_migration {
        // Let the job record the reset in its report, and let a client polling it read it.
        server.api().join_migrations();
        std::thread::sleep(RESET_REPORT_GRACE);
    }
    let at = reset.at_ms;
    match (&reset.cause, reset.during_migration) {
        (cause, false) if cause.is_requested() => {
            eprintln!("gmemctl run: the guest requested a reset after {at} ms ({cause}); stopping");
            Ok(())
        }
        (cause, false) => Err(CliError::CheckFailed(format!(
            "the guest crashed after {at} ms: {cause}; stopping"
        ))),
        (cause, true) => Err(CliError::CheckFailed(format!(
            "the guest reset after {at} ms while a migration was moving its memory: {cause}; \
             stopping"
        ))),
    }
}
