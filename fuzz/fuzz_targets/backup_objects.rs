//! What a backup target hands back (`horn_backup::format`): block objects
//! (`decode_block`) and manifests (`Manifest::from_bytes`). A target is storage Horn
//! does not control: a share anyone with access may write to, a bucket another tool
//! filled.
//!
//! Feeds: the first byte is a mode. Even: the rest is a block object, checked
//! against the name of its own decoded content when that decodes (else a fixed
//! name), with a block size from the second byte (2^(10+b%17) bytes). Odd: the rest
//! is a manifest.
//!
//! Checks:
//! - a block that decodes is no longer than the block size and has the name it was
//!   checked against; encoded again in every codec, it decodes to the same bytes;
//! - a manifest that parses has valid names, a valid block size and one entry per
//!   block; written back, it parses to the same manifest.

#![no_main]

use horn_backup::format::{check_block_size, check_name, decode_block, encode_block, BlockId, Compression, Manifest};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode % 2 == 0 {
        let Some((&b, obj)) = rest.split_first() else {
            return;
        };
        let max = 1u32 << (10 + u32::from(b) % 17);
        // The name a well-formed object would carry: its decoded content's. Try the
        // object's own body as plain content too, so that the check is reached.
        let body = obj.get(12..).unwrap_or_default();
        for id in [BlockId::of(body), BlockId::of(b"")] {
            if let Ok(block) = decode_block(obj, &id, max) {
                assert!(block.len() as u32 <= max, "a block longer than the block size");
                assert_eq!(BlockId::of(&block), id, "a block that is not its name's");
                for c in [Compression::None, Compression::Lz4, Compression::Zstd] {
                    let again = encode_block(&block, c);
                    assert_eq!(decode_block(&again, &id, max).as_deref(), Ok(block.as_slice()));
                }
            }
        }
    } else if let Ok(m) = Manifest::from_bytes("fuzz", rest) {
        assert!(check_name("volume", &m.volume).is_ok() && check_name("backup", &m.name).is_ok());
        assert!(check_block_size(m.block_size).is_ok());
        assert_eq!(m.blocks.len() as u64, Manifest::block_count(m.size, m.block_size));
        let again = Manifest::from_bytes("fuzz", &m.to_bytes()).expect("a written manifest parses");
        assert_eq!(again, m);
    }
});
