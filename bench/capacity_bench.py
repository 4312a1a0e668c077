#!/usr/bin/env python3
"""Does `resolver bench capacity` find a limit the kernel enforces? Within 5 %?

    sudo python3 bench/capacity_bench.py [--limit 500] [--out DIR] [--fine-step 10]

- As root it creates a network namespace `capacity-<pid>`, brings `lo` up, re-executes itself
  inside with `ip netns exec` and deletes the namespace at the end, also on Ctrl-C, SIGTERM or
  an error. All traffic stays on loopback inside it.
- knotd (`resolver.bench.authority.Knot`, one UDP worker) serves the mail zones on
  127.0.0.2:53. An nftables rule drops packets to that address and port above N per second:
  `limit rate over N/second burst 5 packets drop`. Named counters before and after the rule
  count what was offered to knotd and what the kernel let through.
- Then `python -m resolver bench capacity --target 127.0.0.2:53` runs twice: a coarse ramp
  (100, 200, ... 2000 pps) to find the region, then a fine ramp (``--fine-step`` pps, default
  10) from one coarse step below the coarse knee up to it. The figure is the fine knee: the
  first step losing more than 1 % of its queries, compared with N. The resolution of the
  answer is the fine step, stated next to the error.

Output: the tool's own CSV/JSON/PNG under OUT/coarse and OUT/fine, OUT/capacity_bench.json
(both ramps, the kernel counters, the verdict), a RESULTS.md section in OUT/capacity_bench.md,
and, with ``--figure PATH`` (default bench/figures/capacity.png), copies of the coarse ramp's
PNG there and of the fine ramp's next to it (``capacity-fine.png``) when under 100 kB each.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # resolver.bench.harness is standard library only: any Python
from resolver.bench import harness  # noqa: E402

VENV_PYTHON = REPO / ".venv" / "bin" / "python"
NETNS_ENV = "RESOLVER_CAPACITY_NETNS"
KNOT_ADDRESS = "127.0.0.2"
KNOT_PORT = 53
NFT_TABLE = "capacity_bench"
LIMIT_BURST_PACKETS = 5  # small, so the limit is a rate and not a rate plus a large bucket
TARGET_ERROR = 0.05  # the target: the knee within 5 % of N
COARSE = {"start": 100, "step": 100, "max": 2000}
FIGURE_MAX_BYTES = 100_000


log = harness.make_log("capacity-bench")


class Nft:
    """The kernel limit on knotd's port, with counters of offered and passed packets."""

    def __init__(self, limit_pps: int) -> None:
        match = f"ip daddr {KNOT_ADDRESS} udp dport {KNOT_PORT}"
        ruleset = f"""
table inet {NFT_TABLE} {{
    counter offered {{ }}
    counter passed {{ }}
    chain input {{
        type filter hook input priority 0; policy accept;
        {match} counter name "offered"
        {match} limit rate over {limit_pps}/second burst {LIMIT_BURST_PACKETS} packets drop
        {match} counter name "passed"
    }}
}}
"""
        harness.nft_load(ruleset)
        self.ruleset = " ".join(line.strip() for line in ruleset.splitlines() if line.strip())

    def read(self) -> dict[str, int]:
        out = subprocess.run(["nft", "-j", "list", "counters", "table", "inet", NFT_TABLE],
                             check=True, capture_output=True).stdout
        return harness.parse_nft_counters(out)

    @staticmethod
    def close() -> None:
        harness.nft_delete_table(NFT_TABLE)


def ramp(python: str, out: Path, start: float, step: float, maximum: float,
         step_seconds: float) -> tuple[list[str], dict[str, Any]]:
    """One `resolver bench capacity` run; its command line and its capacity.json."""
    argv = [python, "-m", "resolver", "bench", "capacity", "--target",
            f"{KNOT_ADDRESS}:{KNOT_PORT}", "--start", f"{start:g}", "--step", f"{step:g}",
            "--max", f"{maximum:g}", "--step-seconds", f"{step_seconds:g}", "--out", str(out)]
    log("run: " + shlex.join(argv))
    subprocess.run(argv, check=True, cwd=REPO, timeout=300)
    return argv, json.loads((out / "capacity.json").read_text())


def machine() -> dict[str, Any]:
    return {"kernel": platform.release(), "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "loadavg": harness.loadavg()}


def section(report: dict[str, Any]) -> str:
    """The RESULTS.md section: command, figures, verdict."""
    fine = report["fine"]["result"]
    lines = [
        "## Capacity ramp against a kernel-enforced limit (`bench/capacity_bench.py`)",
        "",
        f"{report['date']}, {report['machine']['cpus']} CPUs, kernel "
        f"{report['machine']['kernel']}; command `{report['command']}`.",
        "",
        f"knotd on {KNOT_ADDRESS}:{KNOT_PORT} in a fresh network namespace behind "
        f"`limit rate over {report['limit_pps']}/second burst {LIMIT_BURST_PACKETS} packets "
        "drop`; `resolver bench capacity` (mail workload, loss threshold 1 %, p99 bound "
        "100 ms) ramped toward it twice:",
        "",
        "| ramp | steps (pps) | knee (pps) | last good (pps) | max answered (pps) |",
        "|---|---|---|---|---|",
    ]
    for name in ("coarse", "fine"):
        result = report[name]["result"]
        rates = [s["target_pps"] for s in result["steps"]]
        lines.append(f"| {name} | {rates[0]:g}..{rates[-1]:g} by {report[name]['step']:g} | "
                     f"{result['knee_pps']} | {result['last_good_pps']} | "
                     f"{result['max_answered_pps']} |")
    lines += [
        "",
        "Fine ramp, per step:",
        "",
        "| target | offered | answered | loss | p50 ms | p99 ms |",
        "|---|---|---|---|---|---|",
    ]
    lines += [f"| {s['target_pps']:g} | {s['offered_pps']:g} | {s['answered_pps']:g} | "
              f"{s['loss']:.4f} | {s['p50_ms']} | {s['p99_ms']} |" for s in fine["steps"]]
    verdict = report["verdict"]
    lines += [
        "",
        f"**Knee {verdict['knee_pps']} pps against N = {report['limit_pps']}: error "
        f"{verdict['error_pct']} % (target: within {TARGET_ERROR * 100:g} %; step resolution "
        f"{report['fine']['step']:g} pps = {verdict['resolution_pct']} % of N): "
        f"{'met' if verdict['met'] else 'NOT met'}.** The knee is the first rate that lost more "
        "than 1 %, so it sits one fine step above N at best; the answered rate at saturation "
        f"({fine['max_answered_pps']} pps) is the kernel's rate itself. nftables counted "
        f"{report['nft']['offered']} packets offered to knotd and {report['nft']['passed']} "
        "let through over both ramps.",
    ]
    for path in report.get("figures", []):
        relative = Path(path).relative_to(REPO / "bench")
        lines += ["", f"Plot: [bench/{relative}]({relative})"]
    return "\n".join(lines) + "\n"


def copy_figures(out: Path, figure: Path) -> list[str]:
    """The coarse ramp's PNG to FIGURE and the fine one's next to it (``-fine``), if small."""
    copied = []
    for ramp_name, destination in (("coarse", figure),
                                   ("fine", figure.with_stem(figure.stem + "-fine"))):
        png = out / ramp_name / "capacity.png"
        if png.exists() and png.stat().st_size < FIGURE_MAX_BYTES:
            destination.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(png, destination)
            copied.append(str(destination.resolve()))
    return copied


def bench(args: argparse.Namespace, python: str) -> int:
    from resolver.bench.authority import Knot, find_knotd

    if os.environ.get(NETNS_ENV) is None:
        raise SystemExit("capacity_bench.py needs root: it creates a network namespace and an "
                         "nftables limit (no userspace throttle is implemented)")
    if find_knotd() is None:
        raise SystemExit("knotd not found (Debian package: knot; `make deps` installs it)")
    args.out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": shlex.join(["sudo", "python3", "bench/capacity_bench.py", *sys.argv[1:]]),
        "limit_pps": args.limit, "machine": machine(),
    }

    harness.sigterm_as_interrupt()
    with contextlib.ExitStack() as stack:
        nft = Nft(args.limit)
        stack.callback(nft.close)
        report["nft_ruleset"] = nft.ruleset
        stack.enter_context(Knot(address=KNOT_ADDRESS, port=KNOT_PORT))
        log(f"knotd answering on {KNOT_ADDRESS}:{KNOT_PORT}, limit {args.limit}/s")
        argv, coarse = ramp(python, args.out / "coarse", COARSE["start"], COARSE["step"],
                            COARSE["max"], args.step_seconds)
        report["coarse"] = {"argv": argv, "step": COARSE["step"], "result": coarse}
        if coarse["knee_pps"] is None:
            raise SystemExit(f"no knee up to {COARSE['max']} pps: the limit is not working")
        fine_start = max(args.fine_step, coarse["knee_pps"] - COARSE["step"])
        argv, fine = ramp(python, args.out / "fine", fine_start, args.fine_step,
                          coarse["knee_pps"], args.step_seconds)
        report["fine"] = {"argv": argv, "step": args.fine_step, "result": fine}
        report["nft"] = nft.read()
    knee = fine["knee_pps"] if fine["knee_pps"] is not None else coarse["knee_pps"]
    error = (knee - args.limit) / args.limit
    report["verdict"] = {"knee_pps": knee, "error_pct": round(error * 100, 2),
                         "resolution_pct": round(args.fine_step / args.limit * 100, 2),
                         "met": abs(error) <= TARGET_ERROR}
    if args.figure:
        report["figures"] = copy_figures(args.out, args.figure)
    (args.out / "capacity_bench.json").write_text(json.dumps(report, indent=2) + "\n")
    text = section(report)
    (args.out / "capacity_bench.md").write_text(text)
    print(text)
    return 0 if report["verdict"]["met"] else 1


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--limit", type=int, default=500, help="N: the kernel limit, packets/s")
    parser.add_argument("--fine-step", type=float, default=10.0, help="pps per fine step")
    parser.add_argument("--step-seconds", type=float, default=2.0)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "capacity")
    parser.add_argument("--figure", type=Path, default=REPO / "bench" / "figures" /
                        "capacity.png", help="copy the fine ramp's PNG here ('' for none)")
    args = parser.parse_args(argv)
    if args.figure is not None and str(args.figure) in ("", "."):
        args.figure = None
    return args


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    python = harness.venv_python(VENV_PYTHON)
    if os.geteuid() == 0 and NETNS_ENV not in os.environ:
        if shutil.which("nft") is None:
            raise SystemExit("nft is not available: this benchmark needs nftables")
        # SIGINT and SIGTERM both passed on to the child.
        return harness.run_in_namespace(
            Path(__file__), argv, python, namespace=f"capacity-{os.getpid()}", env_var=NETNS_ENV,
            log=log, forward_signals=(signal.SIGINT, signal.SIGTERM))
    harness.reexec_in_venv(Path(__file__), argv, VENV_PYTHON)
    try:
        return bench(args, python)
    except KeyboardInterrupt:
        log("interrupted: knotd stopped, nftables table deleted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
