"""Typed config input is bounded and read as users mean it (issue 23, classes 4 and 8).

A few hundred bytes of YAML aliases, a huge file or a huge override are refused in one short line
in bounded memory; ``1e-3`` is a number in a file and on the command line, and ``1e5`` is not an
integer.
"""
from __future__ import annotations

import tracemalloc

import pytest
import yaml

from kd3.cli import main
from kd3.config import MAX_CONFIG_BYTES, PRESETS_DIR, SHOWN_CHARS, ConfigError, DistillConfig, dump_config, load_config, load_yaml, short

# Ten levels of nine aliases in method options (any value is allowed there): 9**10 (3.5 billion)
# strings once expanded, in under 500 bytes; anything that walks the values (``to_dict`` when a run
# saves its config, a repr in an error message) would expand them.
BOMB = 'method:\n  name: kd3\n  a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n' + "".join(
    f"  {chr(98 + i)}: &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 9)}]\n" for i in range(9))


def _stderr(capsys) -> list[str]:
    return capsys.readouterr().err.strip().splitlines()


def _peak_bytes(call) -> int:
    """The most Python memory ``call`` held at once."""
    tracemalloc.start()
    try:
        call()
    except ConfigError:
        pass
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak


# -- class 4: bounded input ----------------------------------------------------------------------------------------

def test_hostile_yaml_bomb_file_is_refused_in_one_short_line_and_bounded_memory(tmp_path, capsys):
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(BOMB)
    assert len(BOMB) < 500
    assert _peak_bytes(lambda: dump_config(load_config(DistillConfig, bomb))) < 5_000_000  # unbounded: gigabytes
    capsys.readouterr()
    assert main(["distill", str(bomb), f"output_dir={tmp_path / 'runs'}"]) == 2
    assert _stderr(capsys) == [f"kd3 distill: error: {bomb}: more than 100000 values once its aliases (*name) are "
                               "expanded, or an alias inside itself; write the values out instead of aliasing them"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bomb.yaml"]  # no run directory


@pytest.mark.parametrize("text", ["a: &a [*a]", "a: &a {b: *a}"], ids=["list", "mapping"])
def test_hostile_alias_inside_itself_is_refused(tmp_path, capsys, text):
    path = tmp_path / "loop.yaml"
    path.write_text(text)
    capsys.readouterr()
    assert main(["config", "show", str(path), "--as", "distill"]) == 2
    assert _stderr(capsys) == [f"kd3 config: error: {path}: more than 100000 values once its aliases (*name) are "
                               "expanded, or an alias inside itself; write the values out instead of aliasing them"]


def test_hostile_yaml_bomb_in_an_override_is_refused(capsys):
    levels = "[&a [1,1,1,1,1,1,1,1,1], " + ", ".join(
        f"&{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 9)}]" for i in range(8)) + "]"
    override = f"train.milestones={levels}"
    assert _peak_bytes(lambda: load_config(DistillConfig, None, [override])) < 5_000_000
    capsys.readouterr()
    assert main(["config", "show", "recommended", override]) == 2
    (line,) = _stderr(capsys)
    assert line.startswith("kd3 config: error: recommended: override 'train.milestones=[&a [1,1,1,") and line.endswith(
        ": more than 100000 values once its aliases (*name) are expanded, or an alias inside itself; write the "
        "values out instead of aliasing them")
    assert len(line) < 300


def test_hostile_huge_config_file_is_refused_unread(tmp_path, capsys):
    path = tmp_path / "huge.yaml"
    with path.open("w") as handle:  # a valid YAML mapping, only far too big
        handle.write("name: x\n")
        handle.write("# padding\n" * (MAX_CONFIG_BYTES // 10 + 1))
    capsys.readouterr()
    assert main(["config", "show", str(path), "--as", "distill"]) == 2
    assert _stderr(capsys) == [f"kd3 config: error: {path}: over 1024 KiB, too big to be a kd3 config (a config is "
                               "a few kilobytes); is it the right file?"]


def test_hostile_deeply_nested_file_is_one_line(tmp_path, capsys):
    path = tmp_path / "deep.yaml"
    path.write_text("a: " + "[" * 100_000)
    capsys.readouterr()
    assert main(["config", "show", str(path), "--as", "distill"]) == 2
    assert _stderr(capsys) == [f"kd3 config: error: {path}: nested too deeply to be a kd3 config"]


def test_hostile_binary_file_as_config_is_one_line(tmp_path, capsys):
    path = tmp_path / "random.yaml"
    path.write_bytes(bytes(range(128, 256)) * 8)
    capsys.readouterr()
    assert main(["config", "show", str(path), "--as", "distill"]) == 2
    assert _stderr(capsys) == [f"kd3 config: error: {path}: not UTF-8 text (byte 0); a config is a YAML text file"]


@pytest.mark.parametrize("override", [f"train.milestones=[{', '.join(['1.5'] * 2000)}]", "name=" + "x" * 5000,
                                      "train.lr=" + "y" * 1000, "x" * 1000 + "=1"],
                         ids=["long-list", "long-override", "long-value", "long-key"])
def test_hostile_long_values_are_cut_in_the_message(capsys, override):
    capsys.readouterr()
    assert main(["config", "show", "recommended", override]) == 2
    (line,) = _stderr(capsys)
    assert len(line) < 400 and "..." in line  # the value is shown, cut to about SHOWN_CHARS


def test_short_cuts_any_value_to_the_shown_length():
    nested = [["x" * 500] * 50] * 50
    assert len(short(nested)) <= SHOWN_CHARS and short(nested).endswith("...")
    assert short(0.05) == "0.05" and short("kd3") == "'kd3'"


# -- class 8: numbers as users type them ----------------------------------------------------------------------------

@pytest.mark.parametrize("text, value", [("1e-3", 1e-3), ("1E5", 1e5), (".5", 0.5), ("-2e-4", -2e-4), ("+1.5e+3", 1500.0),
                                         ("-.5", -0.5), ("1.", 1.0), ("1_000.5", 1000.5), (".inf", float("inf"))])
def test_yaml_1_2_floats_are_floats(text, value):
    assert load_yaml(text, "x") == value and isinstance(load_yaml(text, "x"), float)


def test_yaml_1_1_read_these_as_strings():
    """What the loader fixes: PyYAML's own resolver (YAML 1.1) needs a dot and a signed exponent."""
    assert [yaml.safe_load(t) for t in ("1e-3", "1E5", "-2e-4", "-.5")] == ["1e-3", "1E5", "-2e-4", "-.5"]


@pytest.mark.parametrize("text, value", [("10", 10), ("0x1f", 31), ("1_000", 1000), ("abc", "abc"), ("1e", "1e"),
                                         ("e5", "e5"), ("1.2.3", "1.2.3")])
def test_ints_and_strings_stay_what_they_were(text, value):
    assert load_yaml(text, "x") == value and type(load_yaml(text, "x")) is type(value)


def test_hostile_exponent_floats_work_in_overrides_and_files(tmp_path, capsys):
    cfg = load_config(DistillConfig, "recommended", ["train.lr=1e-3", "method.keep_fraction=1e-9"])
    assert cfg.train.lr == 1e-3 and cfg.method["keep_fraction"] == 1e-9
    path = tmp_path / "mine.yaml"
    path.write_text("base: " + str(PRESETS_DIR / "recommended.yaml") +
                    "\ntrain:\n  lr: 1e-3\n  weight_decay: 5E-4\n")
    cfg = load_config(DistillConfig, path)
    assert (cfg.train.lr, cfg.train.weight_decay) == (1e-3, 5e-4)
    capsys.readouterr()
    assert main(["config", "show", "recommended", "train.lr=1e-3"]) == 0
    assert "  lr: 0.001\n" in capsys.readouterr().out


def test_hostile_exponent_for_an_integer_is_refused_as_not_an_integer(capsys):
    capsys.readouterr()
    assert main(["config", "show", "recommended", "train.epochs=1e5"]) == 2
    (line,) = _stderr(capsys)
    assert line.endswith("train.epochs: expected an integer, got 100000.0 (a float); write it as 100000")
    assert main(["config", "show", "recommended", "train.epochs=1.5e0"]) == 2
    assert _stderr(capsys)[0].endswith("train.epochs: expected int, got 1.5 (float)")
