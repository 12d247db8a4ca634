//! Overlapping changes across queues: which queue may have changes in flight on which
//! part of the volume.
//!
//! Within one queue, a change (write, discard, write-zeroes) that overlaps one in
//! flight waits for it (`EngineQueue`'s `changes`). Queues have connections of their
//! own to every replica, so two queues' overlapping changes could reach the replicas
//! in different orders and leave them different. [`Stripes`] stops that: the volume is
//! cut into 64 KiB stripes, each hashed onto one of a fixed table of slots, and a queue
//! must own every slot of a change's stripes before the change starts. A slot is owned
//! by one queue at a time (any number of that queue's changes may share it); another
//! queue's change waits until the owner's last change there completes.
//!
//! Owning a slot is one compare-and-swap on an atomic word, with no lock, so the
//! cost on the data path is a few atomic operations per change. A change takes all of
//! its slots or none (it gives back what it took when one is owned elsewhere), so no
//! queue holds slots while it waits and no two queues can wait on each other. Two
//! stripes that hash to the same slot only make a change wait that need not (the
//! table has 4,096 slots; a volume has few queues).
//!
//! A queue that finds a slot owned marks it; the owner's last release of a marked
//! slot says so, and the owner then wakes the other queues so the waiting change is
//! retried at once (no wake-up is lost: the mark is set on an owned slot, or the
//! waiter sees the slot free and takes it).

use std::sync::atomic::{AtomicU64, Ordering};

/// Bytes per stripe.
pub const STRIPE: u64 = 64 << 10;
/// Slots in the table.
pub const SLOTS: usize = 4096;

const COUNT_BITS: u32 = 24;
const COUNT_MASK: u64 = (1 << COUNT_BITS) - 1;
const OWNER_MASK: u64 = 0xffff_ffff << COUNT_BITS;
/// Set by a queue that found the slot owned by another.
const WAITER: u64 = 1 << 63;

/// The slot table of one volume, shared by its queues. A queue is named by a
/// non-zero `u32` ([`Stripes::new_owner`]).
#[derive(Debug)]
pub struct Stripes {
    slots: Box<[AtomicU64]>,
    next_owner: AtomicU64,
}

impl Default for Stripes {
    fn default() -> Self {
        Stripes {
            slots: (0..SLOTS).map(|_| AtomicU64::new(0)).collect(),
            next_owner: AtomicU64::new(1),
        }
    }
}

/// What a release found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use]
pub enum Released {
    /// Nobody waits for the slots given back.
    Quiet,
    /// Another queue waits for a slot given back: wake the queues.
    Waited,
}

impl Stripes {
    /// A new owner name for a queue.
    pub fn new_owner(&self) -> u32 {
        // Wraps after 4 billion queues opened; 0 is skipped (it means "free").
        loop {
            let n = self.next_owner.fetch_add(1, Ordering::Relaxed) as u32;
            if n != 0 {
                return n;
            }
        }
    }

    /// Takes every slot of `[offset, offset + len)` for `owner`, or none of them:
    /// false when another queue owns one (the change must wait).
    pub fn try_acquire(&self, owner: u32, offset: u64, len: u64) -> bool {
        let mut taken = 0usize;
        let mut ok = true;
        for slot in slots_of(offset, len) {
            if !self.take(slot, owner) {
                ok = false;
                break;
            }
            taken += 1;
        }
        if !ok {
            // Give back what was taken, in the same order (the slots repeat only
            // when stripes share one, and each take was counted).
            for slot in slots_of(offset, len).take(taken) {
                let _ = self.give(slot);
            }
        }
        ok
    }

    /// Gives back the slots of `[offset, offset + len)`, taken by
    /// [`Stripes::try_acquire`] for the same owner.
    pub fn release(&self, offset: u64, len: u64) -> Released {
        let mut waited = Released::Quiet;
        for slot in slots_of(offset, len) {
            if self.give(slot) == Released::Waited {
                waited = Released::Waited;
            }
        }
        waited
    }

    fn take(&self, slot: usize, owner: u32) -> bool {
        let me = (owner as u64) << COUNT_BITS;
        let s = &self.slots[slot];
        let mut v = s.load(Ordering::Acquire);
        loop {
            let holder = v & OWNER_MASK;
            if holder == 0 || holder == me {
                let count = (v & COUNT_MASK) + 1;
                debug_assert!(count <= COUNT_MASK, "a slot's count overflows");
                match s.compare_exchange_weak(
                    v,
                    (v & WAITER) | me | count,
                    Ordering::AcqRel,
                    Ordering::Acquire,
                ) {
                    Ok(_) => return true,
                    Err(now) => v = now,
                }
                continue;
            }
            // Owned elsewhere: mark it, unless it was freed meanwhile.
            let before = s.fetch_or(WAITER, Ordering::AcqRel);
            let holder = before & OWNER_MASK;
            if holder != 0 && holder != me {
                return false;
            }
            v = before | WAITER;
        }
    }

    fn give(&self, slot: usize) -> Released {
        let s = &self.slots[slot];
        let mut v = s.load(Ordering::Acquire);
        loop {
            debug_assert!(v & COUNT_MASK > 0, "a slot given back more often than taken");
            let last = v & COUNT_MASK == 1;
            let next = if last { 0 } else { v - 1 };
            match s.compare_exchange_weak(v, next, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) if last && v & WAITER != 0 => return Released::Waited,
                Ok(_) => return Released::Quiet,
                Err(now) => v = now,
            }
        }
    }

    /// The owner of the slot of the stripe holding `offset`, if any (for tests).
    pub fn owner_at(&self, offset: u64) -> Option<u32> {
        let slot = slot_of(offset / STRIPE);
        let owner = (self.slots[slot].load(Ordering::Acquire) & OWNER_MASK) >> COUNT_BITS;
        (owner != 0).then_some(owner as u32)
    }
}

/// The slots of the stripes `[offset, offset + len)` touches, in stripe order (every
/// slot once, in index order, for a range of more stripes than slots).
fn slots_of(offset: u64, len: u64) -> impl Iterator<Item = usize> {
    let first = offset / STRIPE;
    let last = (offset + len.max(1) - 1) / STRIPE;
    let stripes = last - first + 1;
    let (all, range) = if stripes >= SLOTS as u64 {
        (Some(0..SLOTS), None)
    } else {
        (None, Some((first..=last).map(slot_of)))
    };
    all.into_iter().flatten().chain(range.into_iter().flatten())
}

fn slot_of(stripe: u64) -> usize {
    // Fibonacci hashing: neighbouring stripes land far apart.
    (stripe.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> (64 - SLOTS.trailing_zeros())) as usize
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn a_queue_shares_its_slots_with_itself_and_not_with_another() {
        let s = Stripes::default();
        let (a, b) = (s.new_owner(), s.new_owner());
        assert!(s.try_acquire(a, 0, 4096));
        assert!(s.try_acquire(a, 0, 8192), "the same queue overlaps itself");
        assert!(!s.try_acquire(b, 4096, 4096), "another queue waits");
        assert!(s.try_acquire(b, 10 * STRIPE, 4096) || slot_of(10) == slot_of(0));
        assert_eq!(
            s.release(0, 4096),
            Released::Quiet,
            "a's other change still holds it"
        );
        assert_eq!(s.release(0, 8192), Released::Waited, "b waited for it");
        assert_eq!(s.owner_at(0), None);
        assert!(s.try_acquire(b, 4096, 4096));
        assert_eq!(s.owner_at(4096), Some(b));
    }

    #[test]
    fn a_change_takes_all_of_its_slots_or_none() {
        let s = Stripes::default();
        let (a, b) = (s.new_owner(), s.new_owner());
        assert!(s.try_acquire(a, 5 * STRIPE, 1));
        // b's change covers stripes 0..10: stripe 5 is a's, so b takes nothing.
        assert!(!s.try_acquire(b, 0, 10 * STRIPE));
        for stripe in [0, 1, 2, 3, 4, 6, 7, 8, 9] {
            let o = s.owner_at(stripe * STRIPE);
            assert!(o.is_none() || o == Some(a), "stripe {stripe} kept by {o:?}");
        }
        let _ = s.release(5 * STRIPE, 1);
        assert!(s.try_acquire(b, 0, 10 * STRIPE));
        // A range longer than the table takes every slot.
        assert!(!s.try_acquire(a, 1 << 40, u32::MAX as u64));
        let _ = s.release(0, 10 * STRIPE);
        assert!(s.try_acquire(a, 1 << 40, u32::MAX as u64));
        let owners = s
            .slots
            .iter()
            .map(|v| (v.load(Ordering::Acquire) & OWNER_MASK) >> COUNT_BITS);
        assert!(owners.into_iter().all(|o| o == a as u64));
    }

    #[test]
    fn two_queues_never_hold_one_stripe_at_once() {
        // Each thread takes a random range, checks that a shared marker per stripe
        // is not another's, and gives it back; a seed from the environment reruns it.
        let seed: u64 = std::env::var("HORN_STRIPES_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(rand::random);
        println!("stripes: seed {seed} (HORN_STRIPES_SEED={seed} reruns it)");
        let s = Arc::new(Stripes::default());
        let markers: Arc<Vec<AtomicU64>> = Arc::new((0..64).map(|_| AtomicU64::new(0)).collect());
        let threads: Vec<_> = (0..4u64)
            .map(|t| {
                let (s, markers) = (s.clone(), markers.clone());
                std::thread::spawn(move || {
                    use rand::{Rng, SeedableRng};
                    let me = s.new_owner();
                    let mut rng = rand::rngs::SmallRng::seed_from_u64(seed ^ (t + 1));
                    let mut held = 0u64;
                    for _ in 0..20_000 {
                        let first = rng.gen_range(0..60u64);
                        let n = rng.gen_range(1..=4u64);
                        if !s.try_acquire(me, first * STRIPE, n * STRIPE) {
                            continue;
                        }
                        for m in &markers[first as usize..(first + n) as usize] {
                            let prev = m.swap(me as u64, Ordering::AcqRel);
                            assert!(prev == 0 || prev == me as u64, "stripe held by {prev} and {me}");
                        }
                        for m in &markers[first as usize..(first + n) as usize] {
                            m.store(0, Ordering::Release);
                        }
                        let _ = s.release(first * STRIPE, n * STRIPE);
                        held += 1;
                    }
                    held
                })
            })
            .collect();
        let held: u64 = threads.into_iter().map(|t| t.join().unwrap()).sum();
        assert!(held > 0);
        assert!((0..SLOTS).all(|i| s.slots[i].load(Ordering::Acquire) & !WAITER == 0));
    }
}
