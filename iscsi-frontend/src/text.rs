//! Text keys (RFC 7143 §6, §13): `key=value` pairs separated by NULs, and the
//! negotiation of the operational parameters a session runs with.

/// A text segment that is not a list of `key=value` pairs.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TextError {
    /// A pair with no `=`, a key that is too long, or bytes that are not UTF-8.
    #[error("malformed text key: {0:?}")]
    Malformed(String),
    /// A key given twice in one negotiation.
    #[error("key {0} given twice")]
    Duplicate(String),
}

/// Longest key (RFC 7143 §6.1: 63 bytes) and value (§6.1: 8192 bytes, "large" keys
/// aside) accepted.
const MAX_KEY: usize = 63;
const MAX_VALUE: usize = 8192;

/// Splits a text segment into its pairs, in order.
pub fn parse(data: &[u8]) -> Result<Vec<(String, String)>, TextError> {
    let mut pairs: Vec<(String, String)> = Vec::new();
    for item in data.split(|&b| b == 0).filter(|s| !s.is_empty()) {
        let s = std::str::from_utf8(item)
            .map_err(|_| TextError::Malformed(String::from_utf8_lossy(item).into_owned()))?;
        let (k, v) = s
            .split_once('=')
            .ok_or_else(|| TextError::Malformed(s.chars().take(80).collect()))?;
        if k.is_empty() || k.len() > MAX_KEY || v.len() > MAX_VALUE {
            return Err(TextError::Malformed(s.chars().take(80).collect()));
        }
        if pairs.iter().any(|(pk, _)| pk == k) {
            return Err(TextError::Duplicate(k.into()));
        }
        pairs.push((k.into(), v.into()));
    }
    Ok(pairs)
}

/// Joins pairs into a text segment.
pub fn encode(pairs: &[(String, String)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (k, v) in pairs {
        out.extend_from_slice(k.as_bytes());
        out.push(b'=');
        out.extend_from_slice(v.as_bytes());
        out.push(0);
    }
    out
}

/// The operational parameters of a session and its connection (RFC 7143 §13), as
/// negotiated; the defaults are the RFC's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Params {
    /// CRC32C on headers.
    pub header_digest: bool,
    /// CRC32C on data.
    pub data_digest: bool,
    /// Largest data segment the initiator receives (what we may send in one PDU).
    pub initiator_max_recv: u32,
    /// Largest data segment we receive (declared to the initiator).
    pub target_max_recv: u32,
    /// Largest solicited or Data-In sequence.
    pub max_burst: u32,
    /// Largest unsolicited data (immediate and unsolicited Data-Out) per command.
    pub first_burst: u32,
    /// The initiator must wait for an R2T before any Data-Out.
    pub initial_r2t: bool,
    /// Data may ride in the command PDU.
    pub immediate_data: bool,
    /// R2Ts outstanding per task.
    pub max_outstanding_r2t: u32,
    /// Data PDUs come in offset order.
    pub data_pdu_in_order: bool,
    /// Data sequences come in offset order.
    pub data_sequence_in_order: bool,
    /// Error recovery level (Horn serves 0).
    pub error_recovery_level: u32,
    /// Seconds to wait before reconnecting after a logout.
    pub default_time2wait: u32,
    /// Seconds a task is kept after a connection drops.
    pub default_time2retain: u32,
    /// Connections per session (Horn serves 1).
    pub max_connections: u32,
}

impl Default for Params {
    fn default() -> Self {
        Params {
            header_digest: false,
            data_digest: false,
            initiator_max_recv: 8192,
            target_max_recv: 8192,
            max_burst: 262_144,
            first_burst: 65_536,
            initial_r2t: true,
            immediate_data: true,
            max_outstanding_r2t: 1,
            data_pdu_in_order: true,
            data_sequence_in_order: true,
            error_recovery_level: 0,
            default_time2wait: 2,
            default_time2retain: 20,
            max_connections: 1,
        }
    }
}

/// What Horn offers where a negotiation picks.
#[derive(Debug, Clone)]
pub struct Offer {
    /// Largest data segment we receive.
    pub max_recv: u32,
    /// Largest burst.
    pub max_burst: u32,
    /// Largest first burst.
    pub first_burst: u32,
    /// R2Ts outstanding per task.
    pub max_outstanding_r2t: u32,
    /// Digests we accept (CRC32C and None both, initiator's preference first).
    pub digests: bool,
}

impl Default for Offer {
    fn default() -> Self {
        Offer {
            max_recv: 262_144,
            max_burst: 1 << 20,
            first_burst: 262_144,
            max_outstanding_r2t: 16,
            digests: true,
        }
    }
}

/// The outcome of one key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// Reply `key=value`.
    Reply(String),
    /// A declaration that needs no reply.
    Silent,
    /// Not an operational key (the login handles it).
    NotOperational,
}

/// The answer to a Text request from target `name` listening at `address`:
/// SendTargets answered, other keys NotUnderstood.
pub fn reply(name: &str, address: &str, data: &[u8]) -> Result<Vec<u8>, TextError> {
    let mut out = Vec::new();
    for (k, v) in parse(data)? {
        if k == "SendTargets" {
            out.extend(send_targets(name, address, &v));
        } else {
            out.extend(encode(&[(k, "NotUnderstood".into())]));
        }
    }
    Ok(out)
}

/// SendTargets' answer.
fn send_targets(name: &str, address: &str, value: &str) -> Vec<u8> {
    if value == "All" || value == name || value.is_empty() {
        encode(&[
            ("TargetName".into(), name.to_string()),
            ("TargetAddress".into(), format!("{address},1")),
        ])
    } else {
        Vec::new()
    }
}

fn yes_no(v: &str) -> Option<bool> {
    match v {
        "Yes" => Some(true),
        "No" => Some(false),
        _ => None,
    }
}

fn number(v: &str) -> Option<u32> {
    if let Some(hex) = v.strip_prefix("0x").or_else(|| v.strip_prefix("0X")) {
        u32::from_str_radix(hex, 16).ok()
    } else {
        v.parse().ok()
    }
}

fn bool_str(b: bool) -> String {
    if b { "Yes" } else { "No" }.into()
}

impl Params {
    /// Negotiates `key=value` from the initiator; updates `self` and says what to
    /// answer. A value out of the key's range is answered `Reject` (§6.2).
    pub fn negotiate(&mut self, offer: &Offer, key: &str, value: &str) -> Answer {
        let reject = || Answer::Reply("Reject".into());
        // min(initiator, ours) for a numeric key bounded by `lo..=hi`.
        let min_of = |ours: u32, lo: u32, hi: u32| -> Option<u32> {
            number(value)
                .filter(|n| (lo..=hi).contains(n))
                .map(|n| n.min(ours))
        };
        match key {
            "HeaderDigest" | "DataDigest" => {
                let mut chosen = None;
                for choice in value.split(',') {
                    match choice {
                        "None" => {
                            chosen = Some(false);
                            break;
                        }
                        "CRC32C" if offer.digests => {
                            chosen = Some(true);
                            break;
                        }
                        _ => {}
                    }
                }
                match chosen {
                    None => reject(),
                    Some(on) => {
                        if key == "HeaderDigest" {
                            self.header_digest = on;
                        } else {
                            self.data_digest = on;
                        }
                        Answer::Reply(if on { "CRC32C" } else { "None" }.into())
                    }
                }
            }
            "MaxRecvDataSegmentLength" => match number(value).filter(|n| (512..=16_777_215).contains(n)) {
                Some(n) => {
                    self.initiator_max_recv = n;
                    Answer::Silent
                }
                None => reject(),
            },
            "MaxBurstLength" => match min_of(offer.max_burst, 512, 16_777_215) {
                Some(n) => {
                    self.max_burst = n;
                    self.first_burst = self.first_burst.min(n);
                    Answer::Reply(n.to_string())
                }
                None => reject(),
            },
            "FirstBurstLength" => match min_of(offer.first_burst, 512, 16_777_215) {
                Some(n) => {
                    self.first_burst = n.min(self.max_burst);
                    Answer::Reply(self.first_burst.to_string())
                }
                None => reject(),
            },
            "MaxOutstandingR2T" => match min_of(offer.max_outstanding_r2t, 1, 65_535) {
                Some(n) => {
                    self.max_outstanding_r2t = n;
                    Answer::Reply(n.to_string())
                }
                None => reject(),
            },
            // OR: Horn would rather not wait, so the initiator's value stands.
            "InitialR2T" => match yes_no(value) {
                Some(b) => {
                    self.initial_r2t = b;
                    Answer::Reply(bool_str(b))
                }
                None => reject(),
            },
            // AND: Horn takes immediate data, so the initiator's value stands.
            "ImmediateData" => match yes_no(value) {
                Some(b) => {
                    self.immediate_data = b;
                    Answer::Reply(bool_str(b))
                }
                None => reject(),
            },
            // OR: Horn needs data in order; the result is Yes whatever was asked.
            "DataPDUInOrder" | "DataSequenceInOrder" => match yes_no(value) {
                Some(_) => Answer::Reply("Yes".into()),
                None => reject(),
            },
            "ErrorRecoveryLevel" => match number(value).filter(|n| *n <= 2) {
                Some(_) => {
                    self.error_recovery_level = 0;
                    Answer::Reply("0".into())
                }
                None => reject(),
            },
            "MaxConnections" => match number(value).filter(|n| (1..=65_535).contains(n)) {
                Some(_) => Answer::Reply("1".into()),
                None => reject(),
            },
            "DefaultTime2Wait" => match number(value).filter(|n| *n <= 3600) {
                Some(n) => {
                    self.default_time2wait = n.max(self.default_time2wait);
                    Answer::Reply(self.default_time2wait.to_string())
                }
                None => reject(),
            },
            "DefaultTime2Retain" => match number(value).filter(|n| *n <= 3600) {
                Some(n) => {
                    self.default_time2retain = n.min(self.default_time2retain);
                    Answer::Reply(self.default_time2retain.to_string())
                }
                None => reject(),
            },
            // Markers are not served (AND: No).
            "IFMarker" | "OFMarker" => Answer::Reply("No".into()),
            "IFMarkInt" | "OFMarkInt" => Answer::Reply("Irrelevant".into()),
            "InitiatorAlias" => Answer::Silent,
            _ => Answer::NotOperational,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairs_round_trip_and_bad_text_is_refused() {
        let pairs = vec![("A".to_string(), "1".to_string()), ("B".into(), "x=y".into())];
        assert_eq!(parse(&encode(&pairs)).unwrap(), pairs);
        assert!(matches!(parse(b"novalue\0"), Err(TextError::Malformed(_))));
        assert!(matches!(parse(b"A=1\0A=2\0"), Err(TextError::Duplicate(_))));
        assert!(matches!(parse(b"=1\0"), Err(TextError::Malformed(_))));
        assert!(matches!(
            parse(&[0xff, b'=', b'1', 0]),
            Err(TextError::Malformed(_))
        ));
        assert_eq!(parse(b"\0\0").unwrap(), vec![]);
    }

    #[test]
    fn negotiation_follows_the_rfc_rules() {
        let offer = Offer::default();
        let mut p = Params::default();
        assert_eq!(
            p.negotiate(&offer, "HeaderDigest", "CRC32C,None"),
            Answer::Reply("CRC32C".into())
        );
        assert!(p.header_digest);
        assert_eq!(
            p.negotiate(&offer, "DataDigest", "None,CRC32C"),
            Answer::Reply("None".into())
        );
        assert_eq!(
            p.negotiate(&offer, "DataDigest", "MD5"),
            Answer::Reply("Reject".into())
        );
        assert_eq!(
            p.negotiate(&offer, "MaxBurstLength", "16776192"),
            Answer::Reply("1048576".into())
        );
        assert_eq!(
            p.negotiate(&offer, "FirstBurstLength", "65536"),
            Answer::Reply("65536".into())
        );
        assert_eq!(
            p.negotiate(&offer, "MaxRecvDataSegmentLength", "65536"),
            Answer::Silent
        );
        assert_eq!(p.initiator_max_recv, 65536);
        assert_eq!(
            p.negotiate(&offer, "MaxRecvDataSegmentLength", "12"),
            Answer::Reply("Reject".into())
        );
        assert_eq!(
            p.negotiate(&offer, "InitialR2T", "No"),
            Answer::Reply("No".into())
        );
        assert_eq!(
            p.negotiate(&offer, "ImmediateData", "Maybe"),
            Answer::Reply("Reject".into())
        );
        assert_eq!(
            p.negotiate(&offer, "ErrorRecoveryLevel", "2"),
            Answer::Reply("0".into())
        );
        assert_eq!(
            p.negotiate(&offer, "MaxConnections", "4"),
            Answer::Reply("1".into())
        );
        assert_eq!(p.negotiate(&offer, "X-com.example", "1"), Answer::NotOperational);
    }
}
