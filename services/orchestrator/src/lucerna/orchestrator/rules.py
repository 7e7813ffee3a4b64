"""Workflow rules: which models run on which studies, at which priority (docs/workflow-rules.md).

A rule matches a study when every condition it names holds: each list condition (modalities, body
parts, SOP classes, calling AE titles) when one of the study's values is in the list, compared
case-insensitively; ``study_description`` when the regular expression is found in the description,
case-insensitively. The instances a rule hands its models are those of the study that pass the
rule's instance-level conditions (modality, body part, SOP class): a chest rule does not send a
study's head series, nor its structured reports. A study may match several rules: each model named
runs once, over the union of the instances its rules admit, at the highest of their priorities.

Rules are read and checked at start-up; any problem stops the start with the file, the rule and
the field at fault, including a model the model repository does not have.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from lucerna.orchestrator.errors import ConfigurationError
from lucerna.orchestrator.jobs import Priority
from lucerna.orchestrator.studies import InstanceRef, StudySnapshot, distinct

Values = tuple[Annotated[str, Field(min_length=1)], ...]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Match(_Strict):
    """The conditions of a rule; every one given must hold."""

    modalities: Values | None = None
    body_parts: Values | None = None
    sop_class_uids: Values | None = None
    calling_ae_titles: Values | None = None
    study_description: str | None = None  # a regular expression, searched case-insensitively

    @field_validator("modalities", "body_parts", "sop_class_uids", "calling_ae_titles")
    @classmethod
    def _upper(cls, values: Values | None) -> Values | None:
        if values is None:
            return None
        if not values:
            raise ValueError("must list at least one value (leave the condition out to match any)")
        return tuple(value.strip().upper() for value in values)

    @field_validator("study_description")
    @classmethod
    def _regex(cls, pattern: str | None) -> str | None:
        if pattern is not None:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"is not a valid regular expression: {exc}") from exc
        return pattern

    @model_validator(mode="after")
    def _not_empty(self) -> Match:
        if all(value is None for value in self.model_dump().values()):
            raise ValueError("a rule must name at least one condition")
        return self

    def matches(self, study: StudySnapshot) -> bool:
        """Whether the study meets every condition."""
        lists = (
            (self.modalities, study.modalities),
            (self.body_parts, study.body_parts),
            (self.sop_class_uids, study.sop_class_uids),
            (self.calling_ae_titles, study.calling_ae_titles),
        )
        for wanted, values in lists:
            if wanted is not None and not {v.strip().upper() for v in values} & set(wanted):
                return False
        return self.study_description is None or bool(
            re.search(self.study_description, study.study_description, re.IGNORECASE)
        )

    def admits(self, instance: InstanceRef) -> bool:
        """Whether the instance meets the instance-level conditions."""
        checks = (
            (self.modalities, instance.modality),
            (self.body_parts, instance.body_part),
            (self.sop_class_uids, instance.sop_class_uid),
        )
        return all(wanted is None or value.strip().upper() in wanted for wanted, value in checks)


class Rule(_Strict):
    """One workflow rule."""

    name: Annotated[str, Field(min_length=1)]
    match: Match
    models: tuple[Annotated[str, Field(min_length=1)], ...] = Field(min_length=1)
    priority: Priority


class _RulesFile(_Strict):
    rules: tuple[Rule, ...]


@dataclass(frozen=True)
class Planned:
    """What one model is to run over for a study."""

    model: str
    priority: Priority
    instances: tuple[InstanceRef, ...]
    rules: tuple[str, ...]  # the names of the rules that asked for it


@dataclass(frozen=True)
class RuleSet:
    """The checked rules of a file."""

    rules: tuple[Rule, ...]

    def plan(self, study: StudySnapshot) -> list[Planned]:
        """The models to run on the study, by model name, each with its priority and instances."""
        planned: dict[str, Planned] = {}
        for rule in self.rules:
            if not rule.match.matches(study):
                continue
            admitted = tuple(i for i in study.instances if rule.match.admits(i))
            if not admitted:
                continue
            for model in rule.models:
                earlier = planned.get(model)
                if earlier is None:
                    planned[model] = Planned(model, rule.priority, distinct(admitted), (rule.name,))
                    continue
                priority = max(earlier.priority, rule.priority, key=lambda p: p.rank)
                instances = distinct((*earlier.instances, *admitted))
                planned[model] = Planned(model, priority, instances, (*earlier.rules, rule.name))
        return [planned[model] for model in sorted(planned)]


def load_rules(path: Path, models: Mapping[str, str]) -> RuleSet:
    """The rules of ``path``, checked against the model repository's ``models`` (name → version);
    ``ConfigurationError`` naming the file, the rule and the field at fault."""
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigurationError(f"{path}: cannot be read: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigurationError(f"{path}: (top): must be a mapping with a 'rules' list")
    try:
        parsed = _RulesFile.model_validate(raw)
    except ValidationError as exc:
        raise ConfigurationError(f"{path}: {_describe(exc, raw)}") from exc
    if not parsed.rules:
        raise ConfigurationError(f"{path}: rules: lists no rule")
    problems = []
    seen: set[str] = set()
    for index, rule in enumerate(parsed.rules):
        where = f"rules[{index}] ({rule.name})"
        if rule.name in seen:
            problems.append(f"{where}: name: another rule is called {rule.name!r}")
        seen.add(rule.name)
        for model in rule.models:
            if model not in models:
                known = ", ".join(sorted(models)) or "none"
                problems.append(
                    f"{where}: models: {model!r} is not in the model repository (it has: {known})"
                )
    if problems:
        raise ConfigurationError(f"{path}: " + "; ".join(problems))
    return RuleSet(parsed.rules)


def _describe(exc: ValidationError, raw: object) -> str:
    """Pydantic's errors as ``rules[i] (name).field: message``."""
    problems = []
    for error in exc.errors():
        location = [str(part) for part in error["loc"]]
        if len(location) >= 2 and location[0] == "rules" and location[1].isdigit():
            index = int(location[1])
            label = f"rules[{index}]{_rule_name(raw, index)}"
            location = [label, *location[2:]]
        problems.append(f"{'.'.join(location) or '(top)'}: {error['msg']}")
    return "; ".join(problems)


def _rule_name(raw: object, index: int) -> str:
    try:
        name = raw["rules"][index]["name"]  # type: ignore[index]
    except (KeyError, IndexError, TypeError):
        return ""
    return f" ({name})" if isinstance(name, str) else ""
