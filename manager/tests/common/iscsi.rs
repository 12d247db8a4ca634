//! A small iSCSI initiator for the target's tests: login (with CHAP), SCSI commands
//! with immediate data, and raw PDUs for the bad-input tests.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use horn_iscsi::pdu::{self, op, Bhs, Digests, BHS_LEN};

pub struct Initiator {
    pub sock: TcpStream,
    cmd_sn: u32,
    exp_stat_sn: u32,
    itt: u32,
    /// Every byte sent, when recording, and where each PDU's header starts.
    record: Option<(Vec<u8>, Vec<usize>)>,
}

thread_local! {
    /// Set while a recording session logs in (its first bytes are the login's).
    static RECORD: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

pub struct Reply {
    pub status: u8,
    pub sense: Vec<u8>,
    pub data: Vec<u8>,
}

fn pairs(data: &[u8]) -> Vec<(String, String)> {
    horn_iscsi::text::parse(data).unwrap()
}

fn get<'a>(p: &'a [(String, String)], k: &str) -> Option<&'a str> {
    p.iter().find(|(a, _)| a == k).map(|(_, v)| v.as_str())
}

fn hex(b: &[u8]) -> String {
    let mut s = "0x".to_string();
    for x in b {
        s.push_str(&format!("{x:02x}"));
    }
    s
}

fn unhex(s: &str) -> Vec<u8> {
    let h = s.trim_start_matches("0x");
    (0..h.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&h[i..i + 2], 16).unwrap())
        .collect()
}

/// CHAP settings of a login.
pub struct Chap<'a> {
    pub user: &'a str,
    pub secret: &'a str,
    /// Mutual: the target's expected (user, secret).
    pub mutual: Option<(&'a str, &'a str)>,
}

impl Initiator {
    pub fn connect(addr: &str) -> Initiator {
        let sock = TcpStream::connect(addr).unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        Initiator {
            sock,
            cmd_sn: 1,
            exp_stat_sn: 0,
            itt: 1,
            record: None,
        }
    }

    /// Logs in (no CHAP) recording every byte this session sends from the start.
    pub fn login_recorded(addr: &str, target: &str) -> Result<Initiator, (u8, u8)> {
        RECORD.with(|r| r.set(true));
        let i = Initiator::login(addr, target, None);
        RECORD.with(|r| r.set(false));
        i
    }

    /// What a recording session sent, and where each PDU's header starts in it.
    pub fn recorded(&self) -> (Vec<u8>, Vec<usize>) {
        self.record.clone().expect("a recording session")
    }

    /// A NOP-Out ping, answered by a NOP-In.
    pub fn nop(&mut self) {
        let mut b = Bhs::new(op::NOP_OUT | 0x40, 0x80);
        self.itt += 1;
        b.set_u32(16, self.itt)
            .set_u32(20, 0xffff_ffff)
            .set_u32(24, self.cmd_sn)
            .set_u32(28, self.exp_stat_sn);
        self.send(&b, b"ping");
        let (r, d) = self.recv().expect("a NOP-In");
        assert_eq!((r.opcode(), d.as_slice()), (op::NOP_IN, &b"ping"[..]));
    }

    /// Logs out.
    pub fn logout(&mut self) {
        let mut b = Bhs::new(op::LOGOUT | 0x40, 0x80);
        self.itt += 1;
        b.set_u32(16, self.itt)
            .set_u32(24, self.cmd_sn)
            .set_u32(28, self.exp_stat_sn);
        self.send(&b, &[]);
        let (r, _) = self.recv().expect("a logout response");
        assert_eq!(r.opcode(), op::LOGOUT_RESP);
    }

    pub fn send(&mut self, bhs: &Bhs, data: &[u8]) {
        let mut out = Vec::new();
        pdu::encode(&mut out, bhs, data, Digests::default());
        if self.record.is_none() && RECORD.with(|r| r.get()) {
            self.record = Some((Vec::new(), Vec::new()));
        }
        if let Some((bytes, headers)) = &mut self.record {
            headers.push(bytes.len());
            bytes.extend_from_slice(&out);
        }
        self.sock.write_all(&out).unwrap();
    }

    /// The next PDU, or None when the target closed the connection.
    pub fn recv(&mut self) -> Option<(Bhs, Vec<u8>)> {
        let mut h = [0u8; BHS_LEN];
        self.sock.read_exact(&mut h).ok()?;
        let bhs = Bhs(h);
        let len = bhs.data_len();
        let mut data = vec![0u8; len + pdu::pad(len)];
        self.sock.read_exact(&mut data).ok()?;
        data.truncate(len);
        if matches!(
            bhs.opcode(),
            op::SCSI_RESP
                | op::NOP_IN
                | op::TEXT_RESP
                | op::LOGIN_RESP
                | op::LOGOUT_RESP
                | op::TASK_MGMT_RESP
                | op::REJECT
        ) || (bhs.opcode() == op::DATA_IN && bhs.flags() & 1 != 0)
        {
            self.exp_stat_sn = bhs.u32_at(24).wrapping_add(1);
        }
        Some((bhs, data))
    }

    fn login_pdu(&mut self, csg: u8, nsg: u8, transit: bool, keys: &[(&str, String)]) -> (Bhs, Vec<u8>) {
        let mut b = Bhs::new(
            op::LOGIN | 0x40,
            (if transit { 0x80 } else { 0 }) | (csg << 2) | nsg,
        );
        b.0[8..14].copy_from_slice(&[0x80, 0, 0, 0x12, 0x34, 0x56]);
        b.set_u32(16, self.itt)
            .set_u32(24, self.cmd_sn)
            .set_u32(28, self.exp_stat_sn);
        let pairs: Vec<(String, String)> = keys.iter().map(|(k, v)| (k.to_string(), v.clone())).collect();
        self.send(&b, &horn_iscsi::text::encode(&pairs));
        let (r, d) = self.recv().expect("a login response");
        assert_eq!(r.opcode(), op::LOGIN_RESP);
        (r, d)
    }

    /// Logs in to `target`; Err((class, detail)) when refused.
    pub fn login(addr: &str, target: &str, chap: Option<Chap>) -> Result<Initiator, (u8, u8)> {
        Self::login_to(addr, Some(target), chap)
    }

    /// Logs in to a discovery session (SendTargets), with CHAP when given.
    pub fn login_discovery(addr: &str, chap: Option<Chap>) -> Result<Initiator, (u8, u8)> {
        Self::login_to(addr, None, chap)
    }

    /// A normal session with `target`, or a discovery session (`None`).
    fn login_to(addr: &str, target: Option<&str>, chap: Option<Chap>) -> Result<Initiator, (u8, u8)> {
        let mut i = Initiator::connect(addr);
        let name = ("InitiatorName", "iqn.2026-11.io.horn:test-initiator".to_string());
        let status = |r: &Bhs| (r.0[36], r.0[37]);
        let mut keys = vec![name.clone()];
        match target {
            Some(target) => {
                keys.push(("SessionType", "Normal".into()));
                keys.push(("TargetName", target.into()));
            }
            None => keys.push(("SessionType", "Discovery".into())),
        }
        match &chap {
            None => {
                keys.push(("AuthMethod", "None".into()));
                let (r, _) = i.login_pdu(0, 1, true, &keys);
                if status(&r) != (0, 0) {
                    return Err(status(&r));
                }
            }
            Some(c) => {
                keys.push(("AuthMethod", "CHAP,None".into()));
                let (r, d) = i.login_pdu(0, 1, false, &keys);
                if status(&r) != (0, 0) {
                    return Err(status(&r));
                }
                assert_eq!(get(&pairs(&d), "AuthMethod"), Some("CHAP"));
                let (r, d) = i.login_pdu(0, 1, false, &[("CHAP_A", "5".into())]);
                if status(&r) != (0, 0) {
                    return Err(status(&r));
                }
                let p = pairs(&d);
                let id: u8 = get(&p, "CHAP_I").unwrap().parse().unwrap();
                let challenge = unhex(get(&p, "CHAP_C").unwrap());
                let resp = horn_iscsi::login::chap_response(id, c.secret.as_bytes(), &challenge);
                let mut keys = vec![("CHAP_N", c.user.to_string()), ("CHAP_R", hex(&resp))];
                let my_challenge = [7u8; 16];
                if c.mutual.is_some() {
                    keys.push(("CHAP_I", "9".into()));
                    keys.push(("CHAP_C", hex(&my_challenge)));
                }
                let (r, d) = i.login_pdu(0, 1, true, &keys);
                if status(&r) != (0, 0) {
                    return Err(status(&r));
                }
                if let Some((user, secret)) = c.mutual {
                    let p = pairs(&d);
                    assert_eq!(get(&p, "CHAP_N"), Some(user));
                    let want = horn_iscsi::login::chap_response(9, secret.as_bytes(), &my_challenge);
                    assert_eq!(
                        unhex(get(&p, "CHAP_R").unwrap()),
                        want,
                        "the target's mutual CHAP response"
                    );
                }
            }
        }
        let mut operational = vec![
            ("HeaderDigest", "None".to_string()),
            ("DataDigest", "None".into()),
            ("MaxRecvDataSegmentLength", "262144".into()),
        ];
        if target.is_some() {
            operational.extend([
                ("ImmediateData", "Yes".to_string()),
                ("InitialR2T", "No".into()),
                ("FirstBurstLength", "262144".into()),
                ("MaxBurstLength", "1048576".into()),
            ]);
        }
        let (r, _) = i.login_pdu(1, 3, true, &operational);
        if status(&r) != (0, 0) {
            return Err(status(&r));
        }
        assert_eq!(
            r.flags() & 0x83,
            0x83,
            "the target moves to the full feature phase"
        );
        Ok(i)
    }

    /// A SCSI command header with `cdb`.
    pub fn command_pdu(&mut self, cdb: &[u8], edtl: u32, read: bool, write: bool) -> Bhs {
        let mut b = Bhs::new(
            op::SCSI_CMD,
            0x80 | if read { 0x40 } else { 0 } | if write { 0x20 } else { 0 } | 1,
        );
        self.itt += 1;
        b.set_u32(16, self.itt)
            .set_u32(20, edtl)
            .set_u32(24, self.cmd_sn)
            .set_u32(28, self.exp_stat_sn);
        self.cmd_sn += 1;
        b.0[32..32 + cdb.len()].copy_from_slice(cdb);
        b
    }

    /// Runs `cdb` with `data_out` as immediate data (R2Ts answered), expecting up to
    /// `read_len` bytes of data-in.
    pub fn command(&mut self, cdb: &[u8], data_out: &[u8], read_len: u32) -> Reply {
        let write = !data_out.is_empty();
        let edtl = if write { data_out.len() as u32 } else { read_len };
        let b = self.command_pdu(cdb, edtl, read_len > 0, write);
        let itt = b.itt();
        self.send(&b, data_out);
        let mut data = vec![0u8; read_len as usize];
        loop {
            let (r, d) = self.recv().expect("a reply to the command");
            assert_eq!(r.itt(), itt, "reply for another task: {r:?}");
            match r.opcode() {
                op::DATA_IN => {
                    let off = r.u32_at(40) as usize;
                    data[off..off + d.len()].copy_from_slice(&d);
                    if r.flags() & 1 != 0 {
                        return Reply {
                            status: r.0[3],
                            sense: Vec::new(),
                            data,
                        };
                    }
                }
                op::SCSI_RESP => {
                    let sense = if d.len() > 2 { d[2..].to_vec() } else { Vec::new() };
                    return Reply {
                        status: r.0[3],
                        sense,
                        data,
                    };
                }
                other => panic!("unexpected PDU {other:#x} for a command"),
            }
        }
    }

    pub fn write10(&mut self, lba: u32, data: &[u8]) -> Reply {
        let blocks = (data.len() / 512) as u16;
        let mut cdb = [0u8; 10];
        cdb[0] = 0x2a;
        cdb[2..6].copy_from_slice(&lba.to_be_bytes());
        cdb[7..9].copy_from_slice(&blocks.to_be_bytes());
        self.command(&cdb, data, 0)
    }

    pub fn read10(&mut self, lba: u32, blocks: u16) -> Reply {
        let mut cdb = [0u8; 10];
        cdb[0] = 0x28;
        cdb[2..6].copy_from_slice(&lba.to_be_bytes());
        cdb[7..9].copy_from_slice(&blocks.to_be_bytes());
        self.command(&cdb, &[], blocks as u32 * 512)
    }
}
