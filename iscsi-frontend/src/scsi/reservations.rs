//! Reservations (SPC-4 §5.13): RESERVE(6) and RELEASE(6) from SPC-2, and persistent
//! reservations (PERSISTENT RESERVE IN and OUT), with the rule of which nexus they let
//! run which command. They are shared by every session of the LUN and kept in memory.

use horn_uring::IoBuf;

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

    /// Whether `n` may run a command that `writes` (or only reads) the medium.
    pub(super) fn allows(&self, n: &Nexus, writes: bool, op: u8) -> bool {
        if let Some(r) = &self.reserve6 {
            // SPC-2 reservations: everything but a few commands conflict.
            if r != n && !matches!(op, 0x12 | 0xa0 | 0x03 | 0x5e | 0x5f | 0x17) {
                return false;
            }
        }
        let Some((_, ty)) = &self.holder else { return true };
        if self.is_holder(n) || matches!(op, 0x12 | 0xa0 | 0x03 | 0x5e | 0x5f | 0x25 | 0x9e) {
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

    pub(super) fn release6(&mut self, nexus: &Nexus) -> Response {
        if self.reserve6.as_ref() == Some(nexus) {
            self.reserve6 = None;
        }
        Response::good()
    }

    pub(super) fn pr_in(&self, cdb: &[u8; 16]) -> Response {
        let alloc = u16::from_be_bytes([cdb[7], cdb[8]]) as usize;
        let mut d = self.generation.to_be_bytes().to_vec();
        match cdb[1] & 0x1f {
            0 => {
                // READ KEYS
                d.extend_from_slice(&((self.keys.len() * 8) as u32).to_be_bytes());
                for (_, k) in &self.keys {
                    d.extend_from_slice(&k.to_be_bytes());
                }
            }
            1 => {
                // READ RESERVATION
                match &self.holder {
                    None => d.extend_from_slice(&0u32.to_be_bytes()),
                    Some((holder, ty)) => {
                        d.extend_from_slice(&16u32.to_be_bytes());
                        let key = holder.as_ref().and_then(|h| self.key_of(h)).unwrap_or(0);
                        d.extend_from_slice(&key.to_be_bytes());
                        d.extend_from_slice(&[0, 0, 0, 0, 0, *ty, 0, 0]);
                    }
                }
            }
            2 => {
                // REPORT CAPABILITIES
                d = vec![0, 8, 0x00, 0x81, 0xea, 0x01, 0, 0];
                // type mask: WR_EX_AR, EX_AC_RO, WR_EX_RO, EX_AC, WR_EX / EX_AC_AR
            }
            3 => {
                // READ FULL STATUS
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

    pub(super) fn pr_out(&mut self, cdb: &[u8; 16], data: Option<&IoBuf>, nexus: &Nexus) -> Response {
        let plen = u32::from_be_bytes(cdb[5..9].try_into().unwrap()) as usize;
        let sa = cdb[1] & 0x1f;
        let ty = cdb[2] & 0x0f;
        if plen != 24 {
            return Response::check(Sense::PARAM_LIST_LENGTH);
        }
        let Some(d) = data.filter(|d| d.len() >= 24) else {
            return Response::check(Sense::PARAM_LIST_LENGTH);
        };
        let d = d.as_slice();
        let key = u64::from_be_bytes(d[0..8].try_into().unwrap());
        let sa_key = u64::from_be_bytes(d[8..16].try_into().unwrap());
        let mine = self.key_of(nexus);
        let valid_type = matches!(ty, 1 | 3 | 5 | 6 | 7 | 8);
        match sa {
            // REGISTER and REGISTER AND IGNORE EXISTING KEY
            0 | 6 => {
                if sa == 0 && mine.unwrap_or(0) != key {
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
            // RESERVE
            1 => {
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
            // RELEASE
            2 => {
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
            // CLEAR
            3 => {
                if mine != Some(key) {
                    return Response::conflict();
                }
                self.keys.clear();
                self.holder = None;
                self.generation = self.generation.wrapping_add(1);
                Response::good()
            }
            // PREEMPT and PREEMPT AND ABORT
            4 | 5 => {
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
