"""plot.py: SVG pictures of training runs (loss curves, accuracy against trainable parameters) and
its one-line errors."""
import json
import os
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


# -------------------------------------------------- bad input, folders in use (docs/reliability.md)
def plot_run(folder, kind, acc=0.5, trainable=1000, extra=()):
    """A run folder as train.py leaves it (log.jsonl, adapter_config.json), with `extra` lines."""
    folder.mkdir(parents=True)
    recs = [dict(step=s, loss=3.0 / s) for s in range(1, 6)] + [dict(step=5, val_loss=1.0),
                                                               dict(trainable=trainable),
                                                               dict(base_acc=0.1, adapter_acc=acc)]
    lines = [json.dumps(r) for r in recs] + list(extra)
    (folder / "log.jsonl").write_text("\n".join(lines) + "\n")
    (folder / "adapter_config.json").write_text(json.dumps({"kind": kind, "options": {}}))
    return folder


@pytest.mark.parametrize("line, message", [
    ("[1, 2]", "line 9 is a JSON list"),
    ('"step 6"', "line 9 is a JSON str"),
    ('{"step": 6, "loss": "1.5"}', "record 9: field 'loss' is '1.5', expected a finite number"),
    ('{"step": 6, "loss": NaN}', "record 9: field 'loss' is nan, expected a finite number"),
    ('{"step": null, "loss": 1.0}', "record 9: field 'step' is None, expected a finite number"),
])
def test_plot_a_log_line_that_is_not_a_record(tmp_path, line, message):
    run = plot_run(tmp_path / "lora", "lora", extra=[line])
    with pytest.raises(SystemExit, match=f"{run / 'log.jsonl'}: .*{message}"):
        plot.main([f"--runs={run}", f"--out={tmp_path / 'pics'}"])
    assert not (tmp_path / "pics").exists() or os.listdir(tmp_path / "pics") == []


def svg_root(path):
    import xml.etree.ElementTree as ET
    return ET.parse(path).getroot()


def svg_all(root, name):
    return list(root.iter("{http://www.w3.org/2000/svg}" + name))


def test_plot_results_a_dot_at_100_percent_lies_inside_the_frame(tmp_path):
    run = plot_run(tmp_path / "lora", "lora", acc=1.0)
    _, results = plot.main([f"--runs={run}", f"--out={tmp_path}"])
    dot, = svg_all(svg_root(results), "circle")
    assert float(dot.get("cy")) - float(dot.get("r")) >= plot.TOP  # was cut by the frame's top


def test_plot_a_kind_keeps_its_colour_when_runs_are_added(tmp_path):
    """Colours come from the adapter kind, not from the run's place in the list: adding a run (or
    another order) changes no colour; a second run of a kind is dashed, in the same colour."""
    def colours(names):
        runs = ",".join(str(tmp_path / n) for n in names)
        loss, _ = plot.main([f"--runs={runs}", f"--out={tmp_path / 'pics'}"])
        return {p.get("data-run"): (p.get("stroke"), p.get("stroke-dasharray"))
                for p in svg_all(svg_root(loss), "polyline") if p.get("class") == "loss"}
    for name, kind in (("lora", "lora"), ("series", "series"), ("dora", "dora"),
                       ("prefix", "prefix"), ("gated", "prefix")):
        plot_run(tmp_path / name, kind)
    two = colours(["series", "lora"])
    four = colours(["dora", "prefix", "lora", "series", "gated"])
    assert two["lora"] == four["lora"] and two["series"] == four["series"]
    assert len({c for c, _ in four.values()}) == 4  # four kinds, four colours
    assert four["gated"] == (four["prefix"][0], "5 3") and four["prefix"][1] is None
    assert four["lora"][0] == plot.KIND_COLORS["lora"]


def test_plot_skips_records_it_cannot_place(tmp_path):
    """A loss without a step (a record another tool appended) is not drawn, and is no KeyError."""
    run = plot_run(tmp_path / "lora", "lora", extra=['{"loss": 0.5}', '{"note": "resumed"}'])
    loss, _ = plot.main([f"--runs={run}", f"--out={tmp_path}"])
    assert len(polylines(loss, "loss")["lora"]) == 5


def test_plot_checks_out_before_writing(tmp_path):
    """An --out that is a file, or under one: one line naming --out (before: FileExistsError)."""
    (tmp_path / "file").write_text("x")
    run = plot_run(tmp_path / "lora", "lora")
    with pytest.raises(SystemExit, match=f"--out={tmp_path / 'file'} is a file, expected a "
                                         "folder"):
        plot.main([f"--runs={run}", f"--out={tmp_path / 'file'}"])
    with pytest.raises(SystemExit, match=f"--out={tmp_path / 'file' / 'sub'}: cannot write "
                                         "there"):
        plot.main([f"--runs={run}", f"--out={tmp_path / 'file' / 'sub'}"])
