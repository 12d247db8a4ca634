//! `volume.json` (`horn_replica::meta::VolumeMeta::parse`), and opening a replica
//! directory that holds it (`Replica::open`).
//!
//! Feeds: the first byte is a mode; the rest is the file. Mode bit 0: the rest is the
//! JSON line alone and gets the checksum line the format requires (else the CRC would
//! stop nearly every input before the JSON parser). Mode bit 1: a metadata that parses
//! is also laid out as a replica directory (the metadata and a sparse file of each
//! layer's size) and opened, when it is small enough to do so quickly (at most 16
//! layers and 64 MiB).
//!
//! Checks:
//! - metadata that parses satisfies every invariant `validate` states;
//! - its active chain starts at a root, goes from parent to child, ends at the head,
//!   and names each layer at most once;
//! - written back in the format (JSON line and checksum line) it parses to the same
//!   metadata;
//! - a directory with it and its layer files opens, with that metadata (or, where an
//!   expansion was under way, finishes it: the size becomes `expanding_to`), and
//!   reads its first and last blocks.

#![no_main]

use horn_replica::meta::{layer_path, VolumeMeta, META_FILE};
use horn_replica::Replica;
use libfuzzer_sys::fuzz_target;

fn check_chain(meta: &VolumeMeta) {
    let chain = meta.chain();
    assert_eq!(chain.last(), Some(&meta.head), "the chain ends at the head");
    let first = meta.layer(chain[0]).expect("the chain's root exists");
    assert_eq!(first.parent, None, "the chain starts at a root");
    for pair in chain.windows(2) {
        let child = meta.layer(pair[1]).expect("every layer of the chain exists");
        assert_eq!(child.parent, Some(pair[0]));
    }
    let mut ids = chain.clone();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), chain.len(), "a layer twice in the chain");
    assert!(chain.len() <= meta.layers.len());
}

fn open_as_replica(meta: &VolumeMeta, file: &[u8]) {
    let dir = horn_fuzz::fresh_dir("volume_json");
    std::fs::write(dir.join(META_FILE), file).unwrap();
    for l in &meta.layers {
        let f = std::fs::File::create(layer_path(&dir, l.id)).unwrap();
        f.set_len(l.size).unwrap();
    }
    let mut r = Replica::open(&dir).expect("a replica with valid metadata and its files opens");
    let want_size = meta.expanding_to.unwrap_or(meta.size);
    assert_eq!(r.size(), want_size);
    if meta.expanding_to.is_none() {
        assert_eq!(r.meta(), meta, "opening changed the metadata");
    }
    let mut block = vec![0u8; 4096];
    r.read_at(0, &mut block).expect("the first block reads");
    r.read_at(want_size - 4096, &mut block)
        .expect("the last block reads");
    drop(r);
    let _ = std::fs::remove_dir_all(&dir);
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let file = if mode & 1 != 0 {
        let mut body = rest.to_vec();
        if body.last() != Some(&b'\n') {
            body.push(b'\n');
        }
        horn_fuzz::with_checksum_line(&body)
    } else {
        rest.to_vec()
    };
    let Ok(meta) = VolumeMeta::parse(&file, "volume.json".as_ref()) else {
        return;
    };
    assert_eq!(meta.validate(), Ok(()));
    check_chain(&meta);
    let mut again = serde_json::to_vec(&meta).unwrap();
    again.push(b'\n');
    let again = horn_fuzz::with_checksum_line(&again);
    assert_eq!(
        VolumeMeta::parse(&again, "volume.json".as_ref()).ok().as_ref(),
        Some(&meta),
        "written back, the metadata parses otherwise"
    );
    let small = meta.layers.len() <= 16 && meta.expanding_to.unwrap_or(meta.size) <= 64 << 20;
    if mode & 2 != 0 && small {
        open_as_replica(&meta, &file);
    }
});
