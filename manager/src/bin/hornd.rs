//! `hornd`: Horn's daemons, one per subcommand.
//!
//! `hornd replica` serves one replica directory on the data wire. (The engine, the
//! manager and the CSI driver arrive as subcommands with their issues.)

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use horn_manager::format::{human_bytes, parse_size};
use horn_replica::server::DataServer;
use horn_replica::Replica;
use nix::sys::signal::{SigSet, Signal};

#[derive(Parser)]
#[command(name = "hornd", version, about = "Horn's daemons")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve one replica directory over the data wire until SIGINT or SIGTERM.
    Replica {
        /// The replica directory.
        #[arg(long, default_value = "/var/lib/horn/replica")]
        dir: PathBuf,
        /// Address for the data wire.
        #[arg(long, default_value = "127.0.0.1:9500")]
        listen: String,
        /// Create the replica with this size if the directory holds none yet.
        #[arg(long, value_parser = parse_size)]
        size: Option<u64>,
        /// Sector size when creating: 512 or 4096.
        #[arg(long, default_value_t = 512)]
        sector_size: u32,
    },
}

fn serve_replica(dir: PathBuf, listen: String, size: Option<u64>, sector_size: u32) -> Result<()> {
    // Block the stop signals before any thread starts, so that only the waiter below
    // receives them.
    let mut stop_signals = SigSet::empty();
    stop_signals.add(Signal::SIGINT);
    stop_signals.add(Signal::SIGTERM);
    stop_signals
        .thread_block()
        .context("cannot block SIGINT/SIGTERM")?;

    let replica = match size {
        Some(size) if !dir.join(horn_replica::meta::META_FILE).exists() => {
            tracing::info!(dir = %dir.display(), size = %human_bytes(size), "creating replica");
            Replica::create(&dir, size, sector_size)
        }
        _ => Replica::open(&dir),
    }
    .with_context(|| format!("cannot open replica {}", dir.display()))?;
    let listener = TcpListener::bind(&listen).with_context(|| format!("cannot listen on {listen}"))?;
    let addr = listener.local_addr()?;
    let server = DataServer::new(replica, listener)?;
    let handle = server.handle();
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            if let Ok(sig) = stop_signals.wait() {
                tracing::info!(signal = ?sig, "stopping");
            }
            handle.stop();
        })?;
    // Scripts wait for this line to know the replica is being served.
    println!("hornd replica: serving {} on {addr}", dir.display());
    server.run().context("the replica server failed")?;
    println!("hornd replica: stopped; {} closed cleanly", dir.display());
    Ok(())
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("HORN_LOG").unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let result = match Cli::parse().command {
        Command::Replica {
            dir,
            listen,
            size,
            sector_size,
        } => serve_replica(dir, listen, size, sector_size),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("hornd: {e:#}");
            ExitCode::FAILURE
        }
    }
}
