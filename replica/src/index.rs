//! The extent index: for every 4 KiB block of the volume, which layer of the chain
//! holds it (the newest layer that has it), or that none does.
//!
//! Longhorn v1 keeps one byte per 4 KiB block (256 MiB per TiB) and so caps the chain
//! at 255 layers. This index costs memory in proportion to fragmentation instead:
//!
//! - The volume is cut into **chunks** of 256 blocks (1 MiB). A chunk whose blocks all
//!   resolve to the same layer (or to no layer) is one `u32` entry: 4 bytes per MiB,
//!   4 MiB per TiB for data written in aligned extents of 1 MiB or more.
//! - A chunk whose blocks resolve to different layers keeps a **packed block map**: one
//!   value per block, `w` bits wide, where `w` is the bit width of the highest chain
//!   position the index holds. With fewer than 256 layers that is at most one byte per
//!   block; with 10,000 layers 14 bits; never more than 16 bits (2 bytes) per block.
//!   When the chain grows past a power of two every packed map is re-encoded one bit
//!   wider (at most 16 times in a volume's life); one width for all maps means a freed
//!   map's slot can be reused by any chunk.
//! - Entries are grouped 1,024 to a **group** (1 GiB) allocated on first use, so an empty
//!   or sparse volume costs next to nothing.
//!
//! Values are chain positions plus one (`0` = no layer has the block): position 0 is
//! the root, the head has the highest position. The index is never persisted: it is
//! rebuilt from the layer files (SEEK_DATA/SEEK_HOLE and the zero-extent logs) at open.

/// Blocks per chunk (1 MiB of 4 KiB blocks).
pub const CHUNK_BLOCKS: u64 = 256;
/// Chunks per lazily allocated group (1 GiB).
const GROUP_CHUNKS: usize = 1024;
/// Mixed chunks per slab page: pages keep slab growth from doubling memory.
const PAGE_SLOTS: usize = 64;
/// Largest value the index stores (chain position + 1).
pub const MAX_VALUE: u16 = u16::MAX;

const MIXED: u32 = 1 << 31;
const SLOT_MASK: u32 = MIXED - 1;

/// Maps each 4 KiB block to the chain position holding it.
#[derive(Debug)]
pub struct BlockIndex {
    blocks: u64,
    groups: Vec<Option<Box<[u32]>>>,
    /// Bits per value in every packed map.
    width: u32,
    /// The packed maps of the mixed chunks.
    slab: Slab,
}

/// Storage for packed block maps of one bit width.
#[derive(Debug, Default)]
struct Slab {
    pages: Vec<Box<[u64]>>,
    /// Slots handed out so far (the next fresh slot).
    used: u32,
    free: Vec<u32>,
}

/// Words one packed map of width `w` takes: 256 values × w bits / 64.
const fn slot_words(width: u32) -> usize {
    (CHUNK_BLOCKS as usize * width as usize) / 64
}

/// Bits needed to store `v` (at least one).
fn width_of(v: u16) -> u32 {
    (16 - v.leading_zeros()).max(1)
}

impl Slab {
    fn alloc(&mut self, width: u32) -> u32 {
        if let Some(s) = self.free.pop() {
            return s;
        }
        let s = self.used;
        assert!(s <= SLOT_MASK, "index slab exhausted");
        if s as usize % PAGE_SLOTS == 0 {
            self.pages
                .push(vec![0u64; slot_words(width) * PAGE_SLOTS].into_boxed_slice());
        }
        self.used += 1;
        s
    }

    fn words(&mut self, width: u32, slot: u32) -> &mut [u64] {
        let n = slot_words(width);
        let page = &mut self.pages[slot as usize / PAGE_SLOTS];
        let at = (slot as usize % PAGE_SLOTS) * n;
        &mut page[at..at + n]
    }

    fn words_ref(&self, width: u32, slot: u32) -> &[u64] {
        let n = slot_words(width);
        let page = &self.pages[slot as usize / PAGE_SLOTS];
        let at = (slot as usize % PAGE_SLOTS) * n;
        &page[at..at + n]
    }
}

fn packed_get(words: &[u64], width: u32, i: usize) -> u16 {
    let bit = i * width as usize;
    let (w, sh) = (bit / 64, (bit % 64) as u32);
    let mut v = words[w] >> sh;
    if sh + width > 64 {
        v |= words[w + 1] << (64 - sh);
    }
    (v & ((1u64 << width) - 1)) as u16
}

fn packed_set(words: &mut [u64], width: u32, i: usize, value: u16) {
    let mask = (1u64 << width) - 1;
    let v = value as u64 & mask;
    let bit = i * width as usize;
    let (w, sh) = (bit / 64, (bit % 64) as u32);
    words[w] = (words[w] & !(mask << sh)) | (v << sh);
    if sh + width > 64 {
        let spill = sh + width - 64;
        let hi_mask = (1u64 << spill) - 1;
        words[w + 1] = (words[w + 1] & !hi_mask) | (v >> (64 - sh));
    }
}

impl BlockIndex {
    /// An empty index for a volume of `volume_bytes` (a multiple of 4 KiB).
    pub fn new(volume_bytes: u64) -> Self {
        let mut idx = BlockIndex {
            blocks: 0,
            groups: Vec::new(),
            width: 1,
            slab: Slab::default(),
        };
        idx.grow(volume_bytes);
        idx
    }

    /// Number of 4 KiB blocks covered.
    pub fn blocks(&self) -> u64 {
        self.blocks
    }

    /// Extends the index to a larger volume; new blocks belong to no layer.
    pub fn grow(&mut self, volume_bytes: u64) {
        let blocks = volume_bytes / crate::meta::BLOCK_SIZE;
        debug_assert!(blocks >= self.blocks);
        self.blocks = blocks;
        let chunks = blocks.div_ceil(CHUNK_BLOCKS) as usize;
        self.groups.resize_with(chunks.div_ceil(GROUP_CHUNKS), || None);
    }

    fn entry(&self, chunk: u64) -> u32 {
        let (g, i) = (chunk as usize / GROUP_CHUNKS, chunk as usize % GROUP_CHUNKS);
        self.groups[g].as_ref().map_or(0, |grp| grp[i])
    }

    fn entry_mut(&mut self, chunk: u64) -> &mut u32 {
        let (g, i) = (chunk as usize / GROUP_CHUNKS, chunk as usize % GROUP_CHUNKS);
        let grp = self.groups[g].get_or_insert_with(|| vec![0u32; GROUP_CHUNKS].into_boxed_slice());
        &mut grp[i]
    }

    /// The value of one block: chain position + 1, or 0 for "no layer".
    pub fn get(&self, block: u64) -> u16 {
        let e = self.entry(block / CHUNK_BLOCKS);
        if e & MIXED == 0 {
            return e as u16;
        }
        let w = self.width;
        packed_get(
            self.slab.words_ref(w, e & SLOT_MASK),
            w,
            (block % CHUNK_BLOCKS) as usize,
        )
    }

    /// Sets blocks `start .. start + count` to `value`.
    pub fn set_range(&mut self, start: u64, count: u64, value: u16) {
        debug_assert!(start + count <= self.blocks, "{start}+{count} > {}", self.blocks);
        let end = start + count;
        let mut b = start;
        while b < end {
            let chunk = b / CHUNK_BLOCKS;
            let lo = b % CHUNK_BLOCKS;
            let hi = (end - chunk * CHUNK_BLOCKS).min(CHUNK_BLOCKS);
            self.set_in_chunk(chunk, lo as usize, hi as usize, value);
            b = chunk * CHUNK_BLOCKS + hi;
        }
    }

    fn set_in_chunk(&mut self, chunk: u64, lo: usize, hi: usize, value: u16) {
        let e = self.entry(chunk);
        if lo == 0 && hi == CHUNK_BLOCKS as usize {
            if e & MIXED != 0 {
                self.slab.free.push(e & SLOT_MASK);
            }
            *self.entry_mut(chunk) = value as u32;
            return;
        }
        if e & MIXED == 0 && e == value as u32 {
            return;
        }
        // The packed map must hold the new value and, where a uniform chunk turns
        // mixed, the value its other blocks keep: a uniform entry was never checked
        // against the width when it was set whole.
        let need = if e & MIXED == 0 {
            width_of(value).max(width_of(e as u16))
        } else {
            width_of(value)
        };
        let e = if need > self.width {
            self.widen(need);
            self.entry(chunk) // the chunk's map moved
        } else {
            e
        };
        let w = self.width;
        let slot = if e & MIXED == 0 {
            // A uniform (or empty) chunk turning mixed: fill a new map with the old value.
            let slot = self.slab.alloc(w);
            let words = self.slab.words(w, slot);
            for i in 0..CHUNK_BLOCKS as usize {
                packed_set(words, w, i, e as u16);
            }
            slot
        } else {
            e & SLOT_MASK
        };
        let words = self.slab.words(w, slot);
        for i in lo..hi {
            packed_set(words, w, i, value);
        }
        *self.entry_mut(chunk) = MIXED | slot;
    }

    /// Re-encodes every packed map `width` bits wide.
    fn widen(&mut self, width: u32) {
        let old_w = self.width;
        let mut old = std::mem::take(&mut self.slab);
        for grp in self.groups.iter_mut().flatten() {
            for e in grp.iter_mut().filter(|e| **e & MIXED != 0) {
                let src = old.words(old_w, *e & SLOT_MASK);
                let mut vals = [0u16; CHUNK_BLOCKS as usize];
                for (i, v) in vals.iter_mut().enumerate() {
                    *v = packed_get(src, old_w, i);
                }
                let slot = self.slab.alloc(width);
                let dst = self.slab.words(width, slot);
                for (i, v) in vals.iter().enumerate() {
                    packed_set(dst, width, i, *v);
                }
                *e = MIXED | slot;
            }
        }
        self.width = width;
    }

    /// Calls `f(start, count, value)` for each maximal run of equal values within
    /// blocks `start .. start + count`, in order.
    pub fn runs(&self, start: u64, count: u64, mut f: impl FnMut(u64, u64, u16)) {
        let end = start + count;
        let mut run: Option<(u64, u64, u16)> = None;
        let mut push = |b: u64, n: u64, v: u16| match &mut run {
            Some((rs, rn, rv)) if *rv == v && *rs + *rn == b => *rn += n,
            _ => {
                if let Some((rs, rn, rv)) = run.replace((b, n, v)) {
                    f(rs, rn, rv);
                }
            }
        };
        let mut b = start;
        while b < end {
            let chunk = b / CHUNK_BLOCKS;
            let base = chunk * CHUNK_BLOCKS;
            let hi = (end - base).min(CHUNK_BLOCKS);
            let e = self.entry(chunk);
            if e & MIXED == 0 {
                push(b, base + hi - b, e as u16);
            } else {
                let w = self.width;
                let words = self.slab.words_ref(w, e & SLOT_MASK);
                for i in (b - base)..hi {
                    push(base + i, 1, packed_get(words, w, i as usize));
                }
            }
            b = base + hi;
        }
        if let Some((rs, rn, rv)) = run {
            f(rs, rn, rv);
        }
    }

    /// Heap memory the index holds, in bytes.
    pub fn heap_bytes(&self) -> usize {
        let groups = self.groups.capacity() * std::mem::size_of::<Option<Box<[u32]>>>()
            + self.groups.iter().flatten().map(|g| g.len() * 4).sum::<usize>();
        let s = &self.slab;
        let slab = s.pages.capacity() * std::mem::size_of::<Box<[u64]>>()
            + s.pages.iter().map(|p| p.len() * 8).sum::<usize>()
            + s.free.capacity() * 4;
        groups + slab
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn packed_values_straddling_words_round_trip() {
        for w in 1..=16u32 {
            let mut words = vec![0u64; slot_words(w)];
            let max = ((1u32 << w) - 1) as u16;
            for i in 0..CHUNK_BLOCKS as usize {
                packed_set(&mut words, w, i, (i as u16).wrapping_mul(7919) & max);
            }
            for i in 0..CHUNK_BLOCKS as usize {
                assert_eq!(
                    packed_get(&words, w, i),
                    (i as u16).wrapping_mul(7919) & max,
                    "w={w} i={i}"
                );
            }
        }
    }

    #[test]
    fn aligned_megabyte_extents_cost_about_four_bytes_each() {
        let gib = 1u64 << 30;
        let mut idx = BlockIndex::new(16 * gib);
        for c in 0..idx.blocks() / CHUNK_BLOCKS {
            idx.set_range(c * CHUNK_BLOCKS, CHUNK_BLOCKS, (c % 9000 + 1) as u16);
        }
        // 16 Ki chunks × 4 bytes, plus the group table.
        assert!(idx.heap_bytes() < 16 * 1024 * 4 + 4096, "{}", idx.heap_bytes());
    }

    #[test]
    fn worst_case_stays_under_two_bytes_per_block() {
        let mut idx = BlockIndex::new(256 << 20);
        let mut x = 1u32;
        for b in 0..idx.blocks() {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
            idx.set_range(b, 1, (x >> 8) as u16 % 10_000 + 1);
        }
        let per_block = idx.heap_bytes() as f64 / idx.blocks() as f64;
        assert!(per_block <= 2.0, "{per_block}");
    }

    #[test]
    fn a_whole_chunk_set_high_keeps_its_value_when_a_lower_value_splits_it() {
        // Found by the property below: whole chunks never widen the packed maps, so a
        // chunk set whole to 1024 and then split by a 0 must widen for the 1024.
        let mut idx = BlockIndex::new(2000 * 4096);
        idx.set_range(768, 512, 1024);
        idx.set_range(421, 348, 0);
        assert_eq!(idx.get(768), 0);
        for b in 769..1280 {
            assert_eq!(idx.get(b), 1024, "block {b}");
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]
        #[test]
        fn index_matches_a_plain_array(ops in prop::collection::vec((0u64..2000, 1u64..700, 0u16..3000), 1..60)) {
            let blocks = 2000u64;
            let mut idx = BlockIndex::new(blocks * 4096);
            let mut model = vec![0u16; blocks as usize];
            for (start, len, v) in ops {
                let len = len.min(blocks - start);
                idx.set_range(start, len, v);
                model[start as usize..(start + len) as usize].fill(v);
            }
            for b in 0..blocks {
                prop_assert_eq!(idx.get(b), model[b as usize]);
            }
            let mut rebuilt = Vec::new();
            idx.runs(0, blocks, |s, n, v| {
                assert_eq!(s as usize, rebuilt.len());
                rebuilt.extend(std::iter::repeat_n(v, n as usize));
            });
            prop_assert_eq!(rebuilt, model);
        }
    }
}
