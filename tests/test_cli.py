"""CLI behaviour: help, listing, token parsing, the console script (bad inputs: tests/test_bad_inputs.py)."""
import subprocess
import sys

import pytest

from effexport.exporter.cli import main, parse_tokens


def test_help_teaches(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "report" in out and "exit codes" in out and "examples" in out


def test_list_shows_every_sample(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name in ("gemma4-e2b", "gemma4-e4b", "laguna-xs2", "zaya1-8b", "deepseek-v4-flash", "gemma4-e2b:tiny"):
        assert name in out


@pytest.mark.parametrize("text, tokens", [
    pytest.param("131072", 131072, id="plain"), pytest.param("128k", 131072, id="k"),
    pytest.param("1M", 1 << 20, id="M")])
def test_parse_tokens(text, tokens):
    assert parse_tokens(text) == tokens


def test_console_script_exit_code_and_no_traceback():
    proc = subprocess.run([sys.executable, "-m", "effexport.exporter", "report", "nope"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "unknown model 'nope'" in proc.stderr


def test_dump_after_help_names_every_pass(capsys):
    from effexport.passes.pipeline import PASS_NAMES

    with pytest.raises(SystemExit):
        main(["build", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert all(name in out for name in PASS_NAMES)
