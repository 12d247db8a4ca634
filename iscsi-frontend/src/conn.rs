//! One iSCSI connection, from accept to close: login and discovery with plain
//! blocking socket calls, then a normal session's full feature phase
//! ([`crate::session`]) on its own ring.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::Duration;

use crate::login::{Login, Outcome, SessionType};
use crate::outbox::Seq;
use crate::pdu::{self, op, reject, Bhs, Digests, BHS_LEN, RESERVED_TAG};
use crate::session::{protocol, FullFeature, Result};
use crate::target::Target;
use crate::text::{self, Params};

pub use crate::session::ConnError;

/// Reads one PDU with blocking calls (login and discovery).
fn read_pdu(sock: &mut TcpStream, digests: Digests, max: usize) -> Result<(Bhs, Vec<u8>)> {
    let mut buf = vec![0u8; BHS_LEN];
    sock.read_exact(&mut buf)?;
    loop {
        match pdu::parse(&buf, digests, max).map_err(|e| protocol(e.to_string()))? {
            Some(f) => return Ok((f.bhs, buf[f.data].to_vec())),
            None => {
                // Work out how much more the PDU needs, from its header.
                let bhs = Bhs(buf[..BHS_LEN].try_into().unwrap());
                let dl = bhs.data_len();
                let total = BHS_LEN
                    + bhs.ahs_len()
                    + if digests.header { 4 } else { 0 }
                    + dl
                    + pdu::pad(dl)
                    + if digests.data && dl > 0 { 4 } else { 0 };
                let have = buf.len();
                buf.resize(total, 0);
                sock.read_exact(&mut buf[have..])?;
            }
        }
    }
}

fn write_pdu(sock: &mut TcpStream, bhs: &Bhs, data: &[u8], digests: Digests) -> Result<()> {
    let mut out = Vec::with_capacity(BHS_LEN + data.len() + 8);
    pdu::encode(&mut out, bhs, data, digests);
    sock.write_all(&out)?;
    Ok(())
}

/// Serves one connection until the initiator logs out or it drops. A connection over
/// the target's limit (`busy`) gets its first login request answered "out of
/// resources", and is closed.
pub fn serve(target: Arc<Target>, mut sock: TcpStream, busy: bool) -> Result<()> {
    sock.set_nodelay(true)?;
    if busy {
        sock.set_read_timeout(Some(Duration::from_secs(5)))?;
        let (req, _) = read_pdu(&mut sock, Digests::default(), 64 * 1024)?;
        let mut seq = Seq {
            stat_sn: 0,
            exp_cmd_sn: req.cmd_sn(),
        };
        let mut bhs = Login::new(target.info.clone()).busy(&req).bhs;
        seq.stamp(&mut bhs, true);
        return write_pdu(&mut sock, &bhs, &[], Digests::default());
    }
    // Login may not take forever.
    sock.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut login = Login::new(target.info.clone());
    let mut seq = Seq {
        stat_sn: rand::random::<u32>() >> 8,
        exp_cmd_sn: 0,
    };
    let negotiated = loop {
        let (req, data) = read_pdu(&mut sock, Digests::default(), 64 * 1024)?;
        if req.opcode() == op::LOGIN {
            seq.exp_cmd_sn = req.cmd_sn();
        }
        let step = login.step(&req, &data, target.new_tsih());
        let mut bhs = step.bhs;
        seq.stamp(&mut bhs, true);
        let peer = sock.peer_addr().ok().map(|a| a.ip());
        if let (Outcome::Failed, Some(ip)) = (&step.outcome, peer) {
            if (bhs.0[36], bhs.0[37]) == crate::login::status::AUTH_FAILED {
                // Guesses from one address are answered ever more slowly.
                let delay = target.auth_failed(ip);
                if !delay.is_zero() {
                    tracing::warn!(%ip, ?delay, "repeated failed CHAP logins; answering late");
                    std::thread::sleep(delay);
                }
            }
        }
        write_pdu(&mut sock, &bhs, &step.data, Digests::default())?;
        match step.outcome {
            Outcome::Continue => {}
            Outcome::Failed => return Ok(()),
            Outcome::Complete(n) => {
                if let Some(ip) = peer {
                    target.auth_succeeded(ip);
                }
                break *n;
            }
        }
    };
    sock.set_read_timeout(None)?;
    let digests = Digests {
        header: negotiated.params.header_digest,
        data: negotiated.params.data_digest,
    };
    tracing::info!(
        initiator = %negotiated.initiator,
        session = ?negotiated.session_type,
        header_digest = digests.header,
        data_digest = digests.data,
        "iSCSI login"
    );
    match negotiated.session_type {
        SessionType::Discovery => discovery(&target, sock, seq, digests, &negotiated.params),
        SessionType::Normal => {
            let _session = target.sessions.enter(&negotiated);
            FullFeature::new(target.clone(), sock, seq, negotiated)?.run()
        }
    }
}

fn discovery(
    target: &Target,
    mut sock: TcpStream,
    mut seq: Seq,
    digests: Digests,
    params: &Params,
) -> Result<()> {
    loop {
        let (req, data) = read_pdu(&mut sock, digests, params.target_max_recv as usize)?;
        if !req.immediate() && matches!(req.opcode(), op::TEXT | op::NOP_OUT | op::LOGOUT) {
            seq.exp_cmd_sn = req.cmd_sn().wrapping_add(1);
        }
        match req.opcode() {
            op::TEXT => {
                let out = text::reply(&target.info.name, &target.info.address, &data)
                    .map_err(|e| protocol(e.to_string()))?;
                let mut bhs = Bhs::new(op::TEXT_RESP, 0x80);
                bhs.set_u32(16, req.itt()).set_u32(20, RESERVED_TAG);
                seq.stamp(&mut bhs, true);
                write_pdu(&mut sock, &bhs, &out, digests)?;
            }
            op::NOP_OUT if req.itt() != RESERVED_TAG => {
                let mut bhs = Bhs::new(op::NOP_IN, 0x80);
                bhs.set_u64(8, req.lun())
                    .set_u32(16, req.itt())
                    .set_u32(20, RESERVED_TAG);
                seq.stamp(&mut bhs, true);
                write_pdu(&mut sock, &bhs, &data, digests)?;
            }
            op::NOP_OUT => {}
            op::LOGOUT => {
                let mut bhs = Bhs::new(op::LOGOUT_RESP, 0x80);
                bhs.set_u32(16, req.itt());
                seq.stamp(&mut bhs, true);
                write_pdu(&mut sock, &bhs, &[], digests)?;
                return Ok(());
            }
            _ => {
                let mut bhs = Bhs::new(op::REJECT, 0x80);
                bhs.0[2] = reject::PROTOCOL;
                bhs.set_u32(16, RESERVED_TAG);
                seq.stamp(&mut bhs, true);
                write_pdu(&mut sock, &bhs, &req.0, digests)?;
            }
        }
    }
}
