//! The iSCSI PDU parser (`horn_iscsi::pdu`): framing and digests.
//!
//! Feeds: the first byte picks the digests (bit 0 header, bit 1 data) and the largest
//! data segment taken (bits 2-3: 256 KiB as Horn declares, 8 KiB as before
//! negotiation, 512 bytes, or 0); the rest is a byte stream of PDUs, parsed with
//! `pdu::parse` until it fails or runs out.
//!
//! Checks, for every PDU found:
//! - it lies within the buffer, its data segment within it and as long as the header
//!   says, and not over the limit;
//! - without additional header segments and with zero padding, `pdu::encode` of its
//!   header and data gives back exactly its bytes (digests included);
//! - no prefix of it parses as a whole PDU: a PDU cut short waits for more;
//! - digest errors come only with digests on, and a too-long error only over the limit.

#![no_main]

use horn_iscsi::pdu::{self, Digests, PduError, BHS_LEN};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, mut rest)) = data.split_first() else {
        return;
    };
    let digests = Digests {
        header: mode & 1 != 0,
        data: mode & 2 != 0,
    };
    let max = [262_144, 8192, 512, 0][(mode as usize >> 2) & 3];
    loop {
        match pdu::parse(rest, digests, max) {
            Ok(Some(f)) => {
                assert!(f.len <= rest.len() && f.len >= BHS_LEN, "{f:?}");
                assert!(f.data.start <= f.data.end && f.data.end <= f.len, "{f:?}");
                assert_eq!(f.data.len(), f.bhs.data_len());
                assert!(f.data.len() <= max);
                assert_eq!(&f.bhs.0[..], &rest[..BHS_LEN]);
                let padding = &rest[f.data.end..f.data.end + pdu::pad(f.data.len())];
                if f.bhs.ahs_len() == 0 && padding.iter().all(|&b| b == 0) {
                    let mut again = Vec::new();
                    pdu::encode(&mut again, &f.bhs, &rest[f.data.clone()], digests);
                    assert_eq!(again, &rest[..f.len], "{f:?} re-encodes to other bytes");
                }
                for cut in [BHS_LEN - 1, f.len - 1, f.len / 2] {
                    if cut < f.len {
                        assert_eq!(pdu::parse(&rest[..cut], digests, max), Ok(None), "cut at {cut}");
                    }
                }
                rest = &rest[f.len..];
            }
            Ok(None) => break,
            Err(PduError::TooLong { len, max: m, .. }) => {
                assert!(len > m && m == max);
                break;
            }
            Err(PduError::HeaderDigest { .. } | PduError::DataDigest { .. }) => {
                assert!(digests.header || digests.data, "a digest error without digests");
                break;
            }
        }
    }
});
