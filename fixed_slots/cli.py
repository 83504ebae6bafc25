"""What main.py needs around absl: config flags checked before absl parses them, a quiet console,
and user mistakes printed as one or two plain lines with exit code 2.

`run(main)` replaces `absl.app.run(main)`. A misspelt `--config.KEY`, a missing config file, a
value absl or ml_collections cannot parse, and any `fixed_slots.errors.UserError` raised while
running end the process with `error: ...` on stderr and exit code 2; other exceptions are our bugs
and keep their tracebacks.

In a multi-process job a process that ends with an error (a user error, a bug, a second signal)
leaves through `fixed_slots.sharding.leave_job_after_error`, so the others stop within the
heartbeat timeout instead of hanging in JAX's shutdown barrier.

Console: third-party libraries log through absl at INFO (orbax prints ~40 lines per checkpoint),
and XLA through its C++ logger; unless `--verbosity` (absl's flag, `-v`) is given, absl's
threshold is WARNING, XLA's C++ lines are off (TF_CPP_MIN_LOG_LEVEL=3, unless set), and only our
own lines (the `fixed_slots` logger, see `fixed_slots.log`) and warnings reach the console.
`--help` prints the flags and exits with 0.

Compilation cache: before anything is compiled, JAX's persistent compilation cache is pointed at
`compilation_cache_dir()` (`$FIXED_SLOTS_CACHE_DIR`, else `$XDG_CACHE_HOME/fixed_slots/jax`, else
`~/.cache/fixed_slots/jax`; `FIXED_SLOTS_CACHE_DIR=off` turns it off; a `JAX_COMPILATION_CACHE_DIR`
of the user's own is left as it is). A second run of the same config on the same machine and JAX
version loads the compiled train step instead of compiling it again (seconds instead of a minute
on a CPU). Entries are keyed by the program, the compiler options, the devices and the JAX and
jaxlib versions, so a stale entry is never used; the directory can be deleted at any time.
"""
from __future__ import annotations

import difflib
import os
import sys
import traceback
from typing import Callable, Sequence

from fixed_slots.errors import UserError

EXIT_USER_ERROR = 2


def _leave_job(code: int) -> None:
    """Before exiting with `code`: a process of a multi-process job may have to leave at once."""
    if "jax" in sys.modules:  # no jax, no job
        from fixed_slots import sharding

        sharding.leave_job_after_error(code)


def _exit(code: int) -> None:
    """Leaves with `code`; at once (os._exit, after the finally blocks that already ran) while a
    background thread of the trainer is inside XLA (compiling the train step, running the first
    step): exiting the interpreter under it makes XLA's runtime abort the process (exit 134
    instead of `code`)."""
    _leave_job(code)
    trainer = sys.modules.get("fixed_slots.train.trainer")
    if trainer is not None and trainer.xla_work_in_flight():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def _fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)
    _exit(EXIT_USER_ERROR)


def _flag_values(argv: Sequence[str], name: str) -> list[tuple[str, str]]:
    """(flag, value) for every `--name=V`, `--name V`, `--name.key=V` and `--name.key V`."""
    found = []
    args = list(argv[1:])
    for i, arg in enumerate(args):
        if arg == "--":
            break
        for prefix in (f"--{name}", f"-{name}"):
            if arg.startswith(prefix + "=") or arg.startswith(prefix + "."):
                flag, has_value, value = arg.partition("=")
                if not has_value:  # `--config.key value`
                    value = args[i + 1] if i + 1 < len(args) else ""
                found.append((flag.lstrip("-"), value))
            elif arg == prefix:
                found.append((name, args[i + 1] if i + 1 < len(args) else ""))
    return found


def config_overrides(argv: Sequence[str]) -> list[str]:
    """The `--config.KEY=VALUE` flags of a command line as "KEY=VALUE" assignments."""
    return [f"{flag[len('config.'):]}={value}" for flag, value in _flag_values(argv, "config")
            if flag.startswith("config.")]


def config_file_and_arg(spec: str) -> tuple[str, str | None]:
    """`path` or `path:arg` (ml_collections' config_flags syntax) -> (path, arg)."""
    path, sep, arg = spec.partition(":")
    return path, (arg if sep else None)


def unknown_key_message(config, dotted: str) -> str | None:
    """None if `dotted` names a key of `config`; else a message with the closest keys."""
    import ml_collections

    node, parents = config, []
    for part in dotted.split("."):
        if not isinstance(node, ml_collections.ConfigDict):
            where = "config." + ".".join(parents)
            return (f"config key 'config.{dotted}' does not exist: {where} is a value, "
                    f"not a section")
        if part not in node:
            where = "config" + "".join("." + p for p in parents)
            keys = sorted(node.keys())
            close = difflib.get_close_matches(part, keys, n=3, cutoff=0.5)
            hint = (f" did you mean {', '.join(repr(c) for c in close)}?" if close else "")
            return (f"config key 'config.{dotted}' does not exist;{hint}\n"
                    f"       keys of {where}: {', '.join(keys)}")
        node, parents = node[part], parents + [part]
    return None


def check_config_flags(argv: Sequence[str], default_config: str) -> None:
    """The config file exists and every `--config.KEY` names a key (raises UserError)."""
    from fixed_slots import configlib

    specs = [v for flag, v in _flag_values(argv, "config") if flag == "config"]
    spec = specs[-1] if specs else default_config
    path, _ = config_file_and_arg(spec)
    if not os.path.isfile(path):
        raise UserError(f"config file {path!r} not found (--config={spec}); the configs are "
                        f"in configs/, e.g. --config=configs/default.py")
    config = configlib.from_file(spec)
    for flag, _ in _flag_values(argv, "config"):
        if flag.startswith("config."):
            message = unknown_key_message(config, flag[len("config."):])
            if message:
                raise UserError(message)


def show_config(config) -> None:
    """Prints the config with the allowed values of its choice keys, then checks it: a bad
    value is named below the listing (ConfigError)."""
    from fixed_slots import configlib, models
    from fixed_slots.data import pipeline
    from fixed_slots.train import optim, trainer

    choices = {**models.choices(config), **pipeline.CHOICES, **optim.CHOICES}
    print(configlib.describe(config, choices))
    trainer.check_config(config)  # every section a run reads, its evaluation's included


def compilation_cache_dir() -> str | None:
    """Where JAX's persistent compilation cache goes (None: off); see the module docstring."""
    chosen = os.environ.get("FIXED_SLOTS_CACHE_DIR")
    if chosen is not None:
        return None if chosen.strip().lower() in ("", "0", "off", "none", "false") else chosen
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "fixed_slots", "jax")


def configure_compilation_cache() -> str | None:
    """Turns on JAX's persistent compilation cache (before the first compilation); returns its
    directory, or None when it is off or the user configured JAX's own."""
    import jax

    if os.environ.get("JAX_COMPILATION_CACHE_DIR") or jax.config.jax_compilation_cache_dir:
        return None  # the user's own choice
    path = compilation_cache_dir()
    if path is None:
        return None
    try:
        os.makedirs(path, exist_ok=True)
    except OSError:
        return None  # a read-only home: run without the cache
    use_compilation_cache(path)
    return path


def use_compilation_cache(path: str) -> None:
    """JAX's persistent compilation cache in `path`, as main.py uses it (benchmarks too)."""
    import jax

    jax.config.update("jax_compilation_cache_dir", path)
    # Every executable a run compiles before its first step, the model's eager initialisation
    # ops included (each compiles in milliseconds, but there are a few hundred), not only those
    # slower to compile than JAX's default threshold of one second.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)


def import_flax_without_ipython() -> None:
    """Imports flax.nnx without importing IPython.

    At import, flax.nnx asks IPython whether it runs in a notebook (to colour its reprs), which
    imports IPython, jedi, parso and prompt_toolkit: ~1 s of every start on an idle CPU, ~15% of
    the start-up imports. A command-line run is no notebook: IPython is hidden while flax is
    imported (flax then sees no IPython, the answer IPython would give) and importable again
    afterwards. Inside IPython (already imported) nothing changes.
    """
    if "IPython" in sys.modules:
        return
    sys.modules["IPython"] = None  # `from IPython import ...` raises ImportError
    try:
        import flax.nnx  # noqa: F401
    finally:
        if "IPython" in sys.modules and sys.modules["IPython"] is None:
            del sys.modules["IPython"]


def _parse_flags(argv: list[str]) -> list[str]:
    from absl import flags
    from absl import logging

    try:
        remaining = flags.FLAGS(argv)
    except flags.Error as e:
        _fail(f"{e}\n       (python {os.path.basename(argv[0])} --helpfull lists the flags)")
    except UserError as e:
        _fail(str(e))
    except Exception as e:  # ml_collections' config_flags raise plain exceptions on bad values
        text = " ".join(str(e).split())
        _fail(f"could not parse the flags: {type(e).__name__}: {text[:300]}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # library INFO logs off; ours use their own logger
    return remaining


_HELP = ("--help", "-h", "-?", "--helpshort", "--helpfull")


def _verbosity_given(argv: Sequence[str]) -> bool:
    return any(arg in ("-v", "--v", "--verbosity") or arg.startswith(("-v=", "--v=", "--verbosity="))
               for arg in argv[1:])


def _print_help(argv: Sequence[str]) -> None:
    """absl's usage text on stdout, exit code 0 (absl's own --help exits with 1)."""
    from absl import app

    app.usage(shorthelp="--helpfull" not in argv, writeto_stdout=True)
    sys.exit(0)


def run(main: Callable[[list[str]], None], default_config: str = "configs/default.py") -> None:
    """absl.app.run(main) with config flags checked first and user errors as plain lines."""
    from absl import app

    if any(arg in _HELP for arg in sys.argv[1:]):
        _print_help(sys.argv)
    if not _verbosity_given(sys.argv):
        # XLA's own C++ log lines ("Very slow compile?" blocks on a loaded machine) are library
        # logs too: hidden like absl's INFO unless --verbosity is given. Set before jax loads.
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

    import_flax_without_ipython()  # before the config file imports the models
    try:
        check_config_flags(sys.argv, default_config)
    except UserError as e:
        _fail(str(e))

    def guarded(argv: list[str]) -> None:
        from fixed_slots import log

        log.configure()
        configure_compilation_cache()
        try:
            main(argv)
        except UserError as e:
            _fail(str(e))
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr, flush=True)
            _exit(130)
        except Exception:  # our bug: its traceback, then out of the job like any error
            traceback.print_exc()
            sys.stderr.flush()
            _exit(1)

    app.run(guarded, flags_parser=_parse_flags)
