"""The whole outcome suite (``tests/integration/test_outcomes.py``) in quorum mode, on the
three-node cluster: the same tests, collected here with this directory's ``harness``."""

from __future__ import annotations

import pytest

from .. import test_outcomes

pytestmark = pytest.mark.integration

globals().update(
    {name: test for name, test in vars(test_outcomes).items() if name.startswith("test_")}
)
