"""What ``edgepack inspect`` prints of a bundle: its inputs, outputs and files; its
quantisation, fidelity, metrics, calibration and lineage; its card in a few lines; its
signatures and approvals (listed, not judged).

Pure formatting over a manifest and the lists the command has made: no file is read and
no signature is checked here (that is :mod:`packager.cli`'s ``inspect`` and
``edgepack verify``).
"""

from __future__ import annotations

__all__ = ["build_lines", "calibration_line", "card_lines", "schema_lines", "signature_lines"]


def _fmt_range(lo: float | None, hi: float | None) -> str:
    return "" if lo is None else f"[{lo:.6g}, {hi:.6g}]"


def schema_lines(m) -> list[str]:
    """``inspect``: the inputs, outputs and files."""
    out = ["\ninputs",
           f"  {'name':<24} {'kind':<12} {'dtype':<8} {'range / categories':<34} missing"]
    for s in m.inputs:
        detail = _fmt_range(s.min, s.max) if s.kind == "numeric" else \
            ", ".join(s.categories[:5]) + (f" …(+{len(s.categories) - 5})"
                                           if len(s.categories) > 5 else "")
        out.append(f"  {s.name:<24} {s.kind:<12} {s.dtype:<8} {detail:<34} "
                   f"{'allowed' if s.missing_allowed else 'refused'}")
    out.append("\noutputs")
    for o in m.outputs:
        out.append(f"  {o.name:<24} {o.role:<14} {o.dtype}")
    if m.classes:
        out.append(f"  classes: {', '.join(map(str, m.classes[:20]))}")
    out.append("\nfiles")
    for e in m.files:
        out.append(f"  {e.path:<16} {e.size:>12,} bytes  sha256 {e.sha256[:16]}…")
    return out


def build_lines(m) -> list[str]:
    """``inspect``: quantisation, fidelity, metrics and lineage."""
    q = m.quantization
    out = [f"\nquantization  mode {q.mode}, applied {str(q.applied).lower()}, "
           f"{q.quantized_ops} ops quantised"
           + (f", kept in float: {', '.join(q.float_ops_kept)}" if q.float_ops_kept else "")]
    if q.note:
        out.append(f"  {q.note}")
    f = m.fidelity
    parts = [f"rows {f.rows}", f"passed {str(f.passed).lower()}"]
    if f.forced:
        parts.append("FORCED past a failed gate")
    for label, v in (("label agreement", f.label_agreement),
                     ("max |Δp|", f.max_abs_prob_diff), ("mean |Δp|", f.mean_abs_prob_diff),
                     ("max |err|", f.max_abs_error), ("max rel err", f.max_rel_error)):
        if v is not None:
            parts.append(f"{label} {v:.6g}")
    out.append("fidelity      " + ", ".join(parts))
    if m.metrics:
        out.append("metrics       " + ", ".join(f"{k} {v:.4g}" for k, v in m.metrics.items()))
        if any(k.startswith("train_") for k in m.metrics):
            out.append("  computed on the training rows (optimistic: the model has seen them;"
                       " build with --eval-data for held-out metrics)")
    else:
        out.append("metrics       none (built without --target)")
    out.append(calibration_line(m))
    ln = m.lineage
    out.append(f"\nlineage\n  source   {ln.source_kind} {ln.estimator}\n"
               f"  model    sha256 {ln.source_sha256}\n"
               f"  data     sha256 {ln.data_sha256} ({ln.data_rows} rows)\n"
               f"  code     {ln.code_revision or '(not in a git repository)'}\n"
               f"  versions " + ", ".join(f"{k} {v}" for k, v in ln.libraries.items()))
    return out


def calibration_line(m) -> str:
    """``inspect``: the calibration map, or why there is none."""
    from packager.calibrate import RAW_BRIER

    c = m.calibration
    if c is None:
        return "calibration   none (" + (
            "a regressor" if m.task == "regression" else
            "built without --eval-data, or too few held-out rows of each outcome") + ")"
    knots = f"{len(c.x)} knots" if c.method == "isotonic" else f"a {c.a:.4g}, b {c.b:.4g}" \
        + (": the identity, no fitted map beat the raw probabilities" if (c.a, c.b) == (1, 0)
           else "")
    raw = m.metrics.get(RAW_BRIER)
    score = "n/a" if c.score is None else f"{c.score:.4f}"
    return (f"calibration   {c.method} ({knots}), target {c.target}, fitted on {c.rows} "
            f"held-out rows; Brier score "
            + (f"{raw:.4f} before, " if raw is not None else "")
            + f"{score} after (cross-validated)")


def signature_lines(sigs: list[dict], approvals: list[dict], named: bool) -> list[str]:
    """``inspect``: the signatures and approval statements (listed, not judged)."""
    out = ["\nsignatures (not judged here: use `edgepack verify`)"]
    for s in sigs:
        mark = f"trusted, {s['name']} ({s['role']})" if s["trusted"] else "unknown key"
        out.append(f"  {s['keyid']}  {mark}")
    if not sigs:
        out.append("  none")
    out.append("\napprovals" + ("" if named else " (names need --trust)"))
    for a in approvals:
        who = f"{a['name']} ({a['trusted_role']})" if a["trusted"] else "unknown key"
        out.append(f"  {a['signed_at']}  {who}, key {a['keyid'][:16]}…, as {a['role']}"
                   + ("" if a["role_confirmed"] or not a["trusted"] else " (role NOT confirmed)")
                   + (f", review by {a['review_by']}" if a["review_by"] else "")
                   + (f": {a['comment']}" if a["comment"] else ""))
    if not approvals:
        out.append("  none")
    return out


def card_lines(m) -> list[str]:
    """The card in a few lines (``edgepack card`` renders it in full)."""
    card = m.card
    if card is None:
        return ["\ncard          none (built before model cards)"]
    st = card.statement
    out = ["\ncard          " + (f"owner {st.owner or '?'}, review by {st.review_by or 'none'}"
                                if st else "NO CARD FILE: owner, intended use and limitations "
                                           "not stated (build with --card)")]
    if card.evaluation:
        ev = card.evaluation
        out.append(f"  evaluated on {ev.rows} {ev.data.replace('_', '-')} rows: " + ", ".join(
            f"{e.name} {e.value:.4g} [{e.low:.4g}, {e.high:.4g}]"
            if e.value is not None and e.low is not None else f"{e.name} {e.value}"
            for e in ev.metrics))
    for sl in card.slices:
        out.append(f"  slice {sl.column}: {len(sl.groups)} groups, worst by {sl.metric}: "
                   f"{sl.worst}")
    for r in card.fairness:
        out.append(f"  fairness {r.column}: " + ", ".join(
            f"{k} {'n/a' if v is None else f'{v:.4g}'}" for k, v in sorted(r.gaps.items())))
    for c in card.checks:
        out.append(f"  check {c.column} {c.gap} {'ok' if c.passed else 'FAILED'}")
    if card.forced:
        out.append("  FORCED past a failed fairness check")
    if card.champion:
        from packager.champion import table

        c = card.champion
        out.append(f"  champion {c.name} {c.version}: {c.metric} difference "
                   + ("n/a" if c.delta is None else f"{c.delta:+.4g}")
                   + ("" if c.low is None else f" [{c.low:+.4g}, {c.high:+.4g}]")
                   + (", won" if c.won else ", NOT won"))
        if c.comparison is not None:
            out.append(table(c))
    if card.importances and card.importances.features:
        out.append("  top features " + ", ".join(
            f"{i.feature} {i.mean:.3g}" for i in card.importances.features[:5]))
    return out
