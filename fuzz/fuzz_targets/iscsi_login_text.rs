//! iSCSI login and text negotiation (`horn_iscsi::login`, `horn_iscsi::text`).
//!
//! Feeds: the first byte picks the target's authentication (none, CHAP, mutual CHAP,
//! mutual CHAP for discovery sessions too); the rest is the byte stream an initiator
//! sends on one connection, framed with `pdu::parse` (no digests, as before login
//! ends). Until the login completes or fails, each PDU goes to `Login::step`; after it
//! completes, Text requests go to `text::reply`. CHAP challenges are random, so the
//! fuzzer cannot answer one: a request carrying `CHAP_R=*` has it replaced with the
//! right response to the last challenge (the harness knows the secret). Any other
//! `CHAP_R` is the fuzzer's own guess.
//!
//! Checks:
//! - every response is a Login Response echoing the request's task tag, with text that
//!   parses, without a key twice; a failed login has a non-zero status class, a
//!   continued one status 0;
//! - a login that completes has negotiated values inside what Horn offers and the RFC
//!   allows (bursts, segment lengths, R2Ts, ErrorRecoveryLevel 0, one connection,
//!   data in order), and the session handle it was given;
//! - a login that completes where the target requires CHAP has had the right
//!   response: no way around authentication;
//! - the target's mutual CHAP response is the right one for the initiator's challenge;
//! - text that parses re-encodes to text that parses the same;
//! - a Text reply parses, and SendTargets=All names the target.

#![no_main]

use horn_iscsi::login::{self, Auth, ChapSecret, Login, Outcome, SessionType, TargetInfo};
use horn_iscsi::pdu::{self, op, Digests};
use horn_iscsi::text::{self, Offer};
use libfuzzer_sys::fuzz_target;

const NAME: &str = "iqn.2026-11.io.horn:vol1";
const ADDRESS: &str = "127.0.0.1:3260";
const USER: &str = "initiator-user";
const SECRET: &str = "initiator-secret";
const TARGET_USER: &str = "target-user";
const TARGET_SECRET: &str = "target-secret-12";
const TSIH: u16 = 7;

fn target(mode: u8) -> TargetInfo {
    let chap = (mode & 3 != 0).then(|| ChapSecret {
        user: USER.into(),
        secret: SECRET.into(),
    });
    let mutual = (mode & 3 >= 2).then(|| ChapSecret {
        user: TARGET_USER.into(),
        secret: TARGET_SECRET.into(),
    });
    TargetInfo {
        name: NAME.into(),
        address: ADDRESS.into(),
        auth: Auth {
            chap,
            mutual,
            discovery: mode & 3 == 3,
        },
        offer: Offer::default(),
    }
}

/// Decodes a CHAP binary value as the target sends it (`0x` hex).
fn hex(v: &str) -> Option<Vec<u8>> {
    let h = v.strip_prefix("0x")?;
    (0..h.len())
        .step_by(2)
        .map(|i| h.get(i..i + 2).and_then(|b| u8::from_str_radix(b, 16).ok()))
        .collect()
}

fn to_hex(bytes: &[u8]) -> String {
    let mut s = String::from("0x");
    for b in bytes {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

/// Pairs of a text segment that parses, after checking it re-encodes the same.
fn pairs(data: &[u8]) -> Option<Vec<(String, String)>> {
    let p = text::parse(data).ok()?;
    assert_eq!(
        text::parse(&text::encode(&p)).as_ref(),
        Ok(&p),
        "text re-encodes otherwise"
    );
    Some(p)
}

fn value<'a>(pairs: &'a [(String, String)], key: &str) -> Option<&'a str> {
    pairs.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
}

fn check_negotiated(n: &login::Negotiated, offer: &Offer) {
    let p = &n.params;
    assert!((512..=16_777_215).contains(&p.initiator_max_recv), "{p:?}");
    assert_eq!(p.target_max_recv, offer.max_recv, "{p:?}");
    assert!((512..=offer.max_burst).contains(&p.max_burst), "{p:?}");
    assert!(
        p.first_burst <= p.max_burst && p.first_burst <= offer.first_burst,
        "{p:?}"
    );
    assert!(
        (1..=offer.max_outstanding_r2t).contains(&p.max_outstanding_r2t),
        "{p:?}"
    );
    assert_eq!((p.error_recovery_level, p.max_connections), (0, 1), "{p:?}");
    assert!(p.data_pdu_in_order && p.data_sequence_in_order, "{p:?}");
    assert!(
        p.default_time2wait <= 3600 && p.default_time2retain <= 3600,
        "{p:?}"
    );
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, mut rest)) = data.split_first() else {
        return;
    };
    let info = target(mode);
    let offer = info.offer.clone();
    let chap_required =
        |t: SessionType| info.auth.chap.is_some() && (t == SessionType::Normal || info.auth.discovery);
    let mut login = Login::new(info.clone());
    // The last challenge the target sent, and whether the right response was taken.
    let mut challenge: Option<(u8, Vec<u8>)> = None;
    let mut proved = false;
    let mut session: Option<SessionType> = None;
    // Text of a request continued over several PDUs (C bit), as the login gathers it.
    let mut gathered = Vec::new();
    while let Ok(Some(f)) = pdu::parse(rest, Digests::default(), 262_144) {
        let bhs = f.bhs;
        let mut body = rest[f.data.clone()].to_vec();
        rest = &rest[f.len..];
        if let Some(kind) = session {
            if bhs.opcode() == op::TEXT {
                if let Ok(reply) = text::reply(NAME, ADDRESS, &body) {
                    let p = pairs(&reply).expect("a text reply parses");
                    let asked = pairs(&body).unwrap_or_default();
                    if value(&asked, "SendTargets") == Some("All") {
                        assert_eq!(value(&p, "TargetName"), Some(NAME), "{kind:?}");
                    }
                }
            }
            continue;
        }
        let continued = bhs.flags() & 0x40 != 0;
        let mut answered_challenge = false;
        if let (false, true, Some((id, c))) = (continued, gathered.is_empty(), &challenge) {
            if let Some(p) = pairs(&body).filter(|p| value(p, "CHAP_R") == Some("*")) {
                let right = to_hex(&login::chap_response(*id, SECRET.as_bytes(), c));
                let fixed: Vec<(String, String)> = p
                    .iter()
                    .map(|(k, v)| (k.clone(), if k == "CHAP_R" { right.clone() } else { v.clone() }))
                    .collect();
                body = text::encode(&fixed);
                answered_challenge = value(&p, "CHAP_N") == Some(USER);
            }
        }
        gathered.extend_from_slice(&body);
        let step = login.step(&bhs, &body, TSIH);
        let asked = if continued {
            None
        } else {
            pairs(&std::mem::take(&mut gathered))
        };
        let r = step.bhs;
        assert_eq!(r.opcode(), op::LOGIN_RESP);
        assert_eq!(r.itt(), bhs.itt(), "the response's task tag");
        let status = (r.0[36], r.0[37]);
        let answer = pairs(&step.data).unwrap_or_else(|| {
            let text = String::from_utf8_lossy(&step.data);
            panic!("the target's login text does not parse: {text:?}")
        });
        if answered_challenge && step.outcome != Outcome::Failed {
            proved = true;
        }
        match &step.outcome {
            Outcome::Failed => {
                assert_ne!(status.0, 0, "a failed login with status {status:?}");
                break;
            }
            Outcome::Continue => assert_eq!(status, login::status::SUCCESS),
            Outcome::Complete(n) => {
                assert_eq!(status, login::status::SUCCESS);
                assert_eq!(r.flags() & 0x83, 0x83, "transit to the full feature phase");
                assert_eq!(r.u16_at(14), TSIH);
                check_negotiated(n, &offer);
                if chap_required(n.session_type) {
                    assert!(proved, "{:?} session logged in without CHAP", n.session_type);
                }
                session = Some(n.session_type);
            }
        }
        // The target's answer to the initiator's challenge (mutual CHAP).
        if let (Some(p), Some(resp)) = (&asked, value(&answer, "CHAP_R")) {
            let i: u8 = value(p, "CHAP_I")
                .and_then(|i| i.parse().ok())
                .expect("CHAP_I was asked");
            let c = value(p, "CHAP_C").expect("CHAP_C was asked");
            let want = login::chap_response(i, TARGET_SECRET.as_bytes(), &chap_binary(c));
            assert_eq!(resp, to_hex(&want), "the target's mutual response");
        }
        if let (Some(i), Some(c)) = (value(&answer, "CHAP_I"), value(&answer, "CHAP_C")) {
            let id = i.parse().expect("the target's CHAP_I is a number");
            challenge = Some((id, hex(c).expect("the target's CHAP_C is hex")));
        }
    }
});

/// A CHAP binary value as the initiator may send it (`0x` hex or `0b` base64).
fn chap_binary(v: &str) -> Vec<u8> {
    if let Some(h) = hex(v.replacen("0X", "0x", 1).as_str()) {
        return h;
    }
    let b = v.get(2..).unwrap_or("").trim_end_matches('=');
    let (mut acc, mut bits, mut out) = (0u32, 0, Vec::new());
    for c in b.bytes() {
        let d = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            _ => 63,
        };
        acc = (acc << 6) | d as u32;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    out
}
