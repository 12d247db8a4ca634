//! The frontend interface (`BlockVolume`) on a queue of a real engine over real
//! replica processes: many I/Os in flight as futures, every operation, bad requests.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::Daemon;
use futures_util::future::join_all;
use horn_engine::frontend::{run_local, BlockVolume};
use horn_engine::{ReplicaAddr, VolumeError};
use horn_replica::{IoBuf, Replica};

const BLOCK: usize = 4096;

fn pattern(block: u64) -> Vec<u8> {
    (0..BLOCK)
        .map(|i| (block as usize * 31 + i / 512) as u8 | 1)
        .collect()
}

#[test]
fn a_frontend_drives_the_volume_through_the_async_interface() {
    let tmp = tempfile::tempdir().unwrap();
    let dirs: Vec<PathBuf> = (0..2).map(|i| tmp.path().join(format!("r{i}"))).collect();
    let mut daemons: Vec<Daemon> = dirs
        .iter()
        .map(|d| Daemon::start(d, &["--size", "16M"]).unwrap())
        .collect();
    let addrs: Vec<ReplicaAddr> = daemons.iter().map(Daemon::replica_addr).collect();
    let (engine, _) = horn_engine::start(&addrs, Duration::from_secs(8)).unwrap();

    let checked = run_local(&engine, |vol| async move {
        assert_eq!(vol.size(), 16 << 20);
        assert_eq!(vol.block_size(), 512);
        // 64 writes in flight at once, every other one FUA; each hands its buffer back.
        let writes = (0..64u64).map(|b| {
            let vol = vol.clone();
            async move {
                let (res, buf) = vol
                    .write(b * 2 * BLOCK as u64, IoBuf::from_slice(&pattern(b)), b % 2 == 0)
                    .await;
                res.unwrap();
                assert_eq!(buf.as_slice(), &pattern(b)[..]);
            }
        });
        join_all(writes).await;
        vol.flush().await.unwrap();
        let reads = (0..64u64).map(|b| {
            let vol = vol.clone();
            async move {
                let (res, buf) = vol.read(b * 2 * BLOCK as u64, IoBuf::zeroed(BLOCK)).await;
                res.unwrap();
                assert_eq!(buf.as_slice(), &pattern(b)[..], "block {b}");
            }
        });
        join_all(reads).await;

        // Discard and write-zeroes read back as zeros; their neighbours are untouched.
        vol.discard(0, 2 * BLOCK as u64).await.unwrap();
        vol.write_zeroes(4 * BLOCK as u64, BLOCK as u64).await.unwrap();
        for (at, want) in [(0u64, None), (2, Some(1u64)), (4, None), (6, Some(3))] {
            let (res, buf) = vol.read(at * BLOCK as u64, IoBuf::zeroed(BLOCK)).await;
            res.unwrap();
            match want {
                None => assert!(buf.as_slice().iter().all(|&x| x == 0), "block {at} is zero"),
                Some(b) => assert_eq!(buf.as_slice(), &pattern(b)[..], "block {at} kept"),
            }
        }

        // Bad requests fail with a clear error and hand the buffer back.
        let (res, buf) = vol.read(vol.size(), IoBuf::zeroed(BLOCK)).await;
        assert_eq!(buf.len(), BLOCK);
        match res {
            Err(VolumeError::BadRequest(why)) => assert!(why.contains("past the end"), "{why}"),
            other => panic!("a read past the end gave {other:?}"),
        }
        let (res, _) = vol.write(100, IoBuf::zeroed(512), false).await;
        assert!(
            matches!(res, Err(VolumeError::BadRequest(ref why)) if why.contains("sector size")),
            "{res:?}"
        );
        let res = vol.discard(vol.size() - 512, 4096).await;
        assert!(matches!(res, Err(VolumeError::BadRequest(_))), "{res:?}");
        64
    })
    .unwrap();
    assert_eq!(checked, 64);

    // The data is on every replica, as the engine said.
    drop(engine);
    for (d, dir) in daemons.iter_mut().zip(&dirs) {
        d.signal(libc::SIGTERM);
        d.wait_output();
        let mut r = Replica::open(dir).unwrap();
        let mut b = vec![0u8; BLOCK];
        for blk in 1..64u64 {
            r.read_at(blk * 2 * BLOCK as u64, &mut b).unwrap();
            let want = if blk == 2 { vec![0; BLOCK] } else { pattern(blk) };
            assert_eq!(b, want, "{}: block {}", dir.display(), blk * 2);
        }
    }
}

#[test]
fn mixed_reads_and_writes_in_flight_together_always_read_the_latest_data() {
    use rand::{rngs::SmallRng, Rng, SeedableRng};

    let tmp = tempfile::tempdir().unwrap();
    let daemons: Vec<Daemon> = (0..2)
        .map(|i| Daemon::start(&tmp.path().join(format!("r{i}")), &["--size", "16M"]).unwrap())
        .collect();
    let addrs: Vec<ReplicaAddr> = daemons.iter().map(Daemon::replica_addr).collect();
    let (engine, _) = horn_engine::start(&addrs, Duration::from_secs(8)).unwrap();
    // 32 tasks in flight at once, each on its own 16 blocks with its own model, mixing
    // sizes so that replies to reads and writes interleave on the wire.
    let ops = run_local(&engine, |vol| async move {
        let tasks = (0..32u64).map(|t| {
            let vol = vol.clone();
            async move {
                let mut rng = SmallRng::seed_from_u64(t);
                let mut model = [0u8; 16];
                let base = t * 16;
                let mut ops = 0;
                for _ in 0..200 {
                    let first = rng.gen_range(0..16usize);
                    let count = rng.gen_range(1..=(16 - first).min(4));
                    let at = (base + first as u64) * BLOCK as u64;
                    if rng.gen_bool(0.5) {
                        let v = rng.gen_range(1..=255u8);
                        let (res, _) = vol
                            .write(at, IoBuf::from_slice(&vec![v; count * BLOCK]), false)
                            .await;
                        res.unwrap();
                        model[first..first + count].fill(v);
                    } else {
                        let (res, buf) = vol.read(at, IoBuf::zeroed(count * BLOCK)).await;
                        res.unwrap();
                        for (i, chunk) in buf.as_slice().chunks(BLOCK).enumerate() {
                            let want = model[first + i];
                            assert!(chunk.iter().all(|&x| x == want), "task {t} block {}", first + i);
                        }
                    }
                    ops += 1;
                }
                ops
            }
        });
        join_all(tasks).await.into_iter().sum::<usize>()
    })
    .unwrap();
    assert_eq!(ops, 32 * 200);
}
