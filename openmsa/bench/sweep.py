"""Launch-setting sweeps for the benchmarks: ``"entry.field=v1,v2;entry.field=v3"`` (entries
and fields of ``openmsa.ops.utils.configs``) -> every combination, applied in-process."""

from __future__ import annotations

import contextlib
import itertools

from ..ops.utils.configs import _parse_env, override


def combinations(text: str):
    """Yields (label, {entry: {field: value}}) for every combination of the knobs."""
    knobs = []
    for item in filter(None, (s.strip() for s in text.split(";"))):
        key, values = item.split("=", 1)
        knobs.append((key.strip(), [v.strip() for v in values.split(",")]))
    for combo in itertools.product(*[vals for _, vals in knobs]):
        pairs = [f"{key}={val}" for (key, _), val in zip(knobs, combo)]
        yield " ".join(pairs), _parse_env(",".join(pairs))


@contextlib.contextmanager
def applied(settings: dict):
    """The launch settings of one combination, for the duration of the block."""
    with contextlib.ExitStack() as stack:
        for name, fields in settings.items():
            stack.enter_context(override(name, **fields))
        yield
