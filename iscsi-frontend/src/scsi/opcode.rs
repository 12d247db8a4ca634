//! The commands the target serves, by name, and the one [`TABLE`] that says what each
//! is: its CDB length (REPORT SUPPORTED OPERATION CODES), where its CDB names blocks,
//! whether it writes the medium and how (reservations, the block ranges held while it
//! runs), the data-out it carries (the transport's R2Ts), and what it runs past
//! (unit attentions, reservations). [`Lun::execute`](super::Lun::execute) dispatches
//! on these names; a new command is a row here and an arm there. `cdb.rs` reads a
//! CDB's fields through the table.

/// TEST UNIT READY.
pub const TEST_UNIT_READY: u8 = 0x00;
/// REQUEST SENSE.
pub const REQUEST_SENSE: u8 = 0x03;
/// READ(6).
pub const READ_6: u8 = 0x08;
/// WRITE(6).
pub const WRITE_6: u8 = 0x0a;
/// INQUIRY.
pub const INQUIRY: u8 = 0x12;
/// MODE SELECT(6).
pub const MODE_SELECT_6: u8 = 0x15;
/// RESERVE(6).
pub const RESERVE_6: u8 = 0x16;
/// RELEASE(6).
pub const RELEASE_6: u8 = 0x17;
/// MODE SENSE(6).
pub const MODE_SENSE_6: u8 = 0x1a;
/// START STOP UNIT.
pub const START_STOP_UNIT: u8 = 0x1b;
/// PREVENT ALLOW MEDIUM REMOVAL.
pub const PREVENT_ALLOW_MEDIUM_REMOVAL: u8 = 0x1e;
/// READ CAPACITY(10).
pub const READ_CAPACITY_10: u8 = 0x25;
/// READ(10).
pub const READ_10: u8 = 0x28;
/// WRITE(10).
pub const WRITE_10: u8 = 0x2a;
/// WRITE AND VERIFY(10).
pub const WRITE_AND_VERIFY_10: u8 = 0x2e;
/// VERIFY(10).
pub const VERIFY_10: u8 = 0x2f;
/// PRE-FETCH(10).
pub const PRE_FETCH_10: u8 = 0x34;
/// SYNCHRONIZE CACHE(10).
pub const SYNCHRONIZE_CACHE_10: u8 = 0x35;
/// READ DEFECT DATA(10).
pub const READ_DEFECT_DATA_10: u8 = 0x37;
/// WRITE SAME(10).
pub const WRITE_SAME_10: u8 = 0x41;
/// UNMAP.
pub const UNMAP: u8 = 0x42;
/// MODE SELECT(10).
pub const MODE_SELECT_10: u8 = 0x55;
/// MODE SENSE(10).
pub const MODE_SENSE_10: u8 = 0x5a;
/// PERSISTENT RESERVE IN (service actions in [`service_action`]).
pub const PERSISTENT_RESERVE_IN: u8 = 0x5e;
/// PERSISTENT RESERVE OUT (service actions in [`service_action`]).
pub const PERSISTENT_RESERVE_OUT: u8 = 0x5f;
/// READ(16).
pub const READ_16: u8 = 0x88;
/// COMPARE AND WRITE.
pub const COMPARE_AND_WRITE: u8 = 0x89;
/// WRITE(16).
pub const WRITE_16: u8 = 0x8a;
/// ORWRITE(16).
pub const ORWRITE_16: u8 = 0x8b;
/// WRITE AND VERIFY(16).
pub const WRITE_AND_VERIFY_16: u8 = 0x8e;
/// VERIFY(16).
pub const VERIFY_16: u8 = 0x8f;
/// PRE-FETCH(16).
pub const PRE_FETCH_16: u8 = 0x90;
/// SYNCHRONIZE CACHE(16).
pub const SYNCHRONIZE_CACHE_16: u8 = 0x91;
/// WRITE SAME(16).
pub const WRITE_SAME_16: u8 = 0x93;
/// SERVICE ACTION IN(16): READ CAPACITY(16), GET LBA STATUS.
pub const SERVICE_ACTION_IN_16: u8 = 0x9e;
/// REPORT LUNS.
pub const REPORT_LUNS: u8 = 0xa0;
/// MAINTENANCE IN: REPORT SUPPORTED OPERATION CODES.
pub const MAINTENANCE_IN: u8 = 0xa3;
/// READ(12).
pub const READ_12: u8 = 0xa8;
/// WRITE(12).
pub const WRITE_12: u8 = 0xaa;
/// WRITE AND VERIFY(12).
pub const WRITE_AND_VERIFY_12: u8 = 0xae;
/// VERIFY(12).
pub const VERIFY_12: u8 = 0xaf;
/// READ DEFECT DATA(12).
pub const READ_DEFECT_DATA_12: u8 = 0xb7;

/// Service actions: which command an opcode that has them means (CDB byte 1, low five
/// bits).
pub mod service_action {
    /// SERVICE ACTION IN(16): READ CAPACITY(16).
    pub const READ_CAPACITY_16: u16 = 0x10;
    /// SERVICE ACTION IN(16): GET LBA STATUS.
    pub const GET_LBA_STATUS: u16 = 0x12;
    /// MAINTENANCE IN: REPORT SUPPORTED OPERATION CODES.
    pub const REPORT_SUPPORTED_OPERATION_CODES: u16 = 0x0c;
    /// PERSISTENT RESERVE IN: READ KEYS.
    pub const READ_KEYS: u16 = 0;
    /// PERSISTENT RESERVE IN: READ RESERVATION.
    pub const READ_RESERVATION: u16 = 1;
    /// PERSISTENT RESERVE IN: REPORT CAPABILITIES.
    pub const REPORT_CAPABILITIES: u16 = 2;
    /// PERSISTENT RESERVE IN: READ FULL STATUS.
    pub const READ_FULL_STATUS: u16 = 3;
    /// PERSISTENT RESERVE OUT: REGISTER.
    pub const REGISTER: u16 = 0;
    /// PERSISTENT RESERVE OUT: RESERVE.
    pub const RESERVE: u16 = 1;
    /// PERSISTENT RESERVE OUT: RELEASE.
    pub const RELEASE: u16 = 2;
    /// PERSISTENT RESERVE OUT: CLEAR.
    pub const CLEAR: u16 = 3;
    /// PERSISTENT RESERVE OUT: PREEMPT.
    pub const PREEMPT: u16 = 4;
    /// PERSISTENT RESERVE OUT: PREEMPT AND ABORT.
    pub const PREEMPT_AND_ABORT: u16 = 5;
    /// PERSISTENT RESERVE OUT: REGISTER AND IGNORE EXISTING KEY.
    pub const REGISTER_AND_IGNORE_EXISTING_KEY: u16 = 6;
}

use service_action as sa;

/// Where a CDB names the blocks its command works on (SBC-3's CDB formats).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockFields {
    /// It names no blocks.
    None,
    /// 6-byte CDB: a 21-bit LBA at byte 1, a count at byte 4 in which 0 means 256.
    Cdb6,
    /// 10-byte CDB: a 32-bit LBA at byte 2, a 16-bit count at byte 7.
    Cdb10,
    /// 12-byte CDB: a 32-bit LBA at byte 2, a 32-bit count at byte 6.
    Cdb12,
    /// 16-byte CDB: a 64-bit LBA at byte 2, a 32-bit count at byte 10.
    Cdb16,
    /// COMPARE AND WRITE: a 64-bit LBA at byte 2, an 8-bit count at byte 13.
    CompareAndWrite,
}

/// What a command does to the medium.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Medium {
    /// Reads it, or leaves it alone.
    Reads,
    /// Changes no block, yet counts as a write for reservations (SYNCHRONIZE CACHE).
    Flushes,
    /// Writes the blocks its CDB names.
    WritesBlocks,
    /// Writes the blocks its CDB names, where a count of zero means to the end of the
    /// LUN (WRITE SAME).
    WritesToEnd,
    /// Writes blocks listed in its data-out, which the CDB does not name (UNMAP).
    WritesListed,
}

impl Medium {
    /// Whether reservations treat it as a write.
    pub fn writes(self) -> bool {
        self != Medium::Reads
    }
}

/// The data-out a command carries, as its CDB tells.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataOut {
    /// None.
    None,
    /// The blocks the CDB names.
    Blocks,
    /// The blocks the CDB names when its BYTCHK field asks for them to be compared
    /// (VERIFY), else none.
    BlocksToCompare,
    /// Twice the blocks the CDB names: what to compare, then what to write.
    BlocksTwice,
    /// One logical block (WRITE SAME).
    OneBlock,
    /// A parameter list whose length is the `width`-byte field at byte `at`.
    ParamList {
        /// The length field's offset in the CDB.
        at: usize,
        /// Its width in bytes.
        width: usize,
    },
}

/// What a command runs past that stops others.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunsPast {
    /// A pending unit attention: it runs, and leaves the attention for a later command
    /// (SAM-5: INQUIRY, REPORT LUNS and REQUEST SENSE; and PERSISTENT RESERVE IN, as
    /// the reservation it reads outlives resets).
    pub unit_attention: bool,
    /// Another nexus's RESERVE(6) reservation (SPC-2).
    pub reserve6: bool,
    /// Another nexus's persistent reservation, of any type (SPC-4).
    pub persistent: bool,
}

impl RunsPast {
    /// Nothing: the rule for any command not named otherwise.
    pub const NOTHING: RunsPast = RunsPast {
        unit_attention: false,
        reserve6: false,
        persistent: false,
    };
    /// Unit attentions and reservations: what finds the LUN and says why it is busy.
    pub const EVERYTHING: RunsPast = RunsPast {
        unit_attention: true,
        reserve6: true,
        persistent: true,
    };
    /// Both kinds of reservation, not unit attentions.
    pub const RESERVATIONS: RunsPast = RunsPast {
        unit_attention: false,
        ..RunsPast::EVERYTHING
    };
    /// Another nexus's RESERVE(6) only.
    pub const RESERVE6: RunsPast = RunsPast {
        reserve6: true,
        ..RunsPast::NOTHING
    };
    /// A persistent reservation only.
    pub const PERSISTENT: RunsPast = RunsPast {
        persistent: true,
        ..RunsPast::NOTHING
    };
}

/// One command the target serves: an opcode, with its service action when the opcode
/// has them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Descriptor {
    /// The operation code (CDB byte 0).
    pub code: u8,
    /// The service action, for opcodes that have them.
    pub service_action: Option<u16>,
    /// The CDB length. REPORT SUPPORTED OPERATION CODES reports it, with a usage mask
    /// of every bit set but in the opcode's byte.
    pub cdb_len: u8,
    /// Where the CDB names blocks.
    pub blocks: BlockFields,
    /// What it does to the medium.
    pub medium: Medium,
    /// The data-out it carries.
    pub data_out: DataOut,
    /// What it runs past.
    pub runs_past: RunsPast,
}

/// A command that reads, carries no data-out and runs past nothing; the builders below
/// say how a row differs.
const fn op(code: u8, cdb_len: u8) -> Descriptor {
    Descriptor {
        code,
        service_action: None,
        cdb_len,
        blocks: BlockFields::None,
        medium: Medium::Reads,
        data_out: DataOut::None,
        runs_past: RunsPast::NOTHING,
    }
}

impl Descriptor {
    const fn action(mut self, service_action: u16) -> Descriptor {
        self.service_action = Some(service_action);
        self
    }
    const fn blocks(mut self, blocks: BlockFields) -> Descriptor {
        self.blocks = blocks;
        self
    }
    const fn medium(mut self, medium: Medium) -> Descriptor {
        self.medium = medium;
        self
    }
    const fn data_out(mut self, data_out: DataOut) -> Descriptor {
        self.data_out = data_out;
        self
    }
    const fn runs_past(mut self, runs_past: RunsPast) -> Descriptor {
        self.runs_past = runs_past;
        self
    }
}

/// A PERSISTENT RESERVE IN service action.
const fn pr_in(action: u16) -> Descriptor {
    op(PERSISTENT_RESERVE_IN, 10)
        .action(action)
        .runs_past(RunsPast::EVERYTHING)
}

/// A PERSISTENT RESERVE OUT service action: its parameter list (whose length is at
/// byte 5) holds the keys.
const fn pr_out(action: u16) -> Descriptor {
    op(PERSISTENT_RESERVE_OUT, 10)
        .action(action)
        .data_out(DataOut::ParamList { at: 5, width: 4 })
        .runs_past(RunsPast::RESERVATIONS)
}

/// A read of the blocks `blocks` names.
const fn read(code: u8, cdb_len: u8, blocks: BlockFields) -> Descriptor {
    op(code, cdb_len).blocks(blocks)
}

/// A write of the blocks `blocks` names, with them as data-out.
const fn write(code: u8, cdb_len: u8, blocks: BlockFields) -> Descriptor {
    op(code, cdb_len)
        .blocks(blocks)
        .medium(Medium::WritesBlocks)
        .data_out(DataOut::Blocks)
}

use BlockFields::{Cdb10, Cdb12, Cdb16, Cdb6};

/// Every command served, in the order REPORT SUPPORTED OPERATION CODES lists them.
pub const TABLE: &[Descriptor] = &[
    op(TEST_UNIT_READY, 6),
    op(REQUEST_SENSE, 6).runs_past(RunsPast::EVERYTHING),
    read(READ_6, 6, Cdb6),
    write(WRITE_6, 6, Cdb6),
    op(INQUIRY, 6).runs_past(RunsPast::EVERYTHING),
    op(MODE_SELECT_6, 6).data_out(DataOut::ParamList { at: 4, width: 1 }),
    op(RESERVE_6, 6),
    op(RELEASE_6, 6).runs_past(RunsPast::RESERVE6),
    op(MODE_SENSE_6, 6),
    op(START_STOP_UNIT, 6),
    op(PREVENT_ALLOW_MEDIUM_REMOVAL, 6),
    op(READ_CAPACITY_10, 10).runs_past(RunsPast::PERSISTENT),
    read(READ_10, 10, Cdb10),
    write(WRITE_10, 10, Cdb10),
    write(WRITE_AND_VERIFY_10, 10, Cdb10),
    read(VERIFY_10, 10, Cdb10).data_out(DataOut::BlocksToCompare),
    read(PRE_FETCH_10, 10, Cdb10),
    op(READ_DEFECT_DATA_10, 10),
    op(SYNCHRONIZE_CACHE_10, 10).blocks(Cdb10).medium(Medium::Flushes),
    write(WRITE_SAME_10, 10, Cdb10)
        .medium(Medium::WritesToEnd)
        .data_out(DataOut::OneBlock),
    op(UNMAP, 10)
        .medium(Medium::WritesListed)
        .data_out(DataOut::ParamList { at: 7, width: 2 }),
    op(MODE_SELECT_10, 10).data_out(DataOut::ParamList { at: 7, width: 2 }),
    op(MODE_SENSE_10, 10),
    pr_in(sa::READ_KEYS),
    pr_in(sa::READ_RESERVATION),
    pr_in(sa::REPORT_CAPABILITIES),
    pr_in(sa::READ_FULL_STATUS),
    pr_out(sa::REGISTER),
    pr_out(sa::RESERVE),
    pr_out(sa::RELEASE),
    pr_out(sa::CLEAR),
    pr_out(sa::PREEMPT),
    pr_out(sa::PREEMPT_AND_ABORT),
    pr_out(sa::REGISTER_AND_IGNORE_EXISTING_KEY),
    read(READ_16, 16, Cdb16),
    write(COMPARE_AND_WRITE, 16, BlockFields::CompareAndWrite).data_out(DataOut::BlocksTwice),
    write(WRITE_16, 16, Cdb16),
    write(ORWRITE_16, 16, Cdb16),
    write(WRITE_AND_VERIFY_16, 16, Cdb16),
    read(VERIFY_16, 16, Cdb16).data_out(DataOut::BlocksToCompare),
    read(PRE_FETCH_16, 16, Cdb16),
    op(SYNCHRONIZE_CACHE_16, 16).blocks(Cdb16).medium(Medium::Flushes),
    write(WRITE_SAME_16, 16, Cdb16)
        .medium(Medium::WritesToEnd)
        .data_out(DataOut::OneBlock),
    op(SERVICE_ACTION_IN_16, 16)
        .action(sa::READ_CAPACITY_16)
        .runs_past(RunsPast::PERSISTENT),
    op(SERVICE_ACTION_IN_16, 16)
        .action(sa::GET_LBA_STATUS)
        .runs_past(RunsPast::PERSISTENT),
    op(REPORT_LUNS, 12).runs_past(RunsPast::EVERYTHING),
    op(MAINTENANCE_IN, 12).action(sa::REPORT_SUPPORTED_OPERATION_CODES),
    read(READ_12, 12, Cdb12),
    write(WRITE_12, 12, Cdb12),
    write(WRITE_AND_VERIFY_12, 12, Cdb12),
    read(VERIFY_12, 12, Cdb12).data_out(DataOut::BlocksToCompare),
    op(READ_DEFECT_DATA_12, 12),
];

/// For each opcode, the index in [`TABLE`] of its first row, or `NOT_SERVED`: the
/// lookup every command makes, in constant time.
const FIRST_ROW: [u8; 256] = {
    let mut rows = [NOT_SERVED; 256];
    let mut i = TABLE.len();
    while i > 0 {
        i -= 1;
        rows[TABLE[i].code as usize] = i as u8;
    }
    rows
};
const NOT_SERVED: u8 = u8::MAX;
const _: () = assert!(
    TABLE.len() < NOT_SERVED as usize,
    "FIRST_ROW indexes TABLE with a u8"
);

/// The row of opcode `code`, if the target serves it. Rows of one opcode differ only
/// in their service action (a unit test holds the table to that), so what this says
/// holds for the opcode whatever service action a CDB asks for.
pub fn describe(code: u8) -> Option<&'static Descriptor> {
    TABLE.get(FIRST_ROW[code as usize] as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The CDB length block fields need.
    fn cdb_len_of(blocks: BlockFields) -> Option<u8> {
        match blocks {
            BlockFields::None => None,
            BlockFields::Cdb6 => Some(6),
            BlockFields::Cdb10 => Some(10),
            BlockFields::Cdb12 => Some(12),
            BlockFields::Cdb16 | BlockFields::CompareAndWrite => Some(16),
        }
    }

    #[test]
    fn no_command_is_listed_twice() {
        for (i, a) in TABLE.iter().enumerate() {
            for b in &TABLE[..i] {
                assert!(
                    (a.code, a.service_action) != (b.code, b.service_action),
                    "{:#04x} {:?} is in the table twice",
                    a.code,
                    a.service_action
                );
            }
        }
    }

    #[test]
    fn rows_of_one_opcode_differ_only_in_service_action() {
        for a in TABLE {
            let first = describe(a.code).expect("every row's opcode is found");
            assert_eq!(
                Descriptor {
                    service_action: first.service_action,
                    ..*a
                },
                *first,
                "{:#04x}: what describe() says must hold for every service action",
                a.code
            );
            assert_eq!(a.service_action.is_some(), first.service_action.is_some());
        }
    }

    #[test]
    fn cdb_lengths_follow_the_opcode_group() {
        // SPC-4 §4.2.5.1: the group code (top three bits) fixes the CDB length.
        for d in TABLE {
            let by_group = match d.code >> 5 {
                0 => 6,
                1 | 2 => 10,
                4 => 16,
                5 => 12,
                _ => panic!("{:#04x}: a group without a fixed CDB length", d.code),
            };
            assert_eq!(d.cdb_len, by_group, "{:#04x}", d.code);
            if let Some(len) = cdb_len_of(d.blocks) {
                assert_eq!(
                    len, d.cdb_len,
                    "{:#04x}: block fields of another CDB length",
                    d.code
                );
            }
            if let DataOut::ParamList { at, width } = d.data_out {
                assert!(at + width <= d.cdb_len as usize, "{:#04x}", d.code);
            }
        }
    }

    #[test]
    fn what_names_its_blocks_in_the_cdb_has_block_fields() {
        for d in TABLE {
            let needs_blocks = matches!(d.medium, Medium::WritesBlocks | Medium::WritesToEnd)
                || matches!(
                    d.data_out,
                    DataOut::Blocks | DataOut::BlocksToCompare | DataOut::BlocksTwice
                );
            if needs_blocks {
                assert_ne!(d.blocks, BlockFields::None, "{:#04x}", d.code);
            }
        }
    }

    #[test]
    fn describe_finds_exactly_the_opcodes_in_the_table() {
        for code in 0..=255u8 {
            let listed = TABLE.iter().any(|d| d.code == code);
            assert_eq!(describe(code).is_some(), listed, "{code:#04x}");
            if let Some(d) = describe(code) {
                assert_eq!(d.code, code);
            }
        }
    }
}
