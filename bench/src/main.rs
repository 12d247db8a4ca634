//! # horn-bench: Horn's benchmarks
//!
//! Every performance figure Horn claims comes from here, measured against a peer in
//! the same run on the same machine (fio on a plain file, for the store), so that
//! anyone can rerun it and compare ratios rather than absolute numbers.
//!
//! - `horn-bench store`: the replica store driven in-process (4 KiB random read and
//!   write at QD32 and QD1, 1 MiB sequential) against fio on a plain file; the extent
//!   index's memory for two write patterns; opening and using long snapshot chains.
//!
//! Output: one JSON object per line with `--json`, a table otherwise. This crate
//! depends on `rand` (random offsets) and `tempfile` (scratch directories); it must
//! never be needed by anything that ships.

mod fio;
mod store;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "horn-bench",
    version,
    about = "Benchmarks for Horn, each against a peer in the same run"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// The replica store in-process against fio on a plain file, plus index memory
    /// and long chains.
    Store(store::StoreArgs),
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Store(args) => store::run(args),
    }
}
