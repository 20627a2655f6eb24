//! Data-parallel training over several processes: the collectives behind a small
//! [`Communicator`] trait (MPI with the `mpi` feature, or [`SingleProcess`]), how the arena
//! is cut into per-rank shards ([`ShardPlan`]), and replicated data parallelism
//! ([`DataParallel`], torch's `DistributedDataParallel`) and ZeRO-1 sharded optimizer state
//! ([`ShardedOptimizer`], torch's `ZeroRedundancyOptimizer`).
//!
//! The flat arena makes the exchange two collectives over flat buffers: no bucketing and no
//! flattening, as torch's DDP and DeepSpeed need.

pub mod checkpoint;
mod comm;
#[cfg(feature = "mpi")]
mod mpi_comm;
mod replicated;
mod shard;
#[cfg(test)]
mod threads;
mod zero;

pub use checkpoint::{load_sharded, Manifest};
pub use comm::{CommElem, Communicator, MpiDatatype, Reduction, SingleProcess};
#[cfg(feature = "mpi")]
pub use mpi_comm::MpiComm;
pub use replicated::{DataParallel, Synced};
pub use shard::ShardPlan;
pub use zero::ShardedOptimizer;
