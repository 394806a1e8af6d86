"""HTML building blocks for the dashboard: the page frame, tables, badges, escaping.

Pages are assembled from strings on the server, with every value passed through
:func:`esc` (or a helper that calls it): device ids, labels, feature names and reasons come
from devices and operators and are never trusted as markup. The style sheet is inline, so
the dashboard loads nothing from anywhere else.

This module does not know the services or the data; :mod:`fleet_server.dashboard.pages`
does.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime, timezone
from html import escape
from urllib.parse import quote

__all__ = ["Raw", "badge", "card", "error_page", "esc", "link", "login_page", "page", "pairs",
           "table", "when"]

CSS = """
:root { --ink:#222; --muted:#666; --line:#ddd; --ok:#2a9d8f; --warn:#e9c46a; --bad:#c1121f;
        --info:#457b9d; --bg:#fafafa; }
* { box-sizing: border-box; }
body { margin:0; font:14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif;
       color:var(--ink); background:var(--bg); }
header { background:#1d3557; color:#fff; padding:10px 24px; display:flex; gap:24px;
         align-items:baseline; }
header b { font-size:17px; letter-spacing:.5px; }
header a { color:#cfe3f5; text-decoration:none; } header a:hover { color:#fff; }
main { padding:18px 24px 40px; max-width:1280px; }
h1 { font-size:20px; margin:4px 0 14px; } h2 { font-size:16px; margin:22px 0 8px; }
table { border-collapse:collapse; background:#fff; width:100%; margin:6px 0 12px; }
th, td { border-bottom:1px solid var(--line); padding:5px 8px; text-align:left;
         vertical-align:top; }
th { background:#f0f3f6; font-weight:600; font-size:12px; color:#333; }
td.num, th.num { text-align:right; font-variant-numeric:tabular-nums; }
.badge { display:inline-block; padding:1px 7px; border-radius:9px; font-size:12px;
         color:#fff; background:var(--muted); }
.b-ok, .b-online, .b-completed, .b-pass, .b-installed { background:var(--ok); }
.b-warn, .b-wait, .b-paused, .b-pending_approval, .b-shadow { background:var(--warn);
         color:#222; }
.b-drift, .b-fail, .b-aborted, .b-offline, .b-failed, .b-critical { background:var(--bad); }
.b-running, .b-ready, .b-info, .b-current, .b-canary { background:var(--info); }
.b-stale, .b-insufficient, .b-skip, .b-pending { background:#999; }
.b-done, .b-healthy, .b-resolved { background:var(--ok); }
.b-open, .b-rolled_back, .b-abort, .b-rollback { background:var(--bad); }
.b-start, .b-approve, .b-resume, .b-promote, .b-advance { background:var(--ok); }
.cards { display:flex; flex-wrap:wrap; gap:14px; }
.card { background:#fff; border:1px solid var(--line); border-radius:6px; padding:10px 14px;
        min-width:200px; }
.card .big { font-size:26px; font-weight:600; }
.card .big a { color:inherit; text-decoration:none; } .card .big a:hover { color:var(--info); }
pre { white-space:pre-wrap; overflow-wrap:anywhere; }
.muted { color:var(--muted); } .small { font-size:12px; }
.grid { display:grid; grid-template-columns:repeat(auto-fill, minmax(440px, 1fr)); gap:14px; }
.panel { background:#fff; border:1px solid var(--line); border-radius:6px; padding:10px; }
form.inline { display:inline; }
input[type=password], input[type=text] { padding:6px; width:360px; }
button { padding:6px 14px; }
"""


class Raw(str):
    """Markup that is already safe (built by these helpers or the chart functions)."""


def esc(value: object) -> str:
    if isinstance(value, Raw):
        return value
    if value is None:
        return "—"
    if isinstance(value, float):
        return escape(f"{value:.4g}")
    return escape(str(value))


def badge(status: str | None) -> Raw:
    text = status or "unknown"
    css = "".join(c if c.isalnum() or c == "_" else "-" for c in text)
    return Raw(f'<span class="badge b-{css}">{escape(text)}</span>')


def link(href: str, text: object, **query: str | None) -> Raw:
    params = "&".join(f"{quote(k)}={quote(v)}" for k, v in query.items() if v)
    url = href + (("?" + params) if params else "")
    return Raw(f'<a href="{escape(url, quote=True)}">{esc(text)}</a>')


def when(ts: float | None) -> str:
    if ts is None:
        return "—"
    return datetime.fromtimestamp(ts, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def table(head: Sequence[str], rows: Iterable[Sequence[object]], *,
          numeric: Iterable[int] = (), empty: str = "nothing yet") -> Raw:
    nums = set(numeric)
    out = ["<table><thead><tr>"]
    out += [f'<th{" class=num" if i in nums else ""}>{esc(h)}</th>' for i, h in enumerate(head)]
    out.append("</tr></thead><tbody>")
    n = 0
    for row in rows:
        n += 1
        out.append("<tr>")
        out += [f'<td{" class=num" if i in nums else ""}>{esc(c)}</td>' for i, c in enumerate(row)]
        out.append("</tr>")
    if n == 0:
        out.append(f'<tr><td colspan="{len(head)}" class="muted">{esc(empty)}</td></tr>')
    out.append("</tbody></table>")
    return Raw("".join(out))


def page(title: str, body: str, *, refresh: int | None = 10, user: str | None = None,
         nav: bool = True) -> str:
    """A whole document: header (navigation, who is signed in, sign out) and ``body``."""
    meta = f'<meta http-equiv="refresh" content="{int(refresh)}">' if refresh else ""
    links = "".join(f'<a href="{h}">{t}</a>' for h, t in (
        ("/", "Fleet"), ("/devices", "Devices"), ("/rollouts", "Rollouts"), ("/drift", "Drift"),
        ("/alerts", "Alerts"))) if nav else ""
    who = f'<span class="small">{escape(user)}</span>' if user else ""
    out = ('<form class="inline" method="post" action="/logout"><button>Sign out</button>'
           '</form>') if nav else ""
    return ("<!doctype html><html lang=en><head><meta charset=utf-8>"
            f"<title>{escape(title)} · edgefleet</title>{meta}"
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f'<meta name="referrer" content="no-referrer">'
            f"<style>{CSS}</style></head><body><header><b>edgefleet</b>{links}"
            f'<span style="flex:1"></span>{who}{out}</header>'
            f"<main><h1>{escape(title)}</h1>{body}</main></body></html>")


def card(label: str, value: object, *, sub: object = None, href: str | None = None) -> Raw:
    """A big number with its label (and a link to the list behind it)."""
    big = esc(value)
    if href is not None:
        big = f'<a href="{escape(href, quote=True)}">{big}</a>'
    extra = f'<div class="muted small">{esc(sub)}</div>' if sub is not None else ""
    return Raw(f'<div class="card"><div class="muted small">{esc(label)}</div>'
               f'<div class="big">{big}</div>{extra}</div>')


def pairs(items: Iterable[tuple[str, object]]) -> Raw:
    """A two-column table of names and values."""
    rows = "".join(f'<tr><th style="width:200px">{esc(k)}</th><td>{esc(v)}</td></tr>'
                   for k, v in items)
    return Raw(f"<table><tbody>{rows}</tbody></table>")


def error_page(status: int, message: str, *, user: str | None = None) -> str:
    titles = {400: "Bad request", 404: "Not found", 403: "Not allowed"}
    return page(f"{status} · {titles.get(status, 'Error')}",
                f'<p class="panel">{esc(message)}</p><p><a href="/">Back to the fleet</a></p>',
                refresh=None, user=user)


def login_page(message: str = "", next_path: str = "/") -> str:
    note = f'<p class="panel" role="alert">{esc(message)}</p>' if message else ""
    return page("Sign in", (
        f'{note}<form method="post" action="/login" class="panel" autocomplete="off">'
        '<p><label for="token">Operator token (viewer or better)</label></p>'
        '<p><input type="password" id="token" name="token" placeholder="efo_…" '
        'required maxlength="128" autofocus></p>'
        f'<input type="hidden" name="next" value="{escape(next_path, quote=True)}">'
        '<p><button type="submit">Sign in</button></p></form>'
        '<p class="muted small">Create one with <code>fleet token create NAME --role viewer'
        '</code>. The token stays on the server; the browser keeps only a session cookie.</p>'),
        refresh=None, nav=False)
