//! What a migration did: per-step outcomes, stop-time statistics, and the verified result.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::memory::GuestOffset;
use crate::numa::NodeId;

/// A way of moving gmem pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "snake_case")]
pub enum MechanismKind {
    /// The kernel's own folio migration (move_pages); the guest need not stop.
    Native,
    /// Copy a chunk to spare room on the target and rebind its memslot; stops for copy+swap.
    Remap,
    /// Copy out, punch, re-allocate on the target, copy back; any layout.
    Refault,
}

impl MechanismKind {
    /// All mechanisms, in `auto`'s order of preference.
    pub const ALL: [MechanismKind; 3] = [
        MechanismKind::Native,
        MechanismKind::Remap,
        MechanismKind::Refault,
    ];
}

impl fmt::Display for MechanismKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            MechanismKind::Native => "native",
            MechanismKind::Remap => "remap",
            MechanismKind::Refault => "refault",
        })
    }
}

/// Which mechanism to use. In JSON, one word: `"auto"`, `"native"`, `"remap"` or
/// `"refault"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MechanismChoice {
    /// Native if the kernel migrates gmem, else remap if the layout has spare room, else refault.
    #[default]
    Auto,
    /// Exactly this one.
    Exactly(MechanismKind),
}

impl Serialize for MechanismChoice {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for MechanismChoice {
    /// One of the four words; anything else is serde's "unknown variant" error, naming them.
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        const WORDS: &[&str] = &["auto", "native", "remap", "refault"];
        let word = String::deserialize(deserializer)?;
        word.parse()
            .map_err(|_| serde::de::Error::unknown_variant(&word, WORDS))
    }
}

impl FromStr for MechanismKind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        MechanismKind::ALL
            .into_iter()
            .find(|kind| kind.to_string() == s)
            .ok_or_else(|| format!("unknown mechanism '{s}': use native, remap or refault"))
    }
}

impl FromStr for MechanismChoice {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(MechanismChoice::Auto),
            other => other.parse().map(MechanismChoice::Exactly).map_err(|_| {
                format!("unknown mechanism '{other}': use auto, native, remap or refault")
            }),
        }
    }
}

impl MechanismChoice {
    /// Every choice: `auto`, then each mechanism.
    pub const ALL: [MechanismChoice; 4] = [
        MechanismChoice::Auto,
        MechanismChoice::Exactly(MechanismKind::Native),
        MechanismChoice::Exactly(MechanismKind::Remap),
        MechanismChoice::Exactly(MechanismKind::Refault),
    ];
}

#[cfg(feature = "clap")]
impl clap::ValueEnum for MechanismChoice {
    fn value_variants<'a>() -> &'a [Self] {
        &Self::ALL
    }

    fn to_possible_value(&self) -> Option<clap::builder::PossibleValue> {
        Some(match self {
            MechanismChoice::Auto => clap::builder::PossibleValue::new("auto").help(
                "Native if the kernel migrates gmem, else remap if the layout has spare room, \
                 else refault",
            ),
            MechanismChoice::Exactly(kind) => kind.to_possible_value()?,
        })
    }
}

impl fmt::Display for MechanismChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MechanismChoice::Auto => f.write_str("auto"),
            MechanismChoice::Exactly(kind) => kind.fmt(f),
        }
    }
}

/// Where content went after a failed step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RestoredTo {
    /// Back where it was: the original memory, or fresh pages on the original node(s).
    Original,
    /// Fresh pages on whatever node the kernel could find.
    AnyNode,
}

/// How one step ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum StepOutcome {
    /// All its pages moved.
    Moved,
    /// The kernel moved some pages and not others (native only); content is intact.
    Partial {
        /// Pages the kernel did not move.
        not_moved: u64,
        /// What it said.
        reason: String,
    },
    /// Nothing was touched, e.g. the target could not supply the memory.
    NotAttempted {
        /// Why.
        reason: String,
    },
    /// The step failed halfway; the content was put back.
    Restored {
        /// What failed.
        reason: String,
        /// Where the content is now.
        to: RestoredTo,
    },
}

/// Content check of one step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ContentCheck {
    /// Not checked (verification off, or confidential memory the host may not read).
    NotTaken,
    /// The content after the step equals the content before it.
    Matched,
    /// It differs.
    Mismatched,
}

/// The result of one step.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepReport {
    /// Offset from the start of guest RAM.
    pub guest_offset: GuestOffset,
    /// Bytes.
    pub len: u64,
    /// Destination node.
    pub target: NodeId,
    /// How it ended.
    pub outcome: StepOutcome,
    /// How long the guest was stopped for it, if it was.
    pub stop: Option<Duration>,
    /// Of that stop, how long the pause itself took to be granted (batch sizing only).
    #[serde(skip)]
    pub stop_entry: Option<Duration>,
    /// Where the stop went, phase by phase (remap).
    #[serde(skip)]
    pub stop_phases: Option<StopPhases>,
    /// Pages now on the target that were moved by this step.
    pub pages_moved: u64,
    /// Resident pages of the range not on the target afterwards (placement check).
    pub pages_off_target: u64,
    /// Present pages whose frame changed, if PFNs were readable.
    pub pfns_changed: Option<u64>,
    /// Present pages whose frames were compared.
    pub pfns_checked: Option<u64>,
    /// Content check.
    pub content: ContentCheck,
}

/// Distribution of guest stop times, microseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct StopStats {
    /// Number of stops.
    pub count: u64,
    /// Median.
    pub p50_us: u64,
    /// 99th percentile.
    pub p99_us: u64,
    /// Longest.
    pub max_us: u64,
    /// Sum of all stops.
    pub total_us: u64,
}

impl StopStats {
    /// Statistics of `stops` (nearest-rank percentiles).
    pub fn from_durations(stops: &[Duration]) -> Self {
        if stops.is_empty() {
            return StopStats::default();
        }
        let mut us: Vec<u64> = stops.iter().map(|d| d.as_micros() as u64).collect();
        us.sort_unstable();
        let rank = |p: f64| us[((p * us.len() as f64).ceil() as usize).clamp(1, us.len()) - 1];
        StopStats {
            count: us.len() as u64,
            p50_us: rank(0.50),
            p99_us: rank(0.99),
            max_us: *us.last().expect("non-empty"),
            total_us: us.iter().sum(),
        }
    }
}

/// One remap stop, phase by phase, in the order they run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StopPhases {
    /// From the pause request until no vCPU ran: kick, exit, park.
    pub entry: Duration,
    /// Copying the chunk to its new room.
    pub copy: Duration,
    /// Rebinding the chunk's memslot (delete and re-create: KVM waits out SRCU readers).
    pub swap: Duration,
    /// Comparing what the guest now sees with the old chunk (zero without content checks).
    pub check: Duration,
    /// Mapping the new chunk ahead for the guest, where KVM can (KVM_PRE_FAULT_MEMORY).
    /// The stop ends with the resume request.
    pub prefault: Duration,
}

/// [`StopStats`] of each phase of the stops that were timed phase by phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct StopPhaseStats {
    /// See [`StopPhases::entry`].
    pub entry: StopStats,
    /// See [`StopPhases::copy`].
    pub copy: StopStats,
    /// See [`StopPhases::swap`].
    pub swap: StopStats,
    /// See [`StopPhases::check`].
    pub check: StopStats,
    /// See [`StopPhases::prefault`].
    pub prefault: StopStats,
}

impl StopPhaseStats {
    /// Statistics per phase, or `None` when no stop was timed phase by phase.
    pub fn from_phases(phases: &[StopPhases]) -> Option<Self> {
        if phases.is_empty() {
            return None;
        }
        let of = |phase: fn(&StopPhases) -> Duration| {
            StopStats::from_durations(&phases.iter().map(phase).collect::<Vec<_>>())
        };
        Some(StopPhaseStats {
            entry: of(|p| p.entry),
            copy: of(|p| p.copy),
            swap: of(|p| p.swap),
            check: of(|p| p.check),
            prefault: of(|p| p.prefault),
        })
    }
}

impl std::fmt::Display for StopPhaseStats {
    /// "entry 130/1393 us, copy 225/404 us, ...": p50/p99 of each phase.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let phases = [
            ("entry", &self.entry),
            ("copy", &self.copy),
            ("swap", &self.swap),
            ("check", &self.check),
            ("prefault", &self.prefault),
        ];
        for (index, (name, stats)) in phases.iter().enumerate() {
            let sep = if index == 0 { "" } else { ", " };
            write!(f, "{sep}{name} {}/{} us", stats.p50_us, stats.p99_us)?;
        }
        Ok(())
    }
}

/// The verified result of a migration.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MigrationReport {
    /// The mechanism that ran.
    pub mechanism: MechanismKind,
    /// The policy, as text.
    pub policy: String,
    /// Whether pages already in place were relocated too.
    pub relocate_in_place: bool,
    /// Pages the plan said to move.
    pub pages_planned: u64,
    /// Pages that moved and passed verification.
    pub pages_moved: u64,
    /// Pages that did not move (content intact where they are).
    pub pages_not_moved: u64,
    /// Resident pages already where they belong.
    pub pages_in_place: u64,
    /// Bytes copied or migrated.
    pub bytes_moved: u64,
    /// Present pages whose frame changed (None without pagemap access).
    pub pfns_changed: Option<u64>,
    /// Present pages whose frames were compared.
    pub pfns_checked: Option<u64>,
    /// Steps whose content was checked (byte-exact, or by hash for native).
    pub content_checks: u64,
    /// Checks that found a difference (each one restored, or reported if not restorable).
    pub content_mismatches: u64,
    /// Guest stop times over all steps.
    pub stops: StopStats,
    /// The same stops phase by phase, where the mechanism times them (remap).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stop_phases: Option<StopPhaseStats>,
    /// Steps run.
    pub steps: u64,
    /// Wall time of the whole migration, microseconds.
    pub elapsed_us: u64,
    /// Bytes moved per second of wall time, GB/s (10^9).
    pub throughput_gbps: f64,
    /// Resident pages per node before.
    pub before: BTreeMap<NodeId, u64>,
    /// Resident pages per node after.
    pub after: BTreeMap<NodeId, u64>,
    /// Steps that did not fully succeed.
    pub failures: Vec<StepReport>,
    /// Whether every planned page moved and verified.
    pub complete: bool,
    /// Things worth knowing (e.g. unreadable PFNs, a copier in use).
    pub notes: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_nearest_rank() {
        let stops: Vec<Duration> = (1..=100).map(Duration::from_micros).collect();
        let s = StopStats::from_durations(&stops);
        assert_eq!((s.count, s.p50_us, s.p99_us, s.max_us), (100, 50, 99, 100));
        assert_eq!(StopStats::from_durations(&[]).count, 0);
        let one = StopStats::from_durations(&[Duration::from_micros(7)]);
        assert_eq!((one.p50_us, one.p99_us), (7, 7));
    }

    #[test]
    fn mechanism_choice_parses() {
        assert_eq!("auto".parse(), Ok(MechanismChoice::Auto));
        assert_eq!(
            "remap".parse(),
            Ok(MechanismChoice::Exactly(MechanismKind::Remap))
        );
        assert!(
            "teleport"
                .parse::<MechanismChoice>()
                .unwrap_err()
                .contains("use auto")
        );
        let json = serde_json::to_string(&MechanismChoice::Exactly(MechanismKind::Native)).unwrap();
        assert_eq!(json, "\"native\"");
        assert_eq!(
            serde_json::from_str::<MechanismChoice>("\"auto\"").unwrap(),
            MechanismChoice::Auto
        );
        assert_eq!(
            serde_json::from_str::<MechanismChoice>("\"refault\"").unwrap(),
            MechanismChoice::Exactly(MechanismKind::Refault)
        );
    }
}
