//! `ota-tools`: command-line front end. Parsing and dispatch only; the work
//! is done in the `ota_tools` library modules.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use ota_tools::apply::{self, ApplyOptions};
use ota_tools::inspect::{self, OpOrder};

/// Host tools for Android Virtual A/B COW files.
#[derive(Debug, Parser)]
#[command(name = "ota-tools", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print a COW file's header and ops.
    Inspect {
        /// The COW file.
        cow: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
        /// List ops in merge order (with already-merged marks) instead of file order.
        #[arg(long)]
        merge_order: bool,
        /// Read only up to this label (v2 LABEL op / v3 resume point), as when
        /// resuming an interrupted write; works on torn files.
        #[arg(long)]
        label: Option<u64>,
    },
    /// Write the image a completed merge of a COW file leaves.
    ///
    /// If OUTPUT is the same file as SOURCE, ops are applied in place in merge
    /// order, as a device merge does.
    Apply {
        /// Source image (only read, unless it is also the output).
        #[arg(long)]
        source: PathBuf,
        /// COW file.
        #[arg(long)]
        cow: PathBuf,
        /// Output image or block device.
        #[arg(long)]
        output: PathBuf,
        /// Output size in bytes (default: max(source size, end of the highest new block)).
        #[arg(long)]
        size: Option<u64>,
        /// Worker threads for decompression (default: all cores).
        #[arg(long, default_value_t = 0)]
        threads: usize,
    },
}

fn run(cli: Cli) -> Result<(), Box<dyn std::error::Error>> {
    match cli.command {
        Command::Inspect {
            cow,
            json,
            merge_order,
            label,
        } => {
            let order = if merge_order {
                OpOrder::Merge
            } else {
                OpOrder::File
            };
            let report = inspect::inspect(&cow, order, label)?;
            let stdout = std::io::stdout();
            let mut out = std::io::BufWriter::new(stdout.lock());
            if json {
                report.write_json(&mut out)?;
            } else {
                report.write_text(&mut out)?;
            }
            out.flush()?;
        }
        Command::Apply {
            source,
            cow,
            output,
            size,
            threads,
        } => {
            apply::apply(&ApplyOptions {
                source,
                cow,
                output,
                size,
                progress: true,
                threads,
            })?;
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ota-tools: error: {e}");
            ExitCode::FAILURE
        }
    }
}
