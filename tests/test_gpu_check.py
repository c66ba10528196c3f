"""bench/gpu_check.py, the prepared GPU acceptance run, works end to end at toy sizes on a CPU:
every part runs (in its own process, under its limit), passes, and reports figures that
parse, in the markdown tables and in the JSON block (about a minute on 2 cores)."""

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PARTS = {1: "train", 2: "compile", 3: "sample", 4: "tokenizer", 5: "import", 6: "torchrun",
         7: "numerics"}
# Figures every part must report as finite positive numbers on a CPU.
POSITIVE = {
    "train": ["step time (median)", "images/s", "tokens/s", "achieved TFLOP/s", "estimated memory"],
    "compile": ["first step", "step time (median)", "tokens/s", "speed-up over eager (part 1)"],
    "sample": ["images/s, KV cache", "images/s, no cache", "KV-cache speed-up",
               "uncertainty measures per token", "mean image entropy"],
    "tokenizer": ["step time (median)", "images/s", "achieved TFLOP/s", "estimated memory"],
    "import": ["random state dicts written", "up import-var", "imported transformer parameters",
               "up generate, 8 images", "mean token entropy", "grid written"],
    "torchrun": ["torchrun wall time", "up sample", "up evaluate", "samples written", "FID"],
    "numerics": [],
}


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> tuple[str, dict]:
    out = tmp_path_factory.mktemp("gpu_check") / "check.md"
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--device", "cpu",
                           "--tiny", "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    text = out.read_text()
    block = re.search(r"```json\n(.*)\n```", text, re.S)
    assert block, "no JSON block in the report"
    return text, json.loads(block.group(1))


def test_every_part_is_listed_and_passes(report):
    text, data = report
    assert list(data["parts"]) == list(PARTS.values())
    for number, key in PARTS.items():
        part = data["parts"][key]
        assert part["number"] == number and part["status"] == "OK", (key, part.get("error"))
        assert 0 < part["seconds"] <= part["limit_s"]
        summary = re.search(rf"^\| {number}\. [^|]+ \| (\w+) \| ([\d.]+) \|", text, re.M)
        assert summary and summary.group(1) == "OK", key
        assert re.search(rf"^## {number}\. .+: OK$", text, re.M), key
    assert data["environment"]["status"] == "OK"
    env = {f["name"]: f["value"] for f in data["environment"]["figures"]}
    assert env["torch"] and env["device"] == "cpu"


def _section(text: str, number: int) -> str:
    return re.search(rf"^## {number}\. .*?(?=^## )", text, re.M | re.S).group(0)


def test_figures_parse_as_numbers(report):
    text, data = report
    for number, key in PARTS.items():
        names, section = POSITIVE[key], _section(text, number)
        figures = {f["name"]: f for f in data["parts"][key]["figures"]}
        assert all(f["setting"] or f["unit"] or isinstance(f["value"], bool | str)
                   for f in figures.values()), key
        for name in names:
            value = figures[name]["value"]
            assert isinstance(value, int | float) and math.isfinite(value) and value > 0, (key, name)
            row = re.search(rf"^\| {re.escape(name)} \| ([^|]+) \|", section, re.M)
            assert row and float(row.group(1).replace(",", "")) == pytest.approx(value, rel=1e-3), \
                (key, name)


def test_numerics_match_vars_outputs_and_checks_hold(report):
    _, data = report
    parts = data["parts"]
    numerics = {f["name"]: f["value"] for f in parts["numerics"]["figures"]}
    assert 0 <= numerics["fp32 logits: max abs diff to VAR's"] <= 1e-4
    assert numerics["greedy guided tokens differing, fp32"] == 0
    assert numerics["bf16 vs fp32: top-1 agreement"] == 1.0  # the project's autocast: CUDA only
    sample = {f["name"]: f["value"] for f in parts["sample"]["figures"]}
    assert sample["uncertainty finite"] is True
    torchrun = {f["name"]: f["value"] for f in parts["torchrun"]["figures"]}
    assert torchrun["gloo gather_object"] is True and torchrun["gloo all_reduce_sum"] is True
    train = {f["name"]: f["value"] for f in parts["train"]["figures"]}
    assert train["MFU"] is None and train["peak memory allocated"] is None  # CUDA-only figures
