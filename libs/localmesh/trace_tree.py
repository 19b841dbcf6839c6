"""A trace as a tree a person reads at a glance: service, RPC, kind, duration, status."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

from localmesh.spans import Span


def render(spans: Sequence[Span]) -> str:
    if not spans:
        return "(no spans)"
    by_id = {s.span_id: s for s in spans}
    children: dict[str, list[Span]] = defaultdict(list)
    roots = []
    for span in spans:
        if span.parent_id and span.parent_id in by_id:
            children[span.parent_id].append(span)
        else:
            roots.append(span)
    width = max(len(s.service) for s in spans)
    lines = [f"trace {spans[0].trace_id}"]

    def walk(span: Span, prefix: str, last: bool) -> None:
        branch = "└─ " if last else "├─ "
        label = f"{span.service:<{width}}  {span.kind:<6} {span.name}"
        status = "OK" if span.status == "UNSET" else span.status  # UNSET: the span recorded no error
        lines.append(f"{prefix}{branch}{label}  {span.duration_ms:.1f} ms  {status}")
        kids = sorted(children[span.span_id], key=lambda s: s.start_ns)
        for i, kid in enumerate(kids):
            walk(kid, prefix + ("   " if last else "│  "), i == len(kids) - 1)

    roots.sort(key=lambda s: s.start_ns)
    for i, root in enumerate(roots):
        walk(root, "", i == len(roots) - 1)
    return "\n".join(lines)
