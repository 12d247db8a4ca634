//! Keeping replicas identical: reconciliation after an engine crash, online
//! verification, and the write-intent record that makes reconciliation cheap.
//!
//! - **Write intent** (`horn_replica::intent`): each replica marks a region, durably,
//!   before it first writes there. [`clear_intents`] unmarks every region at a
//!   moment when no write is in flight and every replica has flushed; the caller
//!   ([`crate::volume::Volume::clean_intents`]) pauses the volume for that.
//! - **Reconciliation** ([`reconcile`]): a new engine, before any queue opens,
//!   takes the union of the regions marked on its RW replicas (only there can a write
//!   have reached some replicas and not others), compares those regions block by block
//!   by checksum, and copies the blocks that differ from one chosen replica to the
//!   others. Which replica is chosen does not matter for acknowledged writes: a write
//!   was acknowledged only once every replica had it, so every replica agrees on it.
//! - **Verification** ([`compare_range`]): the checksums of one range from every
//!   RW replica, for [`crate::volume::Volume::verify`], which pauses the volume around
//!   each range so that no write lands between one replica's answer and the next.

use horn_proto::control::{BlocksData, BlocksRequest, ChecksumsRequest, ClearIntentsRequest, IntentsRequest};

use crate::client::{connect, control_err, ControlClient, Deadline, Peer};
use crate::engine::Engine;
use crate::replica_set::Mode;
use crate::types::{Difference, ReconcileReport, Result, VolumeError};

/// Bytes moved by one range call (the replica's limit).
const COPY_STEP: u64 = 1 << 20;
/// Bytes per checksum.
pub const BLOCK: u64 = 4096;

/// Copies whole 4 KiB `blocks` (ascending) from one replica to another, 1 MiB per call.
/// Each side is its client and control address (for messages).
pub(crate) async fn copy_blocks(
    from: (&mut ControlClient, &str),
    to: (&mut ControlClient, &str),
    blocks: &[u64],
    generation: u64,
) -> Result<()> {
    for chunk in blocks.chunks((COPY_STEP / BLOCK) as usize) {
        let data = from
            .0
            .read_blocks(BlocksRequest {
                blocks: chunk.to_vec(),
            })
            .await
            .map_err(control_err(from.1))?
            .into_inner()
            .data;
        to.0.write_blocks(BlocksData {
            generation,
            blocks: chunk.to_vec(),
            data,
        })
        .await
        .map_err(control_err(to.1))?;
    }
    Ok(())
}

/// Runs of blocks where `other` differs from `base`, as (first block, count).
pub fn differing_runs(base: &[u64], other: &[u64]) -> Vec<(u64, u64)> {
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for (i, (a, b)) in base.iter().zip(other).enumerate() {
        if a == b {
            continue;
        }
        let i = i as u64;
        match runs.last_mut() {
            Some((start, n)) if *start + *n == i => *n += 1,
            _ => runs.push((i, 1)),
        }
    }
    runs
}

/// Control clients of the replicas that have not failed, WO ones too if asked. A
/// replica that does not accept a connection within the engine's timeout is dropped
/// (the keeper records it) and left out.
pub(crate) fn peers(engine: &Engine, with_wo: bool) -> Result<Vec<Peer>> {
    let mut out = Vec::new();
    for (i, r) in engine.replicas().iter().enumerate() {
        if engine.is_failed(i) || (r.mode() != Mode::Rw && !with_wo) {
            continue;
        }
        let connected = engine.unless_dropped(i, async {
            connect(&r.control, engine.caller(), Deadline::Call(engine.timeout()))
                .await
                .map_err(|e| tonic::Status::unavailable(e.to_string()))
        });
        match connected {
            Ok(client) => out.push(Peer {
                index: i,
                control: r.control.clone(),
                data: r.data.clone(),
                client,
            }),
            Err(e) => drop_replica(engine, i, &r.data, e.message()),
        }
    }
    Ok(out)
}

/// Drops a replica that failed or missed a control call's deadline: the keeper
/// records the drop before any queue acknowledges past it.
pub(crate) fn drop_replica(engine: &Engine, index: usize, data: &str, why: &str) {
    if engine.mark_failed(index, &format!("replica {data} failed a control call: {why}")) {
        tracing::warn!(replica = %data, error = %why, "replica dropped: it failed a control call");
    }
}

/// Makes the RW replicas identical where their write-intent records say they may
/// differ, then clears the records. Runs before any queue opens.
pub(crate) fn reconcile(engine: &Engine) -> Result<ReconcileReport> {
    let mut clients = peers(engine, false)?;
    let mut report = ReconcileReport::default();
    let mut regions = std::collections::BTreeSet::new();
    let mut region_size = 0;
    for Peer {
        control, client: c, ..
    } in clients.iter_mut()
    {
        let reply = engine
            .runtime()
            .block_on(c.intents(IntentsRequest {}))
            .map_err(control_err(control))?
            .into_inner();
        region_size = reply.region_size;
        regions.extend(reply.regions);
    }
    if regions.is_empty() || region_size == 0 {
        return Ok(report);
    }
    report.regions = regions.len() as u64;
    if clients.len() > 1 {
        report.source = Some(clients[0].data.clone());
        let size = engine.size();
        for region in regions {
            let offset = region * region_size;
            if offset >= size {
                continue;
            }
            let len = region_size.min(size - offset);
            reconcile_range(engine, &mut clients, offset, len, &mut report)?;
        }
    }
    // Each replica flushes before it clears; a crash half way leaves marks on the
    // others, and the union still covers every region.
    let generation = engine.generation();
    for Peer {
        control, client: c, ..
    } in clients.iter_mut()
    {
        engine
            .runtime()
            .block_on(c.clear_intents(ClearIntentsRequest { generation }))
            .map_err(control_err(control))?;
    }
    Ok(report)
}

fn reconcile_range(
    engine: &Engine,
    clients: &mut [Peer],
    offset: u64,
    len: u64,
    report: &mut ReconcileReport,
) -> Result<()> {
    let sums = checksums_of(engine, clients, offset, len)?;
    report.bytes_compared += len;
    let generation = engine.generation();
    let (source, targets) = clients.split_first_mut().expect("two clients or more");
    for (t, Peer { control, client, .. }) in targets.iter_mut().enumerate() {
        let blocks: Vec<u64> = differing_runs(&sums[0], &sums[t + 1])
            .into_iter()
            .flat_map(|(first, count)| offset / BLOCK + first..offset / BLOCK + first + count)
            .collect();
        report.blocks_differing += blocks.len() as u64;
        engine.runtime().block_on(copy_blocks(
            (&mut source.client, &source.control),
            (client, control),
            &blocks,
            generation,
        ))?;
        report.bytes_copied += blocks.len() as u64 * BLOCK;
    }
    Ok(())
}

fn checksums_of(engine: &Engine, clients: &mut [Peer], offset: u64, len: u64) -> Result<Vec<Vec<u64>>> {
    let mut all = Vec::with_capacity(clients.len());
    for Peer {
        control, client: c, ..
    } in clients.iter_mut()
    {
        let reply = engine
            .runtime()
            .block_on(c.checksums(ChecksumsRequest { offset, length: len }))
            .map_err(control_err(control))?
            .into_inner();
        if reply.sums.len() as u64 != len / BLOCK {
            return Err(VolumeError::Control {
                replica: control.clone(),
                code: tonic::Code::Internal,
                message: format!(
                    "answered {} checksums for {len} bytes, not {}",
                    reply.sums.len(),
                    len / BLOCK
                ),
            });
        }
        all.push(reply.sums);
    }
    Ok(all)
}

/// Compares `[offset, offset + len)` on the replicas of `peers` by checksum; the
/// caller holds the volume paused. Returns the replicas compared (data addresses)
/// and the runs that differ from the first replica's.
pub(crate) fn compare_range(
    engine: &Engine,
    peers: &mut [Peer],
    offset: u64,
    len: u64,
) -> Result<(Vec<String>, Vec<Difference>)> {
    let names: Vec<String> = peers.iter().map(|c| c.data.clone()).collect();
    let sums = checksums_of(engine, peers, offset, len)?;
    let mut diffs: Vec<Difference> = Vec::new();
    for (t, other) in sums.iter().enumerate().skip(1) {
        for (first, count) in differing_runs(&sums[0], other) {
            diffs.push(Difference {
                offset: offset + first * BLOCK,
                len: count * BLOCK,
                replicas: vec![names[t].clone()],
            });
        }
    }
    diffs.sort_by_key(|d| d.offset);
    Ok((names, diffs))
}

/// Write-intent regions marked on the replicas of `peers` (the most on any one). A
/// replica that fails the call or misses its deadline is dropped and leaves `peers`.
pub(crate) fn intents_marked(engine: &Engine, peers: &mut Vec<Peer>) -> Result<u64> {
    let mut most = 0;
    peers.retain_mut(
        |p| match engine.unless_dropped(p.index, p.client.intents(IntentsRequest {})) {
            Ok(reply) => {
                most = most.max(reply.into_inner().regions.len() as u64);
                true
            }
            Err(s) => {
                drop_replica(engine, p.index, &p.data, s.message());
                false
            }
        },
    );
    Ok(most)
}

/// Unmarks the write-intent regions on the replicas of `peers`. The caller has
/// paused the volume with nothing in flight. A replica that fails or misses the
/// deadline (a hung disk) is dropped, not waited for: the pause ends within one
/// deadline per replica.
pub(crate) fn clear_intents(engine: &Engine, peers: &mut Vec<Peer>) -> Result<()> {
    let generation = engine.generation();
    peers.retain_mut(|p| {
        match engine.unless_dropped(
            p.index,
            p.client.clear_intents(ClearIntentsRequest { generation }),
        ) {
            Ok(_) => true,
            Err(s) => {
                drop_replica(engine, p.index, &p.data, s.message());
                false
            }
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::differing_runs;

    #[test]
    fn runs_of_differing_blocks() {
        let a = [1, 2, 3, 4, 5, 6];
        let b = [1, 9, 9, 4, 9, 6];
        assert_eq!(differing_runs(&a, &b), vec![(1, 2), (4, 1)]);
        assert!(differing_runs(&a, &a).is_empty());
    }
}
