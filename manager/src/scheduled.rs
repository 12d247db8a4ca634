//! Bytes scheduled on each disk, kept in memory from the store's watches.
//!
//! The scheduler needs, for every disk, the sum of the sizes of the replicas placed on
//! it. Read from the specs, that is every volume and every replica decoded at each
//! placement: with 10,000 volumes, creating one more would cost 40,000 decodes. So the
//! manager keeps the sums here, built once from a list and then moved by the store's
//! watches of `volumes/` and `replicas/`.
//!
//! It is exact, not merely eventual: a commit hands its events to the watchers before
//! it returns, and [`ScheduledIndex::catch_up`] applies every event waiting, so after it
//! the sums include every commit that completed before the call. A watch that fell
//! behind (ended by the store) is rebuilt from a fresh list.

use std::collections::{BTreeMap, BTreeSet};

use crate::model::{ReplicaSpec, VolumeSpec};
use crate::store::{Event, Store, StoreError, Watch};

/// A replica as the index counts it.
#[derive(Debug, Clone)]
struct Counted {
    volume: String,
    disk: (String, String),
}

/// See the module's documentation.
pub struct ScheduledIndex {
    volumes: Watch,
    replicas: Watch,
    /// Each volume's size.
    sizes: BTreeMap<String, u64>,
    /// Each replica (by key) and where it is.
    placed: BTreeMap<String, Counted>,
    /// The replicas (keys) of each volume.
    by_volume: BTreeMap<String, BTreeSet<String>>,
    /// Bytes scheduled on each (node, disk).
    by_disk: BTreeMap<(String, String), u64>,
}

impl ScheduledIndex {
    /// Lists the volumes and replicas of `store` and follows them from there.
    pub fn build(store: &dyn Store) -> Result<ScheduledIndex, StoreError> {
        let (rv, volumes) = store.list("volumes/")?;
        let (rr, replicas) = store.list("replicas/")?;
        let mut index = ScheduledIndex {
            volumes: store.watch("volumes/", rv)?,
            replicas: store.watch("replicas/", rr)?,
            sizes: BTreeMap::new(),
            placed: BTreeMap::new(),
            by_volume: BTreeMap::new(),
            by_disk: BTreeMap::new(),
        };
        for (key, e) in volumes {
            index.put_volume(&key, &e.value);
        }
        for (key, e) in replicas {
            index.put_replica(&key, &e.value);
        }
        Ok(index)
    }

    /// Applies every event waiting; false if a watch has ended (the index must be
    /// built again).
    pub fn catch_up(&mut self) -> bool {
        loop {
            match self.volumes.try_recv() {
                Ok(Event::Put { key, entry }) => self.put_volume(&key, &entry.value),
                Ok(Event::Delete { key, .. }) => self.delete_volume(&key),
                Err(tokio::sync::mpsc::error::TryRecvError::Empty) => break,
                Err(tokio::sync::mpsc::error::TryRecvError::Disconnected) => return false,
            }
        }
        loop {
            match self.replicas.try_recv() {
                Ok(Event::Put { key, entry }) => self.put_replica(&key, &entry.value),
                Ok(Event::Delete { key, .. }) => self.delete_replica(&key),
                Err(tokio::sync::mpsc::error::TryRecvError::Empty) => return true,
                Err(tokio::sync::mpsc::error::TryRecvError::Disconnected) => return false,
            }
        }
    }

    /// Bytes scheduled on `node`'s disk `disk`.
    pub fn scheduled(&self, node: &str, disk: &str) -> u64 {
        self.by_disk
            .get(&(node.to_string(), disk.to_string()))
            .copied()
            .unwrap_or(0)
    }

    fn add(&mut self, disk: &(String, String), bytes: i128) {
        let v = self.by_disk.entry(disk.clone()).or_default();
        *v = (*v as i128 + bytes).max(0) as u64;
    }

    fn put_volume(&mut self, key: &str, value: &[u8]) {
        // A spec that does not decode counts for nothing here; reading it elsewhere
        // reports it.
        let Ok(spec) = serde_json::from_slice::<VolumeSpec>(value) else {
            return;
        };
        let name = key.trim_start_matches("volumes/").to_string();
        let old = self.sizes.insert(name.clone(), spec.size).unwrap_or(0);
        let delta = spec.size as i128 - old as i128;
        if delta != 0 {
            let disks: Vec<(String, String)> = self
                .by_volume
                .get(&name)
                .into_iter()
                .flatten()
                .filter_map(|k| self.placed.get(k).map(|c| c.disk.clone()))
                .collect();
            for d in disks {
                self.add(&d, delta);
            }
        }
    }

    fn delete_volume(&mut self, key: &str) {
        let name = key.trim_start_matches("volumes/");
        if let Some(size) = self.sizes.remove(name) {
            let disks: Vec<(String, String)> = self
                .by_volume
                .get(name)
                .into_iter()
                .flatten()
                .filter_map(|k| self.placed.get(k).map(|c| c.disk.clone()))
                .collect();
            for d in disks {
                self.add(&d, -(size as i128));
            }
        }
    }

    fn put_replica(&mut self, key: &str, value: &[u8]) {
        self.delete_replica(key);
        let Ok(spec) = serde_json::from_slice::<ReplicaSpec>(value) else {
            return;
        };
        let counted = Counted {
            volume: spec.volume.clone(),
            disk: (spec.node, spec.disk),
        };
        let size = self.sizes.get(&spec.volume).copied().unwrap_or(0);
        self.add(&counted.disk, size as i128);
        self.by_volume
            .entry(spec.volume)
            .or_default()
            .insert(key.to_string());
        self.placed.insert(key.to_string(), counted);
    }

    fn delete_replica(&mut self, key: &str) {
        if let Some(c) = self.placed.remove(key) {
            let size = self.sizes.get(&c.volume).copied().unwrap_or(0);
            self.add(&c.disk, -(size as i128));
            if let Some(keys) = self.by_volume.get_mut(&c.volume) {
                keys.remove(key);
                if keys.is_empty() {
                    self.by_volume.remove(&c.volume);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use rand::rngs::SmallRng;
    use rand::{Rng, SeedableRng};

    use super::*;
    use crate::model::{DataLocality, DiskSpec, Frontend, NodeSpec, Specs};
    use crate::store::embedded::{EmbeddedStore, Options};

    fn from_scratch(specs: &Specs<EmbeddedStore>) -> BTreeMap<(String, String), u64> {
        let sizes: BTreeMap<String, u64> = specs
            .volumes()
            .unwrap()
            .into_iter()
            .map(|v| (v.spec.name, v.spec.size))
            .collect();
        let mut out = BTreeMap::new();
        for r in specs.all_replicas().unwrap() {
            *out.entry((r.spec.node, r.spec.disk)).or_default() +=
                sizes.get(&r.spec.volume).copied().unwrap_or(0);
        }
        out
    }

    fn run(seed: u64, watch_buffer: usize) {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open_with(
            dir.path().join("specs.redb"),
            Options {
                watch_buffer,
                ..Options::default()
            },
        )
        .unwrap();
        let specs = Specs::new(store);
        for n in 1..=3 {
            specs
                .put_node(&NodeSpec {
                    name: format!("n{n}"),
                    address: "10.0.0.1:9700".into(),
                    zone: String::new(),
                    tags: BTreeSet::new(),
                    cordoned: false,
                    disks: vec![DiskSpec {
                        path: "/d".into(),
                        tags: BTreeSet::new(),
                        reserved: 0,
                        allow_scheduling: true,
                        added: false,
                    }],
                })
                .unwrap();
        }
        let mut rng = SmallRng::seed_from_u64(seed);
        let mut index = ScheduledIndex::build(specs.store()).unwrap();
        let mut rebuilt = 0;
        for step in 0..300 {
            let volumes = specs.volumes().unwrap();
            match rng.gen_range(0..10) {
                0..=3 => {
                    let name = format!("v{step}");
                    let count = rng.gen_range(1..=3);
                    let spec = VolumeSpec {
                        name: name.clone(),
                        size: rng.gen_range(1..64u64) << 20,
                        replicas: count,
                        sector_size: 512,
                        frontend: Frontend::Iscsi,
                        data_locality: DataLocality::Disabled,
                        node_selector: BTreeSet::new(),
                        disk_selector: BTreeSet::new(),
                        attached_to: None,
                        maintenance: false,
                        volume_id: None,
                        key_secret: None,
                        no_chap: false,
                        data_tls: false,
                        groups: Default::default(),
                        restore: None,
                    };
                    let replicas: Vec<ReplicaSpec> = (1..=count)
                        .map(|i| ReplicaSpec {
                            id: format!("r{i}"),
                            volume: name.clone(),
                            node: format!("n{i}"),
                            disk: "/d".into(),
                        })
                        .collect();
                    specs.create_volume_placed(&spec, &replicas, &[]).unwrap();
                }
                4 | 5 if !volumes.is_empty() => {
                    let v = &volumes[rng.gen_range(0..volumes.len())];
                    let mut spec = v.spec.clone();
                    spec.size += rng.gen_range(1..16u64) << 20;
                    specs.update_volume(&spec, v.revision).unwrap();
                }
                6 | 7 if !volumes.is_empty() => {
                    let v = &volumes[rng.gen_range(0..volumes.len())];
                    let rs = specs.replicas(&v.spec.name).unwrap();
                    if let Some(old) = rs.first() {
                        let node = format!("n{}", rng.gen_range(1..=3));
                        let new = ReplicaSpec {
                            id: format!("x{step}"),
                            volume: v.spec.name.clone(),
                            node: node.clone(),
                            disk: "/d".into(),
                        };
                        let node_rev = specs.node(&node).unwrap().revision;
                        specs.replace_replica(old, &new, v.revision, node_rev).unwrap();
                    }
                }
                8 if !volumes.is_empty() => {
                    let v = &volumes[rng.gen_range(0..volumes.len())];
                    if let Some(old) = specs.replicas(&v.spec.name).unwrap().last() {
                        specs.remove_replica(old, v.revision).unwrap();
                    }
                }
                _ if !volumes.is_empty() => {
                    let v = &volumes[rng.gen_range(0..volumes.len())];
                    specs.delete_volume(&v.spec.name).unwrap();
                }
                _ => {}
            }
            if rng.gen_bool(0.5) {
                if !index.catch_up() {
                    index = ScheduledIndex::build(specs.store()).unwrap();
                    rebuilt += 1;
                }
                let want = from_scratch(&specs);
                for n in 1..=3 {
                    let node = format!("n{n}");
                    assert_eq!(
                        index.scheduled(&node, "/d"),
                        want.get(&(node.clone(), "/d".to_string())).copied().unwrap_or(0),
                        "seed {seed}, step {step}, node {node}"
                    );
                }
            }
        }
        if watch_buffer < 8 {
            assert!(rebuilt > 0, "a small watch buffer makes the index rebuild");
        }
    }

    #[test]
    fn the_index_matches_the_specs_through_creates_expansions_replacements_and_deletes() {
        let seed = std::env::var("HORN_INDEX_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(rand::random::<u32>) as u64;
        println!("scheduled index: seed {seed} (HORN_INDEX_SEED)");
        run(seed, 4096);
        run(seed, 2);
    }
}
