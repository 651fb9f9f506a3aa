//! Tests of `worker`.

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
