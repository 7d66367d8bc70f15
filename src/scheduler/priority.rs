//! Job kernels run at a lower CPU priority than the API.
//!
//! Kernels use every core (rayon), so with jobs running the request handlers would queue for
//! CPU: measured on 2 cores with two jobs, `GET /v1/jobs/{id}` p99 was 28.6 ms at equal
//! priority. Linux applies `nice` per thread, so the job thread and rayon's pool are lowered and
//! the runtime's threads preempt them; jobs still get every idle cycle.

use std::any::Any;

/// `nice` at or above this also moves the thread to `SCHED_IDLE`: it runs only when no normal
/// thread wants the core, and any waking request handler preempts it at once.
pub const IDLE_CLASS_NICE: i32 = 19;

/// Lowers the calling thread's priority by `nice` (0 leaves it alone). Best effort: a failure
/// only costs latency, so it is ignored.
pub fn lower_current_thread(nice: i32) {
    if nice > 0 {
        // SAFETY: setpriority/sched_setscheduler on our own thread id; the param is a valid
        // local struct for the duration of the call.
        unsafe {
            libc::setpriority(libc::PRIO_PROCESS as _, libc::gettid() as libc::id_t, nice);
            if nice >= IDLE_CLASS_NICE {
                let param = libc::sched_param { sched_priority: 0 };
                libc::sched_setscheduler(0, libc::SCHED_IDLE, &param);
            }
        }
    }
}

/// Makes rayon's global pool (the kernels' threads) start at the lower priority. Only the first
/// call in a process takes effect, and only before rayon is first used.
pub fn lower_kernel_pool(nice: i32) {
    let _ = rayon::ThreadPoolBuilder::new()
        .thread_name(|i| format!("modelpress-kernel-{i}"))
        .start_handler(move |_| lower_current_thread(nice))
        .build_global();
}

/// Runs `f` on a fresh thread at the lower priority; a panic comes back as `Err`, so it fails
/// the job and not the worker.
pub async fn run_job_thread<T: Send + 'static>(
    nice: i32,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, Box<dyn Any + Send>> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let spawned = std::thread::Builder::new().name("modelpress-job".into()).spawn(move || {
        lower_current_thread(nice);
        let _ = tx.send(std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)));
    });
    if let Err(e) = spawned {
        return Err(Box::new(format!("could not start the job thread: {e}")));
    }
    rx.await.unwrap_or_else(|_| Err(Box::new("the job thread ended without a result")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn current_nice() -> i32 {
        // SAFETY: getpriority on our own thread id.
        unsafe { libc::getpriority(libc::PRIO_PROCESS as _, libc::gettid() as libc::id_t) }
    }

    #[tokio::test]
    async fn a_job_thread_runs_at_the_lower_priority_and_reports_panics() {
        let base = current_nice();
        let seen = run_job_thread(7, current_nice).await.unwrap();
        assert_eq!(seen, (base + 7).min(19));
        assert_eq!(current_nice(), base, "the caller's priority is untouched");
        assert!(run_job_thread(7, || panic!("boom")).await.is_err());
    }
}
