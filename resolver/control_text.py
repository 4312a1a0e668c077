"""Human output of control replies (resolver/daemon/control.py): one readable screen each."""

from __future__ import annotations

from typing import Any


def table(headers: list[str], rows: list[list[str]]) -> str:
    """Left-aligned columns, two spaces apart, header first."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows,
                                                                         strict=True)]
    lines = ["  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True))
             .rstrip() for row in [headers, *rows]]
    return "\n".join(lines)


def _num(value: Any, unit: str = "", digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    if isinstance(value, float):
        text = f"{value:.{digits}f}".rstrip("0").rstrip(".") if digits else f"{value:.0f}"
        return text + unit
    return f"{value}{unit}"


def _rate(value: Any) -> str:
    return "unlimited" if value is None else _num(value, digits=1)


def _pct(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio * 100:.1f}%"


def _le_ms(value: Any) -> str:
    if value is None:
        return "-"
    if value == "inf":
        return "> last bucket"
    return f"<= {_num(value)} ms"


def stats(reply: dict[str, Any]) -> str:
    cache, latency = reply["cache"], reply["latency_ms"]
    transports = ", ".join(f"{k} {v}" for k, v in sorted(reply["queries_by_transport"].items()))
    sources = ", ".join(f"{k} {v}" for k, v in sorted(reply["responses_by_source"].items())
                        if v)
    budget = reply["budget_pps"]
    rows = [
        ["qps", f"{_num(reply['qps'])}  (last {_num(reply['interval_seconds'])} s)"],
        ["queries", f"{reply['queries_total']}  ({transports or 'none'})"],
        ["responses", sources or "none"],
        ["cache hit ratio", f"{_pct(cache['hit_ratio'])}  ({cache['hits']} hits, "
                            f"{cache['misses']} misses)"],
        ["cache", f"{cache['entries']} entries, {cache['bytes']} bytes, "
                  f"{cache['evictions']} evictions, {cache['prefetches']} prefetches"],
        ["latency p50/p90/p99", f"{_le_ms(latency['p50'])} / {_le_ms(latency['p90'])} / "
                                f"{_le_ms(latency['p99'])}  ({latency['timed']} timed, "
                                "slow path)"],
        ["upstream packets/s", f"{_num(reply['upstream_pps'])} of "
                               f"{'unlimited' if budget is None else _num(budget)} budget  "
                               f"({reply['upstream_packets_total']} total)"],
        ["in flight", str(reply["inflight"])],
        ["failures", str(reply["failures"])],
        ["mode", f"{reply['mode']} (override {reply['override']})"],
        ["uptime", f"{_num(reply['uptime_seconds'])} s"],
    ]
    width = max(len(label) for label, _ in rows)
    return "\n".join(f"{label.ljust(width)}  {value}" for label, value in rows)


def upstreams(reply: dict[str, Any]) -> str:
    headers = ["UPSTREAM", "ROLE", "STATE", "BUDGET", "LEARNED", "SENDING", "LOSS",
               "RTT p50", "RTT p99", "RTT mean", "SENT", "DENIED"]
    rows = []
    for u in reply["upstreams"]:
        rtt = u["rtt_ms"]
        rows.append([u["upstream"], u["role"], u["state"], _rate(u["configured_pps"]),
                     _num(u["learned_pps"]), f"{_num(u['send_pps'])}/s", _pct(u["loss"]),
                     _le_ms(rtt["p50"]), _le_ms(rtt["p99"]), _num(rtt["mean"], " ms", 2),
                     str(u["packets_total"]), str(u["tokens_denied"])])
    out = [f"mode {reply['mode']} for {_num(reply['mode_since_seconds'])} s, override "
           f"{reply['override']}; loss and sending over the last "
           f"{_num(reply['upstreams'][0]['window_seconds'])} s" if reply["upstreams"] else "",
           "", table(headers, rows), ""]
    for u in reply["upstreams"]:
        last = u["last_transition"]
        out.append(f"{u['upstream']}: " + ("no transition since start" if last is None else
                   f"{last['from']} -> {last['to']} {_num(last['seconds_ago'])} s ago: "
                   f"{last['evidence']}"))
    if reply["recent_events"]:
        out += ["", "recent events:"]
        out += [f"  {_num(e['seconds_ago'])} s ago  {e['subject']}: {e['from']} -> {e['to']} "
                f"({e['evidence']})" for e in reply["recent_events"]]
    return "\n".join(out)


def entry(item: dict[str, Any]) -> str:
    """One entry: a summary line, then its records indented."""
    flags = "".join(f" +{f}" for f in ("do", "cd") if item[f])
    stale = " STALE" if item["stale"] else ""
    head = (f"{item['name']} {item['type']}{flags}  {item['kind']}  ttl {item['ttl_left']}"
            f"/{item['ttl']}{stale}  hits {item['hits']}")
    return "\n".join([head, *(f"    {record}" for record in item["records"])])


def lookup(reply: dict[str, Any]) -> str:
    if not reply["entries"]:
        return f"{reply['name']}: not in the cache"
    return "\n".join(entry(item) for item in reply["entries"])


def flush(reply: dict[str, Any]) -> str:
    removed = reply["removed"]
    noun = "entry" if removed == 1 else "entries"
    return f"removed {removed} {noun}; {reply['remaining']} remain"


def repoint(reply: dict[str, Any]) -> str:
    return (f"override {reply['previous']} -> {reply['override']}; pool mode is now "
            f"{reply['mode']}")
