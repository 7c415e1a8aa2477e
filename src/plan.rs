//! The one planner: how the kernels see an array reduced over some of its axes.
//!
//! Every reduction is a batch of `(outer, n, inner)` lanes (see [`crate::layout`]). Given an
//! array's shape, byte strides, item size and data address, and the reduced axes (already
//! normalised: sorted, distinct, in range), [`plan`] picks a *work order* of the axes in which
//! the reduced axes are adjacent, and says whether the kernels read the array where it is
//! ([`Access::Direct`], possibly through a transpose: the work order need not be the array's
//! own order) or need each block of lanes copied into a dense buffer first
//! ([`Access::Gather`]: gaps inside a lane, negative or odd strides, misaligned data, or
//! reduced axes that no order of the axes makes adjacent in memory).
//!
//! The same plan then answers whether another array of the same shape (an `out`, weights,
//! probability targets) can be read or written directly in that work order
//! ([`Plan::direct_batch`]). Axis *arguments* are interpreted elsewhere, once; this module
//! only sees their normalised form.
//!
//! ```
//! use stablelse::plan::{plan, Access, ArrayLayout};
//! // A Fortran-ordered 3x4 float32 array reduced over axis 0 is read as 4 rows of 3.
//! let layout = ArrayLayout { shape: &[3, 4], strides: &[4, 12], itemsize: 4, addr: 64 };
//! let p = plan(layout, &[0]).unwrap();
//! assert_eq!(p.perm, vec![1, 0]);
//! assert_eq!((p.outer, p.n, p.inner), (4, 3, 1));
//! assert!(matches!(p.access, Access::Direct(_)));
//! ```

use crate::layout::Batch;

/// An array as the planner sees it: no data, only where it lies.
#[derive(Clone, Copy, Debug)]
pub struct ArrayLayout<'a> {
    /// Length of each axis.
    pub shape: &'a [usize],
    /// Byte stride of each axis, as NumPy reports them (may be negative or zero).
    pub strides: &'a [isize],
    /// Bytes per element; the data must also be aligned to it for direct access.
    pub itemsize: usize,
    /// Address of element 0.
    pub addr: usize,
}

/// How the kernels read the array in the plan's work order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Where it is: `Batch` indexes elements (not bytes) from the data pointer.
    Direct(Batch),
    /// Through a dense buffer that each block of lanes is copied into first.
    Gather,
}

/// The answer of [`plan`]; see the module docs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    /// The work order: position `i` of the work array is axis `perm[i]` of the input.
    pub perm: Vec<usize>,
    /// Position of the first reduced axis in the work order.
    pub first: usize,
    /// Number of reduced axes (adjacent in the work order from `first`).
    pub reduced: usize,
    /// Product of the work shape before the reduced axes.
    pub outer: usize,
    /// Product of the reduced axes' lengths: the length of every lane.
    pub n: usize,
    /// Product of the work shape after the reduced axes.
    pub inner: usize,
    /// Whether the kernels read the input directly.
    pub access: Access,
}

/// Why no plan exists (arguments that break the planner's preconditions).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlanError(pub String);

impl std::fmt::Display for PlanError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for PlanError {}

impl Plan {
    /// The kept axes of the input in work order (the axis order of a reduction's result).
    pub fn kept(&self) -> impl Iterator<Item = usize> + '_ {
        self.perm
            .iter()
            .enumerate()
            .filter(|&(i, _)| i < self.first || i >= self.first + self.reduced)
            .map(|(_, &a)| a)
    }

    /// The work order of the array's axes: `(outer, n, inner)` lanes, `outer * inner` of them.
    pub fn count(&self) -> usize {
        self.outer * self.inner
    }

    /// The batch in which another array of the input's shape (given by `layout`) is read in
    /// this plan's work order, or `None` if the kernels cannot read it there.
    pub fn direct_batch(&self, layout: ArrayLayout<'_>) -> Option<Batch> {
        direct_batch(layout, &self.perm, self.first, self.reduced)
    }

    /// The batch in which the kernels write an output of the input's shape in place: dense
    /// `(outer, n, inner)` in the work order, or `None`.
    pub fn dense_out(&self, layout: ArrayLayout<'_>) -> Option<Batch> {
        self.direct_batch(layout).filter(|b| b.is_contiguous())
    }
}

/// Plans a reduction of the array `layout` over `axes` (sorted, distinct, each `< ndim`).
pub fn plan(layout: ArrayLayout<'_>, axes: &[usize]) -> Result<Plan, PlanError> {
    let ndim = layout.shape.len();
    if layout.strides.len() != ndim {
        return Err(PlanError(format!(
            "{} strides for {ndim} axes",
            layout.strides.len()
        )));
    }
    if layout.itemsize == 0 {
        return Err(PlanError("item size 0".into()));
    }
    if axes.windows(2).any(|w| w[0] >= w[1]) || axes.last().is_some_and(|&a| a >= ndim) {
        return Err(PlanError(format!(
            "axes {axes:?} are not sorted, distinct axes of a {ndim}-d array"
        )));
    }
    let reduced = axes.len();
    let adjacent = axes.is_empty() || axes[reduced - 1] - axes[0] + 1 == reduced;
    // The array's own order first (every C-ordered array with adjacent axes ends here), then
    // the order of memory (a transpose: Fortran arrays), then kept axes before reduced ones.
    let own: Option<Vec<usize>> = adjacent.then(|| (0..ndim).collect());
    if let Some(perm) = &own {
        let first = first_reduced(perm, axes);
        if let Some(batch) = direct_batch(layout, perm, first, reduced) {
            return finish(
                layout,
                own.unwrap_or_default(),
                first,
                reduced,
                Access::Direct(batch),
            );
        }
    }
    if let Some(perm) = memory_order(layout, axes) {
        let first = first_reduced(&perm, axes);
        if let Some(batch) = direct_batch(layout, &perm, first, reduced) {
            return finish(layout, perm, first, reduced, Access::Direct(batch));
        }
    }
    // Kept axes in order, then the reduced ones: always adjacent.
    let moved: Vec<usize> = (0..ndim)
        .filter(|a| !axes.contains(a))
        .chain(axes.iter().copied())
        .collect();
    let first = first_reduced(&moved, axes);
    if let Some(batch) = direct_batch(layout, &moved, first, reduced) {
        return finish(layout, moved, first, reduced, Access::Direct(batch));
    }
    // Gathered block by block in the array's own order when that keeps the reduced axes
    // adjacent, else with them moved last.
    let perm = own.unwrap_or(moved);
    let first = first_reduced(&perm, axes);
    finish(layout, perm, first, reduced, Access::Gather)
}

fn finish(
    layout: ArrayLayout<'_>,
    perm: Vec<usize>,
    first: usize,
    reduced: usize,
    access: Access,
) -> Result<Plan, PlanError> {
    let (outer, n, inner) = sizes(layout.shape, &perm, first, reduced)?;
    Ok(Plan {
        perm,
        first,
        reduced,
        outer,
        n,
        inner,
        access,
    })
}

/// Position of the first reduced axis in `perm` (where they are adjacent); for no reduced
/// axes, the end (every axis is outer, `n == 1`).
fn first_reduced(perm: &[usize], axes: &[usize]) -> usize {
    perm.iter()
        .position(|a| axes.contains(a))
        .unwrap_or(perm.len())
}

fn sizes(
    shape: &[usize],
    perm: &[usize],
    first: usize,
    reduced: usize,
) -> Result<(usize, usize, usize), PlanError> {
    let prod = |r: std::ops::Range<usize>| -> Result<usize, PlanError> {
        perm.get(r)
            .unwrap_or(&[])
            .iter()
            .try_fold(1usize, |acc, &a| acc.checked_mul(shape[a]))
            .ok_or_else(|| PlanError("array is too large".into()))
    };
    Ok((
        prod(0..first)?,
        prod(first..first + reduced)?,
        prod(first + reduced..perm.len())?,
    ))
}

/// The axes in decreasing |stride| (the order of memory), with the reduced axes adjacent, or
/// None when they are not adjacent in memory. Length-1 axes go where they do no harm: kept
/// ones first, reduced ones with the other reduced axes.
fn memory_order(layout: ArrayLayout<'_>, axes: &[usize]) -> Option<Vec<usize>> {
    let ndim = layout.shape.len();
    let mut big: Vec<usize> = (0..ndim).filter(|&a| layout.shape[a] != 1).collect();
    // Stable: equal strides keep the array's own order.
    big.sort_by_key(|&a| std::cmp::Reverse(layout.strides[a].unsigned_abs()));
    let unit_kept = (0..ndim).filter(|&a| layout.shape[a] == 1 && !axes.contains(&a));
    let unit_reduced: Vec<usize> = axes
        .iter()
        .copied()
        .filter(|&a| layout.shape[a] == 1)
        .collect();
    let mut order: Vec<usize> = unit_kept.collect();
    let red_pos: Vec<usize> = big
        .iter()
        .enumerate()
        .filter(|(_, a)| axes.contains(a))
        .map(|(i, _)| i)
        .collect();
    match (red_pos.first(), red_pos.last()) {
        (Some(&lo), Some(&hi)) => {
            if hi - lo + 1 != red_pos.len() {
                return None;
            }
            order.extend_from_slice(&big[..=hi]);
            order.extend_from_slice(&unit_reduced);
            order.extend_from_slice(&big[hi + 1..]);
        }
        _ => {
            // Only length-1 axes are reduced: put them last (lanes of length 1).
            order.extend_from_slice(&big);
            order.extend_from_slice(&unit_reduced);
        }
    }
    Some(order)
}

/// The batch of `layout` read in the work order `perm` with the reduced axes at
/// `first..first + reduced`, or None if the kernels cannot read it there: lanes must be dense
/// (`inner` elements apart along the lane, 1 apart across the inner axes) and the outer axes
/// must collapse to one non-negative pitch; the data must be aligned.
fn direct_batch(
    layout: ArrayLayout<'_>,
    perm: &[usize],
    first: usize,
    reduced: usize,
) -> Option<Batch> {
    let (outer, n, inner) = sizes(layout.shape, perm, first, reduced).ok()?;
    if outer == 0 || n == 0 || inner == 0 {
        // Nothing is read: strides and the data pointer of an empty array are irrelevant.
        return Some(Batch::contiguous(outer, n, inner));
    }
    let item = layout.itemsize;
    if !layout.addr.is_multiple_of(item) {
        return None;
    }
    let at = |i: usize| (layout.shape[perm[i]], layout.strides[perm[i]]);
    // Inner and reduced axes: one dense C-ordered slab.
    let mut expected = item as isize;
    for i in (first..perm.len()).rev() {
        let (len, stride) = at(i);
        if len == 1 {
            continue;
        }
        if stride != expected {
            return None;
        }
        expected = expected.checked_mul(len as isize)?;
    }
    // Outer axes: one pitch.
    let mut pitch: Option<isize> = None;
    for i in (0..first).rev() {
        let (len, stride) = at(i);
        if len == 1 {
            continue;
        }
        match pitch {
            None => pitch = Some(stride),
            Some(p) => {
                // This axis must step over whole runs of the outer axes after it.
                if stride != p.checked_mul(run_len(layout, perm, i, first) as isize)? {
                    return None;
                }
            }
        }
    }
    let outer_stride = match pitch {
        None => n * inner,
        Some(p) if p >= 0 && (p as usize).is_multiple_of(item) => p as usize / item,
        Some(_) => return None,
    };
    let batch = Batch {
        outer,
        n,
        inner,
        outer_stride,
    };
    batch.required_len().ok()?;
    Some(batch)
}

/// Number of outer positions one step of outer axis `i` spans: the product of the outer axes
/// after it.
fn run_len(layout: ArrayLayout<'_>, perm: &[usize], i: usize, first: usize) -> usize {
    perm[i + 1..first]
        .iter()
        .map(|&a| layout.shape[a])
        .product()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn c_strides(shape: &[usize], item: usize) -> Vec<isize> {
        let mut s = vec![0isize; shape.len()];
        let mut acc = item as isize;
        for i in (0..shape.len()).rev() {
            s[i] = acc;
            acc *= shape[i].max(1) as isize;
        }
        s
    }

    fn lay<'a>(shape: &'a [usize], strides: &'a [isize]) -> ArrayLayout<'a> {
        ArrayLayout {
            shape,
            strides,
            itemsize: 4,
            addr: 4096,
        }
    }

    #[test]
    fn c_rows_are_direct() {
        let s = c_strides(&[8, 10], 4);
        let p = plan(lay(&[8, 10], &s), &[1]).unwrap();
        assert_eq!(p.access, Access::Direct(Batch::rows(8, 10)));
        assert_eq!(p.perm, vec![0, 1]);
    }

    #[test]
    fn leading_axis_is_columns() {
        let s = c_strides(&[2, 3, 4], 4);
        let p = plan(lay(&[2, 3, 4], &s), &[0]).unwrap();
        assert_eq!(p.access, Access::Direct(Batch::contiguous(1, 2, 12)));
    }

    #[test]
    fn row_pitch_is_direct() {
        // b[::2] of a (6, 4) array: rows 8 elements apart.
        let p = plan(lay(&[3, 4], &[32, 4]), &[1]).unwrap();
        assert_eq!(
            p.access,
            Access::Direct(Batch {
                outer: 3,
                n: 4,
                inner: 1,
                outer_stride: 8
            })
        );
    }

    #[test]
    fn gaps_negative_and_misaligned_gather() {
        assert_eq!(
            plan(lay(&[3, 4], &[16, 8]), &[1]).unwrap().access,
            Access::Gather
        );
        assert_eq!(
            plan(lay(&[3, 4], &[16, -4]), &[1]).unwrap().access,
            Access::Gather
        );
        let mis = ArrayLayout {
            addr: 4098,
            ..lay(&[3, 4], &[16, 4])
        };
        assert_eq!(plan(mis, &[1]).unwrap().access, Access::Gather);
    }

    #[test]
    fn non_adjacent_axes_move_last() {
        let s = c_strides(&[2, 3, 4], 4);
        let p = plan(lay(&[2, 3, 4], &s), &[0, 2]).unwrap();
        assert_eq!(p.perm, vec![1, 0, 2]);
        assert_eq!((p.outer, p.n, p.inner), (3, 8, 1));
        assert_eq!(p.access, Access::Gather);
        assert_eq!(p.kept().collect::<Vec<_>>(), vec![1]);
    }

    #[test]
    fn bad_arguments_are_errors() {
        let s = c_strides(&[2, 3], 4);
        assert!(plan(lay(&[2, 3], &s), &[1, 0]).is_err());
        assert!(plan(lay(&[2, 3], &s), &[2]).is_err());
        assert!(plan(lay(&[2, 3], &s[..1]), &[0]).is_err());
    }

    /// The element offset of work index (o, k, j) of a plan, computed from the layout.
    fn offset_of(layout: ArrayLayout<'_>, p: &Plan, o: usize, k: usize, j: usize) -> isize {
        let mut off = 0isize;
        let groups = [
            (o, 0, p.first),
            (k, p.first, p.first + p.reduced),
            (j, p.first + p.reduced, p.perm.len()),
        ];
        for (mut idx, lo, hi) in groups {
            for i in (lo..hi).rev() {
                let a = p.perm[i];
                let len = layout.shape[a];
                off += (idx % len) as isize * layout.strides[a];
                idx /= len;
            }
        }
        off / layout.itemsize as isize
    }

    fn arb_case() -> impl Strategy<Value = (Vec<usize>, Vec<isize>, Vec<usize>)> {
        (1usize..5)
            .prop_flat_map(|nd| {
                (
                    proptest::collection::vec(1usize..4, nd),
                    proptest::collection::vec(0usize..nd, nd),
                    proptest::collection::vec(prop_oneof![Just(1isize), Just(-1), Just(2)], nd),
                    proptest::collection::vec(any::<bool>(), nd),
                )
            })
            .prop_map(|(shape, order, step, red)| {
                // Strides of a C array of `shape` permuted by `order`'s ranks, then stepped.
                let nd = shape.len();
                let mut axes_by: Vec<usize> = (0..nd).collect();
                axes_by.sort_by_key(|&a| (order[a], a));
                let mut strides = vec![0isize; nd];
                let mut acc = 4isize;
                for &a in axes_by.iter().rev() {
                    strides[a] = acc * step[a].abs();
                    if step[a] < 0 {
                        strides[a] = -strides[a];
                    }
                    acc *= (shape[a] * step[a].unsigned_abs()) as isize;
                }
                let axes: Vec<usize> = (0..nd).filter(|&a| red[a]).collect();
                (shape, strides, axes)
            })
    }

    proptest! {
        /// A direct plan's batch addresses exactly the elements the layout puts at each work
        /// index; every plan is a permutation with the reduced axes adjacent and sizes that
        /// multiply to the array's size.
        #[test]
        fn direct_plans_index_the_same_elements((shape, strides, axes) in arb_case()) {
            let layout = lay(&shape, &strides);
            let p = plan(layout, &axes).unwrap();
            let mut sorted = p.perm.clone();
            sorted.sort();
            prop_assert_eq!(sorted, (0..shape.len()).collect::<Vec<_>>());
            let red: Vec<usize> = p.perm[p.first..p.first + p.reduced].to_vec();
            let mut red_sorted = red.clone();
            red_sorted.sort();
            prop_assert_eq!(red_sorted, axes.clone());
            prop_assert_eq!(p.outer * p.n * p.inner, shape.iter().product::<usize>());
            if let Access::Direct(b) = p.access {
                prop_assert_eq!((b.outer, b.n, b.inner), (p.outer, p.n, p.inner));
                for o in 0..p.outer {
                    for k in 0..p.n {
                        for j in 0..p.inner {
                            let want = offset_of(layout, &p, o, k, j);
                            let got = (o * b.outer_stride + k * b.inner + j) as isize;
                            prop_assert_eq!(got, want);
                        }
                    }
                }
            }
        }

        /// C-ordered arrays reduced over adjacent axes are always read directly, in their own
        /// order.
        #[test]
        fn c_arrays_with_adjacent_axes_are_direct(
            shape in proptest::collection::vec(1usize..5, 1..5),
            lo in 0usize..4, len in 0usize..4,
        ) {
            let nd = shape.len();
            let lo = lo.min(nd - 1);
            let hi = (lo + len).min(nd);
            let axes: Vec<usize> = (lo..hi).collect();
            let strides = c_strides(&shape, 4);
            let p = plan(lay(&shape, &strides), &axes).unwrap();
            prop_assert!(matches!(p.access, Access::Direct(b) if b.is_contiguous()));
        }
    }
}
