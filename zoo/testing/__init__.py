"""The plugin conformance kit: the checks every built-in passes, public for every plugin.

``run_checks(["attention:my-attn"])`` checks registered names and returns one ``Outcome`` per (name, check);
``zoo check NAME...`` does the same from the command line, and ``parametrize_with_checks`` turns the checks
into pytest tests, one test id per (name, check), as scikit-learn's ``parametrize_with_checks`` does::

    from zoo.testing import parametrize_with_checks

    @parametrize_with_checks(["norm-strategy:my-norm", "attention:my-attn", "router:my-router"])
    def test_my_plugins(check):
        check()

A name is ``KIND:NAME`` (``norm-strategy``, ``norm-layer``, ``attention``, ``router``, ``variant``) or a NAME
that one kind alone registers. docs/plugins.md ("Check your plugin") describes each check.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional, Union

from ..errors import ConfigError
from .checks import IN_PROCESS, CheckFailure, NotApplicable
from .isolated import ISOLATED
from .isolated import run as run_isolated
from .subjects import Subject, parse, registered

FAST = ("options", "bad_options", "meta_init", "forward_backward", "gradients", "dtypes", "determinism", "kv_cache")
SLOW = ("save_load", "compile", "ddp", "fsdp")  # other processes, or compilation: the zoo's slow job runs these
CHECKS = FAST + SLOW
SKIP_KINDS = {"kv_cache": ("router",), "bad_options": ("variant",)}  # checks that never concern a kind


@dataclass
class Outcome:
    """One check of one name: ``status`` is "passed", "failed" or "not applicable"; ``message`` says why."""

    subject: str
    check: str
    status: str
    message: str = ""

    def to_dict(self) -> dict[str, str]:
        return {"subject": self.subject, "check": self.check, "status": self.status, "message": self.message}


def applies(check: str, subject: Subject) -> bool:
    return subject.kind not in SKIP_KINDS.get(check, ())


def _combine(subject: Subject, check: str, per_model: dict[str, dict[str, str]]) -> Outcome:
    """One outcome from the small models' outcomes: failed if any failed (each named), else passed if any passed."""
    failed = [(m, r["message"]) for m, r in per_model.items() if r["status"] == "failed"]
    if failed:
        text = failed[0][1] if len(per_model) == 1 else "; ".join(f"{m}: {msg}" for m, msg in failed)
        return Outcome(subject.id, check, "failed", text)
    if all(r["status"] == "not applicable" for r in per_model.values()):
        return Outcome(subject.id, check, "not applicable", next(iter(per_model.values()))["message"])
    return Outcome(subject.id, check, "passed")


def _in_process(check: str, subject: Subject) -> Outcome:
    per_model = {}
    for model in subject.kinds_of_model():
        try:
            IN_PROCESS[check](subject, model)
            per_model[model] = {"status": "passed", "message": ""}
        except NotApplicable as e:
            per_model[model] = {"status": "not applicable", "message": str(e)}
        except CheckFailure as e:
            per_model[model] = {"status": "failed", "message": str(e)}
        except Exception as e:  # the plugin crashed where the check expected it to work
            per_model[model] = {"status": "failed", "message": f"{type(e).__name__}: {e}"}
    return _combine(subject, check, per_model)


def _subjects(specs: Iterable[Union[str, Subject]], overrides: tuple[str, ...] = ()) -> list[Subject]:
    return [s if isinstance(s, Subject) else parse(s, overrides) for s in specs]


def run_checks(specs: Iterable[Union[str, Subject]], checks: Iterable[str] = CHECKS, *, overrides: Iterable[str] = (),
               progress: Optional[Callable[[Outcome], None]] = None) -> list[Outcome]:
    """Run ``checks`` (ids from ``CHECKS``) on each registered name in ``specs``; ``overrides`` are config
    overrides for every model the checks build. Returns the outcomes in check order per name."""
    subjects = _subjects(specs, tuple(overrides))
    checks = list(checks)
    unknown = [c for c in checks if c not in CHECKS]
    if unknown:
        raise ConfigError(f"unknown check {unknown[0]!r}; the checks are: {', '.join(CHECKS)}")
    done: dict[tuple[str, str], Outcome] = {}
    for check in checks:
        todo = [s for s in subjects if applies(check, s)]
        if check in ISOLATED:
            results = run_isolated(check, todo) if todo else {}
            for s in todo:
                done[s.id, check] = _combine(s, check, {m: results[f"{s.id}/{m}"] for m in s.kinds_of_model()})
                progress and progress(done[s.id, check])
        else:
            for s in todo:
                done[s.id, check] = _in_process(check, s)
                progress and progress(done[s.id, check])
    return [done[s.id, c] for s in subjects for c in checks if (s.id, c) in done]


@dataclass
class Check:
    """One pytest test: a check of one name. Calling it runs the check (an isolated check runs once for every
    name of the same ``parametrize_with_checks``, on its first call) and fails with the check's message."""

    subject: Subject
    check: str
    batch: list[Subject] = field(default_factory=list, repr=False)
    _cache: dict[str, Any] = field(default_factory=dict, repr=False)

    def __call__(self) -> None:
        if self.check in ISOLATED:
            if self.check not in self._cache:
                self._cache[self.check] = run_isolated(self.check, [s for s in self.batch if applies(self.check, s)])
            results = self._cache[self.check]
            outcome = _combine(self.subject, self.check,
                               {m: results[f"{self.subject.id}/{m}"] for m in self.subject.kinds_of_model()})
        else:
            outcome = _in_process(self.check, self.subject)
        if outcome.status == "failed":
            raise CheckFailure(f"{outcome.subject} {outcome.check}: {outcome.message}")
        if outcome.status == "not applicable":
            import pytest
            pytest.skip(outcome.message)


def parametrize_with_checks(specs: Iterable[Union[str, Subject]], checks: Iterable[str] = CHECKS, *,
                            overrides: Iterable[str] = ()) -> Any:
    """A ``pytest.mark.parametrize("check", ...)`` with one ``Check`` per (name, check), ids ``KIND:NAME-CHECK``."""
    import pytest
    subjects = _subjects(specs, tuple(overrides))
    cache: dict[str, Any] = {}
    params = [pytest.param(Check(s, c, subjects, cache), id=f"{s.id}-{c}")
              for s in subjects for c in checks if applies(c, s)]
    return pytest.mark.parametrize("check", params)


def print_outcomes(outcomes: list[Outcome], file: Any = None) -> None:
    """One line per outcome, grouped by name: PASS, FAIL (with the reason) or n/a (with the reason); to
    ``file`` (default: stdout)."""
    file = file if file is not None else sys.stdout
    label = {"passed": "PASS", "failed": "FAIL", "not applicable": "n/a "}
    current = None
    for o in outcomes:
        if o.subject != current:
            current = o.subject
            print(o.subject, file=file)
        print(f"  {label[o.status]} {o.check}" + (f": {o.message}" if o.message else ""), file=file)


__all__ = ["CHECKS", "FAST", "SLOW", "Check", "CheckFailure", "NotApplicable", "Outcome", "Subject",
           "parametrize_with_checks", "parse", "print_outcomes", "registered", "run_checks"]
