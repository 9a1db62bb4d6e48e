"""cli.py: the configurator of every script. A setting the user gives is typed like its default and
checked where it is read: one line naming the flag and what was expected."""
import pytest

import cli


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "NaN", "Infinity"])
def test_a_number_that_is_not_finite_is_refused(value):
    """nan or inf as a learning rate, weight decay, clip or temperature would only show as nan
    losses steps later (or never): every float setting of every script refuses it by name."""
    with pytest.raises(cli.ConfigError, match=f"--learning_rate={value.lower()}"
                                              "|--learning_rate=-?inf|--learning_rate=nan"):
        cli.settle({"learning_rate": value}, {"learning_rate": 3e-4})
    with pytest.raises(cli.ConfigError, match="expected a finite number"):
        cli.settle({"weight_decay": value}, {"weight_decay": 0.0})
    assert cli.settle({"learning_rate": "1e-3"}, {"learning_rate": 3e-4})[0].learning_rate == 1e-3


def test_a_config_file_cannot_give_nan_either(tmp_path):
    (tmp_path / "run.py").write_text("grad_clip = float('nan')\n")
    with pytest.raises(cli.ConfigError, match="--grad_clip=nan: expected a finite number"):
        cli.configure([str(tmp_path / "run.py")], {"grad_clip": 1.0})


def test_an_adapter_option_takes_a_word_but_not_nan():
    """A float option may take a word (--scaling=learned, judged by the option's own check); nan
    is no such word."""
    options = lambda given: {"scaling": 1.0}  # noqa: E731
    assert cli.settle({"scaling": "learned"}, {}, options)[1] == {"scaling": "learned"}
    with pytest.raises(cli.ConfigError, match="--scaling=nan: expected a finite number"):
        cli.settle({"scaling": "nan"}, {}, options)


def test_thread_counts_are_bounded_by_the_cpus(monkeypatch):
    monkeypatch.setattr(cli.os, "cpu_count", lambda: 8)
    cli.check_threads("threads", 8)
    cli.check_threads("threads", 0)
    for n in (9, 100000, -1):
        with pytest.raises(cli.ConfigError, match=f"--threads={n}: expected 0 .* to 8, this "
                                                  "machine's CPU count"):
            cli.check_threads("threads", n)


@pytest.mark.parametrize("given, message", [
    ({"steps": "x"}, "--steps=x: expected int, like the default 10"),
    ({"compile": "maybe"}, "--compile=maybe: expected true or false"),
    ({"stepz": "1"}, "unknown setting --stepz"),
])
def test_a_wrong_setting_is_one_line_naming_it(given, message):
    with pytest.raises(cli.ConfigError, match=message):
        cli.settle(given, {"steps": 10, "compile": False})


@pytest.mark.parametrize("text, message", [
    ("learning_rate = 1e-4 +", "SyntaxError"), ("learning_rate = lr", "NameError: name 'lr'"),
    ("import nothing_here", "ModuleNotFoundError"), ("x = 1 / 0", "ZeroDivisionError"),
])
def test_a_config_file_that_fails_is_one_line_naming_it(tmp_path, text, message):
    (tmp_path / "run.py").write_text(text + "\n")
    with pytest.raises(cli.ConfigError, match=f"run.py: cannot read the config file \\({message}"):
        cli.configure([str(tmp_path / "run.py")], {"learning_rate": 3e-4})


def test_template_of_the_flag_the_adapter_and_the_default():
    """--template picks the prompt format for a bare base; an adapter's recorded template is used
    when the flag is absent, and a flag that contradicts it is refused by name."""
    from data.template import TEMPLATES
    assert cli.template_of({}, "") is TEMPLATES["alpaca"]
    assert cli.template_of({}, "", "llama3-chat") is TEMPLATES["llama3-chat"]
    chat = {"template": "llama3-chat"}
    assert cli.template_of(chat, "out/a") is TEMPLATES["llama3-chat"]
    assert cli.template_of(chat, "out/a", "llama3-chat") is TEMPLATES["llama3-chat"]
    with pytest.raises(cli.ConfigError, match="--template=alpaca, but out/a was trained with"):
        cli.template_of(chat, "out/a", "alpaca")
    with pytest.raises(cli.ConfigError, match="--template=chatml: known: alpaca, llama3-chat"):
        cli.template_of({}, "", "chatml")
    with pytest.raises(cli.ConfigError, match="out/b: unknown prompt template 'vicuna'; known: alpaca"):
        cli.template_of({"template": "vicuna"}, "out/b")


def test_fail_takes_an_exception_and_says_its_reason():
    """A loader's KeyError names the missing key in its own words; str() would quote them, and a
    bare KeyError() has no words at all."""
    for given, line in ((KeyError("model.norm.weight: missing"), "model.norm.weight: missing"),
                        (KeyError(), ""), (ValueError("--r=0: expected at least 1"),
                                           "--r=0: expected at least 1"), ("plain", "plain")):
        with pytest.raises(SystemExit) as e:
            cli.fail(given)
        assert str(e.value) == f"test_cli.py: error: {line}"
