//! The lease rules, apart from any clock or database: the caller passes the time in.
//!
//! A lease lasts its time to live from its grant or its last renewal. [`Leases::expired`]
//! takes the leases whose time ran out; the store deletes their keys. After a restart
//! the store knows its leases' ids and times to live but not how long ago they were
//! renewed, so [`Leases::restore`] gives each a full time to live from the restart: a
//! holder that is alive renews in time, and one that is gone loses its keys one time to
//! live late, never early.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use super::LeaseId;

/// Live leases: id → (time to live, deadline).
#[derive(Debug, Default)]
pub struct Leases {
    live: BTreeMap<LeaseId, (Duration, Instant)>,
    next: LeaseId,
}

impl Leases {
    /// No leases; ids start above `highest_used`.
    pub fn new(highest_used: LeaseId) -> Leases {
        Leases {
            live: BTreeMap::new(),
            next: highest_used + 1,
        }
    }

    /// A lease of `ttl` from `now`.
    pub fn grant(&mut self, ttl: Duration, now: Instant) -> LeaseId {
        let id = self.next;
        self.next += 1;
        self.live.insert(id, (ttl, now + ttl));
        id
    }

    /// A lease known from before a restart, lasting a full `ttl` from `now`.
    pub fn restore(&mut self, id: LeaseId, ttl: Duration, now: Instant) {
        self.next = self.next.max(id + 1);
        self.live.insert(id, (ttl, now + ttl));
    }

    /// Renews `id` for its full time to live from `now`; false if it is not live.
    pub fn renew(&mut self, id: LeaseId, now: Instant) -> bool {
        match self.live.get_mut(&id) {
            Some((ttl, deadline)) if *deadline > now => {
                *deadline = now + *ttl;
                true
            }
            _ => false,
        }
    }

    /// Ends `id`; false if it was not live.
    pub fn revoke(&mut self, id: LeaseId) -> bool {
        self.live.remove(&id).is_some()
    }

    /// Is `id` live at `now`?
    pub fn is_live(&self, id: LeaseId, now: Instant) -> bool {
        self.live.get(&id).is_some_and(|(_, d)| *d > now)
    }

    /// Removes and returns the leases whose deadline is at or before `now`.
    pub fn expired(&mut self, now: Instant) -> Vec<LeaseId> {
        let gone: Vec<LeaseId> = self
            .live
            .iter()
            .filter(|(_, (_, d))| *d <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in &gone {
            self.live.remove(id);
        }
        gone
    }

    /// The time to live of `id`, if it is known.
    pub fn ttl(&self, id: LeaseId) -> Option<Duration> {
        self.live.get(&id).map(|(ttl, _)| *ttl)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn a_lease_renewed_in_time_lives_on_and_one_left_alone_expires_once() {
        let t0 = Instant::now();
        let mut l = Leases::new(0);
        let a = l.grant(5 * S, t0);
        let b = l.grant(5 * S, t0);
        assert_ne!(a, b);
        assert!(l.renew(a, t0 + 4 * S));
        assert!(l.expired(t0 + 4 * S).is_empty());
        assert_eq!(l.expired(t0 + 5 * S), vec![b]);
        assert!(l.expired(t0 + 6 * S).is_empty(), "b expires once");
        assert!(l.is_live(a, t0 + 8 * S));
        assert_eq!(l.expired(t0 + 9 * S), vec![a]);
        assert!(!l.renew(a, t0 + 9 * S), "an expired lease is not renewed");
    }

    #[test]
    fn a_late_renewal_does_not_revive_a_lease_not_yet_collected() {
        let t0 = Instant::now();
        let mut l = Leases::new(0);
        let a = l.grant(S, t0);
        assert!(!l.renew(a, t0 + 2 * S));
        assert_eq!(l.expired(t0 + 2 * S), vec![a]);
    }

    #[test]
    fn restored_leases_get_a_full_ttl_and_new_ids_do_not_collide() {
        let t0 = Instant::now();
        let mut l = Leases::new(0);
        l.restore(7, 3 * S, t0);
        assert!(l.is_live(7, t0 + 2 * S));
        let next = l.grant(S, t0);
        assert!(next > 7);
        assert_eq!(l.expired(t0 + 3 * S), vec![7, next]);
        assert!(!l.revoke(7));
    }
}
