//! `ota-tools`: command-line front end. Parsing and dispatch only; the work
//! is done in the `ota_tools` library modules.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use cow_format::{Compression, CowVersion};
use ota_tools::apply::{self, ApplyOptions};
use ota_tools::create::command::{create_cow, CreateOptions};
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
    /// Build the COW that turns SOURCE into TARGET (see ota-tools/CREATE.md).
    Create {
        /// The old image (only read).
        #[arg(long)]
        source: PathBuf,
        /// The new image; its size must be a multiple of 4 KiB.
        #[arg(long)]
        target: PathBuf,
        /// The COW file to write (written under a temporary name, renamed on success).
        #[arg(long)]
        output: PathBuf,
        /// COW format version: 2 or 3.
        #[arg(long, default_value = "3", value_parser = parse_cow_version)]
        cow_version: CowVersion,
        /// none|gz|brotli|lz4|zstd, optionally ",LEVEL".
        #[arg(long, default_value = "lz4")]
        compression: Compression,
        /// v3 largest REPLACE payload: 4k, 8k, 16k, 32k, 64k, 128k or 256k.
        #[arg(long, default_value = "64k", value_parser = parse_compression_factor)]
        compression_factor: u32,
        /// Worker threads (default: all cores). The output does not depend on it.
        #[arg(long)]
        threads: Option<usize>,
    },
    /// Check that COW, merged in place, turns SOURCE into TARGET.
    ///
    /// Reports an unsafe merge order (an op reading a block already overwritten)
    /// or the first block that does not match.
    Verify {
        /// The old image (only read).
        #[arg(long)]
        source: PathBuf,
        /// The expected new image.
        #[arg(long)]
        target: PathBuf,
        /// The COW file to check.
        #[arg(long)]
        cow: PathBuf,
    },
}

fn parse_cow_version(s: &str) -> Result<CowVersion, String> {
    match s {
        "2" => Ok(CowVersion::V2),
        "3" => Ok(CowVersion::V3),
        _ => Err(format!("unsupported COW version {s:?} (expected 2 or 3)")),
    }
}

fn parse_compression_factor(s: &str) -> Result<u32, String> {
    let lower = s.to_ascii_lowercase();
    let (digits, mult) = match lower.strip_suffix('k') {
        Some(d) => (d, 1024u32),
        None => (lower.as_str(), 1u32),
    };
    let v = digits
        .parse::<u32>()
        .ok()
        .and_then(|v| v.checked_mul(mult))
        .ok_or_else(|| format!("invalid compression factor {s:?}"))?;
    if v.is_power_of_two() && (4096..=262_144).contains(&v) {
        Ok(v)
    } else {
        Err(format!(
            "invalid compression factor {s:?} (expected 4k, 8k, 16k, 32k, 64k, 128k or 256k)"
        ))
    }
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
        Command::Create {
            source,
            target,
            output,
            cow_version,
            compression,
            compression_factor,
            threads,
        } => {
            let opts = CreateOptions {
                version: cow_version,
                compression,
                compression_factor,
                threads,
            };
            let summary = create_cow(&opts, &source, &target, &output)?;
            println!("{summary}");
        }
        Command::Verify {
            source,
            target,
            cow,
        } => {
            let r = ota_tools::verify::verify(&source, &target, &cow)?;
            println!(
                "ok: {} blocks match; {} ops, {} COPY/XOR merge safely in place",
                r.blocks, r.ops, r.ordered_ops
            );
        }
    }
    Ok(())
}

/// `error` and each of its causes, separated by `: ` (every message names only its own
/// context, so each cause is printed once).
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ota-tools: error: {}", error_chain(e.as_ref()));
            ExitCode::FAILURE
        }
    }
}
