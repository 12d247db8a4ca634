//! The format of a backup target, version 1 (docs/backup-format.md): blocks named by
//! the SHA-256 of their content, each compressed on its own, and one manifest per
//! backup listing every block of the volume image.
//!
//! Everything read from a target is checked here before it is used: a block's
//! header, its length against the manifest's block size, its content against its
//! name; a manifest's version, names and block count. A target written by a newer
//! Horn is refused with both versions named, never half read.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use sha2::Digest;

/// The format this code writes, and the newest it reads.
pub const FORMAT: u32 = 1;
/// A volume's block size unless chosen otherwise.
pub const DEFAULT_BLOCK_SIZE: u32 = 2 << 20;
/// The smallest block size a volume may choose.
pub const MIN_BLOCK_SIZE: u32 = 64 << 10;
/// The largest block size a volume may choose.
pub const MAX_BLOCK_SIZE: u32 = 64 << 20;

/// A block object's first bytes.
const MAGIC: &[u8; 4] = b"HBK1";
/// A block object's header: magic, codec, three bytes reserved (zero), the
/// uncompressed length (little-endian u32).
const HEADER: usize = 12;

/// What went wrong reading or checking something of a target.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FormatError {
    /// Written by a newer Horn: this one does not read it.
    #[error("{what} is of backup format {found}, and this Horn reads formats up to {supported}: upgrade Horn to read it")]
    NewerFormat {
        /// What was read.
        what: String,
        /// Its format.
        found: u32,
        /// The newest this code reads.
        supported: u32,
    },
    /// Not what the format says.
    #[error("{0}")]
    Malformed(String),
    /// A block whose content does not match its name, or does not decode.
    #[error("block {block} is corrupt: {why}")]
    Corrupt {
        /// The block's name.
        block: String,
        /// What is wrong with it.
        why: String,
    },
}

/// How a block is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    /// Stored as it is.
    None,
    /// LZ4 (block format, with the length in the header): the default, fast.
    #[default]
    Lz4,
    /// Zstandard at level 3: smaller, more CPU.
    Zstd,
}

impl Compression {
    fn code(self) -> u8 {
        match self {
            Compression::None => 0,
            Compression::Lz4 => 1,
            Compression::Zstd => 2,
        }
    }

    fn from_code(code: u8) -> Option<Compression> {
        match code {
            0 => Some(Compression::None),
            1 => Some(Compression::Lz4),
            2 => Some(Compression::Zstd),
            _ => None,
        }
    }
}

impl std::str::FromStr for Compression {
    type Err = String;

    fn from_str(s: &str) -> Result<Compression, String> {
        match s {
            "none" => Ok(Compression::None),
            "lz4" => Ok(Compression::Lz4),
            "zstd" => Ok(Compression::Zstd),
            _ => Err(format!("{s:?} is not a compression: lz4, zstd or none")),
        }
    }
}

impl std::fmt::Display for Compression {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Compression::None => "none",
            Compression::Lz4 => "lz4",
            Compression::Zstd => "zstd",
        })
    }
}

/// A block's name: the SHA-256 of its uncompressed content. Equal content has one
/// name, so a block is stored once however many backups and volumes hold it.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlockId([u8; 32]);

impl BlockId {
    /// The name of `data`.
    pub fn of(data: &[u8]) -> BlockId {
        BlockId(sha2::Sha256::digest(data).into())
    }

    /// 64 hex digits.
    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// From 64 hex digits (lower case, as written).
    pub fn from_hex(s: &str) -> Result<BlockId, FormatError> {
        let bad = || FormatError::Malformed(format!("{s:?} is not a block name (64 lower-case hex digits)"));
        if s.len() != 64 || !s.bytes().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f')) {
            return Err(bad());
        }
        let mut id = [0u8; 32];
        for (i, b) in id.iter_mut().enumerate() {
            *b = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
        }
        Ok(BlockId(id))
    }

    /// Where the block is kept in a target: `blocks/AB/NAME`, 256 prefixes so that a
    /// sweep lists a bounded part of the blocks at a time.
    pub fn key(&self) -> String {
        let hex = self.to_hex();
        format!("blocks/{}/{hex}", &hex[..2])
    }
}

impl std::fmt::Debug for BlockId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "BlockId({})", &self.to_hex()[..16])
    }
}

impl std::fmt::Display for BlockId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl Serialize for BlockId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_hex())
    }
}

impl<'de> Deserialize<'de> for BlockId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<BlockId, D::Error> {
        let s = String::deserialize(d)?;
        BlockId::from_hex(&s).map_err(serde::de::Error::custom)
    }
}

/// The object that stores `data` compressed with `compression` (stored as it is
/// where compressing does not make it smaller).
pub fn encode_block(data: &[u8], compression: Compression) -> Vec<u8> {
    let len = u32::try_from(data.len()).expect("a block is smaller than 4 GiB");
    let packed = match compression {
        Compression::None => None,
        Compression::Lz4 => Some(lz4_flex::block::compress(data)),
        Compression::Zstd => zstd::bulk::compress(data, 3).ok(),
    };
    let (codec, body) = match &packed {
        Some(p) if p.len() < data.len() => (compression, p.as_slice()),
        _ => (Compression::None, data),
    };
    let mut out = Vec::with_capacity(HEADER + body.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&[codec.code(), 0, 0, 0]);
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(body);
    out
}

/// The content of block `id` from its object `obj`, at most `max_len` bytes (the
/// manifest's block size): checked against its name.
pub fn decode_block(obj: &[u8], id: &BlockId, max_len: u32) -> Result<Vec<u8>, FormatError> {
    let mut out = vec![0u8; block_len_of(obj, id, max_len)? as usize];
    decode_block_into(obj, id, &mut out)?;
    Ok(out)
}

/// The content length block object `obj` declares in its header, checked to be at
/// most `max_len` (the manifest's block size).
pub fn block_len_of(obj: &[u8], id: &BlockId, max_len: u32) -> Result<u32, FormatError> {
    let (_, len) = block_header(obj, id)?;
    if len > max_len {
        return Err(corrupt(
            id,
            format!("it says it holds {len} bytes, more than the {max_len}-byte block size"),
        ));
    }
    Ok(len)
}

fn corrupt(id: &BlockId, why: String) -> FormatError {
    FormatError::Corrupt {
        block: id.to_hex(),
        why,
    }
}

/// The codec and content length in block object `obj`'s header.
fn block_header(obj: &[u8], id: &BlockId) -> Result<(Compression, u32), FormatError> {
    if obj.len() < HEADER || &obj[..4] != MAGIC {
        return Err(corrupt(id, "it does not start with a block header".into()));
    }
    let codec = Compression::from_code(obj[4])
        .ok_or_else(|| corrupt(id, format!("its compression code {} is unknown", obj[4])))?;
    if obj[5..8] != [0, 0, 0] {
        return Err(corrupt(id, "its reserved header bytes are not zero".into()));
    }
    Ok((
        codec,
        u32::from_le_bytes(obj[8..12].try_into().expect("four bytes")),
    ))
}

/// Decodes block `id` from its object `obj` into `out`, which must be exactly as
/// long as the content its header declares: a restore decodes straight into the
/// buffer it writes from. Checked against its name.
pub fn decode_block_into(obj: &[u8], id: &BlockId, out: &mut [u8]) -> Result<(), FormatError> {
    let corrupt = |why: String| corrupt(id, why);
    let (codec, len) = block_header(obj, id)?;
    if len as usize != out.len() {
        return Err(corrupt(format!(
            "it says it holds {len} bytes where {} belong",
            out.len()
        )));
    }
    let body = &obj[HEADER..];
    // Each codec writes at most `out.len()` bytes, whatever its input says.
    let got = match codec {
        Compression::None => {
            if body.len() == out.len() {
                out.copy_from_slice(body);
            }
            body.len()
        }
        Compression::Lz4 => lz4_flex::block::decompress_into(body, out)
            .map_err(|e| corrupt(format!("it does not decompress (lz4): {e}")))?,
        Compression::Zstd => zstd::bulk::decompress_to_buffer(body, out)
            .map_err(|e| corrupt(format!("it does not decompress (zstd): {e}")))?,
    };
    if got != out.len() {
        return Err(corrupt(format!(
            "it holds {got} bytes, and its header says {len}"
        )));
    }
    if BlockId::of(out) != *id {
        return Err(corrupt("its content does not match its name (SHA-256)".into()));
    }
    Ok(())
}

/// Checks a volume's or a backup's name: 1-63 of `A-Z a-z 0-9 . _ -`, not starting
/// with a dot (it becomes part of an object's key).
pub fn check_name(what: &str, name: &str) -> Result<(), FormatError> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(FormatError::Malformed(format!(
            "{what} name {name:?} must be 1-63 of A-Z a-z 0-9 . _ - (not starting with a dot)"
        )))
    }
}

/// Checks a block size: a power of two from [`MIN_BLOCK_SIZE`] to [`MAX_BLOCK_SIZE`].
pub fn check_block_size(size: u32) -> Result<(), FormatError> {
    if size.is_power_of_two() && (MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&size) {
        Ok(())
    } else {
        Err(FormatError::Malformed(format!(
            "a block size of {size} bytes is not a power of two from {} KiB to {} MiB",
            MIN_BLOCK_SIZE >> 10,
            MAX_BLOCK_SIZE >> 20
        )))
    }
}

/// One backup: every block of the volume image as of a snapshot, in order. Any one
/// manifest restores on its own; an incremental backup differs from a full one only
/// in which blocks were read and sent to make it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// [`FORMAT`] when written.
    pub format: u32,
    /// The volume's name.
    pub volume: String,
    /// The backup's name (unique within the volume).
    pub name: String,
    /// The snapshot it holds.
    pub snapshot: String,
    /// When it was finished, Unix seconds.
    pub created_unix: u64,
    /// The volume's size in bytes.
    pub size: u64,
    /// Bytes per block (the last block may be shorter).
    pub block_size: u32,
    /// How its new blocks were compressed.
    pub compression: Compression,
    /// The backup it was made incrementally from, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    /// Each block's name in volume order; `None`: all zeros (not stored).
    pub blocks: Vec<Option<BlockId>>,
    /// Labels given at the backup.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

/// Just the version, read before the rest.
#[derive(Deserialize)]
struct Versioned {
    format: u32,
}

impl Manifest {
    /// Where backup `name` of `volume` is kept: `volumes/VOLUME/backups/NAME.json`.
    pub fn key(volume: &str, name: &str) -> String {
        format!("{}{name}.json", Manifest::prefix(volume))
    }

    /// Where the backups of `volume` are kept (a listing of one volume's backups
    /// lists nothing else).
    pub fn prefix(volume: &str) -> String {
        format!("volumes/{volume}/backups/")
    }

    /// How many blocks a volume of `size` bytes has at `block_size`.
    pub fn block_count(size: u64, block_size: u32) -> u64 {
        size.div_ceil(u64::from(block_size))
    }

    /// The manifest as written.
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a manifest serializes")
    }

    /// A manifest read from a target, checked: its format (a newer one is refused),
    /// names, block size and block count.
    pub fn from_bytes(what: &str, bytes: &[u8]) -> Result<Manifest, FormatError> {
        let malformed =
            |e: serde_json::Error| FormatError::Malformed(format!("{what} is not a manifest: {e}"));
        let v: Versioned = serde_json::from_slice(bytes).map_err(malformed)?;
        if v.format > FORMAT {
            return Err(FormatError::NewerFormat {
                what: what.to_string(),
                found: v.format,
                supported: FORMAT,
            });
        }
        let m: Manifest = serde_json::from_slice(bytes).map_err(malformed)?;
        check_name("volume", &m.volume)?;
        check_name("backup", &m.name)?;
        check_block_size(m.block_size)?;
        let want = Manifest::block_count(m.size, m.block_size);
        if m.blocks.len() as u64 != want {
            return Err(FormatError::Malformed(format!(
                "{what} lists {} blocks, and a volume of {} bytes in {}-byte blocks has {want}",
                m.blocks.len(),
                m.size,
                m.block_size
            )));
        }
        Ok(m)
    }

    /// The length of block `index` (the last may be shorter).
    pub fn block_len(&self, index: u64) -> u32 {
        let start = index * u64::from(self.block_size);
        (self.size - start).min(u64::from(self.block_size)) as u32
    }

    /// The blocks it references.
    pub fn referenced(&self) -> BTreeSet<BlockId> {
        self.blocks.iter().flatten().copied().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(n: usize) -> Vec<u8> {
        (0..n).map(|i| ((i / 7) as u8).wrapping_mul(13)).collect()
    }

    #[test]
    fn blocks_round_trip_in_every_codec_and_corruption_is_named() {
        let data = sample(DEFAULT_BLOCK_SIZE as usize);
        let id = BlockId::of(&data);
        for c in [Compression::None, Compression::Lz4, Compression::Zstd] {
            let obj = encode_block(&data, c);
            if c != Compression::None {
                assert!(obj.len() < data.len() / 2, "{c}: {} bytes", obj.len());
            }
            assert_eq!(decode_block(&obj, &id, DEFAULT_BLOCK_SIZE).unwrap(), data);
            // A flipped byte anywhere in the body: refused, naming the block.
            let mut bad = obj.clone();
            let at = HEADER + (bad.len() - HEADER) / 2;
            bad[at] ^= 0x40;
            let e = decode_block(&bad, &id, DEFAULT_BLOCK_SIZE).unwrap_err();
            assert!(matches!(e, FormatError::Corrupt { .. }), "{c}: {e}");
            assert!(e.to_string().contains(&id.to_hex()), "{e}");
        }
        // Incompressible data is stored as it is.
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let noise: Vec<u8> = (0..4096)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect();
        let obj = encode_block(&noise, Compression::Lz4);
        assert_eq!(obj[4], 0);
        assert_eq!(decode_block(&obj, &BlockId::of(&noise), 4096).unwrap(), noise);
        // A header claiming more than the block size, or truncated, is refused.
        assert!(decode_block(&obj, &BlockId::of(&noise), 1024).is_err());
        assert!(decode_block(&obj[..6], &BlockId::of(&noise), 4096).is_err());
        // Another block's object under this name.
        let e = decode_block(&obj, &id, DEFAULT_BLOCK_SIZE).unwrap_err();
        assert!(e.to_string().contains("does not match its name"), "{e}");
    }

    #[test]
    fn block_names_are_hex_and_keyed_by_prefix() {
        let id = BlockId::of(b"horn");
        let hex = id.to_hex();
        assert_eq!(BlockId::from_hex(&hex).unwrap(), id);
        assert_eq!(id.key(), format!("blocks/{}/{hex}", &hex[..2]));
        assert!(BlockId::from_hex("00").is_err());
        assert!(BlockId::from_hex(&hex.to_uppercase()).is_err());
        assert!(BlockId::from_hex(&format!("../{}", &hex[3..])).is_err());
    }

    fn manifest() -> Manifest {
        let a = BlockId::of(b"a");
        Manifest {
            format: FORMAT,
            volume: "v1".into(),
            name: "b1".into(),
            snapshot: "s1".into(),
            created_unix: 1,
            size: 5 << 20,
            block_size: DEFAULT_BLOCK_SIZE,
            compression: Compression::Lz4,
            parent: None,
            blocks: vec![Some(a), None, Some(a)],
            labels: BTreeMap::new(),
        }
    }

    #[test]
    fn manifests_are_checked_and_a_newer_format_is_refused_by_name() {
        let m = manifest();
        let back = Manifest::from_bytes("b1", &m.to_bytes()).unwrap();
        assert_eq!(back, m);
        assert_eq!(back.block_len(2), 1 << 20);
        assert_eq!(back.referenced().len(), 1);
        assert_eq!(Manifest::key("v1", "b1"), "volumes/v1/backups/b1.json");

        let mut newer = serde_json::to_value(&m).unwrap();
        newer["format"] = 2.into();
        newer["something_new"] = "x".into();
        let e = Manifest::from_bytes("backup b1", &serde_json::to_vec(&newer).unwrap()).unwrap_err();
        assert_eq!(
            e.to_string(),
            "backup b1 is of backup format 2, and this Horn reads formats up to 1: upgrade Horn to read it"
        );

        let mut short = m.clone();
        short.blocks.pop();
        let e = Manifest::from_bytes("b1", &short.to_bytes()).unwrap_err();
        assert!(e.to_string().contains("lists 2 blocks"), "{e}");
        let mut escape = m.clone();
        escape.volume = "../x".into();
        assert!(Manifest::from_bytes("b1", &escape.to_bytes()).is_err());
        let mut odd = m;
        odd.block_size = 3 << 20;
        assert!(Manifest::from_bytes("b1", &odd.to_bytes()).is_err());
        assert!(Manifest::from_bytes("b1", b"{\"format\": 1}").is_err());
        assert!(Manifest::from_bytes("b1", b"not json").is_err());
    }
}
