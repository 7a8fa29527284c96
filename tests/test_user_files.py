"""Issue 26: --overwrite replaces only the files mbmerge wrote. A folder holding anything else (a user's
evaluation, a checkpoint) is refused in one line naming those files, and nothing in it is touched."""
import json

import pytest

from conftest import read_model


def snapshot(folder) -> dict:
    """Every file under `folder` (relative path -> bytes, mtime), and every folder (-> None)."""
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns) if p.is_file() else None
            for p in sorted(folder.rglob("*"))}


def merge_args(family, out, *more):
    p = family["paths"]
    return ("--method", "task_arithmetic", "--base", p["base"], "--experts", f"{p['math']},{p['code']}",
            "--out", out, *more)


def test_overwrite_refuses_a_folder_holding_the_users_files_and_touches_nothing(family, tmp_path, run_main):
    prev = tmp_path / "prev"
    code, _, err = run_main(*merge_args(family, prev))
    assert code == 0, err
    (prev / "my_eval.txt").write_text("accuracy 0.71\n")
    (prev / "ck").mkdir()
    (prev / "ck" / "a.bin").write_bytes(b"\x00\x01")
    before = snapshot(prev)

    code, out, err = run_main(*merge_args(family, prev, "--overwrite", "--scale", "0.5"))
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("mbmerge: error: output ")
    assert "holds files mbmerge did not write (ck/, my_eval.txt)" in err
    assert snapshot(prev) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prev"]       # no partial folder, no lock left


def test_overwrite_replaces_exactly_the_files_its_record_lists(family, tmp_path, run_main):
    prev = tmp_path / "prev"
    assert run_main(*merge_args(family, prev))[0] == 0
    record = json.loads((prev / "mbmerge.json").read_text())
    on_disk = sorted(str(p.relative_to(prev)) for p in prev.rglob("*") if p.is_file())
    assert record["files"] == on_disk and "mbmerge.json" in on_disk and "README.md" in on_disk

    code, _, err = run_main(*merge_args(family, prev, "--overwrite", "--scale", "0.5"))
    assert code == 0, err
    t = family["tensors"]
    got = read_model(prev)
    for n, b in t["base"].items():              # the new merge is in place: scale 0.5 (plain torch)
        want = (b + 0.5 * ((t["math"][n] - b) + (t["code"][n] - b))).bfloat16()
        assert got[n].equal(want), n


def test_an_output_recorded_before_the_file_list_is_read_from_its_checksums(family, tmp_path, run_main):
    """A record of an earlier version (sha256 of its files, no "files"): those files, the card and the
    record are its own; anything else is the user's."""
    prev = tmp_path / "prev"
    assert run_main(*merge_args(family, prev))[0] == 0
    record = json.loads((prev / "mbmerge.json").read_text())
    del record["files"]
    (prev / "mbmerge.json").write_text(json.dumps(record))
    (prev / "notes.md").write_text("mine")
    before = snapshot(prev)
    code, _, err = run_main(*merge_args(family, prev, "--overwrite"))
    assert code == 2 and "(notes.md)" in err and snapshot(prev) == before
    (prev / "notes.md").unlink()
    assert run_main(*merge_args(family, prev, "--overwrite"))[0] == 0


def test_files_added_by_a_tool_of_mbmerge_are_its_own(family, tmp_path, run_main):
    """tune writes tune.json and a plot beside its best merge and lists them (engine.output.own_files)."""
    from mbmerge.engine.output.place import own_files
    prev = tmp_path / "prev"
    assert run_main(*merge_args(family, prev))[0] == 0
    (prev / "tune.json").write_text("{}")
    own_files(prev, "tune.json")
    code, _, err = run_main(*merge_args(family, prev, "--overwrite"))
    assert code == 0, err
    assert not (prev / "tune.json").exists()


@pytest.mark.parametrize("many", [False, True])
def test_the_line_names_the_first_few_foreign_files(family, tmp_path, run_main, many):
    prev = tmp_path / "prev"
    assert run_main(*merge_args(family, prev))[0] == 0
    names = [f"e{i}.txt" for i in range(6 if many else 2)]
    for n in names:
        (prev / n).write_text(n)
    code, _, err = run_main(*merge_args(family, prev, "--overwrite"))
    assert code == 2
    shown = "e0.txt, e1.txt, e2.txt and 3 more" if many else "e0.txt, e1.txt"
    assert f"holds files mbmerge did not write ({shown})" in err
