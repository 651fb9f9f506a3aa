#!/usr/bin/env python3
"""Where a request/reply server is woken, and how long it then waits.

Reads `perf script -F comm,tid,cpu,time,event,trace` output of a
`perf sched record -a` run (stdin) and follows one client thread that
wakes one server thread by writing a request. For every such wake-up it
finds the server's next switch-in and sorts the wait ("sch delay" of that
wake-up) by whether the server ran on the client's CPU or on another:

    perf sched record -a -o sched.data -- COMMAND
    perf sched timehist -i sched.data     # find the two thread ids
    perf script -i sched.data -F comm,tid,cpu,time,event,trace |
        scripts/wake-placement.py CLIENT_TID SERVER_TID

docs/PERFORMANCE.md ("Cold registry pull: where the reactor is woken")
quotes its output for the Noop probe under four pulls.
"""
import re
import sys

LINE = re.compile(r"^\s*.+?\s+(\d+)\s+\[(\d+)\]\s+([\d.]+):\s+(\S+):\s+(.*)$")


def waits(lines, client, server):
    """Yields (same_cpu, microseconds) per wake-up of server by client."""
    woken = None  # (time, cpu) of the client's last wake-up of the server
    for line in lines:
        m = LINE.match(line)
        if not m:
            continue
        tid, cpu, t, event, trace = m.groups()
        if event == "sched:sched_waking":
            pid = re.search(r" pid=(\d+)", trace)
            if pid and pid.group(1) == server and tid == client:
                woken = (float(t), int(cpu))
        elif event == "sched:sched_switch" and woken:
            nxt = re.search(r"next_pid=(\d+)", trace)
            if nxt and nxt.group(1) == server:
                yield int(cpu) == woken[1], (float(t) - woken[0]) * 1e6
                woken = None


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    client, server = sys.argv[1], sys.argv[2]
    runs = {True: [], False: []}
    for same, us in waits(sys.stdin, client, server):
        runs[same].append(us)
    total = sum(len(v) for v in runs.values())
    if total == 0:
        sys.exit(f"no wake-up of {server} by {client} in the input")
    for same, name in ((True, "on the client's CPU"), (False, "on another CPU")):
        v = sorted(runs[same])
        if not v:
            print(f"{name}: none")
            continue
        n = len(v)
        pct = lambda q: v[min(n - 1, int(n * q))]
        print(
            f"{name}: {n} of {total} ({100 * n / total:.0f} %), wait us "
            f"p50 {pct(0.5):.0f} p90 {pct(0.9):.0f} p99 {pct(0.99):.0f}, "
            f"over 300 us: {sum(1 for x in v if x > 300)}"
        )


if __name__ == "__main__":
    main()
