//! The log-sum-exp state `(max, excess)` and its merge rule.
//!
//! A state summarises a multiset of values `x_i` as `m = max x_i` and
//! `excess = sum_i exp(x_i - m) - 1`, i.e. the total `S = 1 + excess` less the contribution of
//! one maximal element. Keeping the excess instead of `S` preserves relative accuracy when every
//! other term is tiny: `logsumexp = m + log1p(excess)` stays exact for `[0, -40]` (about 4e-18)
//! where `m + log(S)` would round `S` to 1 and return 0. The same holds for the top class of
//! log_softmax, `-log1p(excess)` (scipy issue 19521).
//!
//! The empty state is `(-inf, -1)` (S = 0). A NaN anywhere makes `m` NaN, and NaN is sticky.
//! `m = +inf` means the sum is infinite and `excess` is meaningless.

/// Running `(max, excess)` state in `f64`; see the module docs for the invariant.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LseState {
    pub max: f64,
    pub excess: f64,
}

impl Default for LseState {
    fn default() -> Self {
        Self::EMPTY
    }
}

impl LseState {
    /// The state of no elements: `logsumexp([]) = -inf`.
    pub const EMPTY: LseState = LseState {
        max: f64::NEG_INFINITY,
        excess: -1.0,
    };

    /// The state of a single element `x`.
    #[inline]
    pub fn of(x: f64) -> LseState {
        if x == f64::NEG_INFINITY {
            Self::EMPTY
        } else {
            LseState {
                max: x,
                excess: 0.0,
            }
        }
    }

    /// Adds one element (the online update of Milakov & Gimelshein, in excess form).
    #[inline]
    pub fn push(&mut self, x: f64) {
        if self.max.is_nan() || x == f64::NEG_INFINITY {
            return;
        }
        if x.is_nan() {
            self.max = f64::NAN;
        } else if x > self.max {
            // The old total is rescaled to the new maximum; x itself is the new "1".
            self.excess = if self.max == f64::NEG_INFINITY {
                0.0
            } else {
                (1.0 + self.excess) * (self.max - x).exp()
            };
            self.max = x;
        } else if self.max != f64::INFINITY {
            self.excess += (x - self.max).exp();
        }
    }

    /// Combines two states: `(m, s) + (m', s') = (M, s*exp(m-M) + s'*exp(m'-M))` written for
    /// the excess, with `M = -inf` (both empty), `M = +inf` and NaN guarded. Commutative, and
    /// associative up to rounding.
    #[inline]
    pub fn merge(self, other: LseState) -> LseState {
        if self.max.is_nan() || other.max.is_nan() {
            return LseState {
                max: f64::NAN,
                excess: f64::NAN,
            };
        }
        let (hi, lo) = if self.max >= other.max {
            (self, other)
        } else {
            (other, self)
        };
        if lo.max == f64::NEG_INFINITY || hi.max == f64::INFINITY {
            return hi;
        }
        LseState {
            max: hi.max,
            excess: hi.excess + (1.0 + lo.excess) * (lo.max - hi.max).exp(),
        }
    }

    /// `log(sum exp(x_i))`: `-inf` when empty or all `-inf`, `+inf` if any `+inf`, NaN if any NaN.
    #[inline]
    pub fn logsumexp(self) -> f64 {
        if self.max.is_finite() {
            self.max + self.excess.ln_1p()
        } else {
            self.max
        }
    }

    /// `log(S) - max`, the amount log_softmax subtracts from `x - max`; finite for finite `max`.
    #[inline]
    pub fn log_total(self) -> f64 {
        self.excess.ln_1p()
    }

    /// The total `S = sum exp(x_i - max)`.
    #[inline]
    pub fn total(self) -> f64 {
        1.0 + self.excess
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state_of(xs: &[f64]) -> LseState {
        let mut s = LseState::EMPTY;
        for &x in xs {
            s.push(x);
        }
        s
    }

    #[test]
    fn specials() {
        let inf = f64::INFINITY;
        assert_eq!(state_of(&[]).logsumexp(), -inf);
        assert_eq!(state_of(&[-inf, -inf]).logsumexp(), -inf);
        assert_eq!(state_of(&[1.0, inf, -inf]).logsumexp(), inf);
        assert_eq!(state_of(&[inf, inf]).logsumexp(), inf);
        assert!(state_of(&[1.0, f64::NAN, inf]).logsumexp().is_nan());
        assert!(state_of(&[-inf, f64::NAN]).logsumexp().is_nan());
        assert_eq!(state_of(&[-inf, 3.0]).logsumexp(), 3.0);
    }

    #[test]
    fn excess_keeps_tiny_terms() {
        // log(1 + e^-40) = 4.248354255291589e-18; log(S) would round to 0.
        let lse = state_of(&[0.0, -40.0]).logsumexp();
        assert!((lse - 4.248354255291589e-18).abs() < 1e-32, "{lse}");
    }

    #[test]
    fn merge_is_associative_and_matches_push() {
        let xs = [
            3.0,
            -1.0,
            7.5,
            7.5,
            -1000.0,
            1000.0,
            0.25,
            f64::NEG_INFINITY,
            2.0,
        ];
        let whole = state_of(&xs).logsumexp();
        for split1 in 0..=xs.len() {
            for split2 in split1..=xs.len() {
                let a = state_of(&xs[..split1]);
                let b = state_of(&xs[split1..split2]);
                let c = state_of(&xs[split2..]);
                let left = a.merge(b).merge(c).logsumexp();
                let right = a.merge(b.merge(c)).logsumexp();
                let swapped = c.merge(a).merge(b).logsumexp();
                for v in [left, right, swapped] {
                    assert!(
                        (v - whole).abs() <= 4.0 * f64::EPSILON * whole.abs(),
                        "{v} {whole}"
                    );
                }
            }
        }
    }

    #[test]
    fn merge_guards_empty_and_infinite() {
        let e = LseState::EMPTY;
        assert_eq!(e.merge(e).logsumexp(), f64::NEG_INFINITY);
        assert_eq!(e.merge(LseState::of(2.0)).logsumexp(), 2.0);
        assert_eq!(
            LseState::of(f64::INFINITY)
                .merge(LseState::of(f64::INFINITY))
                .logsumexp(),
            f64::INFINITY
        );
        assert!(LseState::of(f64::NAN).merge(e).logsumexp().is_nan());
    }
}
