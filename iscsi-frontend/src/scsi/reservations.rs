//! Reservations (SPC-4): RESERVE(6) and RELEASE(6) from SPC-2, and persistent
//! reservations (PERSISTENT RESERVE IN and OUT), with the rule of which nexus they let
//! run which command. They are shared by every session of the LUN and kept in memory.

use horn_uring::IoBuf;

use super::cdb::{be, service_action_of};
use super::opcode::{service_action as sa, RunsPast};
use super::{Nexus, Response, Sense};

/// A persistent reservation's type (SPC-4 §6.15.4).
pub mod pr_type {
    /// Write Exclusive.
    pub const WE: u8 = 1;
    /// Exclusive Access.
    pub const EA: u8 = 3;
    /// Write Exclusive, Registrants Only.
    pub const WE_RO: u8 = 5;
    /// Exclusive Access, Registrants Only.
    pub const EA_RO: u8 = 6;
    /// Write Exclusive, All Registrants.
    pub const WE_AR: u8 = 7;
    /// Exclusive Access, All Registrants.
    pub const EA_AR: u8 = 8;
}

/// A nexus's registered reservation key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registration {
    /// Who registered it.
    pub nexus: Nexus,
    /// The key.
    pub key: u64,
}

/// A persistent reservation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PersistentReservation {
    /// Its holder; None for the all-registrants types, which every registrant holds.
    pub holder: Option<Nexus>,
    /// Its type, one of [`pr_type`].
    pub reservation_type: u8,
}

impl PersistentReservation {
    /// A reservation of `reservation_type` taken by `nexus`.
    fn taken_by(nexus: &Nexus, reservation_type: u8) -> PersistentReservation {
        let all_registrants = matches!(reservation_type, pr_type::WE_AR | pr_type::EA_AR);
        PersistentReservation {
            holder: (!all_registrants).then(|| nexus.clone()),
            reservation_type,
        }
    }
}

/// Reservations held on the LUN, shared by every session.
#[derive(Debug, Default)]
pub struct Reservations {
    /// Persistent reservation generation.
    pub generation: u32,
    /// Registered keys, one per nexus.
    pub keys: Vec<Registration>,
    /// The persistent reservation.
    pub persistent: Option<PersistentReservation>,
    /// A RESERVE(6) reservation.
    pub reserve6: Option<Nexus>,
}

impl Reservations {
    fn key_of(&self, n: &Nexus) -> Option<u64> {
        self.keys.iter().find(|r| r.nexus == *n).map(|r| r.key)
    }

    fn is_holder(&self, n: &Nexus) -> bool {
        match &self.persistent {
            Some(PersistentReservation { holder: Some(h), .. }) => h == n,
            Some(PersistentReservation { holder: None, .. }) => self.key_of(n).is_some(),
            None => false,
        }
    }

    /// Whether `n` may run a command that `writes` (or only reads) the medium, and
    /// `runs_past` what (its row in the opcode table).
    pub(super) fn allows(&self, n: &Nexus, writes: bool, runs_past: RunsPast) -> bool {
        if let Some(r) = &self.reserve6 {
            // SPC-2 reservations: everything but a few commands conflict.
            if r != n && !runs_past.reserve6 {
                return false;
            }
        }
        let Some(reservation) = &self.persistent else {
            return true;
        };
        if self.is_holder(n) || runs_past.persistent {
            return true;
        }
        let registered = self.key_of(n).is_some();
        match reservation.reservation_type {
            pr_type::WE => !writes,
            pr_type::EA => false,
            pr_type::WE_RO | pr_type::WE_AR => !writes || registered,
            pr_type::EA_RO | pr_type::EA_AR => registered,
            _ => true,
        }
    }

    /// RESERVE(6): refused while another nexus holds it or a persistent reservation
    /// is held.
    pub(super) fn reserve6(&mut self, nexus: &Nexus) -> Response {
        if self.persistent.is_some() {
            return Response::conflict();
        }
        match &self.reserve6 {
            Some(h) if h != nexus => Response::conflict(),
            _ => {
                self.reserve6 = Some(nexus.clone());
                Response::good()
            }
        }
    }

    /// RELEASE(6): only its holder lets it go; anyone else's release does nothing.
    pub(super) fn release6(&mut self, nexus: &Nexus) -> Response {
        if self.reserve6.as_ref() == Some(nexus) {
            self.reserve6 = None;
        }
        Response::good()
    }

    /// PERSISTENT RESERVE IN.
    pub(super) fn pr_in(&self, cdb: &[u8; 16]) -> Response {
        let alloc = be(cdb, 7, 2) as usize;
        let mut d = self.generation.to_be_bytes().to_vec();
        match service_action_of(cdb) {
            sa::READ_KEYS => {
                d.extend_from_slice(&((self.keys.len() * 8) as u32).to_be_bytes());
                for r in &self.keys {
                    d.extend_from_slice(&r.key.to_be_bytes());
                }
            }
            sa::READ_RESERVATION => match &self.persistent {
                None => d.extend_from_slice(&0u32.to_be_bytes()),
                Some(p) => {
                    d.extend_from_slice(&16u32.to_be_bytes());
                    let key = p.holder.as_ref().and_then(|h| self.key_of(h)).unwrap_or(0);
                    d.extend_from_slice(&key.to_be_bytes());
                    d.extend_from_slice(&[0, 0, 0, 0, 0, p.reservation_type, 0, 0]);
                }
            },
            sa::REPORT_CAPABILITIES => {
                d = vec![0, 8, 0x00, 0x81, 0xea, 0x01, 0, 0];
                // type mask: WR_EX_AR, EX_AC_RO, WR_EX_RO, EX_AC, WR_EX / EX_AC_AR
            }
            sa::READ_FULL_STATUS => {
                let mut body = Vec::new();
                for Registration { nexus: n, key } in &self.keys {
                    let mut e = vec![0u8; 24];
                    e[0..8].copy_from_slice(&key.to_be_bytes());
                    if let Some(p) = &self.persistent {
                        if p.holder.as_ref().is_none_or(|h| h == n) {
                            e[12] = 0x01;
                            e[13] = p.reservation_type;
                        }
                    }
                    let tid = format!("{},i,0x{}", n.initiator, hexs(&n.isid));
                    let mut t = vec![0x45, 0, 0, 0];
                    let mut name = tid.into_bytes();
                    name.push(0);
                    while name.len() % 4 != 0 {
                        name.push(0);
                    }
                    t[2..4].copy_from_slice(&(name.len() as u16).to_be_bytes());
                    t.extend(name);
                    e[20..24].copy_from_slice(&(t.len() as u32).to_be_bytes());
                    e.extend(t);
                    body.extend(e);
                }
                d.extend_from_slice(&(body.len() as u32).to_be_bytes());
                d.extend(body);
            }
            _ => return Response::check(Sense::INVALID_FIELD_IN_CDB),
        }
        Response::data(&d, alloc)
    }

    /// PERSISTENT RESERVE OUT, its parameter list in `data`.
    pub(super) fn pr_out(&mut self, cdb: &[u8; 16], data: Option<&IoBuf>, nexus: &Nexus) -> Response {
        let plen = be(cdb, 5, 4);
        let action = service_action_of(cdb);
        let ty = cdb[2] & 0x0f;
        if plen != 24 {
            return Response::check(Sense::PARAM_LIST_LENGTH);
        }
        let Some(d) = data.filter(|d| d.len() >= 24) else {
            return Response::check(Sense::PARAM_LIST_LENGTH);
        };
        let d = d.as_slice();
        let key = be(d, 0, 8);
        let sa_key = be(d, 8, 8);
        let mine = self.key_of(nexus);
        let valid_type = matches!(
            ty,
            pr_type::WE | pr_type::EA | pr_type::WE_RO | pr_type::EA_RO | pr_type::WE_AR | pr_type::EA_AR
        );
        match action {
            sa::REGISTER | sa::REGISTER_AND_IGNORE_EXISTING_KEY => {
                if action == sa::REGISTER && mine.unwrap_or(0) != key {
                    return Response::conflict();
                }
                if sa_key == 0 {
                    if mine.is_some() {
                        self.keys.retain(|r| r.nexus != *nexus);
                        if self
                            .persistent
                            .as_ref()
                            .is_some_and(|p| p.holder.as_ref() == Some(nexus))
                        {
                            self.persistent = None;
                        }
                        if self.keys.is_empty() {
                            self.persistent = None;
                        }
                    }
                } else if let Some(r) = self.keys.iter_mut().find(|r| r.nexus == *nexus) {
                    r.key = sa_key;
                } else {
                    self.keys.push(Registration {
                        nexus: nexus.clone(),
                        key: sa_key,
                    });
                }
                self.generation = self.generation.wrapping_add(1);
                Response::good()
            }
            sa::RESERVE => {
                if mine != Some(key) {
                    return Response::conflict();
                }
                if !valid_type {
                    return Response::check(Sense::INVALID_FIELD_IN_CDB);
                }
                match &self.persistent {
                    Some(p) if p.reservation_type != ty => Response::conflict(),
                    Some(p) if p.holder.as_ref().is_some_and(|h| h != nexus) => Response::conflict(),
                    _ => {
                        self.persistent = Some(PersistentReservation::taken_by(nexus, ty));
                        Response::good()
                    }
                }
            }
            sa::RELEASE => {
                if mine != Some(key) {
                    return Response::conflict();
                }
                match &self.persistent {
                    None => Response::good(),
                    // Another holder's reservation stays, and the release succeeds.
                    Some(p) if p.holder.as_ref().is_some_and(|h| h != nexus) => Response::good(),
                    Some(p) if p.reservation_type != ty => Response::check(Sense::INVALID_RELEASE),
                    Some(_) => {
                        self.persistent = None;
                        Response::good()
                    }
                }
            }
            sa::CLEAR => {
                if mine != Some(key) {
                    return Response::conflict();
                }
                self.keys.clear();
                self.persistent = None;
                self.generation = self.generation.wrapping_add(1);
                Response::good()
            }
            sa::PREEMPT | sa::PREEMPT_AND_ABORT => {
                if mine != Some(key) {
                    return Response::conflict();
                }
                let holder_key = self
                    .persistent
                    .as_ref()
                    .and_then(|p| p.holder.as_ref())
                    .and_then(|h| self.key_of(h));
                let all_regs = matches!(self.persistent, Some(PersistentReservation { holder: None, .. }));
                if sa_key == 0 && !all_regs {
                    return Response::check(Sense::INVALID_FIELD_IN_PARAMS);
                }
                if self.persistent.is_some() && (holder_key == Some(sa_key) || all_regs) {
                    self.keys.retain(|r| r.key != sa_key || r.nexus == *nexus);
                    if all_regs && sa_key == 0 {
                        self.keys.retain(|r| r.nexus == *nexus);
                    }
                    self.persistent = Some(PersistentReservation::taken_by(nexus, ty));
                } else {
                    let before = self.keys.len();
                    self.keys.retain(|r| r.key != sa_key || r.nexus == *nexus);
                    if self.keys.len() == before {
                        return Response::conflict();
                    }
                }
                self.generation = self.generation.wrapping_add(1);
                Response::good()
            }
            _ => Response::check(Sense::INVALID_FIELD_IN_CDB),
        }
    }
}

/// `b` in lowercase hex, as an ISID is written in an iSCSI initiator port name.
fn hexs(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}
