//! The worker pool: a few threads that do everything slow (backend reads,
//! cache writes, syncs) and hand results back to the reactor through a
//! completion queue and an eventfd the reactor (or a host loop) watches.
//!
//! A job that panics is reported as failed, and its thread goes on serving.
//! A job that runs past its deadline is abandoned: the caller stops waiting
//! for it and a replacement thread takes its place, so a hung backend cannot
//! occupy every worker; the stuck thread retires when its job returns.
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
mod tests {
    use super::*;
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

    /// Takes completions until `n` have come, each within 5 s.
    fn completions(pool: &WorkerPool<u64>, n: usize) -> Vec<Completion<u64>> {
        let mut got = Vec::new();
        while got.len() < n {
            let mut fds = [PollFd::new(pool.completion_fd(), PollFlags::POLLIN)];
            assert_eq!(poll(&mut fds, PollTimeout::from(5000u16)).unwrap(), 1);
            pool.take_completions(&mut got);
        }
        got
    }

    #[test]
    fn completions_arrive_and_panics_are_failures() {
        let pool = WorkerPool::<u64>::new(2).unwrap();
        assert_eq!(pool.size(), 2);
        for i in 0..100u64 {
            pool.submit(i, move || {
                if i == 13 {
                    panic!("boom");
                }
                i * 2
            });
        }
        let mut got = completions(&pool, 100);
        got.sort_by_key(|c| c.id);
        for c in &got {
            if c.id == 13 {
                assert_eq!(c.result, None);
            } else {
                assert_eq!(c.result, Some(c.id * 2));
            }
        }
    }

    /// Submits job `id` that signals once it runs and then blocks until the
    /// returned sender is dropped; returns after it started.
    fn blocking_job(pool: &WorkerPool<u64>, id: u64) -> std::sync::mpsc::Sender<()> {
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let (started_tx, started) = std::sync::mpsc::channel::<()>();
        pool.submit(id, move || {
            let _ = started_tx.send(());
            let _ = rx.recv();
            id
        });
        started.recv().unwrap();
        tx
    }

    /// Review finding: past the bound on replacements, a stuck thread was
    /// marked stuck without a replacement and still retired when it
    /// returned, so the pool shrank for good (to no thread at all).
    #[test]
    fn a_stuck_thread_nobody_replaced_goes_back_to_work() {
        let mut pool = WorkerPool::<u64>::new(1).unwrap();
        let later = Instant::now() + Duration::from_secs(1);
        let limit = Duration::from_millis(10);
        // One thread, at most 4 replacements: the 5th stuck job's thread
        // gets none.
        let mut held = Vec::new();
        for id in 1..=5 {
            held.push(blocking_job(&pool, id));
            assert_eq!(pool.expire(limit, later).stuck, vec![id]);
        }
        // The unreplaced one returns; every other thread is still stuck.
        drop(held.pop());
        assert_eq!(completions(&pool, 1)[0].id, 5);
        pool.submit(6, || 6);
        assert_eq!(completions(&pool, 1)[0].id, 6, "a thread took job 6");
        drop(held);
    }

    #[test]
    fn stuck_jobs_are_abandoned_and_replaced() {
        let mut pool = WorkerPool::<u64>::new(1).unwrap();
        let release = blocking_job(&pool, 1);
        let later = Instant::now() + Duration::from_secs(1);
        let expired = pool.expire(Duration::from_millis(10), later);
        assert_eq!(expired.stuck, vec![1]);
        assert!(expired.dropped.is_empty());
        // The only original thread is stuck, yet a new job completes.
        pool.submit(2, || 2);
        let mut got = Vec::new();
        while !got.iter().any(|c: &Completion<u64>| c.id == 2) {
            let mut fds = [PollFd::new(pool.completion_fd(), PollFlags::POLLIN)];
            poll(&mut fds, PollTimeout::from(5000u16)).unwrap();
            pool.take_completions(&mut got);
        }
        assert_eq!(
            pool.expire(Duration::from_millis(10), later).stuck,
            Vec::<u64>::new()
        );
        drop(release);
    }

    #[test]
    fn a_task_queued_behind_a_stuck_thread_goes_to_its_replacement() {
        let mut pool = WorkerPool::<u64>::new(1).unwrap();
        let release = blocking_job(&pool, 1);
        pool.submit(2, || 2);
        // The check runs late: task 2 has waited past the limit too, but a
        // replacement thread is started for it, so it is not dropped.
        let later = Instant::now() + Duration::from_secs(1);
        let e = pool.expire(Duration::from_millis(10), later);
        assert_eq!((e.stuck, e.dropped), (vec![1], vec![]));
        let mut got = Vec::new();
        while !got.iter().any(|c: &Completion<u64>| c.id == 2) {
            let mut fds = [PollFd::new(pool.completion_fd(), PollFlags::POLLIN)];
            poll(&mut fds, PollTimeout::from(5000u16)).unwrap();
            pool.take_completions(&mut got);
        }
        drop(release);
    }

    #[test]
    fn a_stuck_after_step_has_its_thread_replaced() {
        let mut pool = WorkerPool::<u64>::new(1).unwrap();
        let (release, hold) = std::sync::mpsc::channel::<()>();
        let (started_tx, started) = std::sync::mpsc::channel::<()>();
        let after: After = Box::new(move || {
            let _ = started_tx.send(());
            let _ = hold.recv();
        });
        pool.submit_then(1, Priority::Demand, move || (1, Some(after)));
        completions(&pool, 1);
        started.recv_timeout(Duration::from_secs(5)).unwrap();
        assert!(pool.busy(), "a running after-step keeps the pool busy");
        pool.submit(2, || 2);
        // Past the limit the thread is stuck (no job of its own to fail):
        // a replacement takes task 2 while the after-step still hangs.
        let later = Instant::now() + Duration::from_secs(1);
        let e = pool.expire(Duration::from_millis(10), later);
        assert_eq!((e.stuck, e.dropped), (vec![], vec![]));
        let got = completions(&pool, 1);
        assert_eq!((got[0].id, got[0].result), (2, Some(2)));
        drop(release);
    }

    #[test]
    fn jobs_queued_past_the_limit_are_dropped_once_no_thread_can_be_added() {
        let mut pool = WorkerPool::<u64>::new(1).unwrap();
        let limit = Duration::from_millis(10);
        let mut now = Instant::now();
        // Four threads get stuck in turn, each replaced (the bound is four
        // stuck threads per pool thread).
        let mut held = Vec::new();
        for id in 1..=4 {
            held.push(blocking_job(&pool, id));
            now += Duration::from_secs(1);
            assert_eq!(pool.expire(limit, now).stuck, vec![id]);
        }
        // The fifth gets stuck too and no replacement may start: what waits
        // in the queue past the limit now fails.
        held.push(blocking_job(&pool, 5));
        pool.submit(6, || 6);
        pool.submit(7, || 7);
        assert_eq!(pool.cancel(&[7, 9]), vec![7]);
        now += Duration::from_secs(1);
        let e = pool.expire(limit, now);
        assert_eq!((e.stuck, e.dropped), (vec![5], vec![6]));
        drop(held);
    }

    /// Review finding: a job queued longer than the limit was dropped
    /// even while the pool's threads were healthy, only busy with jobs
    /// that had not run past it (a storm of slow fills): its requests
    /// failed with EIO. Now it waits for them.
    #[test]
    fn a_job_queued_past_the_limit_behind_healthy_threads_is_kept() {
        let mut pool = WorkerPool::<u64>::new(1).unwrap();
        let limit = Duration::from_secs(10);
        let first = blocking_job(&pool, 1);
        // Job 2 will take the thread after job 1; job 3 waits behind both.
        let (second, hold) = std::sync::mpsc::channel::<()>();
        let (started_tx, started) = std::sync::mpsc::channel::<()>();
        pool.submit(2, move || {
            let _ = started_tx.send(());
            let _ = hold.recv();
            2
        });
        pool.submit(3, || 3);
        let mid = Instant::now();
        drop(first);
        started.recv_timeout(Duration::from_secs(5)).unwrap();
        assert_eq!(completions(&pool, 1)[0].id, 1);
        // Job 3 has been queued a whole limit, job 2 has run less than one:
        // the thread is healthy, so job 3 is neither dropped nor failed.
        let e = pool.expire(limit, mid + limit);
        assert_eq!((e.stuck, e.dropped), (vec![], vec![]));
        drop(second);
        let mut got: Vec<u64> = completions(&pool, 2).iter().map(|c| c.id).collect();
        got.sort();
        assert_eq!(got, vec![2, 3]);
    }

    #[test]
    fn demand_tasks_run_before_background_ones() {
        let pool = WorkerPool::<u64>::new(1).unwrap();
        let release = blocking_job(&pool, 1);
        let order = Arc::new(Mutex::new(Vec::new()));
        for (id, p) in [
            (2, Priority::Background),
            (3, Priority::Demand),
            (4, Priority::Background),
            (5, Priority::Demand),
        ] {
            let order = order.clone();
            pool.submit_as(id, p, move || {
                lock(&order).push(id);
                id
            });
        }
        drop(release);
        completions(&pool, 5);
        assert_eq!(*lock(&order), vec![3, 5, 2, 4]);
    }

    #[test]
    fn an_after_step_runs_once_its_completion_is_posted() {
        let pool = WorkerPool::<u64>::new(1).unwrap();
        let (seen_tx, seen) = std::sync::mpsc::channel::<()>();
        let (ran_tx, ran) = std::sync::mpsc::channel::<bool>();
        let after: After = Box::new(move || {
            // Only a posted completion lets the test say it was seen.
            let saw = seen.recv_timeout(Duration::from_secs(10)).is_ok();
            let _ = ran_tx.send(saw);
        });
        pool.submit_then(1, Priority::Demand, move || (7, Some(after)));
        let got = completions(&pool, 1);
        assert_eq!((got[0].id, got[0].result), (1, Some(7)));
        seen_tx.send(()).unwrap();
        let saw = ran.recv_timeout(Duration::from_secs(10)).unwrap();
        assert!(saw, "the after-step ran before its completion was posted");
        // A panicking after-step is logged; its thread goes on serving.
        let boom: After = Box::new(|| panic!("after-step"));
        pool.submit_then(2, Priority::Demand, move || (2, Some(boom)));
        pool.submit(3, || 3);
        let mut got = completions(&pool, 2);
        got.sort_by_key(|c| c.id);
        let got: Vec<_> = got.iter().map(|c| (c.id, c.result)).collect();
        assert_eq!(got, vec![(2, Some(2)), (3, Some(3))]);
    }

    #[test]
    fn a_promoted_background_task_runs_with_the_demand_ones() {
        let pool = WorkerPool::<u64>::new(1).unwrap();
        let release = blocking_job(&pool, 1);
        let order = Arc::new(Mutex::new(Vec::new()));
        for (id, p) in [
            (2, Priority::Background),
            (3, Priority::Background),
            (4, Priority::Demand),
        ] {
            let order = order.clone();
            pool.submit_as(id, p, move || {
                lock(&order).push(id);
                id
            });
        }
        pool.promote(3);
        pool.promote(99);
        drop(release);
        completions(&pool, 4);
        assert_eq!(*lock(&order), vec![4, 3, 2]);
    }
}
