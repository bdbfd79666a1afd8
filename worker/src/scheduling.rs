//! The CPU scheduling policy of a process that runs the pipeline. Its host stages (decoding,
//! tensor preparation, encoding, uploads) wake many times a batch for short bursts; under
//! Linux's default policy each wakeup preempts whatever runs on the core, often an inference
//! thread in the middle of a matrix product, whose caches then refill. `SCHED_BATCH` (same
//! priority, nice unchanged, no privilege needed) tells the scheduler the threads are
//! throughput work: a woken thread waits for the running one's slice instead of preempting
//! it. It matters where the host stages and inference share cores (the `pipeline` bench on a
//! 2-core machine); the coordinator keeps the default policy: its answers are latency work.

use std::io;

/// Puts the calling thread under `SCHED_BATCH`; every thread it starts afterwards (the async
/// runtime's, ONNX Runtime's, the inference threads) inherits it, so call it first in `main`,
/// before any thread starts.
pub fn batch_policy() -> io::Result<()> {
    #[cfg(target_os = "linux")]
    {
        let param = libc::sched_param { sched_priority: 0 };
        // SAFETY: pid 0 is the calling thread; `param` is a valid sched_param for SCHED_BATCH,
        // whose only priority is 0.
        let rc = unsafe { libc::sched_setscheduler(0, libc::SCHED_BATCH, &param) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    fn policy() -> i32 {
        // SAFETY: pid 0 is the calling thread.
        unsafe { libc::sched_getscheduler(0) }
    }

    #[test]
    fn threads_started_after_it_inherit_the_batch_policy() {
        let before = policy();
        let inner = std::thread::spawn(|| {
            batch_policy().unwrap();
            let own = policy();
            let child = std::thread::spawn(policy).join().unwrap();
            (own, child)
        })
        .join()
        .unwrap();
        assert_eq!(inner, (libc::SCHED_BATCH, libc::SCHED_BATCH));
        assert_eq!(policy(), before, "threads started before keep theirs");
    }
}
