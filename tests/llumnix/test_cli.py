import json

from llumnix.cli import main
from llumnix.sim.traces import generate, save_jsonl


def test_sim_cli_writes_table_json_and_plot(tmp_path, capsys):
    rc = main(
        [
            "sim", "--traces", "M-M", "--rates", "3.0", "--num-requests", "300",
            "--instances", "4", "--policies", "infaas++,llumnix", "--out", str(tmp_path),
            "--quiet",
        ]
    )  # fmt: skip
    assert rc == 0
    out = capsys.readouterr().out
    assert "P99 prefill latency vs infaas++" in out
    doc = json.loads((tmp_path / "serving.json").read_text())
    assert [r["policy"] for r in doc["runs"]] == ["infaas++", "llumnix"]
    assert all(r["result"]["num_finished"] == 300 for r in doc["runs"])
    assert (tmp_path / "serving_M-M.png").stat().st_size > 0


def test_sim_cli_replays_a_trace_file(tmp_path, capsys):
    trace = tmp_path / "mine.jsonl"
    save_jsonl(generate(100, 2.0, "S-S", seed=5), trace)
    rc = main(
        [
            "sim", "--trace", str(trace), "--instances", "2", "--policies", "round_robin",
            "--out", str(tmp_path), "--quiet", "--no-plot",
        ]
    )  # fmt: skip
    assert rc == 0
    doc = json.loads((tmp_path / "serving.json").read_text())
    assert doc["runs"][0]["trace"] == "mine" and doc["runs"][0]["result"]["num_finished"] == 100
