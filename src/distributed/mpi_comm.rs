//! [`Communicator`] over MPI (the `mpi` feature): rsmpi's bindings to the system's MPI.

use mpi::collective::SystemOperation;
use mpi::datatype::{Partition, PartitionMut};
use mpi::environment::Universe;
use mpi::raw::AsRaw;
use mpi::topology::SimpleCommunicator;
use mpi::traits::{Communicator as MpiCommunicator, CommunicatorCollectives, Root};
use mpi::Count;

use super::comm::{CommElem, Communicator};
use crate::error::{Error, Result};

/// MPI's world communicator, and the MPI environment when this value started it (it is
/// finalised when the value is dropped).
///
/// When a rank dies mid-step, Open MPI's default error handler (`MPI_ERRORS_ARE_FATAL`)
/// aborts every rank of the job: no rank is left waiting in a collective, and nothing a
/// step had not finished is saved. Resume from the last checkpoint.
pub struct MpiComm {
    world: SimpleCommunicator,
    _universe: Option<Universe>,
}

impl std::fmt::Debug for MpiComm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MpiComm")
            .field("rank", &self.world.rank())
            .field("size", &self.world.size())
            .finish()
    }
}

impl MpiComm {
    /// Initialises MPI (`MPI_Init`) and takes its world communicator. An error when MPI is
    /// already initialised: then build one from its communicator with
    /// [`MpiComm::from_world`].
    pub fn init() -> Result<MpiComm> {
        let universe = mpi::initialize().ok_or_else(|| {
            Error::Distributed(
                "MPI is already initialised: build the communicator with MpiComm::from_world"
                    .into(),
            )
        })?;
        Ok(MpiComm {
            world: universe.world(),
            _universe: Some(universe),
        })
    }

    /// The world communicator of an MPI environment the caller initialised and keeps alive.
    pub fn from_world(world: SimpleCommunicator) -> MpiComm {
        MpiComm {
            world,
            _universe: None,
        }
    }

    /// The underlying rsmpi communicator.
    pub fn world(&self) -> &SimpleCommunicator {
        &self.world
    }
}

/// MPI counts and displacements are C `int`s.
fn counts_and_displs(counts: &[usize]) -> Result<(Vec<Count>, Vec<Count>)> {
    let mut c = Vec::with_capacity(counts.len());
    let mut d = Vec::with_capacity(counts.len());
    let mut at = 0usize;
    for &n in counts {
        let too_big = || {
            Error::Distributed(format!(
                "a collective of {} elements does not fit MPI's int counts and displacements \
                 (at most {} elements per call)",
                counts.iter().sum::<usize>(),
                Count::MAX
            ))
        };
        d.push(Count::try_from(at).map_err(|_| too_big())?);
        c.push(Count::try_from(n).map_err(|_| too_big())?);
        at += n;
    }
    Ok((c, d))
}

fn check(rc: std::os::raw::c_int, what: &str) -> Result<()> {
    if rc == 0 {
        Ok(())
    } else {
        Err(Error::Distributed(format!(
            "{what} failed with MPI error code {rc}"
        )))
    }
}

impl Communicator for MpiComm {
    fn rank(&self) -> usize {
        self.world.rank() as usize
    }

    fn size(&self) -> usize {
        self.world.size() as usize
    }

    fn barrier(&self) -> Result<()> {
        self.world.barrier();
        Ok(())
    }

    fn broadcast<T: CommElem>(&self, buf: &mut [T], root: usize) -> Result<()> {
        Count::try_from(buf.len()).map_err(|_| {
            Error::Distributed(format!(
                "a broadcast of {} elements is too large",
                buf.len()
            ))
        })?;
        self.world
            .process_at_rank(root as mpi::Rank)
            .broadcast_into(buf);
        Ok(())
    }

    fn reduce_scatter_sum<T: CommElem>(
        &self,
        send: &[T],
        recv: &mut [T],
        counts: &[usize],
    ) -> Result<()> {
        let (c, _) = counts_and_displs(counts)?;
        if counts.len() != self.size()
            || send.len() != counts.iter().sum::<usize>()
            || recv.len() != counts[self.rank()]
        {
            return Err(Error::Distributed(format!(
                "reduce_scatter_sum: {} counts for {} ranks, {} elements sent for counts \
                 summing to {}, {} received for this rank's {}",
                counts.len(),
                self.size(),
                send.len(),
                counts.iter().sum::<usize>(),
                recv.len(),
                counts.get(self.rank()).copied().unwrap_or(0)
            )));
        }
        // SAFETY: `send` holds the sum of `counts` elements and `recv` this rank's count, of
        // the datatype MPI is told (`T`'s equivalent); `c` has one count per rank of the
        // communicator. rsmpi has no safe reduce-scatter with per-rank counts.
        let rc = unsafe {
            mpi::ffi::MPI_Reduce_scatter(
                send.as_ptr().cast(),
                recv.as_mut_ptr().cast(),
                c.as_ptr(),
                T::equivalent_datatype().as_raw(),
                SystemOperation::sum().as_raw(),
                self.world.as_raw(),
            )
        };
        check(rc, "MPI_Reduce_scatter")
    }

    fn all_gather<T: CommElem>(&self, send: &[T], recv: &mut [T], counts: &[usize]) -> Result<()> {
        let (c, d) = counts_and_displs(counts)?;
        let mut part = PartitionMut::new(recv, &c[..], &d[..]);
        self.world.all_gather_varcount_into(send, &mut part);
        Ok(())
    }

    fn all_to_all<T: CommElem>(&self, send: &[T], recv: &mut [T], counts: &[usize]) -> Result<()> {
        let n = self.size();
        let (sc, sd) = counts_and_displs(counts)?;
        let (rc, rd) = counts_and_displs(&vec![counts[self.rank()]; n])?;
        let sendp = Partition::new(send, &sc[..], &sd[..]);
        let mut recvp = PartitionMut::new(recv, &rc[..], &rd[..]);
        self.world.all_to_all_varcount_into(&sendp, &mut recvp);
        Ok(())
    }

    fn all_reduce_sum<T: CommElem>(&self, send: &[T], recv: &mut [T]) -> Result<()> {
        Count::try_from(send.len()).map_err(|_| {
            Error::Distributed(format!(
                "an all-reduce of {} elements is too large",
                send.len()
            ))
        })?;
        self.world
            .all_reduce_into(send, recv, SystemOperation::sum());
        Ok(())
    }
}
