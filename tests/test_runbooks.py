"""The runbooks' marked commands (``tests/runbook.py``): each step the deployment test runs is
marked in its doc, is valid bash, passes fedmart's own argument parsing with the doc's example
values, and uses only the variables that doc documents (and every documented one is used).

``tests/federation/test_deploy.py`` runs these same blocks against a real federation; this file
catches a broken marker or an undocumented variable in a second, without one.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

# The steps tests/federation/test_deploy.py runs, by document.
RUN_BY_THE_DEPLOYMENT_TEST = {
    "runbook-node.md": {"keygen", "prepare", "split", "node"},
    "runbook-coordinator.md": {"certs", "signing-key", "coordinate", "resume", "register"},
    "serving.md": {"promote", "serve"},
}
DOCS = sorted(RUN_BY_THE_DEPLOYMENT_TEST)


@pytest.mark.parametrize("doc", DOCS)
def test_every_step_the_deployment_test_runs_is_marked_in_its_doc(runbook, doc):
    assert RUN_BY_THE_DEPLOYMENT_TEST[doc] <= set(runbook.steps(doc)), sorted(runbook.steps(doc))


@pytest.mark.parametrize("doc", DOCS)
def test_marked_blocks_use_exactly_the_variables_their_doc_documents(runbook, doc):
    documented = set(runbook.variables(doc))
    used = {step: runbook.used_variables(text) for step, text in runbook.steps(doc).items()}
    undocumented = {step: sorted(names - documented) for step, names in used.items() if names - documented}
    assert not undocumented, f"{doc}: variables used but not in its `runbook: variables` block: {undocumented}"
    unused = documented - set().union(*used.values())
    assert not unused, f"{doc}: documented variables no marked step uses: {sorted(unused)}"


def _fedmart_accepts(argv: list[str], env: dict[str, str], cwd) -> str | None:
    """Why fedmart's own parser refuses ``argv`` (None when it accepts it); nothing runs."""
    from fedmart import cli

    if argv[0] in cli.HYDRA_APPS:
        if any(a.startswith("resume=") for a in argv):
            return None  # a resumed run reads its own saved config: nothing to compose without one
        done = subprocess.run([sys.executable, "-m", "fedmart", *argv, "--cfg", "job"], cwd=cwd, env=env,
                              capture_output=True, text=True, timeout=120)  # fmt: skip
        return None if done.returncode == 0 else done.stderr[-2000:]
    argv = [cli.SPELLINGS.get(tuple(argv[:2]), argv[0]), *argv[2:]] if tuple(argv[:2]) in cli.SPELLINGS else argv
    cli._register_optional_commands()
    try:
        cli._parser().parse_args(argv)
    except SystemExit as exc:
        return f"argparse exit {exc.code}"
    return None


@pytest.mark.parametrize(
    ("doc", "step"), [(doc, step) for doc in DOCS for step in sorted(RUN_BY_THE_DEPLOYMENT_TEST[doc])]
)
def test_each_step_is_bash_that_fedmart_parses_with_the_example_values(runbook, doc, step, tmp_path):
    syntax = subprocess.run(["bash", "-n", "-c", runbook.steps(doc)[step]], capture_output=True, text=True)
    assert syntax.returncode == 0, syntax.stderr
    example = runbook.variables(doc)
    calls = runbook.argvs(doc, step, example)
    assert calls and all(calls), f"{doc} step {step} calls no fedmart command"
    env = runbook.environment(example)
    refused = {" ".join(a): why for a in calls if (why := _fedmart_accepts(a, env, tmp_path))}
    assert not refused, refused


def test_the_reader_finds_steps_and_refuses_malformed_marks(runbook, tmp_path):
    doc = tmp_path / "doc.md"
    doc.write_text(
        "intro\n<!-- runbook: variables -->\n```bash\nNAME=books   # a name\n```\n"
        '<!-- runbook: hello -->\n```bash\nfedmart node keygen --name "$NAME" --out k  # keys\n```\n'
    )
    assert runbook.steps(doc) == {"hello": 'fedmart node keygen --name "$NAME" --out k  # keys\n'}
    assert runbook.variables(doc) == {"NAME": "books"}
    # test-only flags go to the end of the last command, before its comment (or they would be commented out)
    assert runbook.command(doc, "hello", ["--x", "a b"]) == "fedmart node keygen --name \"$NAME\" --out k --x 'a b'\n"
    argv = ["node", "keygen", "--name", "toys shop", "--out", "k"]
    assert runbook.argvs(doc, "hello", {"NAME": "toys shop"}) == [argv]

    for bad, why in (
        ("<!-- runbook: x -->\ntext\n", "must be followed by a ```bash block"),
        ("<!-- runbook: x -->\n```bash\nfedmart x\n", "never ends"),
        ("<!-- runbook: x -->\n```bash\na\n```\n<!-- runbook: x -->\n```bash\nb\n```\n", "marked twice"),
    ):
        path = tmp_path / f"bad{len(why)}.md"
        path.write_text(bad)
        with pytest.raises(ValueError, match=why):
            runbook.steps(path)
