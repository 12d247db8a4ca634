//! The target: its name, LUN and engine, its sessions, and the connections it serves
//! (the listener that accepts them is `listener.rs`).

use std::collections::HashMap;
use std::net::{IpAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use horn_engine::Engine;

use crate::login::{Auth, Negotiated, TargetInfo};
use crate::scsi::LunInfo;
use crate::text::Offer;

/// The IQN Horn gives a volume's target unless told otherwise.
pub fn default_iqn(volume: &str) -> String {
    let clean: String = volume
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    format!("iqn.2026-11.io.horn:{clean}")
}

/// Checks an IQN's form (RFC 3720 §3.2.6.3.1: `iqn.YYYY-MM.reversed.domain[:name]`).
pub fn check_iqn(iqn: &str) -> Result<(), String> {
    let ok = iqn.len() <= 223
        && iqn.starts_with("iqn.")
        && iqn.len() > 12
        && iqn[4..8].bytes().all(|b| b.is_ascii_digit())
        && &iqn[8..9] == "-"
        && iqn[9..11].bytes().all(|b| b.is_ascii_digit())
        && iqn
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-.:".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{iqn:?} is not an IQN: iqn.YYYY-MM.reversed.domain[:name], lower case letters, digits, - . :"
        ))
    }
}

/// Sessions logged in.
#[derive(Debug, Default)]
pub struct Sessions {
    count: AtomicUsize,
}

/// Counts a session while it lives.
pub struct SessionGuard<'a>(&'a Sessions);

impl Drop for SessionGuard<'_> {
    fn drop(&mut self) {
        self.0.count.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Sessions {
    /// Counts `n` in.
    pub fn enter(&self, n: &Negotiated) -> SessionGuard<'_> {
        let now = self.count.fetch_add(1, Ordering::Relaxed) + 1;
        tracing::info!(initiator = %n.initiator, sessions = now, "session in full feature phase");
        SessionGuard(self)
    }
    /// Sessions now.
    pub fn count(&self) -> usize {
        self.count.load(Ordering::Relaxed)
    }
}

/// Connections a target serves at once unless told otherwise: each is a thread, with
/// up to the largest burst of write data waiting.
pub const DEFAULT_MAX_CONNECTIONS: usize = 64;

/// One target with one LUN (0): the volume.
pub struct Target {
    /// Name, address, authentication, negotiation offer.
    pub info: TargetInfo,
    /// The LUN and its shared state.
    pub lun: Arc<LunInfo>,
    /// The volume's engine.
    pub engine: Arc<Engine>,
    /// Sessions in the full feature phase.
    pub sessions: Sessions,
    tsih: AtomicU16,
    /// Every open connection's socket, by a number of its own, to shut them down on
    /// stop; a connection leaves it when it ends.
    pub(crate) conns: Mutex<HashMap<u64, TcpStream>>,
    pub(crate) next_conn: AtomicU64,
    /// Connections served at once; one more is answered "out of resources" at login.
    pub max_connections: usize,
    /// Set by [`Target::stop`]: new connections are refused.
    pub(crate) stopping: AtomicBool,
    /// Failed CHAP logins by initiator address: how many in a row, and the last one.
    auth_failures: Mutex<HashMap<IpAddr, (u32, Instant)>>,
}

/// Failed CHAP logins from one address forgiven before the answers slow down.
const FREE_AUTH_FAILURES: u32 = 2;
/// The slowest answer to a failed CHAP login.
const MAX_AUTH_DELAY: Duration = Duration::from_secs(8);
/// A run of failures is forgotten after this long without one.
const AUTH_FAILURES_KEPT: Duration = Duration::from_secs(600);
/// Addresses whose failures are remembered at once.
const AUTH_FAILURE_ADDRESSES: usize = 4096;

impl Target {
    /// A target named `iqn` serving `engine`'s volume.
    pub fn new(engine: Arc<Engine>, iqn: String, address: String, auth: Auth, read_only: bool) -> Target {
        let name = iqn.rsplit(':').next().unwrap_or(&iqn).to_string();
        let lun = Arc::new(LunInfo::new(
            &name,
            engine.size(),
            engine.sector_size(),
            read_only,
        ));
        Target {
            info: TargetInfo {
                name: iqn,
                address,
                auth,
                offer: Offer::default(),
            },
            lun,
            engine,
            sessions: Sessions::default(),
            tsih: AtomicU16::new(1),
            conns: Mutex::new(HashMap::new()),
            next_conn: AtomicU64::new(0),
            max_connections: DEFAULT_MAX_CONNECTIONS,
            stopping: AtomicBool::new(false),
            auth_failures: Mutex::new(HashMap::new()),
        }
    }

    /// A CHAP login from `ip` failed: how long to wait before answering it. The first
    /// [`FREE_AUTH_FAILURES`] in a row cost nothing; each after doubles the wait, from
    /// 250 ms up to [`MAX_AUTH_DELAY`], so guessing a secret is slow.
    pub fn auth_failed(&self, ip: IpAddr) -> Duration {
        let mut failures = self.auth_failures.lock().unwrap();
        let now = Instant::now();
        if failures.len() >= AUTH_FAILURE_ADDRESSES && !failures.contains_key(&ip) {
            failures.retain(|_, (_, last)| now.duration_since(*last) < AUTH_FAILURES_KEPT);
            if failures.len() >= AUTH_FAILURE_ADDRESSES {
                // Still full: forget the address failing longest ago.
                if let Some(oldest) = failures
                    .iter()
                    .min_by_key(|(_, (_, last))| *last)
                    .map(|(ip, _)| *ip)
                {
                    failures.remove(&oldest);
                }
            }
        }
        let entry = failures.entry(ip).or_insert((0, now));
        if now.duration_since(entry.1) >= AUTH_FAILURES_KEPT {
            entry.0 = 0;
        }
        entry.0 += 1;
        entry.1 = now;
        match entry.0.checked_sub(FREE_AUTH_FAILURES + 1) {
            None => Duration::ZERO,
            Some(n) => (Duration::from_millis(250) * 2u32.saturating_pow(n.min(16))).min(MAX_AUTH_DELAY),
        }
    }

    /// A login from `ip` succeeded: its failures are forgotten.
    pub fn auth_succeeded(&self, ip: IpAddr) {
        self.auth_failures.lock().unwrap().remove(&ip);
    }

    /// The same target, serving at most `n` connections at once.
    pub fn with_max_connections(mut self, n: usize) -> Target {
        self.max_connections = n;
        self
    }

    /// Ends every connection and waits (up to `grace`) for their sessions to finish:
    /// their tasks are dropped and their engine queues closed.
    pub fn stop(&self, grace: Duration) {
        self.stopping.store(true, Ordering::SeqCst);
        for (_, c) in self.conns.lock().unwrap().drain() {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
        let until = Instant::now() + grace;
        while self.sessions.count() > 0 && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// A session handle for a new session (never 0).
    pub fn new_tsih(&self) -> u16 {
        loop {
            let t = self.tsih.fetch_add(1, Ordering::Relaxed);
            if t != 0 {
                return t;
            }
        }
    }
}
