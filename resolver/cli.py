"""The command line: `resolver serve` runs the daemon, `resolver query` asks like dig does.

This interface is stable: tests, benchmarks and operators depend on it (DESIGN.md 5).
"""

from __future__ import annotations

import logging
import socket
import subprocess
import sys
import time

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


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


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
def serve(config_path: str | None, listen: tuple[str, ...], upstream: tuple[str, ...],
          fallback: tuple[str, ...], upstream_pps: int | None, metrics: str | None,
          control: str | None) -> None:
    """Run the resolver in the foreground."""
    import trio

    from resolver.daemon import service

    try:
        cfg = config_mod.load(config_path) if config_path else config_mod.Config()
        cfg = config_mod.with_overrides(cfg, {
            "listen": list(listen), "upstream": list(upstream), "fallback": list(fallback),
            "upstream_pps": upstream_pps, "metrics": metrics, "control": control,
        })
        try:
            resolv_conf = config_mod.RESOLV_CONF.read_text()
        except OSError:
            resolv_conf = None
        cfg = config_mod.finalize(cfg, resolv_conf, _ipv6_loopback())
    except ConfigError as e:
        raise click.ClickException(str(e)) from None
    _setup_logging(cfg.log_level)
    try:
        trio.run(service.run, cfg)
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

