"""Check the fleet model (resolver/bench/plan.py, docs/fleet-model.md) against a measured run.

knotd serves the mail zones (``--domains`` domains), the resolver forwards to it with its
metrics endpoint on, and the mail workload is replayed open loop at ``--rate`` queries/s for
``--duration`` seconds from a cold cache. Every ``--window`` seconds the resolver's
``resolver_upstream_packets_sent_total`` is read; the model predicts the same windows with its
cold-start term (``plan.expected_misses``: the expected misses of each key over ``[0, t]``),
at ``messages/s = rate / queries per message`` of the mix, the TTLs of ``authority`` and an
overhead factor of 1.0 (loopback: no loss, and no mail-mix answer is truncated).

    .venv/bin/python bench/fleet_check.py            # --rate 1000 --duration 60 --domains 20000

Prints a table and writes ``--out`` (JSON). Exit status 1 if the whole-run prediction is off
by more than 15 %. Loopback only; knotd and the resolver are children stopped by their PIDs.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path

import trio

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from resolver.bench import authority, harness, loadgen, plan, sidecar, workload  # noqa: E402

TARGET_ERROR = 0.15  # issue 5: predicted upstream rate within 15 % of the measured one
READY_TIMEOUT_S = 15.0
SOCKETS = 8
ZIPF = workload.MailMix.zipf_exponent

log = harness.make_log("fleet")


async def replay(target: tuple[str, int], queries: list[tuple[str, str]], rate: float,
                 duration: float, window: float, metrics_url: str
                 ) -> tuple[loadgen.LoadResult, list[tuple[float, dict[str, float]]]]:
    """The open-loop replay, with the resolver's counters read every ``window`` seconds."""
    samples: list[tuple[float, dict[str, float]]] = []
    start = trio.current_time()
    samples.append((0.0, await trio.to_thread.run_sync(sidecar.scrape_metrics, metrics_url)))
    # The first sample's time is reset to 0 below: nothing was sent before the load started.

    async def scraper() -> None:
        k = 1
        while k * window <= duration + 1e-9:
            await trio.sleep_until(start + k * window)
            counters = await trio.to_thread.run_sync(sidecar.scrape_metrics, metrics_url)
            samples.append((trio.current_time() - start, counters))
            k += 1

    async with trio.open_nursery() as nursery:
        nursery.start_soon(scraper)
        result = await loadgen.run_load(target, queries, rate, duration, timeout_s=2.0,
                                        sockets=SOCKETS)
        # run_load renders the queries before its clock starts (a second or two for 60k
        # queries): put the samples on the load's own time axis.
        offset = (trio.current_time() - start) - result.wall_time_s
    return result, [(t - offset, counters) for t, counters in samples]


def predicted_misses(model: plan.Workload, messages_per_second: float, t: float) -> float:
    """Expected upstream queries in ``[0, t]`` from a cold cache."""
    if t <= 0:
        return 0.0
    return sum(model.misses_per_second(messages_per_second, horizon_seconds=t).values()) * t


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=1000.0, help="client queries/s")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of replay")
    parser.add_argument("--domains", type=int, default=20000)
    parser.add_argument("--window", type=float, default=10.0, help="seconds per window")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path, default=REPO / "bench/out/fleet_check.json")
    args = parser.parse_args(argv)

    mix = workload.MailMix(n_domains=args.domains)
    model = plan.build_workload(args.domains, ZIPF, None, None, mix)
    messages_per_second = args.rate / model.queries_per_message
    queries = workload.queries(mix, args.seed, loadgen.scheduled_count(args.rate, args.duration))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    logs = args.out.parent

    with authority.Knot(n_domains=args.domains) as knot:
        log(f"knotd pid {knot.pid} on {knot.address}:{knot.port}, {args.domains} domains")
        port, metrics_port = harness.free_port(), harness.free_port()
        resolver = harness.Process("resolver", [
            sys.executable, "-m", "resolver", "serve", "--listen", f"127.0.0.1:{port}",
            "--upstream", f"127.0.0.1:{knot.port}", "--metrics", f"127.0.0.1:{metrics_port}",
        ], logs / "fleet_check-resolver.log", log=log)
        try:
            harness.wait_answering(resolver, "127.0.0.1", port, "ready-probe.test.",
                                   timeout_seconds=READY_TIMEOUT_S, retry_seconds=0.1)
            metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
            log(f"replaying {len(queries)} queries at {args.rate:g} q/s for {args.duration:g} s")
            started = time.time()
            result, samples = trio.run(functools.partial(
                replay, ("127.0.0.1", port), queries, args.rate, args.duration, args.window,
                metrics_url))
            final = sidecar.scrape_metrics(metrics_url)
        finally:
            resolver.stop()

    base = samples[0][1]
    samples = [(0.0, base), *((t, c) for t, c in samples[1:] if t > 0)]
    rows = []
    previous_t, previous_packets, previous_predicted = 0.0, 0.0, 0.0
    for t, counters in samples[1:]:
        packets = counters[sidecar.METRIC_UPSTREAM_PACKETS] - base[sidecar.METRIC_UPSTREAM_PACKETS]
        predicted = predicted_misses(model, messages_per_second, t)
        span = t - previous_t
        rows.append({
            "t_end_s": round(t, 3),
            "measured_pps": (packets - previous_packets) / span,
            "predicted_pps": (predicted - previous_predicted) / span,
        })
        previous_t, previous_packets, previous_predicted = t, packets, predicted
    measured_total = final[sidecar.METRIC_UPSTREAM_PACKETS] - base[sidecar.METRIC_UPSTREAM_PACKETS]
    predicted_total = predicted_misses(model, messages_per_second, args.duration)
    error = predicted_total / measured_total - 1.0 if measured_total else float("inf")
    steady = plan.predict(plan.PlanInput(messages_per_second, model, overhead_factor=1.0))
    hits = final[sidecar.METRIC_HITS] - base[sidecar.METRIC_HITS]
    misses = final[sidecar.METRIC_MISSES] - base[sidecar.METRIC_MISSES]
    report = {
        "command": "bench/fleet_check.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "started_unix": started, "rate_qps": args.rate, "duration_s": args.duration,
        "domains": args.domains, "zipf": ZIPF, "seed": args.seed,
        "queries_per_message": model.queries_per_message,
        "messages_per_second": messages_per_second,
        "client": {"sent": result.sent, "answered": result.answered, "timeouts": result.timeouts,
                   "rcodes": result.rcodes, "p50_ms": (result.latency_p50_s or 0) * 1000,
                   "p99_ms": (result.latency_p99_s or 0) * 1000,
                   "max_schedule_lag_s": result.max_schedule_lag_s},
        "measured": {"upstream_packets": measured_total,
                     "upstream_pps": measured_total / args.duration,
                     "hit_ratio": hits / (hits + misses) if hits + misses else None,
                     "trace_hit_ratio": sidecar.trace_hit_ratio(queries)},
        "predicted": {"upstream_packets": predicted_total,
                      "upstream_pps": predicted_total / args.duration,
                      "hit_ratio": 1 - predicted_total / max(1, result.sent)},
        "relative_error": error,
        "steady_state_prediction": {"upstream_pps": steady.upstream_packets_per_second,
                                    "hit_ratio": steady.hit_ratio},
        "windows": rows,
        "machine": {"cpu": harness.cpu_model(), "loadavg": harness.loadavg(),
                    "git": harness.git_state(REPO)},
    }
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"{'window end s':>12} {'measured pps':>13} {'predicted pps':>14} {'error':>7}")
    for row in rows:
        row_error = row["predicted_pps"] / row["measured_pps"] - 1 if row["measured_pps"] else 0
        print(f"{row['t_end_s']:12.1f} {row['measured_pps']:13.1f} {row['predicted_pps']:14.1f} "
              f"{row_error:+7.1%}")
    print(f"whole run: measured {measured_total:.0f} upstream packets "
          f"({measured_total / args.duration:.1f}/s), predicted {predicted_total:.0f} "
          f"({predicted_total / args.duration:.1f}/s): {error:+.1%}")
    print(f"client: sent {result.sent}, answered {result.answered}, p50 "
          f"{report['client']['p50_ms']:.2f} ms, p99 {report['client']['p99_ms']:.2f} ms; "
          f"measured hit ratio {report['measured']['hit_ratio']:.4f}")
    print(f"steady state (not reached in this run): {steady.upstream_packets_per_second:.1f} "
          f"pps, hit ratio {steady.hit_ratio:.4f}")
    print(f"wrote {args.out}")
    return 0 if abs(error) <= TARGET_ERROR else 1


if __name__ == "__main__":
    sys.exit(main())
