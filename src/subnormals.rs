//! Subnormal numbers inside a step: flushed to zero by default, kept on request.
//!
//! # Why
//! Real gradients have a long tail of tiny values, and the squares a step keeps (Adam's
//! `exp_avg_sq`, Adagrad's `sum`, RMSprop's `square_avg`, ...) of a gradient below about
//! `1e-19` are *subnormal* in f32: smaller than `f32::MIN_POSITIVE ≈ 1.18e-38`. Intel cores
//! take a microcode assist, around a hundred cycles, for every vector operation that reads or
//! produces one, so on a trained model's gradients the Adam family measured 4-8x slower than on
//! normal numbers (AMD cores pay far less). Random benchmark gradients never get there, which
//! is why a hot benchmark loop does not show it and a training loop does.
//!
//! # What [`Subnormals::Flush`] does
//! On x86-64 the step sets MXCSR's flush-to-zero (FTZ: a subnormal result becomes ±0) and
//! denormals-are-zero (DAZ: a subnormal input reads as ±0) bits for the duration of its kernels,
//! on every thread that runs a piece, and restores the thread's previous MXCSR before returning:
//! the caller's floating-point environment, and that of rayon's workers between steps, never
//! changes. On aarch64 it sets FPCR.FZ, which flushes inputs and results of single and double
//! precision alike. Elsewhere it does nothing (the step runs as with [`Subnormals::Preserve`]).
//! The fused and the reference kernels run under the same mode, so they still agree bit for bit,
//! and the mode is the same on every thread, so results are still bitwise the same for any
//! thread count.
//!
//! # Why flushing is numerically harmless here
//! Only magnitudes below `f32::MIN_POSITIVE` (1.2e-38; f64: 2.2e-308) change, and they change
//! by less than that amount:
//! - A second moment `v` that flushes is below 1.2e-38, so `√v < 1.1e-19`, which enters the
//!   denominator `√v̂ + eps` beside `eps` (1e-8 by default in Adam, 1e-10 in Adagrad, 1e-6 in
//!   Adadelta): eleven orders of magnitude below it, far under one f32 ulp of the sum. The
//!   update is unchanged unless `eps` is itself below about 1e-19.
//! - A gradient, a first moment or a momentum that flushes contributes at most `lr · 1.2e-38`
//!   to a parameter; against parameters of ordinary scale (1e-4 and up) that is more than 30
//!   orders of magnitude below one ulp.
//! - Parameters that are themselves subnormal read as zero; they are zero to every later
//!   layer for any practical purpose.
//!
//! So flushing changes the parameters only where the update is far below their resolution, and
//! every parity fixture passes in both modes (`tests/parity.rs`), including one recorded from
//! torch with gradients scaled into the subnormal range. Choose [`Subnormals::Preserve`] for
//! bit-exact torch parity in subnormal ranges, or when `eps` is below 1e-19.
//!
//! A half-precision store inside a flushed step reads its value the same way: rounding to bf16
//! turns a subnormal f32 into a zero of its sign at every SIMD level (see [`crate::mixed`]).
//!
//! A clip folded into the step ([`crate::StepOptions::clipped`]) computes its norm under the
//! same mode: squares below 1.2e-38 count as zero, which moves the norm by less than
//! `√n · 1.1e-19` for `n` elements, against the `1e-6` torch adds to it. The standalone
//! functions of [`crate::clip`] and L-BFGS always preserve subnormals.
//!
//! # How, soundly
//! Rust, like LLVM, assumes the default floating-point environment, so changing MXCSR (or
//! FPCR) under compiled Rust code is undefined behaviour, and `_mm_setcsr` is deprecated for
//! that reason. The change therefore lives inside one `asm!` block that saves the control
//! register, sets the flush bits, *calls* the kernel through a plain function pointer, and
//! restores the register before the block ends: no Rust code of the caller ever runs with the
//! changed environment. The kernel itself is ordinary compiled code that runs with it, which
//! is the purpose; the only thing the compiler could do differently under its assumption is
//! fold constant expressions at compile time as IEEE says, which again differs only in the
//! subnormal range.

/// What a step does with subnormal numbers (see the [module docs](self)).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Subnormals {
    /// Flush subnormal inputs and results to zero inside the step's kernels (the default):
    /// no slow path on Intel cores, and differences from torch only far below the parameters'
    /// resolution.
    #[default]
    Flush,
    /// IEEE gradual underflow, as torch computes: bit-exact parity in subnormal ranges, at the
    /// cost of microcode assists on Intel cores when the state gets there.
    Preserve,
}

impl Subnormals {
    /// Runs `f` under this mode on the calling thread and returns its result. The thread's
    /// floating-point control register is the same afterwards as before. A panic in `f` is
    /// carried out of the flushed region and resumed here.
    #[inline]
    pub(crate) fn run<R>(self, f: impl FnOnce() -> R) -> R {
        match self {
            Subnormals::Preserve => f(),
            Subnormals::Flush => flush::run(f),
        }
    }
}

/// A closure, its result (or panic), handed through the flushed region by pointer.
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
struct Slot<F, R> {
    f: Option<F>,
    result: Option<std::thread::Result<R>>,
}

/// Runs the slot's closure, catching a panic so that no unwinding crosses the `asm!` block that
/// called it.
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
fn run_slot<F: FnOnce() -> R, R>(slot: &mut Slot<F, R>) {
    if let Some(f) = slot.f.take() {
        slot.result = Some(std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)));
    }
}

/// Unpacks what the trampoline left in the slot.
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
fn finish<F, R>(slot: Slot<F, R>) -> R {
    match slot.result {
        Some(Ok(r)) => r,
        Some(Err(panic)) => std::panic::resume_unwind(panic),
        // The asm block always calls the trampoline, which always fills the slot.
        None => unreachable!("the flushed region did not run its closure"),
    }
}

#[cfg(target_arch = "x86_64")]
mod flush {
    use super::{finish, run_slot, Slot};
    use std::arch::asm;

    /// The function the flushed region calls (System V ABI on every OS, matching the block).
    ///
    /// # Safety
    /// `slot` must point to a live `Slot<F, R>` that nothing else accesses during the call.
    unsafe extern "sysv64" fn trampoline<F: FnOnce() -> R, R>(slot: *mut Slot<F, R>) {
        // SAFETY: guaranteed by the caller: `run` passes its own exclusive slot.
        run_slot(unsafe { &mut *slot })
    }

    /// MXCSR's flush-to-zero (bit 15) and denormals-are-zero (bit 6).
    const FTZ_DAZ: u32 = (1 << 15) | (1 << 6);

    /// Runs `f` with FTZ and DAZ set, restoring the caller's MXCSR afterwards.
    #[inline]
    pub(super) fn run<F: FnOnce() -> R, R>(f: F) -> R {
        let mut slot = Slot {
            f: Some(f),
            result: None,
        };
        // [0]: the caller's MXCSR, saved; [1]: the flushing value.
        let mut csr = [0u32, FTZ_DAZ];
        // SAFETY: the block saves MXCSR to `csr[0]`, ORs the flush bits into `csr[1]`, loads
        // it, calls `trampoline` and loads `csr[0]` back, so MXCSR is as before when the block
        // ends and no Rust code outside it sees the change. `csr` and `slot` outlive the block.
        // r12 (callee-saved, so the call preserves it) holds `csr`'s address and is only read;
        // rdi holds the trampoline's argument; `clobber_abi("sysv64")` declares every register the
        // call may change (rax, which the block also uses, is one of them). The stack is
        // aligned for a call on entry to an `asm!` block without `nostack`. The trampoline
        // catches panics, so nothing unwinds through the block.
        unsafe {
            asm!(
                "stmxcsr dword ptr [r12]",
                "mov eax, dword ptr [r12]",
                "or dword ptr [r12 + 4], eax",
                "ldmxcsr dword ptr [r12 + 4]",
                "call {trampoline}",
                "ldmxcsr dword ptr [r12]",
                trampoline = sym trampoline::<F, R>,
                in("r12") csr.as_mut_ptr(),
                in("rdi") &mut slot as *mut Slot<F, R>,
                clobber_abi("sysv64"),
            );
        }
        finish(slot)
    }

    /// This thread's MXCSR (for tests).
    #[cfg(test)]
    pub(super) fn control_register() -> u32 {
        let mut csr = 0u32;
        // SAFETY: `stmxcsr` only stores MXCSR to the given, writable location.
        unsafe {
            asm!("stmxcsr dword ptr [{}]", in(reg) &mut csr, options(nostack, preserves_flags));
        }
        csr
    }

    /// The flush bits, as [`control_register`] shows them.
    #[cfg(test)]
    pub(super) const FLUSH_BITS: u64 = FTZ_DAZ as u64;
}

#[cfg(target_arch = "aarch64")]
mod flush {
    use super::{finish, run_slot, Slot};
    use std::arch::asm;

    /// The function the flushed region calls.
    ///
    /// # Safety
    /// `slot` must point to a live `Slot<F, R>` that nothing else accesses during the call.
    unsafe extern "C" fn trampoline<F: FnOnce() -> R, R>(slot: *mut Slot<F, R>) {
        // SAFETY: guaranteed by the caller: `run` passes its own exclusive slot.
        run_slot(unsafe { &mut *slot })
    }

    /// FPCR's flush-to-zero bit (24).
    const FZ: u64 = 1 << 24;

    /// Runs `f` with FPCR.FZ set, restoring the caller's FPCR afterwards.
    #[inline]
    pub(super) fn run<F: FnOnce() -> R, R>(f: F) -> R {
        let mut slot = Slot {
            f: Some(f),
            result: None,
        };
        let entry: unsafe extern "C" fn(*mut Slot<F, R>) = trampoline::<F, R>;
        // SAFETY: the block saves FPCR in x20, sets FZ, calls `trampoline` and writes x20 back,
        // so FPCR is as before when the block ends and no Rust code outside it sees the change.
        // x20 is callee-saved (the call preserves it) and declared as clobbered so the compiler
        // saves its own value; x9 is scratch, declared so no input shares it; x0 holds the trampoline's argument; `clobber_abi("C")` declares
        // every register the call may change. The trampoline catches panics, so nothing
        // unwinds through the block.
        unsafe {
            asm!(
                "mrs x20, fpcr",
                "orr x9, x20, {fz}",
                "msr fpcr, x9",
                "blr {entry}",
                "msr fpcr, x20",
                entry = in(reg) entry,
                out("x9") _,
                fz = in(reg) FZ,
                in("x0") &mut slot as *mut Slot<F, R>,
                out("x20") _,
                clobber_abi("C"),
            );
        }
        finish(slot)
    }

    /// This thread's FPCR (for tests).
    #[cfg(test)]
    pub(super) fn control_register() -> u64 {
        let fpcr: u64;
        // SAFETY: reading FPCR has no side effect.
        unsafe { asm!("mrs {}, fpcr", out(reg) fpcr, options(nomem, nostack, preserves_flags)) };
        fpcr
    }

    /// The flush bit, as [`control_register`] shows it.
    #[cfg(test)]
    pub(super) const FLUSH_BITS: u64 = FZ;
}

#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
mod flush {
    /// No flushing on this architecture: runs `f` as it is.
    #[inline]
    pub(super) fn run<R>(f: impl FnOnce() -> R) -> R {
        f()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `x * y` computed at run time (kept from constant folding).
    fn product(x: f32, y: f32) -> f32 {
        std::hint::black_box(x) * std::hint::black_box(y)
    }

    #[test]
    fn preserve_keeps_gradual_underflow() {
        let tiny = Subnormals::Preserve.run(|| product(1e-20, 1e-20));
        assert!(tiny > 0.0 && tiny < f32::MIN_POSITIVE, "{tiny:e}");
    }

    #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
    #[test]
    fn flush_zeroes_subnormal_results_and_inputs_then_restores_the_register() {
        let before = flush::control_register();
        let (result, input, inside) = Subnormals::Flush.run(|| {
            let subnormal = std::hint::black_box(1e-39f32);
            (
                product(1e-20, 1e-20),
                product(subnormal, 1e30),
                flush::control_register(),
            )
        });
        assert_eq!(result, 0.0, "a subnormal result is flushed");
        // DAZ (x86-64) or FZ (aarch64) reads a subnormal input as zero.
        assert_eq!(input, 0.0, "a subnormal input reads as zero");
        assert_eq!(u64::from(inside) & flush::FLUSH_BITS, flush::FLUSH_BITS);
        assert_eq!(
            flush::control_register(),
            before,
            "the caller's register is restored"
        );
        let after = product(1e-20, 1e-20);
        assert!(after > 0.0, "gradual underflow is back after the region");
    }

    #[test]
    fn a_panic_inside_the_region_resumes_outside_with_the_register_restored() {
        #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
        let before = flush::control_register();
        let caught = std::panic::catch_unwind(|| {
            Subnormals::Flush.run(|| -> u32 { std::panic::panic_any(7u32) })
        });
        assert_eq!(caught.unwrap_err().downcast_ref::<u32>(), Some(&7));
        #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
        assert_eq!(flush::control_register(), before);
    }

    #[test]
    fn nested_regions_restore_each_level() {
        let inner = Subnormals::Flush.run(|| {
            let nested = Subnormals::Flush.run(|| product(1e-20, 1e-20));
            (nested, product(1e-20, 1e-20))
        });
        #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
        assert_eq!(inner, (0.0, 0.0));
        assert!(product(1e-20, 1e-20) > 0.0);
    }
}
