"""A parity check as test cases: ``effexport check --junit FILE.xml`` and the pytest plugin's items.

One case per output and step group: ``logits/prefill`` (the prompt's step), ``logits/decode`` (the
worst of the decode steps) and ``greedy-tokens`` (the artifact's greedy tokens equal eager's at every
decode step). A logits case fails when its max relative error is above its tolerance (NaN fails
too); its message gives max abs, max rel, the tolerance and where that came from. The common schema
has no per-testcase properties, so the numbers are in the message (and the case's ``<system-out>``);
the suite's ``<properties>`` say what ran the check (runtime, execution provider, dtype, prompt).

The XML follows the common JUnit schema (what pytest ``--junitxml``, Jenkins and GitLab read)::

    <testsuites name="effexport" tests= failures= errors= time=>
      <testsuite name="effexport check DIR" tests= failures= errors= skipped="0" time= timestamp= hostname=>
        <properties><property name="runtime" value=.../> ...</properties>
        <testcase classname="effexport.DIR" name="logits/decode" time="0">
          <failure type="ParityFailure" message="one line">the same line</failure>
          <system-out>the same line (passing cases too)</system-out>
        </testcase>
        <system-out>the parity table</system-out>

A check that could not run (the artifact does not load) is one ``check`` case with an ``<error>``.
No torch import here.
"""
from __future__ import annotations

import datetime
import math
import socket
import xml.etree.ElementTree as ET
from dataclasses import dataclass

TOKENS_CASE = "greedy-tokens"


@dataclass
class Case:
    """One test case: its name, verdict and one-line message."""

    name: str
    passed: bool
    message: str


def cases(run) -> list[Case]:
    """The cases of a :class:`~effexport.exporter.verify.checkrun.CheckRun` (module docstring)."""
    parity, out = run.parity, []
    for o in parity.outputs:
        tol = parity.tolerances.get(o.name, parity.tolerance)
        source = run.tolerance_sources.get(o.name, "")
        if parity.mode:  # half precision: the floor is configured, the bound may be eager's own error
            source = f"bound of {parity.mode}" + (f"; floor from {source}" if source else "")
        ok = parity.output_passed(o)
        over = f"{parity.steps} decode steps" if o.name.endswith("decode") else "the prompt"
        out.append(Case(o.name, ok, f"{o.name} over {over}: max abs {o.max_abs:.3e}, max rel {o.max_rel:.3e} "
                                    f"{'<=' if ok else '>'} tolerance {tol:.3g}" + (f" [{source}]" if source else "")))
    ok = parity.tokens_equal if parity.tokens_ok is None else parity.tokens_ok
    differs = next((part.strip() for part in parity.detail.split(";") if "greedy token differs" in part), "")
    if parity.tokens_equal:
        message = f"greedy tokens identical over {parity.steps} decode steps"
    elif ok:  # half precision: eager in the dtype leaves fp32's tokens too, or the artifact matches it
        message = f"greedy tokens accepted ({parity.mode}): {differs or 'they differ from fp32 eager'}"
    else:
        message = differs or "greedy tokens differ from eager's"
    out.append(Case(TOKENS_CASE, ok, message))
    return out


def _fmt(value) -> str:
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else str(value)
    return str(value)


def junit_xml(artifact: str, run=None, error: str | None = None) -> bytes:
    """The JUnit XML of ``run`` (a CheckRun), or of a check that failed to run with ``error``."""
    suite_name, classname = f"effexport check {artifact}", f"effexport.{artifact}"
    seconds = run.seconds if run is not None else 0.0
    suite = ET.Element("testsuite", name=suite_name, timestamp=datetime.datetime.now().isoformat(timespec="seconds"),
                       hostname=socket.gethostname(), time=f"{seconds:.3f}")
    failures = errors = 0
    if run is not None:
        props = ET.SubElement(suite, "properties")
        info = run.to_json()
        for key in ("model", "target", "dtype", "runtime", "execution_provider", "device", "steps", "mode"):
            if info.get(key) is not None:
                ET.SubElement(props, "property", name=key, value=_fmt(info[key]))
        for key, value in info["prompt"].items():
            ET.SubElement(props, "property", name=f"prompt.{key}", value=_fmt(value))
        for case in cases(run):
            tc = ET.SubElement(suite, "testcase", classname=classname, name=case.name, time="0")
            if not case.passed:
                failures += 1
                ET.SubElement(tc, "failure", type="ParityFailure", message=case.message).text = case.message
            ET.SubElement(tc, "system-out").text = case.message  # passing cases keep their numbers too
        ET.SubElement(suite, "system-out").text = run.parity.table() + "\n" + run.summary()
        tests = len(suite.findall("testcase"))
    else:
        errors, tests = 1, 1
        tc = ET.SubElement(suite, "testcase", classname=classname, name="check", time="0")
        ET.SubElement(tc, "error", type="CheckError", message=error or "the check did not run").text = error
    suite.set("tests", str(tests))
    suite.set("failures", str(failures))
    suite.set("errors", str(errors))
    suite.set("skipped", "0")
    root = ET.Element("testsuites", name="effexport", tests=str(tests), failures=str(failures),
                      errors=str(errors), time=f"{seconds:.3f}")
    root.append(suite)
    ET.indent(root)
    return ET.tostring(root, encoding="utf-8", xml_declaration=True) + b"\n"


def write_junit(path: str, artifact: str, run=None, error: str | None = None) -> None:
    """Write :func:`junit_xml` to ``path`` atomically (a failed write leaves no partial file)."""
    from effexport.exporter._io import atomic_file

    with atomic_file(path) as tmp, open(tmp, "wb") as f:
        f.write(junit_xml(artifact, run, error))
