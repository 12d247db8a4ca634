//! Zero-extent logs, `layer-NNNNNNNN.zeros` (`horn_replica::zeros`).
//!
//! Feeds: byte 0 is a mode, bytes 1-2 the layer's size in 4 KiB blocks (LE; 0 is
//! taken as 65,536), the rest is the file. Mode bit 0: every whole record gets its
//! right CRC (else the CRC would stop nearly every record before the range checks).
//! Mode bit 1: a log that parses is also written to a file, opened for appending with
//! `ZeroLog::open` (which compacts a torn or long log), appended to and read again.
//!
//! Checks:
//! - what parses is a list of extents in 4 KiB blocks, sorted, apart (merged), each
//!   non-empty and inside the layer; there are no more records than whole 24-byte
//!   slots;
//! - the extents are the union of the whole records' ranges, which the harness reads
//!   from the format itself (docs/replica-format.md); a bad record before the last
//!   is refused, a torn last one ignored;
//! - encoded again as records (from the format, here), they parse the same;
//! - opened as a file, the log has the same extents, and is left whole (a torn tail
//!   dropped) so that an appended extent reads back with them.

#![no_main]

use horn_fuzz::zero_log::{fix_records, HEADER, RECORD};
use horn_fuzz::Cursor;
use horn_replica::extent::Extent;
use horn_replica::zeros::{self, ZeroLog};
use libfuzzer_sys::fuzz_target;

const BLOCK: u64 = 4096;

/// The union of the whole records' ranges, as blocks, read from the format directly;
/// `None` where the format calls the log corrupt.
fn records_by_spec(bytes: &[u8], limit: u64) -> Option<Vec<(u64, u64)>> {
    if bytes.is_empty() {
        return Some(Vec::new());
    }
    if bytes.len() < HEADER || &bytes[..8] != b"HORNZERO" || bytes[8..12] != 1u32.to_le_bytes() {
        return None;
    }
    let body = &bytes[HEADER..];
    let whole = body.len() / RECORD;
    let mut blocks = Vec::new();
    for i in 0..whole {
        let r = &body[i * RECORD..(i + 1) * RECORD];
        let crc = u32::from_le_bytes(r[16..20].try_into().unwrap());
        if crc != crc32c::crc32c(&r[..16]) {
            if i + 1 == whole {
                break; // a torn last record
            }
            return None;
        }
        let first = u64::from_le_bytes(r[..8].try_into().unwrap());
        let count = u64::from_le_bytes(r[8..16].try_into().unwrap());
        let end = first.checked_add(count)?;
        if count == 0 || end.checked_mul(BLOCK).is_none_or(|e| e > limit) {
            return None;
        }
        blocks.push((first, end));
    }
    blocks.sort_unstable();
    let mut merged: Vec<(u64, u64)> = Vec::new();
    for (a, b) in blocks {
        match merged.last_mut() {
            Some(last) if a <= last.1 => last.1 = last.1.max(b),
            _ => merged.push((a, b)),
        }
    }
    Some(merged)
}

fn as_blocks(extents: &[Extent]) -> Vec<(u64, u64)> {
    extents
        .iter()
        .map(|e| (e.offset / BLOCK, (e.offset + e.len) / BLOCK))
        .collect()
}

fn check_extents(extents: &[Extent], limit: u64) {
    let mut end = None;
    for e in extents {
        assert!(e.len > 0 && e.offset % BLOCK == 0 && e.len % BLOCK == 0, "{e:?}");
        assert!(e.offset + e.len <= limit, "{e:?} past {limit}");
        if let Some(prev) = end {
            assert!(e.offset > prev, "{e:?} overlaps or touches the one before");
        }
        end = Some(e.offset + e.len);
    }
}

fn through_a_file(bytes: &[u8], limit: u64, extents: &[Extent]) {
    let dir = horn_fuzz::fresh_dir("zero_log");
    let path = dir.join("layer-00000002.zeros");
    std::fs::write(&path, bytes).unwrap();
    let (mut log, opened) = ZeroLog::open(path.clone(), limit).expect("a log that parses opens");
    assert_eq!(opened, extents, "opened, the log has other extents");
    let (reloaded, _) = zeros::parse(&std::fs::read(&path).unwrap(), &path, limit).expect("still parses");
    assert_eq!(reloaded, extents, "opening changed the log's extents");
    let added = Extent {
        offset: limit - BLOCK,
        len: BLOCK,
    };
    log.append(&[added]).expect("append");
    let (after, _) =
        zeros::parse(&std::fs::read(&path).unwrap(), &path, limit).expect("parses after an append");
    let mut want = as_blocks(extents);
    want.push((added.offset / BLOCK, limit / BLOCK));
    let mut merged: Vec<(u64, u64)> = Vec::new();
    want.sort_unstable();
    for (a, b) in want {
        match merged.last_mut() {
            Some(last) if a <= last.1 => last.1 = last.1.max(b),
            _ => merged.push((a, b)),
        }
    }
    assert_eq!(
        as_blocks(&after),
        merged,
        "an appended extent is not read back with the rest"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

fuzz_target!(|data: &[u8]| {
    let mut input = Cursor::new(data);
    let mode = input.u8();
    let blocks = match input.u16() {
        0 => 65_536,
        n => n as u64,
    };
    let limit = blocks * BLOCK;
    let mut bytes = input.rest().to_vec();
    if mode & 1 != 0 {
        fix_records(&mut bytes);
    }
    let parsed = zeros::parse(&bytes, "layer.zeros".as_ref(), limit);
    let by_spec = records_by_spec(&bytes, limit);
    let Ok((extents, records)) = parsed else {
        assert_eq!(by_spec, None, "refused a log the format accepts");
        return;
    };
    assert_eq!(
        Some(as_blocks(&extents)),
        by_spec,
        "the extents differ from the records'"
    );
    check_extents(&extents, limit);
    let slots = bytes.len().saturating_sub(HEADER) / RECORD;
    assert!(records as usize <= slots, "{records} records in {slots} slots");
    let dir = std::path::Path::new("/nonexistent");
    let mut rewritten = b"HORNZERO\x01\0\0\0\0\0\0\0".to_vec();
    for e in &extents {
        let mut r = [0u8; RECORD];
        r[..8].copy_from_slice(&(e.offset / BLOCK).to_le_bytes());
        r[8..16].copy_from_slice(&(e.len / BLOCK).to_le_bytes());
        let crc = crc32c::crc32c(&r[..16]);
        r[16..20].copy_from_slice(&crc.to_le_bytes());
        rewritten.extend_from_slice(&r);
    }
    let (again, n) = zeros::parse(&rewritten, dir, limit).expect("rewritten extents parse");
    assert_eq!((again, n), (extents.clone(), extents.len() as u64));
    if mode & 2 != 0 {
        through_a_file(&bytes, limit, &extents);
    }
});
