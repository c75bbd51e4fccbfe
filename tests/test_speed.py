"""`adamkit speed`: parameter sets, byte counts, and the table/JSON it writes (no timings
are asserted)."""

from __future__ import annotations

import argparse
import json
import math
import statistics

import pytest
import torch

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
    assert sum(speed.traffic_per_param(name, state_dtype, kwargs)) == pytest.approx(expected)


def test_int8_bytes_per_param():
    # two 1-byte states plus one float32 absmax per 256 elements, read and written
    assert sum(speed.traffic_per_param("adam", "int8")) == pytest.approx(12 + 4 * (1 + 4 / 256))


@pytest.mark.parametrize("name,state_dtype,read,written", [
    ("adamw", None, 16, 12),  # p, g, m, v read; p, m, v written
    ("lion", None, 12, 8),  # p, g, m read; p, m written
    # FAdam's three maps: g; p, g, fim (sums only); p, g, fim, exp_avg -> p, fim, exp_avg
    ("fadam", None, 4 + 12 + 16, 12),
    # Adafactor on 64 x 4096: one pass over g and p (8 B) that also reads and writes the row
    # factor (64 values); the mean of the row factor (64 read); the column factor's EMA (its
    # 4096 values and the column means, read and written); sum(U^2) from the column means and
    # w (2 x 4096 read); the update (p, g: 8 B, a: 64 and b: 4096 read; p written)
    ("adafactor", None, 8 + 8 + 4 * (3 * 64 + 5 * 4096) / (64 * 4096),
     4 + 4 * (64 + 2 * 4096) / (64 * 4096)),
    # int8 (64 x 4096 is above the 4096-element threshold): each state is 1-byte codes plus a
    # float32 absmax per 256-element block; p and g stay float32
    ("adamw", "int8", 4 + 4 + 2 * (1 + 4 / 256), 4 + 2 * (1 + 4 / 256)),
])
def test_traffic_per_param_splits_reads_and_writes(name, state_dtype, read, written):
    assert speed.traffic_per_param(name, state_dtype) == (pytest.approx(read),
                                                          pytest.approx(written))


def test_floor_prices_reads_and_writes_at_the_measured_bandwidth():
    bandwidth = speed.Bandwidth(read_gbps=20.0, write_ns_per_byte=0.01)
    n = 1_000_000
    # AdamW's traffic: 16 bytes read at 20 GB/s, 12 written at 0.01 ns each, per parameter
    expected_s = n * 16 / 20e9 + n * 12 * 0.01e-9
    assert bandwidth.floor_seconds(n * 16, n * 12) == pytest.approx(expected_s)
    row = speed._row("adamw", "adamkit", "fused", "float32", [2e-3, 1e-3, 3e-3], n, (16.0, 12.0),
                     [1e-3], 8 * n, bandwidth)
    assert row.floor_ms == pytest.approx(expected_s * 1e3)
    assert row.pct_of_floor == pytest.approx(100 * expected_s / 2e-3)  # over the median step
    assert (row.read_bytes_per_param, row.written_bytes_per_param) == (16.0, 12.0)
    assert row.bytes_per_param == 28.0
    assert row.effective_gbps == pytest.approx(28 * n / 2e-3 / 1e9)


def test_memory_bandwidth_is_measured():
    bandwidth = speed.memory_bandwidth(nbytes=1 << 20, repeats=2)
    assert bandwidth.read_gbps > 0 and math.isfinite(bandwidth.read_gbps)
    assert bandwidth.write_ns_per_byte >= 0 and math.isfinite(bandwidth.write_ns_per_byte)


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
    assert lines[1].startswith("read bandwidth:") and "write-back" in lines[1]
    numeric = ("ms/step", "Mparam/s", "B/param", "eff GB/s", "floor ms", "% floor",
               "x fusedAdamW", "state B/param")
    header = next(k for k, line in enumerate(lines) if line.startswith("optimizer"))
    assert " ".join(lines[header].split()).endswith(" ".join(numeric))
    table = lines[header + 2:lines.index("", header)]  # the rows, up to the blank line
    assert len(table) >= 5
    for line in table:
        cells = dict(zip(numeric, line.split()[-len(numeric):]))  # engine may hold spaces
        for column in ("floor ms", "% floor"):
            assert math.isfinite(float(cells[column])) and float(cells[column]) > 0, line
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
        for key in ("floor_ms", "pct_of_floor", "read_bytes_per_param",
                    "written_bytes_per_param"):
            assert math.isfinite(r[key]) and r[key] > 0, key
        assert r["read_bytes_per_param"] + r["written_bytes_per_param"] == pytest.approx(
            r["bytes_per_param"])
        assert r["pct_of_floor"] == pytest.approx(100 * r["floor_ms"] / r["ms_per_step"])
    int8 = [r for r in data["rows"] if r["implementation"] == "adamkit"
            and r["state_dtype"] == "int8" and r["optimizer"] == "adamw"][0]
    assert int8["state_bytes_per_param"] < 4  # float32: 8; small tensors stay float32 here
    assert data["copy_gbps"] > 0
    assert math.isfinite(data["read_gbps"]) and data["read_gbps"] > 0
    assert math.isfinite(data["write_ns_per_byte"]) and data["write_ns_per_byte"] >= 0
    torch_fused = [r for r in data["rows"] if r["engine"] == "fused (torch)"][0]
    assert (torch_fused["read_bytes_per_param"], torch_fused["written_bytes_per_param"]) == (16, 12)


@pytest.mark.parametrize("name,state_dtype,read,written", [
    ("adamw", None, 8.0, 6.0),  # p, g, m, v in bfloat16: torch's own bfloat16 AdamW
    ("adamw", "float32", 12.0, 10.0),  # 2 + 2 + 4 + 4 read; 2 + 4 + 4 written
    ("lion", None, 6.0, 4.0),
])
def test_traffic_of_bfloat16_parameters(name, state_dtype, read, written):
    assert speed.traffic_per_param(name, state_dtype, dtype=torch.bfloat16) == (
        pytest.approx(read), pytest.approx(written))


def test_param_dtype_rows_use_their_own_baseline_and_state(tmp_path, capsys, monkeypatch):
    """--param-dtype float32,bfloat16: rows of each dtype step parameters of that dtype next
    to a torch fused AdamW on the same parameters; "float32" state on bfloat16 parameters is
    state_dtype="float32", "bfloat16" state there is the default (the parameters' dtype)."""
    created = []
    original = speed.time_interleaved

    def recording(opt, baseline, steps, warmup):
        dtypes = {p.dtype for g in opt.param_groups for p in g["params"]}
        base_dtypes = {p.dtype for g in baseline.param_groups for p in g["params"]}
        created.append((type(opt).__name__, dtypes, base_dtypes,
                        getattr(opt, "state_dtype", "torch")))
        return original(opt, baseline, steps, warmup)

    monkeypatch.setattr(speed, "time_interleaved", recording)
    out = tmp_path / "speed.json"
    assert speed.main(["--shapes", "uniform", "--scale", "0.001", "--steps", "1", "--warmup",
                       "0", "--optimizers", "lion", "--param-dtype", "float32,bfloat16",
                       "--state-dtype", "float32,bfloat16", "--json", str(out)]) == 0
    f32, bf16 = {torch.float32}, {torch.bfloat16}
    assert created == [("Lion", f32, f32, None), ("Lion", f32, f32, "bfloat16"),
                       ("Lion", bf16, bf16, "float32"), ("Lion", bf16, bf16, None)]
    rows = json.loads(out.read_text())["rows"]
    seen = [(r["optimizer"], r["engine"], r["param_dtype"], r["state_dtype"],
             r["state_bytes_per_param"], r["bytes_per_param"]) for r in rows]
    assert seen == [
        ("adamw", "fused (torch)", "float32", "float32", 8.0, 28.0),
        ("lion", "fused", "float32", "float32", 4.0, 20.0),
        ("lion", "fused", "float32", "bfloat16", 2.0, 16.0),
        ("adamw", "fused (torch)", "bfloat16", "bfloat16", 4.0, 14.0),
        ("lion", "fused", "bfloat16", "float32", 4.0, 14.0),
        ("lion", "fused", "bfloat16", "bfloat16", 2.0, 10.0),
    ]
    table = capsys.readouterr().out
    header = next(line for line in table.splitlines() if line.startswith("optimizer"))
    assert header.split()[:5] == ["optimizer", "impl", "engine", "params", "state"]
    # without --state-dtype each dtype's state is kept in the parameters' dtype, as torch does
    created.clear()
    assert speed.main(["--shapes", "uniform", "--scale", "0.001", "--steps", "1", "--warmup",
                       "0", "--optimizers", "lion", "--param-dtype", "float32,bfloat16",
                       "--json", str(out)]) == 0
    assert created == [("Lion", f32, f32, None), ("Lion", bf16, bf16, None)]
    rows = json.loads(out.read_text())["rows"]
    assert [(r["param_dtype"], r["state_dtype"]) for r in rows if r["optimizer"] == "lion"] \
        == [("float32", "float32"), ("bfloat16", "bfloat16")]


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
    with pytest.raises(SystemExit):
        parser.parse_args(["--param-dtype", "float16"])
    assert parser.parse_args(["--param-dtype", "bfloat16"]).param_dtype == ["bfloat16"]
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
