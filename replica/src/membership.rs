//! A volume's membership as its replicas hold it: who may serve reads, and the rules a
//! replica applies before it lets an engine claim it or record a new membership.
//!
//! Standalone (an engine with no manager), the replicas themselves are the authority
//! on membership. Each keeps, durably in `engine.json`, the newest [`Record`] an engine
//! gave it: the volume's identity, the engine's generation and identity, a version
//! within that generation, and which replicas are RW (hold every acknowledged write)
//! and WO (being rebuilt). The engine's side of the rules (which record a start takes,
//! when a drop counts) is `horn_engine::membership`; `docs/engine.md` gives the rules
//! and their proof sketch.
//!
//! The replica's side, here, as plain functions of the stored state so the simulation
//! can run them:
//! - [`check_claim`]: a claim needs a generation *strictly* greater than the replica's
//!   (or the same generation from the same engine, which repeats a claim it made), below
//!   [`MAX_GENERATION`], for the replica's own volume (a blank replica takes any);
//! - [`check_record`]: a record is taken only from the engine holding the claim, for
//!   the replica's volume, and only if it is newer than the one stored;
//! - the **read lease**: a claim grants its engine a [`Lease`], renewed while the
//!   engine runs, and no other engine's claim is taken until it lapses. An engine
//!   serves reads only while a share of its RW members hold its lease, so an engine
//!   that a newer one has deposed stops serving reads before the newer one can have
//!   written anything (`docs/engine.md`, "Read leases").

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The highest generation a claim may carry: the next generation of any engine is
/// always representable, and nobody can fence a replica for ever by claiming
/// `u64::MAX`.
pub const MAX_GENERATION: u64 = 1 << 62;

/// The longest read lease a replica grants: a claim or renewal asking for more is
/// refused, so no engine can keep a replica from every other for long.
pub const MAX_LEASE_MS: u64 = 60_000;

/// A read lease the replica granted: until `until` (milliseconds on the replica's own
/// monotonic clock) it takes no claim from an engine other than `engine`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// The engine holding it.
    pub engine: String,
    /// When it lapses, on the replica's clock.
    pub until: u64,
}

/// A volume's membership, as one engine recorded it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// The volume's identity (given when it was created; every member carries it).
    pub volume: String,
    /// The generation of the engine that wrote it.
    pub generation: u64,
    /// Counts the records that engine wrote: the first (at start) is 0.
    pub version: u64,
    /// The identity of the engine that wrote it.
    pub engine: String,
    /// Replicas that hold every acknowledged write: each one's identity, with its data
    /// address when the record was written (for messages).
    pub rw: BTreeMap<String, String>,
    /// Replicas being rebuilt (they take writes and serve no reads), likewise.
    #[serde(default)]
    pub wo: BTreeMap<String, String>,
    /// The member sets this record must be stored by half of (rounded up) to count:
    /// the RW members of the record it follows and, for an engine's first record,
    /// the sets its base had to reach too (the base may never have counted). A start
    /// that finds this record needs a strict majority of each. Empty for a volume's
    /// first record (which every RW member must store).
    #[serde(default)]
    pub after: Vec<BTreeMap<String, String>>,
    /// Who else holds the record: empty when the replicas alone are the authority on
    /// membership; otherwise the authority that stored it before it counted (a
    /// manager: `manager:CLUSTER-ID`). An engine started without that authority
    /// refuses a volume whose newest record names one.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub authority: String,
    /// An encrypted volume's key check value (`horn_engine::crypt`; never the key):
    /// an engine with another key, or none, is refused. Empty: not encrypted.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub cipher: String,
}

impl Record {
    /// Orders records: a newer engine's first, then a later version of the same one.
    pub fn epoch(&self) -> (u64, u64) {
        (self.generation, self.version)
    }

    /// How many of the RW members make a strict majority of them.
    pub fn majority(&self) -> usize {
        self.rw.len() / 2 + 1
    }
}

/// The replica's side of membership, as stored in `engine.json`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Standing {
    /// The volume this replica belongs to; `None` while it is blank.
    pub volume: Option<String>,
    /// Generation of the engine holding the claim.
    pub generation: u64,
    /// Identity of that engine (`None` before any claim with one).
    pub engine: Option<String>,
    /// The newest membership record stored.
    pub record: Option<Record>,
    /// The read lease granted last (kept in memory only; after a restart the replica
    /// assumes its holder's lease was just renewed).
    pub lease: Option<Lease>,
}

/// Why a claim or a record was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// The claim's generation does not exceed the replica's.
    #[error("generation {given} does not exceed this replica's {current} (held by engine {holder}): another engine owns it")]
    NotNewer {
        /// The replica's generation.
        current: u64,
        /// The claim's.
        given: u64,
        /// The engine holding it.
        holder: String,
    },
    /// The claim's generation is out of range.
    #[error("generation {0} is beyond the largest a claim may carry ({MAX_GENERATION})")]
    TooLarge(u64),
    /// The replica belongs to another volume.
    #[error("this replica belongs to volume {mine}, not {given}")]
    OtherVolume {
        /// The replica's volume.
        mine: String,
        /// The one asked for.
        given: String,
    },
    /// A record from an engine that does not hold the claim.
    #[error("membership record from engine {given} at generation {generation}, but this replica is held by {holder} at {current}")]
    NotHolder {
        /// The record's engine.
        given: String,
        /// The record's generation.
        generation: u64,
        /// The engine holding the claim.
        holder: String,
        /// The replica's generation.
        current: u64,
    },
    /// Another engine holds a read lease on the replica: it may be serving reads.
    #[error("engine {holder} holds a read lease on this replica for another {left_ms} ms (it may still be serving reads); a claim by another engine waits for it to lapse")]
    Leased {
        /// The engine holding the lease.
        holder: String,
        /// How long it has left.
        left_ms: u64,
    },
    /// A record not newer than the one stored.
    #[error("membership record {given:?} is not newer than this replica's {stored:?}")]
    NotNewerRecord {
        /// The record's (generation, version).
        given: (u64, u64),
        /// The stored one's.
        stored: (u64, u64),
    },
}

/// Checks a claim by engine `engine` at `generation` for `volume` (`None`: the engine
/// does not know the volume yet, as at a volume's first start), at `now` on the
/// replica's clock. A claim that would otherwise be taken waits while another engine's
/// read lease runs ([`Refused::Leased`]).
pub fn check_claim(
    s: &Standing,
    now: u64,
    generation: u64,
    engine: &str,
    volume: Option<&str>,
) -> Result<(), Refused> {
    if generation > MAX_GENERATION {
        return Err(Refused::TooLarge(generation));
    }
    if let (Some(mine), Some(given)) = (&s.volume, volume) {
        if mine != given {
            return Err(Refused::OtherVolume {
                mine: mine.clone(),
                given: given.to_string(),
            });
        }
    }
    let same_engine = s.engine.as_deref() == Some(engine);
    if generation > s.generation || (generation == s.generation && same_engine) {
        match leased_to_another(s, now, engine) {
            Some(lease) => Err(Refused::Leased {
                holder: lease.engine.clone(),
                left_ms: lease.until - now,
            }),
            None => Ok(()),
        }
    } else {
        Err(Refused::NotNewer {
            current: s.generation,
            given: generation,
            holder: s.engine.clone().unwrap_or_else(|| "(unnamed)".into()),
        })
    }
}

/// The read lease another engine than `engine` holds at `now`, if one runs.
pub fn leased_to_another<'a>(s: &'a Standing, now: u64, engine: &str) -> Option<&'a Lease> {
    s.lease.as_ref().filter(|l| l.until > now && l.engine != engine)
}

/// Checks a membership record against the replica's standing.
pub fn check_record(s: &Standing, r: &Record) -> Result<(), Refused> {
    if let Some(mine) = &s.volume {
        if *mine != r.volume {
            return Err(Refused::OtherVolume {
                mine: mine.clone(),
                given: r.volume.clone(),
            });
        }
    }
    if r.generation != s.generation || s.engine.as_deref() != Some(r.engine.as_str()) {
        return Err(Refused::NotHolder {
            given: r.engine.clone(),
            generation: r.generation,
            holder: s.engine.clone().unwrap_or_else(|| "(none)".into()),
            current: s.generation,
        });
    }
    if let Some(stored) = &s.record {
        if r.epoch() <= stored.epoch() {
            return Err(Refused::NotNewerRecord {
                given: r.epoch(),
                stored: stored.epoch(),
            });
        }
    }
    Ok(())
}

/// A new identity: 128 random bits from the kernel, as 32 hex digits.
pub fn new_id() -> String {
    let mut b = [0u8; 16];
    let mut filled = 0;
    while filled < b.len() {
        // SAFETY: writes at most `len - filled` bytes into the live array `b`.
        let n = unsafe { libc::getrandom(b[filled..].as_mut_ptr().cast(), b.len() - filled, 0) };
        if n > 0 {
            filled += n as usize;
        } else if std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
            panic!("getrandom failed: {}", std::io::Error::last_os_error());
        }
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held(g: u64, e: &str) -> Standing {
        Standing {
            volume: Some("v".into()),
            generation: g,
            engine: Some(e.into()),
            record: None,
            lease: None,
        }
    }

    #[test]
    fn claims_need_a_strictly_newer_generation_unless_the_same_engine_repeats_one() {
        let s = held(5, "a");
        assert!(check_claim(&s, 0, 6, "b", Some("v")).is_ok());
        assert!(check_claim(&s, 0, 5, "a", Some("v")).is_ok());
        assert!(matches!(
            check_claim(&s, 0, 5, "b", Some("v")),
            Err(Refused::NotNewer { .. })
        ));
        assert!(matches!(
            check_claim(&s, 0, 4, "a", Some("v")),
            Err(Refused::NotNewer { .. })
        ));
        assert_eq!(
            check_claim(&s, 0, u64::MAX, "b", None),
            Err(Refused::TooLarge(u64::MAX))
        );
        assert!(matches!(
            check_claim(&s, 0, 6, "b", Some("w")),
            Err(Refused::OtherVolume { .. })
        ));
        assert!(check_claim(&Standing::default(), 0, 1, "b", Some("w")).is_ok());
    }

    #[test]
    fn a_running_lease_holds_off_every_other_engines_claim_until_it_lapses() {
        let mut s = held(5, "a");
        s.lease = Some(Lease {
            engine: "a".into(),
            until: 1000,
        });
        // The holder repeats its claim; another engine waits, however new its
        // generation, and is told how long.
        assert!(check_claim(&s, 999, 5, "a", Some("v")).is_ok());
        assert_eq!(
            check_claim(&s, 400, 9, "b", Some("v")),
            Err(Refused::Leased {
                holder: "a".into(),
                left_ms: 600
            })
        );
        assert!(check_claim(&s, 1000, 9, "b", Some("v")).is_ok());
        // A claim refused for good is refused as such, lease or not.
        assert!(matches!(
            check_claim(&s, 400, 4, "b", Some("v")),
            Err(Refused::NotNewer { .. })
        ));
    }

    #[test]
    fn records_come_only_from_the_holder_and_only_forward() {
        let mut s = held(5, "a");
        let r = Record {
            volume: "v".into(),
            generation: 5,
            version: 0,
            engine: "a".into(),
            rw: [("x".to_string(), "addr".to_string())].into(),
            wo: BTreeMap::new(),
            after: Vec::new(),
            authority: String::new(),
            cipher: String::new(),
        };
        assert!(check_record(&s, &r).is_ok());
        s.record = Some(r.clone());
        assert!(matches!(
            check_record(&s, &r),
            Err(Refused::NotNewerRecord { .. })
        ));
        let next = Record {
            version: 1,
            ..r.clone()
        };
        assert!(check_record(&s, &next).is_ok());
        let foreign = Record {
            engine: "b".into(),
            version: 2,
            ..r.clone()
        };
        assert!(matches!(
            check_record(&s, &foreign),
            Err(Refused::NotHolder { .. })
        ));
        let other = Record {
            volume: "w".into(),
            version: 3,
            ..r
        };
        assert!(matches!(
            check_record(&s, &other),
            Err(Refused::OtherVolume { .. })
        ));
    }

    #[test]
    fn identities_are_distinct_hex() {
        let (a, b) = (new_id(), new_id());
        assert_eq!(a.len(), 32);
        assert!(a.chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
    }
}
