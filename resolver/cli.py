"""The command line: `resolver serve` runs the daemon, `resolver query` asks like dig does.

This interface is stable: tests, benchmarks and operators depend on it (DESIGN.md 5).
"""

from __future__ import annotations

import logging
import socket
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


