//! The worker pool: a few threads that do everything slow (backend reads,
//! cache writes, syncs) and hand results back to the reactor through a
//! completion queue and an eventfd the reactor (or a host loop) watches.
//!
//! A job that panics is reported as failed, and its thread goes on serving.
//! A job that runs past its deadline is abandoned: the caller stops waiting
//! for it and a replacement thread takes its place, so a hung backend cannot
//! occupy every worker; the stuck thread retires when its job returns (one
//! that got no replacement, past the bound on them, goes back to work).
//!
//! A job may leave an [`After`] step: work its thread runs once the job's
//! completion is posted, which nobody waits for (hashing the bytes a fill
//! wrote, which the fill's waiters do not need).

use nix::sys::eventfd::{EfdFlags, EventFd};
use std::collections::{HashMap, HashSet, VecDeque};
use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::panic::{self, AssertUnwindSafe};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Work a job leaves for its thread to run after the job's completion is
/// posted. It runs outside the job's deadline and its panics are only
/// logged, so it must be bounded and must not be needed by anyone waiting.
pub type After = Box<dyn FnOnce() + Send + 'static>;

/// A closure a worker runs: its result, and what to do after posting it.
type Task<T> = Box<dyn FnOnce() -> (T, Option<After>) + Send + 'static>;

/// A finished job: the id it was submitted with and its result, or `None` if
/// it panicked.
pub struct Completion<T> {
    pub id: u64,
    pub result: Option<T>,
}

struct Shared<T> {
    state: Mutex<Queue<T>>,
    work: Condvar,
    done: Mutex<Vec<Completion<T>>>,
    wake: EventFd,
}

/// A queued task: its id, the closure, and when it was queued.
type Queued<T> = (u64, Task<T>, Instant);

/// Which queue a task waits in: a worker takes every [`Priority::Demand`]
/// task before any [`Priority::Background`] one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Priority {
    /// Someone waits for it (a client's FetchRange, an open).
    Demand,
    /// Nobody waits for it yet (readahead): it must not delay demand work.
    Background,
}

struct Queue<T> {
    /// Queued demand tasks, oldest first.
    jobs: VecDeque<Queued<T>>,
    /// Queued background tasks, oldest first; run when `jobs` is empty.
    background: VecDeque<Queued<T>>,
    stopping: bool,
    /// What each busy worker runs, by worker index: a job (`Some(id)`) or
    /// an after-step (`None`), and since when. Either is stuck past the
    /// limit; only a job has waiters to fail.
    running: HashMap<usize, (Option<u64>, Instant)>,
    /// Workers whose job (or after-step) ran past the limit; each retires
    /// when it returns, unless no replacement was started for it.
    stuck: HashSet<usize>,
    /// Stuck workers no replacement was started for (the bound on them was
    /// reached): each goes back to work when it returns, so the pool never
    /// shrinks below its size.
    unreplaced: HashSet<usize>,
    /// Worker threads started and not yet returned, stuck ones included:
    /// with `stuck`, whether any thread can still take a queued task.
    alive: usize,
}

/// What [`WorkerPool::expire`] found.
#[derive(Debug, Default)]
pub struct Expired {
    /// Jobs that ran past the limit; their threads were replaced.
    pub stuck: Vec<u64>,
    /// Jobs that waited in the queue past the limit while every thread
    /// was stuck (and no replacement could start), and were dropped.
    pub dropped: Vec<u64>,
    /// When the next job passes the limit.
    pub next: Option<Instant>,
}

/// A set of threads running submitted closures.
pub struct WorkerPool<T: Send + 'static> {
    shared: Arc<Shared<T>>,
    threads: Vec<(usize, JoinHandle<()>)>,
    size: usize,
    /// Most replacement threads alive at once.
    max_stuck: usize,
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
            state: Mutex::new(Queue {
                jobs: VecDeque::new(),
                background: VecDeque::new(),
                stopping: false,
                running: HashMap::new(),
                stuck: HashSet::new(),
                unreplaced: HashSet::new(),
                alive: 0,
            }),
            work: Condvar::new(),
            done: Mutex::new(Vec::new()),
            wake,
        });
        let size = n.max(1);
        let mut pool = WorkerPool {
            shared,
            threads: Vec::new(),
            size,
            max_stuck: 4 * size,
        };
        for i in 0..size {
            pool.spawn(i)?;
        }
        Ok(pool)
    }

    fn spawn(&mut self, index: usize) -> io::Result<()> {
        let s = self.shared.clone();
        // Counted before it runs, so it is never seen gone before it came.
        lock(&self.shared.state).alive += 1;
        let spawned = std::thread::Builder::new()
            .name(format!("blobmgr-worker-{index}"))
            .spawn(move || worker_loop(&s, index));
        match spawned {
            Ok(t) => {
                self.threads.push((index, t));
                Ok(())
            }
            Err(e) => {
                lock(&self.shared.state).alive -= 1;
                Err(e)
            }
        }
    }

    /// Queues demand `job`; its completion will carry `id`.
    pub fn submit(&self, id: u64, job: impl FnOnce() -> T + Send + 'static) {
        self.submit_as(id, Priority::Demand, job);
    }

    /// Queues `job` at `priority`; its completion will carry `id`.
    pub fn submit_as(&self, id: u64, priority: Priority, job: impl FnOnce() -> T + Send + 'static) {
        self.submit_then(id, priority, move || (job(), None));
    }

    /// Queues `job` at `priority`; its completion will carry `id`, and the
    /// [`After`] step it returns, if any, runs once that is posted.
    pub fn submit_then(
        &self,
        id: u64,
        priority: Priority,
        job: impl FnOnce() -> (T, Option<After>) + Send + 'static,
    ) {
        let task: Queued<T> = (id, Box::new(job), Instant::now());
        let mut st = lock(&self.shared.state);
        match priority {
            Priority::Demand => st.jobs.push_back(task),
            Priority::Background => st.background.push_back(task),
        }
        drop(st);
        self.shared.work.notify_one();
    }

    /// Moves background task `id`, if it is still queued, to the back of
    /// the demand queue (someone now waits for it), with a fresh queue time.
    pub fn promote(&self, id: u64) {
        let mut st = lock(&self.shared.state);
        if let Some(i) = st.background.iter().position(|(j, _, _)| *j == id) {
            if let Some((id, task, _)) = st.background.remove(i) {
                // Its wait for a worker counts from now, as a demand task's.
                st.jobs.push_back((id, task, Instant::now()));
            }
        }
    }

    /// The fd that becomes readable when completions are waiting.
    pub fn completion_fd(&self) -> BorrowedFd<'_> {
        self.shared.wake.as_fd()
    }

    /// Takes every completion that is ready. The eventfd is reset first, so
    /// a completion posted meanwhile wakes the reactor again: none is missed.
    pub fn take_completions(&self, into: &mut Vec<Completion<T>>) {
        let _ = self.shared.wake.read();
        into.append(&mut lock(&self.shared.done));
    }

    /// Abandons every job that has been running longer than `limit`: their
    /// ids are returned (their completions, if they ever come, must be
    /// ignored) and a replacement thread is started for each, up to a bound.
    /// Only when the pool is wedged (every thread is stuck and no
    /// replacement may start) are jobs that waited in the queue longer than
    /// `limit` dropped and returned too: a queue that healthy threads work
    /// through, however slowly, is left to them. Also returns when the next
    /// job will pass `limit`. `now` is the caller's clock (tests pass a
    /// later one instead of sleeping).
    pub fn expire(&mut self, limit: Duration, now: Instant) -> Expired {
        let mut expired = Vec::new();
        let mut dropped = Vec::new();
        let mut next: Option<Instant> = None;
        let replace = {
            let mut guard = lock(&self.shared.state);
            let st = &mut *guard;
            let replace = Self::mark_stuck(st, limit, now, self.max_stuck, &mut expired);
            for &(_, started) in st.running.values() {
                let deadline = started + limit;
                if deadline > now {
                    next = Some(next.map_or(deadline, |n| n.min(deadline)));
                }
            }
            if replace > 0 {
                // Fresh threads are about to take the queue: every queued
                // task gets a full timeout from now instead of being dropped
                // for the time it spent behind the stuck ones.
                for (_, _, queued) in st.jobs.iter_mut().chain(st.background.iter_mut()) {
                    *queued = now;
                }
            }
            if replace == 0 && st.alive <= st.stuck.len() {
                for q in [&mut st.jobs, &mut st.background] {
                    if let Some(at) = drop_expired(q, limit, now, &mut dropped) {
                        next = Some(next.map_or(at, |n| n.min(at)));
                    }
                }
            }
            replace
        };
        for _ in 0..replace {
            let index = self.threads.iter().map(|(i, _)| *i).max().unwrap_or(0) + 1;
            if let Err(e) = self.spawn(index) {
                log::error!("cannot start a replacement worker: {e}");
            }
        }
        // Forget handles of threads that retired.
        self.threads.retain(|(_, t)| !t.is_finished());
        Expired {
            stuck: expired,
            dropped,
            next,
        }
    }

    /// Marks the threads whose task ran past `limit` as stuck, adding the
    /// tasks to `expired` (a thread in an after-step has no task to add);
    /// returns how many replacements to start (bounded by `max_stuck` stuck
    /// threads alive at once).
    fn mark_stuck(
        st: &mut Queue<T>,
        limit: Duration,
        now: Instant,
        max_stuck: usize,
        expired: &mut Vec<u64>,
    ) -> usize {
        let mut newly_stuck = Vec::new();
        for (&worker, &(job, started)) in st.running.iter() {
            if !st.stuck.contains(&worker) && started + limit <= now {
                expired.extend(job);
                newly_stuck.push(worker);
            }
        }
        let mut replace = 0;
        for w in newly_stuck {
            if st.stuck.len() < max_stuck {
                replace += 1;
            } else {
                st.unreplaced.insert(w);
            }
            st.stuck.insert(w);
        }
        replace
    }

    /// Removes the queued (not yet started) jobs among `ids`, returning
    /// those removed; their completions never come. One pass over the
    /// queues however many ids (a closed client may leave a thousand).
    pub fn cancel(&self, ids: &[u64]) -> Vec<u64> {
        let ids: HashSet<u64> = ids.iter().copied().collect();
        let mut st = lock(&self.shared.state);
        let mut removed = Vec::new();
        let st = &mut *st;
        for q in [&mut st.jobs, &mut st.background] {
            q.retain(|(id, _, _)| {
                let hit = ids.contains(id);
                if hit {
                    removed.push(*id);
                }
                !hit
            });
        }
        removed
    }

    /// Tasks queued (demand and background) that no thread has started.
    pub fn queued(&self) -> usize {
        let st = lock(&self.shared.state);
        st.jobs.len() + st.background.len()
    }

    /// Jobs queued or running, or after-steps running.
    pub fn busy(&self) -> bool {
        let st = lock(&self.shared.state);
        !st.jobs.is_empty() || !st.background.is_empty() || !st.running.is_empty()
    }

    /// Drops every job no thread has started; their completions never come.
    pub fn cancel_queued(&self) {
        let mut st = lock(&self.shared.state);
        st.jobs.clear();
        st.background.clear();
    }

    /// Stops the threads once the queue is empty and waits for them, except
    /// for threads stuck in an abandoned job, which are left to finish alone.
    pub fn join(&mut self) {
        let stuck = {
            let mut st = lock(&self.shared.state);
            st.stopping = true;
            st.stuck.clone()
        };
        self.shared.work.notify_all();
        for (i, t) in self.threads.drain(..) {
            if !stuck.contains(&i) {
                let _ = t.join();
            }
        }
    }

    /// Number of worker threads the pool was started with (replacements
    /// for stuck threads come on top).
    pub fn size(&self) -> usize {
        self.size
    }
}

/// Drops the tasks at the front of `q` that were queued `limit` or more
/// before `now` (adding their ids to `dropped`); returns when the next one
/// will be due.
fn drop_expired<T>(
    q: &mut VecDeque<Queued<T>>,
    limit: Duration,
    now: Instant,
    dropped: &mut Vec<u64>,
) -> Option<Instant> {
    while let Some((id, _, queued)) = q.front() {
        if *queued + limit > now {
            return Some(*queued + limit);
        }
        dropped.push(*id);
        q.pop_front();
    }
    None
}

/// Nice value of worker threads: the reactor, which only ever does short
/// nonblocking work, must not queue behind bulk copies for the CPU.
const WORKER_NICE: i32 = 10;

/// Lowers the calling thread's scheduling priority (Linux: per thread).
fn lower_priority() {
    let tid = nix::unistd::gettid().as_raw() as nix::libc::id_t;
    // SAFETY: setpriority only reads its integer arguments.
    let rc = unsafe { nix::libc::setpriority(nix::libc::PRIO_PROCESS, tid, WORKER_NICE) };
    if rc != 0 {
        log::debug!(
            "cannot lower worker priority: {}",
            io::Error::last_os_error()
        );
    }
}

fn worker_loop<T>(s: &Shared<T>, index: usize) {
    lower_priority();
    loop {
        let (id, job) = {
            let mut st = lock(&s.state);
            loop {
                let next = st.jobs.pop_front().or_else(|| st.background.pop_front());
                if let Some((id, job, _)) = next {
                    st.running.insert(index, (Some(id), Instant::now()));
                    break (id, job);
                }
                if st.stopping {
                    st.alive -= 1;
                    return;
                }
                st = s.work.wait(st).unwrap_or_else(|p| p.into_inner());
            }
        };
        let (result, after) = match panic::catch_unwind(AssertUnwindSafe(job)) {
            Ok((result, after)) => (Some(result), after),
            Err(_) => {
                log::error!("worker job {id} panicked; reported as failed");
                (None, None)
            }
        };
        // Off the running list before the completion is posted, so whoever
        // sees the completion never sees the job still running (its thread
        // may stay on it for the after-step).
        {
            let mut st = lock(&s.state);
            if after.is_some() {
                st.running.insert(index, (None, Instant::now()));
            } else {
                st.running.remove(&index);
            }
        }
        lock(&s.done).push(Completion { id, result });
        // Cannot fail short of an overflow of the 64-bit counter.
        let _ = s.wake.write(1);
        if let Some(after) = after {
            if panic::catch_unwind(AssertUnwindSafe(after)).is_err() {
                log::error!("the after-step of worker job {id} panicked");
            }
        }
        let retire = {
            let mut st = lock(&s.state);
            st.running.remove(&index);
            // A replacement took this thread's place while it was stuck
            // (none may have: then it serves on).
            let was_stuck = st.stuck.remove(&index);
            let retire = was_stuck && !st.unreplaced.remove(&index);
            if retire {
                st.alive -= 1;
            }
            retire
        };
        if retire {
            return;
        }
    }
}

impl<T: Send + 'static> Drop for WorkerPool<T> {
    fn drop(&mut self) {
        self.join();
    }
}

#[cfg(test)]
#[path = "worker_tests.rs"]
mod tests;
