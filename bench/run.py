#!/usr/bin/env python3
"""dkr's benchmark: dkr against podman, skopeo+umoci and the machine's limits.

    bench/install.sh && .venv/bin/python bench/run.py [--scale 0.25] [--runs 3]

Starts Debian's docker-registry on loopback, pushes the deterministic image
sets of `sets.py` to it, and pulls each set with every row of `peers.py`:
each repetition runs every row once (the order rotated by one per
repetition), each measurement into a fresh loop-mounted btrfs.  The page
cache is not dropped: the registry's blobs stay warm, the destination is
new.  The trees of the first repetition are checked against umoci's.
Writes bench/results/<timestamp>.{md,json,png} and updates docs/bench.md.
See bench/README.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shlex
import signal
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO))

from dkr.testing.oracle import diff_trees, tree_snapshot, umoci_unpack  # noqa: E402
from dkr.testing import link  # noqa: E402
from dkr.testing.registry import Registry  # noqa: E402

import measure  # noqa: E402
import peers  # noqa: E402
import report  # noqa: E402
import sets as setmod  # noqa: E402

try:
    from dkr.testing import loopfs
except ImportError:                    # pragma: no cover - older trees
    loopfs = None

MB = 1_000_000


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------
# a fresh btrfs per measurement


@contextmanager
def _own_btrfs(size: str, directory: str):
    work = Path(tempfile.mkdtemp(prefix="dkr-bench-btrfs-", dir=directory))
    image, mnt = work / "fs.img", work / "mnt"
    mnt.mkdir()
    dev = None
    try:
        subprocess.run(["truncate", "-s", size, str(image)], check=True)
        subprocess.run(["mkfs.btrfs", "-q", "-f", str(image)], check=True, capture_output=True)
        dev = subprocess.run(["losetup", "--find", "--show", str(image)], check=True,
                             capture_output=True, text=True).stdout.strip()
        subprocess.run(["mount", "-t", "btrfs", dev, str(mnt)], check=True)
        yield mnt
    finally:
        subprocess.run(["umount", "-R", str(mnt)], capture_output=True)
        if os.path.ismount(mnt):
            subprocess.run(["umount", "-R", "--lazy", str(mnt)], capture_output=True)
        if dev:
            subprocess.run(["losetup", "-d", dev], capture_output=True)
        shutil.rmtree(work, ignore_errors=True)


def fresh_btrfs(size: str, directory: str):
    if loopfs is not None:
        return loopfs.btrfs(size, directory)
    return _own_btrfs(size, directory)


def fs_size(bset) -> str:
    # Room for a spooled copy of every blob, a few trees and podman's copies.
    need = 4 * bset.tar_bytes + 2 * bset.gz_bytes + (512 << 20)
    return f"{max(2 << 30, need) >> 20}M"


# --------------------------------------------------------------------------


class Bench:
    def __init__(self, args, rows, registry, outdir: Path):
        self.args = args
        self.rows = rows
        self.registry = registry
        self.outdir = outdir
        self.logdir = outdir / "logs"
        self.logdir.mkdir(parents=True, exist_ok=True)
        self.policy = peers.write_policy(outdir / "policy.json")
        self.dkr = args.dkr

    def measure(self, row, bset, label: str, want_trees: bool):
        """One timed pull of `bset` by `row` into a fresh btrfs.
        Returns (record dict, {machine: snapshot} or None)."""
        with fresh_btrfs(fs_size(bset), self.args.workdir) as dest:
            subprocess.run(["sync"])
            ctx = peers.Ctx(dest, bset, self.registry.host, self.dkr, self.policy)
            cmds, concurrency = row.commands(ctx)
            registry_pid = [self.registry.proc.pid]
            before = None
            if self.args.quiet_wait > 0:
                # Other work on the machine (another session's tests …) skews
                # the clock: wait for it to calm down, and record what remains.
                before = measure.wait_quiet(registry_pid, self.args.quiet_threshold,
                                            max_wait=self.args.quiet_wait)
            out = measure.run_commands(cmds, classify=row.classify, concurrency=concurrency,
                                       log_path=self.logdir / f"{label}.log",
                                       exclude_pids=registry_pid)
            rec = {"seconds": round(out.seconds, 3), "ok": out.ok, "error": out.error,
                   "cpu_seconds": round(out.cpu_seconds, 2),
                   "other_cores": round(out.other_cores, 2),
                   "other_cores_before": None if before is None else round(before, 2),
                   "rss_mb": {k: round(v / 1024, 1) for k, v in out.memory.peak_kb.items()},
                   "tree_rss_mb": round(out.memory.tree_mb, 1),
                   "tree_pss_mb": round(out.memory.tree_pss_mb, 1),
                   "processes": out.memory.processes}
            if row.kind == "dkr":
                rec["stats"] = _stats_block(out.stderr)
            snaps = None
            if out.ok and want_trees and row.verifiable:
                try:
                    with row.trees(ctx) as trees:
                        snaps = {name: tree_snapshot(path, include_root=False)
                                 for name, path in trees.items()}
                except Exception as e:      # a check that cannot run is reported, not fatal
                    rec["verify_error"] = f"could not read the trees: {e}"
            state = "ok" if out.ok else f"FAILED: {out.error}"
            log(f"  {label}: {out.seconds:.2f} s, CPU {out.cpu_seconds:.2f} s, others "
                f"{out.other_cores:.2f} cores, tree RSS {out.memory.tree_mb:.0f} MB "
                f"(PSS {out.memory.tree_pss_mb:.0f} MB), {state}")
            return rec, snaps

    def run_group(self, name: str, bset, rows, runs: int, verify: bool) -> dict:
        """Every row once per repetition, rotated; returns {row key: result}."""
        results = {r.key: {"label": r.label, "kind": r.kind, "runs": []} for r in rows}
        active = []
        for r in rows:
            reason = r.missing()
            if reason:
                results[r.key]["missing"] = reason
                log(f"  {r.label}: MISSING ({reason})")
            else:
                active.append(r)
        snapshots = {}
        for rep in range(runs):
            k = rep % len(active) if active else 0
            order = active[k:] + active[:k]
            log(f"{name}: repetition {rep + 1}/{runs}: {', '.join(r.key for r in order)}")
            for r in order:
                rec, snaps = self.measure(r, bset, f"{name}-{r.key}-{rep + 1}",
                                          verify and rep == 0)
                results[r.key]["runs"].append(rec)
                if snaps is not None:
                    snapshots[r.key] = snaps
                if rec.get("verify_error"):
                    results[r.key]["verify"] = rec["verify_error"]
        if verify:
            self.verify(name, bset, rows, results, snapshots)
        for res in results.values():
            ok = [x["seconds"] for x in res["runs"] if x["ok"]]
            res["median"] = statistics.median(ok) if ok else None
            res["failed"] = sum(1 for x in res["runs"] if not x["ok"])
            cpu = [x["cpu_seconds"] for x in res["runs"] if x["ok"] and "cpu_seconds" in x]
            res["median_cpu"] = statistics.median(cpu) if cpu else None
            other = [x["other_cores"] for x in res["runs"] if "other_cores" in x]
            res["max_other_cores"] = max(other) if other else None
            peak: dict = {}
            for x in res["runs"]:
                for cls, mb in x["rss_mb"].items():
                    peak[cls] = max(peak.get(cls, 0), mb)
            res["peak_rss_mb"] = peak
            res["peak_tree_rss_mb"] = max((x["tree_rss_mb"] for x in res["runs"]), default=None)
            res["peak_tree_pss_mb"] = max((x.get("tree_pss_mb", x["tree_rss_mb"])
                                           for x in res["runs"]), default=None)
            if ok and res["kind"] == "dkr":
                med = min((x for x in res["runs"] if x["ok"]),
                          key=lambda x: abs(x["seconds"] - res["median"]))
                res["stats_of_median_run"] = med.get("stats", "")
        return results

    def verify(self, name, bset, rows, results, snapshots) -> None:
        reference = snapshots.get("skopeo-umoci")
        ref_name = "umoci"
        if reference is None:
            try:
                reference = {}
                with tempfile.TemporaryDirectory(prefix="dkr-bench-oracle-",
                                                 dir=self.args.workdir) as tmp:
                    for img in bset.images:
                        rootfs = umoci_unpack(self.registry, img.repo, img.tag,
                                              Path(tmp) / img.name)
                        reference[img.name] = tree_snapshot(rootfs, include_root=False)
            except Exception as e:
                log(f"  {name}: no umoci reference ({e}); trees are not checked")
                for r in rows:
                    if r.verifiable and "verify" not in results[r.key]:
                        results[r.key]["verify"] = f"unchecked: no umoci reference ({e})"
                return
        diff_lines = []
        for r in rows:
            if not r.verifiable:
                results[r.key]["verify"] = "n/a"
                continue
            if r.key == "skopeo-umoci":
                results[r.key]["verify"] = "reference"
                continue
            snaps = snapshots.get(r.key)
            if snaps is None:
                results[r.key].setdefault("verify", "unchecked (row did not run or failed)")
                continue
            problems = []
            entries = 0
            for img in bset.images:
                got = snaps.get(img.name)
                want = reference[img.name]
                entries += len(want)
                if got is None:
                    problems.append(f"{img.name}: no tree")
                    continue
                problems += [f"{img.name}: {d}" for d in diff_trees(want, got, ref_name, r.key)]
            if problems:
                results[r.key]["verify"] = (f"DIFFERS from umoci in {len(problems)} places, "
                                            f"first: {problems[0]}")
                diff_lines += [f"{r.key}: {p}" for p in problems]
                log(f"  {name}/{r.key}: tree DIFFERS from umoci ({len(problems)}): {problems[0]}")
            else:
                results[r.key]["verify"] = f"same as umoci ({len(bset.images)} tree(s), {entries} entries)"
                log(f"  {name}/{r.key}: tree same as umoci")
        if diff_lines:
            (self.logdir / f"{name}-tree-diffs.txt").write_text("\n".join(diff_lines) + "\n")


def _stats_block(stderr: str) -> str:
    lines = stderr.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("Stats:"):
            return "\n".join(lines[i:])
    return ""


def tool_versions() -> dict:
    out = {}
    for tool, cmd in (("podman", ["podman", "--version"]), ("skopeo", ["skopeo", "--version"]),
                      ("umoci", ["umoci", "--version"]), ("curl", ["curl", "--version"]),
                      ("pigz", ["pigz", "--version"]), ("tar", ["tar", "--version"]),
                      ("docker-registry", ["docker-registry", "--version"])):
        if shutil.which(cmd[0]) is None:
            out[tool] = "missing"
            continue
        p = subprocess.run(cmd, capture_output=True, text=True)
        text = (p.stdout or p.stderr).strip().splitlines()
        words = text[0].split() if text else ["?"]
        # "podman version 4.3.1", "curl 7.88.1 (x86_64...) libcurl/...": keep the version
        out[tool] = next((w for w in words if w[:1].isdigit()), words[-1])
    return out


def machine_facts() -> dict:
    cpu = "?"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {"cores": os.cpu_count(), "cpu": cpu, "memory_gib": round(mem / 2**30, 1),
            "kernel": platform.release(), "python": platform.python_version(),
            "dkr": _dkr_version()}


def code_fingerprint() -> str:
    """A hash of dkr's code as it is on disk now (the install is editable)."""
    import hashlib
    h = hashlib.sha256()
    for top in ("dkr", "plugins"):
        for path in sorted((REPO / top).rglob("*.py")):
            h.update(str(path.relative_to(REPO)).encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:12]


def _dkr_version() -> str:
    """The commit dkr runs from, and whether its code had uncommitted changes."""
    def git(*a):
        p = subprocess.run(["git", "-C", str(REPO), *a], capture_output=True, text=True)
        return p.stdout.strip() if p.returncode == 0 else ""
    head = git("rev-parse", "--short", "HEAD")
    if not head:
        return "unknown (not a git checkout)"
    dirty = [line for line in git("status", "--porcelain", "--", "dkr", "plugins",
                                  "setup.cfg").splitlines() if line.strip()]
    return head + (f" + uncommitted changes in {len(dirty)} file(s) of dkr/, plugins/"
                   if dirty else "")


def parse_args(argv=None):
    default_dkr = str(Path(sys.executable).parent / "dkr")
    p = argparse.ArgumentParser(description="Benchmark dkr against podman, skopeo+umoci and "
                                "the machine's limits on a local registry.")
    p.add_argument("--scale", type=float, default=1.0,
                   help="multiply every set's file counts and sizes (default 1: full size)")
    p.add_argument("--runs", type=int, default=5, help="repetitions; the median is reported (default 5)")
    p.add_argument("--sets", default="small,large,batch", help="comma-separated (default all)")
    p.add_argument("--rows", default=None,
                   help="comma-separated row keys (default all): dkr-btrfs, dkr-overlay, dkr-dir, "
                        "podman-btrfs, podman-overlay, skopeo-umoci, curl-null, floor")
    p.add_argument("--scaling", default="dkr-btrfs,floor",
                   help="rows to run on the 1..10-image and 1..8-layer subsets ('' for none)")
    p.add_argument("--scaling-runs", type=int, default=None, help="default: --runs")
    p.add_argument("--no-verify", action="store_true", help="skip the tree check against umoci")
    p.add_argument("--quiet-wait", type=float, default=30.0, metavar="SECONDS",
                   help="before each measurement wait up to this long for the rest of the "
                        "machine to go idle (0: don't wait; default 30)")
    p.add_argument("--quiet-threshold", type=float, default=0.2, metavar="CORES",
                   help="'idle' means other processes use less than this many cores (default 0.2)")
    p.add_argument("--dkr", default=default_dkr, help=f"dkr executable (default {default_dkr})")
    p.add_argument("--dkr-rev", metavar="REV",
                   help="benchmark this git revision of dkr, installed once into a venv of its "
                        "own under --cache (the default venv's dkr is an editable install: it "
                        "runs whatever is on disk, which may change during a run)")
    p.add_argument("--cache", default="/var/tmp/dkr-bench-cache",
                   help="where generated layers are kept between runs")
    p.add_argument("--workdir", default="/var/tmp", help="where loop images and the registry live")
    p.add_argument("--results", default=str(HERE / "results"))
    p.add_argument("--label", default=None,
                   help="names the docs/bench.md section this run replaces (default 'scale=S', "
                        "with --link 'scale=S link=RATE')")
    p.add_argument("--link", metavar="RATE[,RATE...]", default=None,
                   help="serve the registry from a network namespace behind a veth pair shaped "
                        "with tbf to RATE each way (tc's syntax, e.g. 100mbit,400mbit,1gbit), "
                        "instead of loopback; every rate is a run of its own, with its own "
                        "results and docs/bench.md section; images are pushed before shaping")
    p.add_argument("--docs", default=str(REPO / "docs" / "bench.md"),
                   help="Markdown file whose results section is updated ('' for none)")
    args = p.parse_args(argv)
    if args.runs < 1 or args.scale <= 0:
        p.error("--runs must be at least 1 and --scale positive")
    return args


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv=None) -> int:
    args = parse_args(argv)
    # Clean up (loop mounts, the registry) on SIGTERM, and on SIGINT even when
    # started in the background with SIGINT ignored.
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    if os.geteuid() != 0:
        print("bench/run.py: needs root (loop mounts, podman's and dkr's storage)", file=sys.stderr)
        return 2
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    outdir = Path(args.results) / stamp
    outdir.mkdir(parents=True, exist_ok=True)
    command = shlex.join(["bench/run.py", *(argv if argv is not None else sys.argv[1:])])
    frozen_commit = None
    if args.dkr_rev:
        import frozen
        args.dkr, frozen_commit = frozen.frozen_dkr(REPO, args.dkr_rev, Path(args.cache), log=log)
    all_rows = peers.all_rows(args.dkr)
    by_key = {r.key: r for r in all_rows}
    keys = args.rows.split(",") if args.rows else [r.key for r in all_rows]
    unknown = [k for k in keys if k not in by_key]
    scaling_keys = [k for k in args.scaling.split(",") if k]
    unknown += [k for k in scaling_keys if k not in by_key]
    if unknown:
        print(f"bench/run.py: unknown rows: {', '.join(unknown)}", file=sys.stderr)
        return 2
    rows = [by_key[k] for k in keys]
    set_names = [s for s in args.sets.split(",") if s]

    fingerprint = code_fingerprint()
    bsets = setmod.build_sets(Path(args.cache), args.scale, set_names, log=log)
    rates = args.link.split(",") if args.link else [None]
    with ExitStack() as stack:
        shaped = stack.enter_context(link.ShapedLink()) if args.link else None
        registry = Registry(workdir=args.workdir, log_level="warn", link=shaped)
        stack.callback(registry.stop)
        setmod.push_sets(registry, bsets, log=log)
        for rate in rates:
            if shaped:
                shaped.shape(rate)
                log(f"registry at {registry.host}, behind a link of {rate} each way")
            run_stamp = stamp + (f"-{rate}" if len(rates) > 1 else "")
            data = _new_data(args, command, rate, frozen_commit, fingerprint)
            _measure_sets(args, Bench(args, rows, registry, outdir / (rate or "")), data, bsets,
                          set_names, rows, [by_key[k] for k in scaling_keys])
            if not frozen_commit and code_fingerprint() != fingerprint:
                data["warning"] = (f"dkr's code changed on disk during this run (now "
                                   f"{_dkr_version()}, code {code_fingerprint()}): later rows "
                                   "ran newer code")
                log("WARNING: " + data["warning"])
            _write_results(args, data, outdir.parent, run_stamp)
    return 0


def _new_data(args, command: str, rate: str | None, frozen_commit, fingerprint) -> dict:
    data = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "command": command, "scale": args.scale, "runs": args.runs,
            "label": args.label or f"scale={args.scale:g}" + (f" link={rate}" if rate else ""),
            "link": rate, "machine": machine_facts(), "tools": tool_versions(), "sets": {},
            "results": {}, "scaling": {}}
    if frozen_commit:
        data["machine"]["dkr"] = f"{frozen_commit[:12]} (frozen install of --dkr-rev {args.dkr_rev})"
    else:
        data["machine"]["dkr"] += f" (code {fingerprint})"
    log(f"machine: {data['machine']}; tools: {data['tools']}")
    return data


def _measure_sets(args, bench, data: dict, bsets: dict, set_names: list, rows: list,
                  srows: list) -> None:
    started = time.monotonic()
    for name in set_names:
        bset = bsets[name]
        data["sets"][name] = _set_facts(bset)
        data["results"][name] = bench.run_group(name, bset, rows, args.runs, not args.no_verify)
    if srows:
        sruns = args.scaling_runs or args.runs
        for name in ("batch", "large"):
            if name not in bsets:
                continue
            data["scaling"][name] = {}
            for label, sub in bsets[name].subsets.items():
                res = bench.run_group(f"{name}-scaling-{sub.name}", sub, srows, sruns, False)
                data["scaling"][name][label] = {"facts": _set_facts(sub), "results": res}
    data["elapsed_seconds"] = round(time.monotonic() - started, 1)


def _write_results(args, data: dict, results: Path, stamp: str) -> None:
    """bench/results/STAMP.{json,md,png}, and this label's section of docs/bench.md."""
    (results / f"{stamp}.json").write_text(json.dumps(data, indent=1))
    chart = report.chart(data, results / f"{stamp}.png")
    md = report.markdown(data, chart_note=chart)
    md_path = results / f"{stamp}.md"
    md_path.write_text(md)
    log(f"wrote {md_path} (+ .json)")
    if args.docs:
        chart_copy = None
        if chart and Path(chart).exists():
            slug = re.sub(r"[^A-Za-z0-9.]+", "-", data["label"]).strip("-")
            # (the project's charts live in bench/; a side run's beside its own docs file)
            project_docs = Path(args.docs).resolve() == (REPO / "docs" / "bench.md").resolve()
            chart_copy = (HERE if project_docs else Path(args.docs).parent) / f"chart-{slug}.png"
            shutil.copy(chart, chart_copy)
        report.update_docs(Path(args.docs), data, chart_copy)
        log(f"updated {args.docs}")
    print(md)


def _set_facts(bset) -> dict:
    return {"images": len(bset.images), "layers": bset.n_layers,
            "layers_per_image": [len(i.layers) for i in bset.images],
            "gz_mb": round(bset.gz_bytes / MB, 1), "tar_mb": round(bset.tar_bytes / MB, 1),
            "files": bset.n_files, "description": bset.description}


if __name__ == "__main__":
    sys.exit(main())
