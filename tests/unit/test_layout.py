# Rules of the repository's layout that hold by a grep, so a merge that breaks them fails here:
#   - the command-line tools live in mgt_scale/commands/, and no module of a lower package imports them
#     (library code a command needs belongs to the package of its concern);
#   - exit code 2 is spelled `CONFIG_ERROR` (mgt_scale/exit_codes.py), never a literal `return 2` /
#     `exit(2)`, so a change to the contract is one edit;
#   - no Python file of the repository is over 500 lines (docs/ARCHITECTURE.md: one concern per file).
import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PKG = REPO / "mgt_scale"
MAX_LINES = 500
# the `python -m mgt_scale.cli` spelling: a two-line forward to the dispatcher, above every package
COMMAND_USERS = {PKG / "cli.py"}


def _imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def test_no_lower_package_imports_commands():
    bad = []
    for f in sorted(PKG.rglob("*.py")):
        if (PKG / "commands") in f.parents or f in COMMAND_USERS:
            continue
        hits = sorted(m for m in _imported_modules(f) if m == "mgt_scale.commands" or m.startswith("mgt_scale.commands."))
        if hits:
            bad.append(f"{f.relative_to(REPO)}: {hits}")
    assert not bad, "modules outside mgt_scale/commands import it:\n" + "\n".join(bad)


def test_commands_dispatch_to_modules_that_exist():
    import importlib
    from mgt_scale.commands.main import COMMANDS
    for name, (module, _) in COMMANDS.items():
        assert callable(importlib.import_module(module).main), name


# `return 2`, `exit(2)`, `sys.exit(2)`, `SystemExit(2)`: the bare literal of the config-error exit code
EXIT_2 = re.compile(r"\b(?:return|exit\(|SystemExit\()\s*2\b(?!\.)")


def test_exit_code_2_is_spelled_config_error():
    bad = []
    for d in ("mgt_scale", "scripts", "launch", "bench"):
        for f in sorted((REPO / d).rglob("*.py")):
            if f == PKG / "exit_codes.py":
                continue
            for n, line in enumerate(f.read_text().splitlines(), 1):
                code = line.split("#", 1)[0]
                if EXIT_2.search(code):
                    bad.append(f"{f.relative_to(REPO)}:{n}: {line.strip()}")
    assert not bad, "exit code 2 as a literal (use mgt_scale.exit_codes.CONFIG_ERROR):\n" + "\n".join(bad)


def test_no_python_file_over_500_lines():
    bad = []
    for d in ("mgt_scale", "bench", "scripts", "launch", "tests"):
        for f in sorted((REPO / d).rglob("*.py")):
            n = len(f.read_text().splitlines())
            if n > MAX_LINES:
                bad.append(f"{f.relative_to(REPO)}: {n} lines")
    assert not bad, f"split these by concern (at most {MAX_LINES} lines each):\n" + "\n".join(bad)


def test_bad_log_level_is_a_config_error(monkeypatch, capsys):
    """MGT_LOG_LEVEL that names no level: exit 2 with one line naming the variable, not a traceback."""
    from mgt_scale.commands.main import main
    monkeypatch.setenv("MGT_LOG_LEVEL", "loud")
    assert main(["--version"]) == 2
    err = capsys.readouterr().err
    assert "MGT_LOG_LEVEL" in err and "Traceback" not in err
