//! Bench helper: write the REPLACE_XZ and REPLACE_BZ blobs of a payload,
//! concatenated, to `OUTDIR/blobs.xz` and `OUTDIR/blobs.bz2` (both tools
//! decode concatenated streams), so `xz -d` / `bzip2 -d` can be timed on
//! exactly the bytes `payload extract` decompresses.
//!
//! usage: cargo run --release -p ota-tools --example payload_blobs PAYLOAD OUTDIR

use std::fs::File;
use std::io::Write;
use std::path::PathBuf;

use ota_tools::payload::proto::op_type;
use ota_tools::payload::reader::Payload;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args_os().skip(1);
    let (Some(payload), Some(out)) = (args.next(), args.next()) else {
        return Err("usage: payload_blobs PAYLOAD OUTDIR".into());
    };
    let out = PathBuf::from(out);
    let p = Payload::open(&PathBuf::from(payload))?;
    let mut xz = File::create(out.join("blobs.xz"))?;
    let mut bz = File::create(out.join("blobs.bz2"))?;
    let (mut nxz, mut nbz) = (0u64, 0u64);
    for part in &p.manifest.partitions {
        for op in &part.operations {
            let target = match op.r#type {
                op_type::REPLACE_XZ => &mut xz,
                op_type::REPLACE_BZ => &mut bz,
                _ => continue,
            };
            let blob = p.read_blob(op.data_offset.unwrap_or(0), op.data_length.unwrap_or(0))?;
            target.write_all(&blob)?;
            if op.r#type == op_type::REPLACE_XZ {
                nxz += blob.len() as u64;
            } else {
                nbz += blob.len() as u64;
            }
        }
    }
    println!("{nxz} bytes of REPLACE_XZ blobs, {nbz} bytes of REPLACE_BZ blobs");
    Ok(())
}
