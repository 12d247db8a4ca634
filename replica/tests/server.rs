//! The replica server over real TCP sockets: pipelined I/O, generations, malformed
//! input, control calls and stopping.

use std::io::Write;
use std::net::TcpListener;
use std::thread::JoinHandle;
use std::time::Duration;

use horn_proto::client::BlockingClient;
use horn_proto::wire::{Header, Op, Status, FLAG_FUA};
use horn_replica::server::{DataServer, ServerHandle};
use horn_replica::Replica;

const SIZE: u64 = 16 << 20;

struct Served {
    addr: std::net::SocketAddr,
    handle: ServerHandle,
    thread: Option<JoinHandle<horn_replica::Result<()>>>,
    dir: tempfile::TempDir,
}

impl Served {
    fn start(generation: u64) -> Served {
        let dir = tempfile::tempdir().unwrap();
        let mut r = Replica::create(dir.path().join("r"), SIZE, 512).unwrap();
        r.set_generation(generation).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let server = DataServer::new(r, listener).unwrap();
        let handle = server.handle();
        let thread = Some(std::thread::spawn(move || server.run()));
        Served {
            addr,
            handle,
            thread,
            dir,
        }
    }

    fn client(&self) -> Client {
        Client(BlockingClient::connect(self.addr, Duration::from_secs(10)).unwrap())
    }

    /// Stops the server and reopens its replica, as a restarted process would.
    fn stop_and_reopen(mut self) -> (Replica, tempfile::TempDir) {
        self.handle.stop();
        self.thread.take().unwrap().join().unwrap().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let dir = std::mem::replace(&mut self.dir, dir);
        (Replica::open(dir.path().join("r")).unwrap(), dir)
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        if let Some(t) = self.thread.take() {
            self.handle.stop();
            let _ = t.join();
        }
    }
}

/// The blocking client with test-friendly panics on socket errors.
struct Client(BlockingClient);

impl Client {
    fn send(&mut self, h: Header, payload: &[u8]) {
        self.0.send(&h, payload).unwrap();
    }
    fn recv(&mut self) -> (Header, Vec<u8>) {
        let (h, p) = self.0.recv().unwrap();
        assert!(h.reply);
        (h, p)
    }
    fn write(&mut self, id: u64, off: u64, data: &[u8], gen: u64) -> (Header, Vec<u8>) {
        self.0.write(id, off, data, gen).unwrap()
    }
    fn read(&mut self, id: u64, off: u64, len: u32, gen: u64) -> (Header, Vec<u8>) {
        self.0.read(id, off, len, gen).unwrap()
    }
    fn closed(&mut self) -> bool {
        self.0.closed()
    }
}

#[test]
fn pipelined_writes_and_reads_come_back_by_id() {
    let srv = Served::start(1);
    let mut c = srv.client();
    // 64 writes sent before any reply is read.
    for i in 0..64u64 {
        let data = vec![i as u8 + 1; 4096];
        c.send(Header::request(Op::Write, i, i * 4096, 4096, 1), &data);
    }
    let mut ids: Vec<u64> = (0..64)
        .map(|_| c.recv())
        .map(|(h, p)| {
            assert_eq!(h.status, Status::Ok, "{}", String::from_utf8_lossy(&p));
            assert_eq!(h.op, Op::Write);
            h.id
        })
        .collect();
    ids.sort_unstable();
    assert_eq!(ids, (0..64).collect::<Vec<_>>());
    for i in 0..64u64 {
        c.send(Header::request(Op::Read, 100 + i, i * 4096, 4096, 1), &[]);
    }
    for _ in 0..64 {
        let (h, p) = c.recv();
        assert_eq!(h.status, Status::Ok);
        let i = h.id - 100;
        assert!(p.iter().all(|&b| b == i as u8 + 1), "block {i}");
    }
    c.send(Header::request(Op::Flush, 500, 0, 0, 1), &[]);
    assert_eq!(c.recv().0.status, Status::Ok);
    c.send(Header::request(Op::Ping, 501, 0, 0, 1), &[]);
    assert_eq!(c.recv().0.id, 501);
}

#[test]
fn a_fua_write_and_discard_work_and_large_ios_cross_many_segments() {
    let srv = Served::start(1);
    let mut c = srv.client();
    let big: Vec<u8> = (0..(4 << 20)).map(|i| (i % 251) as u8).collect();
    let h = Header {
        flags: FLAG_FUA,
        ..Header::request(Op::Write, 1, 8192, big.len() as u32, 1)
    };
    c.send(h, &big);
    assert_eq!(c.recv().0.status, Status::Ok);
    let (h, p) = c.read(2, 8192, big.len() as u32, 1);
    assert_eq!(h.status, Status::Ok);
    assert!(p == big);
    c.send(Header::request(Op::Discard, 3, 8192, 1 << 20, 1), &[]);
    assert_eq!(c.recv().0.status, Status::Ok);
    let (_, p) = c.read(4, 8192, 1 << 20, 1);
    assert!(p.iter().all(|&b| b == 0));
}

#[test]
fn large_writes_in_flight_together_each_land_with_their_own_bytes() {
    // The server keeps large writes' buffers for the next ones: rounds of writes of
    // mixed sizes, each sent before any reply is read, must each land whole.
    let srv = Served::start(1);
    let mut c = srv.client();
    let sizes: [usize; 4] = [64 << 10, 1 << 20, 2 << 20, 96 << 10];
    let mut expect = vec![0u8; SIZE as usize];
    let mut id = 0;
    for round in 0..3u8 {
        let mut at = (round as usize) * (128 << 10);
        let mut sent = 0;
        while at + (2 << 20) <= SIZE as usize {
            let len = sizes[(id as usize) % sizes.len()];
            let data: Vec<u8> = (0..len)
                .map(|i| (i / 4096) as u8 ^ id as u8 ^ round.wrapping_mul(37))
                .collect();
            expect[at..at + len].copy_from_slice(&data);
            c.send(Header::request(Op::Write, id, at as u64, len as u32, 1), &data);
            id += 1;
            sent += 1;
            at += len;
        }
        for _ in 0..sent {
            let (h, p) = c.recv();
            assert_eq!(h.status, Status::Ok, "{}", String::from_utf8_lossy(&p));
        }
    }
    for (i, want) in expect.chunks(1 << 20).enumerate() {
        let (h, got) = c.read(10_000 + i as u64, (i << 20) as u64, 1 << 20, 1);
        assert_eq!(h.status, Status::Ok);
        assert!(
            got == want,
            "the MiB at {i} MiB differs from what was written last"
        );
    }
}

#[test]
fn an_older_generation_is_refused_and_writes_nothing() {
    let srv = Served::start(5);
    let mut c = srv.client();
    let (h, msg) = c.write(1, 0, &[9u8; 4096], 4);
    assert_eq!(h.status, Status::StaleGeneration);
    assert!(
        String::from_utf8_lossy(&msg).contains("older"),
        "{}",
        String::from_utf8_lossy(&msg)
    );
    let (h, msg) = c.write(2, 0, &[9u8; 4096], 6);
    assert_eq!(h.status, Status::Unavailable, "{}", String::from_utf8_lossy(&msg));
    let (h, p) = c.read(3, 0, 4096, 5);
    assert_eq!(h.status, Status::Ok);
    assert!(p.iter().all(|&b| b == 0), "the refused writes left nothing");
    // A newer engine claims the replica: the old generation is refused from then on.
    srv.handle.call(|r| r.set_generation(7)).unwrap().unwrap();
    assert_eq!(c.read(4, 0, 4096, 5).0.status, Status::StaleGeneration);
    assert_eq!(c.read(5, 0, 4096, 7).0.status, Status::Ok);
    let err = srv.handle.call(|r| r.set_generation(6)).unwrap().unwrap_err();
    assert!(err.to_string().contains("older"), "{err}");
}

#[test]
fn requests_past_the_end_or_misaligned_get_an_error_and_the_connection_goes_on() {
    let srv = Served::start(1);
    let mut c = srv.client();
    let (h, msg) = c.write(1, SIZE - 512, &[1u8; 1024], 1);
    assert_eq!(h.status, Status::OutOfRange, "{}", String::from_utf8_lossy(&msg));
    assert!(String::from_utf8_lossy(&msg).contains("past the end"));
    assert_eq!(c.read(2, 100, 512, 1).0.status, Status::Misaligned);
    let (h, p) = c.read(3, SIZE - 512, 512, 1);
    assert_eq!(h.status, Status::Ok);
    assert!(p.iter().all(|&b| b == 0));
}

/// Each malformed header: a "bad request" reply echoing the id (when one can be read),
/// then a closed connection; nothing executed; the server goes on serving others.
#[test]
fn malformed_headers_close_the_connection_and_execute_nothing() {
    let srv = Served::start(1);
    let good = Header::request(Op::Write, 77, 0, 4096, 1).encode();
    let mut cases: Vec<(&str, Vec<u8>)> = Vec::new();
    let mut bad_magic = good;
    bad_magic[0] = b'X';
    cases.push(("wrong magic", bad_magic.to_vec()));
    let mut bad_op = good;
    bad_op[5] = 0x42;
    cases.push(("unknown op", bad_op.to_vec()));
    let mut oversized = good;
    oversized[24..28].copy_from_slice(&(64u32 << 20).to_le_bytes());
    cases.push(("oversized payload", oversized.to_vec()));
    let mut reply = good;
    reply[5] |= 0x80;
    cases.push(("a reply sent as a request", reply.to_vec()));
    for (what, bytes) in cases {
        let mut c = srv.client();
        c.0.stream().write_all(&bytes).unwrap();
        c.0.stream().write_all(&[5u8; 4096]).unwrap_or(()); // a payload, in case it were taken
        let (h, msg) = c.recv();
        assert_eq!(h.status, Status::BadRequest, "{what}");
        assert_eq!(h.id, 77, "{what}");
        assert!(!msg.is_empty(), "{what}: the reply says why");
        assert!(c.closed(), "{what}: the connection was not closed");
    }
    // A truncated header, then the client goes away.
    let mut c = srv.client();
    c.0.stream().write_all(&good[..20]).unwrap();
    drop(c);
    let mut c = srv.client();
    let (h, p) = c.read(1, 0, 4096, 1);
    assert_eq!(h.status, Status::Ok);
    assert!(p.iter().all(|&b| b == 0), "no malformed request wrote anything");
}

#[test]
fn control_calls_run_between_ios_and_stop_closes_everything_cleanly() {
    let srv = Served::start(1);
    let mut c = srv.client();
    c.write(1, 0, &[3u8; 4096], 1);
    srv.handle
        .call(|r| r.snapshot("snap", &Default::default()))
        .unwrap()
        .unwrap();
    c.write(2, 0, &[4u8; 4096], 1);
    let chain = srv.handle.call(|r| r.info().unwrap().chain_length).unwrap();
    assert_eq!(chain, 2);
    let (mut r, _dir) = srv.stop_and_reopen();
    assert!(c.closed(), "stopping closes client connections");
    r.revert("snap").unwrap();
    let mut b = [0u8; 4096];
    r.read_at(0, &mut b).unwrap();
    assert_eq!(b, [3u8; 4096]);
}
