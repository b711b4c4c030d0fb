"""Validation of MarketplaceDB manifests: good input accepted, each bad field named precisely."""

from __future__ import annotations

import copy
import pathlib
from typing import Any

import pytest
import yaml

from marketplacedb_operator.api.conditions import Condition, set_condition
from marketplacedb_operator.cli import main
from marketplacedb_operator.durations import parse_duration
from marketplacedb_operator.reconcile_context import previous_status

ROOT = pathlib.Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "marketplacedb.yaml"


def _example() -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load(EXAMPLE.read_text())
    return document


def _validate(tmp_path: pathlib.Path, document: dict[str, Any], capsys: Any) -> tuple[int, str]:
    path = tmp_path / "resource.yaml"
    path.write_text(yaml.safe_dump(document))
    code = main(["validate", "-f", str(path)])
    captured = capsys.readouterr()
    return code, captured.err


def test_example_validates(capsys: Any) -> None:
    assert main(["validate", "-f", str(EXAMPLE)]) == 0
    assert "valid" in capsys.readouterr().out


def _index(document: dict[str, Any]) -> dict[str, Any]:
    index: dict[str, Any] = document["spec"]["indexes"][0]
    return index


@pytest.mark.parametrize(
    ("mutate", "field", "words"),
    [
        (lambda d: _index(d).update(name='x"; DROP TABLE users; --'), "spec.indexes[0].name", "not a safe PostgreSQL"),
        (lambda d: _index(d).update(name="a" * 64), "spec.indexes[0].name", "64 bytes"),
        (lambda d: _index(d).update(name="ïndex"), "spec.indexes[0].name", "not a safe PostgreSQL"),
        (lambda d: _index(d).update(where="true); DROP TABLE users; --"), "spec.indexes[0].where", "does not parse"),
        (
            lambda d: d["spec"]["materializedViews"][0]["refresh"].update(schedule="every 5 minutes"),
            "spec.materializedViews[0].refresh.schedule",
            "cron",
        ),
        (
            lambda d: d["spec"]["materializedViews"][0]["refresh"].update(schedule="61 * * * *"),
            "spec.materializedViews[0].refresh.schedule",
            "minute 0-59",
        ),
        (
            lambda d: d["spec"]["healthProbes"][0].update(readiness={"exec": {"command": ["true"]}}),
            "spec.healthProbes[0].readiness",
            "exec probes are not allowed",
        ),
        (
            lambda d: d["spec"]["pooler"]["parameters"].update(unknown_knob=1),
            "spec.pooler.parameters",
            "'unknown_knob' is not an allowed pooler parameter",
        ),
        (
            lambda d: d["spec"]["pooler"]["parameters"].update(pool_mode="session"),
            "spec.pooler.parameters",
            "'pool_mode' is a field of the pooler",
        ),
        (
            lambda d: d["spec"]["pooler"]["parameters"].update(server_idle_timeout="60\nadmin_users = evil"),
            "spec.pooler.parameters",
            "not a whole number",
        ),
        (lambda d: d["spec"]["pooler"].update(replicas=0), "spec.pooler.replicas", "greater than or equal to 1"),
        (lambda d: d["spec"]["ddl"].update(lockTimeout="5 seconds"), "spec.ddl.lockTimeout", "not a duration"),
        (
            lambda d: d["spec"]["database"]["settings"].update(max_connections="1000"),
            "spec.database.settings",
            "server-wide",
        ),
        (
            lambda d: d["spec"]["indexes"].append(copy.deepcopy(_index(d))),
            "spec",
            "duplicate index name",
        ),
        (
            lambda d: d["spec"]["materializedViews"][0].update(query="SELECT 1 AS id; DELETE FROM categories"),
            "spec.materializedViews[0].query",
            "exactly one statement",
        ),
    ],
)
def test_bad_field_exits_1_naming_it(tmp_path: pathlib.Path, capsys: Any, mutate: Any, field: str, words: str) -> None:
    document = _example()
    mutate(document)
    code, err = _validate(tmp_path, document, capsys)
    assert code == 1
    assert f"{field}: " in err and words in err, err


def test_unreadable_file_is_a_clear_error(tmp_path: pathlib.Path, capsys: Any) -> None:
    assert main(["validate", "-f", str(tmp_path / "missing.yaml")]) == 1
    assert "cannot read" in capsys.readouterr().err


@pytest.mark.parametrize(("text", "seconds"), [("500ms", 0.5), ("5s", 5), ("30m", 1800), ("1h30m", 5400)])
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(("text", "seconds"), [("2d", 172800), ("1d2h3m4s5ms", 93784.005), ("0s", 0)])
def test_durations_with_days_through_durationpy(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds, abs=1e-6)


@pytest.mark.parametrize("text", ["1h 30m", "1.5h", "-5s", "0", "5w", "10ns"])
def test_durations_durationpy_takes_but_the_crd_pattern_refuses(text: str) -> None:
    # durationpy parses every one of these; the CRD's pattern does not, so neither does the operator.
    with pytest.raises(ValueError, match="is not a duration"):
        parse_duration(text)


def test_duration_past_timedelta_range_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="out of range") as caught:
        parse_duration("9" * 20 + "d")
    assert caught.value.__cause__ is None and caught.value.__suppress_context__


def test_set_condition_keeps_transition_time_when_status_is_unchanged() -> None:
    import datetime

    t0 = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)
    t1 = t0 + datetime.timedelta(minutes=5)
    first = Condition(type="Ready", status="False", reason="Pending", last_transition_time=t0)
    same = Condition(type="Ready", status="False", reason="StillPending", last_transition_time=t1)
    flipped = Condition(type="Ready", status="True", reason="Ready", last_transition_time=t1)
    after_same = set_condition([first], same)
    assert after_same[0].last_transition_time == t0 and after_same[0].reason == "StillPending"
    assert set_condition(after_same, flipped)[0].last_transition_time == t1


def test_a_status_field_of_an_older_shape_drops_that_field_not_the_whole_status() -> None:
    """progress.seconds (before progress.since) made the whole status unreadable: teardown then saw
    no probedDeployments and left the probes on the application's Deployments."""
    old = {"status": {"probedDeployments": ["shop/web"], "observedGeneration": 3,
                      "progress": {"steps": 2, "phase": "queued", "seconds": 41}}}
    status = previous_status(old)
    assert status is not None and status.probed_deployments == ["shop/web"] and status.progress is None
    assert previous_status({"status": {"probedDeployments": "not-a-list", "bogus": 1}}) is not None
