//! `hornd engine --frontend iscsi` as a real process on real replicas, driven over
//! its socket: data through the LUN, out-of-range I/O, malformed PDUs, CHAP and
//! discovery. (libiscsi's conformance suite runs in `tests/iscsi/conformance`.)

mod common;

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::iscsi::{Chap, Initiator};
use common::Daemon;
use horn_iscsi::pdu::{op, Bhs};

const IQN: &str = "iqn.2026-11.io.horn:itest";

struct Target {
    child: Child,
    addr: String,
    /// The daemon's stderr.
    log: std::path::PathBuf,
}

impl Drop for Target {
    fn drop(&mut self) {
        // SAFETY: kill takes no pointers; the pid is our child's (reaped below).
        unsafe { libc::kill(self.child.id() as i32, libc::SIGKILL) };
        let _ = self.child.wait();
    }
}

/// Starts `hornd engine --frontend iscsi` on `replicas`, its stderr in `log`;
/// without CHAP (`--no-chap`) unless `extra` asks for it.
fn start_target_logged(
    replicas: &[&Daemon],
    extra: &[&str],
    log: &std::path::Path,
) -> Result<Target, String> {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_hornd"));
    cmd.args([
        "engine",
        "--control",
        "127.0.0.1:0",
        "--frontend",
        "iscsi",
        "--listen",
        "127.0.0.1:0",
    ])
    .args(["--name", "itest"])
    .args(extra);
    if !extra.contains(&"--chap-user") {
        cmd.arg("--no-chap");
    }
    for r in replicas {
        cmd.arg("--replica")
            .arg(format!("{},{}", r.addr, r.control.trim_start_matches("http://")));
    }
    let err = std::fs::File::create(log).unwrap();
    let mut child = cmd.stdout(Stdio::piped()).stderr(err).spawn().unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    for _ in 0..2 {
        line.clear();
        out.read_line(&mut line).unwrap();
        if let Some((_, rest)) = line.split_once(&format!("serving iSCSI target {IQN} on ")) {
            let addr = rest.split_whitespace().next().unwrap().to_string();
            return Ok(Target {
                child,
                addr,
                log: log.to_path_buf(),
            });
        }
    }
    let _ = child.wait();
    Err(format!(
        "{line}{}",
        std::fs::read_to_string(log).unwrap_or_default()
    ))
}

fn start_target(replicas: &[&Daemon], extra: &[&str]) -> Result<Target, String> {
    let n = NEXT_LOG.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let log = std::env::temp_dir().join(format!("horn-iscsi-target-{}-{n}.log", std::process::id()));
    start_target_logged(replicas, extra, &log)
}

static NEXT_LOG: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

fn replicas(dir: &std::path::Path, n: usize) -> Vec<Daemon> {
    (0..n)
        .map(|i| Daemon::start(&dir.join(format!("r{i}")), &["--size", "64M"]).unwrap())
        .collect()
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

#[test]
fn data_goes_through_the_lun_and_out_of_range_io_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let r = replicas(dir.path(), 3);
    let t = start_target(&r.iter().collect::<Vec<_>>(), &[]).unwrap();
    let mut i = Initiator::login(&t.addr, IQN, None).unwrap();

    let data = pattern(3, 64 * 1024);
    assert_eq!(i.write10(8, &data).status, 0);
    let back = i.read10(8, 128);
    assert_eq!(back.status, 0);
    assert!(back.data == data, "what was written reads back");

    // 64 MiB of 512-byte blocks: the last LBA is 131071.
    let w = i.write10(131_071, &pattern(1, 1024));
    assert_eq!(w.status, 2, "CHECK CONDITION");
    assert_eq!(
        (w.sense[2] & 0x0f, w.sense[12]),
        (0x05, 0x21),
        "ILLEGAL REQUEST, LBA OUT OF RANGE"
    );
    let r2 = i.read10(131_072, 1);
    assert_eq!((r2.status, r2.sense[2] & 0x0f, r2.sense[12]), (2, 0x05, 0x21));
    // Nothing past the end was written, and the data in range is intact.
    assert!(i.read10(8, 128).data == data);
}

#[test]
fn malformed_pdus_get_a_reject_or_a_closed_connection_and_write_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let r = replicas(dir.path(), 1);
    let t = start_target(&[&r[0]], &[]).unwrap();
    let original = pattern(9, 4096);
    {
        let mut i = Initiator::login(&t.addr, IQN, None).unwrap();
        assert_eq!(i.write10(0, &original).status, 0);
    }

    // An op code no initiator may send: Reject, reason "command not supported",
    // carrying the rejected header; the session goes on.
    let mut i = Initiator::login(&t.addr, IQN, None).unwrap();
    i.send(&Bhs::new(0x1f, 0x80), &[]);
    let (rej, data) = i.recv().expect("a Reject");
    assert_eq!((rej.opcode(), rej.0[2]), (op::REJECT, 0x05));
    assert_eq!(data[0] & 0x3f, 0x1f);
    // Data-Out for a task that never was: Reject, "invalid PDU field" (it was ignored).
    let mut d = Bhs::new(op::DATA_OUT, 0x80);
    d.set_u32(16, 0xdead).set_u32(20, 0xffff_ffff);
    i.send(&d, &[0xee; 512]);
    let (rej, data) = i.recv().expect("a Reject");
    assert_eq!((rej.opcode(), rej.0[2]), (op::REJECT, 0x09));
    assert_eq!(u32::from_be_bytes(data[16..20].try_into().unwrap()), 0xdead);
    // Immediate data longer than the expected transfer: Reject, nothing written.
    let mut cdb = [0u8; 10];
    cdb[0] = 0x2a;
    cdb[8] = 1;
    let b = i.command_pdu(&cdb, 512, false, true);
    i.send(&b, &[0xee; 4096]);
    let (rej, _) = i.recv().expect("a Reject");
    assert_eq!(rej.opcode(), op::REJECT);
    assert!(
        i.read10(0, 8).data == original,
        "the session goes on and nothing was written"
    );

    // A data segment over what the target declared it receives: the connection closes.
    let mut big = Bhs::new(op::NOP_OUT | 0x40, 0x80);
    big.set_u32(16, 0xffff_ffff).set_data_len(16 << 20);
    i.sock.write_all(&big.0).unwrap();
    assert!(i.recv().is_none(), "the connection is closed");

    // Seeded garbage after login, many times over: never a panic, never a write.
    let mut seed = 0x9e37_79b9u32;
    for _ in 0..20 {
        let mut i = Initiator::login(&t.addr, IQN, None).unwrap();
        let junk: Vec<u8> = (0..4096)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 17;
                seed ^= seed << 5;
                seed as u8
            })
            .collect();
        let _ = i.sock.write_all(&junk);
        let _ = i.sock.shutdown(std::net::Shutdown::Write);
        while i.recv().is_some() {}
    }
    let mut i = Initiator::login(&t.addr, IQN, None).expect("the target still serves");
    assert!(i.read10(0, 8).data == original, "garbage wrote nothing");
}

#[test]
fn chap_one_way_and_mutual() {
    let dir = tempfile::tempdir().unwrap();
    let r = replicas(dir.path(), 1);
    let secret = dir.path().join("secret");
    std::fs::write(&secret, "initiator-secret-1\n").unwrap();
    let mutual = dir.path().join("mutual");
    std::fs::write(&mutual, "target-secret-22").unwrap();
    let s = secret.to_str().unwrap();
    let m = mutual.to_str().unwrap();
    let t = start_target(
        &[&r[0]],
        &[
            "--chap-user",
            "alice",
            "--chap-secret-file",
            s,
            "--mutual-user",
            "horn",
            "--mutual-secret-file",
            m,
        ],
    )
    .unwrap();
    let chap = |user, secret| Chap {
        user,
        secret,
        mutual: Some(("horn", "target-secret-22")),
    };
    let mut i = Initiator::login(&t.addr, IQN, Some(chap("alice", "initiator-secret-1")))
        .expect("the right secret logs in, and the target proves its own");
    assert_eq!(i.read10(0, 1).status, 0);
    assert_eq!(
        Initiator::login(&t.addr, IQN, Some(chap("alice", "wrong-secret-123"))).err(),
        Some((2, 1)),
        "a wrong secret: authentication failure"
    );
    assert_eq!(
        Initiator::login(&t.addr, IQN, Some(chap("mallory", "initiator-secret-1"))).err(),
        Some((2, 1))
    );
    assert_eq!(
        Initiator::login(&t.addr, IQN, None).err(),
        Some((2, 1)),
        "no CHAP at all"
    );
    let one_way = Chap {
        user: "alice",
        secret: "initiator-secret-1",
        mutual: None,
    };
    assert_eq!(
        Initiator::login(&t.addr, IQN, Some(one_way)).err(),
        Some((2, 1)),
        "the target asks for mutual CHAP"
    );

    // CHAP is required: a target given neither credentials nor --no-chap does not
    // start, saying so.
    let out = Command::new(env!("CARGO_BIN_EXE_hornd"))
        .args([
            "engine",
            "--control",
            "127.0.0.1:0",
            "--frontend",
            "iscsi",
            "--listen",
            "127.0.0.1:0",
        ])
        .arg("--replica")
        .arg(format!(
            "{},{}",
            r[0].addr,
            r[0].control.trim_start_matches("http://")
        ))
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && e.contains("requires CHAP"), "{e}");

    // A secret too short is refused before anything is served.
    std::fs::write(&secret, "short").unwrap();
    let e = start_target(&[&r[0]], &["--chap-user", "alice", "--chap-secret-file", s])
        .err()
        .unwrap();
    assert!(e.contains("12 to 255"), "{e}");
}

#[test]
fn discovery_lists_the_target_and_a_wrong_name_is_not_found() {
    let dir = tempfile::tempdir().unwrap();
    let r = replicas(dir.path(), 1);
    let t = start_target(&[&r[0]], &[]).unwrap();
    assert_eq!(
        Initiator::login(&t.addr, "iqn.2026-11.io.horn:nope", None).err(),
        Some((2, 3))
    );

    let mut i = Initiator::connect(&t.addr);
    let mut b = Bhs::new(op::LOGIN | 0x40, 0x80 | (1 << 2) | 3);
    b.set_u32(16, 1);
    let keys = horn_iscsi::text::encode(&[
        (
            "InitiatorName".into(),
            "iqn.2026-11.io.horn:test-initiator".into(),
        ),
        ("SessionType".into(), "Discovery".into()),
    ]);
    i.send(&b, &keys);
    let (r, _) = i.recv().unwrap();
    assert_eq!((r.opcode(), r.0[36]), (op::LOGIN_RESP, 0));
    let mut q = Bhs::new(op::TEXT | 0x40, 0x80);
    q.set_u32(16, 2).set_u32(20, 0xffff_ffff);
    i.send(
        &q,
        &horn_iscsi::text::encode(&[("SendTargets".into(), "All".into())]),
    );
    let (r, d) = i.recv().unwrap();
    assert_eq!(r.opcode(), op::TEXT_RESP);
    let text = String::from_utf8_lossy(&d);
    assert!(text.contains(&format!("TargetName={IQN}")), "{text}");
    assert!(text.contains(&format!("TargetAddress={},1", t.addr)), "{text}");
}

/// A small, seeded generator (xorshift), so that a failure can be replayed.
struct Seeded(u64);

impl Seeded {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

#[test]
fn mutations_of_a_recorded_session_never_crash_the_target() {
    let dir = tempfile::tempdir().unwrap();
    let r = replicas(dir.path(), 1);
    let t = start_target_logged(&[&r[0]], &[], &dir.path().join("target.log")).unwrap();

    // The corpus: every byte a real session sends (login and negotiation, writes with
    // immediate data, reads, a NOP-Out, a logout), recorded from the socket.
    let corpus = {
        let mut i = Initiator::login_recorded(&t.addr, IQN).unwrap();
        assert_eq!(i.write10(2048, &pattern(5, 8192)).status, 0);
        assert_eq!(i.read10(2048, 16).status, 0);
        i.nop();
        i.logout();
        i.recorded()
    };
    let (corpus, headers) = corpus;
    assert!(
        corpus.len() > 8192 && headers.len() >= 6,
        "{} PDUs",
        headers.len()
    );
    // Most mutations land in a header (where the parsers are), some anywhere.
    let spot = |rng: &mut Seeded| {
        if rng.below(4) == 0 {
            rng.below(corpus.len())
        } else {
            headers[rng.below(headers.len())] + rng.below(48)
        }
    };

    let seed = std::env::var("HORN_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed_1234_u64);
    let mut rng = Seeded(seed);
    let runs = 150;
    for _ in 0..runs {
        let mut bytes = corpus.clone();
        match rng.below(4) {
            // Flip bits.
            0 | 1 => {
                for _ in 0..1 + rng.below(6) {
                    let at = spot(&mut rng);
                    bytes[at] ^= 1 << rng.below(8);
                }
            }
            // Extreme values in place.
            2 => {
                for _ in 0..1 + rng.below(4) {
                    let at = spot(&mut rng);
                    bytes[at] = [0x00, 0xff, 0x7f, 0x80][rng.below(4)];
                }
            }
            // Cut it short, or repeat a slice of it.
            _ => {
                let at = rng.below(bytes.len());
                if rng.below(2) == 0 {
                    bytes.truncate(at);
                } else {
                    let len = rng.below(200).min(bytes.len() - at);
                    let slice = bytes[at..at + len].to_vec();
                    bytes.splice(at..at, slice);
                }
            }
        }
        let mut i = Initiator::connect(&t.addr);
        i.sock.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let _ = i.sock.write_all(&bytes);
        let _ = i.sock.shutdown(std::net::Shutdown::Write);
        while i.recv().is_some() {}
    }
    assert!(t.child.id() > 0);
    let mut i = Initiator::login(&t.addr, IQN, None).expect("the target still serves after the mutations");
    assert_eq!(i.read10(0, 8).status, 0);
    let log = std::fs::read_to_string(&t.log).unwrap();
    assert!(
        !log.contains("panicked"),
        "the target panicked (seed {seed:#x}):\n{log}"
    );
    // The mutations reached the parsers: some logins were refused, some PDUs rejected
    // or connections closed on protocol errors.
    assert!(log.contains("login refused"), "no login was refused:\n{log}");
    assert!(
        log.contains("iSCSI connection ended"),
        "no connection ended on an error:\n{log}"
    );
}

#[test]
fn writes_waiting_for_data_are_bounded_with_task_set_full() {
    let dir = tempfile::tempdir().unwrap();
    let r = replicas(dir.path(), 1);
    let t = start_target(&[&r[0]], &[]).unwrap();
    let mut i = Initiator::login(&t.addr, IQN, None).unwrap();
    // WRITE(10) of 8 MiB each (the largest transfer), whose data never comes: the
    // target asks for it (R2T) and keeps a buffer for each, up to its bound of 64 MiB.
    let mut cdb = [0u8; 10];
    cdb[0] = 0x2a;
    cdb[7..9].copy_from_slice(&16384u16.to_be_bytes());
    let mut itts = Vec::new();
    for _ in 0..9 {
        let b = i.command_pdu(&cdb, 8 << 20, false, true);
        itts.push(b.itt());
        i.send(&b, &[]);
    }
    let ninth = itts[8];
    loop {
        let (p, _) = i.recv().expect("the target answers");
        if p.opcode() == op::R2T {
            assert!(itts[..8].contains(&p.itt()), "R2Ts only for the first eight");
            continue;
        }
        assert_eq!(
            (p.opcode(), p.itt(), p.0[3]),
            (op::SCSI_RESP, ninth, 0x28),
            "TASK SET FULL"
        );
        break;
    }
}

/// Across connections too: four sessions hold 64 MiB of waiting writes each, the
/// LUN's budget of 256 MiB; a fifth session's first waiting write gets TASK SET FULL
/// (before, each connection had its own 64 MiB and nothing bounded them together), and
/// once a session ends its share is free again.
#[test]
fn waiting_write_data_is_bounded_across_connections() {
    let dir = tempfile::tempdir().unwrap();
    let r = replicas(dir.path(), 1);
    let t = start_target(&[&r[0]], &[]).unwrap();
    let mut cdb = [0u8; 10];
    cdb[0] = 0x2a;
    cdb[7..9].copy_from_slice(&16384u16.to_be_bytes());
    // Sends `n` 8 MiB writes whose data never comes; how many the target asked data for.
    let hold = |i: &mut Initiator, n: usize| -> usize {
        let mut itts = Vec::new();
        for _ in 0..n {
            let b = i.command_pdu(&cdb, 8 << 20, false, true);
            itts.push(b.itt());
            i.send(&b, &[]);
        }
        let (mut asked, mut answered) = (std::collections::BTreeSet::new(), 0);
        while asked.len() + answered < n {
            let (p, _) = i.recv().expect("the target answers");
            if p.opcode() == op::R2T {
                asked.insert(p.itt());
            } else {
                assert_eq!((p.opcode(), p.0[3]), (op::SCSI_RESP, 0x28), "TASK SET FULL");
                answered += 1;
            }
        }
        asked.len()
    };
    let mut sessions: Vec<Initiator> = (0..4)
        .map(|_| Initiator::login(&t.addr, IQN, None).unwrap())
        .collect();
    for s in &mut sessions {
        assert_eq!(hold(s, 8), 8, "within a session's 64 MiB and the LUN's 256 MiB");
    }
    let mut fifth = Initiator::login(&t.addr, IQN, None).unwrap();
    assert_eq!(hold(&mut fifth, 1), 0, "the LUN's budget is spent");
    // A session ends: its writes, and their share, go.
    sessions.pop().unwrap().logout();
    common::eventually(
        Duration::from_secs(10),
        "the ended session's share never came back",
        || hold(&mut fifth, 1) > 0,
    );
}

/// COMPARE AND WRITE(16) of one block at `lba`: `expect` must be there for `new` to
/// replace it.
fn compare_and_write(i: &mut Initiator, lba: u64, expect: &[u8], new: &[u8]) -> common::iscsi::Reply {
    let mut cdb = [0u8; 16];
    cdb[0] = 0x89;
    cdb[2..10].copy_from_slice(&lba.to_be_bytes());
    cdb[13] = 1;
    i.command(&cdb, &[expect, new].concat(), 0)
}

#[test]
fn compare_and_write_is_atomic_across_sessions() {
    // Sessions bump a counter in block 0 with read, then COMPARE AND WRITE of the value
    // read to the value plus one, retrying on a miscompare; another session keeps
    // writing block 1 meanwhile. If a compare and its write could be split by another
    // session's, two bumps from one value would both succeed and the count would come
    // up short.
    let dir = tempfile::tempdir().unwrap();
    let r = replicas(dir.path(), 3);
    let t = start_target(&r.iter().collect::<Vec<_>>(), &[]).unwrap();
    const BUMPS: u64 = 150;
    const SESSIONS: usize = 3;
    let block = |v: u64| {
        let mut b = vec![0u8; 512];
        b[..8].copy_from_slice(&v.to_le_bytes());
        b
    };
    let mut first = Initiator::login(&t.addr, IQN, None).unwrap();
    assert_eq!(first.write10(0, &block(0)).status, 0);
    let miscompares = std::sync::atomic::AtomicU64::new(0);
    std::thread::scope(|s| {
        for _ in 0..SESSIONS {
            s.spawn(|| {
                let mut i = Initiator::login(&t.addr, IQN, None).unwrap();
                let mut done = 0;
                while done < BUMPS {
                    let now = i.read10(0, 1);
                    assert_eq!(now.status, 0);
                    let v = u64::from_le_bytes(now.data[..8].try_into().unwrap());
                    let r = compare_and_write(&mut i, 0, &block(v), &block(v + 1));
                    match (r.status, r.sense.get(2).map(|k| k & 0x0f)) {
                        (0, _) => done += 1,
                        (2, Some(0x0e)) => {
                            miscompares.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                        other => panic!("COMPARE AND WRITE: {other:?}"),
                    }
                }
            });
        }
        s.spawn(|| {
            let mut i = Initiator::login(&t.addr, IQN, None).unwrap();
            for n in 0..300u64 {
                assert_eq!(i.write10(1, &block(n)).status, 0);
            }
        });
    });
    let end = first.read10(0, 1);
    let count = u64::from_le_bytes(end.data[..8].try_into().unwrap());
    eprintln!(
        "{} bumps made, {} miscompares retried",
        count,
        miscompares.load(std::sync::atomic::Ordering::Relaxed)
    );
    assert_eq!(
        count,
        BUMPS * SESSIONS as u64,
        "every successful COMPARE AND WRITE counted once"
    );
}

/// A stopped engine (SIGSTOP) that a newer engine deposed meanwhile serves no stale
/// read when it goes on (SIGCONT), although the replica it reads from (its local one)
/// was never claimed by the newer engine and still holds the old data: its read lease
/// lapsed while it was stopped, so it holds the read back, and its next renewal finds
/// it deposed. Without read leases it returned the old data.
#[test]
fn a_stopped_engine_deposed_meanwhile_serves_no_stale_read_when_it_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let r = replicas(dir.path(), 3);
    let spec = |d: &Daemon, local: bool| {
        format!(
            "{},{}{}",
            d.addr,
            d.control.trim_start_matches("http://"),
            if local { ",local" } else { "" }
        )
    };
    let specs = [spec(&r[0], true), spec(&r[1], false), spec(&r[2], false)];
    let mut args = Vec::new();
    for s in &specs {
        args.extend(["--replica", s.as_str()]);
    }
    let t = start_target(&[], &args).unwrap();
    let mut i = Initiator::login(&t.addr, IQN, None).unwrap();
    let old = pattern(1, 64 * 1024);
    assert_eq!(i.write10(0, &old).status, 0);
    assert!(i.read10(0, 128).data == old);

    // SIGSTOP: the engine neither renews nor serves.
    // SAFETY: kill takes no pointers; the pid is our child's.
    unsafe { libc::kill(t.child.id() as i32, libc::SIGSTOP) };
    // A newer engine on the other two replicas (a majority): it waits for the
    // stopped engine's leases to lapse, claims them and overwrites the data.
    let started = std::time::Instant::now();
    let (mut newer, report) = horn_engine::Volume::start(
        &[r[1].replica_addr(), r[2].replica_addr()],
        Duration::from_secs(3),
    )
    .unwrap();
    println!(
        "the newer engine started after {:.1?} (the stopped engine's lease lapsed)",
        started.elapsed()
    );
    assert_eq!(report.used.len(), 2, "{report:?}");
    let new = pattern(2, 64 * 1024);
    newer.write_at(0, &new).unwrap();
    newer.flush().unwrap();

    // SIGCONT: the old engine reads from its local replica, which holds the old data.
    // SAFETY: as above.
    unsafe { libc::kill(t.child.id() as i32, libc::SIGCONT) };
    let back = i.read10(0, 128);
    assert!(
        back.data != old,
        "the deposed engine served the data the newer engine had overwritten"
    );
    assert!(
        back.status != 0 || back.data == new,
        "status {} and data that is neither engine's",
        back.status
    );
    println!("the deposed engine's read: status {}", back.status);
    let log = std::fs::read_to_string(&t.log).unwrap_or_default();
    assert!(log.contains("deposed"), "{log}");
    // Every write the newer engine acknowledged reads back, and its replicas agree.
    let mut back = vec![0u8; new.len()];
    newer.read_at(0, &mut back).unwrap();
    assert!(back == new, "the newer engine's acknowledged write was lost");
    let report = newer.verify(|_, _| {}).unwrap();
    assert!(report.differences.is_empty(), "{report:?}");
    newer.close().unwrap();
}

/// Connections that end in every state before a session (at once, after garbage, with
/// a PDU cut short, after a refused login) leave no descriptor behind. Before, each
/// stayed open on the target's side in CLOSE-WAIT for good (18 → 979 open files after
/// 1,000 of them), until the process ran out of descriptors.
#[test]
fn connections_that_end_before_a_session_leave_no_descriptor() {
    let dir = tempfile::tempdir().unwrap();
    let r = replicas(dir.path(), 1);
    let t = start_target(&[&r[0]], &[]).unwrap();
    let pid = t.child.id();
    // One session first: the sockets it leaves (the engine's to its replica) stay.
    let mut i = Initiator::login(&t.addr, IQN, None).unwrap();
    assert_eq!(i.write10(0, &pattern(5, 4096)).status, 0);
    let baseline = common::open_sockets(pid);
    for n in 0..1000u32 {
        let mut s = std::net::TcpStream::connect(&t.addr).unwrap();
        match n % 4 {
            0 => {}
            1 => s.write_all(&[0xa5; 48]).unwrap(),
            2 => {
                let mut login = Bhs::new(op::LOGIN, 0x87);
                login.set_u32(16, n);
                s.write_all(&login.0[..20]).unwrap();
            }
            _ => {
                assert!(Initiator::login(&t.addr, "iqn.2026-11.io.horn:nobody", None).is_err());
            }
        }
    }
    let open = common::wait_for_sockets(pid, baseline);
    println!("1,000 connections ended before a session: {open} sockets open, {baseline} before");
    assert_eq!(open, baseline);
    // The target still serves.
    assert!(i.read10(0, 8).data == pattern(5, 4096));
    assert!(Initiator::login(&t.addr, IQN, None).is_ok());
}

/// Past `--max-connections`, a login is refused with "out of resources" (3/2) and the
/// connection closed; once a session ends, a new login is taken.
#[test]
fn logins_past_the_connection_limit_are_refused_out_of_resources() {
    let dir = tempfile::tempdir().unwrap();
    let r = replicas(dir.path(), 1);
    let t = start_target(&[&r[0]], &["--max-connections", "2"]).unwrap();
    let mut a = Initiator::login(&t.addr, IQN, None).unwrap();
    let _b = Initiator::login(&t.addr, IQN, None).unwrap();
    assert_eq!(
        Initiator::login(&t.addr, IQN, None).err(),
        Some((3, 2)),
        "a third login past a limit of 2"
    );
    a.logout();
    drop(a);
    common::eventually(
        Duration::from_secs(10),
        "the ended session's slot never freed",
        || match Initiator::login(&t.addr, IQN, None) {
            Ok(_) => true,
            Err(e) => {
                assert_eq!(e, (3, 2));
                false
            }
        },
    );
}

/// With the process out of descriptors, accepts fail; the listener logs, waits and
/// goes on, and serves again once descriptors are free. Before, the first EMFILE ended
/// the listener for good while the engine kept running.
#[test]
fn the_listener_survives_running_out_of_descriptors() {
    let dir = tempfile::tempdir().unwrap();
    let r = replicas(dir.path(), 1);
    let t = start_target(&[&r[0]], &[]).unwrap();
    let pid = t.child.id();
    let prlimit = |n: usize| {
        Command::new("prlimit")
            .args(["--pid", &pid.to_string(), &format!("--nofile={n}:")])
            .status()
    };
    // Its soft limit, to give back.
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let soft: usize = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|v| v.parse().ok())
        .unwrap();
    // Below every descriptor it has: every new one, an accept's too, fails with EMFILE.
    match prlimit(3) {
        Ok(s) if s.success() => {}
        other => {
            common::skip(
                "the_listener_survives_running_out_of_descriptors",
                &format!("prlimit could not lower the target's descriptor limit: {other:?}"),
            );
            return;
        }
    }
    let waiting: Vec<std::net::TcpStream> = (0..5)
        .map(|_| std::net::TcpStream::connect(&t.addr).unwrap())
        .collect();
    // The listener meets the limit (and logs it) before it is lifted.
    common::eventually(
        Duration::from_secs(10),
        "the listener never ran out of descriptors",
        || {
            std::fs::read_to_string(&t.log)
                .unwrap_or_default()
                .contains("accept failed")
        },
    );
    assert!(prlimit(soft).unwrap().success());
    drop(waiting);
    // A listener that ended would leave this login unanswered (the kernel still
    // completes the connection): the initiator's read would time out.
    let mut i = Initiator::login(&t.addr, IQN, None).unwrap();
    assert_eq!(i.write10(0, &pattern(9, 4096)).status, 0);
    let log = std::fs::read_to_string(&t.log).unwrap_or_default();
    assert!(
        log.contains("accept failed"),
        "no accept failed for want of descriptors: {log}"
    );
}

/// A transfer longer than the MAXIMUM TRANSFER LENGTH the Block Limits page advertises
/// gets ILLEGAL REQUEST, INVALID FIELD IN CDB (before, a read between the page's 8 MiB
/// and 16 MiB reached the engine and failed as a MEDIUM ERROR), and one at the limit
/// goes through.
#[test]
fn transfers_past_the_advertised_maximum_are_invalid_fields_in_the_cdb() {
    let dir = tempfile::tempdir().unwrap();
    let r = replicas(dir.path(), 1);
    let t = start_target(&[&r[0]], &[]).unwrap();
    let mut i = Initiator::login(&t.addr, IQN, None).unwrap();
    // Block Limits: MAXIMUM TRANSFER LENGTH, in 512-byte blocks.
    let vpd = i.command(&[0x12, 0x01, 0xb0, 0, 64, 0], &[], 64);
    assert_eq!(vpd.status, 0);
    let max_blocks = u32::from_be_bytes(vpd.data[8..12].try_into().unwrap());
    assert_eq!(max_blocks, (8 << 20) / 512, "the page advertises 8 MiB");
    let cdb16 = |op: u8, blocks: u32| {
        let mut c = [0u8; 16];
        c[0] = op;
        c[10..14].copy_from_slice(&blocks.to_be_bytes());
        c
    };
    let illegal = |r: &common::iscsi::Reply| {
        (
            r.status,
            r.sense.get(2).map(|k| k & 0x0f),
            r.sense.get(12).copied(),
        )
    };
    let over = max_blocks + 8192;
    let read = i.command(&cdb16(0x88, over), &[], over * 512);
    assert_eq!(illegal(&read), (2, Some(0x05), Some(0x24)), "READ(16) of 12 MiB");
    let write = i.command(&cdb16(0x8a, over), &pattern(3, 4096), 0);
    assert_eq!(
        illegal(&write),
        (2, Some(0x05), Some(0x24)),
        "WRITE(16) naming 12 MiB"
    );
    // At the limit, it goes through.
    let read = i.command(&cdb16(0x88, max_blocks), &[], max_blocks * 512);
    assert_eq!((read.status, read.data.len()), (0, 8 << 20));
}

/// CHAP against guessing: after two failed logins in a row from one address, each
/// failure is answered later (250 ms, 500 ms, ... up to 8 s); a good login clears the
/// count. With `--discovery-auth`, a discovery session must authenticate too (without
/// it, anyone may list the target).
#[test]
fn chap_guesses_are_answered_ever_later_and_discovery_can_require_it() {
    let dir = tempfile::tempdir().unwrap();
    let r = replicas(dir.path(), 1);
    let secret = dir.path().join("secret");
    std::fs::write(&secret, "initiator-secret-1").unwrap();
    let t = start_target(
        &[&r[0]],
        &[
            "--chap-user",
            "alice",
            "--chap-secret-file",
            secret.to_str().unwrap(),
            "--discovery-auth",
        ],
    )
    .unwrap();
    let chap = |secret| {
        Some(Chap {
            user: "alice",
            secret,
            mutual: None,
        })
    };
    let mut took = Vec::new();
    for _ in 0..5 {
        let at = std::time::Instant::now();
        assert_eq!(
            Initiator::login(&t.addr, IQN, chap("a-wrong-guess-00")).err(),
            Some((2, 1))
        );
        took.push(at.elapsed());
    }
    println!("five wrong CHAP logins answered after {took:?}");
    assert!(
        took[0] < Duration::from_millis(250) && took[1] < Duration::from_millis(250),
        "{took:?}"
    );
    assert!(took[2] >= Duration::from_millis(250), "{took:?}");
    assert!(took[4] >= Duration::from_millis(1000), "{took:?}");
    // The right secret still logs in (after its own wait is served); then the count
    // starts over.
    Initiator::login(&t.addr, IQN, chap("initiator-secret-1")).unwrap();
    let at = std::time::Instant::now();
    assert_eq!(
        Initiator::login(&t.addr, IQN, chap("a-wrong-guess-00")).err(),
        Some((2, 1))
    );
    assert!(at.elapsed() < Duration::from_millis(250), "{:?}", at.elapsed());
    // Discovery: refused without CHAP, taken with it.
    assert_eq!(Initiator::login_discovery(&t.addr, None).err(), Some((2, 1)));
    Initiator::login_discovery(&t.addr, chap("initiator-secret-1")).unwrap();
}

/// A volume that has lost every replica fails every I/O. The log gets a line per
/// burst of failures, with a count, not one per I/O (before: a line per read).
#[test]
fn a_storm_of_failed_ios_logs_a_line_per_burst_not_per_io() {
    let dir = tempfile::tempdir().unwrap();
    let r = replicas(dir.path(), 1);
    let t = start_target(&[&r[0]], &[]).unwrap();
    let mut i = Initiator::login(&t.addr, IQN, None).unwrap();
    assert_eq!(i.write10(0, &pattern(1, 4096)).status, 0);
    r[0].signal(libc::SIGKILL);
    let failed = (0..2000).filter(|_| i.read10(0, 8).status != 0).count();
    assert!(failed >= 1990, "only {failed} of 2000 reads failed");
    let log = std::fs::read_to_string(&t.log).unwrap_or_default();
    let lines = log
        .lines()
        .filter(|l| l.contains("a read of 8 blocks at LBA 0 failed"))
        .count();
    println!("{failed} reads failed; {lines} log lines about them");
    assert!(
        (1..=3).contains(&lines),
        "{lines} lines for {failed} failed reads:\n{log}"
    );
}
