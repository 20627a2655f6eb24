//! How the arena is cut into one contiguous shard per rank.

use std::ops::Range;

use crate::arena::ParamInfo;
use crate::buffer::ALIGN;

/// One contiguous range of the arena's elements per rank, in rank order, covering the arena.
///
/// Elementwise algorithms take [`ShardPlan::balanced`]: every bound but the arena's end is a
/// multiple of the cache line (64 bytes, which is also the widest SIMD vector), and the shards
/// differ in length by at most one cache line, except that the last ones are shorter when the
/// arena is not a multiple of `size` lines. Algorithms whose update needs a whole parameter
/// (Adafactor's factored moments, Muon's orthogonalisation) take
/// [`ShardPlan::at_param_boundaries`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardPlan {
    bounds: Vec<usize>,
}

impl ShardPlan {
    /// `len` elements of `elem_size` bytes each over `size` ranks, aligned to cache lines.
    pub fn balanced(len: usize, size: usize, elem_size: usize) -> ShardPlan {
        assert!(size > 0, "a world has at least one rank");
        let line = (ALIGN / elem_size).max(1);
        let lines = len.div_ceil(line);
        let per_rank = lines.div_ceil(size);
        let bounds = (0..=size).map(|r| (r * per_rank * line).min(len)).collect();
        ShardPlan { bounds }
    }

    /// Shards that start and end at parameter boundaries: rank `r`'s shard ends at the first
    /// boundary at or after `(r + 1) * total / size` elements. A rank can get no parameter
    /// when there are fewer parameters than ranks or one parameter dominates.
    pub fn at_param_boundaries(layout: &[ParamInfo], size: usize) -> ShardPlan {
        assert!(size > 0, "a world has at least one rank");
        let len = layout.last().map_or(0, |p| p.offset + p.len);
        let mut bounds = vec![0];
        let mut next = 0;
        for r in 1..size {
            let target = (r * len).div_ceil(size);
            while next < layout.len() && layout[next].offset < target {
                next += 1;
            }
            let b = layout.get(next).map_or(len, |p| p.offset);
            bounds.push(b.max(*bounds.last().unwrap_or(&0)));
        }
        bounds.push(len);
        ShardPlan { bounds }
    }

    /// The number of ranks.
    pub fn size(&self) -> usize {
        self.bounds.len() - 1
    }

    /// Rank `rank`'s element range.
    pub fn shard(&self, rank: usize) -> Range<usize> {
        self.bounds[rank]..self.bounds[rank + 1]
    }

    /// Every rank's shard length, in rank order (the `counts` of the collectives).
    pub fn counts(&self) -> Vec<usize> {
        self.bounds.windows(2).map(|w| w[1] - w[0]).collect()
    }

    /// The elements covered (the arena's length).
    pub fn len(&self) -> usize {
        *self.bounds.last().unwrap_or(&0)
    }

    /// The parameters of `layout` that rank `rank`'s shard holds a piece of: arena position
    /// and the piece's element range (arena coordinates), in arena order.
    pub fn pieces(&self, layout: &[ParamInfo], rank: usize) -> Vec<(usize, Range<usize>)> {
        let shard = self.shard(rank);
        layout
            .iter()
            .enumerate()
            .filter_map(|(i, info)| {
                let lo = info.offset.max(shard.start);
                let hi = (info.offset + info.len).min(shard.end);
                (lo < hi).then_some((i, lo..hi))
            })
            .collect()
    }

    /// True when the plan covers no element.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check_cover(p: &ShardPlan, len: usize, size: usize) {
        assert_eq!(p.size(), size);
        assert_eq!(p.shard(0).start, 0);
        assert_eq!(p.shard(size - 1).end, len);
        for r in 1..size {
            assert_eq!(p.shard(r - 1).end, p.shard(r).start);
        }
        assert_eq!(p.counts().iter().sum::<usize>(), len);
    }

    #[test]
    fn balanced_shards_cover_the_arena_on_cache_lines() {
        for &size in &[1, 2, 3, 4, 7] {
            for &len in &[0, 1, 15, 16, 17, 1000, 4096, 123_457] {
                for &(elem, line) in &[(4usize, 16usize), (8, 8)] {
                    let p = ShardPlan::balanced(len, size, elem);
                    check_cover(&p, len, size);
                    for r in 0..size {
                        let s = p.shard(r);
                        assert!(
                            s.start.is_multiple_of(line) || s.start == len,
                            "{len} {size} {r}"
                        );
                        // No shard is more than one line longer than an even split.
                        assert!(s.len() <= len.div_ceil(line).div_ceil(size) * line);
                    }
                }
            }
        }
    }

    #[test]
    fn parameter_boundary_shards_never_cut_a_parameter() {
        let lens = [768 * 3072, 768, 3072, 768, 768, 768 * 768, 50257 * 768];
        let mut layout = Vec::new();
        let mut at = 0;
        for (i, &len) in lens.iter().enumerate() {
            layout.push(ParamInfo {
                name: format!("p{i}"),
                shape: vec![len],
                offset: at,
                len,
            });
            at += len;
        }
        for size in 1..=4 {
            let p = ShardPlan::at_param_boundaries(&layout, size);
            check_cover(&p, at, size);
            for r in 0..=size {
                let b = p.bounds[r];
                assert!(b == at || layout.iter().any(|q| q.offset == b), "bound {b}");
            }
        }
    }
}
