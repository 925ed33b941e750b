//! The `ota-tools payload ...` subcommands: argument parsing and dispatch.
//!
//! The argument docs here are `--help` text (clap prints them as written), so their
//! `<partition>` placeholders and `[,LEVEL]` options are not rustdoc markup.
#![allow(rustdoc::invalid_html_tags, rustdoc::broken_intra_doc_links)]

use std::io::Write;
use std::path::PathBuf;

use clap::Subcommand;

use super::create::{create, CreateOptions, DiffMode, ReplaceMode};
use super::extract::{extract, ExtractOptions};
use super::inspect;
use super::reader::Payload;
use super::to_cow::{to_cow, ToCowOptions};
use cow_format::{Compression, CowVersion};

fn parse_cow_version(s: &str) -> Result<CowVersion, String> {
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
    digits
        .parse::<u32>()
        .ok()
        .and_then(|v| v.checked_mul(mult))
        .filter(|v| v.is_power_of_two() && (4096..=262_144).contains(v))
        .ok_or_else(|| {
            format!("invalid compression factor {s:?} (expected 4k..256k, a power of two)")
        })
}

/// `ota-tools payload` subcommands.
#[derive(Debug, Subcommand)]
pub enum PayloadCommand {
    /// Print a payload's header, manifest summary and signatures.
    Inspect {
        /// The payload (`payload.bin`).
        payload: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Write each partition's new image as DIR/<partition>.img.
    Extract {
        /// The payload (`payload.bin`).
        payload: PathBuf,
        /// Output directory (created if absent).
        #[arg(long)]
        output_dir: PathBuf,
        /// Directory of the old <partition>.img files (incremental payloads).
        #[arg(long)]
        source_dir: Option<PathBuf>,
        /// Only these partitions (comma-separated).
        #[arg(long, value_delimiter = ',')]
        partitions: Option<Vec<String>>,
        /// Worker threads (default: all cores).
        #[arg(long, default_value_t = 0)]
        threads: usize,
    },
    /// Write, for each partition, the COW a Virtual A/B device would write
    /// (DIR/<partition>.cow), with the merge order from merge_operations.
    ToCow {
        /// The payload (`payload.bin`).
        payload: PathBuf,
        /// Directory of the old <partition>.img files.
        #[arg(long)]
        source_dir: PathBuf,
        /// Output directory (created if absent).
        #[arg(long)]
        output_dir: PathBuf,
        /// Only these partitions (comma-separated).
        #[arg(long, value_delimiter = ',')]
        partitions: Option<Vec<String>>,
        /// COW version 2 or 3 (default: the payload's cow_version, else 2).
        #[arg(long, value_parser = parse_cow_version)]
        cow_version: Option<CowVersion>,
        /// none|gz|brotli|lz4|zstd[,LEVEL] (default: the payload's vabc_compression_param, else gz).
        #[arg(long)]
        compression: Option<Compression>,
        /// v3 compression factor 4k..256k (default: the payload's, else 64k).
        #[arg(long, value_parser = parse_factor)]
        compression_factor: Option<u32>,
    },
    /// Write a payload (unsigned) from new partition images, full or, with
    /// --source-dir, incremental, with merge operations and VABC fields.
    Create {
        /// Directory of the new <partition>.img files (whole 4 KiB blocks).
        #[arg(long)]
        target_dir: PathBuf,
        /// Directory of the old <partition>.img files (incremental payload).
        #[arg(long)]
        source_dir: Option<PathBuf>,
        /// The payload to write.
        #[arg(long)]
        output: PathBuf,
        /// Only these partitions (default: every *.img in --target-dir).
        #[arg(long, value_delimiter = ',')]
        partitions: Option<Vec<String>>,
        /// REPLACE encodings allowed.
        #[arg(long, value_enum, default_value = "auto")]
        replace: ReplaceMode,
        /// Diff encodings allowed.
        #[arg(long, value_enum, default_value = "auto")]
        diff: DiffMode,
        /// Write no COW_XOR merge operations.
        #[arg(long)]
        no_xor: bool,
        /// cow_version of the dynamic partition metadata (2 or 3).
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(2..=3))]
        cow_version: u32,
        /// vabc_compression_param (none|gz|brotli|lz4|zstd[,LEVEL]).
        #[arg(long, default_value = "lz4")]
        vabc_compression: Compression,
        /// compression_factor of the dynamic partition metadata.
        #[arg(long, default_value = "64k", value_parser = parse_factor)]
        compression_factor: u32,
        /// Skip the to-cow dry run that sets estimate_cow_size.
        #[arg(long)]
        no_estimate: bool,
        /// Worker threads (default: all cores).
        #[arg(long, default_value_t = 0)]
        threads: usize,
    },
}

/// An error shown with its whole cause chain (`a: b: c`), so the line on
/// stderr says what failed and why.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ChainedError(String);

fn chained(e: &dyn std::error::Error) -> ChainedError {
    let mut s = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cause = c.source();
    }
    ChainedError(s)
}

/// Run one `payload` subcommand.
pub fn run(cmd: PayloadCommand) -> Result<(), ChainedError> {
    run_inner(cmd).map_err(|e| chained(e.as_ref()))
}

fn run_inner(cmd: PayloadCommand) -> Result<(), Box<dyn std::error::Error>> {
    match cmd {
        PayloadCommand::Inspect { payload, json } => {
            let p = Payload::open(&payload)?;
            let report = inspect::report(&p);
            let stdout = std::io::stdout();
            let mut out = std::io::BufWriter::new(stdout.lock());
            if json {
                report.write_json(&mut out)?;
            } else {
                report.write_text(&mut out)?;
            }
            out.flush()?;
        }
        PayloadCommand::Extract {
            payload,
            output_dir,
            source_dir,
            partitions,
            threads,
        } => {
            let parts = extract(&ExtractOptions {
                payload,
                output_dir,
                source_dir,
                partitions,
                threads,
                progress: true,
            })?;
            for p in parts {
                println!(
                    "{}: {} bytes, {} operations, hash ok -> {}",
                    p.name,
                    p.size,
                    p.operations,
                    p.path.display()
                );
            }
        }
        PayloadCommand::ToCow {
            payload,
            source_dir,
            output_dir,
            partitions,
            cow_version,
            compression,
            compression_factor,
        } => {
            let reports = to_cow(&ToCowOptions {
                payload,
                source_dir,
                output_dir,
                partitions,
                cow_version,
                compression,
                compression_factor,
                progress: true,
            })?;
            for r in reports {
                let estimate = r.estimate_cow_size.map_or_else(
                    || "no estimate_cow_size in the payload".to_string(),
                    |e| format!("estimate_cow_size {e} ({:+.1}%)", pct(r.cow_size, e)),
                );
                println!(
                    "{}: {} bytes ({estimate}); blocks: {} COPY, {} XOR, {} REPLACE, {} ZERO, {} verity -> {}",
                    r.name,
                    r.cow_size,
                    r.copy_blocks,
                    r.xor_blocks,
                    r.replace_blocks,
                    r.zero_blocks,
                    r.verity_blocks,
                    r.path.display()
                );
            }
        }
        PayloadCommand::Create {
            target_dir,
            source_dir,
            output,
            partitions,
            replace,
            diff,
            no_xor,
            cow_version,
            vabc_compression,
            compression_factor,
            no_estimate,
            threads,
        } => {
            let mut opts = CreateOptions::new(target_dir, source_dir, output);
            opts.partitions = partitions;
            opts.replace = replace;
            opts.diff = diff;
            opts.xor = !no_xor;
            opts.cow_version = cow_version;
            opts.vabc_compression = vabc_compression.to_string();
            opts.compression_factor = u64::from(compression_factor);
            opts.estimate = !no_estimate;
            opts.threads = threads;
            opts.progress = true;
            let s = create(&opts)?;
            println!("payload: {} bytes", s.payload_size);
            for (name, ops, merge, estimate) in s.partitions {
                println!(
                    "{name}: {ops} operations, {merge} merge operations, estimate_cow_size {}",
                    estimate.map_or_else(|| "-".to_string(), |e| e.to_string())
                );
            }
        }
    }
    Ok(())
}

fn pct(actual: u64, estimate: u64) -> f64 {
    if estimate == 0 {
        0.0
    } else {
        (actual as f64 - estimate as f64) * 100.0 / estimate as f64
    }
}
