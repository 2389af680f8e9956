"""Wall time and peak memory of a process tree, from /proc (no psutil).

`ProcWatch` polls /proc every `interval` seconds for the descendants of the
root pids it is given.  Per process it keeps the kernel's own high-water mark
(``VmHWM`` in /proc/PID/status), so a process's peak is exact as long as it
was seen once near its end; the sums over the tree (``VmRSS`` and ``Pss``
from smaps_rollup, added up) are samples, so brief spikes between polls can
be missed. ``Pss`` counts a page shared by N processes as 1/N in each: a
tree of forked processes (dkr's extractors) is not counted N times over.  Processes are put in
classes by a `classify(pid, cmdline)` callback — for dkr: "main" (the CLI
process) and "extractor" (``dkr.unpack.extract`` children).
"""

from __future__ import annotations

import os
import resource
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field


def _ppid_map() -> dict[int, int]:
    out = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                data = f.read()
        except OSError:
            continue
        # pid (comm) state ppid ... ; comm may contain spaces and parens
        rest = data[data.rfind(b")") + 2:].split()
        out[int(name)] = int(rest[1])
    return out


def _status_kb(pid: int) -> tuple[int, int] | None:
    """(VmRSS, VmHWM) in kB, or None when the process is gone or a zombie."""
    rss = hwm = None
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"VmRSS:"):
                    rss = int(line.split()[1])
                elif line.startswith(b"VmHWM:"):
                    hwm = int(line.split()[1])
    except OSError:
        return None
    if rss is None or hwm is None:
        return None
    return rss, hwm


def _pss_kb(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/smaps_rollup", "rb") as f:
            for line in f:
                if line.startswith(b"Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ")
    except OSError:
        return b""


@dataclass
class TreeMemory:
    peak_tree_kb: int = 0                     # max over samples of summed VmRSS
    peak_tree_pss_kb: int = 0                 # max over samples of summed Pss
    peak_kb: dict = field(default_factory=dict)   # class -> max VmHWM of one process
    processes: dict = field(default_factory=dict)  # class -> count seen

    def mb(self, cls: str) -> float | None:
        kb = self.peak_kb.get(cls)
        return None if kb is None else kb / 1024

    @property
    def tree_mb(self) -> float:
        return self.peak_tree_kb / 1024

    @property
    def tree_pss_mb(self) -> float:
        return self.peak_tree_pss_kb / 1024


class ProcWatch(threading.Thread):
    def __init__(self, classify=None, interval: float = 0.1):
        super().__init__(daemon=True)
        self.classify = classify or (lambda pid, cmd, is_root: "main" if is_root else "child")
        self.interval = interval
        self.roots: set[int] = set()
        self.result = TreeMemory()
        self._halt = threading.Event()
        self._classes: dict[int, str] = {}
        self._lock = threading.Lock()

    def add_root(self, pid: int) -> None:
        with self._lock:
            self.roots.add(pid)
        self.sample()

    def sample(self) -> None:
        with self._lock:
            roots = set(self.roots)
        if not roots:
            return
        ppids = _ppid_map()
        children: dict[int, list[int]] = {}
        for pid, ppid in ppids.items():
            children.setdefault(ppid, []).append(pid)
        tree, todo = [], [r for r in roots if r in ppids]
        while todo:
            pid = todo.pop()
            tree.append(pid)
            todo.extend(children.get(pid, ()))
        total = total_pss = 0
        for pid in tree:
            st = _status_kb(pid)
            if st is None:
                continue
            rss, hwm = st
            total += rss
            pss = _pss_kb(pid)
            total_pss += rss if pss is None else pss
            cls = self._classes.get(pid)
            if cls is None:
                cls = self._classes[pid] = self.classify(pid, _cmdline(pid), pid in roots)
                self.result.processes[cls] = self.result.processes.get(cls, 0) + 1
            if hwm > self.result.peak_kb.get(cls, 0):
                self.result.peak_kb[cls] = hwm
        self.result.peak_tree_kb = max(self.result.peak_tree_kb, total)
        self.result.peak_tree_pss_kb = max(self.result.peak_tree_pss_kb, total_pss)

    def run(self) -> None:
        while not self._halt.wait(self.interval):
            self.sample()

    def stop(self) -> TreeMemory:
        self._halt.set()
        self.join()
        return self.result


def dkr_classes(pid: int, cmdline: bytes, is_root: bool) -> str:
    if is_root:
        return "main"
    if b"dkr.unpack.extract" in cmdline or b"dkr.extract" in cmdline:   # (older revisions)
        return "extractor"
    return "child"


@dataclass
class Outcome:
    seconds: float
    memory: TreeMemory
    ok: bool
    error: str = ""
    stdout: str = ""
    stderr: str = ""
    cpu_seconds: float = 0.0        # user+sys of the row's processes
    other_cores: float = 0.0        # CPU used meanwhile by everything else, in cores


# --------------------------------------------------------------------------
# CPU accounting: the row's own CPU time, and how busy the rest of the machine was

TICK = os.sysconf("SC_CLK_TCK")


def busy_seconds() -> float:
    """CPU seconds all CPUs spent busy since boot (not idle, not iowait)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    user, nice, system, idle, iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / TICK


def pid_cpu_seconds(pid: int | None) -> float:
    if not pid:
        return 0.0
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return 0.0
    rest = data[data.rfind(b")") + 2:].split()
    # utime, stime, cutime, cstime are fields 14-17 (rest[11:15])
    return sum(int(x) for x in rest[11:15]) / TICK


def _self_children_cpu() -> tuple[float, float]:
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime, kids.ru_utime + kids.ru_stime


def wait_quiet(exclude_pids=(), threshold: float = 0.25, window: float = 1.0,
               max_wait: float = 30.0) -> float:
    """Wait until the rest of the machine uses less than `threshold` cores
    over `window` seconds (at most `max_wait`); returns the last reading."""
    deadline = time.monotonic() + max_wait
    while True:
        b0, s0 = busy_seconds(), _self_children_cpu()[0]
        x0 = sum(pid_cpu_seconds(p) for p in exclude_pids)
        time.sleep(window)
        other = (busy_seconds() - b0 - (_self_children_cpu()[0] - s0)
                 - (sum(pid_cpu_seconds(p) for p in exclude_pids) - x0)) / window
        if other < threshold or time.monotonic() > deadline:
            return max(0.0, other)


def run_commands(commands, *, classify=None, concurrency: int = 1, env=None,
                 interval: float = 0.1, log_path=None, exclude_pids=()) -> Outcome:
    """Run `commands` (argv lists; a str runs through sh -c), at most
    `concurrency` at a time, in order; time the whole and watch memory.

    Stops at the first failure (the remaining commands are not started)."""
    watch = ProcWatch(classify, interval)
    queue = list(commands)
    running: list[tuple[subprocess.Popen, object, object, object]] = []
    outs, errs, failure = [], [], ""
    log = open(log_path, "ab") if log_path else None
    busy0, (self0, kids0) = busy_seconds(), _self_children_cpu()
    excl0 = sum(pid_cpu_seconds(p) for p in exclude_pids)
    start = time.monotonic()
    watch.start()
    try:
        while queue or running:
            while queue and len(running) < concurrency and not failure:
                cmd = queue.pop(0)
                # Files, not pipes: a chatty child can never block on a full pipe.
                out_f, err_f = tempfile.TemporaryFile(), tempfile.TemporaryFile()
                proc = subprocess.Popen(cmd, shell=isinstance(cmd, str), stdin=subprocess.DEVNULL,
                                        stdout=out_f, stderr=err_f, env=env,
                                        start_new_session=True)
                watch.add_root(proc.pid)
                running.append((proc, cmd, out_f, err_f))
            if not running:
                break
            time.sleep(0.005)
            for item in list(running):
                proc, cmd, out_f, err_f = item
                if proc.poll() is None:
                    continue
                running.remove(item)
                out, err = _read(out_f), _read(err_f)
                outs.append(out)
                errs.append(err)
                if log:
                    log.write(f"$ {_short_cmd(cmd, 100000)}\n[exit {proc.returncode}]\n{out}{err}\n".encode())
                if proc.returncode != 0 and not failure:
                    last = (err.strip() or out.strip() or "no output").splitlines()
                    failure = f"{_short_cmd(cmd)}: exit {proc.returncode}: {last[-1][:300]}"
        seconds = time.monotonic() - start
        busy1, (self1, kids1) = busy_seconds(), _self_children_cpu()
        excl1 = sum(pid_cpu_seconds(p) for p in exclude_pids)
    finally:
        memory = watch.stop()
        for proc, *_ in running:
            proc.kill()
            proc.wait()
        if log:
            log.close()
    row_cpu = kids1 - kids0
    other = busy1 - busy0 - row_cpu - (self1 - self0) - (excl1 - excl0)
    return Outcome(seconds, memory, not failure, failure, "".join(outs), "".join(errs),
                   cpu_seconds=row_cpu, other_cores=max(0.0, other / seconds) if seconds else 0.0)


def _read(f) -> str:
    f.seek(0)
    data = f.read().decode(errors="replace")
    f.close()
    return data


def _short_cmd(cmd, limit: int = 120) -> str:
    text = cmd if isinstance(cmd, str) else " ".join(str(c) for c in cmd)
    return text if len(text) < limit else text[:limit - 3] + "..."
