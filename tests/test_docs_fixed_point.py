"""Every code block of docs/fixed_point.md runs as written, each in a fresh namespace.

Blocks are ```python (run) or ```text (signatures and transcripts, not code); any other fence
fails, so that a block cannot silently escape this test.
"""
import os
import pathlib
import re
import subprocess
import sys
import textwrap

DOCS = pathlib.Path(__file__).resolve().parents[1] / "docs" / "fixed_point.md"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```$", re.MULTILINE | re.DOTALL)


def blocks() -> list[tuple[str, str]]:
    return [(m.group(1), m.group(2)) for m in FENCE.finditer(DOCS.read_text())]


def test_every_block_is_python_or_text():
    kinds = [kind for kind, _ in blocks()]
    assert kinds and set(kinds) <= {"python", "text"}, kinds
    assert kinds.count("python") >= 5


def test_every_python_block_runs_on_its_own():
    code = [body for kind, body in blocks() if kind == "python"]
    # One interpreter for speed; a fresh globals dict per block checks self-containment.
    runner = textwrap.dedent("""
        import json, sys, traceback
        blocks = json.loads(sys.stdin.read())
        for i, source in enumerate(blocks):
            try:
                exec(compile(source, f"<docs block {i}>", "exec"), {"__name__": "__main__"})
            except BaseException:
                print(f"docs/fixed_point.md python block {i} failed:\\n{source}", file=sys.stderr)
                traceback.print_exc()
                sys.exit(1)
    """)
    import json

    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=8")
    out = subprocess.run([sys.executable, "-c", runner], input=json.dumps(code), text=True,
                         capture_output=True, env=env, timeout=600,
                         cwd=DOCS.parents[1])
    assert out.returncode == 0, out.stderr[-4000:]
