//! `horn-bench store`: the replica store in-process, against fio on a plain file.
//!
//! Three parts, each printing one JSON object per line with `--json`:
//! - `io`: 4 KiB random read and write at QD32 and QD1, 1 MiB sequential read and
//!   write at QD8, driven through the store's io_uring path, each followed by the same
//!   fio job (io_uring, O_DIRECT) on a plain file of the same size on the same
//!   filesystem. Both are filled first, so neither reads holes.
//! - `index`: the extent index's memory for 1 MiB extents and for random 4 KiB blocks,
//!   each spread over 10,000 layers, on a volume of `--index-volume` bytes.
//! - `chain`: builds replicas with long snapshot chains (`--chain-layers`), then times
//!   opening them and verifies every written block through the whole chain.

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use horn_manager::format::{human_bytes, parse_size};
use horn_replica::index::{BlockIndex, CHUNK_BLOCKS};
use horn_replica::Replica;
use rand::{rngs::SmallRng, Rng, SeedableRng};
use serde_json::{json, Value};

use crate::fio;
use crate::report::Report;
use crate::target::{drive, fill, pattern_buf, WORKLOADS};

const TIB: u64 = 1 << 40;
const MIB: u64 = 1 << 20;
/// Layers the index patterns spread their writes over.
const INDEX_LAYERS: u16 = 10_000;

/// Which parts of the store benchmark to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Part {
    /// Store I/O against fio.
    Io,
    /// Extent index memory.
    Index,
    /// Long snapshot chains.
    Chain,
}

/// Arguments of `horn-bench store`.
#[derive(Debug, Args)]
pub struct StoreArgs {
    /// Print one JSON object per result line.
    #[arg(long)]
    json: bool,
    /// Directory for scratch files; the replica and fio's file share its filesystem.
    #[arg(long, default_value = "/var/tmp")]
    dir: PathBuf,
    /// Size of the volume and of fio's file for the I/O part.
    #[arg(long, default_value = "2G", value_parser = parse_size)]
    size: u64,
    /// Seconds per workload, for the store and for fio alike.
    #[arg(long, default_value_t = 10)]
    runtime: u64,
    /// Chain lengths to build for the chain part.
    #[arg(long, value_delimiter = ',', default_value = "1000,10000")]
    chain_layers: Vec<u64>,
    /// Volume size the index part models.
    #[arg(long, default_value = "1T", value_parser = parse_size)]
    index_volume: u64,
    /// Parts to run.
    #[arg(long, value_delimiter = ',', default_value = "io,index,chain")]
    parts: Vec<Part>,
    /// Only these I/O workloads (names as printed), default all.
    #[arg(long, value_delimiter = ',')]
    workloads: Vec<String>,
    /// Also run each fio job on the replica's own head layer file (`layer_fio_iops`):
    /// tells the store's overhead apart from where the file sits on the disk.
    #[arg(long)]
    fio_on_layer: bool,
}

/// Runs the store benchmark.
pub fn run(args: StoreArgs) -> Result<()> {
    let mut report = Report {
        json: args.json,
        rows: Vec::new(),
    };
    if args.parts.contains(&Part::Io) {
        io_part(&args, &mut report)?;
    }
    if args.parts.contains(&Part::Index) {
        index_part(&args, &mut report);
    }
    if args.parts.contains(&Part::Chain) {
        for &n in &args.chain_layers {
            chain_part(&args, n, &mut report)?;
        }
    }
    report.finish();
    Ok(())
}

fn io_part(args: &StoreArgs, report: &mut Report) -> Result<()> {
    if !fio::available() {
        bail!("fio is not installed: run scripts/install-deps (or apt-get install fio)");
    }
    let scratch = tempfile::Builder::new()
        .prefix("horn-bench-")
        .tempdir_in(&args.dir)
        .with_context(|| format!("cannot make a scratch directory in {}", args.dir.display()))?;
    let size = args.size;
    eprintln!(
        "filling a {} replica and a {} plain file in {}",
        human_bytes(size),
        human_bytes(size),
        args.dir.display()
    );
    let mut r = Replica::create(scratch.path().join("replica"), size, 4096)?;
    fill(&mut r)?;
    let plain = scratch.path().join("plain.img");
    fill_plain(&plain, size)?;

    let runtime = Duration::from_secs(args.runtime);
    let layer_file = horn_replica::meta::layer_path(r.dir(), r.meta().head);
    for w in WORKLOADS {
        if !args.workloads.is_empty() && !args.workloads.iter().any(|n| n == w.name) {
            continue;
        }
        let (iops, lat) = drive(&mut r, w, runtime)?;
        let peer = fio::run(&plain, w.fio_rw, w.bs, w.qd as u32, args.runtime, size)?;
        let layer_fio = if args.fio_on_layer {
            Some(
                fio::run(&layer_file, w.fio_rw, w.bs, w.qd as u32, args.runtime, size)?
                    .iops
                    .round(),
            )
        } else {
            None
        };
        report.emit(json!({
            "layer_fio_iops": layer_fio,
            "bench": "store",
            "part": "io",
            "workload": w.name,
            "iops": iops.round(),
            "lat_us_mean": round2(lat),
            "mib_s": round2(iops * w.bs as f64 / MIB as f64),
            "peer": "fio io_uring O_DIRECT on a plain file, same filesystem",
            "peer_iops": peer.iops.round(),
            "peer_lat_us_mean": round2(peer.lat_us_mean),
            "ratio": round2(iops / peer.iops),
            "size_bytes": size,
            "runtime_s": args.runtime,
        }));
    }
    Ok(())
}

pub(crate) fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

/// Fills fio's file with O_DIRECT writes, as the replica is filled: buffered writes
/// would leave cached pages that every later O_DIRECT write has to invalidate.
pub(crate) fn fill_plain(path: &Path, size: u64) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    let buf = pattern_buf(MIB, 3);
    for _ in 0..size / MIB {
        f.write_all(buf.as_slice())?;
    }
    f.sync_all()?;
    Ok(())
}

fn index_part(args: &StoreArgs, report: &mut Report) {
    let volume = args.index_volume;
    let mut rng = SmallRng::seed_from_u64(5);

    // Every aligned 1 MiB extent written in a random one of 10,000 layers.
    let mut idx = BlockIndex::new(volume);
    for c in 0..idx.blocks() / CHUNK_BLOCKS {
        idx.set_range(c * CHUNK_BLOCKS, CHUNK_BLOCKS, rng.gen_range(1..=INDEX_LAYERS));
    }
    report.emit(index_row(
        "index-1mib-extents",
        idx,
        ("target_bytes_per_tib", 8 * MIB),
    ));

    // Worst case: every 4 KiB block written in a random one of 10,000 layers.
    let mut idx = BlockIndex::new(volume);
    for blk in 0..idx.blocks() {
        idx.set_range(blk, 1, rng.gen_range(1..=INDEX_LAYERS));
    }
    report.emit(index_row(
        "index-random-4k-every-block",
        idx,
        ("target_bytes_per_4k_block", 2),
    ));
}

/// One index-memory result; takes the index so its memory is freed before the next.
fn index_row(workload: &str, idx: BlockIndex, target: (&str, u64)) -> Value {
    let blocks = idx.blocks();
    let bytes = idx.heap_bytes();
    let mut row = json!({
        "bench": "store",
        "part": "index",
        "workload": workload,
        "layers": INDEX_LAYERS,
        "volume_bytes": blocks * 4096,
        "index_bytes": bytes,
        "bytes_per_tib": (bytes as f64 * TIB as f64 / (blocks * 4096) as f64).round(),
        "bytes_per_4k_block": round4(bytes as f64 / blocks as f64),
        "peer": "Longhorn v1: 1 byte per 4 KiB block, at most 254 layers (documented, not measured)",
        "peer_bytes_per_tib": TIB / 4096,
    });
    row[target.0] = json!(target.1);
    row
}

fn round4(x: f64) -> f64 {
    (x * 10_000.0).round() / 10_000.0
}

/// Builds a 1 TiB sparse replica with `layers` snapshots (two random 4 KiB writes per
/// layer, a 1 MiB extent every tenth), reopens it, and verifies every written block.
fn chain_part(args: &StoreArgs, layers: u64, report: &mut Report) -> Result<()> {
    let scratch = tempfile::Builder::new()
        .prefix("horn-bench-chain-")
        .tempdir_in(&args.dir)?;
    let dir = scratch.path().join("replica");
    let size = TIB;
    let mut r = Replica::create(&dir, size, 4096)?;
    let mut model: BTreeMap<u64, u8> = BTreeMap::new();
    let mut rng = SmallRng::seed_from_u64(9);
    eprintln!("building a chain of {layers} layers");
    let t0 = Instant::now();
    for i in 0..layers {
        let fill = (i % 251 + 1) as u8;
        for _ in 0..2 {
            let b = rng.gen_range(0..size / 4096);
            r.write_at(b * 4096, &[fill; 4096])?;
            model.insert(b, fill);
        }
        if i % 10 == 0 {
            let m = rng.gen_range(0..size / MIB);
            r.write_at(m * MIB, &vec![fill; MIB as usize])?;
            for b in m * 256..(m + 1) * 256 {
                model.insert(b, fill);
            }
        }
        r.snapshot(&format!("s{i}"), &BTreeMap::new())?;
    }
    let build_s = t0.elapsed().as_secs_f64();
    drop(r);

    let t1 = Instant::now();
    let mut r = Replica::open(&dir)?;
    let open_ms = t1.elapsed().as_secs_f64() * 1000.0;
    let index_bytes = r.index_bytes();

    let t2 = Instant::now();
    let mut buf = [0u8; 4096];
    for (&b, &fill) in &model {
        r.read_at(b * 4096, &mut buf)?;
        if buf.iter().any(|&x| x != fill) {
            bail!(
                "block {b} of a {layers}-layer chain reads {} instead of {fill}",
                buf[0]
            );
        }
    }
    // Blocks nobody wrote read as zeros.
    for _ in 0..1000 {
        let b = rng.gen_range(0..size / 4096);
        if !model.contains_key(&b) {
            r.read_at(b * 4096, &mut buf)?;
            if buf.iter().any(|&x| x != 0) {
                bail!("never-written block {b} is not zero");
            }
        }
    }
    r.write_at(0, &[0xab; 4096])?;
    r.read_at(0, &mut buf)?;
    if buf != [0xab; 4096] {
        bail!("a write after reopening the chain did not read back");
    }
    let verify_s = t2.elapsed().as_secs_f64();
    report.emit(json!({
        "bench": "store",
        "part": "chain",
        "workload": format!("chain-{layers}-layers"),
        "layers": layers + 1,
        "volume_bytes": size,
        "build_s": round2(build_s),
        "open_ms": round2(open_ms),
        "index_bytes": index_bytes,
        "blocks_verified": model.len(),
        "verify_s": round2(verify_s),
        "verified": true,
        "peer": "Longhorn v1 caps a chain at 250 snapshots (documented)",
    }));
    Ok(())
}
