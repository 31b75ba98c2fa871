"""Commands beyond training (evaluation, export, summaries, benchmarks, keys, data).

Each attaches itself to :data:`lesft.cli.app`.
"""

from __future__ import annotations
from lesft import commands_eval  # noqa: E402,F401
from lesft import commands_keys  # noqa: E402,F401
from lesft import commands_bench  # noqa: E402,F401
from lesft import commands_run  # noqa: E402,F401
from lesft import commands_bench_runs  # noqa: E402,F401
from lesft import commands_data  # noqa: E402,F401
