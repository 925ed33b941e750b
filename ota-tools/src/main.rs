//! `ota-tools`: command-line front end; the work is done in the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use cow_format::{Compression, CowVersion};
use ota_tools::create::command::{create_cow, CreateOptions};

#[derive(Debug, Parser)]
#[command(
    name = "ota-tools",
    version,
    about = "Host tools for Android Virtual A/B COW files"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Build the COW that turns SRC.img into TGT.img.
    Create {
        /// The old image (read only).
        #[arg(long)]
        source: PathBuf,
        /// The new image; its size must be a multiple of 4 KiB.
        #[arg(long)]
        target: PathBuf,
        /// The COW file to write (replaced atomically on success).
        #[arg(long)]
        output: PathBuf,
        /// COW format version: 2 or 3.
        #[arg(long, default_value = "3", value_parser = parse_version)]
        cow_version: CowVersion,
        /// none|gz|brotli|lz4|zstd, optionally ",LEVEL".
        #[arg(long, default_value = "lz4")]
        compression: Compression,
        /// v3 largest REPLACE payload: 4k, 8k, ..., 256k.
        #[arg(long, default_value = "64k", value_parser = parse_factor)]
        compression_factor: u32,
        /// Worker threads (default: all cores).
        #[arg(long)]
        threads: Option<usize>,
    },
    /// Check that COW, merged in place, turns SRC.img into TGT.img.
    Verify {
        /// The old image (read only).
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

fn parse_version(s: &str) -> Result<CowVersion, String> {
    match s {
        "2" => Ok(CowVersion::V2),
        "3" => Ok(CowVersion::V3),
        _ => Err(format!("unsupported COW version {s:?} (expected 2 or 3)")),
    }
}

fn parse_factor(s: &str) -> Result<u32, String> {
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

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let cli = Cli::parse();
    let result: Result<(), String> = match cli.command {
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
            create_cow(&opts, &source, &target, &output)
                .map(|summary| println!("{summary}"))
                .map_err(|e| e.to_string())
        }
        Command::Verify {
            source,
            target,
            cow,
        } => ota_tools::verify::verify(&source, &target, &cow)
            .map(|r| {
                println!(
                    "ok: {} blocks match; {} ops, {} COPY/XOR merge safely in place",
                    r.blocks, r.ops, r.ordered_ops
                )
            })
            .map_err(|e| e.to_string()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ota-tools: {e}");
            ExitCode::FAILURE
        }
    }
}
