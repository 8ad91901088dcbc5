"""Is a run still being worked on? The state a person or a launcher should believe.

A status of `running`/`submitted` is only a claim; `Liveness.state` checks it before repeating it:

- local/debug runs: the run's lock (held by the live process that trains it, `Store.try_lock`), else
  (records written before locks existed) the recorded pid on this host;
- SLURM runs: the job's state in accounting (`sacct`, one call for many jobs; `squeue` without
  accounting): PENDING/RUNNING/... is alive, CANCELLED becomes `cancelled` (e.g. an `afterok`
  dependency failed), and so does a job pending for a dependency that can never be met (reason
  DependencyNeverSatisfied: clusters without `kill_invalid_depend` keep such jobs queued forever);
  any other end becomes `lost`.

Derived states (never written by a job): `lost` (its process or job is gone; a rerun resumes it),
`damaged` (unreadable records, `Store.health`). `cancelled` is also written by `launch` once known.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
from typing import Iterable, Optional

from pcbench.store import ACTIVE, Store

SLURM_ALIVE = ("PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESIZING", "SUSPENDED",
               "CONFIGURING", "COMPLETING", "STAGE_OUT", "SIGNALING", "RESV_DEL_HOLD", "PREEMPTED")


GONE = "GONE"  # `slurm_states`: neither the queue nor accounting knows the job
NEVER = "NEVER"  # `slurm_states`: pending on a dependency that can never be met; it will not start
NEVER_REASONS = ("DependencyNeverSatisfied",)


def pid_alive(pid: int) -> bool:
    """A live (not zombie) process with this pid."""
    try:
        os.kill(pid, 0)
    except (OSError, ValueError, OverflowError):
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X"):
                return False
        with open(f"/proc/{pid}/status") as f:  # SIGKILL pending: it is dying, and will not write again
            pending = {k: v for k, v in (line.split(":", 1) for line in f if ":" in line)}
        return not any(int(pending.get(k, "0").strip(), 16) & (1 << (9 - 1)) for k in ("SigPnd", "ShdPnd"))
    except (OSError, ValueError):
        return True  # no /proc: trust kill(0)


def _expand(job: str) -> list[str]:
    """`123_[0-2,5]` (a pending array) -> 123_0 123_1 123_2 123_5; anything else unchanged."""
    m = re.fullmatch(r"(\d+)_\[([0-9,\-]+)(?:%\d+)?\]", job)
    if not m:
        return [job]
    out = []
    for part in m.group(2).split(","):
        lo, _, hi = part.partition("-")
        out += [f"{m.group(1)}_{i}" for i in range(int(lo), int(hi or lo) + 1)]
    return out


def slurm_states(job_ids: Iterable[str]) -> dict[str, str]:
    """{job id: SLURM state} (first word, e.g. CANCELLED) for the jobs SLURM still knows; `NEVER` for
    one pending on a dependency that can never be met, `GONE` for one the answering controller and
    accounting both lack."""
    wanted = {str(j) for j in job_ids if j}
    ids = sorted(wanted | {j.split("_")[0] for j in wanted})  # an array cancelled before it split
    if not ids:                                                  # is known only by its own id
        return {}
    out: dict[str, str] = {}
    asked = False  # the controller answered: a wanted job neither it nor accounting knows is gone
    sacct = ["sacct", "-n", "-P", "-X", "--duplicates", "-j", ",".join(ids), "-o"]
    cmds = (sacct + ["JobID,State,Reason"], sacct + ["JobID,State"],  # an accounting without Reason
            ["squeue", "-h", "-j", ",".join(ids), "-o", "%i|%T|%r"])
    accounted = False  # accounting answered once: its second form is not needed
    for cmd in cmds:
        if wanted <= out.keys():
            break
        if accounted and cmd[0] == "sacct":
            continue
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if r.returncode != 0:
            continue
        asked = asked or cmd[0] == "squeue"
        accounted = accounted or cmd[0] == "sacct"
        found: dict[str, str] = {}
        for line in r.stdout.splitlines():
            job, state, reason = (line.split("|") + ["", ""])[:3]
            if not state.strip():
                continue
            state = state.split()[0].rstrip("+")
            if state == "PENDING" and reason.strip() in NEVER_REASONS:
                state = NEVER
            for j in _expand(job.strip()):
                found[j] = state  # the last (newest) record wins
        out = {**found, **out}  # accounting first; the queue fills in the jobs it lacks
    if asked:
        for j in wanted - out.keys():
            out[j] = GONE
    return out


class Liveness:
    """Checks the runs of one store; SLURM states are fetched once per `prefetch`."""

    def __init__(self, store: Store):
        self.store = store
        self.host = socket.gethostname()
        self._slurm: dict[str, str] = {}

    def prefetch(self, run_ids: Iterable[str]) -> None:
        """Ask SLURM once about every job these runs claim to be in."""
        jobs = []
        for rid in run_ids:
            st = self.store.status(rid)
            if st.get("state") in ACTIVE and st.get("executor") == "slurm" and st.get("job_id"):
                jobs.append(str(st["job_id"]))
        self._slurm.update(slurm_states(jobs))

    def state(self, run_id: str, kind: Optional[str] = None) -> tuple[str, Optional[str]]:
        """(state, detail): as `Store.health`, with a dead `running`/`submitted` (`ACTIVE`) made `lost` or
        `cancelled`; detail names the process or job (or what is wrong)."""
        state, problem = self.store.health(run_id, kind)
        if state not in ACTIVE:
            return state, problem
        st = self.store.status(run_id)
        job = st.get("job_id")
        if st.get("executor") == "slurm" and job:
            js = self._slurm.get(str(job)) or slurm_states([job]).get(str(job))
            if js is None:
                return state, f"job {job} (SLURM did not answer)"
            if js == GONE:
                return "lost", f"SLURM job {job} is gone (not queued, no accounting record)"
            if js == NEVER:
                return "cancelled", (f"SLURM job {job} can never start (DependencyNeverSatisfied: a dependency "
                                     f"did not complete); a rerun resubmits it, `scancel {job}` clears the queue")
            self._slurm[str(job)] = js
            if js in SLURM_ALIVE:
                return state, f"job {job} {js.lower()}"
            if js == "CANCELLED":
                return "cancelled", f"SLURM job {job} was cancelled"
            return "lost", f"SLURM job {job} ended {js} without recording the run"
        holder = self.store.lock_holder(run_id)
        if holder is not None and not (holder.get("host") == self.host and isinstance(holder.get("pid"), int)
                                       and not pid_alive(holder["pid"])):
            return "running", f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}"
        pid, host = st.get("pid"), st.get("host")
        if self.store.lock_path(run_id).exists():  # a lock nobody holds: its process is gone
            return "lost", f"pid {pid} on {host} is gone"
        if host and host != self.host:
            return state, f"pid {pid} on {host} (another host: not checked)"
        if pid and pid_alive(int(pid)):
            return state, f"pid {pid}"
        return "lost", f"pid {pid} on {host} is gone"

    def alive(self, run_id: str) -> bool:
        return self.state(run_id)[0] in ACTIVE
