//! `ota-tools`: command-line front end. Parsing and dispatch only; the work
//! is done in the `ota_tools` library modules.

use cow_format::error_chain::ErrorChain;
use std::io::{self, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use cow_format::writer::{parse_compression_option, DEFAULT_COMPRESSION_FACTOR};
use cow_format::{Compression, CowVersion, MergeMode, WriteError};
use ota_tools::apply::{self, ApplyOptions};
use ota_tools::create::command::{create_cow, max_threads, CreateOptions};
use ota_tools::inspect::{self, InspectError, OpOrder};

/// Host tools for Android Virtual A/B COW files (AOSP libsnapshot_cow v2 and v3).
///
/// Four commands: `create` builds the COW that turns one image into another, `verify`
/// checks a COW against the target image and the safety of its merge order, `inspect`
/// prints a COW file, and `apply` writes the image a merge of a COW leaves.
#[derive(Debug, Parser)]
#[command(name = "ota-tools", version)]
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
        /// Worker threads for decompression [default: one per CPU; at most twice the
        /// number of CPUs, and at least 4 are always allowed].
        #[arg(long, value_parser = parse_threads)]
        threads: Option<usize>,
        /// The merge the COW is merged by, in place (its order; resumes after `num_merge_ops`): `user` (snapuserd's user-space merge, Android 13+)
        /// or `legacy` (dm-snapshot merge).
        #[arg(long, default_value = "user")]
        merge_mode: MergeMode,
    },
    /// Build the COW that turns SOURCE into TARGET.
    ///
    /// Unchanged blocks get no op; the others become ZERO, COPY (a source block with the same
    /// bytes), XOR (a compressed difference against similar source bytes) or REPLACE
    /// (compressed new data). COPY and XOR ops are ordered so that a device merging in place
    /// never reads a block it has already overwritten. The output is the same for any
    /// thread count.
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
        /// none, gz, brotli, lz4 or zstd; gz, brotli and zstd take an optional ",LEVEL"
        /// (gz 0-9, brotli 0-11, zstd up to 22).
        #[arg(long, default_value = "lz4", value_parser = parse_compression)]
        compression: Compression,
        /// Largest REPLACE payload, v3 only: 4k, 8k, 16k, 32k, 64k, 128k or 256k
        /// [default: 64k].
        #[arg(long, value_parser = parse_compression_factor)]
        compression_factor: Option<u32>,
        /// Worker threads [default: one per CPU; at most twice the number of CPUs, and at
        /// least 4 are always allowed]. The output does not depend on it.
        #[arg(long, value_parser = parse_threads)]
        threads: Option<usize>,
        /// The merge the COW is made for; it orders COPY/XOR ops so that merge batches them: `user` (snapuserd's user-space merge, Android 13+)
        /// or `legacy` (dm-snapshot merge).
        #[arg(long, default_value = "user")]
        merge_mode: MergeMode,
    },
    /// Check that COW, merged in place, turns SOURCE into TARGET.
    ///
    /// TARGET must be a whole number of 4 KiB blocks, as for `create`.
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
        /// The merge the COW is checked for (the merge order in which the safety rule is checked): `user` (snapuserd's user-space merge, Android 13+)
        /// or `legacy` (dm-snapshot merge).
        #[arg(long, default_value = "user")]
        merge_mode: MergeMode,
    },
    /// Android OTA payloads (payload.bin): inspect, extract, to-cow, create.
    #[command(subcommand)]
    Payload(ota_tools::payload::cli::PayloadCommand),
}

fn parse_cow_version(s: &str) -> Result<CowVersion, String> {
    match s {
        "2" => Ok(CowVersion::V2),
        "3" => Ok(CowVersion::V3),
        _ => Err(format!("unsupported COW version {s:?} (expected 2 or 3)")),
    }
}

/// `--compression`: strictly, so that an empty value or an ignored level is an error.
fn parse_compression(s: &str) -> Result<Compression, String> {
    parse_compression_option(s).map_err(|e| match e {
        WriteError::InvalidOption { reason, .. } => reason.to_string(),
        other => other.to_string(),
    })
}

/// `--threads`: 1 up to [`max_threads`].
fn parse_threads(s: &str) -> Result<usize, String> {
    let max = max_threads();
    match s.parse::<usize>() {
        Ok(n) if (1..=max).contains(&n) => Ok(n),
        _ => Err(format!(
            "give 1 to {max}: twice this machine's CPUs (at least 4); more threads only add memory and scheduling"
        )),
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
            let written = if json {
                report.write_json(&mut out)
            } else {
                report.write_text(&mut out)
            }
            .and_then(|()| out.flush().map_err(InspectError::Output));
            match written {
                // The reader stopped reading (`| head`): stop quietly, as Unix tools do.
                Err(InspectError::Output(e)) if e.kind() == io::ErrorKind::BrokenPipe => {}
                other => other?,
            }
        }
        Command::Apply {
            source,
            cow,
            output,
            size,
            threads,
            merge_mode,
        } => {
            apply::apply_with_mode(
                &ApplyOptions {
                    source,
                    cow,
                    output,
                    size,
                    progress: true,
                    threads: threads.unwrap_or(0),
                },
                merge_mode,
            )?;
        }
        Command::Create {
            source,
            target,
            output,
            cow_version,
            compression,
            compression_factor,
            threads,
            merge_mode,
        } => {
            if cow_version == CowVersion::V2 && compression_factor.is_some() {
                return Err("--compression-factor applies to v3 COW files only; drop it or use --cow-version 3".into());
            }
            let opts = CreateOptions {
                version: cow_version,
                compression,
                compression_factor: compression_factor.unwrap_or(DEFAULT_COMPRESSION_FACTOR),
                threads,
                merge_mode,
            };
            let summary = create_cow(&opts, &source, &target, &output)?;
            print_stdout(&format!("{summary}\n"))?;
        }
        Command::Verify {
            source,
            target,
            cow,
            merge_mode,
        } => {
            let r = ota_tools::verify::verify_in_mode(&source, &target, &cow, merge_mode)?;
            print_stdout(&format!(
                "ok: {} blocks match; {} ops, {} COPY/XOR merge safely in place\n",
                r.blocks, r.ops, r.ordered_ops
            ))?;
        }
        Command::Payload(cmd) => ota_tools::payload::cli::run(cmd)?,
    }
    Ok(())
}

/// Write `text` to stdout; a reader that went away (`| head`) is not an error.
fn print_stdout(text: &str) -> io::Result<()> {
    let mut out = io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Ok(()),
        other => other,
    }
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let cli = Cli::parse();
    // Temporary outputs of `create` and `apply` are removed if a signal ends the process.
    if let Err(e) = ota_tools::interrupt::install() {
        eprintln!("ota-tools: error: cannot install signal handlers: {e}");
        return ExitCode::FAILURE;
    }
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ota-tools: error: {}", ErrorChain(e.as_ref()));
            ExitCode::FAILURE
        }
    }
}
