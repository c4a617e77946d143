//! Per-CPU counters: every decision the programs take is counted, so operators can see what
//! the kernel path did (`mesh_kernel_packets_total` in mesh-node's metrics).

use mesh_common::Counter;

use crate::maps::COUNTERS;

/// Adds one to `counter` on this CPU.
#[inline(always)]
pub fn bump(counter: Counter) {
    if let Some(slot) = COUNTERS.get_ptr_mut(counter as u32) {
        // SAFETY: the pointer comes from a successful per-CPU array lookup and is only used
        // by this CPU while the program runs (no preemption inside a BPF program).
        unsafe { *slot += 1 };
    }
}
