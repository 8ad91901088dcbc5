"""What a benchmark ran on: CPU, cores, torch and threads, GPU, load, host, date, git commit."""

from __future__ import annotations

import datetime
import os
import platform
import socket
import subprocess
import time
from pathlib import Path
from typing import Optional

import torch

REPO = Path(__file__).resolve().parents[2]


def hostname() -> str:
    return socket.gethostname() or "unknown"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def physical_cores() -> Optional[int]:
    try:
        import psutil

        return psutil.cpu_count(logical=False)
    except ImportError:
        return None


def load_average() -> Optional[list[float]]:
    """1/5/15-minute load averages (None where the OS has none)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _descendants_cpu() -> float:
    """CPU seconds of this process's live descendants (and the children they waited for): workers
    a pool or fork server started, whose time `os.times` does not see until they are waited here."""
    try:
        import psutil
    except ImportError:
        return 0.0
    total = 0.0
    try:
        kids = psutil.Process().children(recursive=True)
    except psutil.Error:
        return 0.0
    for k in kids:
        try:
            c = k.cpu_times()
            total += c.user + c.system + c.children_user + c.children_system
        except psutil.Error:
            pass
    return total


def cpu_snapshot() -> Optional[dict]:
    """Busy CPU seconds of the whole machine (/proc/stat; the hypervisor's steal apart) and of this
    process with all its descendants."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:9]]
    except OSError:
        return None
    hz = os.sysconf("SC_CLK_TCK")
    t = os.times()
    busy = (v[0] + v[1] + v[2] + v[5] + v[6]) / hz  # user nice system irq softirq
    own = t.user + t.system + t.children_user + t.children_system + _descendants_cpu()
    return {"wall": time.time(), "busy": busy, "steal": v[7] / hz, "own": own}


def others_busy_cores(a: Optional[dict], b: Optional[dict]) -> Optional[float]:
    """Mean cores used by OTHER processes between two snapshots."""
    if not a or not b or b["wall"] <= a["wall"]:
        return None
    return round(max(0.0, (b["busy"] - a["busy"]) - (b["own"] - a["own"])) / (b["wall"] - a["wall"]), 3)


def steal_cores(a: Optional[dict], b: Optional[dict]) -> Optional[float]:
    """Mean cores the hypervisor gave to other guests between two snapshots (a shared VM's noise)."""
    if not a or not b or b["wall"] <= a["wall"] or "steal" not in a:
        return None
    return round(max(0.0, b["steal"] - a["steal"]) / (b["wall"] - a["wall"]), 3)


def busy_processes(interval: float = 0.5, top: int = 5, exclude_self: bool = True) -> list[dict]:
    """The processes using the most CPU over `interval` seconds (other users of the cores)."""
    try:
        import psutil
    except ImportError:
        return []
    procs = []
    for p in psutil.process_iter(["pid", "name", "cmdline"]):
        if exclude_self and p.pid == os.getpid():
            continue
        try:
            p.cpu_percent(None)
            procs.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    time.sleep(interval)
    rows = []
    for p in procs:
        try:
            cpu = p.cpu_percent(None)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if cpu >= 1.0:
            cmd = short_command(p.info.get("cmdline") or [p.info.get("name") or "?"])
            rows.append({"pid": p.pid, "cpu_percent": round(cpu, 1), "cmd": cmd[:120]})
    return sorted(rows, key=lambda r: -r["cpu_percent"])[:top]


def short_command(argv: list[str]) -> str:
    """A command line with each absolute path cut to its file name: what ran, without the paths of
    this machine (the JSON is committed)."""
    return " ".join(os.path.basename(a.rstrip("/")) or a if a.startswith("/") else a for a in argv)


def git_commit(repo: Path = REPO) -> Optional[dict]:
    """HEAD of the checkout holding pcbench, and whether its tree has uncommitted changes."""
    try:
        head = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=30, check=True).stdout.strip()
        return {"commit": head, "dirty": bool(dirty)}
    except (OSError, subprocess.SubprocessError):
        return None


def machine_info() -> dict:
    """Static machine facts plus the load now (`load_before`); callers add `load_after`."""
    info = {
        "hostname": hostname(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu_model": cpu_model(),
        "logical_cores": os.cpu_count(),
        "physical_cores": physical_cores(),
        "affinity_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "git": git_commit(),
        "load_before": load_average(),
        "_cpu_start": cpu_snapshot(),
        "busy_processes_before": busy_processes(),
    }
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    return info


def contention(info: dict, threads: int) -> Optional[str]:
    """A warning when other processes plus our `threads` want more cores than there are: OpenMP
    threads then wait on descheduled peers and multi-threaded timings inflate many-fold."""
    cores = info.get("affinity_cores") or info.get("logical_cores") or 1
    busy = sum(p["cpu_percent"] for p in info.get("busy_processes_before", [])) / 100
    if busy + threads > cores + 0.25:
        fewer = max(1, int(cores - busy))
        hint = f" (try --threads {fewer})" if fewer < threads else ""
        return (f"other processes busy on {busy:.1f} of {cores} cores while this benchmark uses {threads} "
                f"thread(s): timings are contended{hint}")
    return None


def finish(info: dict) -> dict:
    """Add the load after the run and the mean cores other processes used during it."""
    info["load_after"] = load_average()
    start, end = info.pop("_cpu_start", None), cpu_snapshot()
    info["other_processes_busy_cores_during"] = others_busy_cores(start, end)
    info["hypervisor_steal_cores_during"] = steal_cores(start, end)
    info["busy_processes_after"] = busy_processes()
    return info
