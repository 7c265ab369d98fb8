"""Parity checks in a user's CI: ``effexport check --junit / --json / --tolerance / --prompt-ids / --seed``,
tolerances from ``pyproject.toml``, and the pytest plugin (entry point ``pytest11``) run through ``pytester``.

One cheap artifact for the module: the two-layer model of tests/models/negatives.py pickled and built
with ``--trust-pickle`` (~10 s on 2 cores), plus a copy whose ONNX logits are multiplied by 1.001
inside the graph (max rel error ~1e-3: fails fp32's 1e-4, passes a 5e-3 override). Each check of it
re-loads the pickle and runs 8 decode steps (~1 s). The JUnit XML is checked against the common
JUnit schema's structure (what Jenkins' / GitLab's readers accept: testsuites > testsuite > testcase >
failure | error | system-out, with the counting attributes) by :func:`assert_junit`. Without a GPU,
the half-precision and CUDA-provider paths are checked on their parts: the cases of a half-precision
report, the configured tolerance as the half check's floor (bf16 eager as the artifact), and the
provider a session reports.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET

import onnx
import pytest
import torch
from models import negatives
from onnx import helper

from effexport.exporter.cli import main

pytest_plugins = ["pytester"]

STEPS = "8"
OUTPUT_CASES = ["logits/prefill", "logits/decode", "greedy-tokens"]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """``(good, perturbed)`` artifact directories (the perturbed one is the good one's copy with its
    logits scaled by 1.001 in the graph)."""
    root = tmp_path_factory.mktemp("ci")
    torch.save(negatives.build(negatives.NegConfig(layers=2, vocab=40)).eval(), root / "neg.pt")
    good = root / "art"
    assert main([str(root / "neg.pt"), "--trust-pickle", "-o", str(good), "--steps", STEPS]) == 0
    bad = root / "perturbed"
    shutil.copytree(good, bad)
    proto = onnx.load(str(bad / "model.onnx"))
    (producer,) = [n for n in proto.graph.node if "logits" in n.output]
    producer.output[list(producer.output).index("logits")] = "logits_unperturbed"
    proto.graph.node.append(helper.make_node("Constant", [], ["perturbation"], value=helper.make_tensor(
        "perturbation", onnx.TensorProto.FLOAT, [], [1.001])))
    proto.graph.node.append(helper.make_node("Mul", ["logits_unperturbed", "perturbation"], ["logits"]))
    onnx.save(proto, str(bad / "model.onnx"))
    return good, bad


def check(directory, *flags) -> int:
    return main(["check", str(directory), "--trust-pickle", "--steps", STEPS, *flags])


def assert_junit(path) -> dict:
    """``path`` has the common JUnit structure; returns ``{testcase name: (failure message | None,
    classname)}``. Rules: root ``testsuites`` (or one ``testsuite``); each testsuite has name, tests,
    failures, errors, and these count its testcases; each testcase has name and classname and only
    failure / error / skipped / system-out / system-err children, failure and error with a one-line
    message and a type."""
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root)
    assert root.tag in ("testsuites", "testsuite") and suites and all(s.tag == "testsuite" for s in suites)
    out = {}
    for suite in suites:
        for attr in ("name", "tests", "failures", "errors"):
            assert attr in suite.attrib, f"testsuite lacks {attr}"
        assert set(c.tag for c in suite) <= {"properties", "testcase", "system-out", "system-err"}
        for prop in suite.iter("property"):
            assert set(prop.attrib) == {"name", "value"}
        cases = suite.findall("testcase")
        assert int(suite.get("tests")) == len(cases)
        assert int(suite.get("failures")) == sum(c.find("failure") is not None for c in cases)
        assert int(suite.get("errors")) == sum(c.find("error") is not None for c in cases)
        for case in cases:
            assert case.get("name") and case.get("classname"), case.attrib
            assert {c.tag for c in case} <= {"failure", "error", "skipped", "system-out", "system-err"}
            problem = case.find("failure") if case.find("failure") is not None else case.find("error")
            if problem is not None:
                assert problem.get("type") and problem.get("message") and "\n" not in problem.get("message")
            out[case.get("name")] = (None if problem is None else problem.get("message"), case.get("classname"))
    if root.tag == "testsuites" and "tests" in root.attrib:
        assert int(root.get("tests")) == sum(int(s.get("tests")) for s in suites)
    return out


# ------------------------------------------------------------------------------- effexport check
def test_check_json_is_report_parity_plus_what_ran(built, tmp_path, capsys):
    """``--json`` (stdout): every key of report.json's ``parity`` with the build's values (same prompt,
    same steps), plus runtime, execution provider, device, dtype, tolerance sources and the prompt's
    seed; the table goes to stderr. ``--junit``: three passing cases under the common structure."""
    good, _ = built
    assert check(good, "--json", "--junit", str(tmp_path / "j.xml")) == 0
    out, err = capsys.readouterr()
    data = json.loads(out)
    report = json.loads((good / "report.json").read_text())["parity"]
    assert {k: data[k] for k in report} == report
    assert data["tolerances"] == {"logits/prefill": 1e-4, "logits/decode": 1e-4}
    assert data["runtime"].startswith("onnxruntime ") and data["execution_provider"] == "CPUExecutionProvider"
    assert data["device"] == "cpu" and data["dtype"] == "fp32" and data["target"] == "onnx"
    assert data["tolerance_sources"] == {"logits/prefill": "default (fp32)", "logits/decode": "default (fp32)"}
    assert data["prompt"] == {"source": "seed", "seed": 2, "batch": 2, "length": 8}
    assert "PARITY PASSED" in err and "CPUExecutionProvider" in err
    cases = assert_junit(tmp_path / "j.xml")
    assert list(cases) == OUTPUT_CASES and all(msg is None for msg, _ in cases.values())
    props = {p.get("name"): p.get("value") for p in ET.parse(tmp_path / "j.xml").getroot().iter("property")}
    assert props["execution_provider"] == "CPUExecutionProvider" and props["prompt.seed"] == "2"


def test_check_of_a_perturbed_artifact_fails_per_output(built, tmp_path, capsys):
    """Exit 1; the JUnit failures are the two logits cases (max abs, max rel and the tolerance in the
    message), the greedy tokens still pass; ``--json FILE`` writes the object, the table stays on stdout."""
    _, bad = built
    assert check(bad, "--junit", str(tmp_path / "j.xml"), "--json", str(tmp_path / "r.json")) == 1
    assert "PARITY FAILED" in capsys.readouterr().out
    cases = assert_junit(tmp_path / "j.xml")
    assert cases["greedy-tokens"][0] is None
    for name in ("logits/prefill", "logits/decode"):
        msg = cases[name][0]
        assert msg.startswith(f"{name} over ") and "max abs " in msg and "> tolerance 0.0001 [default (fp32)]" in msg
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["passed"] is False and data["tokens_equal"] and min(o["max_rel"] for o in data["outputs"]) > 5e-4


def test_tolerance_from_the_command_line_pyproject_and_their_precedence(built, tmp_path, monkeypatch, capsys):
    """The perturbed artifact passes with ``--tolerance logits=5e-3`` and with the same value in the
    nearest ``pyproject.toml`` above the current directory; a command-line key for one output wins over
    pyproject's group key; the values and their sources are in ``--json``."""
    _, bad = built
    assert check(bad, "--tolerance", "logits=5e-3", "--json") == 0
    data = json.loads(capsys.readouterr().out)
    assert data["tolerances"] == {"logits/prefill": 5e-3, "logits/decode": 5e-3}
    assert data["tolerance_sources"]["logits/decode"] == "--tolerance (logits)"
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "user"\n\n[tool.effexport.tolerance]\nlogits = 5e-3\n')
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path / "sub")
    assert check(bad, "--json") == 0
    data = json.loads(capsys.readouterr().out)
    assert data["tolerance_sources"]["logits/prefill"] == f"{tmp_path / 'pyproject.toml'} [tool.effexport.tolerance] (logits)"
    assert check(bad, "--json", "--tolerance", "logits/decode=1e-4", "--junit", str(tmp_path / "j.xml")) == 1
    data = json.loads(capsys.readouterr().out)
    assert data["tolerances"] == {"logits/prefill": 5e-3, "logits/decode": 1e-4}
    cases = assert_junit(tmp_path / "j.xml")
    assert cases["logits/prefill"][0] is None and "> tolerance 0.0001 [--tolerance (logits/decode)]" in cases["logits/decode"][0]


def test_prompt_ids_and_seed_are_used_and_recorded(built, tmp_path, capsys):
    good, _ = built
    (tmp_path / "ids.json").write_text("[[1, 2, 3, 4, 5], [6, 7, 8, 9, 10]]")
    assert check(good, "--prompt-ids", str(tmp_path / "ids.json"), "--json") == 0
    data = json.loads(capsys.readouterr().out)
    assert data["prompt"] == {"source": "file", "path": str(tmp_path / "ids.json"), "format": "json", "batch": 2,
                              "length": 5}
    assert check(good, "--seed", "7", "--json") == 0
    seeded = json.loads(capsys.readouterr().out)
    assert seeded["prompt"]["seed"] == 7
    assert seeded["outputs"] != data["outputs"]  # another prompt: other errors


def _write(name: str, text: str):
    def make(tmp_path):
        path = tmp_path / name
        path.write_text(text)
        return str(path)
    return make


@pytest.mark.parametrize("flags,message", [
    pytest.param(["--tolerance", "logit=1e-4"], "unknown tolerance key 'logit'; keys are logits/prefill", id="unknown-key"),
    pytest.param(["--tolerance", "logits=abc"], "tolerance logits='abc' is not a positive number", id="not-a-number"),
    pytest.param(["--tolerance", "logits=-1"], "is not a positive number", id="negative"),
    pytest.param(["--tolerance", "logits"], "'logits' is not KEY=VALUE", id="no-value"),
    pytest.param(["--prompt-ids", _write("p.json", "[1, 2")], "is not valid JSON", id="prompt-bad-json"),
    pytest.param(["--prompt-ids", _write("p.json", "[1, 99]")], "token id 99, outside the model's vocabulary of 40",
                 id="prompt-out-of-vocab"),
    pytest.param(["--prompt-ids", _write("p.json", "[[1, 2], [3]]")], "rows have different lengths", id="prompt-ragged"),
    pytest.param(["--prompt-ids", _write("p.json", "[]")], "is not a non-empty list of integer token ids",
                 id="prompt-empty"),
    pytest.param(["--prompt-ids", _write("p.json", '["a"]')], "is not a non-empty list of integer", id="prompt-strings"),
    pytest.param(["--prompt-ids", _write("p.txt", "hello")], "is text (not a JSON list), and the artifact was built "
                 "from pickle", id="prompt-text-without-tokenizer"),
    pytest.param(["--prompt-ids", "nowhere.json"], "--prompt-ids: nowhere.json: cannot read", id="prompt-missing"),
    pytest.param(["--seed", "-1"], "--seed -1: give a whole number from 0 to 2**63 - 1", id="seed-negative"),
    pytest.param(["--seed", str(1 << 64)], "give a whole number from 0 to 2**63 - 1", id="seed-too-large"),
])
def test_bad_flags_and_files_are_one_line_exit_2(built, tmp_path, capsys, flags, message):
    """A bad tolerance or prompt file: one line, exit 2; ``--junit`` still records the check as an error."""
    good, _ = built
    flags = [f(tmp_path) if callable(f) else f for f in flags]
    assert check(good, *flags, "--junit", str(tmp_path / "j.xml")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("effexport: error: ") and message in err, err
    cases = assert_junit(tmp_path / "j.xml")
    assert list(cases) == ["check"] and message in cases["check"][0]


def test_bad_pyproject_is_one_line_exit_2(built, tmp_path, monkeypatch, capsys):
    good, _ = built
    monkeypatch.chdir(tmp_path)
    (tmp_path / "pyproject.toml").write_text("[tool.effexport.tolerance]\nlogits = 'x'\n")
    assert check(good) == 2
    assert "pyproject.toml [tool.effexport.tolerance]: tolerance logits='x' is not a positive number" in capsys.readouterr().err
    (tmp_path / "pyproject.toml").write_text("[tool.effexport\n")
    assert check(good) == 2
    assert "is not valid TOML" in capsys.readouterr().err


def test_text_prompt_uses_the_model_directory_tokenizer(tmp_path):
    """A text prompt of an artifact built from a Hugging Face directory is tokenized with that
    directory's tokenizer (a word-level tokenizer.json made here: nothing is downloaded)."""
    from types import SimpleNamespace

    from tokenizers import Tokenizer, models, pre_tokenizers

    from effexport.exporter.verify.checkrun import load_prompt

    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "hello": 1, "parity": 2, "world": 3}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text('{"tokenizer_class": "PreTrainedTokenizerFast", "unk_token": "[UNK]"}')
    (tmp_path / "prompt.txt").write_text("hello parity world hello\n")
    loaded = SimpleNamespace(vocab_size=4, device=torch.device("cpu"))
    ids, record = load_prompt(str(tmp_path / "prompt.txt"), loaded, {"source": {"kind": "hf", "path": str(tmp_path)}},
                              steps=4, max_context=64)
    assert ids.tolist() == [[1, 2, 3, 1]] and record["format"] == "text" and record["length"] == 4


# ------------------------------------------------------------------------------- the pytest plugin
def _pytest(pytester, *args):
    """An in-process pytest run in ``pytester.path`` (the plugin loads through its entry point); no cache
    files, and no pytest-benchmark (where installed it warns inside an xdist worker)."""
    return pytester.runpytest_inprocess("-p", "no:cacheprovider", "-p", "no:benchmark", *args)


def _outcomes(result) -> dict:
    return {k: v for k, v in result.parseoutcomes().items() if k in ("passed", "failed", "errors", "error")}


def test_plugin_collects_each_output_as_an_item_and_shares_one_check(built, pytester, monkeypatch):
    """``pytest --effexport DIR``: three items named by artifact and output pass and appear in the
    user's JUnit report; the check runs once for them; a user test gets the runtime from the fixture."""
    from effexport.exporter import cli

    good, _ = built
    shutil.copytree(good, pytester.path / "out")  # the CI recipe: the artifact in the project as out/
    calls = []
    real = cli.run_check
    monkeypatch.setattr(cli, "run_check", lambda args: calls.append(args.dir) or real(args))
    pytester.makepyfile(test_user="""
        import numpy as np

        def test_own_prompt(effexport_artifact):
            ids = np.array([[1, 2, 3]], dtype=np.int64)
            result = effexport_artifact.step(ids, 0, effexport_artifact.initial_caches(1))
            assert result.logits.shape == (1, 3, 40)
            assert effexport_artifact.manifest["target"] == "onnx"
    """)
    result = _pytest(pytester, "-v", "--junitxml", "report.xml", "--effexport", "out", "--effexport-trust-pickle",
                     "--effexport-steps", STEPS)
    assert result.ret == 0, result.stdout.str()
    assert _outcomes(result) == {"passed": 4}
    for name in OUTPUT_CASES:
        result.stdout.fnmatch_lines([f"out::parity::{name} PASSED*"])
    assert calls == [str(pytester.path / "out")]
    cases = assert_junit(pytester.path / "report.xml")
    assert set(cases) == {"test_own_prompt[out]", *OUTPUT_CASES}
    assert {classname for _, classname in cases.values()} == {"test_user", "out.parity"}


def test_plugin_fails_a_perturbed_artifact_with_one_line_per_output(built, pytester):
    _, bad = built
    result = _pytest(pytester, "--effexport", str(bad), "--effexport-trust-pickle", "--effexport-steps", STEPS)
    assert result.ret == 1 and _outcomes(result) == {"passed": 1, "failed": 2}
    failures = [r for r in result.reprec.getreports("pytest_runtest_logreport") if r.failed]
    assert sorted(r.head_line.split()[-1] for r in failures) == ["logits/decode", "logits/prefill"]
    for rep in failures:
        line = str(rep.longrepr)
        assert "\n" not in line and "> tolerance 0.0001 [default (fp32)]" in line, line


def test_plugin_tolerance_from_ini_and_the_command_line(built, pytester):
    """``effexport_artifacts`` and ``effexport_tolerance`` in the ini file (paths relative to it): the
    perturbed artifact passes at 5e-3; ``--effexport-tolerance`` beats the ini."""
    _, bad = built
    pytester.makeini(f"""
        [pytest]
        effexport_artifacts = {bad}
        effexport_tolerance =
            logits=5e-3
        effexport_steps = {STEPS}
        effexport_trust_pickle = true
    """)
    result = _pytest(pytester)
    assert result.ret == 0 and _outcomes(result) == {"passed": 3}, result.stdout.str()
    result = _pytest(pytester, "--effexport-tolerance", "logits/prefill=1e-4")
    assert result.ret == 1 and _outcomes(result) == {"passed": 2, "failed": 1}
    assert "logits/prefill over the prompt: max abs " in result.stdout.str()
    assert "> tolerance 0.0001 [--effexport-tolerance (logits/prefill)]" in result.stdout.str()


def test_plugin_missing_artifact_is_a_one_line_collection_error(pytester):
    result = _pytest(pytester, "--effexport", "out/nothing")
    assert result.ret == pytest.ExitCode.INTERRUPTED
    (report,) = [r for r in result.reprec.getreports("pytest_collectreport") if r.failed]
    assert str(report.longrepr) == ("effexport artifact 'out/nothing' does not exist (no such directory); build it "
                                    "with 'effexport MODEL -o out/nothing' or fix --effexport / effexport_artifacts")
    result.stdout.fnmatch_lines(["*ERROR collecting out/nothing*", "effexport artifact 'out/nothing' does not exist*"])


def test_plugin_bad_tolerance_is_a_usage_error(pytester):
    pytester.mkdir("art")
    result = _pytest(pytester, "--effexport", "art", "--effexport-tolerance", "logits=0")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert "effexport: --effexport-tolerance: tolerance logits='0' is not a positive number" in result.stderr.str()


def test_plugin_is_inert_without_artifacts_and_imports_no_torch(pytester):
    """Every pytest run loads the plugin: without artifacts it adds no item, its fixture skips, and
    importing it imports neither torch nor onnxruntime."""
    pytester.makepyfile(test_user="""
        def test_plain():
            pass

        def test_fixture(effexport_artifact):
            pass
    """)
    result = _pytest(pytester, "-rs")
    assert _outcomes(result) == {"passed": 1} and result.parseoutcomes()["skipped"] == 1
    result.stdout.fnmatch_lines(["*no effexport artifact named*"])
    probe = ("import sys, importlib.metadata as m; "
             "(ep,) = [e for e in m.entry_points(group='pytest11') if e.name == 'effexport']; ep.load(); "
             "print(sorted(n for n in ('torch', 'onnxruntime', 'numpy') if n in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# ------------------------------------------------------------------------------- cases, half precision, providers
def test_cases_of_a_half_precision_check_and_nan():
    """Half precision: a logits case's tolerance is the check's bound (its source says so), the greedy
    tokens pass when the half rule accepted them though they differ from fp32 eager's; NaN fails."""
    from effexport.exporter.verify.checkrun import CheckRun
    from effexport.exporter.verify.junit import cases
    from effexport.exporter.verify.parity import OutputError, ParityReport

    parity = ParityReport(False, 4, 3e-2, [OutputError("logits/prefill", 1.0, 1e-2),
                                          OutputError("logits/decode", float("nan"), float("nan"))],
                          tokens_equal=False, detail="bounds ...; greedy token differs at decode step 2",
                          mode="the bf16 artifact against fp32 eager", tolerances={"logits/prefill": 3e-2,
                                                                                   "logits/decode": 2e-2},
                          tokens_ok=True)
    run = CheckRun("art", {"target": "onnx", "dtype": "bf16"}, parity, "onnxruntime", "CUDAExecutionProvider", "cuda",
                   tolerance_sources={"logits/prefill": "default (bf16)", "logits/decode": "default (bf16)"})
    got = {c.name: c for c in cases(run)}
    assert got["logits/prefill"].passed and "<= tolerance 0.03 [bound of the bf16 artifact" in got["logits/prefill"].message
    assert "floor from default (bf16)" in got["logits/prefill"].message
    assert not got["logits/decode"].passed and "max rel nan > tolerance 0.02" in got["logits/decode"].message
    assert got["greedy-tokens"].passed and "greedy token differs at decode step 2" in got["greedy-tokens"].message


def test_half_precision_check_takes_the_configured_tolerance_as_its_floor():
    from effexport.exporter.verify.parity import EagerRuntime, check_parity_half

    fp32 = negatives.build(negatives.NegConfig(layers=2, vocab=40)).eval()
    half = negatives.build(negatives.NegConfig(layers=2, vocab=40)).eval().to(torch.bfloat16)
    half.load_state_dict({k: v.to(torch.bfloat16) for k, v in fp32.state_dict().items()})
    prompt = torch.randint(0, 40, (2, 6), generator=torch.Generator().manual_seed(3))
    report = check_parity_half(half, fp32, EagerRuntime(half), prompt, 3, "bf16", {"logits/decode": 0.5})
    assert report.tolerances["logits/decode"] == 0.5 and 2e-2 <= report.tolerances["logits/prefill"] < 0.5
    assert report.to_json()["tolerances"] == report.tolerances


def test_runtime_info_names_the_execution_provider_that_ran():
    from types import SimpleNamespace

    from effexport.exporter.verify.checkrun import runtime_info

    cuda = SimpleNamespace(session=SimpleNamespace(get_providers=lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"]))
    runtime, provider, device = runtime_info(cuda, {"target": "onnx", "dtype": "bf16"})
    assert runtime.startswith("onnxruntime ") and provider == "CUDAExecutionProvider" and device == "cuda"
    assert runtime_info(object(), {"target": "aoti", "aoti": {"device": "cpu"}}) == ("AOTInductor", "AOTInductor cpu", "cpu")
    assert runtime_info(object(), {"target": "tensorrt"}) == ("TensorRT", "TensorRT", "cuda")
