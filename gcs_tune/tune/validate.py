"""Loading a search space file and checking it against the run config, before Ray starts: the
file's schema (``SpaceFile``), then bounds that name other parameters (and the unit position
Optuna samples for them), every end of every range (and their combinations) giving a valid run
config, ``method.*`` parameters only for methods that have them, defaults inside the space."""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from gcs_tune.config import ConfigError, ObjectiveConfig, RunConfig, _describe, build_config, read_yaml
from gcs_tune.methods.table import METHODS
from gcs_tune.tune.space import Param, Space, SpaceFile, SpaceSampler, apply_values, unit_name


def load_space(path: str | Path, overrides: dict[str, Any] | None = None, trials: int | None = None) -> Space:
    """Read and validate a space file; ``overrides`` (dotted run config keys) apply to the base."""
    path = Path(path).expanduser().resolve()
    tree = read_yaml(path)
    try:
        spec = SpaceFile.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, str(path))) from None
    if trials is not None:
        if trials < 1:
            raise ConfigError(f"--trials must be at least 1, got {trials}")
        spec = spec.model_copy(update={"trials": trials})
    base, needs_reference = _base_config(spec, path, overrides or {})
    check_params(spec, base, str(path))
    return Space(spec, base, str(path), path.read_text(), needs_reference)


def _base_config(spec: SpaceFile, path: Path, overrides: dict[str, Any]) -> tuple[RunConfig, bool]:
    tree: dict[str, Any] = {}
    if spec.base_config:
        base_path = Path(spec.base_config).expanduser()
        base_path = base_path if base_path.is_absolute() else path.parent / base_path
        tree = read_yaml(base_path)
    tree = _merge(tree, spec.base)
    objective = {**tree.get("objective", {}), **spec.objective}
    try:
        ObjectiveConfig.model_validate({**objective, "value": objective.get("value", 0.0)})
    except ValidationError as exc:
        raise ConfigError(_describe(exc, f"{path}: objective")) from None
    tree["objective"] = objective
    overrides = dict(overrides)
    floor = overrides.get("objective.floor", objective.get("floor"))
    needs_reference = floor == "reference" and objective.get("value") is None \
        and overrides.get("objective.value") is None
    if needs_reference:
        overrides["objective.value"] = 0.0  # placeholder: the CoOp reference run fills it in
    return build_config(tree, overrides, source=f"{path}: base").for_search(), needs_reference


def _merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def check_params(spec: SpaceFile, base: RunConfig, source: str) -> None:
    ranges: dict[str, tuple[float, float]] = {}
    seen: set[str] = set()
    for name, p in spec.params.items():
        where = f"{source}: params.{name}"
        for ref in (b for b in (p.low, p.high) if isinstance(b, str)):
            if ref not in ranges:
                raise ConfigError(f"{where}: bound {ref!r} is not an earlier numeric parameter")
        for ref in (p.when or {}):
            if ref not in seen:
                raise ConfigError(f"{where}.when: {ref!r} is not an earlier parameter")
        if p.dependent and unit_name(name) in spec.params:
            raise ConfigError(f"{where}: a bound names another parameter, so Optuna samples its position "
                              f"{unit_name(name)!r}, which is also a parameter here: rename one of them")
        rng = p.numeric_range(ranges)
        if rng is not None and p.type in ("uniform", "loguniform") and rng[0] >= rng[1]:
            raise ConfigError(f"{where}: empty range: low can reach {rng[0]}, high is {rng[1]}")
        if rng is not None and p.type == "loguniform" and rng[0] <= 0:
            raise ConfigError(f"{where}: loguniform needs low > 0, but low can reach {rng[0]}")
        _check_knob(name, p, spec, base, where)
        if rng is not None:
            ranges[name] = rng
        seen.add(name)
    for label, values in _corners(spec):
        try:
            apply_values(spec.keys(), base, values)
        except ConfigError as exc:
            shown = ", ".join(f"{n}={v!r}" for n, v in values.items())
            reason = "; ".join(line.removeprefix("<replace>: ") for line in str(exc).splitlines())
            raise ConfigError(f"{source}: params at {label} ({shown}) give an invalid run config: {reason}") from None
    _check_defaults(spec, base, source)


def _corners(spec: SpaceFile):
    """Assignments that reach every end of every range: all lows, all highs, and each choice
    value with the others low. Dependent bounds resolve against the values assigned so far."""
    choices = [(n, v) for n, p in spec.params.items() if p.type == "choice" for v in p.values]
    for label, pinned, side in ([("their low ends", None, 0), ("their high ends", None, 1)]
                                + [(f"{n}={v!r}", (n, v), 0) for n, v in choices]):
        values: dict[str, Any] = {}
        for name, p in spec.params.items():
            if not p.active(values):
                continue
            if pinned and pinned[0] == name:
                values[name] = pinned[1]
            elif p.type == "choice":
                values[name] = p.values[-side]
            else:
                bound = p.bounds(values)[side]
                values[name] = int(bound) if p.type == "int" else float(bound)
        yield label, values


def _possible_methods(p: Param, spec: SpaceFile, base: RunConfig) -> set[str]:
    searched = next((q for q in spec.params.values() if q.key == "method.name"), None)
    methods = set(searched.values) if searched is not None else {base.method.name}
    for ref, allowed in (p.when or {}).items():
        if spec.params[ref].key == "method.name":
            methods &= set(allowed)
    return methods


def _check_knob(name: str, p: Param, spec: SpaceFile, base: RunConfig, where: str) -> None:
    section, _, knob = p.key.partition(".")
    if section != "method" or knob == "name":
        return
    for method in sorted(_possible_methods(p, spec, base)):
        if method in METHODS and knob not in METHODS[method].knobs:
            has = ", ".join(METHODS[method].knobs) or "none"
            raise ConfigError(f"{where}: method {method!r} has no parameter {knob!r} (it has: {has}); "
                              f"search it only with a method that uses it (when: {{method: [...]}})")


def _check_defaults(spec: SpaceFile, base: RunConfig, source: str) -> None:
    if not spec.defaults:
        return
    values = dict(spec.defaults)
    for name in values:
        if name not in spec.params:
            raise ConfigError(f"{source}: defaults.{name}: not a searched parameter")
    missing = [n for n, p in spec.params.items() if n not in values and p.active(values)]
    if missing:
        raise ConfigError(f"{source}: defaults: no value for {', '.join(missing)} (the defaults trial sets "
                          f"every parameter active at the defaults)")
    try:
        from optuna.trial import FixedTrial  # the tune package may import optuna

        sampler = SpaceSampler(spec.params, values)
        with warnings.catch_warnings():  # out-of-range values are reported below, as errors
            warnings.simplefilter("ignore")
            # what the searcher enqueues, read back as the defaults trial will be
            sampled = sampler(FixedTrial(sampler.to_optuna(values)))
        for name, value in sampled.items():
            _check_in_range(name, spec.params[name], value, sampled)
        apply_values(spec.keys(), base, sampled)
    except (ValueError, KeyError) as exc:  # ConfigError is a ValueError
        raise ConfigError(f"{source}: defaults: {exc}") from None


def _check_in_range(name: str, p: Param, value: Any, values: dict[str, Any]) -> None:
    if p.type == "choice":
        if value not in p.values:
            raise ValueError(f"{name}={value!r} is not one of {p.values}")
        return
    lo, hi = p.bounds(values)
    if not lo <= value <= hi:
        raise ValueError(f"{name}={value!r} is outside [{lo}, {hi}]")
