"""The dashboard's rendering: a Jinja2 environment with autoescaping, and the page frame.

Pages are Jinja2 templates shipped in ``templates/`` (package data). Autoescaping is on for
every template, so device ids, labels, feature names and reasons, which come from devices
and operators, are always text, never markup; only the SVG of :mod:`.charts` (built from
escaped parts) is passed through as :class:`~markupsafe.Markup`. Undefined names are
errors (``StrictUndefined``), so a misspelt field fails a test instead of rendering blank.
The style sheet is inline (``templates/style.css``), so the dashboard loads nothing from
anywhere else and its pages carry no script at all.

Filters the templates use: ``when`` (exact UTC time), ``ago`` (a ``<time>`` element reading
"3 min ago" with the exact time in its ``title``), ``duration``, ``size``, ``percent``,
``num``; the global ``url(path, **query)`` builds a link with a quoted query string.

This module does not know the services or the data; the page modules do.
"""

from __future__ import annotations

import math
from typing import Any
from urllib.parse import quote

from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape
from markupsafe import Markup, escape

from fleet_server.dashboard import humane
from fleet_server.models import FLEET_SCOPE

__all__ = ["ENV", "error_page", "login_page", "num", "page", "render", "scope_name", "url"]


def url(path: str, **query: object) -> str:
    """``path`` with the non-empty ``query`` values, quoted (the template escapes it)."""
    params = "&".join(f"{quote(k)}={quote(str(v), safe='')}" for k, v in query.items()
                      if v is not None and v != "")
    return path + (("?" + params) if params else "")


def num(value: Any) -> str:
    """A number as the tables show it: integers whole, floats to four significant digits."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}".replace(",", " ")
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    return str(value)


def _ago(ts: float | None, now: float) -> Markup:
    if ts is None:
        return Markup('<span class="muted">never</span>')
    return Markup('<time title="{}">{}</time>').format(humane.when(ts), humane.ago(ts, now))


def scope_name(group: str | None) -> str:
    """An alert's or a window's scope as people read it: a group's name, or "fleet"."""
    return "fleet" if not group or group == FLEET_SCOPE else group


def _badge(status: object) -> Markup:
    text = "unknown" if status is None or status == "" else str(status)
    css = "".join(c if c.isalnum() or c == "_" else "-" for c in text)
    # plain concatenation of escaped parts: Markup.format is slow over 1,000-row tables
    return Markup(f'<span class="badge b-{css}">{escape(text)}</span>')


ENV = Environment(loader=PackageLoader("fleet_server.dashboard", "templates"),
                  autoescape=select_autoescape(default=True, default_for_string=True),
                  undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
ENV.filters.update(when=humane.when, ago=_ago, duration=humane.duration, size=humane.size,
                   percent=humane.percent, num=num, badge=_badge)
ENV.globals.update(url=url, badge=_badge, scope_name=scope_name)


def render(template: str, **context: Any) -> Markup:
    """A template rendered to markup (a page's body, or a whole page)."""
    return Markup(ENV.get_template(template).render(**context))


def page(title: str, body: str, *, refresh: int | None = 10, user: str | None = None,
         nav: bool = True, active: str = "") -> str:
    """A whole document: header (navigation, who is signed in, sign out) and ``body``."""
    return str(render("base.html", title=title, body=Markup(body), refresh=refresh, user=user,
                      nav=nav, active=active))


def error_page(status: int, message: str, *, user: str | None = None) -> str:
    titles = {400: "Bad request", 404: "Not found", 403: "Not allowed"}
    body = render("error.html", message=message)
    return page(f"{status} · {titles.get(status, 'Error')}", body, refresh=None, user=user)


def login_page(message: str = "", next_path: str = "/") -> str:
    return page("Sign in", render("login.html", message=message, next_path=next_path),
                refresh=None, nav=False)


