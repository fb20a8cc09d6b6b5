"""Fixtures for deploy tests: root-only tests skip with the reason when we are not root."""
from __future__ import annotations

import os
import shutil

import pytest

ROOT_REASON = ("needs root for network namespaces, veth pairs and tc qdiscs "
               "(run pytest as root, e.g. in the CI container)")


def pytest_collection_modifyitems(config, items):
    missing = [b for b in ("ip", "tc") if shutil.which(b) is None]
    if os.geteuid() == 0 and not missing:
        return
    reason = ROOT_REASON if os.geteuid() != 0 else f"needs {', '.join(missing)} (iproute2)"
    for item in items:
        if "root" in item.keywords:
            item.add_marker(pytest.mark.skip(reason=reason))
