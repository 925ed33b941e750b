//! The `ota-tools payload ...` subcommands: argument parsing and dispatch.

use std::io::Write;
use std::path::PathBuf;

use clap::Subcommand;

use super::extract::{extract, ExtractOptions};
use super::inspect;
use super::reader::Payload;

fn parse_list(s: &str) -> Result<Vec<String>, String> {
    let v: Vec<String> = s
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(String::from)
        .collect();
    if v.is_empty() {
        Err("expected a comma-separated list of partition names".to_string())
    } else {
        Ok(v)
    }
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
        #[arg(long, value_parser = parse_list)]
        partitions: Option<Vec<String>>,
        /// Worker threads (default: all cores).
        #[arg(long, default_value_t = 0)]
        threads: usize,
    },
}

/// Run one `payload` subcommand.
pub fn run(cmd: PayloadCommand) -> Result<(), Box<dyn std::error::Error>> {
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
    }
    Ok(())
}
