//! What an initiator may set on the unit besides reservations: the mode pages (MODE
//! SENSE and MODE SELECT, 6 and 10: caching and control), START STOP UNIT and PREVENT
//! ALLOW MEDIUM REMOVAL.

use super::cdb::be;
use super::opcode;
use super::{LunInfo, Nexus, Response, Sense};

/// The caching mode page (SBC-3).
const CACHING: u8 = 0x08;
/// The control mode page (SPC-4).
const CONTROL: u8 = 0x0a;
/// Not a page: MODE SENSE asks for every page with it.
const ALL_PAGES: u8 = 0x3f;

impl LunInfo {
    /// MODE SENSE(6) and (10).
    pub(super) fn mode_sense(&self, cdb: &[u8; 16]) -> Response {
        let ten = cdb[0] == opcode::MODE_SENSE_10;
        let page = cdb[2] & 0x3f;
        let pc = cdb[2] >> 6;
        let subpage = cdb[3];
        let dbd = cdb[1] & 0x08 != 0;
        let alloc = if ten {
            be(cdb, 7, 2) as usize
        } else {
            cdb[4] as usize
        };
        if pc == 3 {
            return Response::check(Sense::SAVING_NOT_SUPPORTED);
        }
        if subpage != 0 && subpage != 0xff {
            return Response::check(Sense::INVALID_FIELD_IN_CDB);
        }
        let Some(pages) = mode_pages(page, pc == 1) else {
            return Response::check(Sense::INVALID_FIELD_IN_CDB);
        };
        // Device-specific parameter: WP, and DPOFUA (DPO and FUA are honoured).
        let wp = if self.read_only { 0x80 } else { 0 } | 0x10;
        let mut block_desc = Vec::new();
        if !dbd {
            let mut b = vec![0u8; 8];
            let n = self.blocks().min(0xffff_ffff) as u32;
            b[0..4].copy_from_slice(&n.to_be_bytes());
            b[5..8].copy_from_slice(&self.block_size.to_be_bytes()[1..]);
            block_desc = b;
        }
        let mut d = Vec::new();
        if ten {
            let len = 6 + block_desc.len() + pages.len();
            d.extend_from_slice(&(len as u16).to_be_bytes());
            d.extend_from_slice(&[0, wp, 0, 0]);
            d.extend_from_slice(&(block_desc.len() as u16).to_be_bytes());
        } else {
            let len = 3 + block_desc.len() + pages.len();
            d.extend_from_slice(&[len.min(255) as u8, 0, wp, block_desc.len() as u8]);
        }
        d.extend(block_desc);
        d.extend(pages);
        Response::data(&d, alloc)
    }

    /// START STOP UNIT: a volume always spins; only an eject (LOEJ without START) is
    /// refused while some nexus prevents removal.
    pub(super) fn start_stop(&self, cdb: &[u8; 16]) -> Response {
        let loej = cdb[4] & 0x02 != 0;
        let start = cdb[4] & 0x01 != 0;
        if loej && !start && !self.prevent.lock().unwrap().is_empty() {
            return Response::check(Sense::REMOVAL_PREVENTED);
        }
        Response::good()
    }

    /// PREVENT ALLOW MEDIUM REMOVAL, held per nexus.
    pub(super) fn prevent_allow(&self, cdb: &[u8; 16], nexus: &Nexus) -> Response {
        let mut p = self.prevent.lock().unwrap();
        p.retain(|n| n != nexus);
        if cdb[4] & 0x03 != 0 {
            p.push(nexus.clone());
        }
        Response::good()
    }
}

/// Page `page` (or all of them), current values, or with `changeable` the mask of
/// what MODE SELECT may change: nothing.
fn mode_pages(page: u8, changeable: bool) -> Option<Vec<u8>> {
    let caching = || {
        let mut p = vec![0u8; 20];
        p[0] = CACHING;
        p[1] = 18;
        if !changeable {
            p[2] = 0x04; // WCE: write cache enabled (flush and FUA go through)
        }
        p
    };
    let control = || {
        let mut p = vec![0u8; 12];
        p[0] = CONTROL;
        p[1] = 10;
        if !changeable {
            p[2] = 0x00;
            p[3] = 0x10; // queue algorithm modifier 1: unrestricted reordering
        }
        p
    };
    match page {
        CACHING => Some(caching()),
        CONTROL => Some(control()),
        ALL_PAGES => {
            let mut v = caching();
            v.extend(control());
            Some(v)
        }
        _ => None,
    }
}

/// MODE SELECT(6) and (10): pages are accepted only as they already are (nothing is
/// changeable).
pub(super) fn mode_select() -> Response {
    Response::good()
}
