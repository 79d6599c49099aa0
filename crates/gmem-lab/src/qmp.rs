//! A small QMP client: asks the lab's QEMU whether the guest stopped, reads its CPUs, quits it.
//!
//! QEMU runs with `-action reboot=shutdown,shutdown=pause`, so a guest reset (a triple fault,
//! a panic's reboot, any reset request) and a guest poweroff stop the VM instead of starting
//! the firmware again: the CPUs keep the state they had when the lab's kernel died, and
//! `info registers -a` reads it. (Without the pause, QEMU's reset log holds only the state at
//! the first reset, and SeaBIOS triple-faults on purpose when it sees a warm reboot, which
//! reads like the kernel's own triple fault.)

use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use thiserror::Error;

/// How long QEMU may take to answer one command.
const REPLY_TIMEOUT: Duration = Duration::from_secs(10);

/// Errors talking to QEMU's monitor.
#[derive(Debug, Error)]
pub enum QmpError {
    #[error("cannot connect to QEMU's monitor at {path}")]
    Connect {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot send `{command}` to QEMU's monitor")]
    Send {
        command: String,
        #[source]
        source: io::Error,
    },
    #[error("QEMU's monitor did not answer `{command}` within {REPLY_TIMEOUT:?}")]
    NoReply { command: String },
    #[error("QEMU refused `{command}`: {reply}")]
    Refused { command: String, reply: Value },
}

/// Why the guest stopped, from QEMU's SHUTDOWN event (`reason`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stop {
    /// A reset request: a triple fault, a reboot (a panic with `panic=-1`), a reset port.
    Reset,
    /// The guest powered the machine off.
    Poweroff,
    /// Another reason, as QEMU named it (or "unknown" when no event arrived).
    Other(String),
}

/// A connected monitor. Replies and events arrive on a reader thread.
pub struct Qmp {
    stream: UnixStream,
    replies: mpsc::Receiver<Value>,
    events: mpsc::Receiver<Value>,
    stop: Option<Stop>,
}

impl Qmp {
    /// Connects to the monitor socket QEMU serves (`-qmp unix:PATH,server=on,wait=off`),
    /// waiting up to `timeout` for QEMU to create it, and leaves capability negotiation.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Self, QmpError> {
        let deadline = Instant::now() + timeout;
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(_) if Instant::now() < deadline => thread::sleep(Duration::from_millis(20)),
                Err(source) => {
                    return Err(QmpError::Connect {
                        path: path.to_owned(),
                        source,
                    });
                }
            }
        };
        let reader = stream.try_clone().map_err(|source| QmpError::Connect {
            path: path.to_owned(),
            source,
        })?;
        let (reply_tx, replies) = mpsc::channel();
        let (event_tx, events) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(reader).lines() {
                let Ok(line) = line else { return };
                let Ok(msg) = serde_json::from_str::<Value>(&line) else {
                    continue;
                };
                let to = if msg.get("event").is_some() {
                    &event_tx
                } else if msg.get("QMP").is_some() {
                    // The greeting.
                    continue;
                } else {
                    &reply_tx
                };
                if to.send(msg).is_err() {
                    return;
                }
            }
        });
        let mut qmp = Qmp {
            stream,
            replies,
            events,
            stop: None,
        };
        qmp.execute("qmp_capabilities", None)?;
        Ok(qmp)
    }

    fn execute(&mut self, command: &str, arguments: Option<Value>) -> Result<Value, QmpError> {
        let mut msg = json!({ "execute": command });
        if let Some(a) = arguments {
            msg["arguments"] = a;
        }
        let send = |source| QmpError::Send {
            command: command.to_owned(),
            source,
        };
        writeln!(self.stream, "{msg}").map_err(send)?;
        let reply = self
            .replies
            .recv_timeout(REPLY_TIMEOUT)
            .map_err(|_| QmpError::NoReply {
                command: command.to_owned(),
            })?;
        match reply.get("return") {
            Some(r) => Ok(r.clone()),
            None => Err(QmpError::Refused {
                command: command.to_owned(),
                reply,
            }),
        }
    }

    /// Whether the guest has stopped the VM (`query-status`: "shutdown", "guest-panicked",
    /// "internal-error"), and why, from the SHUTDOWN event when one arrived.
    pub fn stopped(&mut self) -> Result<Option<Stop>, QmpError> {
        let status = self.execute("query-status", None)?;
        for event in self.events.try_iter() {
            if event["event"] == "SHUTDOWN" && self.stop.is_none() {
                self.stop = Some(match event["data"]["reason"].as_str() {
                    Some("guest-reset") => Stop::Reset,
                    Some("guest-shutdown") => Stop::Poweroff,
                    Some(other) => Stop::Other(other.to_owned()),
                    None => Stop::Other("unknown".into()),
                });
            }
        }
        let state = status["status"].as_str().unwrap_or_default();
        Ok(match state {
            "shutdown" => Some(
                self.stop
                    .clone()
                    .unwrap_or_else(|| Stop::Other("unknown".into())),
            ),
            "guest-panicked" | "internal-error" => Some(Stop::Other(state.to_owned())),
            _ => None,
        })
    }

    /// Every CPU's registers, as `info registers -a` prints them.
    pub fn registers(&mut self) -> Result<String, QmpError> {
        let text = self.execute(
            "human-monitor-command",
            Some(json!({ "command-line": "info registers -a" })),
        )?;
        Ok(text.as_str().unwrap_or_default().replace("\r\n", "\n"))
    }

    /// Asks QEMU to exit. Its reply may not arrive before it closes the socket.
    pub fn quit(&mut self) {
        let _ = writeln!(self.stream, "{}", json!({ "execute": "quit" }));
    }
}

/// One line per CPU from `info registers -a`: its number, instruction pointer, CR2 and CR3.
pub fn cpu_summary(registers: &str) -> Vec<String> {
    registers
        .split("CPU#")
        .skip(1)
        .filter_map(|dump| {
            let cpu = dump.split_whitespace().next()?;
            let word = |prefix: &str| dump.split_whitespace().find(|w| w.starts_with(prefix));
            let ip = word("RIP=").or_else(|| word("EIP="))?;
            let regs = [Some(ip), word("CR2="), word("CR3=")];
            let regs: Vec<&str> = regs.into_iter().flatten().collect();
            Some(format!("CPU {cpu}: {}", regs.join(" ")))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_cpu_is_summarised_by_its_instruction_pointer_and_page_tables() {
        let regs = "\nCPU#0\nRAX=0000000000000000 RBX=0\nRIP=ffffffff81001234 RFL=00000002 \
                    [-------] CPL=0\nCR0=80050033 CR2=ffffc90000001ff8 CR3=0000000001234000 \
                    CR4=00350ef0\nCPU#1\nEAX=0000aa55\nEIP=00007c06 EFL=00000002\n\
                    CR0=00000010 CR2=00000000 CR3=00000000 CR4=00000000\n";
        assert_eq!(
            cpu_summary(regs),
            [
                "CPU 0: RIP=ffffffff81001234 CR2=ffffc90000001ff8 CR3=0000000001234000",
                "CPU 1: EIP=00007c06 CR2=00000000 CR3=00000000",
            ]
        );
        assert!(cpu_summary("no registers here").is_empty());
    }
}
