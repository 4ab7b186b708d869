//! The Lookahead slow weights of [`Ranger`]: a forced sync, reading them, and swapping them in.

use candle_core::Tensor;

use super::Ranger;
use crate::error::Result;

impl Ranger {
    /// Forces a Lookahead sync of every variable now (`slow += alpha * (fast - slow)`,
    /// `fast = slow`), leaving step counts alone. Does nothing without Lookahead.
    pub fn sync_lookahead(&mut self) -> Result<()> {
        self.swap.ensure_fast("sync_lookahead")?;
        let alpha = self.params.lookahead_alpha;
        for slot in &mut self.slots {
            if self.params.lookahead_k > 0 {
                slot.ensure_slow()?;
            }
            slot.sync(alpha)?;
        }
        Ok(())
    }

    /// The slow (Lookahead) weights, in each variable's dtype and device, by name. Without
    /// Lookahead these are the current weights.
    pub fn slow_weights(&self) -> Result<Vec<(String, Tensor)>> {
        self.slots
            .iter()
            .map(|slot| {
                let t = slot.current_slow()?;
                Ok((slot.name.clone(), t.to_device(slot.var.device())?.to_dtype(slot.var.dtype())?))
            })
            .collect()
    }

    /// Puts the slow weights into the variables (keeping the fast ones aside), e.g. to
    /// evaluate or save the model on the slow weights as the Lookahead paper recommends.
    /// Steps fail until [`Ranger::swap_back_fast_weights`] is called.
    pub fn swap_in_slow_weights(&mut self) -> Result<()> {
        if self.swap.is_swapped() {
            return Ok(());
        }
        let slow = self.slow_weights()?;
        self.swap.swap_in(self.slots.iter().zip(slow).map(|(slot, (_, s))| (slot.var.clone(), s)))
    }

    /// Restores the fast weights put aside by [`Ranger::swap_in_slow_weights`].
    pub fn swap_back_fast_weights(&mut self) -> Result<()> {
        self.swap.swap_back()
    }

    /// Runs `f` with the slow weights swapped in, then restores the fast weights (also when `f`
    /// panics).
    pub fn with_slow_weights<R>(&mut self, f: impl FnOnce() -> R) -> Result<R> {
        self.swap_in_slow_weights()?;
        self.swap.restore_after(f)
    }
}
