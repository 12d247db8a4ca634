//! Reservations (SPC-4): RESERVE(6) and RELEASE(6) from SPC-2, and persistent
//! reservations (PERSISTENT RESERVE IN and OUT), with the rule of which nexus they let
//! run which command. They are shared by every session of the LUN and kept in memory.

use horn_uring::IoBuf;

use super::opcode::{be, service_action as sa, service_action_of, RunsPast};
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

/// Reservations held on the LUN, shared by every session.
#[derive(Debug, Default)]
pub struct Reservations {
    /// Persistent reservation generation.
    pub generation: u32,
    /// Registered keys by nexus.
    pub keys: Vec<(Nexus, u64)>,
    /// The persistent reservation: holder (None for all-registrants types) and type.
    pub holder: Option<(Option<Nexus>, u8)>,
    /// A RESERVE(6) reservation.
    pub reserve6: Option<Nexus>,
}

impl Reservations {
    fn key_of(&self, n: &Nexus) -> Option<u64> {
        self.keys.iter().find(|(k, _)| k == n).map(|(_, v)| *v)
    }

    fn is_holder(&self, n: &Nexus) -> bool {
        match &self.holder {
            Some((Some(h), _)) => h == n,
            Some((None, _)) => self.key_of(n).is_some(),
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
        let Some((_, ty)) = &self.holder else { return true };
        if self.is_holder(n) || runs_past.persistent {
            return true;
        }
        let registered = self.key_of(n).is_some();
        match *ty {
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
        if self.holder.is_some() {
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
                for (_, k) in &self.keys {
                    d.extend_from_slice(&k.to_be_bytes());
                }
            }
            sa::READ_RESERVATION => match &self.holder {
                None => d.extend_from_slice(&0u32.to_be_bytes()),
                Some((holder, ty)) => {
                    d.extend_from_slice(&16u32.to_be_bytes());
                    let key = holder.as_ref().and_then(|h| self.key_of(h)).unwrap_or(0);
                    d.extend_from_slice(&key.to_be_bytes());
                    d.extend_from_slice(&[0, 0, 0, 0, 0, *ty, 0, 0]);
                }
            },
            sa::REPORT_CAPABILITIES => {
                d = vec![0, 8, 0x00, 0x81, 0xea, 0x01, 0, 0];
                // type mask: WR_EX_AR, EX_AC_RO, WR_EX_RO, EX_AC, WR_EX / EX_AC_AR
            }
            sa::READ_FULL_STATUS => {
                let mut body = Vec::new();
                for (n, k) in &self.keys {
                    let mut e = vec![0u8; 24];
                    e[0..8].copy_from_slice(&k.to_be_bytes());
                    if let Some((h, ty)) = &self.holder {
                        if h.as_ref().is_none_or(|h| h == n) {
                            e[12] = 0x01;
                            e[13] = *ty;
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
                        self.keys.retain(|(n, _)| n != nexus);
                        if let Some((Some(h), _)) = &self.holder {
                            if h == nexus {
                                self.holder = None;
                            }
                        }
                        if self.keys.is_empty() {
                            self.holder = None;
                        }
                    }
                } else if let Some(e) = self.keys.iter_mut().find(|(n, _)| n == nexus) {
                    e.1 = sa_key;
                } else {
                    self.keys.push((nexus.clone(), sa_key));
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
                match &self.holder {
                    Some((_, t)) if *t != ty => Response::conflict(),
                    Some((Some(h), _)) if h != nexus => Response::conflict(),
                    _ => {
                        let all = matches!(ty, pr_type::WE_AR | pr_type::EA_AR);
                        self.holder = Some(((!all).then(|| nexus.clone()), ty));
                        Response::good()
                    }
                }
            }
            sa::RELEASE => {
                if mine != Some(key) {
                    return Response::conflict();
                }
                match self.holder.clone() {
                    None => Response::good(),
                    Some((h, t)) => {
                        if h.as_ref().is_some_and(|h| h != nexus) {
                            return Response::good();
                        }
                        if t != ty {
                            return Response::check(Sense::INVALID_RELEASE);
                        }
                        self.holder = None;
                        Response::good()
                    }
                }
            }
            sa::CLEAR => {
                if mine != Some(key) {
                    return Response::conflict();
                }
                self.keys.clear();
                self.holder = None;
                self.generation = self.generation.wrapping_add(1);
                Response::good()
            }
            sa::PREEMPT | sa::PREEMPT_AND_ABORT => {
                if mine != Some(key) {
                    return Response::conflict();
                }
                let holder_key = self
                    .holder
                    .as_ref()
                    .and_then(|(h, _)| h.as_ref())
                    .and_then(|h| self.key_of(h));
                let all_regs = matches!(self.holder, Some((None, _)));
                if sa_key == 0 && !all_regs {
                    return Response::check(Sense::INVALID_FIELD_IN_PARAMS);
                }
                if self.holder.is_some() && (holder_key == Some(sa_key) || all_regs) {
                    self.keys.retain(|(n, k)| *k != sa_key || n == nexus);
                    if all_regs && sa_key == 0 {
                        self.keys.retain(|(n, _)| n == nexus);
                    }
                    let all = matches!(ty, pr_type::WE_AR | pr_type::EA_AR);
                    self.holder = Some(((!all).then(|| nexus.clone()), ty));
                } else {
                    let before = self.keys.len();
                    self.keys.retain(|(n, k)| *k != sa_key || n == nexus);
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

fn hexs(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}
