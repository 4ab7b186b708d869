//! What [`crate::RAdam`] and [`crate::AdamW`] share: both are a [`crate::Ranger`] engine (field
//! `inner`) with other settings, and forward stepping, state and the learning rate to it.

/// The methods of an optimizer wrapping a `Ranger` in its field `inner`, written once.
macro_rules! engine_methods {
    ($ty:ident) => {
        impl $ty {
            /// One step, telling what it did.
            pub fn step_with_report(
                &mut self,
                grads: &candle_core::backprop::GradStore,
            ) -> crate::Result<crate::StepReport> {
                self.inner.step_with_report(grads)
            }

            /// One step using the finite verdicts of a [`crate::GradCheck`] (see
            /// [`crate::Ranger::step_checked`]).
            pub fn step_checked(
                &mut self,
                grads: &candle_core::backprop::GradStore,
                check: &crate::GradCheck,
            ) -> crate::Result<crate::StepReport> {
                self.inner.step_checked(grads, check)
            }

            /// Moments, master copies and step counts as data (see
            /// [`crate::Ranger::state_tensors`]).
            pub fn state_tensors(&self) -> crate::Result<crate::OptimizerState<'_>> {
                self.inner.state_tensors()
            }

            /// Loads state taken by `state_tensors` (see [`crate::Ranger::load_state_tensors`]).
            pub fn load_state_tensors(&mut self, state: &crate::OptimizerState<'_>) -> crate::Result<()> {
                self.inner.load_state_tensors(state)
            }

            /// Saves the state to one safetensors file (see [`crate::Ranger::save_state`]).
            pub fn save_state(&self, path: impl AsRef<std::path::Path>) -> crate::Result<()> {
                self.inner.save_state(path)
            }

            /// Loads state saved by `save_state` (see [`crate::Ranger::load_state`]).
            pub fn load_state(&mut self, path: impl AsRef<std::path::Path>) -> crate::Result<()> {
                self.inner.load_state(path)
            }
        }
    };
}

/// The `candle_nn::Optimizer` methods of such an optimizer other than `new`.
macro_rules! engine_optimizer_methods {
    () => {
        fn step(&mut self, grads: &candle_core::backprop::GradStore) -> candle_core::Result<()> {
            self.inner.step_with_report(grads).map(|_| ()).map_err(crate::Error::into_candle)
        }

        fn learning_rate(&self) -> f64 {
            candle_nn::Optimizer::learning_rate(&self.inner)
        }

        fn set_learning_rate(&mut self, lr: f64) {
            candle_nn::Optimizer::set_learning_rate(&mut self.inner, lr)
        }
    };
}

pub(crate) use {engine_methods, engine_optimizer_methods};
