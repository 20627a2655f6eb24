//! The collectives a data-parallel step needs, behind one small trait, and the world of one
//! process.

use crate::error::{Error, Result};

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for f64 {}
    impl Sealed for u64 {}
}

/// The element types the collectives move: the arena's floats and `u64` counters.
///
/// With the `mpi` feature every one is also an MPI datatype.
pub trait CommElem:
    sealed::Sealed
    + bytemuck::Pod
    + Default
    + Send
    + Sync
    + PartialEq
    + std::fmt::Debug
    + MpiDatatype
    + 'static
{
    /// `a + b` (the reduction every collective here performs).
    fn add(a: Self, b: Self) -> Self;
}

impl CommElem for f32 {
    fn add(a: f32, b: f32) -> f32 {
        a + b
    }
}
impl CommElem for f64 {
    fn add(a: f64, b: f64) -> f64 {
        a + b
    }
}
impl CommElem for u64 {
    fn add(a: u64, b: u64) -> u64 {
        a.wrapping_add(b)
    }
}

#[cfg(feature = "mpi")]
mod datatype {
    /// An element type MPI can send.
    pub trait MpiDatatype: mpi::traits::Equivalence {}
    impl<T: mpi::traits::Equivalence> MpiDatatype for T {}
}
#[cfg(not(feature = "mpi"))]
mod datatype {
    /// An element type MPI can send (every type, without the `mpi` feature).
    pub trait MpiDatatype {}
    impl<T> MpiDatatype for T {}
}
pub use datatype::MpiDatatype;

/// A group of processes (ranks) that run the same training loop, and the collectives between
/// them. Every rank must call the same collectives in the same order with the same counts, as
/// in MPI.
///
/// Counts are per rank: `counts[r]` elements belong to rank `r`, and rank `r`'s block starts
/// at `counts[..r].iter().sum()`.
pub trait Communicator {
    /// This process's rank, `0..size()`.
    fn rank(&self) -> usize;

    /// The number of ranks.
    fn size(&self) -> usize;

    /// Waits until every rank has called it.
    fn barrier(&self) -> Result<()>;

    /// Copies `buf` on rank `root` into `buf` on every other rank.
    fn broadcast<T: CommElem>(&self, buf: &mut [T], root: usize) -> Result<()>;

    /// `recv` (this rank's block, `counts[rank]` long) becomes the element-wise sum over ranks
    /// of their `send` blocks for this rank (`MPI_Reduce_scatter`). The order in which the
    /// sum is taken is the transport's own: see [`Reduction`].
    fn reduce_scatter_sum<T: CommElem>(
        &self,
        send: &[T],
        recv: &mut [T],
        counts: &[usize],
    ) -> Result<()>;

    /// Every rank's `send` (`counts[r]` elements from rank `r`), laid out in rank order in
    /// `recv` on every rank (`MPI_Allgatherv`).
    fn all_gather<T: CommElem>(&self, send: &[T], recv: &mut [T], counts: &[usize]) -> Result<()>;

    /// Rank `r`'s block `j` of `send` (`counts[j]` long) lands in rank `j`'s `recv` as its block
    /// `r`, where every rank sends the same `counts` to each destination (`MPI_Alltoallv`
    /// with `recv` blocks of `counts[rank]` each): `recv` is `size() * counts[rank]` long.
    fn all_to_all<T: CommElem>(&self, send: &[T], recv: &mut [T], counts: &[usize]) -> Result<()>;

    /// The element-wise sum over ranks of `send`, on every rank (`MPI_Allreduce`), in the
    /// transport's order.
    fn all_reduce_sum<T: CommElem>(&self, send: &[T], recv: &mut [T]) -> Result<()>;
}

/// A shared reference is a communicator too, so several wrappers (a [`super::DataParallel`]
/// beside a [`super::ShardedOptimizer`], say) can use one.
impl<C: Communicator + ?Sized> Communicator for &C {
    fn rank(&self) -> usize {
        (**self).rank()
    }
    fn size(&self) -> usize {
        (**self).size()
    }
    fn barrier(&self) -> Result<()> {
        (**self).barrier()
    }
    fn broadcast<T: CommElem>(&self, buf: &mut [T], root: usize) -> Result<()> {
        (**self).broadcast(buf, root)
    }
    fn reduce_scatter_sum<T: CommElem>(
        &self,
        send: &[T],
        recv: &mut [T],
        counts: &[usize],
    ) -> Result<()> {
        (**self).reduce_scatter_sum(send, recv, counts)
    }
    fn all_gather<T: CommElem>(&self, send: &[T], recv: &mut [T], counts: &[usize]) -> Result<()> {
        (**self).all_gather(send, recv, counts)
    }
    fn all_to_all<T: CommElem>(&self, send: &[T], recv: &mut [T], counts: &[usize]) -> Result<()> {
        (**self).all_to_all(send, recv, counts)
    }
    fn all_reduce_sum<T: CommElem>(&self, send: &[T], recv: &mut [T]) -> Result<()> {
        (**self).all_reduce_sum(send, recv)
    }
}

/// How gradients are summed over ranks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Reduction {
    /// Each rank receives every rank's piece of its shard (`MPI_Alltoallv`) and adds them in
    /// rank order, 0 first. Runs are reproducible bit for bit at a given world size, and every
    /// rank holds the same bits. The default.
    #[default]
    RankOrdered,
    /// MPI's own `MPI_Reduce_scatter`. The MPI standard does not fix the order of a
    /// reduction's operands (it only *advises* that a reduction give the same result whatever
    /// the data's distribution), and Open MPI picks its algorithm by message size and world
    /// size, so the bits may change with either, and between MPI libraries. It moves the same
    /// bytes as [`Reduction::RankOrdered`] but lets MPI add in the network pipeline.
    Mpi,
}

/// The world of one process: every collective is a copy. What a single-process run passes to
/// code written for any world size.
#[derive(Debug, Clone, Copy, Default)]
pub struct SingleProcess;

impl Communicator for SingleProcess {
    fn rank(&self) -> usize {
        0
    }
    fn size(&self) -> usize {
        1
    }
    fn barrier(&self) -> Result<()> {
        Ok(())
    }
    fn broadcast<T: CommElem>(&self, _buf: &mut [T], _root: usize) -> Result<()> {
        Ok(())
    }
    fn reduce_scatter_sum<T: CommElem>(
        &self,
        send: &[T],
        recv: &mut [T],
        _counts: &[usize],
    ) -> Result<()> {
        recv.copy_from_slice(send);
        Ok(())
    }
    fn all_gather<T: CommElem>(&self, send: &[T], recv: &mut [T], _counts: &[usize]) -> Result<()> {
        recv.copy_from_slice(send);
        Ok(())
    }
    fn all_to_all<T: CommElem>(&self, send: &[T], recv: &mut [T], _counts: &[usize]) -> Result<()> {
        recv.copy_from_slice(send);
        Ok(())
    }
    fn all_reduce_sum<T: CommElem>(&self, send: &[T], recv: &mut [T]) -> Result<()> {
        recv.copy_from_slice(send);
        Ok(())
    }
}

/// Checks that every rank passed the same `fingerprint`; on a mismatch, every rank gets an
/// error naming the ranks that differ from rank 0 (never a hang: one `all_gather` of one value
/// per rank, which every rank calls exactly once).
pub(crate) fn check_same_everywhere<C: Communicator>(
    comm: &C,
    fingerprint: u64,
    what: &str,
) -> Result<()> {
    let n = comm.size();
    let mut all = vec![0u64; n];
    comm.all_gather(&[fingerprint], &mut all, &vec![1; n])?;
    let differ: Vec<usize> = (1..n).filter(|&r| all[r] != all[0]).collect();
    if differ.is_empty() {
        Ok(())
    } else {
        Err(Error::Distributed(format!(
            "the {what} differs between ranks: rank(s) {differ:?} do not match rank 0 \
             (fingerprints {all:016x?}); every rank must build the same arena and param groups"
        )))
    }
}
