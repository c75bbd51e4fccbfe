"""`adamkit speed`: parameter sets, byte counts, and the table/JSON it writes (no timings
are asserted)."""

from __future__ import annotations

import argparse
import json
import statistics

import pytest

from adamkit.bench import speed


def test_parameter_sets():
    gpt2 = speed.gpt2_shapes()
    assert len(gpt2) == 148
    assert sum(int(__import__("math").prod(s)) for s in gpt2) == 124_439_808  # GPT-2 small
    resnet = speed.resnet18_shapes()
    assert abs(sum(int(__import__("math").prod(s)) for s in resnet) - 11_689_512) < 20_000
    small = speed.scaled(gpt2, 0.01)
    assert len(small) == len(gpt2) and small[0] == (503, 768) and small[2] == (8,)


@pytest.mark.parametrize("name,kwargs,state_dtype,expected", [
    ("adam", {}, None, 28.0),  # p, g, m, v read; p, m, v written
    ("adam", {"amsgrad": True}, None, 36.0),
    ("adamw", {}, "bfloat16", 20.0),
    ("lion", {}, None, 20.0),
    ("sgd", {"momentum": 0.9}, None, 20.0),
    ("sgd", {}, None, 12.0),
    ("adamod", {}, None, 36.0),
    ("fadam", {}, None, 44.0),  # three passes: g; p, g, f (sums); p, g, f, m -> p, f, m
])
def test_bytes_per_param_follow_the_algorithm(name, kwargs, state_dtype, expected):
    assert speed.bytes_per_param(name, state_dtype, kwargs) == pytest.approx(expected)


def test_int8_bytes_per_param():
    # two 1-byte states plus one float32 absmax per 256 elements, read and written
    assert speed.bytes_per_param("adam", "int8") == pytest.approx(12 + 4 * (1 + 4 / 256))


def test_speed_command_prints_table_and_writes_json(tmp_path, capsys):
    out = tmp_path / "speed.json"
    code = speed.main(["--shapes", "resnet18", "--scale", "0.02", "--steps", "1", "--warmup",
                       "0", "--optimizers", "adamw,lion", "--state-dtype", "float32,int8",
                       "--on-nonfinite", "apply,skip",
                       "--compare", "--json", str(out)])
    assert code == 0
    text = capsys.readouterr().out
    lines = text.splitlines()
    assert lines[0].startswith("copy bandwidth:")
    for column in ("ms/step", "Mparam/s", "B/param", "eff GB/s", "x fusedAdamW",
                   "state B/param"):
        assert column in text
    data = json.loads(out.read_text())
    rows = {(r["optimizer"], r["implementation"], r["engine"], r["state_dtype"])
            for r in data["rows"]}
    assert ("adamw", "torch", "fused (torch)", "float32") in rows
    assert ("adamw", "torch", "foreach", "float32") in rows
    assert any(r[0] == "lion" and r[1] == "adamkit" and r[3] == "int8" for r in rows)
    assert any(r[0] == "adamw" and r[1] == "adamkit" and r[2].endswith("+skip") for r in rows)
    for r in data["rows"]:
        assert r["ms_per_step"] > 0 and r["bytes_per_param"] > 0
        # the ratio is side by side: this row's median over the interleaved baseline's median
        assert len(r["samples_ms"]) >= 1 and len(r["baseline_samples_ms"]) >= 1
        expected = statistics.median(r["samples_ms"]) / statistics.median(r["baseline_samples_ms"])
        assert r["ratio_to_torch_fused_adamw"] == pytest.approx(expected)
    int8 = [r for r in data["rows"] if r["implementation"] == "adamkit"
            and r["state_dtype"] == "int8" and r["optimizer"] == "adamw"][0]
    assert int8["state_bytes_per_param"] < 4  # float32: 8; small tensors stay float32 here
    assert data["copy_gbps"] > 0


def test_bad_arguments_are_rejected():
    parser = argparse.ArgumentParser()
    speed.add_arguments(parser)
    with pytest.raises(SystemExit):
        parser.parse_args(["--optimizers", "adamm"])
    with pytest.raises(SystemExit):
        parser.parse_args(["--state-dtype", "int4"])
    with pytest.raises(SystemExit):
        parser.parse_args(["--scale", "0"])
    with pytest.raises(SystemExit):
        parser.parse_args(["--on-nonfinite", "apply,ignore"])
    assert parser.parse_args(["--on-nonfinite", "apply,skip"]).on_nonfinite == ["apply", "skip"]
    args = parser.parse_args(["--optimizers", "all"])
    assert "sparseadam" not in args.optimizers and "adamw" in args.optimizers


def test_bad_warmup_names_the_problem(capsys):
    parser = argparse.ArgumentParser()
    speed.add_arguments(parser)
    with pytest.raises(SystemExit):
        parser.parse_args(["--warmup", "-1"])
    assert "argument --warmup: must be >= 0, got -1" in capsys.readouterr().err
    assert parser.parse_args(["--warmup", "0"]).warmup == 0


def test_radam_is_timed_past_its_rectification_threshold(monkeypatch):
    """RAdam's first 5 steps are un-rectified (some libraries skip them): its rows warm up
    for at least 5 steps, the others for --warmup."""
    warmups = []
    original = speed.time_interleaved

    def recording(opt, baseline, steps, warmup):
        warmups.append((type(opt).__name__, warmup))
        return original(opt, baseline, steps, warmup)

    monkeypatch.setattr(speed, "time_interleaved", recording)
    assert speed.main(["--shapes", "uniform", "--scale", "0.001", "--steps", "1", "--warmup",
                       "1", "--optimizers", "radam,adam"]) == 0
    assert warmups == [("RAdam", 5), ("Adam", 1)]
