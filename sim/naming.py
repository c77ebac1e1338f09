"""The names of configurations in a report's figures: short labels, and the researcher's own.

**Short labels.** A report's configurations differ in a few config keys, but each one differs from
the *others* in fewer still: the rejector variants of ``experiment=l2h_vs_confidence`` each change
one key from the defaults, so a label of every varying key (``devices = 10, $c_e$ = 0.1, federation
= fedavg, rejector inputs = sample, weights = shifted``) says four things that every line shares.
:func:`short_labels` keeps, per configuration, only the keys whose value differs from the common
one -- the baseline's value with ``--baseline``, else the value most configurations have -- and
the strategy whenever strategies differ (``L2H, rejector inputs = sample``). A configuration that
has every common value, and any two whose short labels would coincide, keep the full label
(the baseline's ends in ``(baseline)``).

**Labels given** (``python -m sim.report --label WHICH=TEXT``, repeatable, or ``--labels FILE`` with
one ``WHICH=TEXT`` a line; ``#`` starts a comment line). ``WHICH`` names one configuration either by
its id (``g3``, as in report.json) or by the values of varying keys, ``KEY=VALUE[,KEY=VALUE]``, as
``--baseline`` does; the text is what follows the selector's last ``=``-separated value:
``--label strategy.name=confidence=Confidence (global)``,
``--label 'strategy.rejector.inputs=sample,strategy.weights=shifted=L2H on the sample alone'``.
A text may hold ``=`` and spaces (``$c_e = 0.3$``); a value may not hold ``,`` or ``=``.
"""
from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

STRATEGY_KEYS = ("strategy.name",)
"""Keys naming the method: kept in every short label when they vary."""


class LabelError(ValueError):
    """A bad ``--label`` / ``--labels``; the message is one line."""


def _dump(v: Any) -> str:
    return json.dumps(v, sort_keys=True)


def common_values(values: list[dict[str, Any]], keys: list[str]) -> dict[str, Any]:
    """Per key, the value most of ``values`` have (None left out; a tie goes to the first seen)."""
    out = {}
    for k in keys:
        seen = [_dump(v[k]) for v in values if v.get(k) is not None]
        if seen:
            top = Counter(seen).most_common()
            best = max(c for _, c in top)
            out[k] = json.loads(next(s for s in seen if dict(top)[s] == best))
    return out


def short_labels(values: list[dict[str, Any]], reference: dict[str, Any] | None = None) -> list[str]:
    """Short legend labels for configurations given by their varying keys' ``values`` (module docstring).

    Args:
        values: per configuration, ``{varying key: value}`` (all with the same keys).
        reference: the values a key is compared with (the baseline's); None: the common values.

    Returns:
        One label per configuration, in order.
    """
    from sim.style import setting_label

    if not values:
        return []
    keys = list(values[0])
    ref = dict(reference) if reference is not None else common_values(values, keys)
    strategy = [k for k in keys if k in STRATEGY_KEYS]
    out = []
    for v in values:
        differs = [k for k in keys if v[k] is not None and _dump(v[k]) != _dump(ref.get(k))]
        own = {k: v[k] for k in keys if k in strategy or k in differs}
        if differs or len(values) == 1:
            out.append(setting_label(own))
        elif reference is not None:  # the baseline: the full label says what the others differ from
            out.append(f"{setting_label(v)} (baseline)")
        else:  # every common value: likewise
            out.append(setting_label(v))
    counts = Counter(out)
    return [setting_label(v) if counts[lab] > 1 else lab for v, lab in zip(values, out)]


def read_labels_file(path: Path) -> list[str]:
    """The ``WHICH=TEXT`` lines of a labels file (blank lines and ``#`` comments skipped).

    Raises:
        LabelError: the file cannot be read.
    """
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise LabelError(f"--labels {path} cannot be read ({getattr(exc, 'strerror', None) or type(exc).__name__})"
                         ": give a text file with one WHICH=TEXT a line") from None
    return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]


def parse_label(spec: str, varying: list[str]) -> tuple[dict[str, str] | str, str]:
    """One ``WHICH=TEXT``: ``(group id or {key: value}, text)`` (module docstring).

    Raises:
        LabelError: not of that form, a key that does not vary, or an empty text.
    """
    usage = "give ID=TEXT or KEY=VALUE[,KEY=VALUE]=TEXT (e.g. strategy.name=confidence=Confidence)"
    m = re.fullmatch(r"(g\d+)=(.*)", spec.strip(), flags=re.S)
    if m:
        which: dict[str, str] | str = m.group(1)
        text = m.group(2)
    else:
        rest, pairs = spec.strip(), {}
        while True:
            key, eq, rest = rest.partition("=")
            if not eq or not key.strip():
                raise LabelError(f"--label {spec!r}: {usage}")
            if key.strip() not in varying:
                raise LabelError(f"--label {spec!r}: {key.strip()} does not vary between the configurations "
                                 f"(the varying keys: {', '.join(varying)}); {usage}")
            m = re.match(r"([^,=]*)([,=])(.*)", rest, flags=re.S)
            if not m:
                raise LabelError(f"--label {spec!r}: no text after the value; {usage}")
            value, sep, rest = m.groups()
            pairs[key.strip()] = value.strip()
            if sep == "=":
                text = rest
                break
        which = pairs
    if not text.strip():
        raise LabelError(f"--label {spec!r}: the text is empty; {usage}")
    return which, text.strip()


def apply_labels(groups: list[dict[str, Any]], varying: list[str], specs: list[str],
                 matches: Any, describe: Any) -> None:
    """Set each named group's ``label`` from ``specs`` (``WHICH=TEXT``, :func:`parse_label`).

    Args:
        matches: ``(value, text) -> bool``, whether a group's value matches a selector's text.
        describe: ``values -> str``, a configuration in words (for the error message).

    Raises:
        LabelError: a spec that does not parse, or that names no configuration or several.
    """
    by_id = {g["id"]: g for g in groups}
    for spec in specs:
        which, text = parse_label(spec, varying)
        if isinstance(which, str):
            if which not in by_id:
                raise LabelError(f"--label {spec!r}: no configuration {which} (the ids are g1 to g{len(groups)}, "
                                 "in report.json)")
            hits = [by_id[which]]
        else:
            hits = [g for g in groups if all(matches(g["values"].get(k), v) for k, v in which.items())]
        if len(hits) != 1:
            options = "; ".join(f"{g['id']}: {describe(g['values'])}" for g in groups)
            raise LabelError(f"--label {spec!r} matches {len(hits)} configurations (it must match one); the "
                             f"configurations are: {options}")
        hits[0]["label"] = text
