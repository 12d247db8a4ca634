//! What a CDB says, read through the opcode table: the service action it asks for,
//! the blocks it names and the data-out it carries (the transport asks for that much
//! with R2Ts before the command runs).

use super::opcode::{self, BlockFields, DataOut};

/// The service action a CDB asks for (byte 1, low five bits), for opcodes that have
/// them.
pub(super) fn service_action_of(cdb: &[u8; 16]) -> u16 {
    (cdb[1] & 0x1f) as u16
}

/// The big-endian number in `bytes[at..at + width]` (`width` up to 8).
pub(super) fn be(bytes: &[u8], at: usize, width: usize) -> u64 {
    debug_assert!(width <= 8, "a {width}-byte field does not fit a u64");
    bytes[at..at + width].iter().fold(0, |n, &b| (n << 8) | b as u64)
}

/// The blocks a command works on, as its CDB names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Extent {
    /// The first block.
    pub(super) lba: u64,
    /// How many blocks.
    pub(super) blocks: u64,
    /// CDB byte 1: RDPROTECT or WRPROTECT, DPO, FUA, BYTCHK and the like, by command;
    /// zero for 6-byte CDBs, which have none of them.
    pub(super) flags: u8,
}

/// The blocks `cdb` names, for a command whose row has [`BlockFields`].
pub(super) fn extent(cdb: &[u8; 16]) -> Option<Extent> {
    let (lba, blocks, flags) = match opcode::describe(cdb[0])?.blocks {
        BlockFields::None => return None,
        BlockFields::Cdb6 => {
            let blocks = if cdb[4] == 0 { 256 } else { cdb[4] as u64 };
            (be(cdb, 1, 3) & 0x1f_ffff, blocks, 0)
        }
        BlockFields::Cdb10 => (be(cdb, 2, 4), be(cdb, 7, 2), cdb[1]),
        BlockFields::Cdb12 => (be(cdb, 2, 4), be(cdb, 6, 4), cdb[1]),
        BlockFields::Cdb16 => (be(cdb, 2, 8), be(cdb, 10, 4), cdb[1]),
        BlockFields::CompareAndWrite => (be(cdb, 2, 8), cdb[13] as u64, cdb[1]),
    };
    Some(Extent { lba, blocks, flags })
}

/// The data-out length a command carries, from its CDB (None: none).
pub fn data_out_len(cdb: &[u8; 16], block_size: u32) -> Option<u64> {
    let bs = block_size as u64;
    match opcode::describe(cdb[0])?.data_out {
        DataOut::None => None,
        DataOut::Blocks => extent(cdb).map(|e| e.blocks * bs),
        DataOut::BlocksToCompare => extent(cdb).and_then(|e| (e.flags & 0x06 != 0).then_some(e.blocks * bs)),
        DataOut::BlocksTwice => extent(cdb).map(|e| 2 * e.blocks * bs),
        DataOut::OneBlock => Some(bs),
        DataOut::ParamList { at, width } => Some(be(cdb, at, width)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scsi::opcode::{COMPARE_AND_WRITE, INQUIRY, READ_6, WRITE_12};

    #[test]
    fn extents_are_read_from_each_cdb_layout() {
        let mut cdb = [0u8; 16];
        cdb[0] = READ_6;
        cdb[1..4].copy_from_slice(&[0xff, 0x12, 0x34]);
        assert_eq!(
            extent(&cdb).map(|e| (e.lba, e.blocks, e.flags)),
            Some((0x1f_1234, 256, 0))
        );
        cdb = [0u8; 16];
        cdb[0] = WRITE_12;
        cdb[1] = 0x08;
        cdb[2..6].copy_from_slice(&7u32.to_be_bytes());
        cdb[6..10].copy_from_slice(&70_000u32.to_be_bytes());
        assert_eq!(
            extent(&cdb).map(|e| (e.lba, e.blocks, e.flags)),
            Some((7, 70_000, 0x08))
        );
        cdb = [0u8; 16];
        cdb[0] = COMPARE_AND_WRITE;
        cdb[2..10].copy_from_slice(&(1u64 << 40).to_be_bytes());
        cdb[13] = 3;
        assert_eq!(extent(&cdb).map(|e| (e.lba, e.blocks)), Some((1 << 40, 3)));
        assert_eq!(data_out_len(&cdb, 512), Some(3 * 1024));
        cdb[0] = INQUIRY;
        assert_eq!(extent(&cdb), None);
    }
}
