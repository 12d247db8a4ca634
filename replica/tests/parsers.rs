//! Fuzzing of the on-disk parsers: `volume.json`, the zero-extent log and the
//! write-intent record (whose damage may only ever add marks, never lose one).
//!
//! Arbitrary bytes, and valid files with bytes flipped, cut or spliced, must give either
//! a value that passes validation or an error naming the file: never a panic. Whatever
//! the metadata parser accepts must survive a store/parse round trip unchanged.

use std::collections::BTreeMap;
use std::path::Path;

use horn_replica::intent::{self, IntentLog, REGION_SIZE};
use horn_replica::meta::{LayerMeta, VolumeMeta};
use horn_replica::{zeros, Extent, ReplicaError};
use proptest::prelude::*;

/// A valid metadata file with a few snapshots, serialised as the store writes it.
fn valid_meta_bytes() -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let mut m = VolumeMeta::new(1 << 30, 512);
    for (id, name) in [(1u64, "a"), (2, "b")] {
        let l = m.layer_mut(id).unwrap();
        l.name = Some(name.into());
        l.created = Some(1_700_000_000);
        l.labels = BTreeMap::from([("k".into(), "v".into())]);
        m.layers.push(LayerMeta {
            id: id + 1,
            parent: Some(id),
            size: 1 << 30,
            name: None,
            created: None,
            labels: BTreeMap::new(),
            removed: false,
        });
        m.head = id + 1;
        m.next_id = id + 2;
    }
    m.store(dir.path()).unwrap();
    std::fs::read(dir.path().join("volume.json")).unwrap()
}

fn valid_zero_log() -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let exts = [
        Extent { offset: 0, len: 8192 },
        Extent {
            offset: 1 << 20,
            len: 4096,
        },
    ];
    zeros::rewrite(dir.path(), "z", &exts).unwrap();
    std::fs::read(dir.path().join("z")).unwrap()
}

#[derive(Debug, Clone)]
enum Mutation {
    Flip(usize, u8),
    Truncate(usize),
    Insert(usize, Vec<u8>),
    Overwrite(usize, Vec<u8>),
}

fn mutate(mut b: Vec<u8>, muts: &[Mutation]) -> Vec<u8> {
    for m in muts {
        let n = b.len().max(1);
        match m {
            Mutation::Flip(i, x) => {
                if !b.is_empty() {
                    let i = i % n;
                    b[i] ^= x | 1;
                }
            }
            Mutation::Truncate(i) => b.truncate(i % n),
            Mutation::Insert(i, bytes) => {
                let i = i % n;
                b.splice(i.min(b.len())..i.min(b.len()), bytes.iter().copied());
            }
            Mutation::Overwrite(i, bytes) => {
                for (k, x) in bytes.iter().enumerate() {
                    if let Some(slot) = b.get_mut((i + k) % n) {
                        *slot = *x;
                    }
                }
            }
        }
    }
    b
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), any::<u8>()).prop_map(|(i, x)| Mutation::Flip(i, x)),
        any::<usize>().prop_map(Mutation::Truncate),
        (any::<usize>(), prop::collection::vec(any::<u8>(), 1..16)).prop_map(|(i, v)| Mutation::Insert(i, v)),
        (any::<usize>(), prop::collection::vec(any::<u8>(), 1..16))
            .prop_map(|(i, v)| Mutation::Overwrite(i, v)),
    ]
}

fn check_meta(bytes: &[u8]) -> Result<(), TestCaseError> {
    let path = Path::new("/replica/volume.json");
    match VolumeMeta::parse(bytes, path) {
        Ok(m) => {
            prop_assert_eq!(m.validate(), Ok(()));
            let dir = tempfile::tempdir().unwrap();
            m.store(dir.path()).unwrap();
            prop_assert_eq!(VolumeMeta::load(dir.path()).unwrap(), m);
        }
        Err(e) => {
            prop_assert!(matches!(e, ReplicaError::CorruptMetadata { .. }), "{}", e);
            prop_assert!(e.to_string().contains("/replica/volume.json"), "{}", e);
        }
    }
    Ok(())
}

fn check_zero_log(bytes: &[u8]) -> Result<(), TestCaseError> {
    let limit = 4 << 20;
    match zeros::parse(bytes, Path::new("/replica/layer-00000001.zeros"), limit) {
        Ok((exts, _)) => {
            for e in exts {
                prop_assert!(e.len > 0 && e.end() <= limit && e.offset % 4096 == 0, "{:?}", e);
            }
        }
        Err(e) => prop_assert!(e.to_string().contains("layer-00000001.zeros"), "{}", e),
    }
    Ok(())
}

/// Regions of the intent test volume (two pages' worth and a bit).
const INTENT_REGIONS: u64 = 2 * 32_704 + 100;
const INTENT_MARKS: [u64; 4] = [0, 17, 32_704, INTENT_REGIONS - 1];

fn valid_intent_file() -> Vec<u8> {
    static BYTES: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    BYTES.get_or_init(make_intent_file).clone()
}

fn make_intent_file() -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let mut log = IntentLog::open(dir.path(), INTENT_REGIONS * REGION_SIZE).unwrap();
    for r in INTENT_MARKS {
        log.mark(r * REGION_SIZE, 1).unwrap();
    }
    std::fs::read(dir.path().join(intent::INTENT_FILE)).unwrap()
}

fn check_intent(bytes: &[u8]) -> Result<(), TestCaseError> {
    match intent::parse(bytes, Path::new("/replica/intent.bits"), INTENT_REGIONS) {
        Ok(bits) => {
            let marked = |r: u64| bits[(r / 8) as usize] & (1 << (r % 8)) != 0;
            for r in INTENT_MARKS {
                prop_assert!(marked(r), "damage lost the mark of region {}", r);
            }
            prop_assert!(!marked(INTENT_REGIONS), "a region past the end is marked");
        }
        Err(e) => prop_assert!(e.to_string().contains("intent.bits"), "{}", e),
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(
        std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(1000)
    ))]

    #[test]
    fn metadata_parser_never_panics_on_arbitrary_bytes(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        check_meta(&bytes)?;
    }

    #[test]
    fn metadata_parser_refuses_or_accepts_damaged_files_cleanly(muts in prop::collection::vec(mutation(), 1..4)) {
        check_meta(&mutate(valid_meta_bytes(), &muts))?;
    }

    /// The checksum is re-computed after the damage, so the JSON and the invariants are
    /// what gets tested.
    #[test]
    fn metadata_validation_survives_damage_under_a_good_checksum(muts in prop::collection::vec(mutation(), 1..4)) {
        let good = valid_meta_bytes();
        let body_end = good[..good.len() - 1].iter().rposition(|&b| b == b'\n').unwrap() + 1;
        let mut body = mutate(good[..body_end - 1].to_vec(), &muts);
        body.push(b'\n');
        let trailer = format!("crc32c {:08x}\n", crc32c::crc32c(&body));
        body.extend_from_slice(trailer.as_bytes());
        check_meta(&body)?;
    }

    #[test]
    fn zero_log_parser_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        check_zero_log(&bytes)?;
    }

    #[test]
    fn zero_log_parser_handles_damaged_logs(muts in prop::collection::vec(mutation(), 1..4)) {
        check_zero_log(&mutate(valid_zero_log(), &muts))?;
    }

    #[test]
    fn intent_parser_never_loses_a_mark_to_damage(muts in prop::collection::vec(mutation(), 1..4)) {
        check_intent(&mutate(valid_intent_file(), &muts))?;
    }

    #[test]
    fn intent_parser_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..128)) {
        if let Ok(bits) = intent::parse(&bytes, Path::new("/replica/intent.bits"), 100) {
            prop_assert!(bits.len() * 8 >= 100);
        }
    }
}
