//! The legacy port devices a Linux guest needs: a 16550 serial console (vm-superio), the
//! keyboard controller's reset line, and silence everywhere else.
//!
//! The interrupt controllers and the PIT live in KVM (KVM_CREATE_IRQCHIP, KVM_CREATE_PIT2);
//! only the serial port raises an interrupt from here, through an irqfd on ISA IRQ 4.

use std::io::{self, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

use vm_superio::{Serial, Trigger, serial::NoEvents};
use vmm_sys_util::eventfd::EventFd;

/// COM1: eight registers from this port.
pub(crate) const COM1_BASE: u16 = 0x3F8;
const COM1_PORTS: u16 = 8;
/// The ISA interrupt line of COM1.
pub(crate) const COM1_IRQ: u32 = 4;
/// The i8042 keyboard controller's data and command/status ports.
const I8042_DATA: u16 = 0x60;
const I8042_COMMAND: u16 = 0x64;
/// Pulsing the CPU reset line through the i8042: what `reboot=k` does.
const I8042_RESET_CPU: u8 = 0xFE;
/// The CMOS/RTC index and data ports.
const CMOS_INDEX: u16 = 0x70;
const CMOS_DATA: u16 = 0x71;

/// Where the serial console's bytes go.
pub(crate) type ConsoleSink = Box<dyn Write + Send>;

/// Raises the serial interrupt by writing the irqfd KVM listens on.
#[derive(Debug)]
pub(crate) struct IrqLine(pub(crate) EventFd);

impl Trigger for IrqLine {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// What the vCPU should do after a port access.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PortOutcome {
    /// Go on running the guest.
    Continue,
    /// The guest asked for a reset (it rebooted or powered off): stop the VM.
    Reset,
}

/// The port devices of one VM, shared by its vCPU threads.
pub(crate) struct LegacyDevices {
    serial: Mutex<Serial<IrqLine, NoEvents, ConsoleSink>>,
    /// Accesses to ports nothing emulates (reads see all ones, as on an empty ISA bus).
    unclaimed: AtomicU64,
}

impl std::fmt::Debug for LegacyDevices {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LegacyDevices")
            .field("unclaimed", &self.unclaimed)
            .finish_non_exhaustive()
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

impl LegacyDevices {
    /// A serial port that writes to `console` and interrupts through `irq`.
    pub(crate) fn new(irq: IrqLine, console: ConsoleSink) -> Self {
        LegacyDevices {
            serial: Mutex::new(Serial::new(irq, console)),
            unclaimed: AtomicU64::new(0),
        }
    }

    /// An `in` from `port`: fills `data`.
    pub(crate) fn read(&self, port: u16, data: &mut [u8]) {
        match port {
            p if (COM1_BASE..COM1_BASE + COM1_PORTS).contains(&p) => {
                let value = lock(&self.serial).read((p - COM1_BASE) as u8);
                data.fill(0);
                data[0] = value;
            }
            // No key waiting, controller ready: keeps Linux's i8042 probe short.
            I8042_DATA | I8042_COMMAND => data.fill(0),
            // A clock that reads midnight, 2000-01-00, and is never mid-update.
            CMOS_INDEX | CMOS_DATA => data.fill(0),
            _ => {
                self.unclaimed.fetch_add(1, Ordering::Relaxed);
                data.fill(0xFF);
            }
        }
    }

    /// An `out` to `port`.
    pub(crate) fn write(&self, port: u16, data: &[u8]) -> PortOutcome {
        let Some(&value) = data.first() else {
            return PortOutcome::Continue;
        };
        match port {
            p if (COM1_BASE..COM1_BASE + COM1_PORTS).contains(&p) => {
                // A failed console write or interrupt loses output, not guest state; the
                // guest goes on either way, as with a disconnected cable.
                let _ = lock(&self.serial).write((p - COM1_BASE) as u8, value);
            }
            I8042_COMMAND if value == I8042_RESET_CPU => return PortOutcome::Reset,
            I8042_DATA | I8042_COMMAND | CMOS_INDEX | CMOS_DATA => {}
            _ => {
                self.unclaimed.fetch_add(1, Ordering::Relaxed);
            }
        }
        PortOutcome::Continue
    }

    /// Flushes the console (on shutdown).
    pub(crate) fn flush_console(&self) {
        let _ = lock(&self.serial).writer_mut().flush();
    }

    /// Port accesses that reached no device.
    pub(crate) fn unclaimed_accesses(&self) -> u64 {
        self.unclaimed.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    use super::*;

    /// A console sink the test can read back.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl Write for Captured {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            lock(&self.0).extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn devices() -> (LegacyDevices, Captured, EventFd) {
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let seen = irq.try_clone().unwrap();
        let captured = Captured::default();
        let devices = LegacyDevices::new(IrqLine(irq), Box::new(captured.clone()));
        (devices, captured, seen)
    }

    #[test]
    fn serial_output_reaches_the_console_and_raises_the_irq() {
        let (devices, captured, irq) = devices();
        // Enable the "transmitter empty" interrupt, then send two bytes.
        devices.write(COM1_BASE + 1, &[0x02]);
        for byte in b"ok" {
            assert_eq!(devices.write(COM1_BASE, &[*byte]), PortOutcome::Continue);
        }
        assert_eq!(lock(&captured.0).as_slice(), b"ok");
        assert!(irq.read().unwrap() >= 1);
    }

    #[test]
    fn the_keyboard_controller_reset_stops_the_vm() {
        let (devices, _, _) = devices();
        assert_eq!(devices.write(I8042_COMMAND, &[0xAD]), PortOutcome::Continue);
        assert_eq!(
            devices.write(I8042_COMMAND, &[I8042_RESET_CPU]),
            PortOutcome::Reset
        );
    }

    #[test]
    fn unclaimed_ports_read_all_ones_and_are_counted() {
        let (devices, _, _) = devices();
        let mut data = [0u8; 4];
        devices.read(0xCFC, &mut data);
        assert_eq!(data, [0xFF; 4]);
        devices.write(0x80, &[0x12]);
        assert_eq!(devices.unclaimed_accesses(), 2);
        let mut status = [0xAAu8];
        devices.read(I8042_COMMAND, &mut status);
        assert_eq!(status, [0]);
    }
}
