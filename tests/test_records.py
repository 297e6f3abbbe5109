"""Recorded settings: reuse only what was made with the settings asked for now."""
import json

from s2dm.util.records import first_difference, read_record, reusable_record


def test_first_difference_names_the_first_differing_key():
    assert first_difference({"a": 1, "b": 2}, {"a": 1, "b": 2}) is None
    assert first_difference({"a": 1, "b": 2, "c": 3}, {"a": 1, "b": 5, "c": 4}) == ("b", 2, 5)
    assert first_difference({"a": 1}, {"a": 1, "z": 0}) == ("z", None, 0)  # a new key counts
    assert first_difference({"a": 1, "b": 2}, {"a": 9, "b": 3}, ignore=["a"]) == ("b", 2, 3)


def test_reusable_record(tmp_path):
    path = tmp_path / "cell.json"
    assert read_record(path) is None and reusable_record(path, "settings", {"n": 5}) is None
    path.write_text(json.dumps({"settings": {"n": 5}, "value": 0.25}))
    assert reusable_record(path, "settings", {"n": 5})["value"] == 0.25
    assert reusable_record(path, "settings", {"n": 6}) is None  # made otherwise: redo
    path.write_text('{"settings": {"n"')  # cut short by a kill: redo, never a traceback
    assert read_record(path) is None and reusable_record(path, "settings", {"n": 5}) is None
    path.write_text("[1, 2]")  # not a record
    assert read_record(path) is None
