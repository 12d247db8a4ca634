//! A single-node Garage (the Rust S3 server) on loopback, for tests and benchmarks:
//! the real S3 implementation Horn's S3 target is checked against. It is installed by
//! `scripts/install-deps` (`cargo install garage`); this starts one in a directory
//! with a generated configuration, lays it out, and makes a bucket and a key.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::s3::S3Settings;

/// A running Garage server, stopped when dropped.
pub struct Garage {
    child: Child,
    config: PathBuf,
    /// The S3 endpoint, `http://127.0.0.1:PORT`.
    pub endpoint: String,
    /// The key made for Horn, with every right on [`Garage::bucket`].
    pub access_key: String,
    /// Its secret.
    pub secret_key: String,
    /// The bucket made at the start.
    pub bucket: String,
}

/// Garage's binary: `GARAGE`, else on the `PATH`, else where `cargo install` puts it.
pub fn binary() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("GARAGE") {
        return Some(PathBuf::from(p));
    }
    let on_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join("garage"))
            .find(|p| p.is_file())
    });
    on_path.or_else(|| {
        let p = PathBuf::from(std::env::var_os("HOME")?).join(".cargo/bin/garage");
        p.is_file().then_some(p)
    })
}

fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn hex(n: usize) -> String {
    use std::io::Read;
    let mut b = vec![0u8; n];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .expect("/dev/urandom reads");
    b.iter().map(|x| format!("{x:02x}")).collect()
}

impl Garage {
    /// Starts Garage with its files in `dir`, and makes bucket `bucket` and a key for
    /// it. Fails, saying what to do, if Garage is not installed.
    pub fn start(dir: &Path, bucket: &str) -> Result<Garage, String> {
        let bin = binary()
            .ok_or("Garage is not installed: scripts/install-deps installs it (cargo install garage)")?;
        let (s3_port, rpc_port) = (
            free_port().map_err(|e| e.to_string())?,
            free_port().map_err(|e| e.to_string())?,
        );
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let config = dir.join("garage.toml");
        std::fs::write(
            &config,
            format!(
                "metadata_dir = \"{d}/meta\"\n\
                 data_dir = \"{d}/data\"\n\
                 db_engine = \"sqlite\"\n\
                 replication_factor = 1\n\
                 rpc_bind_addr = \"127.0.0.1:{rpc_port}\"\n\
                 rpc_public_addr = \"127.0.0.1:{rpc_port}\"\n\
                 rpc_secret = \"{secret}\"\n\
                 [s3_api]\n\
                 s3_region = \"garage\"\n\
                 api_bind_addr = \"127.0.0.1:{s3_port}\"\n",
                d = dir.display(),
                secret = hex(32),
            ),
        )
        .map_err(|e| format!("{}: {e}", config.display()))?;
        let log = std::fs::File::create(dir.join("garage.log")).map_err(|e| e.to_string())?;
        let child = Command::new(&bin)
            .arg("-c")
            .arg(&config)
            .arg("server")
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log)
            .spawn()
            .map_err(|e| format!("{}: {e}", bin.display()))?;
        let g = Garage {
            child,
            config,
            endpoint: format!("http://127.0.0.1:{s3_port}"),
            access_key: format!("GK{}", hex(12)),
            secret_key: hex(32),
            bucket: bucket.to_string(),
        };
        // The node's id is on disk before its RPC port listens: each step is tried
        // until the server answers it.
        let deadline = Instant::now() + Duration::from_secs(30);
        let until_up = |args: &[&str]| loop {
            match g.cli(args) {
                Ok(out) => return Ok(out),
                Err(e) if Instant::now() > deadline => {
                    return Err(format!(
                        "Garage did not start: {e} (see {})",
                        dir.join("garage.log").display()
                    ))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        };
        let node = until_up(&["node", "id", "-q"])?
            .trim()
            .split('@')
            .next()
            .unwrap_or_default()
            .to_string();
        until_up(&["layout", "assign", "-z", "dc1", "-c", "1G", &node])?;
        g.cli(&["layout", "apply", "--version", "1"])?;
        g.create_bucket(bucket)?;
        let (k, s) = (g.access_key.clone(), g.secret_key.clone());
        g.cli(&["key", "import", "--yes", "-n", "horn", &k, &s])?;
        g.allow(bucket)?;
        Ok(g)
    }

    /// Makes another bucket (not yet open to the key: see [`Garage::allow`]).
    pub fn create_bucket(&self, bucket: &str) -> Result<(), String> {
        self.cli(&["bucket", "create", bucket]).map(|_| ())
    }

    /// Gives the key every right on `bucket`.
    pub fn allow(&self, bucket: &str) -> Result<(), String> {
        self.cli(&[
            "bucket", "allow", "--read", "--write", "--owner", bucket, "--key", "horn",
        ])
        .map(|_| ())
    }

    /// The settings that reach this Garage as its key.
    pub fn settings(&self) -> S3Settings {
        S3Settings {
            endpoint: self.endpoint.clone(),
            region: "garage".into(),
            access_key: self.access_key.clone(),
            secret_key: self.secret_key.clone(),
        }
    }

    /// The target URL of the bucket made at the start, under `prefix` if not empty.
    pub fn url(&self, prefix: &str) -> String {
        format!("s3://{}/{prefix}", self.bucket)
    }

    /// Runs Garage's CLI against this server and returns what it printed.
    pub fn cli(&self, args: &[&str]) -> Result<String, String> {
        let bin = binary().ok_or("Garage is not installed")?;
        let out = Command::new(bin)
            .arg("-c")
            .arg(&self.config)
            .args(args)
            .output()
            .map_err(|e| e.to_string())?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(format!(
                "garage {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    }
}

impl Drop for Garage {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
