"""pytest plugin: artifacts' parity checks as test items in the user's own pytest run.

Installed with the package (entry point ``effexport`` in the ``pytest11`` group; ``-p no:effexport``
turns it off). It does nothing unless artifacts are named::

    pytest --effexport out/gemma [out/laguna ...]      # or: pytest tests/ --effexport=out/gemma
    [tool.pytest.ini_options]
    effexport_artifacts = ["out/gemma"]                # relative to the ini file

Each artifact becomes a collector ``DIR::parity`` with one item per output and step group
(``DIR::parity::logits/prefill``, ``::logits/decode``, ``::greedy-tokens``, :mod:`.junit`), so they show
in the user's report and ``--junitxml``. The artifact's check (``effexport check DIR``: prefill +
steps decode steps against the re-loaded eager model) runs once, at its first item, and its items share
the result; under pytest-xdist they carry ``xdist_group`` markers (one worker per artifact with
``--dist loadgroup``). A missing or unreadable artifact is a collection error of one line.

Options (command line over ini over ``pyproject.toml``'s ``[tool.effexport.tolerance]``):
``--effexport-tolerance KEY=VALUE`` / ini ``effexport_tolerance`` (one pair a line; keys and precedence:
:mod:`effexport.exporter.verify.tolerances`), ``--effexport-steps N`` / ``effexport_steps`` (default 16),
``--effexport-prompt-ids FILE`` / ``effexport_prompt_ids``, ``--effexport-seed N`` / ``effexport_seed``,
``--effexport-trust-pickle`` / ``effexport_trust_pickle`` (artifacts built from a pickled module).

Fixture ``effexport_artifact``: the loaded runtime of an artifact (``step``, ``initial_caches``,
``generate`` for ONNX Runtime; ``.artifact_dir`` and ``.manifest`` set), for the user's own prompts;
a test using it runs once per named artifact and is skipped when none is named.

Importing this module imports neither torch nor the exporter (every pytest run loads it).
"""
from __future__ import annotations

import argparse
import os

import pytest

ITEM_NAMES = ("logits/prefill", "logits/decode", "greedy-tokens")  # tolerances.OUTPUTS + junit.TOKENS_CASE
_KEY = pytest.StashKey[dict]()


class CheckError(Exception):
    """A check that could not run or an output that failed: reported as its one line."""


def pytest_addoption(parser):
    group = parser.getgroup("effexport", "effexport: parity of built artifacts against eager")
    group.addoption("--effexport", action="extend", nargs="+", default=None, metavar="DIR", dest="effexport",
                    help="check these artifact directories as test items (one per output and step group); "
                         "test paths go before it, or use --effexport=DIR")
    group.addoption("--effexport-tolerance", action="append", default=[], metavar="KEY=VALUE",
                    help="max relative error of an output (logits/prefill, logits/decode), a group (logits) or a "
                         "dtype (fp32, bf16, fp16); repeatable; over effexport_tolerance and pyproject.toml")
    group.addoption("--effexport-steps", default=None, metavar="N", help="decode steps of each check (default 16)")
    group.addoption("--effexport-prompt-ids", default=None, metavar="FILE",
                    help="the prompt: a JSON list of token ids, or text for the model directory's tokenizer")
    group.addoption("--effexport-seed", default=None, metavar="N", help="seed of the default prompt (default 2)")
    group.addoption("--effexport-trust-pickle", action="store_true", default=False,
                    help="allow re-loading models of artifacts built from a pickled module")
    parser.addini("effexport_artifacts", type="paths", default=[],
                  help="effexport artifact directories to check (relative to the ini file)")
    parser.addini("effexport_tolerance", type="linelist", default=[],
                  help="KEY=VALUE tolerances, one a line (under --effexport-tolerance)")
    parser.addini("effexport_steps", default="", help="decode steps of each effexport check (default 16)")
    parser.addini("effexport_prompt_ids", default="", help="effexport prompt file (JSON token ids or text)")
    parser.addini("effexport_seed", default="", help="seed of effexport's default prompt (default 2)")
    parser.addini("effexport_trust_pickle", type="bool", default=False,
                  help="allow re-loading models of artifacts built from a pickled module")


def _int(config, option: str, ini: str, default: int) -> int:
    value = config.getoption(option) or config.getini(ini) or default
    try:
        return int(value)
    except (TypeError, ValueError):
        raise pytest.UsageError(f"effexport: {ini} / --{option.replace('_', '-')} {value!r} is not a whole number; "
                                "give e.g. 16") from None


def pytest_configure(config):
    """Read the configuration only when artifacts are named; bad values are one-line usage errors."""
    cwd = str(config.invocation_params.dir)
    dirs = [os.path.join(cwd, d) for d in config.getoption("effexport") or ()]
    dirs += [str(p) for p in config.getini("effexport_artifacts")]
    if not dirs:
        return
    from effexport.exporter.verify import tolerances
    from effexport.exporter.errors import EffexportError

    try:
        tol = tolerances.load(config.getoption("effexport_tolerance"), config.getini("effexport_tolerance"),
                              start=cwd, cli_source="--effexport-tolerance")
    except EffexportError as exc:
        raise pytest.UsageError(f"effexport: {exc}") from None
    prompt = config.getoption("effexport_prompt_ids") or config.getini("effexport_prompt_ids") or None
    if prompt and not os.path.isabs(prompt) and not config.getoption("effexport_prompt_ids") and config.inipath:
        prompt = os.path.join(str(config.inipath.parent), prompt)  # an ini path is relative to the ini file
    config.stash[_KEY] = {
        "dirs": list(dict.fromkeys(os.path.normpath(d) for d in dirs)), "tolerances": tol,
        "steps": _int(config, "effexport_steps", "effexport_steps", 16),
        "seed": _int(config, "effexport_seed", "effexport_seed", 2),
        "prompt_ids": prompt, "runtimes": {},
        "trust_pickle": config.getoption("effexport_trust_pickle") or config.getini("effexport_trust_pickle"),
    }


def _settings(config) -> dict | None:
    return config.stash.get(_KEY, None)


def _label(config, directory: str) -> str:
    """``directory`` as the user sees it: relative to the rootdir when inside it."""
    rel = os.path.relpath(directory, str(config.rootpath))
    return directory if rel.startswith("..") else rel.replace(os.sep, "/")


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    """Add one :class:`ArtifactCollector` per named artifact to the session's top-level nodes."""
    outcome = yield
    settings = _settings(collector.config)
    if settings is None or not isinstance(collector, pytest.Session):
        return
    rep = outcome.get_result()
    if rep.passed:
        for directory in settings["dirs"]:
            label = _label(collector.config, directory)
            rep.result.append(ArtifactCollector.from_parent(
                collector, name=f"{label}::parity", path=_path(directory), nodeid=f"{label}::parity",
                artifact=directory, label=label))


def _path(directory: str):
    from pathlib import Path

    return Path(directory)


class ArtifactCollector(pytest.Collector):
    """One artifact: its items, and its check run once for them all."""

    def __init__(self, *, artifact: str, label: str, **kwargs):
        super().__init__(**kwargs)
        self.artifact, self.label = artifact, label
        self._run, self._error = None, None

    def collect(self):
        from effexport.exporter.errors import EffexportError, one_line
        from effexport.exporter.backends.artifact import load_manifest

        if not os.path.isdir(self.artifact):
            raise CheckError(f"effexport artifact {self.label!r} does not exist (no such directory); build it with "
                             f"'effexport MODEL -o {self.label}' or fix --effexport / effexport_artifacts")
        try:
            manifest = load_manifest(self.artifact)
        except EffexportError as exc:
            raise CheckError(f"effexport artifact {self.label!r}: {one_line(str(exc))}") from None
        missing = [n for n in manifest["files"].values() if not os.path.isfile(os.path.join(self.artifact, n))]
        if missing:
            raise CheckError(f"effexport artifact {self.label!r} lacks {', '.join(missing)} (named in its "
                             "effexport.json); rebuild or download it again")
        group = pytest.mark.xdist_group(f"effexport:{self.label}") if self.config.pluginmanager.hasplugin("xdist") \
            else None
        for name in ITEM_NAMES:
            item = ParityItem.from_parent(self, name=name)
            if group is not None:
                item.add_marker(group)
            yield item

    def repr_failure(self, excinfo):
        if isinstance(excinfo.value, CheckError):
            return str(excinfo.value)
        return super().repr_failure(excinfo)

    def check(self):
        """The artifact's :class:`~effexport.exporter.verify.checkrun.CheckRun`, run at the first call."""
        if self._run is None and self._error is None:
            from effexport.exporter.cli import run_check
            from effexport.exporter.errors import EffexportError, one_line

            s = _settings(self.config)
            args = argparse.Namespace(dir=self.artifact, steps=s["steps"], trust_pickle=s["trust_pickle"],
                                      tolerances=s["tolerances"], prompt_ids=s["prompt_ids"], seed=s["seed"])
            try:
                self._run = run_check(args)
            except EffexportError as exc:
                self._error = f"effexport check {self.label}: {one_line(str(exc))}"
        if self._error is not None:
            raise CheckError(self._error)
        return self._run


class ParityItem(pytest.Item):
    """One output (or the greedy tokens) of an artifact's check."""

    def runtest(self):
        from effexport.exporter.verify.junit import cases

        run = self.parent.check()
        case = next((c for c in cases(run) if c.name == self.name), None)
        if case is None:
            raise CheckError(f"{self.parent.label}: the check has no output {self.name!r}")
        self.add_report_section("call", "effexport", f"{case.message}\n{run.summary()}")
        if not case.passed:
            raise CheckError(f"{self.parent.label} {case.message}")

    def repr_failure(self, excinfo, style=None):
        if isinstance(excinfo.value, CheckError):
            return str(excinfo.value)
        return super().repr_failure(excinfo, style)

    def reportinfo(self):
        return self.path, None, f"effexport parity {self.parent.label} {self.name}"


def pytest_generate_tests(metafunc):
    """A test using ``effexport_artifact`` runs once per named artifact."""
    settings = _settings(metafunc.config)
    if settings and "effexport_artifact" in metafunc.fixturenames:
        metafunc.parametrize("effexport_artifact", settings["dirs"], indirect=True, scope="session",
                             ids=[_label(metafunc.config, d) for d in settings["dirs"]])


@pytest.fixture(scope="session")
def effexport_artifact(request):
    """The loaded runtime of a named artifact (ONNX Runtime, AOTInductor or TensorRT; a bf16 / fp16
    artifact on ONNX Runtime's CUDA execution provider), shared by the session."""
    directory = getattr(request, "param", None)
    if directory is None:
        pytest.skip("no effexport artifact named: pass --effexport DIR or set effexport_artifacts")
    settings = _settings(request.config)
    if directory not in settings["runtimes"]:
        from effexport.exporter.backends.artifact import load_manifest
        from effexport.exporter.backends.onnx.runtime import OrtRuntime
        from effexport.exporter.backends.registry import open_runtime
        from effexport.exporter.build import cuda_ep_available
        from effexport.exporter.errors import EffexportError, one_line

        try:
            manifest = load_manifest(directory)
            if manifest.get("dtype", "fp32") != "fp32":
                if not cuda_ep_available():
                    pytest.fail(f"{directory} is a {manifest['dtype']} artifact: it runs on ONNX Runtime's CUDA "
                                "execution provider, which is not available here", pytrace=False)
                runtime = OrtRuntime(directory, device="cuda")
            else:
                runtime = open_runtime(directory)
        except EffexportError as exc:
            pytest.fail(f"effexport artifact {directory}: {one_line(str(exc))}", pytrace=False)
        except Exception as exc:  # noqa: BLE001 - the backend's own error types for a bad file
            pytest.fail(f"effexport artifact {directory}: its runtime cannot load it ({type(exc).__name__}: "
                        f"{one_line(str(exc), 200)})", pytrace=False)
        runtime.artifact_dir, runtime.manifest = directory, manifest
        settings["runtimes"][directory] = runtime
    return settings["runtimes"][directory]
