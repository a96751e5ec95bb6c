"""A study file (studies/NAME.yaml): the experiments to run, each a set of `--set` overrides over params.yaml, and
the claims to put to the test with them. Read and checked here, before anything runs."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from spanflow.models.ensemble import ENSEMBLE_RULES

DEFAULT_STUDY = "studies/default.yaml"
EXPECTATIONS = ("better", "equal", "lower")  # a's F1 above b's | within ±margin of it | a's figure <= ratio x b's
RATIO_METRICS = ("train_peak_rss_mb", "train_seconds", "trainable_params")
BEST_MEMBER = ".best_member"  # a claim's side `ENSEMBLE.best_member`: that ensemble's member with the higher dev F1
NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


@dataclass
class Claim:
    claim: str
    source: str
    a: str  # experiment names: a is compared with b
    b: str
    expect: str = "better"
    margin: float = 1.0  # equal: the F1 gain's interval must lie inside ±margin
    metric: str = "f1"  # lower: which figure (train_peak_rss_mb, train_seconds, trainable_params)
    ratio: float = 1.0  # lower: a's figure at most ratio x b's


@dataclass
class Ensemble:
    members: list[str]  # experiments whose final models answer together
    rule: str = "max"  # max | mean of their start/end probabilities per chunk


@dataclass
class Study:
    name: str
    path: Path
    steps: int  # optimizer steps every experiment trains (train.max_steps)
    base: list[str]  # overrides every experiment shares
    experiments: dict[str, list[str]]
    claims: list[Claim] = field(default_factory=list)
    data_curve: list[str] = field(default_factory=list)  # experiments plotted as F1 against training questions
    last: list[str] = field(default_factory=list)  # --quick: over every experiment's own overrides
    ensembles: dict[str, Ensemble] = field(default_factory=dict)  # answered after the experiments, nothing trained

    def overrides(self, name: str) -> list[str]:
        """base, the step budget, the experiment's own (which may change the budget), then --quick's."""
        return [*self.base, f"train.max_steps={self.steps}", *self.experiments[name], *self.last]

    def describe(self, name: str) -> str:
        """What an experiment or ensemble is, for the findings' tables."""
        if name in self.ensembles:
            e = self.ensembles[name]
            return f"{e.rule} of {' + '.join(e.members)}"
        return " ".join(self.experiments[name]) or "(base)"


class StudyError(ValueError):
    pass


def _strings(value: object, where: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) and "=" in v for v in value):
        raise StudyError(f"{where}: expected a list of KEY=VALUE overrides, got {value!r}")
    return list(value)


def load_study(path: str | Path, quick: bool = False) -> Study:
    """The study in `path`; with `quick`, its `quick:` section's steps and overrides replace and extend the base."""
    path = Path(path)
    if not path.is_file():
        raise StudyError(f"study file {path}: not found")
    raw = yaml.safe_load(path.read_text()) or {}
    where = str(path)
    unknown = set(raw) - {"name", "steps", "base", "experiments", "ensembles", "claims", "data_curve", "quick"}
    if unknown:
        raise StudyError(f"{where}: unknown keys {sorted(unknown)}")
    experiments = raw.get("experiments") or {}
    if not isinstance(experiments, dict) or not experiments:
        raise StudyError(f"{where}: experiments: a mapping of name -> overrides, with at least one")
    for name, sets in experiments.items():
        if not NAME.match(str(name)):
            raise StudyError(f"{where}: experiment name {name!r}: letters, digits, '_', '-' and '.' only")
        experiments[name] = _strings(sets or [], f"{where}: experiments.{name}")
    steps, base, last = raw.get("steps"), _strings(raw.get("base") or [], f"{where}: base"), []
    if quick:
        q = raw.get("quick") or {}
        steps = q.get("steps", steps)
        last = [*_strings(q.get("set") or [], f"{where}: quick.set"), f"train.max_steps={steps}"]
    if not isinstance(steps, int) or steps < 1:
        raise StudyError(f"{where}: steps: {steps!r} must be a whole number >= 1")
    ensembles = _ensembles(raw.get("ensembles") or {}, experiments, where)
    sides = {*experiments, *ensembles, *(f"{n}{BEST_MEMBER}" for n in ensembles)}
    claims = []
    for i, c in enumerate(raw.get("claims") or []):
        try:
            claim = Claim(**c)
        except TypeError as exc:
            raise StudyError(f"{where}: claims[{i}]: {exc}") from None
        for side in (claim.a, claim.b):
            if side not in sides:
                raise StudyError(f"{where}: claims[{i}] ({claim.claim!r}) names no experiment or ensemble {side!r}")
        if claim.expect not in EXPECTATIONS:
            raise StudyError(f"{where}: claims[{i}].expect {claim.expect!r}: one of {', '.join(EXPECTATIONS)}")
        if claim.expect == "lower" and claim.metric not in RATIO_METRICS:
            raise StudyError(f"{where}: claims[{i}].metric {claim.metric!r}: one of {', '.join(RATIO_METRICS)}")
        claims.append(claim)
    curve = list(raw.get("data_curve") or [])
    missing = [n for n in curve if n not in experiments]
    if missing:
        raise StudyError(f"{where}: data_curve names no experiment {missing}")
    return Study(str(raw.get("name") or path.stem), path, steps, base, experiments, claims, curve, last, ensembles)


def _ensembles(raw: object, experiments: dict[str, list[str]], where: str) -> dict[str, Ensemble]:
    if not isinstance(raw, dict):
        raise StudyError(f"{where}: ensembles: a mapping of name -> {{members: [...], rule: max|mean}}")
    out = {}
    for name, spec in raw.items():
        at = f"{where}: ensembles.{name}"
        if not NAME.match(str(name)) or name in experiments:
            raise StudyError(f"{at}: a name of letters, digits, '_', '-' and '.' that no experiment has")
        try:
            ensemble = Ensemble(**(spec or {}))
        except TypeError as exc:
            raise StudyError(f"{at}: {exc}") from None
        members = ensemble.members
        if not isinstance(members, list) or len(set(members)) < 2 or len(set(members)) != len(members):
            raise StudyError(f"{at}.members: two or more different experiments, got {members!r}")
        missing = [m for m in members if m not in experiments]
        if missing:
            raise StudyError(f"{at}.members: no experiment {missing}")
        if ensemble.rule not in ENSEMBLE_RULES:
            raise StudyError(f"{at}.rule {ensemble.rule!r}: one of {', '.join(ENSEMBLE_RULES)}")
        out[str(name)] = ensemble
    return out
