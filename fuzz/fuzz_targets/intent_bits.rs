//! The write-intent record, `intent.bits` (`horn_replica::intent`).
//!
//! Feeds: byte 0 is a mode, bytes 1-2 the volume's size in 4 MiB regions (LE; 0 is
//! taken as 65,536, past one page of bits), the rest is the file. Mode bit 0: the
//! header's CRC and every whole page's CRC and number are set right (else the CRCs
//! would stop nearly every input before the bits). Mode bit 1: a file that parses is
//! also opened as a replica's record (`IntentLog::open`), marked, reopened, cleared
//! and reopened.
//!
//! Checks:
//! - a file is refused exactly when its header breaks the format (docs/replica-format.md:
//!   magic, header CRC, version, region size), as the harness reads it;
//! - otherwise the bits are, page by page, the page's bits when its CRC and number
//!   are right and all ones when it is missing or torn (never fewer marks than the
//!   file holds), with nothing set past the last region;
//! - opened, the record marks exactly those regions; a region marked reads back
//!   marked after a reopen, with the others; after a clear, none does.

#![no_main]

use horn_fuzz::intent_file::{fix_pages, BITS_PER_PAGE, PAGE};
use horn_fuzz::Cursor;
use horn_replica::intent::{self, IntentLog, REGION_SIZE};
use libfuzzer_sys::fuzz_target;

/// The bits the format gives `bytes` for `regions` regions; `None` for a bad header.
fn bits_by_spec(bytes: &[u8], regions: u64) -> Option<Vec<u8>> {
    let u32_at = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap());
    if bytes.len() < 20 || &bytes[..8] != b"HORNINTN" || u32_at(16) != crc32c::crc32c(&bytes[..16]) {
        return None;
    }
    if u32_at(8) != 1 || u32_at(12) != 22 {
        return None;
    }
    let pages = regions.div_ceil(BITS_PER_PAGE).max(1) as usize;
    let mut bits = Vec::new();
    for page in 1..=pages {
        match bytes.get(page * PAGE..(page + 1) * PAGE) {
            Some(p)
                if u32::from_le_bytes(p[..4].try_into().unwrap()) == crc32c::crc32c(&p[4..])
                    && u32::from_le_bytes(p[4..8].try_into().unwrap()) as usize == page =>
            {
                bits.extend_from_slice(&p[8..])
            }
            _ => bits.extend(std::iter::repeat_n(0xff, PAGE - 8)),
        }
    }
    for r in regions..pages as u64 * BITS_PER_PAGE {
        bits[(r / 8) as usize] &= !(1 << (r % 8));
    }
    Some(bits)
}

fn marked(bits: &[u8], regions: u64) -> Vec<u64> {
    (0..regions)
        .filter(|r| bits[(r / 8) as usize] & (1 << (r % 8)) != 0)
        .collect()
}

fn through_a_file(bytes: &[u8], regions: u64, want: &[u64], pick: u64) {
    let dir = horn_fuzz::fresh_dir("intent_bits");
    std::fs::write(dir.join(intent::INTENT_FILE), bytes).unwrap();
    let size = regions * REGION_SIZE;
    let mut log = IntentLog::open(&dir, size).expect("a record that parses opens");
    assert_eq!(log.marked_regions(), want, "opened, other regions are marked");
    assert_eq!(log.marked(), want.len() as u64);
    let region = pick % regions;
    log.mark(region * REGION_SIZE + 512, 1024).unwrap();
    drop(log);
    let mut log = IntentLog::open(&dir, size).expect("a record just written opens");
    let mut with = want.to_vec();
    with.push(region);
    with.sort_unstable();
    with.dedup();
    assert_eq!(log.marked_regions(), with, "a marked region did not read back");
    log.clear().unwrap();
    drop(log);
    let log = IntentLog::open(&dir, size).expect("a cleared record opens");
    assert_eq!(log.marked(), 0, "marks left after a clear");
    let _ = std::fs::remove_dir_all(&dir);
}

fuzz_target!(|data: &[u8]| {
    let mut input = Cursor::new(data);
    let mode = input.u8();
    let regions = match input.u16() {
        0 => 65_536,
        n => n as u64,
    };
    let mut bytes = input.rest().to_vec();
    if mode & 1 != 0 {
        fix_pages(&mut bytes);
    }
    let parsed = intent::parse(&bytes, "intent.bits".as_ref(), regions).ok();
    let by_spec = bits_by_spec(&bytes, regions);
    assert_eq!(
        parsed.is_some(),
        by_spec.is_some(),
        "the header verdict differs from the format's"
    );
    let (Some(bits), Some(want)) = (parsed, by_spec) else {
        return;
    };
    assert_eq!(bits, want, "the bits differ from the format's");
    if mode & 2 != 0 {
        let want = marked(&bits, regions);
        through_a_file(&bytes, regions, &want, u64::from(mode >> 2));
    }
});
