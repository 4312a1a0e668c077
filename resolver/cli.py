"""The command line: `resolver serve` runs the daemon, `resolver query` asks like dig does.

This interface is stable: tests, benchmarks and operators depend on it (DESIGN.md 5).
"""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import click

from resolver import config as config_mod
from resolver.errors import ConfigError


def _ipv6_loopback() -> bool:
    """Whether [::1] exists here: the default listen set includes it only then."""
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


def _setup_logging(level: str, log_format: str = "text") -> None:
    from resolver.daemon import logs

    logs.setup(level, log_format, sys.stderr)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="resolver")
def main() -> None:
    """A caching, forwarding DNS resolver sidecar for mail servers."""


@main.command()
@click.option("--config", "config_path", type=click.Path(dir_okay=False),
              help="TOML config file; flags override its keys.")
@click.option("--listen", multiple=True, metavar="HOST:PORT",
              help="Answer on this address (UDP+TCP). Default 127.0.0.1:53 and [::1]:53.")
@click.option("--upstream", multiple=True, metavar="HOST:PORT",
              help="Primary upstream server. Default: the nameservers of /etc/resolv.conf.")
@click.option("--fallback", multiple=True, metavar="HOST:PORT",
              help="Fallback server, asked only after every primary failed.")
@click.option("--upstream-pps", type=int, metavar="N", help="Packets/s budget per upstream.")
@click.option("--metrics", metavar="HOST:PORT", help="Prometheus endpoint.")
@click.option("--control", metavar="PATH", help="Control socket path.")
@click.option("--log-format", type=click.Choice(["text", "json"]),
              help="Log lines as text (default) or one JSON object per line.")
@click.option("--workers", type=int, metavar="N",
              help="Serving processes sharing the listen addresses (1-64; default 1).")
@click.option("--worker-index", type=int, hidden=True)
def serve(config_path: str | None, listen: tuple[str, ...], upstream: tuple[str, ...],
          fallback: tuple[str, ...], upstream_pps: int | None, metrics: str | None,
          control: str | None, log_format: str | None, workers: int | None,
          worker_index: int | None) -> None:
    """Run the resolver in the foreground (SIGHUP reloads the config, SIGTERM stops)."""
    import functools
    import os

    import trio

    from resolver.daemon import service

    def read_config() -> config_mod.Config:
        # Called again on reload: the same file, then the same flags, as at start.
        cfg = config_mod.load(config_path) if config_path else config_mod.Config()
        cfg = config_mod.with_overrides(cfg, {
            "listen": list(listen), "upstream": list(upstream), "fallback": list(fallback),
            "upstream_pps": upstream_pps, "metrics": metrics, "control": control,
            "log_format": log_format, "workers": workers,
        })
        try:
            resolv_conf = config_mod.RESOLV_CONF.read_text()
        except OSError:
            resolv_conf = None
        return config_mod.finalize(cfg, resolv_conf, _ipv6_loopback(),
                                   os.environ.get("STATE_DIRECTORY"))

    try:
        cfg = read_config()
    except ConfigError as e:
        raise click.ClickException(str(e)) from None
    _setup_logging(cfg.log_level, cfg.log_format)
    if cfg.workers > 1 or worker_index is not None:  # docs/operations.md, Workers
        from resolver.daemon import control as control_mod
        from resolver.daemon import workers as workers_mod

        if worker_index is None:
            params = click.get_current_context().params
            sys.exit(workers_mod.Supervisor(cfg.workers, functools.partial(
                workers_mod.child_argv, params)).run())
        default_control = control_mod.default_path()

        def read_config_for_worker() -> config_mod.Config:
            return config_mod.for_worker(read_config(), worker_index, default_control)

        run = functools.partial(workers_mod.run_worker, read_config_for_worker(),
                                read_config_for_worker, os.getppid())
    else:
        run = functools.partial(service.run, cfg, reload_config=read_config)
    try:
        trio.run(run)
    except ConfigError as e:
        raise click.ClickException(str(e)) from None
    except KeyboardInterrupt:
        pass


@main.command()
@click.argument("name")
@click.argument("rdtype", default="A", metavar="[TYPE]")
@click.option("--server", default="127.0.0.1:53", metavar="HOST:PORT", show_default=True)
@click.option("--tcp", is_flag=True, help="Ask over TCP.")
@click.option("--timeout", default=5.0, show_default=True, help="Seconds to wait.")
def query(name: str, rdtype: str, server: str, tcp: bool, timeout: float) -> None:
    """Ask a server for NAME and print a dig-like answer with the time taken."""
    import dns.exception
    import dns.message
    import dns.query
    import dns.rdatatype

    try:
        endpoint = config_mod.parse_endpoint(server, key="--server")
        dns.rdatatype.from_text(rdtype)
    except ConfigError as e:
        raise click.ClickException(str(e)) from None
    except dns.rdatatype.UnknownRdatatype:
        raise click.ClickException(f"TYPE: unknown record type '{rdtype}'") from None
    request = dns.message.make_query(name, rdtype, use_edns=0, payload=1232)
    ask = dns.query.tcp if tcp else dns.query.udp
    started = time.monotonic()
    try:
        response = ask(request, endpoint.host, timeout=timeout, port=endpoint.port)
    except dns.exception.Timeout:
        raise click.ClickException(f"no answer from {endpoint} within {timeout:g} s") from None
    except OSError as e:
        raise click.ClickException(f"cannot reach {endpoint}: {e.strerror or e}") from None
    elapsed_ms = (time.monotonic() - started) * 1000
    click.echo(response.to_text())
    click.echo(f";; Query time: {elapsed_ms:.1f} msec")
    click.echo(f";; SERVER: {endpoint} ({'TCP' if tcp else 'UDP'})")
    click.echo(f";; MSG SIZE  rcvd: {len(response.to_wire())}")


# -- the control channel (resolver/daemon/control.py); docs/operations.md ---------------------
def _control_options(fn: Any) -> Any:
    return click.option("--control", "control_path", metavar="PATH",
                        help="Control socket. Default: /run/resolver/control.sock when "
                             "/run/resolver exists.")(fn)


def _json_option(fn: Any) -> Any:
    return click.option("--json", "as_json", is_flag=True, help="Print the reply as JSON.")(fn)


@contextlib.contextmanager
def _control_errors() -> Iterator[None]:
    """A missing daemon or a socket error becomes one line and exit 1, for every command."""
    from resolver.daemon import control

    try:
        yield
    except control.NotRunning as e:
        raise click.ClickException(
            f"no resolver is running with control socket {e.args[0]} (or --control is "
            "wrong)") from None
    except (OSError, ValueError) as e:
        raise click.ClickException(f"control socket: {e}") from None


def _ask(control_path: str | None, request: dict[str, Any]) -> dict[str, Any]:
    """One request over the control socket; a missing daemon or an error is one line, exit 1."""
    from resolver.daemon import control

    with _control_errors():
        reply = control.call(control.path_or_default(control_path), request)
    if "error" in reply:
        raise click.ClickException(reply["error"])
    return reply


def _show(reply: dict[str, Any], as_json: bool, render: Callable[[dict[str, Any]], str]) -> None:
    click.echo(json.dumps(reply, indent=2) if as_json else render(reply))


@main.command()
@_control_options
@_json_option
def stats(control_path: str | None, as_json: bool) -> None:
    """QPS, hit ratio, latency, upstream packets/s against budget, mode."""
    from resolver import control_text

    _show(_ask(control_path, {"command": "stats"}), as_json, control_text.stats)


@main.command()
@_control_options
@_json_option
def upstreams(control_path: str | None, as_json: bool) -> None:
    """Per upstream: role, state, budget and learned rate, sending, loss, RTT, transitions."""
    from resolver import control_text

    _show(_ask(control_path, {"command": "upstreams"}), as_json, control_text.upstreams)


@main.group()
def cache() -> None:
    """Look into, flush or dump the running resolver's cache."""


@cache.command()
@click.argument("name")
@click.argument("rdtype", required=False, metavar="[TYPE]")
@_control_options
@_json_option
def lookup(name: str, rdtype: str | None, control_path: str | None, as_json: bool) -> None:
    """Cached entries for NAME (of TYPE, or of every type)."""
    from resolver import control_text

    request: dict[str, Any] = {"command": "cache lookup", "name": name}
    if rdtype is not None:
        request["type"] = rdtype
    _show(_ask(control_path, request), as_json, control_text.lookup)


@cache.command()
@click.option("--name", metavar="NAME", help="Only this name (every type unless --type).")
@click.option("--type", "rdtype", metavar="TYPE", help="Only this type of --name.")
@click.option("--negative", is_flag=True, help="Only NXDOMAIN and NODATA entries.")
@_control_options
@_json_option
def flush(name: str | None, rdtype: str | None, negative: bool, control_path: str | None,
          as_json: bool) -> None:
    """Remove entries: all, a name, a name and type, and/or negative ones only."""
    from resolver import control_text

    if rdtype is not None and name is None:
        raise click.UsageError("--type needs --name")
    request: dict[str, Any] = {"command": "cache flush", "negative": negative}
    if name is not None:
        request["name"] = name
    if rdtype is not None:
        request["type"] = rdtype
    _show(_ask(control_path, request), as_json, control_text.flush)


@cache.command()
@_control_options
@_json_option
def dump(control_path: str | None, as_json: bool) -> None:
    """Every cached entry, streamed (JSON: one object per line, then {"end": true})."""
    from resolver import control_text
    from resolver.daemon import control

    with _control_errors():
        path = control.path_or_default(control_path)
        for item in control.stream(path, {"command": "cache dump"}):
            if "error" in item:
                raise click.ClickException(item["error"])
            if as_json:
                click.echo(json.dumps(item))
            elif "end" in item:
                click.echo(f";; {item['count']} entries")
            else:
                click.echo(control_text.entry(item))


@main.command()
@click.argument("target", type=click.Choice(["primary", "fallback", "auto"]))
@_control_options
@_json_option
def repoint(target: str, control_path: str | None, as_json: bool) -> None:
    """Pin routing to the primaries or the fallbacks, or give it back to the pool (auto)."""
    from resolver import control_text

    _show(_ask(control_path, {"command": "repoint", "target": target}), as_json,
          control_text.repoint)


@main.command()
@_control_options
@_json_option
def reload(control_path: str | None, as_json: bool) -> None:
    """Re-read the configuration (as SIGHUP does); a bad one is refused, the old one serves."""
    reply = _ask(control_path, {"command": "reload"})
    _show(reply, as_json, lambda r: r.get("detail", "reloaded"))


@main.group()
def bench() -> None:
    """Benchmarks: find a nameserver's limits as numbers and plots."""


@bench.command()
@click.option("--target", required=True, metavar="HOST:PORT",
              help="The nameserver to ramp toward (loopback unless --i-own-this-target).")
@click.option("--start", "start_pps", default=100.0, show_default=True, metavar="PPS",
              help="First step's rate, queries/s.")
@click.option("--step", "step_pps", default=100.0, show_default=True, metavar="PPS",
              help="Rate added per step.")
@click.option("--max", "max_pps", default=2000.0, show_default=True, metavar="PPS",
              help="Highest step rate.")
@click.option("--step-seconds", default=2.0, show_default=True, metavar="S",
              help="Seconds of sending per step.")
@click.option("--out", "out_dir", default="capacity-out", show_default=True, metavar="DIR",
              type=click.Path(file_okay=False), help="Where capacity.csv/.json/.png go.")
@click.option("--loss-threshold", default=0.01, show_default=True,
              help="The knee: first step losing more than this share of queries...")
@click.option("--p99-bound-ms", default=100.0, show_default=True,
              help="...or with p99 latency above this.")
@click.option("--max-seconds", default=120.0, show_default=True, metavar="S",
              help="Bound on the whole run; the plan is cut to fit.")
@click.option("--full", is_flag=True, help="Run every step, not just one past the knee.")
@click.option("--names", "names_file", type=click.Path(dir_okay=False, exists=True),
              help="Query file, 'name TYPE' per line. Default: the mail workload.")
@click.option("--ena-command", metavar="CMD", help='e.g. "ethtool -S eth0": ENA deltas per step.')
@click.option("--ena-file", type=click.Path(dir_okay=False), metavar="PATH",
              help="A file holding `ethtool -S` output, read before and after each step.")
@click.option("--seed", default=1, show_default=True, help="Seed of the mail workload.")
@click.option("--i-own-this-target", is_flag=True,
              help="Allow a non-loopback target: you own it and may overload it.")
def capacity(target: str, start_pps: float, step_pps: float, max_pps: float, step_seconds: float,
             out_dir: str, loss_threshold: float, p99_bound_ms: float, max_seconds: float,
             full: bool, names_file: str | None, ena_command: str | None, ena_file: str | None,
             seed: int, i_own_this_target: bool) -> None:
    """Ramp the offered rate toward a nameserver in steps and find the knee."""
    import functools
    from pathlib import Path

    import trio

    from resolver.bench import capacity as cap

    if ena_command and ena_file:
        raise click.ClickException("give --ena-command or --ena-file, not both")
    try:
        address = cap.parse_target(target, i_own_this_target)
        config = cap.RampConfig(start_pps, step_pps, max_pps, step_seconds, loss_threshold,
                                p99_bound_ms, max_seconds, full=full)
        queries = cap.read_names(names_file) if names_file else cap.default_queries(seed)
        ena = cap.EnaSource(ena_command, ena_file) if (ena_command or ena_file) else None
        if ena is not None:
            ena.read()  # fail now, not after the first step
    except (ValueError, OSError, subprocess.SubprocessError) as e:
        raise click.ClickException(str(e)) from None
    ramp = cap.Ramp(config)
    click.echo(f"capacity of {target}: " + cap.describe_plan(ramp.plan, config))
    click.echo(cap.table_header(ena is not None))

    def on_step(step: cap.Step, is_knee: bool) -> None:
        click.echo(cap.table_row(step, is_knee, ena is not None))

    progress = cap.Progress(sys.stderr, len(ramp.plan.rates_pps))
    try:
        trio.run(functools.partial(cap.run_ramp, ramp, address, queries, ena=ena,
                                   on_step=on_step, progress=progress,
                                   allow_non_loopback=i_own_this_target, seed=seed))
    except KeyboardInterrupt:
        progress.clear()
        ramp.stop_reason = "interrupted"
        click.echo("interrupted: writing the steps done so far", err=True)
    report = ramp.report(target)
    written = cap.write_outputs(Path(out_dir), ramp, report,
                                say=lambda line: click.echo(line, err=True))
    knee = report["knee_pps"]
    click.echo(f"knee: {'none within the plan' if knee is None else f'{knee:g} pps'}; "
               f"last good step: {report['last_good_pps']}; sent {report['sent_packets']} of "
               f"{report['budget_packets']} budgeted queries ({report['stop_reason']})")
    click.echo("wrote " + ", ".join(str(path) for path in written))



@bench.command()
@click.option("--target", required=True, metavar="HOST:PORT",
              help="The resolver to measure (loopback unless --i-own-this-target).")
@click.option("--rate", "rate_qps", type=float, metavar="QPS",
              help="Open-loop rate (built-in generator). Default: dnsperf at full speed when "
                   "installed, else the built-in generator at 1000 q/s.")
@click.option("--duration", "duration_s", default=10.0, show_default=True, metavar="S",
              help="Seconds of timed sending.")
@click.option("--mix", default="mail", show_default=True,
              type=click.Choice(["mail", "hits", "misses"]),
              help="mail workload, cache hits only (after a warm-up), or fresh names only.")
@click.option("--domains", "n_domains", default=200, show_default=True,
              help="Domains of the mail mix; match the zone behind the resolver.")
@click.option("--metrics-url", metavar="URL",
              help="The resolver's Prometheus endpoint (http://127.0.0.1:9153/metrics): "
                   "measured hit ratio and upstream packets.")
@click.option("--upstream-counter-command", metavar="CMD",
              help="A command printing a count of upstream packets, read before and after.")
@click.option("--out", "out_dir", default="sidecar-out", show_default=True, metavar="DIR",
              type=click.Path(file_okay=False), help="Where sidecar.json goes.")
@click.option("--seed", default=1, show_default=True, help="Seed of the mail workload.")
@click.option("--i-own-this-target", is_flag=True,
              help="Allow a non-loopback target: you own it and may overload it.")
def sidecar(target: str, rate_qps: float | None, duration_s: float, mix: str, n_domains: int,
            metrics_url: str | None, upstream_counter_command: str | None, out_dir: str,
            seed: int, i_own_this_target: bool) -> None:
    """The resolver's own throughput and latency on hits, misses or the mail workload."""
    import urllib.error
    from pathlib import Path

    from resolver.bench import capacity as cap
    from resolver.bench import sidecar as side

    try:
        address = cap.parse_target(target, i_own_this_target)
        config = side.SidecarConfig(mix, rate_qps, duration_s, n_domains, seed)
        dnsperf_path = side.find_dnsperf()
        engine = config.engine(dnsperf_path)
        click.echo(f"sidecar {target}: {engine}, mix {mix}, {duration_s:g} s"
                   + (f" at {rate_qps or side.DEFAULT_RATE_QPS:g} q/s" if engine == "loadgen"
                      else " closed loop"), err=True)
        report = side.run(config, address, allow_non_loopback=i_own_this_target,
                          metrics_url=metrics_url, counter_command=upstream_counter_command,
                          dnsperf_path=dnsperf_path)
    except (ValueError, OSError, RuntimeError, subprocess.SubprocessError,
            urllib.error.URLError) as e:
        raise click.ClickException(str(e)) from None
    report["target"] = target
    for line in side.format_report(report):
        click.echo(line)
    click.echo(f"wrote {side.write_json(Path(out_dir), report)}")


@bench.command()
@click.option("--messages-per-second", required=True, type=float, metavar="M",
              help="Mail messages per second (sent + received) of the whole fleet.")
@click.option("--zipf", "zipf_exponent", default=1.1, show_default=True, metavar="S",
              help="Domain popularity exponent: rank r has weight 1/(r+1)^S.")
@click.option("--domains", "n_domains", default=20000, show_default=True, metavar="N",
              help="Distinct mail domains.")
@click.option("--ttl-seconds", type=float, metavar="T",
              help="One TTL for every lookup. Default: the mail mix's TTLs (300 s addresses "
                   "and NXDOMAIN, 3600 s the rest).")
@click.option("--hit-ratio", type=float, metavar="H",
              help="Measured hit ratio (bench sidecar --metrics-url); default: the Zipf model's.")
@click.option("--queries-per-message", type=float, metavar="Q",
              help="Q per-domain lookups per message instead of the mail mix.")
@click.option("--allowance-pps", default=1024.0, show_default=True, metavar="PPS",
              help="Upstream packets/s one network interface may send (AWS link-local: 1024).")
@click.option("--margin", default=0.25, show_default=True,
              help="Share of the allowance kept free.")
@click.option("--overhead", default=1.05, show_default=True,
              help="Upstream packets per upstream query (retries, TCP fallback).")
@click.option("--horizon-seconds", type=float, metavar="S",
              help="Mean over the first S seconds from a cold cache instead of steady state.")
@click.option("--json", "as_json", is_flag=True, help="Print the prediction as JSON.")
def plan(messages_per_second: float, zipf_exponent: float, n_domains: int,
         ttl_seconds: float | None, hit_ratio: float | None, queries_per_message: float | None,
         allowance_pps: float, margin: float, overhead: float, horizon_seconds: float | None,
         as_json: bool) -> None:
    """Predict upstream packets/s and the hosts or interfaces a mail volume needs."""
    import dataclasses
    import json

    from resolver.bench import plan as fleet

    try:
        model = fleet.build_workload(n_domains, zipf_exponent, queries_per_message, ttl_seconds)
        inputs = fleet.PlanInput(messages_per_second, model, hit_ratio, overhead, allowance_pps,
                                 margin, horizon_seconds)
        prediction = fleet.predict(inputs)
    except ValueError as e:
        raise click.ClickException(str(e)) from None
    if as_json:
        click.echo(json.dumps(dataclasses.asdict(prediction), indent=2))
        return
    for line in fleet.format_prediction(inputs, prediction):
        click.echo(line)


from resolver.doctor import command as _doctor  # noqa: E402  (its own module: resolver/doctor.py)

main.add_command(_doctor, "doctor")
