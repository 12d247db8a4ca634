//! What the fuzz targets share: a cursor that reads a fuzz input as a stream of
//! fields, a scratch directory for targets that need files, and the file formats'
//! checksum lines, so a target can give the parser behind a checksum inputs that pass
//! it.
//!
//! No target depends on another; each file in `fuzz_targets/` says at its top what it
//! feeds and what it checks. Nothing here uses libFuzzer, so the seed generator
//! (`examples/seeds.rs`) builds without it.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// A fuzz input read front to back as fields. Past the end every read gives zeros (or
/// an empty slice), so a target never has to handle a short input specially.
#[derive(Debug, Clone)]
pub struct Cursor<'a> {
    rest: &'a [u8],
}

impl<'a> Cursor<'a> {
    /// A cursor at the start of `data`.
    pub fn new(data: &'a [u8]) -> Self {
        Cursor { rest: data }
    }

    /// Is everything read?
    pub fn is_empty(&self) -> bool {
        self.rest.is_empty()
    }

    /// What is left.
    pub fn rest(&self) -> &'a [u8] {
        self.rest
    }

    /// The next `n` bytes (fewer at the end).
    pub fn bytes(&mut self, n: usize) -> &'a [u8] {
        let (head, tail) = self.rest.split_at(n.min(self.rest.len()));
        self.rest = tail;
        head
    }

    /// The next byte.
    pub fn u8(&mut self) -> u8 {
        self.bytes(1).first().copied().unwrap_or(0)
    }

    /// The next little-endian u16.
    pub fn u16(&mut self) -> u16 {
        let mut b = [0u8; 2];
        let got = self.bytes(2);
        b[..got.len()].copy_from_slice(got);
        u16::from_le_bytes(b)
    }

    /// The next little-endian u32.
    pub fn u32(&mut self) -> u32 {
        let mut b = [0u8; 4];
        let got = self.bytes(4);
        b[..got.len()].copy_from_slice(got);
        u32::from_le_bytes(b)
    }

    /// The next little-endian u64.
    pub fn u64(&mut self) -> u64 {
        let mut b = [0u8; 8];
        let got = self.bytes(8);
        b[..got.len()].copy_from_slice(got);
        u64::from_le_bytes(b)
    }
}

/// A directory for the targets' files, on tmpfs where there is one (`/dev/shm`), so
/// that fsyncs cost little. `HORN_FUZZ_SCRATCH` names another; `scripts/fuzz` sets it
/// and removes it after each run. It is removed when the process exits normally.
pub fn scratch() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let base = std::env::var_os("HORN_FUZZ_SCRATCH")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                let shm = Path::new("/dev/shm");
                if shm.is_dir() {
                    shm.to_path_buf()
                } else {
                    std::env::temp_dir()
                }
            });
        let dir = base.join(format!("horn-fuzz-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("the scratch directory can be created");
        extern "C" fn remove_scratch() {
            if let Some(dir) = DIR.get() {
                let _ = std::fs::remove_dir_all(dir);
            }
        }
        // SAFETY: registers a plain function with no arguments to run at exit.
        unsafe { libc::atexit(remove_scratch) };
        dir
    })
}

/// A fresh, empty directory `name` in the scratch directory (emptied if it exists).
pub fn fresh_dir(name: &str) -> PathBuf {
    let dir = scratch().join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("a scratch subdirectory can be created");
    dir
}

/// `body` followed by its `crc32c XXXXXXXX` line, as `volume.json` and `engine.json`
/// end (docs/replica-format.md). `body` is the JSON line with its newline.
pub fn with_checksum_line(body: &[u8]) -> Vec<u8> {
    let mut out = body.to_vec();
    out.extend_from_slice(format!("crc32c {:08x}\n", crc32c::crc32c(body)).as_bytes());
    out
}

/// The format's sizes for zero logs: header, then records of 24 bytes.
pub mod zero_log {
    /// Bytes before the first record.
    pub const HEADER: usize = 16;
    /// Bytes per record.
    pub const RECORD: usize = 24;

    /// Sets each whole record's CRC to the one its first 16 bytes give, and its last 4
    /// bytes to zero, so that records reach the range checks.
    pub fn fix_records(bytes: &mut [u8]) {
        if bytes.len() <= HEADER {
            return;
        }
        for r in bytes[HEADER..].chunks_mut(RECORD) {
            if r.len() == RECORD {
                let crc = crc32c::crc32c(&r[..16]);
                r[16..20].copy_from_slice(&crc.to_le_bytes());
                r[20..24].fill(0);
            }
        }
    }
}

/// The format's sizes for `intent.bits`: pages of 4096 bytes.
pub mod intent_file {
    /// Bytes per page.
    pub const PAGE: usize = 4096;
    /// Regions per page of bits (4088 bytes of bits).
    pub const BITS_PER_PAGE: u64 = ((PAGE - 8) * 8) as u64;

    /// Sets the header's CRC and every whole page's CRC and number, so that the bits
    /// reach the parser's use of them.
    pub fn fix_pages(bytes: &mut [u8]) {
        if bytes.len() >= 20 {
            let crc = crc32c::crc32c(&bytes[..16]);
            bytes[16..20].copy_from_slice(&crc.to_le_bytes());
        }
        for (i, p) in bytes.chunks_mut(PAGE).enumerate().skip(1) {
            if p.len() == PAGE {
                p[4..8].copy_from_slice(&(i as u32).to_le_bytes());
                let crc = crc32c::crc32c(&p[4..]);
                p[..4].copy_from_slice(&crc.to_le_bytes());
            }
        }
    }
}

/// The replica server the `replica_requests` target talks to, and the seed generator
/// records sessions with: a real `DataServer` on loopback.
pub mod served_replica {
    use std::collections::BTreeMap;
    use std::io::ErrorKind;
    use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
    use std::os::fd::AsRawFd;
    use std::path::Path;
    use std::thread::JoinHandle;

    use horn_replica::server::DataServer;
    use horn_replica::Replica;

    /// The volume's size: small, so that no read moves more than 2 MiB.
    pub const SIZE: u64 = 2 << 20;
    /// Its sector size.
    pub const SECTOR: u64 = 512;
    /// The generation it is claimed at.
    pub const GENERATION: u64 = 3;
    /// The engine holding the claim.
    pub const HOLDER: &str = "engine-a";

    /// A server running on its own thread.
    pub struct Served {
        /// Where it listens.
        pub addr: SocketAddr,
        /// Its loop; finished only if the server stopped.
        pub thread: JoinHandle<horn_replica::Result<()>>,
    }

    /// Creates the replica in `dir` (a snapshot under the head, some data in both,
    /// claimed at [`GENERATION`] by [`HOLDER`]) and serves it on a loopback port. All
    /// of it on the server's thread: a replica's I/O stays on the thread that started it.
    pub fn start(dir: &Path) -> Served {
        let dir = dir.join("r");
        let (tx, rx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            let mut r = Replica::create(&dir, SIZE, SECTOR as u32)?;
            r.write_at(0, &[1; 8192])?;
            r.write_at(1 << 20, &[2; 4096])?;
            r.snapshot("base", &BTreeMap::new())?;
            r.write_at(4096, &[3; 4096])?;
            r.claim(GENERATION, HOLDER, None, 0)?;
            let listener = TcpListener::bind("127.0.0.1:0").expect("bind a loopback port");
            let _ = tx.send(listener.local_addr().expect("a bound address"));
            DataServer::new(r, listener)?.run()
        });
        match rx.recv() {
            Ok(addr) => Served { addr, thread },
            Err(_) => panic!("the server did not start: {:?}", thread.join()),
        }
    }

    /// Sends `input` on a new connection, closes the sending side, and returns every
    /// byte the server sent until it closed. Reads while it writes, so that neither
    /// side's buffers fill.
    pub fn exchange(addr: SocketAddr, input: &[u8]) -> Vec<u8> {
        let stream = TcpStream::connect(addr).expect("connect to the server");
        let fd = stream.as_raw_fd();
        // Closed with a reset, so that millions of connections leave no TIME_WAIT.
        let linger = libc::linger {
            l_onoff: 1,
            l_linger: 0,
        };
        // SAFETY: a plain setsockopt on our own socket with a live argument.
        unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_LINGER,
                (&linger as *const libc::linger).cast(),
                std::mem::size_of::<libc::linger>() as u32,
            );
        }
        let mut sent = 0;
        let mut writing = !input.is_empty();
        if !writing {
            stream.shutdown(Shutdown::Write).unwrap();
        }
        let mut got = Vec::new();
        let mut buf = vec![0u8; 1 << 16];
        loop {
            let mut fds = libc::pollfd {
                fd,
                events: libc::POLLIN | if writing { libc::POLLOUT } else { 0 },
                revents: 0,
            };
            // SAFETY: one live pollfd.
            unsafe { libc::poll(&mut fds, 1, 10_000) };
            if writing {
                // SAFETY: sends from a live slice. MSG_NOSIGNAL: a closed peer is an
                // error, not a SIGPIPE (libFuzzer's main does not ignore it as Rust's does).
                let n = unsafe {
                    libc::send(
                        fd,
                        input[sent..].as_ptr().cast(),
                        input.len() - sent,
                        libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
                    )
                };
                if n > 0 {
                    sent += n as usize;
                } else if n < 0 && std::io::Error::last_os_error().kind() != ErrorKind::WouldBlock {
                    writing = false; // the server closed: it reads no more
                }
                if writing && sent == input.len() {
                    let _ = stream.shutdown(Shutdown::Write);
                    writing = false;
                }
            }
            // SAFETY: receives into a live buffer.
            let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
            if n > 0 {
                got.extend_from_slice(&buf[..n as usize]);
            } else if n == 0 {
                break;
            } else {
                let e = std::io::Error::last_os_error();
                match e.kind() {
                    ErrorKind::WouldBlock => {}
                    // The server closed with our unread bytes in its buffer: what it
                    // sent before is read by now.
                    ErrorKind::ConnectionReset => break,
                    _ => panic!("receive failed: {e}"),
                }
            }
        }
        got
    }
}
