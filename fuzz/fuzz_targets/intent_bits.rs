//! The write-intent record, `intent.bits` (`horn_replica::intent`).
//!
//! Feeds: byte 0 is a mode, bytes 1-2 pick the volume's size in 4 MiB regions (1 to
//! 512; with mode bit 2, within 512 of the 32,704 one page of bits holds, on either
//! side), the rest is the file. Mode bit 0: the
//! header's CRC and every whole page's CRC and number are set right (else the CRCs
//! would stop nearly every input before the bits). Mode bit 1 (small volumes only): a
//! file that parses is also opened as a replica's record (`IntentLog::open`), marked
//! (the region the mode's bits 3-7 pick), reopened, cleared and reopened.
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
    // Byte i holds regions 8i to 8i + 7: keep the bits of those below `regions`.
    for (i, b) in bits.iter_mut().enumerate() {
        let valid = regions.saturating_sub(8 * i as u64);
        if valid < 8 {
            *b &= ((1u16 << valid) - 1) as u8;
        }
    }
    Some(bits)
}

fn marked(bits: &[u8], regions: u64) -> Vec<u64> {
    let mut out = Vec::new();
    for (i, &b) in bits.iter().enumerate().filter(|(_, &b)| b != 0) {
        for k in 0..8 {
            let r = i as u64 * 8 + k;
            if r < regions && b & (1 << k) != 0 {
                out.push(r);
            }
        }
    }
    out
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
    if let Err(at) = with.binary_search(&region) {
        with.insert(at, region);
    }
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
    // A volume of 1 to 512 regions, or with mode bit 2, from one page of bits less
    // 512 regions to one page more: the code walks the regions one at a time at every
    // open and listing, which libFuzzer's comparison tracing makes slow, so larger
    // volumes cost executions and reach nothing new.
    let n = input.u16() as u64 % 1024;
    let regions = if mode & 4 != 0 {
        BITS_PER_PAGE - 512 + n
    } else {
        n % 512 + 1
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
    // Through a file only for the small volumes: opening and listing a page's worth of
    // regions, all marked where a page is torn, is most of an execution's time.
    if mode & 2 != 0 && mode & 4 == 0 {
        let want = marked(&bits, regions);
        through_a_file(&bytes, regions, &want, u64::from(mode >> 3));
    }
});
