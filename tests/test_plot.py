"""plot.py: SVG pictures of training runs (loss curves, accuracy against trainable parameters) and
its one-line errors."""
import json
import xml.etree.ElementTree as ET

import pytest

import plot


def write_run(folder, kind, n_steps, trainable, acc):
    """A run folder as train.py leaves it: log.jsonl with loss, val_loss, summary, accuracy."""
    folder.mkdir(parents=True)
    recs = [dict(step=s, loss=3.0 / s, lr=1e-3, tok_s=100) for s in range(1, n_steps + 1)]
    recs += [dict(step=s, val_loss=2.0 / s) for s in range(5, n_steps + 1, 5)]
    recs += [dict(summary=dict(steps=n_steps), trainable=trainable, total=10 ** 6),
             dict(base_acc=0.08, adapter_acc=acc)]
    (folder / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    return recs


def polylines(svg_path, cls):
    root = ET.parse(svg_path).getroot()
    lines = root.iter("{http://www.w3.org/2000/svg}polyline")
    return {p.get("data-run"): p.get("points").split() for p in lines if p.get("class") == cls}


def test_plot_draws_every_demo_run(tmp_path, capsys):
    runs = {"lora": write_run(tmp_path / "lora", "lora", 20, 221184, 1.0),
            "prefix": write_run(tmp_path / "prefix", "prefix", 12, 10240, 0.835)}
    (tmp_path / "base").mkdir()  # folders without a log are not runs
    loss, results = plot.main([f"--demo_dir={tmp_path}"])
    for name, recs in runs.items():  # a polyline per run, a point per logged step (and validation)
        assert len(polylines(loss, "loss")[name]) == sum("loss" in r for r in recs)
        assert len(polylines(loss, "val")[f"{name} val"]) == sum("val_loss" in r for r in recs)
    assert set(polylines(loss, "loss")) == {"lora", "prefix"}
    root = ET.parse(results).getroot()
    dots = [c for c in root.iter("{http://www.w3.org/2000/svg}circle")]
    assert len(dots) == 2 and float(dots[0].get("cx")) > float(dots[1].get("cx"))  # more params
    assert float(dots[0].get("cy")) < float(dots[1].get("cy"))  # higher accuracy, higher up
    assert "prefix (83.5%)" in open(results).read() and "wrote" in capsys.readouterr().out


def test_plot_errors_are_one_line(tmp_path):
    with pytest.raises(SystemExit, match="no run folders with a log.jsonl"):
        plot.main([f"--demo_dir={tmp_path}"])
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "log.jsonl").write_text("{not json\n")
    with pytest.raises(SystemExit, match=r"bad/log.jsonl: not one JSON object a line"):
        plot.main([f"--runs={tmp_path / 'bad'}"])
    with pytest.raises(SystemExit, match="has no log.jsonl"):
        plot.main([f"--runs={tmp_path}"])


def test_ticks_are_round_and_inside():
    assert plot.ticks(0, 100, False) == [0, 20, 40, 60, 80, 100]
    assert plot.ticks(1e3, 3e5, True) == [1000, 10000, 100000]
    assert plot.ticks(1e3, 3e4, True) == [1000, 2000, 5000, 10000, 20000]
    assert all(0.3 <= t <= 0.9 for t in plot.ticks(0.3, 0.9, True))
