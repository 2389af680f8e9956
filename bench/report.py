"""Markdown tables, the PNG chart and the docs/bench.md update for run.py."""

from __future__ import annotations

import re
from pathlib import Path

ORDER = ["dkr-btrfs", "dkr-overlay", "dkr-dir", "podman-btrfs", "podman-overlay",
         "skopeo-umoci", "curl-null", "floor"]
DKR = ["dkr-btrfs", "dkr-overlay", "dkr-dir"]
PEERS = [("podman-btrfs", "podman (btrfs)"), ("podman-overlay", "podman (overlay)"),
         ("skopeo-umoci", "skopeo+umoci"), ("floor", "floor"), ("curl-null", "curl > /dev/null")]
RSS_TARGET_MB = 150


def _md(text) -> str:
    """Text for a Markdown table cell."""
    return str(text).replace("|", "\\|")


def _f(x, fmt="{:.2f}", none="–"):
    return none if x is None else fmt.format(x)


def _median(results, key):
    r = results.get(key)
    return None if r is None else r.get("median")


def _ratio(a, b):
    return None if a is None or b is None or b == 0 else a / b


def _status(res) -> str:
    if res.get("missing"):
        return f"missing: {res['missing']}"
    if res.get("median") is None:
        errs = [x["error"] for x in res["runs"] if not x["ok"]]
        return f"failed: {errs[0] if errs else 'no run'}"
    return ""


def _rss(res) -> str:
    peak = res.get("peak_rss_mb") or {}
    tree = res.get("peak_tree_pss_mb", res.get("peak_tree_rss_mb"))
    if res["kind"] == "dkr":
        return (f"{_f(peak.get('main'), '{:.0f}')} / {_f(peak.get('extractor'), '{:.0f}')}"
                f" / {_f(tree, '{:.0f}')}")
    return f"{_f(peak.get('main'), '{:.0f}')} / – / {_f(tree, '{:.0f}')}"


def set_table(name, facts, results) -> list[str]:
    out = [f"### {name}: {facts['images']} image(s), {facts['layers']} unique layers, "
           f"{facts['gz_mb']:.0f} MB gz, {facts['tar_mb']:.0f} MB tar, ~{facts['files']} files",
           "",
           "| row | median s | runs (s) | gz MB/s | tar MB/s | dkr (btrfs) ÷ row "
           "| CPU s | others' load | peak MB: main / extractor (RSS) / tree (PSS) | tree vs umoci |",
           "|---|---:|---|---:|---:|---:|---:|---:|---|---|"]
    base = _median(results, "dkr-btrfs")
    for key in ORDER:
        res = results.get(key)
        if res is None:
            continue
        status = _status(res)
        med = res.get("median")
        runs = ", ".join(_f(x["seconds"]) + ("" if x["ok"] else "✗") for x in res["runs"])
        if status and med is None:
            out.append(f"| {_md(res['label'])} | {_md(status)} | {runs} | | | | | | | |")
            continue
        gz = facts["gz_mb"] / med if med else None
        tar = facts["tar_mb"] / med if med else None
        ratio = _ratio(base, med)
        out.append(f"| {_md(res['label'])} | {_f(med)} | {runs} | {_f(gz, '{:.0f}')} | "
                   f"{_f(tar, '{:.0f}')} | {_f(ratio)} | {_f(res.get('median_cpu'), '{:.1f}')} | "
                   f"{_f(res.get('max_other_cores'), '{:.2f}')} | {_rss(res)} | "
                   f"{_md(res.get('verify', ''))}{_md(' — ' + status) if status else ''} |")
    return out


def ratio_table(data) -> list[str]:
    out = ["### dkr ÷ each peer (median seconds; below 1 dkr is faster)", "",
           "| dkr backend | set | " + " | ".join(f"÷ {label}" for _, label in PEERS) + " |",
           "|---|---|" + "---:|" * len(PEERS)]
    for key in DKR:
        for name, results in data["results"].items():
            mine = _median(results, key)
            if key not in results:
                continue
            cells = [_f(_ratio(mine, _median(results, p))) for p, _ in PEERS]
            out.append(f"| {_md(results[key]['label'])} | {name} | " + " | ".join(cells) + " |")
    return out


def target_table(data) -> list[str]:
    names = list(data["results"])
    out = ["### Targets (dkr on btrfs)", "",
           "| target | " + " | ".join(names) + " | met? |",
           "|---|" + "---:|" * len(names) + "---|"]

    def row(label, values, ok, fmt="{:.2f}"):
        cells, verdicts = [], []
        for v in values:
            if v is None:
                cells.append("–")
                verdicts.append(None)
            else:
                cells.append(fmt.format(v) + (" ✓" if ok(v) else " ✗"))
                verdicts.append(ok(v))
        known = [x for x in verdicts if x is not None]
        met = "yes" if known and all(known) and len(known) == len(verdicts) else \
            "no" if any(x is False for x in known) else "unknown"
        out.append(f"| {label} | " + " | ".join(cells) + f" | {met} |")

    res = data["results"]

    def ratio_row(label, peer, bound):
        row(f"dkr ÷ {label} ≤ {bound:.2f}",
            [_ratio(_median(res[n], "dkr-btrfs"), _median(res[n], peer)) for n in names],
            lambda v: v <= bound)
    rate = _bits_per_second(data.get("link"))
    if rate is not None and rate < 1e9:
        # On a link the network is the limit: dkr is to keep up with it.
        ratio_row("the link's time (parallel curl > /dev/null)", "curl-null", 1.05)
        ratio_row("floor", "floor", 1.00)
        if rate >= 400e6:
            ratio_row("podman (btrfs)", "podman-btrfs", 0.55)
        row("dkr's spool writes ≤ half of the blobs' bytes",
            [_spooled_share(res[n]) for n in names], lambda v: v <= 0.5, "{:.0%}")
    else:
        ratio_row("podman (btrfs)", "podman-btrfs", 0.40)
        ratio_row("skopeo+umoci", "skopeo-umoci", 0.33)
        ratio_row("floor", "floor", 1.25 if rate is None else 1.10)
    row(f"dkr peak RSS, main process < {RSS_TARGET_MB} MB",
        [(res[n].get("dkr-btrfs") or {}).get("peak_rss_mb", {}).get("main") for n in names],
        lambda v: v < RSS_TARGET_MB, "{:.0f} MB")
    row(f"dkr peak memory, whole tree (PSS, sampled) < {RSS_TARGET_MB} MB",
        [(res[n].get("dkr-btrfs") or {}).get("peak_tree_pss_mb",
                                             (res[n].get("dkr-btrfs") or {}).get("peak_tree_rss_mb"))
         for n in names],
        lambda v: v < RSS_TARGET_MB, "{:.0f} MB")
    return out


def _bits_per_second(rate: str | None) -> float | None:
    """tc's rate (``400mbit``, ``1gbit``) in bits per second."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([kmg]?)bit", (rate or "").lower())
    if not match:
        return None
    return float(match[1]) * {"": 1, "k": 1e3, "m": 1e6, "g": 1e9}[match[2]]


def _spooled_share(results) -> float | None:
    """The median run's share of the blobs' bytes that dkr (btrfs) wrote to its spool."""
    shares = []
    for run in (results.get("dkr-btrfs") or {}).get("runs", []):
        total = re.search(r"([\d.]+) MB compressed", run.get("stats") or "")
        spooled = re.search(r"spool +([\d.]+) MB", run.get("stats") or "")
        if run.get("ok") and total and spooled and float(total[1]):
            shares.append(float(spooled[1]) / float(total[1]))
    return sorted(shares)[len(shares) // 2] if shares else None


def scaling_tables(data) -> list[str]:
    out = []
    for name, points in data.get("scaling", {}).items():
        what = "images" if name == "batch" else "layers"
        keys = []
        for p in points.values():
            for k in p["results"]:
                if k not in keys:
                    keys.append(k)
        labels = {k: next(iter(points.values()))["results"][k]["label"] for k in keys}
        out += [f"### Scaling: 1 → {len(points) and list(points)[-1]} ({name} set)", "",
                f"| {what} | gz MB | tar MB | " + " | ".join(f"{_md(labels[k])} s" for k in keys)
                + " | dkr ÷ floor | dkr s per MB gz (ms) |",
                "|---|---:|---:|" + "---:|" * len(keys) + "---:|---:|"]
        for label, p in points.items():
            f, r = p["facts"], p["results"]
            cells = [_f(_median(r, k)) if _median(r, k) is not None else _md(_status(r[k]))
                     for k in keys]
            dkr = _median(r, "dkr-btrfs")
            per = dkr / f["gz_mb"] * 1000 if dkr and f["gz_mb"] else None
            out.append(f"| {label} | {f['gz_mb']:.0f} | {f['tar_mb']:.0f} | " + " | ".join(cells)
                       + f" | {_f(_ratio(dkr, _median(r, 'floor')))} | {_f(per, '{:.0f}')} |")
        out.append("")
    return out


def stats_blocks(data) -> list[str]:
    out = ["### dkr --stats of the median run", ""]
    for name, results in data["results"].items():
        for key in DKR:
            res = results.get(key)
            if res and res.get("stats_of_median_run"):
                out += [f"{name}, {res['label']}:", "", "```", res["stats_of_median_run"], "```", ""]
    return out


def markdown(data, chart_note=None, heading="##") -> str:
    m = data["machine"]
    tools = ", ".join(f"{k} {v}" for k, v in data["tools"].items())
    link = f", registry behind a {data['link']} link (tbf)" if data.get("link") else ""
    lines = [f"{heading} Results at scale {data['scale']:g}, {data['runs']} run(s){link} — "
             f"{data['date']}", "",
             f"- Machine: {m['cores']} cores ({m['cpu']}), {m['memory_gib']} GiB RAM, "
             f"Linux {m['kernel']}, Python {m['python']}; dkr {m.get('dkr', '?')}.",
             f"- Tools: {tools}.",
             f"- Command: `bench/install.sh && .venv/bin/python {data['command']}` "
             f"({data.get('elapsed_seconds', 0) / 60:.1f} min in all).",
             "- Every measurement pulls into a fresh loop-mounted btrfs; page cache not dropped "
             "(registry blobs warm). Peak RSS is the max over the runs; 'main' is the process "
             "the row started (dkr's CLI process), 'extractor' the largest single "
             "`dkr.extract` child, 'tree' the sampled sum of PSS over all processes of the row "
             "(a page shared by N processes counts 1/N in each; the plain RSS sum is in the JSON). "
             "'CPU s' is the median user+sys CPU time of the row's processes; "
             "'others' load' the most cores that the rest of the machine (other "
             "sessions, kernel threads such as btrfs/loop writeback; not the registry) "
             "used during any of the row's runs.", ""]
    if data.get("warning"):
        lines += [f"- **Warning**: {data['warning']}.", ""]
    missing = sorted({res["label"] + ": " + res["missing"] for results in data["results"].values()
                      for res in results.values() if res.get("missing")})
    if missing:
        lines += ["- **Missing peers** (reported, not measured): " + "; ".join(missing) + ".", ""]
    failed = sorted({f"{name}/{res['label']}: {x['error']}" for name, results in data["results"].items()
                     for res in results.values() for x in res["runs"] if not x["ok"]})
    if failed:
        lines += ["- **Failed runs**: " + "; ".join(failed) + ".", ""]
    for name, results in data["results"].items():
        lines += set_table(name, data["sets"][name], results) + [""]
    lines += ratio_table(data) + [""]
    lines += target_table(data) + [""]
    lines += scaling_tables(data)
    if chart_note:
        lines += [f"Chart: `{chart_note}`.", ""]
    else:
        lines += ["Chart: skipped (matplotlib is not installed; bench/install.sh installs it).", ""]
    lines += stats_blocks(data)
    return "\n".join(lines).rstrip() + "\n"


def chart(data, path: Path):
    """A PNG: median seconds per row and set, and the scaling curves. None if no matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    names = list(data["results"])
    scal = list(data.get("scaling", {}).items())
    ncols = max(len(names), len(scal), 1)
    nrows = 2 if scal else 1
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.6 * ncols, 4.0 * nrows), squeeze=False)
    for ax in axes.flat[len(names):ncols]:
        ax.set_visible(False)
    if scal:
        for ax in axes[1][len(scal):]:
            ax.set_visible(False)
    colors = {"dkr": "#1f77b4", "peer": "#d62728", "limit": "#7f7f7f"}
    for ax, name in zip(axes[0], names):
        results = data["results"][name]
        keys = [k for k in ORDER if k in results and results[k].get("median") is not None]
        vals = [results[k]["median"] for k in keys]
        ax.barh(range(len(keys)), vals, color=[colors[results[k]["kind"]] for k in keys])
        ax.set_yticks(range(len(keys)), [results[k]["label"].replace("floor: ", "floor\n")
                                         .replace("limit: ", "") for k in keys], fontsize=7)
        ax.invert_yaxis()
        for i, v in enumerate(vals):
            ax.text(v, i, f" {v:.1f}", va="center", fontsize=7)
        f = data["sets"][name]
        ax.set_title(f"{name}: {f['gz_mb']:.0f} MB gz, {f['tar_mb']:.0f} MB tar", fontsize=9)
        ax.set_xlabel("seconds (median)", fontsize=8)
        ax.set_xlim(0, max(vals or [1]) * 1.25)
    for ax, (name, points) in zip(axes[-1], scal):
        xs = [int(label.split()[0]) for label in points]
        keys = list(next(iter(points.values()))["results"])
        for k in keys:
            ys = [p["results"][k].get("median") for p in points.values()]
            label = next(iter(points.values()))["results"][k]["label"]
            ax.plot(xs, [y if y is not None else float("nan") for y in ys], marker="o", label=label)
        ax.set_xlabel("images" if name == "batch" else "layers", fontsize=8)
        ax.set_ylabel("seconds (median)", fontsize=8)
        ax.set_title(f"scaling ({name} set)", fontsize=9)
        ax.legend(fontsize=6)
        ax.set_ylim(bottom=0)
    fig.suptitle(f"dkr benchmark, scale {data['scale']:g}, {data['runs']} run(s), "
                 f"{data['machine']['cores']} cores — {data['date']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def update_docs(path: Path, data, chart_copy) -> None:
    """Replace (or append) the results section for this scale in docs/bench.md."""
    label = data.get("label") or f"scale={data['scale']:g}"
    begin, end = f"<!-- bench-results {label} begin -->", f"<!-- bench-results {label} end -->"
    note = None
    if chart_copy:
        rel = Path("..") / chart_copy.relative_to(path.resolve().parent.parent)
        note = str(rel)
    body = markdown(data, chart_note=None, heading="##")
    if note:
        body = body.replace("Chart: skipped (matplotlib is not installed; bench/install.sh installs it).",
                            f"![chart]({note})")
    section = f"{begin}\n{body}{end}\n"
    text = path.read_text() if path.exists() else "# dkr benchmark\n\n"
    if begin in text and end in text:
        text = re.sub(re.escape(begin) + ".*?" + re.escape(end) + "\n?",
                      lambda _: section, text, flags=re.S)
    else:
        text = text.rstrip() + "\n\n" + section
    path.write_text(text)
