//! `hornd`: Horn's daemons, one per subcommand.
//!
//! `hornd replica` serves one replica directory: the data wire, and the gRPC control
//! service (`proto/replica.proto`) on a separate address. (The engine, the
//! manager and the CSI driver arrive as subcommands with their issues.)

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use horn_manager::daemon::serve_replica;
use horn_manager::format::parse_size;

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
        /// Address for the gRPC control service.
        #[arg(long, default_value = "127.0.0.1:9501")]
        control: String,
        /// Create the replica with this size if the directory holds none yet.
        #[arg(long, value_parser = parse_size)]
        size: Option<u64>,
        /// Sector size when creating: 512 or 4096.
        #[arg(long, default_value_t = 512)]
        sector_size: u32,
    },
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
            control,
            size,
            sector_size,
        } => serve_replica(dir, listen, control, size, sector_size),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("hornd: {e:#}");
            ExitCode::FAILURE
        }
    }
}
