"""Workflow rules: strict parsing with errors that name the file, the rule and the field; matching."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from lucerna.orchestrator.errors import ConfigurationError
from lucerna.orchestrator.jobs import Priority
from lucerna.orchestrator.rules import RuleSet, load_rules
from lucerna.orchestrator.studies import InstanceRef, StudySnapshot
from tests.unit.orchestrator.kit import CT, MODELS, SHIPPED_RULES, SR

CHEST = """
rules:
  - name: chest
    match: {modalities: [ct], body_parts: [Chest, LUNG]}
    models: [lung-nodule-detector]
    priority: routine
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "rules.yaml"
    path.write_text(text)
    return path


def rules(tmp_path: Path, text: str) -> RuleSet:
    return load_rules(write(tmp_path, text), MODELS)


def ref(sop: str, modality: str = "CT", body_part: str = "CHEST", sop_class: str = CT) -> InstanceRef:
    return InstanceRef(sop, "1.9", sop_class, sop.replace(".", "").ljust(64, "0"), modality, body_part)


def study(*instances: InstanceRef, description: str = "", aes: tuple[str, ...] = ("CT1",)) -> StudySnapshot:
    return StudySnapshot(
        study_uid="1.2.3",
        burst=1,
        ready_at=datetime.now(UTC),
        study_description=description,
        modalities=tuple(sorted({i.modality for i in instances})),
        body_parts=tuple(sorted({i.body_part for i in instances if i.body_part})),
        sop_class_uids=tuple(sorted({i.sop_class_uid for i in instances})),
        calling_ae_titles=aes,
        instances=instances,
    )


def test_the_shipped_rules_load_against_the_reference_models() -> None:
    shipped = load_rules(SHIPPED_RULES, MODELS)
    [chest] = shipped.plan(study(ref("1"), ref("2")))
    assert (chest.model, chest.priority) == ("lung-nodule-detector", Priority.ROUTINE)
    [head] = shipped.plan(study(ref("3", body_part=""), description="CT HEAD W/O CONTRAST"))
    assert (head.model, head.priority) == ("head-ct-hemorrhage", Priority.STAT)
    assert shipped.plan(study(ref("4", modality="MR", body_part="BRAIN"))) == []


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("rules: []", "rules: lists no rule"),
        ("nothing: here", "rules: Field required; nothing: Extra inputs are not permitted"),
        ("- just a list", "(top): must be a mapping with a 'rules' list"),
        (
            "rules:\n  - {name: r1, match: {modalities: [CT]}, models: [lung-nodule-detector],"
            " priority: urgent}",
            "rules[0] (r1).priority: Input should be 'stat' or 'routine'",
        ),
        (
            "rules:\n  - {name: r1, match: {}, models: [lung-nodule-detector], priority: stat}",
            "rules[0] (r1).match: Value error, a rule must name at least one condition",
        ),
        (
            "rules:\n  - {name: r1, match: {modalities: []}, models: [lung-nodule-detector], priority: stat}",
            "rules[0] (r1).match.modalities: Value error, must list at least one value",
        ),
        (
            "rules:\n  - {name: r1, match: {modality: [CT]}, models: [lung-nodule-detector], priority: stat}",
            "rules[0] (r1).match.modality: Extra inputs are not permitted",
        ),
        (
            "rules:\n  - {name: r1, match: {study_description: 'head('}, models: [x], priority: stat}",
            "rules[0] (r1).match.study_description: Value error, is not a valid regular expression",
        ),
        (
            "rules:\n  - {name: r1, match: {modalities: [CT]}, models: [], priority: stat}",
            "rules[0] (r1).models: Tuple should have at least 1 item after validation, not 0",
        ),
        (
            "rules:\n  - {name: r1, match: {modalities: [CT]}, models: [lung], priority: stat}",
            "rules[0] (r1): models: 'lung' is not in the model repository (it has: head-ct-hemorrhage,"
            " lung-nodule-detector, lung-nodule-detector-int8)",
        ),
        (
            "rules:\n  - {name: a, match: {modalities: [CT]}, models: [head-ct-hemorrhage], priority: stat}"
            "\n  - {name: a, match: {modalities: [MR]}, models: [head-ct-hemorrhage], priority: stat}",
            "rules[1] (a): name: another rule is called 'a'",
        ),
        ("rules: [", "cannot be read"),
    ],
)
def test_a_bad_rules_file_names_the_file_rule_and_field(tmp_path: Path, text: str, expected: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigurationError) as error:
        load_rules(path, MODELS)
    assert str(error.value).startswith(f"{path}: ")
    assert expected in str(error.value)
    assert "after validation, not 0" not in str(error.value).replace(expected, "")  # no echo of one error


def test_a_missing_rules_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match=r"absent\.yaml: cannot be read"):
        load_rules(tmp_path / "absent.yaml", MODELS)


def test_lists_match_case_insensitively_when_any_value_is_listed(tmp_path: Path) -> None:
    chest = rules(tmp_path, CHEST)
    [planned] = chest.plan(study(ref("1", modality="ct", body_part="lung")))
    assert planned.rules == ("chest",)
    assert chest.plan(study(ref("1", body_part="ABDOMEN"))) == []
    assert chest.plan(study(ref("1", modality="MR"))) == []


def test_every_condition_must_hold(tmp_path: Path) -> None:
    text = """
rules:
  - name: ct-from-er
    match:
      modalities: [CT]
      calling_ae_titles: [ER_CT]
      sop_class_uids: ["1.2.840.10008.5.1.4.1.1.2"]
      study_description: "^ct .*trauma"
    models: [head-ct-hemorrhage]
    priority: stat
"""
    er = rules(tmp_path, text)
    matching = study(ref("1"), description="CT polyTRAUMA", aes=("er_ct",))
    assert [p.model for p in er.plan(matching)] == ["head-ct-hemorrhage"]
    assert er.plan(study(ref("1"), description="CT polytrauma", aes=("WARD",))) == []
    assert er.plan(study(ref("1"), description="MR trauma", aes=("ER_CT",))) == []
    assert er.plan(study(ref("1", sop_class=SR), description="CT trauma", aes=("ER_CT",))) == []


def test_a_rule_hands_its_models_only_the_instances_it_admits(tmp_path: Path) -> None:
    chest = rules(tmp_path, CHEST)
    mixed = study(ref("1"), ref("2", body_part="HEAD"), ref("3", modality="SR", sop_class=SR, body_part=""))
    [planned] = chest.plan(mixed)
    assert [i.sop_instance_uid for i in planned.instances] == ["1"]
    # The study has CT (head) and CHEST (an X-ray), but no CT chest series: nothing to run.
    assert chest.plan(study(ref("1", body_part="HEAD"), ref("2", modality="CR"))) == []


def test_models_of_several_rules_run_once_at_the_highest_priority(tmp_path: Path) -> None:
    text = (
        CHEST
        + """
  - name: any-ct-urgent
    match: {modalities: [CT], calling_ae_titles: [ER_CT]}
    models: [lung-nodule-detector, head-ct-hemorrhage]
    priority: stat
"""
    )
    both = rules(tmp_path, text)
    planned = both.plan(study(ref("1"), ref("2", body_part="HEAD"), aes=("ER_CT",)))
    assert [(p.model, p.priority) for p in planned] == [
        ("head-ct-hemorrhage", Priority.STAT),
        ("lung-nodule-detector", Priority.STAT),
    ]
    lung = planned[1]
    assert lung.rules == ("chest", "any-ct-urgent")
    assert [i.sop_instance_uid for i in lung.instances] == ["1", "2"]  # the union, each once
