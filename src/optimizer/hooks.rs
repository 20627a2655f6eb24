//! Step pre- and post-hooks (torch's `register_step_pre_hook` / `register_step_post_hook`).

use super::{Algorithm, Optimizer};
use crate::float::Float;
use crate::hyper::GroupHyperparams;

/// A step hook: gets the optimizer's groups, e.g. to log or change hyperparameters.
pub type StepHook = Box<dyn FnMut(&mut dyn GroupHyperparams) + Send>;

/// Identifies a registered hook, for [`Optimizer::remove_hook`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct HookHandle(pub(super) u64);

impl<T: Float, A: Algorithm> Optimizer<T, A> {
    /// Registers a hook called before every step that is applied (torch's
    /// `register_step_pre_hook`). It may read and change hyperparameters.
    pub fn register_step_pre_hook(
        &mut self,
        hook: impl FnMut(&mut dyn GroupHyperparams) + Send + 'static,
    ) -> HookHandle {
        let h = HookHandle(self.next_hook);
        self.next_hook += 1;
        self.pre_hooks.push((h, Box::new(hook)));
        h
    }

    /// Registers a hook called after every applied step (torch's `register_step_post_hook`).
    pub fn register_step_post_hook(
        &mut self,
        hook: impl FnMut(&mut dyn GroupHyperparams) + Send + 'static,
    ) -> HookHandle {
        let h = HookHandle(self.next_hook);
        self.next_hook += 1;
        self.post_hooks.push((h, Box::new(hook)));
        h
    }

    /// Removes a hook; returns false if it was not registered (or already removed).
    pub fn remove_hook(&mut self, handle: HookHandle) -> bool {
        let before = self.pre_hooks.len() + self.post_hooks.len();
        self.pre_hooks.retain(|(h, _)| *h != handle);
        self.post_hooks.retain(|(h, _)| *h != handle);
        before != self.pre_hooks.len() + self.post_hooks.len()
    }

    pub(super) fn run_hooks(&mut self, pre: bool) {
        let slot = if pre {
            &mut self.pre_hooks
        } else {
            &mut self.post_hooks
        };
        if slot.is_empty() {
            return;
        }
        let mut hooks = std::mem::take(slot);
        for (_, hook) in &mut hooks {
            hook(self);
        }
        let slot = if pre {
            &mut self.pre_hooks
        } else {
            &mut self.post_hooks
        };
        // Hooks registered by a hook go after the existing ones.
        hooks.append(slot);
        *slot = hooks;
    }
}
