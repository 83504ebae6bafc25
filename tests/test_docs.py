"""Every code block in README.md and docs/*.md runs as written, so the docs cannot rot.

- ```python blocks run in a fresh interpreter from the repository root, each on its own. A block
  that reads a trained workdir uses the quick start's `/tmp/run` and `configs/default.py`; the
  test trains `configs/default.py:tiny` for two steps into a temporary directory first and
  rewrites exactly those two strings in the block (the run, at test sizes).
- ```bash blocks: each `python main.py ...` command runs with `--mode=show_config` in place of
  its mode (flags, config file, keys and values are checked; nothing trains); `python -m MODULE`
  and `python path/to/script.py` must exist and answer `--help`; repository paths in arguments
  (configs/..., benchmarks/..., docs/...) must exist; `pip install` must name extras that
  setup.py defines. Other commands (pytest, tensorboard, srun, ...) are left alone.
- ```text blocks are output, not code. A block preceded by `<!-- docs-test: skip REASON -->` is
  not run; the reason is required (e.g. it needs a GPU or a dataset that cannot be downloaded).
- BENCHMARKS.md and benchmarks/README.md (the commands behind the figures): every command of
  their ```bash blocks and every inline `python ...` span is checked as above, and each
  `python benchmarks/X.py FLAGS` (or `bash benchmarks/X.sh FLAGS`, whose flags go to X.py) is run
  with exactly those flags up to its argument parsing and no further: the flags must parse, and
  a `--config` with its `--set` overrides (and a `--compute_dtype`) must load and validate.
  Nothing is measured, so commands needing torch, an official checkout or a GPU are checked
  too. Shell variables set in the same block (`S=...`, `T="..."`) are substituted, a word that
  is only `$VAR` split into words; comments are dropped.
"""
import json
import os
import pathlib
import re
import shlex
import subprocess
import sys

import pytest

from helpers import ROOT

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BENCHMARK_DOCS = [ROOT / "BENCHMARKS.md", ROOT / "benchmarks" / "README.md"]
_BLOCK = re.compile(r"(?:<!--\s*docs-test:\s*(?P<marker>[^>]*?)\s*-->\s*\n)?"
                    r"^```(?P<lang>[\w-]*)[ \t]*\n(?P<body>.*?)^```", re.S | re.M)
_REPO_PATH = re.compile(r"^(configs|benchmarks|docs|examples|tests|data_prep|fixed_slots)/\S+")


def _blocks(docs=DOCS):
    for path in docs:
        text = path.read_text()
        for number, match in enumerate(_BLOCK.finditer(text), 1):
            line = text[:match.start("body")].count("\n") + 1
            yield pytest.param(path, match.group("lang"), match.group("body"),
                               match.group("marker"),
                               id=f"{path.relative_to(ROOT)}:{line}")


BLOCKS = list(_blocks())


def _env():
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    # One CPU device, as a user's machine: the paper configs' batch of 50 must validate.
    env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                                if "force_host_platform_device_count" not in f)
    return env


def _run(args, timeout=600):
    return subprocess.run(args, cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("docs_run")
    result = _run([sys.executable, "main.py", "--config=configs/default.py:tiny",
                   f"--workdir={workdir}", "--config.train.num_steps=2",
                   "--config.train.image_every_steps=0", "--config.train.jacobian_every_steps=0"])
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir


def _strip_comments(body: str) -> str:
    """Each line without its shell comment (an unquoted # at the start of a word)."""
    lines = []
    for line in body.split("\n"):
        quote = None
        for i, char in enumerate(line):
            if quote:
                quote = None if char == quote else quote
            elif char in "'\"":
                quote = char
            elif char == "#" and (i == 0 or line[i - 1] in " \t"):
                line = line[:i]
                break
        lines.append(line)
    return "\n".join(lines)


def _commands(body: str):
    """Shell commands of a bash block: continuations joined, comments dropped, split on newlines
    and ; & && | outside quotes; VAR=value assignments remembered and $VAR / ${VAR} substituted
    in later words (a word that is only an unquoted-looking $VAR is split on whitespace), then
    dropped, as is `srun`; everything from a redirection on is replaced by None."""
    lexer = shlex.shlex(_strip_comments(re.sub(r"\\\n", " ", body)), posix=True,
                        punctuation_chars=";&|\n")
    lexer.whitespace = " \t"
    lexer.whitespace_split = True
    lexer.commenters = ""  # (shlex's own comments swallow the newline that ends them)
    variables: dict[str, str] = {}
    command = []

    def substitute(token: str) -> list[str]:
        whole = re.fullmatch(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?", token)
        if whole and whole.group(1) in variables:
            return variables[whole.group(1)].split()
        return [re.sub(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?",
                       lambda m: variables.get(m.group(1), m.group(0)), token)]

    for token in list(lexer) + ["\n"]:
        if token and set(token) <= set(";&|\n"):
            while command and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", command[0] or ""):
                name, value = command.pop(0).split("=", 1)
                variables[name] = value
            if command and command[0] == "srun":
                command.pop(0)
            if command:
                yield command
            command = []
        elif re.match(r"^\d?>", token) or token.startswith("<"):
            command.append(None)  # a redirection: the rest is not arguments
        elif None in command:
            continue
        else:
            command.extend(substitute(token))


def _extras() -> set[str]:
    setup = (ROOT / "setup.py").read_text()
    block = setup[setup.index("extras_require"):]
    return set(re.findall(r'^\s*"([\w-]+)":', block, re.M))


_BENCHMARK_SCRIPT = re.compile(r"^benchmarks/[\w-]+\.(py|sh)$")

# Runs benchmark scripts up to their argparse call and no further (one process for a list of
# commands, read as JSON [[script, argv], ...] from stdin); prints one result per command: null
# (the flags parse; a --config with its --set overrides loads and validates) or the error.
_PARSE_ONLY = r"""
import argparse, contextlib, io, json, runpy, sys, traceback


class Parsed(BaseException):
    pass


real_parse_args = argparse.ArgumentParser.parse_args


def parse_args(self, args=None, namespace=None):
    raise Parsed(real_parse_args(self, args, namespace))


argparse.ArgumentParser.parse_args = parse_args
results = []
for script, argv in json.load(sys.stdin):
    sys.argv = [script, *argv]
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            runpy.run_path(script, run_name="__main__")
        results.append("ran to its end without parsing flags")
    except Parsed as parsed:
        ns = vars(parsed.args[0])
        try:
            config = ns.get("config")
            if isinstance(config, str) and config.partition(":")[0].endswith(".py"):
                from fixed_slots import configlib
                from fixed_slots.train import trainer
                loaded = configlib.from_file(config, ns.get("set") or [])
                if ns.get("compute_dtype"):  # the scripts' --compute_dtype overrides the config
                    loaded.train.compute_dtype = ns["compute_dtype"]
                trainer.check_config(loaded)
            results.append(None)
        except Exception as e:
            results.append(f"--config/--set: {type(e).__name__}: {e}")
    except SystemExit as e:
        results.append(f"exit {e.code}: {err.getvalue()[-1500:]}")
    except BaseException:
        results.append(traceback.format_exc()[-1500:])
print(json.dumps(results))
"""


def _parse_only(jobs: list[tuple[str, list[str]]]) -> list:
    """Each (script, argv) run up to its argument parsing: None or the error, per job."""
    if not jobs:
        return []
    result = subprocess.run([sys.executable, "-c", _PARSE_ONLY], cwd=ROOT, env=_env(),
                            input=json.dumps(jobs), capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def _check_command(words) -> tuple[str, list[str]] | None:
    """Checks one command; returns (script, argv) of a benchmark script whose flags remain to be
    parsed (`_parse_only`), else None."""
    if None in words:
        words = words[:words.index(None)]
    if words[0] in ("pip", "pip3") or words[:3] in (["python", "-m", "pip"],
                                                    ["python3", "-m", "pip"]):
        for word in words:
            for extras in re.findall(r"\[([\w,-]+)\]", word):
                unknown = set(extras.split(",")) - _extras()
                assert not unknown, f"setup.py has no extra(s) {unknown}: {' '.join(words)}"
        return None
    if words[0] == "bash" and len(words) > 1 and _BENCHMARK_SCRIPT.match(words[1]):
        script = ROOT / words[1]
        assert script.is_file(), f"no such script {words[1]}"
        syntax = _run(["bash", "-n", str(script)])
        assert syntax.returncode == 0, f"{words[1]}: {syntax.stderr}"
        python = script.with_suffix(".py")  # gpu_suite.sh passes its flags to gpu_suite.py
        return (str(python.relative_to(ROOT)), words[2:]) if python.is_file() else None
    if words[0] not in ("python", "python3"):
        return None  # pytest, tensorboard, srun, cd, ...: not ours to run here
    for word in words[1:]:
        value = word.split("=", 1)[-1]
        # a path, or a path with a suffix such as configs/default.py:tiny
        candidates = [c for c in (value, value.split(":", 1)[0])
                      if _REPO_PATH.match(c) and "*" not in c]
        if candidates:
            assert any((ROOT / c).exists() for c in candidates), (
                f"no such file {candidates[-1]}: {' '.join(words)}")
    if words[1] == "main.py":
        args = [w for w in words[2:] if not w.startswith(("--mode", "--workdir"))]
        result = _run([sys.executable, "main.py", *args, "--mode=show_config"])
        assert result.returncode == 0, f"{' '.join(words)}\n{result.stderr[-2000:]}"
    elif words[1] == "-m":
        result = _run([sys.executable, "-m", words[2], "--help"], timeout=300)
        assert result.returncode == 0, f"{' '.join(words)}\n{result.stderr[-2000:]}"
    elif words[1].endswith(".py"):
        assert (ROOT / words[1]).is_file(), f"no such script {words[1]}"
        if _BENCHMARK_SCRIPT.match(words[1]):
            return words[1], words[2:]
        result = _run([sys.executable, words[1], "--help"], timeout=300)
        assert result.returncode == 0, f"{' '.join(words)}\n{result.stderr[-2000:]}"
    return None


def _assert_flags_parse(jobs: list[tuple[str, list[str]]], where: str) -> None:
    errors = [f"{where}: python {script} {' '.join(argv)}\n    {error}"
              for (script, argv), error in zip(jobs, _parse_only(jobs)) if error]
    assert not errors, "\n".join(errors)


@pytest.mark.parametrize("path, lang, body, marker", BLOCKS)
def test_code_block_runs_as_written(path, lang, body, marker, request):
    if marker:
        reason = marker.removeprefix("skip").strip()
        assert marker.startswith("skip") and reason, f"marker needs 'skip REASON': {marker!r}"
        pytest.skip(reason)
    if lang == "python":
        if "/tmp/run" in body:
            workdir = request.getfixturevalue("trained_run")
            body = body.replace("/tmp/run", str(workdir)).replace(
                '"configs/default.py"', '"configs/default.py:tiny"')
        result = _run([sys.executable, "-c", body])
        assert result.returncode == 0, f"{path.name} block failed:\n{result.stderr[-3000:]}"
    elif lang in ("bash", "sh", "shell"):
        jobs = [job for job in map(_check_command, _commands(body)) if job]
        _assert_flags_parse(jobs, path.name)
    else:
        assert lang in ("text", "", "console", "json", "yaml"), f"unknown block language {lang}"


def test_every_doc_has_its_blocks_collected():
    """The block pattern sees every fence: an unbalanced or unusual fence would hide code."""
    for path in DOCS + BENCHMARK_DOCS:
        fences = len(re.findall(r"^```", path.read_text(), re.M))
        found = sum(1 for p in _blocks([path]))
        assert fences == 2 * found, f"{path.name}: {fences} fences, {found} blocks"


def _benchmark_commands(path: pathlib.Path):
    """(line, words) of every command of the document's bash blocks (unless skipped with a
    reason) and of every inline code span that starts with `python`."""
    text = path.read_text()
    for block in _blocks([path]):
        _, lang, body, marker = block.values
        line = int(block.id.rsplit(":", 1)[1])
        if marker:
            assert marker.startswith("skip") and marker.removeprefix("skip").strip(), marker
            continue
        if lang in ("bash", "sh", "shell"):
            for words in _commands(body):
                yield line, words
    prose = _BLOCK.sub(lambda m: "\n" * m.group(0).count("\n"), text)
    for match in re.finditer(r"(?<!`)`([^`]+)`(?!`)", prose):
        span = " ".join(match.group(1).split())
        if re.match(r"python3? ", span):
            yield prose[:match.start()].count("\n") + 1, shlex.split(span)


@pytest.mark.parametrize("path", BENCHMARK_DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_benchmark_commands_parse_their_flags(path):
    """Every command behind a figure runs today, up to its argument parsing (see the module
    docstring; the rule is stated at the top of BENCHMARKS.md)."""
    jobs, where = [], []
    for line, words in _benchmark_commands(path):
        job = _check_command(words)
        if job:
            jobs.append(job)
            where.append(f"{path.name}:{line}")
    assert len(jobs) >= 5, f"{path.name}: only {len(jobs)} benchmark commands found"
    errors = [f"{w}: {' '.join([s, *a])}\n    {e}"
              for w, (s, a), e in zip(where, jobs, _parse_only(jobs)) if e]
    assert not errors, "\n".join(errors)
