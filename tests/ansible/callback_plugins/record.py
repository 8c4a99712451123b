# Test helper callback: writes every task result as JSON to $STARLING_RECORD_FILE.
from __future__ import annotations

import json
import os

from ansible.plugins.callback import CallbackBase

DOCUMENTATION = r"""
name: record
type: aggregate
short_description: Record task results as JSON (tests only)
description: Writes one JSON list of task results to the file named by STARLING_RECORD_FILE.
"""


class CallbackModule(CallbackBase):
    CALLBACK_VERSION = 2.0
    CALLBACK_TYPE = "aggregate"
    CALLBACK_NAME = "record"
    CALLBACK_NEEDS_ENABLED = True

    def __init__(self):
        super().__init__()
        self.results = []

    def _add(self, status, result):
        self.results.append(
            {"task": result.task_name, "host": result._host.get_name(), "status": status, "result": result._result}
        )

    def v2_runner_on_ok(self, result):
        self._add("ok", result)

    def v2_runner_on_failed(self, result, ignore_errors=False):
        self._add("failed", result)

    def v2_runner_on_skipped(self, result):
        self._add("skipped", result)

    def v2_runner_on_unreachable(self, result):
        self._add("unreachable", result)

    def v2_playbook_on_stats(self, stats):
        path = os.environ.get("STARLING_RECORD_FILE")
        if path:
            with open(path, "w") as fh:
                json.dump(self.results, fh, default=str)
