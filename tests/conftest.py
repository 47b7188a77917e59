"""Shared test configuration: hypothesis runs are deterministic.

``derandomize`` derives each test's examples from its source, and no example database is
kept, so a run replays exactly; set HYPOTHESIS_PROFILE=explore to search with fresh seeds.
"""

import os

from hypothesis import HealthCheck, settings

settings.register_profile(
    "deterministic",
    derandomize=True,
    database=None,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("explore", deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "deterministic"))
