"""File-system and encoding problems are one line, exit 2, nothing written."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from finetune.cli.main import main
from finetune.data.sources import read_source
from finetune.errors import DataError, RecipeError
from finetune.recipe.schema import DataSource, recipe_from_dict
from tests.conftest import TINY_LLAMA, tiny_pretrain_recipe, write

KEY = "data.train.0.path"


def test_a_row_in_another_encoding_names_file_line_and_the_key_to_set(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"text": "a"}\n{"text": "b"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(DataError) as e:
        read_source(DataSource(path=str(path)), KEY)
    msg = str(e.value)
    assert msg.startswith(f"{path}:3: not valid utf-8 (byte 0xe9 at column 14); ") and "\n" not in msg
    assert "set data.train.0.encoding (e.g. latin-1" in msg
    rows = read_source(DataSource(path=str(path), encoding="latin-1"), KEY)
    assert rows[2].data == {"text": "café"} and rows[2].origin == f"{path}:3"


@pytest.mark.parametrize("suffix, body, line", [
    (".txt", b"doc one\n\nline\nbad \xff here\n", 4),
    (".json", b'[\n{"text": "a"},\n{"text": "\xfe"}\n]', 3),
])
def test_whole_file_formats_name_the_line_too(tmp_path, suffix, body, line):
    path = tmp_path / f"d{suffix}"
    path.write_bytes(body)
    with pytest.raises(DataError, match=rf"^{path}:{line}: not valid utf-8 \(byte 0x"):
        read_source(DataSource(path=str(path)), KEY)


def test_utf16_files_read_with_the_encoding_key(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(('{"text": "ä"}\n{"text": "b"}\n').encode("utf-16"))
    rows = read_source(DataSource(path=str(path), format="text", encoding="utf-16"), KEY)
    assert [r.data["text"] for r in rows] == ["ä", "b"]


def test_unknown_encoding_is_a_recipe_error():
    with pytest.raises(RecipeError, match=r"data\.train\.0\.encoding: unknown encoding .* \(got 'utf-9'\)"):
        recipe_from_dict({"model": {"name": "org/m"}, "data": {"train": [{"path": "x.jsonl", "encoding": "utf-9"}]},
                          "trainer": {"type": "sft"}, "run": {"output_dir": "o"}})


def test_a_file_the_system_refuses_is_one_line(tmp_path, monkeypatch):
    path = write(tmp_path / "d.jsonl", '{"text": "a"}\n')
    real_open = Path.open

    def refuse(self, *args, **kw):
        if self == path:
            raise PermissionError(13, "Permission denied")
        return real_open(self, *args, **kw)

    monkeypatch.setattr(Path, "open", refuse)  # root reads everything here: the OS refusal is simulated
    with pytest.raises(DataError, match=rf"^{path}: cannot read: Permission denied$"):
        read_source(DataSource(path=str(path)), KEY)


@pytest.mark.parametrize("where", ["file", "under_file", "unwritable"])
def test_an_output_dir_that_cannot_be_written_stops_before_loading(in_tmp, capsys, where):
    recipe = tiny_pretrain_recipe(in_tmp)
    blocker = write(in_tmp / "taken", "a file\n")
    out = {"file": blocker, "under_file": blocker / "run", "unwritable": Path("/proc/finetune-test/run")}[where]
    recipe["run"]["output_dir"] = str(out)
    path = write(in_tmp / "r.yaml", yaml.safe_dump(recipe))
    before = sorted(p.name for p in in_tmp.iterdir())
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("finetune: error: run.output_dir: ") and "\n" not in err, err
    assert {"file": "is not a directory", "under_file": "is a file, not a directory",
            "unwritable": "is not writable"}[where] in err
    assert sorted(p.name for p in in_tmp.iterdir()) == before and blocker.read_text() == "a file\n"


def test_max_length_beyond_learned_positions_is_refused_and_beyond_rotary_is_a_note(in_tmp, capsys):
    recipe = tiny_pretrain_recipe(in_tmp)
    recipe["model"]["init_config"] = {"model_type": "gpt2", "n_embd": 32, "n_layer": 1, "n_head": 2,
                                      "n_positions": 16}
    path = write(in_tmp / "r.yaml", yaml.safe_dump(recipe))
    assert main(["run", str(path), "--dry-run"]) == 2
    assert "tokenizer.max_length: 32 is beyond the 16 positions of this gpt2 model" in capsys.readouterr().err
    recipe["model"]["init_config"] = dict(TINY_LLAMA, max_position_embeddings=16)
    write(path, yaml.safe_dump(recipe))
    assert main(["run", str(path), "--dry-run"]) == 0
    assert "tokenizer.max_length 32 is beyond the model's 16 trained positions (llama)" in capsys.readouterr().err


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=st.binary(max_size=60) | st.text(max_size=40).map(lambda s: s.encode("utf-8", "surrogatepass")),
       suffix=st.sampled_from([".jsonl", ".json", ".txt"]),
       encoding=st.sampled_from(["utf-8", "latin-1", "utf-16"]))
def test_data_files_never_crash(tmp_path, body, suffix, encoding):
    path = tmp_path / f"fuzz{suffix}"
    path.write_bytes(body)
    try:
        read_source(DataSource(path=str(path), encoding=encoding), KEY)
    except DataError as e:
        assert str(e) and "\n" not in str(e)
    os.remove(path)


def test_rows_read_the_same_after_a_round_trip(tmp_path):
    # The binary line reader gives what the text reader gave: same rows, same origins.
    rows = [{"text": f"ü {i}"} for i in range(5)]
    path = write(tmp_path / "d.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows) + "\n")
    got = read_source(DataSource(path=str(path)), KEY)
    assert [r.data for r in got] == rows and [r.origin for r in got] == [f"{path}:{i}" for i in range(1, 6)]
