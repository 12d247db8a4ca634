//! What the LUN says of itself: INQUIRY with its VPD pages, READ CAPACITY (10 and 16),
//! GET LBA STATUS, READ DEFECT DATA, REPORT LUNS and REPORT SUPPORTED OPERATION CODES.

use super::cdb::be;
use super::io::{MAX_COMPARE_AND_WRITE, MAX_TRANSFER, MAX_UNMAP_DESCRIPTORS};
use super::opcode::{self, Descriptor, TABLE};
use super::{LunInfo, Response, Sense};

/// Vital product data pages (SPC-4, SBC-3), by page code.
mod vpd {
    /// Supported VPD pages.
    pub const SUPPORTED_PAGES: u8 = 0x00;
    /// Unit serial number.
    pub const UNIT_SERIAL_NUMBER: u8 = 0x80;
    /// Device identification.
    pub const DEVICE_IDENTIFICATION: u8 = 0x83;
    /// Block limits.
    pub const BLOCK_LIMITS: u8 = 0xb0;
    /// Block device characteristics.
    pub const BLOCK_DEVICE_CHARACTERISTICS: u8 = 0xb1;
    /// Logical block provisioning.
    pub const LOGICAL_BLOCK_PROVISIONING: u8 = 0xb2;
    /// Every page served, in the order the supported-pages page lists them.
    pub const SERVED: [u8; 6] = [
        SUPPORTED_PAGES,
        UNIT_SERIAL_NUMBER,
        DEVICE_IDENTIFICATION,
        BLOCK_LIMITS,
        BLOCK_DEVICE_CHARACTERISTICS,
        LOGICAL_BLOCK_PROVISIONING,
    ];
}

impl LunInfo {
    /// INQUIRY: the standard data, or with EVPD the vital product data page asked for.
    pub(super) fn inquiry(&self, cdb: &[u8; 16]) -> Response {
        let alloc = be(cdb, 3, 2) as usize;
        let evpd = cdb[1] & 0x01 != 0;
        if cdb[1] & 0xfe != 0 || (!evpd && cdb[2] != 0) {
            return Response::check(Sense::INVALID_FIELD_IN_CDB);
        }
        if !evpd {
            let mut d = vec![0u8; 66];
            d[0] = 0x00; // direct access block device, connected
            d[2] = 0x06; // SPC-4
            d[3] = 0x02; // response data format 2
            d[4] = (d.len() - 5) as u8;
            d[5] = 0x00;
            d[7] = 0x02; // CMDQUE
            d[8..16].copy_from_slice(b"HORN    ");
            d[16..32].copy_from_slice(b"VOLUME          ");
            d[32..36].copy_from_slice(b"0001");
            // Version descriptors: SAM-5, iSCSI, SPC-4, SBC-3.
            for (i, v) in [0x00a0u16, 0x0960, 0x0460, 0x04c0].iter().enumerate() {
                d[58 + 2 * i..60 + 2 * i].copy_from_slice(&v.to_be_bytes());
            }
            d[4] = (d.len() - 5) as u8;
            return Response::data(&d, alloc);
        }
        let page: Vec<u8> = match cdb[2] {
            vpd::SUPPORTED_PAGES => vpd::SERVED.to_vec(),
            vpd::UNIT_SERIAL_NUMBER => self.serial.as_bytes().to_vec(),
            vpd::DEVICE_IDENTIFICATION => {
                let mut p = Vec::new();
                // NAA designator, associated with the LU.
                p.extend_from_slice(&[0x01, 0x03, 0x00, 0x08]);
                p.extend_from_slice(&self.naa.to_be_bytes());
                // T10 vendor id designator.
                let t10 = format!("HORN    {}", self.serial);
                p.extend_from_slice(&[0x02, 0x01, 0x00, t10.len() as u8]);
                p.extend_from_slice(t10.as_bytes());
                p
            }
            vpd::BLOCK_LIMITS => {
                // SBC-3 §6.5.3; offsets below are within the page body.
                let mut p = vec![0u8; 60];
                let max_blocks = MAX_TRANSFER / self.block_size;
                p[1] = MAX_COMPARE_AND_WRITE;
                let granularity = (4096 / self.block_size).max(1);
                p[2..4].copy_from_slice(&(granularity as u16).to_be_bytes());
                p[4..8].copy_from_slice(&max_blocks.to_be_bytes());
                p[8..12].copy_from_slice(&max_blocks.to_be_bytes());
                p[12..16].copy_from_slice(&max_blocks.to_be_bytes());
                p[16..20].copy_from_slice(&max_blocks.to_be_bytes());
                p[20..24].copy_from_slice(&MAX_UNMAP_DESCRIPTORS.to_be_bytes());
                p[24..28].copy_from_slice(&granularity.to_be_bytes());
                p[32..40].copy_from_slice(&(max_blocks as u64).to_be_bytes());
                p
            }
            vpd::BLOCK_DEVICE_CHARACTERISTICS => {
                let mut p = vec![0u8; 60];
                p[1] = 0x01; // non-rotating medium
                p
            }
            // UNMAP, WRITE SAME 16 and 10 with UNMAP, unmapped blocks read as zeroes
            // (LBPRZ); thin provisioned.
            vpd::LOGICAL_BLOCK_PROVISIONING => vec![0, 0xe4, 0x02, 0],
            _ => return Response::check(Sense::INVALID_FIELD_IN_CDB),
        };
        let mut d = vec![0x00, cdb[2]];
        d.extend_from_slice(&(page.len() as u16).to_be_bytes());
        d.extend_from_slice(&page);
        Response::data(&d, alloc)
    }

    /// READ CAPACITY(10): the last LBA (capped at 32 bits; READ CAPACITY(16) tells
    /// the rest) and the block size.
    pub(super) fn read_capacity10(&self) -> Response {
        let last = self.blocks().saturating_sub(1).min(0xffff_ffff) as u32;
        let mut d = last.to_be_bytes().to_vec();
        d.extend_from_slice(&self.block_size.to_be_bytes());
        Response::data(&d, 8)
    }

    /// READ CAPACITY(16), with the physical block size and thin provisioning.
    pub(super) fn read_capacity16(&self, cdb: &[u8; 16]) -> Response {
        let alloc = be(cdb, 10, 4) as usize;
        let mut d = vec![0u8; 32];
        d[0..8].copy_from_slice(&(self.blocks() - 1).to_be_bytes());
        d[8..12].copy_from_slice(&self.block_size.to_be_bytes());
        // Logical blocks per physical block exponent (4 KiB physical).
        d[13] = (4096 / self.block_size).trailing_zeros() as u8;
        // LBPME (thin provisioned) and LBPRZ (unmapped blocks read as zeroes).
        d[14] = 0xc0;
        Response::data(&d, alloc)
    }

    /// GET LBA STATUS.
    pub(super) fn get_lba_status(&self, cdb: &[u8; 16]) -> Response {
        let lba = be(cdb, 2, 8);
        let alloc = be(cdb, 10, 4) as usize;
        if lba >= self.blocks() {
            return Response::check(Sense::LBA_OUT_OF_RANGE);
        }
        // One descriptor: from `lba` to the end, mapped (the engine does not yet
        // report allocation).
        let mut d = vec![0u8; 24];
        d[0..4].copy_from_slice(&20u32.to_be_bytes());
        d[8..16].copy_from_slice(&lba.to_be_bytes());
        let n = (self.blocks() - lba).min(u32::MAX as u64) as u32;
        d[16..20].copy_from_slice(&n.to_be_bytes());
        d[20] = 0; // mapped
        Response::data(&d, alloc)
    }
}

/// REPORT LUNS: Horn serves one LUN, 0.
pub(super) fn report_luns(cdb: &[u8; 16]) -> Response {
    let alloc = be(cdb, 6, 4) as usize;
    if alloc < 16 {
        return Response::check(Sense::INVALID_FIELD_IN_CDB);
    }
    let mut d = vec![0u8; 16];
    d[3] = 8; // one LUN: 0
    Response::data(&d, alloc)
}

/// READ DEFECT DATA(10) and (12): a volume has no defects; the list is empty, in
/// the format asked for.
pub(super) fn read_defect_data(cdb: &[u8; 16]) -> Response {
    if cdb[0] == opcode::READ_DEFECT_DATA_10 {
        let alloc = be(cdb, 7, 2) as usize;
        Response::data(&[0, cdb[2] & 0x1f, 0, 0], alloc)
    } else {
        let alloc = be(cdb, 6, 4) as usize;
        Response::data(&[0, cdb[1] & 0x1f, 0, 0, 0, 0, 0, 0], alloc)
    }
}

/// REPORT SUPPORTED OPERATION CODES: every command in the opcode table, or the one
/// asked for.
pub(super) fn report_opcodes(cdb: &[u8; 16]) -> Response {
    let options = cdb[2] & 0x07;
    let rctd = cdb[2] & 0x80 != 0;
    let req_op = cdb[3];
    let req_sa = be(cdb, 4, 2) as u16;
    let alloc = be(cdb, 6, 4) as usize;
    let timeouts = |d: &mut Vec<u8>| {
        if rctd {
            d.extend_from_slice(&[0, 10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        }
    };
    match options {
        0 => {
            let mut body = Vec::new();
            for d in TABLE {
                let mut e = vec![d.code, 0, 0, 0, 0, 0, 0, 0];
                if let Some(sa) = d.service_action {
                    e[2..4].copy_from_slice(&sa.to_be_bytes());
                    e[5] |= 0x01;
                }
                if rctd {
                    e[5] |= 0x02;
                }
                e[6..8].copy_from_slice(&(d.cdb_len as u16).to_be_bytes());
                timeouts(&mut e);
                body.extend(e);
            }
            let mut d = (body.len() as u32).to_be_bytes().to_vec();
            d.extend(body);
            Response::data(&d, alloc)
        }
        1..=3 => {
            let found = TABLE.iter().find(|d| {
                d.code == req_op
                    && match (options, d.service_action) {
                        (1, None) => true,
                        (2, Some(s)) => s == req_sa,
                        (3, s) => s.is_none_or(|s| s == req_sa),
                        _ => false,
                    }
            });
            // Asked for without a service action, an opcode that has them is an error;
            // and the other way round.
            let has_actions = opcode::describe(req_op).is_some_and(|d| d.service_action.is_some());
            if (options == 1 && has_actions) || (options == 2 && !has_actions) {
                return Response::check(Sense::INVALID_FIELD_IN_CDB);
            }
            let mut d = vec![0u8, if found.is_some() { 3 } else { 1 }];
            if rctd {
                d[1] |= 0x80;
            }
            match found {
                Some(&Descriptor { cdb_len: len, .. }) => {
                    d.extend_from_slice(&(len as u16).to_be_bytes());
                    let mut usage = vec![0u8; len as usize];
                    usage[0] = req_op;
                    for b in usage.iter_mut().skip(1) {
                        *b = 0xff;
                    }
                    d.extend(usage);
                }
                None => d.extend_from_slice(&[0, 0]),
            }
            timeouts(&mut d);
            Response::data(&d, alloc)
        }
        _ => Response::check(Sense::INVALID_FIELD_IN_CDB),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_vpd_page_listed_is_served() {
        let lun = LunInfo::new("vol", 1 << 20, 512, false);
        for page in vpd::SERVED {
            let r = lun.inquiry(&[
                opcode::INQUIRY,
                0x01,
                page,
                0x10,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
            ]);
            let (data, len) = r.data.expect("a served page has data");
            assert_eq!(data.as_slice()[..len][1], page, "page {page:#04x}");
        }
    }
}
