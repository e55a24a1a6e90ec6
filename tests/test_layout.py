"""The direction of imports DESIGN.md gives ("Layout"): lower never imports higher.

DESIGN names the main concerns in order (paths and config, identity, vault,
keychain, enroll, forward, control, server); the helper modules it does not
name sit where what they import and what imports them put them. Each import
of an ``agent`` module, at the top of a file or inside a function, must
point to a strictly lower layer (modules of one package, ``agent.forward``,
may use each other). ``cli`` holds no crypto or storage code of its own.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

#: Lowest first. A module is named by its first part below ``agent``.
LAYERS: list[set[str]] = [
    {"", "errors"},  # "" is the package itself (APP_NAME, __version__)
    {"paths", "config", "peer", "activation", "notify", "logind", "remember"},
    {"policy"},  # caller rules, which an identity carries
    {"identity", "audit"},
    {"vault", "routing", "webclient"},
    {"keychain", "est"},  # est: the EST protocol, which enroll drives
    {"enroll"},
    {"forward", "renewal", "autolock"},
    {"control"},
    {"server"},
    {"__main__"},
]
LAYER = {name: index for index, names in enumerate(LAYERS) for name in names}

#: Crypto and storage stay in ``agent``: the CLI parses, prompts and prints.
CLI_MUST_NOT_IMPORT = ("cryptography", "ssl", "hashlib", "hmac", "secrets", "keyring", "tempfile")


def _concern(module: str) -> str:
    parts = module.split(".")
    assert parts[0] == "agent", module
    return parts[1] if len(parts) > 1 else ""


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Every absolute module a file imports, wherever in the file."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            # "from agent import forward" imports agent.forward
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


AGENT_FILES = sorted((ROOT / "agent").rglob("*.py"))


def test_every_agent_module_has_a_layer() -> None:
    missing = {_concern(_module_name(f)) for f in AGENT_FILES} - LAYER.keys()
    assert not missing, f"modules with no place in LAYERS: {sorted(missing)}"


@pytest.mark.parametrize("path", AGENT_FILES, ids=lambda p: _module_name(p))
def test_agent_modules_import_only_lower_layers(path: Path) -> None:
    own = _concern(_module_name(path))
    upward = []
    for imported in _imports(path):
        if imported != "agent" and not imported.startswith("agent."):
            continue
        concern = _concern(imported)
        if concern not in LAYER:  # "from agent import APP_NAME": a name, not a module
            concern = ""
        if concern != own and LAYER[concern] >= LAYER[own]:
            upward.append(imported)
    assert not upward, f"{_module_name(path)} imports a module not below it: {sorted(upward)}"


@pytest.mark.parametrize(
    "path", sorted((ROOT / "cli").rglob("*.py")), ids=lambda p: _module_name(p)
)
def test_the_cli_has_no_crypto_or_storage_of_its_own(path: Path) -> None:
    banned = [name for name in _imports(path) if name.split(".")[0] in CLI_MUST_NOT_IMPORT]
    assert not banned, f"{_module_name(path)} imports {banned}: that belongs in agent/"
