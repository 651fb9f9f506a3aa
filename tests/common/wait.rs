//! Waiting for things, never for time.
//!
//! Tests do not sleep to let something happen. They block on the thing
//! itself where the kernel or std can block on it (a child's exit, a socket
//! becoming writable, a reply, a [`Gate`] opening, a channel), and otherwise
//! poll an observable condition with [`wait_until`], which always has a
//! deadline and is the one place in the harness that pauses between checks.

use std::os::fd::AsFd;
use std::process::{Child, ExitStatus};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

/// Polls `cond` until it returns true (→ true) or `timeout` has passed
/// (→ false, after one last check at the deadline). The pause between checks
/// starts at 1 ms and doubles up to 25 ms, so a condition that is nearly true
/// costs little and a slow one does not spin.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(1);
    loop {
        if cond() {
            return true;
        }
        let now = Instant::now();
        if now >= deadline {
            return false;
        }
        std::thread::sleep(pause.min(deadline - now));
        pause = (pause * 2).min(Duration::from_millis(25));
    }
}

/// Waits for `child` to exit, blocking in `wait(2)` on a helper thread, for at
/// most `timeout`. On timeout the child is SIGKILLed and reaped, and `None`
/// is returned.
pub fn wait_exit(child: Child, timeout: Duration) -> Option<ExitStatus> {
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let (tx, rx) = std::sync::mpsc::channel();
    let waiter = std::thread::spawn(move || {
        let mut child = child;
        let _ = tx.send(child.wait());
    });
    let status = match rx.recv_timeout(timeout) {
        Ok(st) => Some(st.expect("wait for child")),
        Err(_) => {
            // Not reaped yet (the waiter has not returned), so the pid is
            // still this child's.
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
            let _ = rx.recv();
            None
        }
    };
    waiter.join().expect("child waiter thread");
    status
}

/// Blocks until `fd` is writable (`poll(2)` POLLOUT) or `timeout` passes;
/// true if writable.
pub fn wait_writable(fd: impl AsFd, timeout: Duration) -> bool {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let t = PollTimeout::try_from(timeout).unwrap_or(PollTimeout::MAX);
    let mut fds = [PollFd::new(fd.as_fd(), PollFlags::POLLOUT)];
    loop {
        match poll(&mut fds, t) {
            Ok(n) => return n > 0,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => panic!("poll: {e}"),
        }
    }
}

/// A flag threads can block on until it is raised: `Gate::new(false)`,
/// waiters call [`Gate::wait_open`], someone calls [`Gate::set`]`(true)`.
/// It may be closed again (e.g. to pause workers).
pub struct Gate {
    open: Mutex<bool>,
    changed: Condvar,
}

impl Gate {
    pub fn new(open: bool) -> Gate {
        Gate {
            open: Mutex::new(open),
            changed: Condvar::new(),
        }
    }

    pub fn set(&self, open: bool) {
        *self.open.lock().unwrap_or_else(|p| p.into_inner()) = open;
        self.changed.notify_all();
    }

    pub fn is_open(&self) -> bool {
        *self.open.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Blocks until the gate is open or `timeout` passes; true if open.
    pub fn wait_open(&self, timeout: Duration) -> bool {
        let guard = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let (guard, _) = self
            .changed
            .wait_timeout_while(guard, timeout, |open| !*open)
            .unwrap_or_else(|p| p.into_inner());
        *guard
    }
}
