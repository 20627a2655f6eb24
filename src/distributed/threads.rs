//! A [`Communicator`] between threads of one process: a test double for the arithmetic of
//! the distributed steps (never a transport).

use std::sync::{Arc, Barrier, Mutex};

use super::comm::{CommElem, Communicator};
use crate::error::Result;

struct Shared {
    barrier: Barrier,
    slots: Mutex<Vec<Vec<u8>>>,
}

/// One rank of a world of threads.
pub(crate) struct ThreadComm {
    rank: usize,
    size: usize,
    shared: Arc<Shared>,
}

impl ThreadComm {
    /// A world of `size` ranks, one value per thread.
    pub(crate) fn world(size: usize) -> Vec<ThreadComm> {
        let shared = Arc::new(Shared {
            barrier: Barrier::new(size),
            slots: Mutex::new(vec![Vec::new(); size]),
        });
        (0..size)
            .map(|rank| ThreadComm {
                rank,
                size,
                shared: shared.clone(),
            })
            .collect()
    }

    /// Every rank's `mine`, in rank order.
    fn exchange<T: CommElem>(&self, mine: &[T]) -> Vec<Vec<T>> {
        self.shared.barrier.wait();
        self.shared.slots.lock().unwrap()[self.rank] = bytemuck::cast_slice(mine).to_vec();
        self.shared.barrier.wait();
        let all = self
            .shared
            .slots
            .lock()
            .unwrap()
            .iter()
            .map(|b| {
                b.chunks_exact(std::mem::size_of::<T>())
                    .map(bytemuck::pod_read_unaligned)
                    .collect()
            })
            .collect();
        self.shared.barrier.wait();
        all
    }
}

fn offset(counts: &[usize], r: usize) -> usize {
    counts[..r].iter().sum()
}

impl Communicator for ThreadComm {
    fn rank(&self) -> usize {
        self.rank
    }
    fn size(&self) -> usize {
        self.size
    }
    fn barrier(&self) -> Result<()> {
        self.shared.barrier.wait();
        Ok(())
    }
    fn broadcast<T: CommElem>(&self, buf: &mut [T], root: usize) -> Result<()> {
        let all = self.exchange(buf);
        buf.copy_from_slice(&all[root]);
        Ok(())
    }
    fn reduce_scatter_sum<T: CommElem>(
        &self,
        send: &[T],
        recv: &mut [T],
        counts: &[usize],
    ) -> Result<()> {
        let all = self.exchange(send);
        let at = offset(counts, self.rank);
        for (i, out) in recv.iter_mut().enumerate() {
            *out = all
                .iter()
                .skip(1)
                .fold(all[0][at + i], |acc, s| T::add(acc, s[at + i]));
        }
        Ok(())
    }
    fn all_gather<T: CommElem>(&self, send: &[T], recv: &mut [T], counts: &[usize]) -> Result<()> {
        let all = self.exchange(send);
        for (r, s) in all.iter().enumerate() {
            let at = offset(counts, r);
            recv[at..at + counts[r]].copy_from_slice(s);
        }
        Ok(())
    }
    fn all_to_all<T: CommElem>(&self, send: &[T], recv: &mut [T], counts: &[usize]) -> Result<()> {
        let all = self.exchange(send);
        let at = offset(counts, self.rank);
        let n = counts[self.rank];
        for (r, s) in all.iter().enumerate() {
            recv[r * n..(r + 1) * n].copy_from_slice(&s[at..at + n]);
        }
        Ok(())
    }
    fn all_reduce_sum<T: CommElem>(&self, send: &[T], recv: &mut [T]) -> Result<()> {
        let all = self.exchange(send);
        for (i, out) in recv.iter_mut().enumerate() {
            *out = all
                .iter()
                .skip(1)
                .fold(all[0][i], |acc, s| T::add(acc, s[i]));
        }
        Ok(())
    }
}
