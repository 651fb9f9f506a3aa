//! The worker pool: a few threads that do everything slow (backend reads,
//! cache writes, syncs) and hand results back to the reactor through a
//! completion queue and an eventfd the reactor (or a host loop) watches.
//!
//! A job that panics is reported as failed, and its thread goes on serving.

use nix::sys::eventfd::{EfdFlags, EventFd};
use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::panic::{self, AssertUnwindSafe};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

type Job<T> = Box<dyn FnOnce() -> T + Send + 'static>;

/// A finished job: the id it was submitted with and its result, or `None` if
/// it panicked.
pub struct Completion<T> {
    pub id: u64,
    pub result: Option<T>,
}

struct Shared<T> {
    queue: Mutex<Queue<T>>,
    work: Condvar,
    done: Mutex<Vec<Completion<T>>>,
    wake: EventFd,
}

struct Queue<T> {
    jobs: VecDeque<(u64, Job<T>)>,
    stopping: bool,
}

/// A fixed set of threads running submitted closures.
pub struct WorkerPool<T: Send + 'static> {
    shared: Arc<Shared<T>>,
    threads: Vec<JoinHandle<()>>,
}

fn lock<M>(m: &Mutex<M>) -> MutexGuard<'_, M> {
    // A panic never happens while these locks are held (jobs run unlocked),
    // but a poisoned lock still holds consistent data.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl<T: Send + 'static> WorkerPool<T> {
    /// Starts `n` (at least 1) worker threads.
    pub fn new(n: usize) -> io::Result<WorkerPool<T>> {
        let wake = EventFd::from_flags(EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)?;
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue {
                jobs: VecDeque::new(),
                stopping: false,
            }),
            work: Condvar::new(),
            done: Mutex::new(Vec::new()),
            wake,
        });
        let mut threads = Vec::new();
        for i in 0..n.max(1) {
            let s = shared.clone();
            threads.push(
                std::thread::Builder::new()
                    .name(format!("blobmgr-worker-{i}"))
                    .spawn(move || worker_loop(&s))?,
            );
        }
        Ok(WorkerPool { shared, threads })
    }

    /// Queues `job`; its completion will carry `id`.
    pub fn submit(&self, id: u64, job: impl FnOnce() -> T + Send + 'static) {
        lock(&self.shared.queue).jobs.push_back((id, Box::new(job)));
        self.shared.work.notify_one();
    }

    /// The fd that becomes readable when completions are waiting.
    pub fn completion_fd(&self) -> BorrowedFd<'_> {
        self.shared.wake.as_fd()
    }

    pub fn completion_raw_fd(&self) -> RawFd {
        self.shared.wake.as_fd().as_raw_fd()
    }

    /// Takes every completion that is ready. The eventfd is reset first, so
    /// a completion posted meanwhile wakes the reactor again: none is missed.
    pub fn take_completions(&self, into: &mut Vec<Completion<T>>) {
        let _ = self.shared.wake.read();
        into.append(&mut lock(&self.shared.done));
    }

    /// Drops every job no thread has started; their completions never come.
    pub fn cancel_queued(&self) {
        lock(&self.shared.queue).jobs.clear();
    }

    /// Stops the threads once the queue is empty and waits for them.
    pub fn join(&mut self) {
        lock(&self.shared.queue).stopping = true;
        self.shared.work.notify_all();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }

    /// Jobs waiting for a thread.
    pub fn queued(&self) -> usize {
        lock(&self.shared.queue).jobs.len()
    }
}

fn worker_loop<T>(s: &Shared<T>) {
    loop {
        let (id, job) = {
            let mut q = lock(&s.queue);
            loop {
                if let Some(j) = q.jobs.pop_front() {
                    break j;
                }
                if q.stopping {
                    return;
                }
                q = s.work.wait(q).unwrap_or_else(|p| p.into_inner());
            }
        };
        let result = panic::catch_unwind(AssertUnwindSafe(job)).ok();
        if result.is_none() {
            log::error!("worker job {id} panicked; reported as failed");
        }
        lock(&s.done).push(Completion { id, result });
        // Cannot fail short of an overflow of the 64-bit counter.
        let _ = s.wake.write(1);
    }
}

impl<T: Send + 'static> Drop for WorkerPool<T> {
    /// Lets queued jobs finish, then joins the threads.
    fn drop(&mut self) {
        self.join();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

    #[test]
    fn completions_arrive_and_panics_are_failures() {
        let pool = WorkerPool::<u64>::new(2).unwrap();
        for i in 0..100u64 {
            pool.submit(i, move || {
                if i == 13 {
                    panic!("boom");
                }
                i * 2
            });
        }
        let mut got = Vec::new();
        while got.len() < 100 {
            let mut fds = [PollFd::new(pool.completion_fd(), PollFlags::POLLIN)];
            poll(&mut fds, PollTimeout::from(5000u16)).unwrap();
            pool.take_completions(&mut got);
        }
        got.sort_by_key(|c| c.id);
        for c in &got {
            if c.id == 13 {
                assert_eq!(c.result, None);
            } else {
                assert_eq!(c.result, Some(c.id * 2));
            }
        }
    }
}
