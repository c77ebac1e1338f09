"""Every command the docs tell a researcher to type is checked, without running anything.

Where the commands are: the fenced ``bash`` / ``sh`` / ``shell`` blocks of README.md, docs/*.md and
benchmarks/README.md (``\\`` continuations joined, ``&&`` / ``;`` chains split, ``#`` comments and leading
``VAR=value`` assignments dropped), the inline code spans of those files that start with ``python -m sim.``
or ``python benchmarks/``, and the commented ``#   python -m sim...`` lines of the headers of
configs/experiment/*.yaml. Transcripts (unlabelled blocks with ``$`` prompts) are output, not commands.

What is checked:

- ``python -m sim.run ...`` (and ``l2h-sim``): the command line's own check before Hydra starts,
  :func:`sim.run.check_command_line` (:func:`sim.cli.precheck`: the config composed with Hydra's compose
  API and its values checked, method names, tracker packages, the sweep's settings; then ``--config-name``
  and ``hydra.run.dir`` / ``hydra.sweep.dir``). A ``-m`` sweep is expanded as Hydra's basic sweeper
  expands it (:func:`sim.cli._expand`: Hydra's override parser, the preset's ``hydra.sweeper.params``
  included) and its first job is composed and checked; every swept value of a config group must be one of
  that group's options. Composing every job of every sweep took minutes on a loaded 2-core machine; as it
  is, each command costs one composition (about 0.3 s of CPU here).
- ``python -m sim.report ...`` (and ``l2h-report``): the arguments parse with the report's own parser
  (:func:`sim.report.parser`), ``--baseline`` parses, and the keys of ``--baseline`` and ``--label`` are
  config keys.
- ``python benchmarks/X.py ...``: the script exists and every ``--flag`` is one its argparse defines.
- ``flwr run ... -c 'overrides="..."'``: the run config parses as Flower parses it and its overrides compose
  and pass the ServerApp's checks (:func:`sim.flwr_app.config_from`).
- any other ``python -m MODULE`` / ``python FILE``: the module or file exists.

Placeholders are fine: run directories such as ``runs/X`` or ``multirun/DATE/TIME`` need not exist, and a
``data.path=FILE`` is created empty in the (temporary) working directory the checks run in.
"""
from __future__ import annotations

import ast
import re
import shlex
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "benchmarks" / "README.md"]
PRESETS = sorted((ROOT / "configs" / "experiment").glob("*.yaml"))
FENCE = re.compile(r"^([ \t]*)```[ \t]*([A-Za-z]*)[^\n]*\n(.*?)^[ \t]*```", re.S | re.M)
SHELL = {"bash", "sh", "shell", "zsh"}
INLINE = re.compile(r"`(python (?:-m sim\.|benchmarks/)[^`]*)`")
ENV_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z_0-9]*=")


PLACEHOLDER_VALUES = {"fleet.num_clients=N": "fleet.num_clients=100"}
"""Overrides written with a placeholder value (benchmarks/README.md's workload "for N devices"), checked with one."""
NEEDS_THE_READERS_FILES = {
    ("strategy=mymethod",): "Could not find 'strategy/mymethod'",
}
"""Commands that run once the reader has added a file (docs/adding.md: ``configs/strategy/mymethod.yaml``):
checked to fail for that reason only."""


@dataclass(frozen=True)
class Command:
    where: str
    """file:line (of the block's line or the inline span)."""
    text: str
    """The command as written (one segment of a chain, continuations joined)."""
    error: str | None = None
    """The error the docs say it ends with (an inline example followed by ``-> `error: ...` ``)."""

    @property
    def argv(self) -> list[str]:
        args = shlex.split(self.text, comments=True)
        while args and ENV_ASSIGNMENT.match(args[0]):
            args.pop(0)
        # "more of the same" in a sweep's example, and <overrides>-style placeholders
        return [PLACEHOLDER_VALUES.get(a, a) for a in args
                if a not in ("...", "…") and not re.fullmatch(r"<[^<>]+>", a)]

    @property
    def program(self) -> str:
        """``sim.run``, ``sim.report``, ``benchmarks/x.py``, another module or file, or '' (not Python)."""
        argv = self.argv
        if argv[:1] == ["l2h-sim"]:
            return "sim.run"
        if argv[:1] == ["l2h-report"]:
            return "sim.report"
        if not argv or not re.fullmatch(r"python3?", argv[0]) or len(argv) < 2:
            return ""
        if argv[1] == "-m":
            return argv[2] if len(argv) > 2 else ""
        return argv[1]


def _segments(text: str) -> list[str]:
    """A shell line split at ``&&``, ``||`` and ``;`` outside quotes, comments dropped."""
    lex = shlex.shlex(text, posix=True, punctuation_chars=";&|")
    lex.whitespace_split = True
    lex.commenters = "#"
    out: list[list[str]] = [[]]
    for tok in lex:
        if tok in ("&&", "||", ";", "|", "&"):
            out.append([])
        else:
            out[-1].append(tok)
    return [shlex.join(seg) for seg in out if seg]


def _lines_of_block(body: str, first_line: int) -> list[tuple[int, str]]:
    """A shell block's logical lines (``\\`` continuations joined) with the line number each starts on."""
    out, pending, start = [], "", first_line
    for i, line in enumerate(body.splitlines()):
        if not pending:
            start = first_line + i
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        out.append((start, pending + line))
        pending = ""
    if pending:
        out.append((start, pending))
    return out


def doc_commands() -> list[Command]:
    cmds: list[Command] = []
    for path in DOCS:
        text = path.read_text()
        name = path.relative_to(ROOT).as_posix()
        for m in FENCE.finditer(text):
            if m.group(2).lower() not in SHELL:
                continue
            first = text[:m.start(3)].count("\n") + 1
            for line_no, line in _lines_of_block(m.group(3), first):
                cmds += [Command(f"{name}:{line_no}", seg) for seg in _segments(line)]
        for m in INLINE.finditer(text):
            if re.fullmatch(r"python -m sim\.\w+", m.group(1).strip()):
                continue  # the program named in a sentence, not a command
            said = re.match(r"\s*->\s*`error: ([^`]*)`", text[m.end():])
            cmds.append(Command(f"{name}:{text[:m.start()].count(chr(10)) + 1}", " ".join(m.group(1).split()),
                                " ".join(said.group(1).split()) if said else None))
    for path in PRESETS:
        for i, line in enumerate(path.read_text().splitlines(), 1):
            m = re.match(r"#\s+((?:python|l2h-)\S*\s.*)", line)
            if m:
                cmds.append(Command(f"{path.relative_to(ROOT).as_posix()}:{i}", m.group(1)))
    return [c for c in cmds if c.program or c.argv[:2] == ["flwr", "run"]]


def _by_program(*programs: str) -> list[pytest.param]:
    """One test case per distinct command line (the places that show it in the id's message)."""
    seen: dict[tuple[tuple[str, ...], str | None], list[str]] = {}
    for c in doc_commands():
        if (c.program in programs) or ("benchmarks/" in programs and c.program.startswith("benchmarks/")):
            seen.setdefault((tuple(c.argv), c.error), []).append(c.where)
    return [pytest.param(list(argv), wheres, error, id=f"{wheres[0]}:{' '.join(argv[1:])[:60]}")
            for (argv, error), wheres in seen.items()]


def _strip_program(argv: list[str]) -> list[str]:
    return argv[1:] if argv[0] in ("l2h-sim", "l2h-report") else (argv[3:] if argv[1] == "-m" else argv[2:])


def test_the_docs_hold_the_commands_this_file_checks():
    """The extraction itself: each kind of command is found (a broken pattern would check nothing)."""
    programs = {c.program for c in doc_commands()}
    assert {"sim.run", "sim.report", "benchmarks/findings_tables.py"} <= programs
    wheres = {c.where.split(":")[0] for c in doc_commands() if c.program == "sim.run"}
    assert {"README.md", "docs/operations.md", "docs/findings.md", "configs/experiment/compare.yaml"} <= wheres
    assert len(_by_program("sim.run")) >= 30


@pytest.fixture(scope="module", autouse=True)
def one_hydra():
    """One Hydra initialisation for the whole file: :func:`sim.cli._hydra` initialises Hydra anew for every
    check (twice for a sweep), a quarter of a second each on this machine; the config files do not change
    between commands. A command with ``--config-dir`` / ``--config-path`` still gets its own."""
    import sim.cli
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    own = sim.cli._hydra

    @contextmanager
    def shared(line=None):
        if line is not None and (line.config_dir or line.config_path):
            with own(line) as loader:
                yield loader
            return
        if not GlobalHydra.instance().is_initialized():
            sim.cli.register()
            initialize_config_module(config_module=sim.cli.CONFIG_MODULE, version_base="1.3")
        yield GlobalHydra.instance().config_loader()

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sim.cli, "_hydra", shared)
        yield
    GlobalHydra.instance().clear()


@pytest.fixture(scope="module")
def groups():
    """Every config group's options (``strategy``: l2h, l2d, ...), from Hydra's config loader."""
    from sim.cli import _hydra

    with _hydra() as loader:
        return {g: set(loader.get_group_options(g)) for g in loader.list_groups("") if g != "hydra"}


@pytest.fixture(scope="module")
def config_keys():
    """Every key of the default config, dotted (``strategy.rejector.federation``, ...)."""
    from sim.cli import compose_checked
    from sim.core.config import plain
    from sim.tracking import flat_params

    return set(flat_params(plain(compose_checked([]))))


def preset_sweep(args: list[str]) -> list[list[str]]:
    """The jobs of a ``-m`` command of the default config that picks at most one experiment preset, expanded
    by :func:`sim.cli._expand` (Hydra's override parser, the basic sweeper's order) with the preset's
    ``hydra.sweeper.params`` read from its YAML; [] for any other command (checked by :func:`sim.cli.precheck`
    as it is). The presets hold the only sweeper params in configs/, and :func:`sim.cli.sweep_jobs` composes
    the whole config to find them: a second composition per sweep, a third of this file's time.
    :func:`test_a_presets_sweep_expands_as_the_command_line_check_expands_it` holds the two ways equal."""
    from omegaconf import OmegaConf

    from sim.cli import _expand, parse_command_line

    line = parse_command_line(args)
    presets = [o.split("=", 1)[1] for o in line.overrides if o.lstrip("+").split("=", 1)[0] == "experiment"]
    if not line.multirun or line.config_name != "config" or line.config_dir or line.config_path \
            or len(presets) > 1 or any("," in p for p in presets):
        return []
    params = None
    for name in presets:
        path = ROOT / "configs" / "experiment" / f"{name}.yaml"
        if not path.is_file():
            return []  # no such preset: the command line's check says so
        preset = OmegaConf.load(path)
        found = OmegaConf.select(preset, "hydra.sweeper.params")
        params = OmegaConf.to_container(found, resolve=False) if found is not None else None
    return _expand(line.overrides, params)


@pytest.mark.parametrize("args", [
    ["-m", "experiment=tiered_servers", "+tier=both", "servers.c_e=[0.05,0.1],[0.05,0.3]"],
    ["-m", "experiment=compare", "strategy=l2h,l2d", "seed=0,1", "hydra.sweep.dir=runs/x"],
    ["-m", "servers.training=independent,mel", "seed=0,1", "sim.sweep_parallel=2"],
])
def test_a_presets_sweep_expands_as_the_command_line_check_expands_it(args):
    from sim.cli import parse_command_line, sweep_jobs

    assert preset_sweep(args) == sweep_jobs(parse_command_line(args))


@pytest.mark.parametrize("argv,where,error", _by_program("sim.run"))
def test_sim_run_command_composes(argv, where, error, groups, tmp_path, monkeypatch):
    """Composes and passes the command line's checks; or, where the docs show its error, fails with it."""
    import sim.cli
    from sim.core.errors import ConfigError
    from sim.run import check_command_line

    args = _strip_program(argv)
    if error is None and tuple(args) in NEEDS_THE_READERS_FILES:
        error = NEEDS_THE_READERS_FILES[tuple(args)]
    monkeypatch.chdir(tmp_path)  # relative run directories and stores land here, if anything is made
    for a in args:  # a data file named as a placeholder
        key, eq, value = a.partition("=")
        if eq and key.lstrip("+") == "data.path" and not Path(value).is_absolute():
            (tmp_path / value).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / value).touch()
    jobs: list[list[str]] = []
    try:
        jobs = preset_sweep(args)
        if jobs:  # its first job, on its own, with the flags and hydra.* overrides of the command
            sim.cli.check_sweep_settings(jobs)
            line = sim.cli.parse_command_line(args)
            check_command_line([a for a in args if a not in ("-m", "--multirun") and a not in line.overrides]
                               + jobs[0])
        else:
            def first_job(all_jobs, cap):
                jobs.extend(all_jobs)
                return all_jobs[:1]

            monkeypatch.setattr(sim.cli, "sample_jobs", first_job)
            check_command_line(args)
    except ConfigError as exc:
        if error is not None and (str(exc) == error or str(exc).startswith(error)):
            return
        pytest.fail(f"{' '.join(argv)}  ({', '.join(where)}): {exc}"
                    + (f"; the docs say: error: {error}" if error is not None else ""))
    assert error is None, f"{' '.join(argv)} ({', '.join(where)}): passed, but the docs say: error: {error}"
    assert jobs, "the command line expanded to no job"
    for job in jobs:  # the other jobs' choices of config groups (their values parsed in the expansion)
        for ov in job:
            key, _, value = ov.lstrip("+~").partition("=")
            if key in groups and value not in ("null", ""):
                assert value in groups[key], (f"{' '.join(argv)} ({', '.join(where)}): {key}={value} is not one of "
                                              f"{', '.join(sorted(groups[key]))}")


@pytest.mark.parametrize("argv,where,error", _by_program("sim.report"))
def test_sim_report_command_parses(argv, where, error, config_keys):
    from sim.naming import parse_label
    from sim.report import parse_baseline, parser

    ap = parser()
    flags = {a.split("=", 1)[0] for a in _strip_program(argv) if a.startswith("-")}
    unknown = flags - set(ap._option_string_actions)  # argparse would take an abbreviation; the docs spell it out
    assert not unknown, f"{' '.join(argv)} ({', '.join(where)}): sim.report has no {', '.join(sorted(unknown))}"
    try:
        ns = ap.parse_args(_strip_program(argv))
    except SystemExit:
        pytest.fail(f"{' '.join(argv)} ({', '.join(where)}): sim.report's arguments do not parse (stderr above)")
    keys = set(parse_baseline(ns.baseline)) if ns.baseline else set()
    for spec in ns.label:
        which, _ = parse_label(spec, sorted(config_keys))
        keys |= set(which) if isinstance(which, dict) else set()
    assert keys <= config_keys, f"{' '.join(argv)} ({', '.join(where)}): not config keys: {keys - config_keys}"


def _script_flags(script: Path) -> set[str]:
    """The ``--flags`` a script's argparse defines (read from its source: nothing imported or run)."""
    flags: set[str] = set()
    for node in ast.walk(ast.parse(script.read_text())):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "add_argument":
            flags |= {a.value for a in node.args if isinstance(a, ast.Constant) and str(a.value).startswith("-")}
    return flags | {"-h", "--help"}


@pytest.mark.parametrize("argv,where,error", _by_program("benchmarks/"))
def test_benchmark_command_uses_flags_the_script_has(argv, where, error):
    script = ROOT / argv[1]
    assert script.is_file(), f"{' '.join(argv)} ({', '.join(where)}): no {argv[1]}"
    used = {a.split("=", 1)[0] for a in argv[2:] if a.startswith("-")}
    unknown = used - _script_flags(script)
    assert not unknown, f"{' '.join(argv)} ({', '.join(where)}): {argv[1]} has no {', '.join(sorted(unknown))}"


def test_flwr_run_commands_overrides_compose():
    """``flwr run . ... -c 'overrides="..." run-dir="..."'``: the run config parsed as Flower parses it, and
    its overrides composed and checked as the ServerApp does (:func:`sim.flwr_app.config_from`)."""
    from flwr.common.config import parse_config_args

    from sim.flwr_app import config_from

    found = [c for c in doc_commands() if c.argv[:2] == ["flwr", "run"]]
    assert found, "no flwr run command in the docs"
    for c in found:
        argv = c.argv
        given = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a in ("-c", "--run-config")]
        run_config = parse_config_args(given)
        assert "overrides" in run_config, f"{c.where}: {c.text}: no overrides in its run config"
        config_from(run_config)


def test_other_python_commands_name_modules_and_files_that_exist():
    import importlib.util

    for c in doc_commands():
        if c.program in ("sim.run", "sim.report", "") or c.program.startswith("benchmarks/"):
            continue
        if c.argv[1] == "-m":
            assert importlib.util.find_spec(c.program) is not None, f"{c.where}: {c.text}: no module {c.program}"
        else:
            assert (ROOT / c.program).is_file(), f"{c.where}: {c.text}: no file {c.program}"
