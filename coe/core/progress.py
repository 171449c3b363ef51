"""Progress bars for the steps that take more than a few seconds outside the executor (whose
bars count generations): encoding questions with a transformer, distilling the static
encoder, fitting a router. One switch for the process: off by default (a library stays
quiet), turned on by the CLI unless ``-q`` is given. Bars go to stderr (tqdm's default) and
are left off for work too small to need one."""

from __future__ import annotations

_enabled = False


def enable(on: bool = True) -> None:
    global _enabled
    _enabled = bool(on)


def enabled() -> bool:
    return _enabled


def bar(iterable=None, *, total: int | None = None, desc: str = "", unit: str = "it",
        when: bool = True):
    """A tqdm bar over ``iterable`` (or of ``total`` steps), shown when progress is on and
    ``when`` (the caller's judgement that the work takes more than a few seconds)."""
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, unit=unit, leave=False, dynamic_ncols=True,
                disable=not (_enabled and when))
