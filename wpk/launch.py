"""How wpk starts its own processes (tiers, relays, the MQTT bridge): `python -m MODULE` without
the current directory on `sys.path`.

`python -m` puts the current directory first on the import path; started from a directory that
holds a folder named `wpk` (the parent of a clone called `wpk`), that folder shadowed the
installed package and every tier failed with "cannot import name '__version__' from 'wpk'".
"""
from __future__ import annotations

import sys

# 3.11+: -P drops the script's directory (here: the current one) from sys.path.
# 3.10: the same by hand before running the module.
_RUN_WITHOUT_CWD = ("import runpy, sys; del sys.path[0]; sys.argv[0] = {module!r}; "
                    "runpy.run_module({module!r}, run_name='__main__', alter_sys=True)")


def module_command(module: str, *args: str, python: str | None = None) -> list[str]:
    """argv that runs `module` as `python -m module args...`, immune to a `wpk` folder in the
    current directory."""
    python = python or sys.executable
    if sys.version_info >= (3, 11):
        return [python, "-P", "-m", module, *args]
    return [python, "-c", _RUN_WITHOUT_CWD.format(module=module), *args]
