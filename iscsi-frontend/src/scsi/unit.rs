//! The logical unit as every connection serving it shares it ([`LunInfo`]): its size
//! and names, its reservations and medium-removal holds, the nexuses logged in with
//! the unit attentions they have yet to be told of, and the block ranges being
//! written.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

use super::io::WriteRanges;
use super::reservations::Reservations;
use super::{Nexus, Sense};

/// What a LUN is, shared by every connection serving it.
#[derive(Debug)]
pub struct LunInfo {
    /// Size in bytes: the volume's, followed as it grows ([`LunInfo::follow_size`]).
    size: AtomicU64,
    /// Logical block size.
    pub block_size: u32,
    /// Read-only LUN.
    pub read_only: bool,
    /// The volume's name (INQUIRY unit serial number).
    pub serial: String,
    /// A 64-bit NAA identifier derived from the volume's name (VPD page 83).
    pub naa: u64,
    /// Reservations.
    pub reservations: Mutex<Reservations>,
    /// Set by PREVENT ALLOW MEDIUM REMOVAL, per nexus.
    pub prevent: Mutex<Vec<Nexus>>,
    /// Nexuses logged in, each with the unit attention it has yet to be told of.
    pub nexuses: Mutex<Vec<LoggedIn>>,
    /// Some nexus has a unit attention pending (checked on every command).
    pub attention: AtomicBool,
    /// Block ranges being written, from every session.
    pub writing: WriteRanges,
    /// Bytes of buffers that writes of every session hold while they wait for their
    /// data (the transport's budget across connections).
    pub waiting_data: std::sync::atomic::AtomicUsize,
    /// Failed I/Os, logged a line per burst (a faulted volume fails every one).
    pub failures: horn_engine::frontend::FailureLog,
}

/// A nexus logged in to the LUN.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoggedIn {
    /// The nexus.
    pub nexus: Nexus,
    /// The unit attention it has yet to be told of.
    pub unit_attention: Option<Sense>,
}

impl LunInfo {
    /// A LUN over a volume of `size` bytes in blocks of `block_size`.
    pub fn new(name: &str, size: u64, block_size: u32, read_only: bool) -> LunInfo {
        // NAA 6 (registered extended) with an IEEE OUI of zero is for vendors; Horn
        // uses NAA 3 (locally assigned), from a hash of the name.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in name.bytes() {
            h = (h ^ b as u64).wrapping_mul(0x0100_0000_01b3);
        }
        LunInfo {
            size: AtomicU64::new(size),
            block_size,
            read_only,
            serial: name.chars().filter(|c| c.is_ascii_graphic()).take(32).collect(),
            naa: (3u64 << 60) | (h >> 4),
            reservations: Mutex::new(Reservations::default()),
            prevent: Mutex::new(Vec::new()),
            nexuses: Mutex::new(Vec::new()),
            attention: AtomicBool::new(false),
            writing: WriteRanges::default(),
            waiting_data: std::sync::atomic::AtomicUsize::new(0),
            failures: Default::default(),
        }
    }

    /// A nexus logs in.
    pub fn join(&self, n: &Nexus) {
        self.nexuses.lock().unwrap().push(LoggedIn {
            nexus: n.clone(),
            unit_attention: None,
        });
    }

    /// A nexus is gone (logout or connection loss).
    pub fn leave(&self, n: &Nexus) {
        let mut v = self.nexuses.lock().unwrap();
        if let Some(i) = v.iter().position(|l| l.nexus == *n) {
            v.swap_remove(i);
        }
    }

    /// A reset: every nexus, the one that asked for it too, gets a unit attention
    /// (SAM-5 §6.3.3).
    pub fn reset(&self, sense: Sense) {
        let mut v = self.nexuses.lock().unwrap();
        for l in v.iter_mut() {
            l.unit_attention = Some(sense);
        }
        self.attention.store(true, Ordering::SeqCst);
    }

    /// Takes `n`'s pending unit attention, if any.
    pub(super) fn take_attention(&self, n: &Nexus) -> Option<Sense> {
        if !self.attention.load(Ordering::Relaxed) {
            return None;
        }
        let mut v = self.nexuses.lock().unwrap();
        let ua = v
            .iter_mut()
            .find(|l| l.nexus == *n)
            .and_then(|l| l.unit_attention.take());
        if v.iter().all(|l| l.unit_attention.is_none()) {
            self.attention.store(false, Ordering::SeqCst);
        }
        ua
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.size.load(Ordering::Relaxed)
    }

    /// Takes the volume's size `now` (it grew: an online expansion). Every nexus is
    /// told with a unit attention, CAPACITY DATA HAS CHANGED (SPC-4 §5.11), so that
    /// initiators read the capacity again; one with an attention pending already
    /// (a reset) keeps that one.
    pub(super) fn follow_size(&self, now: u64) {
        if self.size.swap(now, Ordering::SeqCst) == now {
            return;
        }
        let mut v = self.nexuses.lock().unwrap();
        for l in v.iter_mut() {
            l.unit_attention.get_or_insert(Sense::CAPACITY_CHANGED);
        }
        self.attention.store(true, Ordering::SeqCst);
    }

    /// The LUN's size in logical blocks.
    pub(super) fn blocks(&self) -> u64 {
        self.size() / self.block_size as u64
    }
}
