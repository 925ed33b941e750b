//! The pure-logic core of snapuserd's legacy (dm-snapshot) mode: it presents a COW file's
//! data ops as a dm-snap-persistent exception store, serves the requests dm-snapshot sends
//! over dm-user, and follows dm-snapshot-merge's metadata write-backs to commit merge
//! progress crash-safely.
//!
//! Nothing here touches the kernel or the COW file directly: the COW reader, the durable
//! merge state and the transport are behind small traits (see `DESIGN.md`).

#![deny(unsafe_code)]

pub mod block_server;
pub mod exception_store;
pub mod merge_plan;
pub mod merge_tracker;

#[cfg(test)]
pub(crate) mod dm_snapshot_model;
#[cfg(test)]
mod harness_tests;
#[cfg(test)]
pub(crate) mod test_support;
