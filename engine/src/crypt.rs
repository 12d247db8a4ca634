//! Encrypted volumes: AES-256-XTS on each logical block, in the engine.
//!
//! A write is encrypted once, before it leaves for the replicas, and a read is
//! decrypted as it completes, so replicas, rebuild streams, snapshots and backups only
//! ever hold ciphertext, and the key never leaves the engine's process. The data unit
//! is the volume's sector (512 or 4096 bytes) and its tweak the sector's number (IEEE
//! 1619: little-endian), so a sector encrypts the same wherever it travels and a
//! replica needs nothing to rebuild another.
//!
//! **A sector stored as all zeros reads as zeros.** A replica returns zeros where
//! nothing was written and after a discard or a write of zeroes (which go to the
//! replicas as such): the plaintext of those is zeros, not the decryption of zeros.
//! AES-XTS ciphertext is all zeros with probability 2^-4096 per sector. What it tells
//! a reader of a replica's files is which sectors were never written or were zeroed,
//! as a sparse file already does.
//!
//! The key is 64 bytes (two AES-256 keys), given to the engine in a file
//! ([`VolumeCipher::from_key_file`]). A **check value** (the encryption of a zero
//! block at a tweak no sector uses) goes into the volume's membership record at its
//! first start, so an engine started with another key, or with none, on an encrypted
//! volume is refused before it serves a byte.

use aes::cipher::{BlockCipherDecrypt, BlockCipherEncrypt, KeyInit};
use aes::{Aes256, Block};

/// The check value's prefix: the mode, for the record and for people.
const MODE: &str = "aes-256-xts";

/// The key in `path`: 64 raw bytes, or 128 hex digits (a final newline allowed);
/// anything else is returned as it is, for [`VolumeCipher::from_key`] to refuse.
pub fn read_key(path: &std::path::Path) -> Result<Vec<u8>, String> {
    let bytes =
        std::fs::read(path).map_err(|e| format!("cannot read the volume key {}: {e}", path.display()))?;
    let text = std::str::from_utf8(&bytes).ok().map(str::trim);
    Ok(match text {
        Some(t) if t.len() == 128 && t.bytes().all(|b| b.is_ascii_hexdigit()) => (0..64)
            .map(|i| u8::from_str_radix(&t[2 * i..2 * i + 2], 16).expect("hex digits"))
            .collect(),
        _ => bytes,
    })
}

/// Blocks encrypted in one call: enough for AES-NI to pipeline, small enough for the
/// stack.
const BATCH: usize = 256;

/// A volume's key, ready to encrypt and decrypt its sectors.
///
/// XTS is written here over RustCrypto's AES rather than taken from `xts-mode`: that
/// crate encrypts one block per call, and the batched calls below (AES-NI pipelines
/// them) cut the cost of a 4 KiB I/O several times over (docs/benchmarks.md). The
/// tests check it against `xts-mode` and the IEEE 1619 vectors.
pub struct VolumeCipher {
    /// Encrypts the data (the first half of the key).
    data: Aes256,
    /// Encrypts the tweaks (the second half).
    tweak: Aes256,
    check: String,
}

/// Multiplies a tweak by x in GF(2^128), little-endian (IEEE 1619).
fn next_tweak(t: u128) -> u128 {
    (t << 1) ^ if t >> 127 == 1 { 0x87 } else { 0 }
}

impl VolumeCipher {
    /// XTS on the data units (`unit` bytes each, a whole number of blocks, at most
    /// `BATCH` blocks) of `buf`, the first numbered `first`; encrypting or decrypting.
    /// Units that `skip` names are left alone. Units go through AES in batches: their
    /// tweaks in one call, then all their blocks in one (AES-NI pipelines them).
    fn area(&self, buf: &mut [u8], unit: usize, first: u64, encrypt: bool, skip: impl Fn(&[u8]) -> bool) {
        let per_unit = unit / 16;
        let units_per_batch = (BATCH / per_unit).max(1);
        let mut blocks = [Block::default(); BATCH];
        let mut tweaks = [0u128; BATCH];
        let mut firsts = [Block::default(); BATCH];
        let mut picked = [0usize; BATCH];
        let total = buf.len() / unit;
        let mut next = 0;
        while next < total {
            // The next units to do (skipping those `skip` names).
            let mut n = 0;
            while n < units_per_batch && next < total {
                if !skip(&buf[next * unit..(next + 1) * unit]) {
                    picked[n] = next;
                    firsts[n] = Block::from(((first + next as u64) as u128).to_le_bytes());
                    n += 1;
                }
                next += 1;
            }
            if n == 0 {
                continue;
            }
            self.tweak.encrypt_blocks(&mut firsts[..n]);
            let mut k = 0;
            for (j, &u) in picked[..n].iter().enumerate() {
                let mut t = u128::from_le_bytes(firsts[j].into());
                for b in buf[u * unit..(u + 1) * unit].chunks_exact(16) {
                    tweaks[k] = t;
                    blocks[k] =
                        Block::from((u128::from_le_bytes(b.try_into().expect("16 bytes")) ^ t).to_le_bytes());
                    t = next_tweak(t);
                    k += 1;
                }
            }
            if encrypt {
                self.data.encrypt_blocks(&mut blocks[..k]);
            } else {
                self.data.decrypt_blocks(&mut blocks[..k]);
            }
            let mut k = 0;
            for &u in &picked[..n] {
                for b in buf[u * unit..(u + 1) * unit].chunks_exact_mut(16) {
                    b.copy_from_slice(&(u128::from_le_bytes(blocks[k].into()) ^ tweaks[k]).to_le_bytes());
                    k += 1;
                }
            }
        }
    }
}

impl std::fmt::Debug for VolumeCipher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("VolumeCipher")
            .field("check", &self.check)
            .finish_non_exhaustive()
    }
}

impl VolumeCipher {
    /// The cipher of the 64-byte `key` (two AES-256 keys, which must differ).
    pub fn from_key(key: &[u8]) -> Result<VolumeCipher, String> {
        if key.len() != 64 {
            return Err(format!(
                "a volume key is 64 bytes (AES-256-XTS: two 32-byte keys), not {}",
                key.len()
            ));
        }
        let (k1, k2) = key.split_at(32);
        if k1 == k2 {
            return Err("the two halves of a volume key must differ (IEEE 1619)".into());
        }
        let cipher = |k: &[u8]| Aes256::new_from_slice(k).map_err(|e| format!("a bad AES-256 key: {e}"));
        let mut c = VolumeCipher {
            data: cipher(k1)?,
            tweak: cipher(k2)?,
            check: String::new(),
        };
        // A tweak no sector gets: the last unit number a 64-bit offset cannot reach.
        let mut block = [0u8; 16];
        c.area(&mut block, 16, u64::MAX, true, |_| false);
        let hex: String = block[..8].iter().map(|b| format!("{b:02x}")).collect();
        c.check = format!("{MODE}:{hex}");
        Ok(c)
    }

    /// The cipher of the key in `path` ([`read_key`]).
    pub fn from_key_file(path: &std::path::Path) -> Result<VolumeCipher, String> {
        VolumeCipher::from_key(&read_key(path)?)
            .map_err(|e| format!("the volume key {}: {e}", path.display()))
    }

    /// What the membership record keeps to know the key again (never the key).
    pub fn check_value(&self) -> &str {
        &self.check
    }

    /// Encrypts `buf`, the sectors from byte `offset` on, in place. `offset` and the
    /// length are multiples of `sector`.
    pub fn encrypt(&self, offset: u64, sector: usize, buf: &mut [u8]) {
        debug_assert!(offset % sector as u64 == 0 && buf.len() % sector == 0);
        self.area(buf, sector, offset / sector as u64, true, |_| false);
    }

    /// Decrypts `buf` in place, as [`VolumeCipher::encrypt`] encrypted it; a sector
    /// stored as all zeros stays zeros (see the module's documentation).
    pub fn decrypt(&self, offset: u64, sector: usize, buf: &mut [u8]) {
        debug_assert!(offset % sector as u64 == 0 && buf.len() % sector == 0);
        self.area(buf, sector, offset / sector as u64, false, |u| {
            u.iter().all(|&b| b == 0)
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> Vec<u8> {
        (0..64u8).map(|i| i.wrapping_mul(37).wrapping_add(11)).collect()
    }

    #[test]
    fn sectors_round_trip_and_differ_by_position_and_key() {
        let c = VolumeCipher::from_key(&key()).unwrap();
        let plain: Vec<u8> = (0..8192).map(|i| (i % 251) as u8).collect();
        let mut a = plain.clone();
        c.encrypt(4096, 4096, &mut a);
        assert_ne!(a, plain);
        // The same bytes at another sector encrypt differently (the tweak).
        let mut b = plain.clone();
        c.encrypt(8192, 4096, &mut b);
        assert_ne!(a, b);
        let mut back = a.clone();
        c.decrypt(4096, 4096, &mut back);
        assert_eq!(back, plain);
        // 512-byte sectors: each its own unit.
        let mut small = plain.clone();
        c.encrypt(512, 512, &mut small);
        c.decrypt(512, 512, &mut small);
        assert_eq!(small, plain);
        // Another key, another check value and other ciphertext.
        let mut other_key = key();
        other_key[0] ^= 1;
        let d = VolumeCipher::from_key(&other_key).unwrap();
        assert_ne!(d.check_value(), c.check_value());
        let mut e = plain.clone();
        d.encrypt(4096, 4096, &mut e);
        assert_ne!(e, a);
    }

    #[test]
    fn it_is_the_xts_of_ieee_1619_and_of_the_xts_mode_crate() {
        use xts_mode::{get_tweak_default, Xts128};
        // IEEE 1619-2007, vector 10 (AES-256, data unit 0xff, 512 bytes of 00..ff twice).
        let k1 = hex("2718281828459045235360287471352662497757247093699959574966967627");
        let k2 = hex("3141592653589793238462643383279502884197169399375105820974944592");
        let key = [k1.clone(), k2.clone()].concat();
        let c = VolumeCipher::from_key(&key).unwrap();
        let plain: Vec<u8> = (0..512).map(|i| i as u8).collect();
        let mut ours = plain.clone();
        c.area(&mut ours, 512, 0xff, true, |_| false);
        assert_eq!(
            &ours[..32],
            &hex("1c3b3a102f770386e4836c99e370cf9bea00803f5e482357a4ae12d414a3e63b")[..],
            "IEEE 1619 vector 10, its first 32 bytes"
        );
        // And every sector of a larger area as the reference crate does it.
        let reference = Xts128::new(
            Aes256::new_from_slice(&k1).unwrap(),
            Aes256::new_from_slice(&k2).unwrap(),
        );
        let data: Vec<u8> = (0..16384u32).map(|i| (i * 7 % 256) as u8).collect();
        for sector in [512usize, 4096] {
            let mut theirs = data.clone();
            reference.encrypt_area(&mut theirs, sector, 40960 / sector as u128, get_tweak_default);
            let mut ours = data.clone();
            c.encrypt(40960, sector, &mut ours);
            assert_eq!(ours, theirs, "{sector}-byte sectors");
            c.decrypt(40960, sector, &mut ours);
            assert_eq!(ours, data);
        }
    }

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len() / 2)
            .map(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).unwrap())
            .collect()
    }

    #[test]
    fn zero_sectors_read_as_zeros_and_written_zeros_do_not_store_as_zeros() {
        let c = VolumeCipher::from_key(&key()).unwrap();
        let mut stored = vec![0u8; 4096];
        c.decrypt(0, 512, &mut stored);
        assert!(stored.iter().all(|&b| b == 0), "never written: zeros");
        let mut written = vec![0u8; 4096];
        c.encrypt(0, 512, &mut written);
        assert!(written.chunks(512).all(|s| s.iter().any(|&b| b != 0)));
        c.decrypt(0, 512, &mut written);
        assert!(written.iter().all(|&b| b == 0));
    }

    #[test]
    fn bad_keys_are_refused_with_the_reason() {
        assert!(VolumeCipher::from_key(&[1; 32]).unwrap_err().contains("64 bytes"));
        assert!(VolumeCipher::from_key(&[1; 64])
            .unwrap_err()
            .contains("must differ"));
        let dir = tempfile::tempdir().unwrap();
        let hex: String = key().iter().map(|b| format!("{b:02x}")).collect();
        std::fs::write(dir.path().join("k"), format!("{hex}\n")).unwrap();
        let from_hex = VolumeCipher::from_key_file(&dir.path().join("k")).unwrap();
        assert_eq!(
            from_hex.check_value(),
            VolumeCipher::from_key(&key()).unwrap().check_value()
        );
        std::fs::write(dir.path().join("raw"), key()).unwrap();
        assert!(VolumeCipher::from_key_file(&dir.path().join("raw")).is_ok());
        std::fs::write(dir.path().join("short"), "abcd").unwrap();
        let e = VolumeCipher::from_key_file(&dir.path().join("short")).unwrap_err();
        assert!(e.contains("64 bytes") && e.contains("short"), "{e}");
        assert!(format!("{from_hex:?}").contains("aes-256-xts"));
    }
}
