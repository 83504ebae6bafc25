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
"""
import os
import pathlib
import re
import shlex
import subprocess
import sys

import pytest

from helpers import ROOT

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
_BLOCK = re.compile(r"(?:<!--\s*docs-test:\s*(?P<marker>[^>]*?)\s*-->\s*\n)?"
                    r"^```(?P<lang>[\w-]*)[ \t]*\n(?P<body>.*?)^```", re.S | re.M)
_REPO_PATH = re.compile(r"^(configs|benchmarks|docs|examples|tests|data_prep|fixed_slots)/\S+")


def _blocks():
    for path in DOCS:
        text = path.read_text()
        for number, match in enumerate(_BLOCK.finditer(text), 1):
            line = text[:match.start("body")].count("\n") + 1
            yield pytest.param(path, match.group("lang"), match.group("body"),
                               match.group("marker"), id=f"{path.name}:{line}")


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


def _commands(body: str):
    """Shell commands of a bash block: continuations joined, comments dropped, split on newlines
    and ; & && | outside quotes; leading VAR=value assignments and `srun` dropped, and
    everything from a redirection on."""
    lexer = shlex.shlex(re.sub(r"\\\n", " ", body), posix=True, punctuation_chars=";&|\n")
    lexer.whitespace = " \t"
    lexer.whitespace_split = True
    command = []
    for token in list(lexer) + ["\n"]:
        if token and set(token) <= set(";&|\n"):
            while command and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", command[0]):
                command.pop(0)
            if command and command[0] == "srun":
                command.pop(0)
            if command:
                yield command
            command = []
        elif re.match(r"^\d?>", token) or token.startswith("<"):
            command.append(None)  # a redirection: the rest is not arguments
        else:
            command.append(token)


def _extras() -> set[str]:
    setup = (ROOT / "setup.py").read_text()
    block = setup[setup.index("extras_require"):]
    return set(re.findall(r'^\s*"([\w-]+)":', block, re.M))


def _check_command(words):
    if None in words:
        words = words[:words.index(None)]
    if words[0] in ("pip", "pip3") or words[:3] in (["python", "-m", "pip"],
                                                    ["python3", "-m", "pip"]):
        for word in words:
            for extras in re.findall(r"\[([\w,-]+)\]", word):
                unknown = set(extras.split(",")) - _extras()
                assert not unknown, f"setup.py has no extra(s) {unknown}: {' '.join(words)}"
        return
    if words[0] not in ("python", "python3"):
        return  # pytest, tensorboard, srun, cd, ...: not ours to run here
    for word in words[1:]:
        value = word.split("=", 1)[-1]
        for candidate in (value, value.split(":", 1)[0]):
            if _REPO_PATH.match(candidate) and "*" not in candidate:
                assert (ROOT / candidate).exists(), f"no such file {candidate}: {' '.join(words)}"
                break
    if words[1] == "main.py":
        args = [w for w in words[2:] if not w.startswith(("--mode", "--workdir"))]
        result = _run([sys.executable, "main.py", *args, "--mode=show_config"])
        assert result.returncode == 0, f"{' '.join(words)}\n{result.stderr[-2000:]}"
    elif words[1] == "-m":
        result = _run([sys.executable, "-m", words[2], "--help"], timeout=300)
        assert result.returncode == 0, f"{' '.join(words)}\n{result.stderr[-2000:]}"
    elif words[1].endswith(".py"):
        assert (ROOT / words[1]).is_file(), f"no such script {words[1]}"
        result = _run([sys.executable, words[1], "--help"], timeout=300)
        assert result.returncode == 0, f"{' '.join(words)}\n{result.stderr[-2000:]}"


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
        for words in _commands(body):
            _check_command(words)
    else:
        assert lang in ("text", "", "console", "json", "yaml"), f"unknown block language {lang}"


def test_every_doc_has_its_blocks_collected():
    """The block pattern sees every fence: an unbalanced or unusual fence would hide code."""
    for path in DOCS:
        fences = len(re.findall(r"^```", path.read_text(), re.M))
        found = sum(1 for p in BLOCKS if p.values[0] == path)
        assert fences == 2 * found, f"{path.name}: {fences} fences, {found} blocks"
