"""resnet_fast._jsonfile: tables read without ever failing, written atomically and merged
under a lock by concurrent writers (threads and processes)."""

import json
import multiprocessing
import threading
import warnings

import pytest

from resnet_fast import _jsonfile


def test_missing_file_is_an_empty_table_without_warning(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _jsonfile.read(tmp_path / "none.json", "test table") == {}


@pytest.mark.parametrize("text, reason", [("{not json", "JSONDecodeError"),
                                          ("[1, 2]", "expected a JSON object, got list"),
                                          (b"\xff\xfe", "UnicodeDecodeError")])
def test_corrupt_file_warns_once_and_reads_empty(tmp_path, text, reason):
    path = tmp_path / "t.json"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.warns(_jsonfile.TableWarning, match=f"ignoring test table .*t.json: .*{reason}"):
        assert _jsonfile.read(path, "test table") == {}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _jsonfile.read(path, "test table") == {}  # the same reason warns only once


def test_update_replaces_a_corrupt_file_and_leaves_no_temporaries(tmp_path):
    path = tmp_path / "sub" / "t.json"
    path.parent.mkdir()
    path.write_text("garbage")
    with pytest.warns(_jsonfile.TableWarning):
        stored = _jsonfile.update(path, "test table", lambda t: t.update(a=1))
    assert stored == {"a": 1} and json.loads(path.read_text()) == {"a": 1}
    assert sorted(p.name for p in path.parent.iterdir()) == ["t.json", "t.json.lock"]


def test_update_creates_the_directory(tmp_path):
    path = tmp_path / "a" / "b" / "t.json"
    _jsonfile.update(path, "test table", lambda t: t.update(k=[1, 2]))
    assert _jsonfile.read(path, "test table") == {"k": [1, 2]}


def test_failed_change_keeps_the_old_table(tmp_path):
    path = tmp_path / "t.json"
    _jsonfile.update(path, "test table", lambda t: t.update(a=1))

    def boom(table):
        table["b"] = object()  # not JSON-serialisable: the dump fails half-way

    with pytest.raises(TypeError):
        _jsonfile.update(path, "test table", boom)
    assert _jsonfile.read(path, "test table") == {"a": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.json", "t.json.lock"]


def _add_keys(path, start, count):
    for i in range(start, start + count):
        _jsonfile.update(path, "test table", lambda t, i=i: t.update({str(i): i}))


@pytest.mark.slow
def test_concurrent_writers_lose_no_entry(tmp_path):
    path = str(tmp_path / "t.json")
    threads = [threading.Thread(target=_add_keys, args=(path, 100 * k, 20)) for k in range(3)]
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_add_keys, args=(path, 1000 + 100 * k, 20)) for k in range(2)]
    for w in threads + procs:
        w.start()
    for w in threads + procs:
        w.join()
    assert all(p.exitcode == 0 for p in procs)
    table = _jsonfile.read(path, "test table")
    expected = {str(i): i for k in range(3) for i in range(100 * k, 100 * k + 20)}
    expected.update({str(i): i for k in range(2) for i in range(1000 + 100 * k, 1020 + 100 * k)})
    assert table == expected
